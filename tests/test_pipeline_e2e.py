"""The real `dvc repro` of the tiny configuration in a temporary copy of the repository.

Checks what a user sees: the stages ran in order, their outputs and metrics exist, MLflow holds one
pipeline run with a child run per stage (params, metric histories, artifacts, tags), and a second
`dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, SMOKE_PARAMS, stage_env

pytestmark = pytest.mark.slow
STAGES = ("corpus", "tokenizer", "pretrain", "sft", "preferences", "reward", "ppo")


def repo_copy(dest):
    """The files git would check out (tracked + untracked-but-not-ignored), committed in a new repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    shutil.copy(SMOKE_PARAMS, dest / "params.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    commit = repo_copy(repo)
    env = stage_env(repo)
    first = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return repo, env, commit, first


def test_outputs_and_metrics(pipeline):
    repo, *_ = pipeline
    for path in [
        "data/corpus/train.parquet", "data/corpus/validation.parquet", "data/corpus/world.json",
        "data/tokenizer/tokenizer.json", "data/tokens/train.bin", "data/tokens/meta.json",
        "models/pretrain/model.safetensors", "models/pretrain/config.json",
        "plots/pretrain/train_loss.csv", "plots/pretrain/val_loss.csv", "reports/pretrain/samples.md",
        "checkpoints/pretrain/last.ckpt", "models/sft/model.safetensors", "reports/sft/replies.json",
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
    assert (repo / "models/reward/model.safetensors").is_file() and (repo / "plots/reward/calibration.csv").is_file()
    ppo = json.loads((repo / "metrics/ppo.json").read_text())
    assert ppo["iterations"] == 4 and ppo["episodes"] == 4 * 8 and ppo["n_prompts"] == 16
    for key in ("sft/gold_score_mean", "ppo/gold_score_mean", "gold_gain", "gold_gain_ci95", "kl_to_sft", "train/kl_final", "train/gold_score_final"):
        assert key in ppo, key
    assert (repo / "models/ppo/model.safetensors").is_file() and (repo / "reports/ppo/replies.md").is_file()
    curve = (repo / "plots/ppo/iterations.csv").read_text().splitlines()
    assert len(curve) == 1 + 4 and {"objective/kl", "policy/clipfrac_avg", "gold/score"} <= set(curve[0].split(","))
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, env=pipeline[1], capture_output=True, text=True)
    assert "fact_recall" in shown.stdout


def test_mlflow_has_one_pipeline_run_with_a_child_per_stage(pipeline):
    from mlflow.tracking import MlflowClient

    repo, env, commit, _ = pipeline
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("llmlab")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["git_commit"] == commit and tags["git_dirty"] in ("true", "false")
        assert run.info.status == "FINISHED"
    pre = next(r for r in children if r.data.tags["stage"] == "pretrain")
    assert pre.data.params["pretrain.lr"] == "0.003"
    assert pre.data.params["seed"] == "7"
    history = client.get_metric_history(pre.info.run_id, "train/loss")
    assert len(history) >= 5 and history[0].step < history[-1].step
    assert "fact_recall" in pre.data.metrics
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"pretrain.json", "config.json"} <= artifacts
    ppo = next(r for r in children if r.data.tags["stage"] == "ppo")
    for name in ("objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward", "objective/rlhf_reward",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                 "val/num_eos_tokens", "gold/score"):
        assert [m.step for m in client.get_metric_history(ppo.info.run_id, name)] == [1, 2, 3, 4], name
    tok = next(r for r in children if r.data.tags["stage"] == "tokenizer")
    assert "tokenizer.json" in {a.path for a in client.list_artifacts(tok.info.run_id)}


def test_second_repro_does_nothing(pipeline):
    repo, env, *_ = pipeline
    again = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in again.stdout
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout
