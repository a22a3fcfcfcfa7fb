"""Shared fixtures: the repository root, the tiny configuration, and stage runs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = ROOT / "tests" / "params.smoke.yaml"


def stage_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a stage subprocess: this interpreter's venv first on PATH, a private MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("LLMLAB_PIPELINE_RUN_ID", None)
    return env


def run_stage(
    stage: str, args: list[str], cwd: Path, env: dict[str, str], params: Path = SMOKE_PARAMS, timeout=600
):
    cmd = [sys.executable, str(ROOT / "pipeline" / f"{stage}.py"), "--params", str(params), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """corpus + tokenizer stages of the tiny configuration, run once per test session."""
    d = tmp_path_factory.mktemp("smoke_data")
    env = stage_env(d)
    r = run_stage("corpus", ["--out", "corpus", "--metrics", "metrics/corpus.json"], d, env)
    assert r.returncode == 0, r.stderr
    r = run_stage(
        "tokenizer",
        [
            "--corpus",
            "corpus",
            "--out",
            "tokenizer",
            "--tokens",
            "tokens",
            "--metrics",
            "metrics/tokenizer.json",
            "--report",
            "report",
        ],
        d,
        env,
    )
    assert r.returncode == 0, r.stderr
    return d
