"""The reward model and PPO under DDP on two CPU processes (pretraining's DDP test is in test_pretrain.py).

The reward model trains on the same global batch either way, so two processes must end where one does.
PPO's two processes sample different replies from one (each draws its own half of the prompts with its
own generator), so its test checks what DDP promises there: the run completes, counts every episode
once, and the two processes' weights agree at the end (the stage compares them and fails otherwise).
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import SMOKE_PARAMS, random_post_training_models, run_stage, stage_env

pytestmark = [pytest.mark.slow, pytest.mark.full]

WORDS = ["yes", "no", "maybe", "sure", "never", "Paris", "blue", "seven", "cat", "I don't know"]


@pytest.fixture(scope="module")
def inputs(smoke_data, tmp_path_factory):
    """A random SFT model and reward model of a small shape, and 48 preference pairs (chosen: longer replies)."""
    d = tmp_path_factory.mktemp("ddp_inputs")
    random_post_training_models(smoke_data, d)
    rng = random.Random(0)
    rows = []
    for i in range(48):
        context = [{"role": "user", "content": f"Question {i}: {rng.choice(WORDS)}?"}]
        long, short = " ".join(rng.choices(WORDS, k=rng.randint(4, 12))), rng.choice(WORDS)
        rows.append(
            {
                "prompt": context[-1]["content"],
                "context": json.dumps(context),
                "chosen": long,
                "rejected": short,
                "chosen_ended": True,
                "rejected_ended": True,
                "gold_chosen": 1.0,
                "gold_rejected": 0.0,
                "flipped": False,
                "task": "{}",
            }
        )
    (d / "prefs").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:40]), d / "prefs" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[40:]), d / "prefs" / "validation.parquet")
    return d


def params_file(tmp_path, name, section, **values):
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_reward_model_ddp_on_two_cpu_processes_matches_one_process(smoke_data, inputs, tmp_path):
    env = stage_env(tmp_path)
    out = {}
    for name, values in (
        ("one", {"batch_size": 8}),
        ("two", {"batch_size": 4, "devices": 2, "strategy": "ddp"}),
    ):
        o = out[name] = tmp_path / name
        args = [
            "--pairs",
            str(inputs / "prefs"),
            "--model",
            str(inputs / "sft"),
            "--tokenizer",
            str(smoke_data / "tokenizer" / "tokenizer.json"),
            "--checkpoints",
            str(o / "ckpt"),
            "--out",
            str(o / "model"),
            "--metrics",
            str(o / "metrics.json"),
            "--plots",
            str(o / "plots"),
        ]
        params = params_file(tmp_path, name, "reward", max_steps=6, val_every=3, ckpt_every=3, **values)
        r = run_stage("reward", args, tmp_path, env, params)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
    m1, m2 = (json.loads((out[n] / "metrics.json").read_text()) for n in ("one", "two"))
    assert m1["steps"] == m2["steps"] == 6
    assert m2["margin_mean"] == pytest.approx(m1["margin_mean"], rel=1e-4, abs=1e-6)
    a, b = (load_file(out[n] / "model" / "model.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys()
    start = load_file(inputs / "sft" / "model.safetensors")
    moved = max((a[f"backbone.{k}"] - v).abs().max().item() for k, v in start.items() if f"backbone.{k}" in a)
    assert moved > 1e-3  # it trained: the comparison below is not of two untouched copies
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


def test_ppo_ddp_on_two_cpu_processes_counts_every_episode_and_keeps_the_weights_in_sync(
    smoke_data, inputs, tmp_path
):
    o = tmp_path / "two"
    args = [
        "--model",
        str(inputs / "sft"),
        "--reward",
        str(inputs / "reward"),
        "--tokenizer",
        str(smoke_data / "tokenizer" / "tokenizer.json"),
        "--world",
        str(smoke_data / "corpus" / "world.json"),
        "--pairs",
        str(inputs / "prefs"),
        "--checkpoints",
        str(o / "ckpt"),
        "--out",
        str(o / "model"),
        "--metrics",
        str(o / "metrics.json"),
        "--plots",
        str(o / "plots"),
        "--report",
        str(o / "report"),
    ]
    params = params_file(tmp_path, "two", "ppo", iterations=3, devices=2, strategy="ddp", eval_prompts=8)
    r = run_stage("ppo", args, tmp_path, stage_env(tmp_path), params)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "the 2 processes' policy and value weights agree" in r.stdout + r.stderr
    metrics = json.loads((o / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["episodes"] == 3 * 8
    rows = (o / "plots" / "iterations.csv").read_text().splitlines()
    header = rows[0].split(",")
    episodes = [float(row.split(",")[header.index("episode")]) for row in rows[1:]]
    assert episodes == [8.0, 16.0, 24.0]  # the two processes' halves of each rollout, counted once
    eos = [float(row.split(",")[header.index("val/num_eos_tokens")]) for row in rows[1:]]
    assert all(0 <= n <= 8 for n in eos)  # a total over both processes, at most the rollout's size
    policy = load_file(o / "model" / "model.safetensors")
    start = load_file(inputs / "sft" / "model.safetensors")
    assert max((policy[k] - start[k]).abs().max().item() for k in start) > 0  # it trained
