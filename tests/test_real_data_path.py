"""The path a user takes to real data, run as they run it, with `dvc repro` in a copy of the repository:
local files (a text corpus, smoltalk-like chats with system turns and several turns, preference pairs as
Anthropic/hh-rlhf's whole transcripts). The GPU recipe's data path, the other preference layout, is
tests/test_recipe_data_path.py (a file of its own, so that the two runs go to both test processes).
There is no synthetic world, so no rater: each stage says so in its metrics instead of failing or
inventing a gold score, and the pipeline runs to the end, the registered model included."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import yaml

from tests.conftest import repo_copy, stage_env

pytestmark = pytest.mark.slow

WORDS = (
    "the river cat walks slowly under a bright moon while old friends sing about bread and small boats "
    "near green hills where children play with red kites every summer morning"
).split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def raw_data(raw, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Files in the layouts of TinyStories (text), smoltalk (messages, with a system turn and two user
    turns) and the two preference layouts, hh-rlhf's and ultrafeedback_binarized's."""
    for i in range(60):
        (raw / f"doc{i}.txt").write_text(" ".join(sentence(rng) for _ in range(8)))
    chats = []
    for _ in range(80):
        turns = [{"role": "system", "content": "You are kind."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 2)):
            turns += [
                {"role": "user", "content": sentence(rng)},
                {"role": "assistant", "content": sentence(rng)},
            ]
        chats.append({"messages": turns})
    write_jsonl(raw / "chat" / "talk.jsonl", chats)
    hh, uf = [], []
    for _ in range(40):
        q, good, bad = sentence(rng), sentence(rng), sentence(rng)
        hh.append(
            {
                "chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}",
            }
        )
        user = {"role": "user", "content": q}
        uf.append(
            {
                "prompt": q,
                "chosen": [user, {"role": "assistant", "content": good}],
                "rejected": [user, {"role": "assistant", "content": bad}],
            }
        )
    write_jsonl(raw / "hh" / "pairs.jsonl", hh)
    return chats, uf


def repro(repo, env) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_local_real_data_runs_to_the_end_under_dvc_repro(tmp_path):
    repo_copy(tmp_path)
    rng = random.Random(0)
    raw_data(tmp_path / "data" / "raw", rng)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["corpus"] = {"source": "local", "val_fraction": 0.1, "local": {"paths": ["data/raw/*.txt"]}}
    params["tokenizer"]["vocab_size"] = 300
    params["sft"]["data"] = {"source": "local"}
    params["preferences"].update(
        source="local", local={"paths": ["data/raw/hh/*.jsonl"], "prompt_column": None}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = stage_env(tmp_path)

    first = repro(tmp_path, env)
    for stage in ("corpus", "sft", "preferences", "reward", "ppo", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    metrics = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "metrics").glob("*.json")}
    assert metrics["sft"]["examples"] == 80 and "gold_score_mean" not in metrics["sft"]
    assert "→" in (tmp_path / "reports/sft/replies.md").read_text()  # ungraded replies, for reading
    assert metrics["preferences"]["pairs"] == 40 and metrics["preferences"]["gold_rater"] == 0
    assert metrics["reward"]["gold_rater"] == 0 and "accuracy_gold" not in metrics["reward"]
    ppo = metrics["ppo"]
    assert "gold_gain" not in ppo and {"reward_gain", "reward_gain_ci95", "kl_to_sft"} <= set(ppo)
    assert ppo["n_prompts"] == 4  # the validation pairs' distinct prompts (10 % of 40)
    header = (tmp_path / "plots/ppo/iterations.csv").read_text().splitlines()[0]
    assert "objective/kl" in header and "gold/score" not in header
    # No world: the graded sections say they were not measured; the rest of the report is there, and
    # the graded curves dvc.yaml declares exist with their header only.
    report = (tmp_path / "reports/report.md").read_text()
    assert "Not measured: this run used a real corpus" in report and "## 9. Attention costs" in report
    assert "suite" not in metrics["evaluate"] and metrics["evaluate"]["perplexity"]["ppo"]["perplexity"] > 1
    assert (tmp_path / "plots/evaluate/temperature.csv").read_text().splitlines() == [
        "temperature,accuracy,distinct_2,unique_share"
    ]
    assert json.loads((tmp_path / "reports/register.json").read_text())  # the model was registered
