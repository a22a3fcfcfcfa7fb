"""Pretraining: data windows, the schedule, stale checkpoints, the stage's Trainer at every precision, and DDP
against one process (resuming after a kill is tested under `dvc repro` in tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmlab.model.transformer import GPTConfig
from llmlab.params import PretrainConfig
from llmlab.training.checkpoints import fingerprint, resume_path
from llmlab.training.pretraining import FixedWindows, TokenWindows
from llmlab.training.trainer import CausalLMModule, build_trainer, lr_at
from tests.conftest import SMOKE_PARAMS, free_port, run_stage, stage_env


def test_windows_are_shifted_by_one_and_reproducible():
    tokens = np.arange(1000, dtype=np.uint16)
    ds = TokenWindows(tokens, context_length=16, n_items=10, seed=3)
    x, y = ds[4]
    assert x.shape == (16,) and torch.equal(y[:-1], x[1:])
    assert torch.equal(TokenWindows(tokens, 16, 10, seed=3)[4][0], x)
    resumed = TokenWindows(tokens, 16, 10, seed=3, first=4)  # a resumed run continues at item 4
    assert len(resumed) == 10 and torch.equal(resumed[0][0], x)


def test_fixed_windows_cover_the_split_and_reject_a_short_one():
    v = FixedWindows(np.arange(200, dtype=np.uint16), context_length=16, n_items=5)
    assert [int(v[i][0][0]) for i in range(5)] == [0, 45, 91, 137, 183]
    with pytest.raises(ValueError, match="val_fraction"):
        FixedWindows(np.arange(10, dtype=np.uint16), context_length=16, n_items=5)


def test_lr_schedule():
    cfg = PretrainConfig(warmup_steps=10, min_lr_ratio=0.1, lr=1.0)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_the_stages_trainer_clips_gradients_at_every_precision(precision, tmp_path):
    """The GPU recipe's bf16-mixed with gradient clipping: Lightning refuses to clip a fused AdamW's gradients
    under mixed precision (Lightning-AI/pytorch-lightning#21435), so the stages take the foreach AdamW there.
    Before that, the recipe's pretraining stopped at its first optimizer step."""
    cfg = PretrainConfig(
        precision=precision, grad_clip=1.0, accelerator="cpu", batch_size=2, val_every=100, ckpt_every=100
    )
    config = GPTConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, context_length=16, ffn_hidden=64)
    module = CausalLMModule(config, cfg, total_steps=3)
    tokens = np.random.default_rng(0).integers(0, 64, size=2000, dtype=np.uint16)
    trainer = build_trainer(cfg, tmp_path, False, [], 3)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer.fit(module, torch.utils.data.DataLoader(TokenWindows(tokens, 16, 6, 0), batch_size=2))
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True))
    fused = trainer.optimizers[0].defaults["fused"]
    assert fused == (precision != "bf16-mixed")  # fp32 and bf16-true keep the fused kernel


def test_stale_checkpoints_are_discarded(tmp_path):
    d = tmp_path / "ckpt"
    assert resume_path(d, "A") is None
    torch.save({"global_step": 1}, d / "last.ckpt")
    assert resume_path(d, "A") == d / "last.ckpt"
    assert resume_path(d, "B", readonly=True) is None and (d / "last.ckpt").exists()
    assert resume_path(d, "B") is None and not (d / "last.ckpt").exists()


def test_a_killed_checkpoint_write_leaves_a_temporary_that_is_never_read(tmp_path):
    d = tmp_path / "ckpt"
    fp = fingerprint({"pretrain": {"lr": 0.1}}, [])
    resume_path(d, fp)
    torch.save({"global_step": 10}, d / "last.ckpt")
    (d / ".last.ckpt.tmp-0123abcd").write_bytes(b"PK\x03\x04 half a zip")  # a write killed midway
    assert resume_path(d, fp) == d / "last.ckpt"  # the complete checkpoint, not the half one
    assert not (d / ".last.ckpt.tmp-0123abcd").exists()


def test_the_config_and_inputs_are_recorded_next_to_the_checkpoints(tmp_path):
    data = tmp_path / "train.bin"
    data.write_bytes(b"\x01\x02")
    resume_path(tmp_path / "ckpt", fingerprint({"seed": 7, "pretrain": {"lr": 0.1}}, [data]))
    saved = json.loads((tmp_path / "ckpt" / "fingerprint.json").read_text())
    assert saved["config"] == {"seed": 7, "pretrain": {"lr": 0.1}}
    assert saved["inputs"] == {str(data): hashlib.sha256(b"\x01\x02").hexdigest()}
    assert {"fingerprint", "git_commit", "git_dirty"} <= set(saved)


# ---------------------------------------------------------------------------- real stage processes


def params_file(tmp_path, name, **pretrain):
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw["pretrain"].update(pretrain)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_args(data, out):
    return [
        "--tokens",
        str(data / "tokens"),
        "--tokenizer",
        str(data / "tokenizer" / "tokenizer.json"),
        "--world",
        str(data / "corpus" / "world.json"),
        "--checkpoints",
        str(out / "ckpt"),
        "--out",
        str(out / "model"),
        "--metrics",
        str(out / "metrics.json"),
        "--plots",
        str(out / "plots"),
        "--report",
        str(out / "report"),
    ]


def weights(out):
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.full
def test_ddp_on_two_cpu_processes_matches_one_process(smoke_data, tmp_path):
    env = stage_env(tmp_path)
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = {"max_steps": 8, "val_every": 4, "ckpt_every": 4, "accelerator": "cpu"}
    r1 = run_stage(
        "pretrain",
        stage_args(smoke_data, one),
        tmp_path,
        env,
        params_file(tmp_path, "one", batch_size=8, **common),
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    p2 = params_file(tmp_path, "two", batch_size=4, devices=2, strategy="ddp", **common)
    # Launched by torchrun, as on a cluster (README, "Several GPUs and machines"); the reward model's and
    # PPO's DDP tests (test_distributed.py) use Lightning's and Fabric's own launchers.
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    r2 = run_stage("pretrain", stage_args(smoke_data, two), tmp_path, env, p2, launcher=torchrun)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "Traceback" not in r2.stderr
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1["tokens"] == m2["tokens"]  # same global batch: 8 sequences per step
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
