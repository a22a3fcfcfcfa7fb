"""Faults forced into real stage runs: a loss that becomes NaN.

The fault is injected from outside, with no hook in the product: a `sitecustomize.py` on the stage
process's PYTHONPATH wraps `GPT.forward` so that the training loss turns NaN from its Nth call on.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.conftest import run_stage, stage_env, with_sitecustomize

pytestmark = pytest.mark.slow

NAN_FROM_CALL = textwrap.dedent(
    """
    import os

    import llmlab.model as m

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


def test_a_nan_loss_stops_pretraining_naming_the_step_and_keeps_the_last_good_checkpoint(smoke_data, tmp_path):
    env = stage_env(tmp_path) | {"LLMLAB_TEST_NAN_AT": "25"}  # training step 25; checkpoints every 10 steps
    env = with_sitecustomize(env, tmp_path / "inject", NAN_FROM_CALL)
    args = ["--tokens", str(smoke_data / "tokens"), "--tokenizer", str(smoke_data / "tokenizer" / "tokenizer.json"),
            "--world", str(smoke_data / "corpus" / "world.json"), "--checkpoints", "ckpt", "--out", "model",
            "--metrics", "metrics.json", "--plots", "plots", "--report", "report"]  # fmt: skip
    r = run_stage("pretrain", args, tmp_path, env)

    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "the training loss became nan at step 25" in r.stderr and "ckpt/last.ckpt (step 20) is kept" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 20
    assert all(torch.isfinite(w).all() for w in state["state_dict"].values()), "the kept checkpoint holds NaN"
