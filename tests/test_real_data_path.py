"""The path a user takes to real data: a local text corpus, local chat conversations and local
preference pairs (hh-rlhf transcripts), through every stage. There is no synthetic world, so no rater:
each stage must say so in its metrics instead of failing or inventing a gold score."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from tests.conftest import SMOKE_PARAMS, run_stage, stage_env

pytestmark = pytest.mark.slow

WORDS = (
    "the river cat walks slowly under a bright moon while old friends sing about bread and small boats "
    "near green hills where children play with red kites every summer morning"
).split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."


def test_local_corpus_chat_and_preferences_run_without_a_rater(tmp_path):
    rng = random.Random(0)
    raw = tmp_path / "data" / "raw"
    (raw / "chat").mkdir(parents=True)
    (raw / "preferences").mkdir()
    for i in range(60):
        (raw / f"doc{i}.txt").write_text(" ".join(sentence(rng) for _ in range(8)))
    with open(raw / "chat" / "talk.jsonl", "w") as f:
        for _ in range(80):
            q, a = sentence(rng), sentence(rng)
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                )
                + "\n"
            )
    with open(raw / "preferences" / "hh.jsonl", "w") as f:
        for _ in range(40):
            q = sentence(rng)
            f.write(
                json.dumps(
                    {
                        "chosen": f"\n\nHuman: {q}\n\nAssistant: {sentence(rng)}",
                        "rejected": f"\n\nHuman: {q}\n\nAssistant: {sentence(rng)}",
                    }
                )
                + "\n"
            )
    params = yaml.safe_load(SMOKE_PARAMS.read_text())
    params["corpus"] = {"source": "local", "val_fraction": 0.1, "local": {"paths": ["data/raw/*.txt"]}}
    params["tokenizer"]["vocab_size"] = 300
    params["sft"]["data"] = {"source": "local"}
    params["preferences"].update(source="local", local={"prompt_column": None})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = stage_env(tmp_path)
    tok = ["--tokenizer", "data/tokenizer/tokenizer.json"]
    world = ["--world", "data/corpus/world.json"]
    stages = [
        ("corpus", ["--out", "data/corpus", "--metrics", "metrics/corpus.json"]),
        (
            "tokenizer",
            [
                "--corpus",
                "data/corpus",
                "--out",
                "data/tokenizer",
                "--tokens",
                "data/tokens",
                "--metrics",
                "metrics/tokenizer.json",
                "--report",
                "reports/tokenizer",
            ],
        ),
        (
            "pretrain",
            [
                "--tokens",
                "data/tokens",
                *tok,
                *world,
                "--checkpoints",
                "checkpoints/pretrain",
                "--out",
                "models/pretrain",
                "--metrics",
                "metrics/pretrain.json",
                "--plots",
                "plots/pretrain",
                "--report",
                "reports/pretrain",
            ],
        ),
        (
            "sft",
            [
                "--model",
                "models/pretrain",
                *tok,
                *world,
                "--corpus",
                "data/corpus",
                "--checkpoints",
                "checkpoints/sft",
                "--out",
                "models/sft",
                "--metrics",
                "metrics/sft.json",
                "--plots",
                "plots/sft",
                "--report",
                "reports/sft",
            ],
        ),
        (
            "preferences",
            [
                "--model",
                "models/sft",
                *tok,
                *world,
                "--out",
                "data/preferences",
                "--metrics",
                "metrics/preferences.json",
            ],
        ),
        (
            "reward",
            [
                "--pairs",
                "data/preferences",
                "--model",
                "models/sft",
                *tok,
                "--checkpoints",
                "checkpoints/reward",
                "--out",
                "models/reward",
                "--metrics",
                "metrics/reward.json",
                "--plots",
                "plots/reward",
            ],
        ),
        (
            "ppo",
            [
                "--model",
                "models/sft",
                "--reward",
                "models/reward",
                *tok,
                *world,
                "--pairs",
                "data/preferences",
                "--checkpoints",
                "checkpoints/ppo",
                "--out",
                "models/ppo",
                "--metrics",
                "metrics/ppo.json",
                "--plots",
                "plots/ppo",
                "--report",
                "reports/ppo",
            ],
        ),
        (
            "evaluate",
            [
                "--base",
                "models/pretrain",
                "--sft",
                "models/sft",
                "--ppo",
                "models/ppo",
                *tok,
                "--tokenizer-report",
                "reports/tokenizer/report.json",
                "--tokens",
                "data/tokens",
                *world,
                "--pretrain-plots",
                "plots/pretrain",
                "--reward-metrics",
                "metrics/reward.json",
                "--reward-plots",
                "plots/reward",
                "--ppo-metrics",
                "metrics/ppo.json",
                "--ppo-plots",
                "plots/ppo",
                "--metrics",
                "metrics/evaluate.json",
                "--plots",
                "plots/evaluate",
                "--report",
                "reports/report.md",
                "--details",
                "reports/evaluate",
            ],
        ),
    ]
    for name, args in stages:
        r = run_stage(name, args, tmp_path, env, tmp_path / "params.yaml")
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"

    metrics = {name: json.loads((tmp_path / "metrics" / f"{name}.json").read_text()) for name, _ in stages}
    assert metrics["sft"]["examples"] == 80 and "gold_score_mean" not in metrics["sft"]
    assert "→" in (tmp_path / "reports/sft/replies.md").read_text()  # ungraded replies, for reading
    assert metrics["preferences"]["pairs"] == 40 and metrics["preferences"]["gold_rater"] == 0
    assert metrics["reward"]["gold_rater"] == 0 and "accuracy_gold" not in metrics["reward"]
    ppo = metrics["ppo"]
    assert "gold_gain" not in ppo and {"reward_gain", "reward_gain_ci95", "kl_to_sft"} <= set(ppo)
    assert ppo["n_prompts"] == 4  # the validation pairs' distinct prompts (10 % of 40)
    header = (tmp_path / "plots/ppo/iterations.csv").read_text().splitlines()[0]
    assert "objective/kl" in header and "gold/score" not in header
    # No world: the graded sections say they were not measured; the rest of the report is there.
    report = (tmp_path / "reports/report.md").read_text()
    assert "Not measured: this run used a real corpus" in report and "## 9. Attention costs" in report
    assert "suite" not in metrics["evaluate"] and metrics["evaluate"]["perplexity"]["ppo"]["perplexity"] > 1
