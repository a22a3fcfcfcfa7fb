"""Faults forced into real stage runs: a loss that becomes NaN, the tracking server dying mid-run,
writes failing mid-training.

The faults come from outside, with no hook in the product: a `sitecustomize.py` on the stage process's
PYTHONPATH wraps `GPT.forward` so that the training loss turns NaN from its Nth call on, or sets a
file-size limit so that the kernel refuses writes; the server is a real `mlflow server`, killed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, SMOKE_PARAMS, mlflow_server, run_stage, stage_env, with_sitecustomize

pytestmark = pytest.mark.slow

NAN_FROM_CALL = textwrap.dedent(
    """
    import os

    import llmlab.model.transformer as m

    _forward, _calls, _at = m.GPT.forward, [0], int(os.environ["LLMLAB_TEST_NAN_AT"])

    def forward(self, idx, targets=None, *args, **kwargs):
        logits, loss = _forward(self, idx, targets, *args, **kwargs)
        if targets is not None and self.training:
            _calls[0] += 1
            if _calls[0] >= _at:
                loss = loss * float("nan")
        return logits, loss

    m.GPT.forward = forward
    """
)


def test_a_nan_loss_stops_pretraining_naming_the_step_and_keeps_the_last_good_checkpoint(
    smoke_data, tmp_path
):
    env = stage_env(tmp_path) | {"LLMLAB_TEST_NAN_AT": "25"}  # training step 25; checkpoints every 10 steps
    env = with_sitecustomize(env, tmp_path / "inject", NAN_FROM_CALL)
    args = [
        "--tokens",
        str(smoke_data / "tokens"),
        "--tokenizer",
        str(smoke_data / "tokenizer" / "tokenizer.json"),
        "--world",
        str(smoke_data / "corpus" / "world.json"),
        "--checkpoints",
        "ckpt",
        "--out",
        "model",
        "--metrics",
        "metrics.json",
        "--plots",
        "plots",
        "--report",
        "report",
    ]
    r = run_stage("pretrain", args, tmp_path, env)

    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (
        "the training loss became nan at step 25" in r.stderr
        and "ckpt/last.ckpt (step 20) is kept" in r.stderr
    ), r.stderr[-2000:]
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 20
    assert all(torch.isfinite(w).all() for w in state["state_dict"].values()), "the kept checkpoint holds NaN"


def pretrain_args(smoke_data) -> list[str]:
    return [
        "--tokens",
        str(smoke_data / "tokens"),
        "--tokenizer",
        str(smoke_data / "tokenizer" / "tokenizer.json"),
        "--world",
        str(smoke_data / "corpus" / "world.json"),
        "--checkpoints",
        "ckpt",
        "--out",
        "model",
        "--metrics",
        "metrics.json",
        "--plots",
        "plots",
        "--report",
        "report",
    ]


def longer_pretrain(tmp_path, **overrides) -> Path:
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw["pretrain"].update(overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.full
def test_the_tracking_server_dying_mid_run_does_not_stop_training(smoke_data, tmp_path):
    """The server is SIGKILLed once training has checkpointed: the stage finishes, writes complete
    metrics and model, and says what was not logged."""
    params = longer_pretrain(tmp_path, max_steps=300, ckpt_every=10, val_every=100, log_every=5)
    with mlflow_server(tmp_path) as (url, server):
        env = stage_env(tmp_path) | {"MLFLOW_TRACKING_URI": url, "COLUMNS": "300"}
        cmd = [
            sys.executable,
            str(ROOT / "pipeline" / "pretrain.py"),
            "--params",
            str(params),
            *pretrain_args(smoke_data),
        ]
        t0 = time.monotonic()
        with open(tmp_path / "stage.log", "wb") as log:
            stage = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        while not (tmp_path / "ckpt" / "last.ckpt").exists():
            assert stage.poll() is None, (tmp_path / "stage.log").read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert stage.wait(timeout=300) == 0, (tmp_path / "stage.log").read_text()[-3000:]
    said = (tmp_path / "stage.log").read_text()
    assert "Traceback" not in said
    assert "MLflow tracking at" in said and "goes on without tracking" in said
    assert "MLflow: not logged after tracking failed" in said and "metric values" in said
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 300 and math.isfinite(metrics["val_loss"]) and "fact_recall" in metrics
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert time.monotonic() - t0 < 200  # no minutes of retries per logging call


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import os, resource, signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    limit = int(os.environ["LLMLAB_TEST_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    """
)


@pytest.mark.full
def test_a_write_failing_mid_training_is_one_clear_error_and_leaves_no_partial_output(smoke_data, tmp_path):
    """Every write of the stage process fails past 100 KB (the checkpoint is ~0.5 MB). The tracking
    store is a server in another process, which the limit does not reach."""
    with mlflow_server(tmp_path) as (url, _):
        env = stage_env(tmp_path) | {"MLFLOW_TRACKING_URI": url, "LLMLAB_TEST_FSIZE": str(100_000)}
        env = with_sitecustomize(env, tmp_path / "inject", FILE_SIZE_LIMIT)
        r = run_stage("pretrain", pretrain_args(smoke_data), tmp_path, env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"error [pretrain]: could not write {tmp_path}/ckpt/last.ckpt: File too large" in r.stderr, (
        r.stderr[-2000:]
    )
    assert not (tmp_path / "ckpt" / "last.ckpt").exists() and not (tmp_path / "model").exists()
    assert not (tmp_path / "metrics.json").exists()
    assert [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []
