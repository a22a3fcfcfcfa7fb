"""The over-optimisation figure's points, read from real DVC experiments (a tiny repository whose one stage
writes `metrics/ppo.json` from `ppo.kl_coef`), and its table's verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.errors import LlmlabError
from llmlab.evaluation.sweep import Point, main, markdown, points, write

# gold peaks at β 0.3 and falls at 0.03; the reward model's gain keeps rising as β falls
STAGE = """
import json, yaml
b = yaml.safe_load(open("params.yaml"))["ppo"]["kl_coef"]
gold = {1.0: 0.1, 0.3: 0.4, 0.03: -0.2}[b]
m = {"kl_to_sft": 0.3 / b, "reward_gain": 1.0 / b ** 0.5, "gold_gain": gold, "gold_ci95": 0.1}
json.dump(m, open("metrics/ppo.json", "w"))
json.dump({"gold_gain": 9.0}, open("metrics/dpo.json", "w"))  # the same key in another file
"""
DVC_YAML = """
stages:
  ppo:
    cmd: python stage.py
    deps: [stage.py]
    params: [ppo.kl_coef]
    metrics: [metrics/ppo.json: {cache: false}, metrics/dpo.json: {cache: false}]
"""


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
@pytest.mark.full
def test_points_come_from_the_workspace_and_each_experiment(tmp_path):
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("ppo:\n  kl_coef: 0.3\n")
    (repo / "metrics" / ".gitkeep").write_text("")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "0")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "pipeline")
    sh(repo, "dvc", "repro", "-q")
    # the experiments as `make sweep` queues them; the workspace keeps its own β
    sh(repo, "dvc", "exp", "run", "ppo", "--queue", "-S", "ppo.kl_coef=1.0,0.03")
    sh(repo, "dvc", "exp", "run", "--run-all")

    out = tmp_path / "report" / "overoptimisation"
    assert main(["--repo", str(repo), "--out", str(out)]) == 0
    import dvc.api

    pts = points(dvc.api.exp_show(repo=str(repo)))
    assert [p.beta for p in pts] == [1.0, 0.3, 0.03]  # sorted by KL; the baseline commit's row left out
    assert [p.gold_gain for p in pts] == [0.1, 0.4, -0.2]  # ppo.json's gold_gain, not dpo.json's
    assert pts[1].name == "workspace"
    text = out.with_suffix(".md").read_text()
    assert "peaks at β 0.3" in text and "| 0.03 | 10.00 | 3.16 |" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_without_ppo_metrics_are_skipped():
    rows = [
        {"rev": "workspace", "typ": "baseline", "ppo.kl_coef": 0.3, "kl_to_sft": "!", "gold_gain": "!"},
        {
            "rev": "main",
            "typ": "baseline",
            "ppo.kl_coef": 0.3,
            "kl_to_sft": 1,
            "reward_gain": 1,
            "gold_gain": 1,
        },
        {
            "Experiment": "e",
            "typ": "branch_commit",
            "ppo.kl_coef": 0.1,
            "metrics/ppo.json:kl_to_sft": 2.0,
            "metrics/ppo.json:reward_gain": 0.5,
            "metrics/ppo.json:gold_gain": 0.2,
        },
    ]
    assert points(rows) == [Point("e", 0.1, 2.0, 0.5, 0.2, 0.0)]


def test_a_sweep_past_its_peak_says_so():
    pts = [Point("a", 0.3, 1.5, 0.8, 0.0, 0.1), Point("b", 0.03, 8.6, 1.6, -1.5, 0.2)]
    assert "past the peak already" in markdown(pts, "f.png")


def test_a_sweep_without_a_peak_says_so():
    pts = [Point("a", 1.0, 0.25, 0.1, 0.1, 0.05), Point("b", 0.1, 4.0, 0.9, 0.3, 0.05)]
    assert "no peak within this range" in markdown(pts, "f.png")


def test_too_few_runs_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(LlmlabError, match="at least 2 runs.*dvc exp run ppo --queue"):
        write([Point("a", 1.0, 0.25, 0.1, 0.1, 0.05)], tmp_path / "o")
    assert not list(tmp_path.iterdir())


def test_a_workspace_left_at_the_last_experiment_is_not_a_second_point():
    same = {"ppo.kl_coef": 1.0, "kl_to_sft": 0.3, "reward_gain": 1.0, "gold_gain": 0.1}
    rows = [
        {"rev": "workspace", "typ": "baseline", **same},
        {"Experiment": "e", "typ": "branch_commit", **same},
    ]
    assert [p.name for p in points(rows)] == ["e"]


def test_the_workspace_row_keeps_its_name():
    row = {"rev": "workspace", "typ": "baseline", "ppo.kl_coef": 0.3, "kl_to_sft": 1.0}
    row |= {"reward_gain": 0.5, "gold_gain": 0.4, "gold_ci95": 0.1}
    assert points([row])[0].name == "workspace"
    assert json.dumps(points([row])[0].__dict__)  # plain numbers, for the table
