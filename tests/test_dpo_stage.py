"""The dpo stage as a process: it stops at a NaN loss keeping the last good checkpoint. (Its run, MLflow
metrics and resumption after a kill are tested under `dvc repro` in tests/test_pipeline_e2e.py; its bad
params are refused by the params check, tests/test_params.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from llmlab.data.preferences import write_pairs
from tests.conftest import SMOKE_PARAMS, random_post_training_models, run_stage, stage_env, with_sitecustomize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(smoke_data, tmp_path_factory):
    """Randomly initialised SFT and reward models of the smoke shape, and 40 + 8 preference pairs."""
    d = tmp_path_factory.mktemp("dpo_inputs")
    random_post_training_models(smoke_data, d)

    def pair(i: int) -> dict:
        q = f"Where does person {i} live?"
        return {
            "prompt": q,
            "context": json.dumps([{"role": "user", "content": q}]),
            "chosen": f"Person {i} lives in Port Avery.",
            "rejected": "I don't know.",
            "chosen_ended": True,
            "rejected_ended": True,
            "gold_chosen": 1.0,
            "gold_rejected": 0.0,
            "flipped": False,
            "task": "{}",
        }

    write_pairs(
        d / "prefs", {"train": [pair(i) for i in range(40)], "validation": [pair(i) for i in range(40, 48)]}
    )
    return d


def params_file(tmp_path, **dpo):
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw["dpo"].update(dpo)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_args(data, inputs, out):
    return [
        *(
            "--pairs",
            str(inputs / "prefs"),
            "--model",
            str(inputs / "sft"),
            "--reward",
            str(inputs / "reward"),
        ),
        *(
            "--tokenizer",
            str(data / "tokenizer" / "tokenizer.json"),
            "--world",
            str(data / "corpus" / "world.json"),
        ),
        *(
            "--checkpoints",
            str(out / "ckpt"),
            "--out",
            str(out / "model"),
            "--metrics",
            str(out / "metrics.json"),
        ),
        *("--plots", str(out / "plots"), "--report", str(out / "report")),
    ]


NAN_DPO_LOSS = """
import llmlab.training.dpo as dpo

_loss, _calls = dpo.dpo_loss, [0]

def dpo_loss(policy_chosen, *args, **kwargs):
    loss, chosen, rejected = _loss(policy_chosen, *args, **kwargs)
    if policy_chosen.requires_grad:  # a training step, not a validation batch
        _calls[0] += 1
        if _calls[0] >= 8:
            loss = loss * float("nan")
    return loss, chosen, rejected

dpo.dpo_loss = dpo_loss
"""


def test_a_nan_loss_stops_dpo_naming_the_step_and_keeps_the_last_good_checkpoint(
    smoke_data, inputs, tmp_path
):
    env = with_sitecustomize(stage_env(tmp_path), tmp_path / "inject", NAN_DPO_LOSS)
    params = params_file(tmp_path, max_steps=10, ckpt_every=5, val_every=5)
    r = run_stage("dpo", stage_args(smoke_data, inputs, tmp_path / "out"), tmp_path, env, params)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "the training loss became nan at step 8" in r.stderr and "(step 5) is kept" in r.stderr, r.stderr[
        -3000:
    ]
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "metrics.json").exists()
    state = torch.load(tmp_path / "out" / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 5
    assert all(torch.isfinite(w).all() for w in state["state_dict"].values())
