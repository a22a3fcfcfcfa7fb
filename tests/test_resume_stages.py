"""SFT and the reward model resume like pretraining: a run SIGKILLed after its first checkpoint, run
again, ends with the weights of an uninterrupted run (the data order continues where it stopped)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmlab.model import GPT, GPTConfig, save_model
from llmlab.tokenizer import load_tokenizer
from tests.conftest import SMOKE_PARAMS, kill_after_first_checkpoint, run_stage, stage_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(smoke_data, tmp_path_factory):
    """A randomly initialised model of the smoke shape (as pretrain and SFT output), and rated pairs."""
    d = tmp_path_factory.mktemp("resume_inputs")
    vocab = load_tokenizer(smoke_data / "tokenizer" / "tokenizer.json").get_vocab_size()
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=vocab, d_model=32, n_layer=2, n_head=2, context_length=64)), d / "model")
    (d / "pairs").mkdir()
    rows = [
        {"prompt": f"Q{i}", "context": json.dumps([{"role": "user", "content": f"Q{i}"}]), "chosen": f"good {i}",
         "rejected": f"bad {i % 7}", "chosen_ended": True, "rejected_ended": i % 3 > 0, "gold_chosen": 2.0,
         "gold_rejected": 0.0, "flipped": False, "task": ""}
        for i in range(60)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows[:50]), d / "pairs" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[50:]), d / "pairs" / "validation.parquet")
    return d


def args_for(stage, data, base, out):
    tok = ["--tokenizer", str(data / "tokenizer" / "tokenizer.json")]
    common = ["--checkpoints", str(out / "ckpt"), "--out", str(out / "model"), "--metrics", str(out / "m.json"), "--plots", str(out / "plots")]
    if stage == "sft":
        return ["--model", str(base / "model"), *tok, "--world", str(data / "corpus" / "world.json"), *common, "--report", str(out / "report")]
    return ["--pairs", str(base / "pairs"), "--model", str(base / "model"), *tok, *common]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_killed_stage_resumes_to_the_uninterrupted_weights(stage, smoke_data, base, tmp_path):
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw[stage].update(max_steps=120, ckpt_every=20, val_every=60, log_every=20)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = stage_env(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = run_stage(stage, args_for(stage, smoke_data, base, straight), tmp_path, env, params)
    assert r.returncode == 0, r.stderr[-3000:]

    kill_after_first_checkpoint(stage, args_for(stage, smoke_data, base, killed), tmp_path, env, params, killed / "ckpt" / "last.ckpt")
    assert 0 < torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)["global_step"] < 120

    r = run_stage(stage, args_for(stage, smoke_data, base, killed), tmp_path, env, params)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr + r.stdout
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
