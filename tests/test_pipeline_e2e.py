"""The real `dvc repro` of the tiny configuration in a temporary copy of the repository, tracked by a
real `mlflow server` on 127.0.0.1 (its own store) through MLFLOW_TRACKING_URI.

Checks what a user sees: the stages ran in order, their outputs and metrics exist, the report links only
figures that exist; the MLflow UI's REST API shows one pipeline run with a child run per stage (params,
metric histories, artifacts, tags), the report and figures on the pipeline run, and the registered
model with its alias; `dvc plots show` renders; `dvc metrics diff` compares two experiments; a second
`dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from llmlab.provenance import stage_paths
from tests.conftest import mlflow_server, repo_copy, stage_env
from tests.test_dvc_yaml import stages_importing

pytestmark = pytest.mark.slow
STAGES = (
    "corpus",
    "tokenizer",
    "pretrain",
    "sft",
    "critique",
    "preferences",
    "reward",
    "ppo",
    "dpo",
    "evaluate",
    "register",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, server):
    repo = tmp_path_factory.mktemp("repo")
    commit = repo_copy(repo)
    # LLMLAB_PARAMS_TRACE: every stage writes the params keys it read (test_each_stage_reads_the_params_it_declares)
    trace = tmp_path_factory.mktemp("params_read")
    env = stage_env(repo) | {"MLFLOW_TRACKING_URI": server, "LLMLAB_PARAMS_TRACE": str(trace)}
    first = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    reference = tmp_path_factory.mktemp("reference")  # this run's outputs, before later tests change the repo
    for folder in ("metrics", "models", "plots"):
        shutil.copytree(repo / folder, reference / folder)
    # What the kill test starts from: the outputs of every stage it does not kill, and their dvc.lock entries.
    upstream = tmp_path_factory.mktemp("upstream")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for name in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        if name in TRAINED:
            del lock["stages"][name]
            continue
        for out in stage_paths(name, repo / "dvc.yaml")[1]:
            (upstream / out).parent.mkdir(parents=True, exist_ok=True)
            if (repo / out).is_dir():
                shutil.copytree(repo / out, upstream / out)
            else:
                shutil.copy2(repo / out, upstream / out)
    (upstream / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    # The outputs' cache, not the run cache (with it, DVC would restore the training stages instead of running them).
    cache = Path(".dvc", "cache", "files")
    shutil.copytree(repo / cache, upstream / cache)
    return repo, env, commit, first, upstream, reference


def test_outputs_and_metrics(pipeline):
    repo, *_ = pipeline
    for path in [
        "data/corpus/train.parquet",
        "data/corpus/validation.parquet",
        "data/corpus/world.json",
        "data/tokenizer/tokenizer.json",
        "data/tokens/train-00000.bin",
        "data/tokens/meta.json",
        "models/pretrain/model.safetensors",
        "models/pretrain/config.json",
        "plots/pretrain/train_loss.csv",
        "plots/pretrain/val_loss.csv",
        "reports/pretrain/samples.md",
        "checkpoints/pretrain/last.ckpt",
        "models/sft/model.safetensors",
        "reports/sft/replies.json",
    ]:
        assert (repo / path).is_file(), path
    corpus = json.loads((repo / "metrics/corpus.json").read_text())
    assert corpus["documents_bio"] == 16 * 3
    tokenizer = json.loads((repo / "metrics/tokenizer.json").read_text())
    assert tokenizer["tokens_per_number/5_digits"] == 5.0  # one token per digit
    pretrain = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pretrain["steps"] == 30
    assert pretrain["val_loss"] < 6.2  # well below log(512) = 6.24 of a uniform guess
    assert 0 <= pretrain["fact_recall"] <= 1 and pretrain["fact_recall_n"] == 16 * 6
    sft = json.loads((repo / "metrics/sft.json").read_text())
    assert sft["steps"] == 20 and sft["n_prompts"] == 24
    assert 0 <= sft["format_adherence"] <= 1 and "gold_score_mean" in sft
    prefs = json.loads((repo / "metrics/preferences.json").read_text())
    assert prefs["prompts"] == 24 and prefs["pairs"] + prefs["ties_dropped"] == 24 * 3
    assert (repo / "data/preferences/train.parquet").is_file()
    reward = json.loads((repo / "metrics/reward.json").read_text())
    assert reward["steps"] == 10 and 0 <= reward["accuracy_gold"] <= 1
    assert (repo / "models/reward/model.safetensors").is_file() and (
        repo / "plots/reward/calibration.csv"
    ).is_file()
    ppo = json.loads((repo / "metrics/ppo.json").read_text())
    assert ppo["iterations"] == 4 and ppo["episodes"] == 4 * 8 and ppo["n_prompts"] == 16
    for key in (
        "sft/gold_score_mean",
        "ppo/gold_score_mean",
        "gold_gain",
        "gold_gain_ci95",
        "kl_to_sft",
        "train/kl_final",
        "train/gold_score_final",
    ):
        assert key in ppo, key
    assert (repo / "models/ppo/model.safetensors").is_file() and (repo / "reports/ppo/replies.md").is_file()
    dpo = json.loads((repo / "metrics/dpo.json").read_text())
    assert dpo["steps"] == 10 and dpo["n_prompts"] == 16 and dpo["pairs_train"] >= 2
    assert {
        "dpo/gold_score_mean",
        "gold_gain",
        "gold_gain_ci95",
        "kl_to_sft",
        "val_rewards/accuracies",
    } <= set(dpo)
    assert (repo / "models/dpo/model.safetensors").is_file() and "DPO (" in (
        repo / "reports/dpo/replies.md"
    ).read_text()
    curve = (repo / "plots/ppo/iterations.csv").read_text().splitlines()
    assert len(curve) == 1 + 4 and {"objective/kl", "policy/clipfrac_avg", "gold/score"} <= set(
        curve[0].split(",")
    )
    shown = subprocess.run(
        ["dvc", "metrics", "show", "--json"], cwd=repo, env=pipeline[1], capture_output=True, text=True
    )
    assert "fact_recall" in shown.stdout
    for f in sorted(
        (repo / "metrics").glob("*.json")
    ):  # strict JSON: NaN/Infinity would also break metrics diff
        json.loads(
            f.read_text(),
            parse_constant=lambda c, name=f.name: pytest.fail(f"{name} holds {c}, which is not JSON"),
        )


def api(url: str, endpoint: str, method: str = "get", **payload) -> dict:
    """One call of MLflow's REST API (what the UI itself calls)."""
    if method == "get":
        r = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=payload, timeout=30)
    else:
        r = requests.post(f"{url}/api/2.0/mlflow/{endpoint}", json=payload, timeout=30)
    assert r.status_code == 200, (endpoint, r.text)
    return r.json()


def test_the_mlflow_ui_shows_the_pipeline_run_its_stages_and_the_model(pipeline, server):
    repo, env, commit, *_ = pipeline
    exp = api(server, "experiments/get-by-name", experiment_name="llmlab")["experiment"]
    runs = api(server, "runs/search", "post", experiment_ids=[exp["experiment_id"]], max_results=100)["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]]
    children = [r for r in runs if "mlflow.parentRunId" in tags[r["info"]["run_id"]]]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent_id = parents[0]["info"]["run_id"]
    by_stage = {tags[r["info"]["run_id"]]["stage"]: r for r in children}
    assert sorted(by_stage) == sorted(STAGES) and len(children) == len(STAGES)
    for run in children:
        t = tags[run["info"]["run_id"]]
        assert t["mlflow.parentRunId"] == parent_id and run["info"]["status"] == "FINISHED"
        assert t["git_commit"] == commit and t["git_dirty"] in ("true", "false")
    # Provenance: each stage's run carries the hash of every dep and out, equal to its dvc.lock entry, and
    # its params; the checkpoints carry the config and commit they were trained from.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, entry in lock.items():
        t = tags[by_stage[stage]["info"]["run_id"]]
        assert t["dvc.stage"] == stage
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []):
                assert t.get(f"dvc.{kind}.{item['path']}") == item["md5"], (stage, kind, item["path"])
        # and its DVC-tracked inputs (the deps that are not code) as dataset inputs, digest = dvc.lock's hash
        inputs = by_stage[stage].get("inputs", {}).get("dataset_inputs", [])
        assert {(i["dataset"]["name"], i["dataset"]["digest"]) for i in inputs} == {
            (item["path"], item["md5"])
            for item in entry.get("deps", [])
            if not item["path"].startswith(("src/", "pipeline/"))
        }, stage
    assert lock["sft"]["deps"] and any(
        i["dataset"]["name"] == "models/pretrain" for i in by_stage["sft"]["inputs"]["dataset_inputs"]
    )
    # The UI opens the experiment as model training, not in the GenAI view (traces)
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
    assert json.loads(tags[by_stage["pretrain"]["info"]["run_id"]]["params"])["pretrain"]["lr"] == 0.003
    fingerprint = json.loads((repo / "checkpoints/pretrain/fingerprint.json").read_text())
    assert fingerprint["config"]["pretrain"]["lr"] == 0.003 and fingerprint["git_commit"] == commit
    shards = {
        f"data/tokens/{name}"
        for name in json.loads((repo / "data/tokens/meta.json").read_text())["shards"]["train"]
    }
    assert len(shards) > 1  # the smoke params' shard size: pretraining read across shards
    assert set(fingerprint["inputs"]) == {"data/tokens/meta.json", "data/tokenizer/tokenizer.json", *shards}

    def history(stage: str, metric: str) -> list[int]:
        run_id = by_stage[stage]["info"]["run_id"]
        return [
            m["step"] for m in api(server, "metrics/get-history", run_id=run_id, metric_key=metric)["metrics"]
        ]

    def artifacts(run_id: str, path: str = "") -> set[str]:
        return {f["path"] for f in api(server, "artifacts/list", run_id=run_id, path=path).get("files", [])}

    pre = by_stage["pretrain"]
    params = {p["key"]: p["value"] for p in pre["data"]["params"]}
    assert params["pretrain.lr"] == "0.003" and params["seed"] == "7"
    steps = history("pretrain", "train/loss")
    assert len(steps) >= 5 and steps[0] < steps[-1]
    assert {"pretrain.json", "config.json"} <= artifacts(pre["info"]["run_id"])
    for name in (
        "objective/kl",
        "objective/entropy",
        "objective/scores",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/ratio",
        "val/num_eos_tokens",
        "gold/score",
    ):
        assert history("ppo", name) == [1, 2, 3, 4], name
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert history("dpo", f"train/{name}") and history("dpo", f"val/{name}"), name  # TRL's names
    assert "tokenizer.json" in artifacts(by_stage["tokenizer"]["info"]["run_id"])
    # The report, its figures and the metrics on the pipeline run: the first thing the UI shows.
    assert {"report.md", "evaluate.json", "figures"} <= artifacts(parent_id)
    figures = {Path(p).name for p in artifacts(parent_id, "figures")}
    assert {
        "models.png",
        "attention_cost.png",
        "attention_heads.png",
        "ppo.png",
        "temperature.png",
    } <= figures
    evaluate_metrics = {m["key"] for m in by_stage["evaluate"]["data"]["metrics"]}
    assert "suite/ppo/accuracy/rate" in evaluate_metrics and "perplexity/base/perplexity" in evaluate_metrics
    # The registry: llmlab-chat, alias champion on the newest version, the PPO model logged by `register`.
    model = api(server, "registered-models/get", name="llmlab-chat")["registered_model"]
    champion = api(server, "registered-models/alias", name="llmlab-chat", alias="champion")["model_version"]
    assert champion["version"] == max(v["version"] for v in model["latest_versions"])
    assert champion["run_id"] == by_stage["register"]["info"]["run_id"]
    register = json.loads((repo / "reports/register.json").read_text())
    assert register["registered_model"] == "llmlab-chat" and str(register["version"]) == champion["version"]
    beside = api(server, "registered-models/alias", name="llmlab-chat-dpo", alias="champion")["model_version"]
    assert beside["run_id"] == by_stage["register"]["info"]["run_id"]


def test_report_has_every_section_and_links_only_existing_figures(pipeline):
    repo, *_ = pipeline
    report = (repo / "reports/report.md").read_text()
    sections = re.findall(r"^## (\d+)\.", report, flags=re.M)
    assert [int(n) for n in sections] == list(range(1, 15))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 8
    for link in links:
        assert (repo / "reports" / link).is_file(), link
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    suite = metrics["suite"]
    assert suite["n_prompts"] == 16 and set(suite) >= {"base", "sft", "ppo", "dpo", "gold_gain_dpo_vs_sft"}
    for model in ("base", "sft", "ppo", "dpo"):
        fmt = suite[model]["format_adherence"]
        assert fmt["n"] == 16 and 0 <= fmt["ci_low"] <= fmt["rate"] <= fmt["ci_high"] <= 1
        assert f"{100 * fmt['rate']:.1f} %" in report  # the report prints this run's numbers
    # invented answers, RLHF against SFT on the same questions, each unknown person one draw
    for model in ("ppo", "dpo") if suite["sft"]["hallucination"]["n"] else ():
        by_person = suite[f"hallucination_{model}_vs_sft"]
        assert by_person["people"] == suite["sft"]["hallucination"]["people"] >= 1
        assert by_person["diff"] == pytest.approx(
            suite[model]["hallucination"]["rate"] - suite["sft"]["hallucination"]["rate"]
        )
        assert suite[f"hallucination_{model}_vs_half_sft"]["diff"] == pytest.approx(
            suite[model]["hallucination"]["rate"] - suite["sft"]["hallucination"]["rate"] / 2
        )
    assert set(metrics["temperature"]) == {"T=0", "T=1"}
    assert metrics["perplexity"]["base"]["perplexity"] > 1
    # the context studies: every position asked equally often, a row per distractor count that fits
    for model in ("sft", "ppo"):
        assert [r["n"] for r in metrics["position"][model]["by_position"].values()] == [2, 2, 2]
        assert (
            set(metrics["distractors"][model]) <= {"0_sentences", "2_sentences"}
            and "0_sentences" in metrics["distractors"][model]
        )
    assert {"name_probe_base", "name_probe_sft", "name_probe_ppo"} <= set(metrics["knowledge"])
    copy = json.loads((repo / "metrics/pretrain.json").read_text())
    assert (
        copy["copy_accuracy_n"] == 4 * 8
        and 0 <= copy["copy_accuracy_value"] <= 1
        and "copy_accuracy_value_repeated" in copy
    )
    assert (repo / "plots/pretrain/copy_accuracy.csv").read_text().startswith("step,copy_accuracy\n")


def test_dvc_plots_render_and_metrics_diff_compares_experiments(pipeline):
    repo, env, *_ = pipeline
    shown = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr
    plots = json.loads(shown.stdout)["data"]
    for name in (
        "pretraining loss",
        "sft loss",
        "reward model loss",
        "reward model calibration",
        "ppo, reward model score and gold score per iteration",
        "ppo, KL to the SFT model per iteration",
        "temperature, accuracy and diversity of the PPO model",
    ):
        assert name in plots, sorted(plots)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)  # the run's dvc.lock: the baseline experiment
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True)
    exp = subprocess.run(
        ["dvc", "exp", "run", "-S", "evaluate.temperature_samples=3", "--name", "t3"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "Running stage 'evaluate'" in exp.stdout and "Running stage 'pretrain'" not in exp.stdout
    diff = subprocess.run(
        ["dvc", "metrics", "diff", "HEAD", "t3", "--json"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert diff.returncode == 0 and "failed to load" not in diff.stderr, (
        diff.stderr
    )  # every metrics file is in the cache
    changed = json.loads(diff.stdout)["metrics/evaluate.json"]
    assert "temperature.T=1.samples_per_prompt" in changed, sorted(changed)[:20]
    assert changed["temperature.T=1.samples_per_prompt"] == {"old": 2, "new": 3, "diff": 1}


@pytest.mark.full
def test_constitutional_ai_path_is_one_dvc_exp_run_away(pipeline):
    """`dvc exp run -S preferences.labeller=constitution` teaches the critique stage's feedback model, lets it
    label the pairs, and reruns what depends on them (not pretraining or SFT); then
    `python -m llmlab.evaluation.labellers` shows the model's labels beside the rater's."""
    repo, env, *_ = pipeline
    skipped = json.loads((repo / "metrics/critique.json").read_text())
    assert skipped == {"taught": 0, "rater_judgments": 0}  # the default run paid nothing for it
    assert "rater judgments" in (repo / "reports/report.md").read_text()
    # the tiny model's 64-token context holds a short principle, a question and two replies, not more
    constitution = repo / "data/constitution.txt"
    shipped = constitution.read_text()
    constitution.write_text("# for a 64-token context\nBe honest.\nBe right.\n")
    try:
        exp = subprocess.run(
            # up to the stages the table reads (evaluate's section 14: tests/test_report.py), to save time
            [
                "dvc",
                "exp",
                "run",
                "--temp",
                "-S",
                "preferences.labeller=constitution",
                "--name",
                "cai",
                "ppo",
                "dpo",
            ],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        constitution.write_text(shipped)  # the workspace's run stays up to date for the tests after this
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "Running stage 'critique'" in exp.stdout and "Running stage 'sft'" not in exp.stdout
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    out = subprocess.run(
        [sys.executable, "-m", "llmlab.evaluation.labellers", "--out", "reports/constitution.md"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    table = (repo / "reports/constitution.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and ("rater |" in r or "constitution |" in r)]
    assert len(rows) == 2, table
    by = {c[2]: c for c in ([x.strip() for x in r.split("|")] for r in rows)}  # labeller -> cells
    taught = yaml.safe_load((repo / "params.yaml").read_text())["critique"]["demonstrations"]
    assert 0 < int(by["constitution"][3].replace(",", "")) <= taught  # the judgments the critique stage used
    assert by["rater"][3] == by["rater"][4]  # the rater path: one judgment per pair


def test_a_tagged_commit_comes_back_in_a_fresh_clone_with_dvc_pull(pipeline, tmp_path):
    """The reproducibility workflow of the README: repro, commit + tag, `dvc push` to the default remote,
    then a fresh clone of the tag and `dvc pull` restores every output: nothing to re-run, same metrics."""
    repo, env, *_ = pipeline
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    remote = tmp_path / "storage"  # the default remote is a folder beside the repository; here a private one
    subprocess.run(
        ["dvc", "remote", "modify", "--local", "storage", "url", str(remote)], cwd=repo, env=env, check=True
    )
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "results", "--allow-empty"], cwd=repo, check=True)
    subprocess.run([*git, "tag", "results-v1"], cwd=repo, check=True)
    push = subprocess.run(["dvc", "push"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert push.returncode == 0, push.stderr

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "results-v1"], cwd=clone, check=True)
    subprocess.run(
        ["dvc", "remote", "modify", "--local", "storage", "url", str(remote)], cwd=clone, env=env, check=True
    )
    pull = subprocess.run(["dvc", "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert pull.returncode == 0, pull.stderr
    status = subprocess.run(
        ["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    diff = subprocess.run(
        ["dvc", "metrics", "diff", "results-v1", "--json"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert diff.returncode == 0 and json.loads(diff.stdout or "{}") == {}, diff.stdout + diff.stderr
    for path in (
        "models/ppo/model.safetensors",
        "reports/report.md",
        "metrics/evaluate.json",
        "data/tokens/train-00000.bin",
    ):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path


def test_second_repro_does_nothing(pipeline):
    repo, env, *_ = pipeline
    again = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in again.stdout
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout


# ------------------------------------------------------------------------- dvc.yaml follows the code


# Declared keys this run cannot read, because only another configuration takes the branch that reads them.
READ_IN_OTHER_CONFIGS = {
    ("reward", "preferences.max_new_tokens"),  # the reward shift on SFT replies: real preference data only
    # Constitutional AI (preferences.labeller: constitution) only: the default run skips the critique stage
    ("critique", "seed"),
    ("critique", "critique"),
    ("critique", "preferences.label_temperature"),
    ("preferences", "critique.principles_per_pair"),
    ("preferences", "critique.own_answer"),
    ("preferences", "critique.max_new_tokens"),
}


def test_each_stage_reads_the_params_it_declares(pipeline):
    """Every params key a stage read in the run is under a `params:` entry of its stage in dvc.yaml (or
    DVC would not rerun it when that key changes), and every entry was read (nothing declared for show)."""
    repo, env, *_ = pipeline
    trace = Path(env["LLMLAB_PARAMS_TRACE"])
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        read = set(json.loads((trace / f"{stage}.json").read_text()))
        declared = set(spec[stage].get("params", []))
        undeclared = {k for k in read if not any(k == d or k.startswith(d + ".") for d in declared)}
        unread = {
            d
            for d in declared
            if not any(k == d or k.startswith(d + ".") or d.startswith(k + ".") for k in read)
        }
        unread -= {key for s, key in READ_IN_OTHER_CONFIGS if s == stage}
        assert not undeclared, f"stage {stage} reads {sorted(undeclared)}, which dvc.yaml does not declare"
        assert not unread, f"stage {stage} declares {sorted(unread)} in dvc.yaml but never read it"


@pytest.mark.parametrize(
    "file",
    ["src/llmlab/model/transformer.py", "src/llmlab/data/chat_template.py", "src/llmlab/data/world.py"],
)
def test_editing_a_library_file_reruns_every_stage_that_imports_it(pipeline, file):
    """DVC's own view: after an edit to `file`, `dvc status` names exactly the stages whose scripts import it."""
    repo, env, *_ = pipeline

    def changed() -> set[str]:
        status = subprocess.run(
            ["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stderr
        return set(json.loads(status.stdout or "{}"))

    before = changed()
    path = repo / file
    original = path.read_bytes()
    path.write_bytes(original + b"\n# an edit\n")
    try:
        after = changed()
    finally:
        path.write_bytes(original)
    expected = stages_importing(file)
    assert len(expected) >= 2
    assert after - before == expected - before


# ------------------------------------------------------------------------------ reproducibility, faults

TRAINED = ("pretrain", "sft", "reward", "ppo", "dpo")


def differing(reference: Path, repo: Path) -> list[str]:
    """Files of metrics/, models/ and the training stages' plots/ whose bytes differ between two runs
    (plots/evaluate holds timings, which differ by nature)."""
    names = [p.relative_to(reference) for p in reference.rglob("*") if p.is_file()]
    names = [n for n in names if n.parts[0] != "plots" or n.parts[1] in TRAINED]
    assert len(names) > 20
    return [
        str(n)
        for n in names
        if not (repo / n).is_file() or (repo / n).read_bytes() != (reference / n).read_bytes()
    ]


def cells(row: str) -> list[float | str]:
    """A CSV row's cells, as numbers where they are numbers."""
    out = []
    for cell in row.split(","):
        try:
            out.append(float(cell))
        except ValueError:
            out.append(cell)
    return out


@pytest.mark.full
def test_two_runs_from_scratch_give_byte_identical_metrics_and_weights(pipeline, tmp_path):
    *_, reference = pipeline
    repo = tmp_path / "repo"
    repo.mkdir()
    repo_copy(repo)
    r = subprocess.run(
        ["dvc", "repro"], cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert differing(reference, repo) == []


def test_training_stages_killed_at_random_points_resume_under_dvc_repro(pipeline, tmp_path):
    """SIGKILL the whole `dvc repro` process group once inside each training stage, at a random moment after
    its first checkpoint; each next `dvc repro` resumes the killed stage. The result equals the
    uninterrupted run's within the stated tolerance (weights 1e-5 absolute, metrics and curve points 1e-4
    relative), with every point of every curve. In the runs so far it was byte-identical."""
    *_, upstream, reference = pipeline
    repo = tmp_path / "repo"
    repo.mkdir()
    repo_copy(repo)
    # The stages that are not killed start done (the uninterrupted run's outputs and lock entries): DVC skips
    # them, and those after a training stage too once that stage's resumed outputs equal the reference's.
    shutil.copytree(upstream, repo, dirs_exist_ok=True)
    env = stage_env(repo) | {"COLUMNS": "300"}  # rich wraps log lines at the terminal's width
    seed = int(os.environ.get("LLMLAB_KILL_SEED") or random.randrange(10**6))  # set it to replay a failure
    rng = random.Random(seed)
    logs = []
    for stage in TRAINED:
        ckpt = repo / "checkpoints" / stage / "last.ckpt"
        logs.append(tmp_path / f"repro-{stage}.log")
        with open(logs[-1], "wb") as log:
            proc = subprocess.Popen(
                ["dvc", "repro"],
                cwd=repo,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        while not ckpt.exists():
            assert proc.poll() is None, (
                f"seed {seed}: dvc repro ended before {stage}'s first checkpoint:\n{logs[-1].read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"seed {seed}: no checkpoint of {stage}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        lock = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").exists() else {}
        assert stage not in lock.get("stages", {}), f"seed {seed}: {stage} had finished before the kill"
    final = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    said = "".join(log.read_text(errors="replace") for log in logs[1:]) + final.stdout + final.stderr
    for stage in TRAINED:
        assert f"resuming from checkpoints/{stage}/last.ckpt" in said, (seed, stage)
    # In MLflow the killed runs end KILLED (marked by the next run), none is left RUNNING.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("llmlab").experiment_id], max_results=500)
    status = [(r.data.tags.get("stage", "pipeline"), r.info.status) for r in runs]
    assert not [s for s in status if s[1] == "RUNNING"], (seed, status)
    # A kill that lands after the stage's process ended (before DVC recorded it) leaves a FINISHED run: so
    # each killed stage has at most one KILLED run, and a kill inside a stage's process always gives one.
    killed = [stage for stage, st in status if st == "KILLED" and stage != "pipeline"]
    assert killed and set(killed) <= set(TRAINED) and len(killed) == len(set(killed)), (seed, status)

    from safetensors.torch import load_file

    for stage in TRAINED:
        a = load_file(reference / "models" / stage / "model.safetensors")
        b = load_file(repo / "models" / stage / "model.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"seed {seed}: {stage} {k}")
        ma = json.loads((reference / "metrics" / f"{stage}.json").read_text())
        mb = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        assert mb.keys() == ma.keys()
        for k, v in ma.items():
            if isinstance(v, float):
                assert mb[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (seed, stage, k)
            else:
                assert mb[k] == v, (seed, stage, k)
        for curve in sorted((reference / "plots" / stage).glob("*.csv")):  # every point, none lost to a kill
            a, b = (
                curve.read_text().splitlines(),
                (repo / "plots" / stage / curve.name).read_text().splitlines(),
            )
            assert [r.split(",")[0] for r in b] == [r.split(",")[0] for r in a], (seed, stage, curve.name)
            for ra, rb in zip(a[1:], b[1:], strict=True):
                for x, y in zip(cells(ra), cells(rb), strict=True):
                    assert y == (pytest.approx(x, rel=1e-4, abs=1e-6) if isinstance(x, float) else x), (
                        seed,
                        stage,
                        curve.name,
                    )
    print(f"kill seed {seed}: byte-identical to the uninterrupted run except {differing(reference, repo)}")
