"""The ppo stage as a process: it stops at a NaN loss keeping the last good checkpoint, trains with RLOO's
advantages, reads its KL controller's mode, and keeps PPO's own seed apart from the run's. (Its run and its
resumption after a kill are tested under `dvc repro` in tests/test_pipeline_e2e.py; a rollout batch that does
not split into minibatches is refused by the params check, tests/test_params.py.)"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from llmlab.model.transformer import load_model
from llmlab.training.reward import load_reward_model
from tests.conftest import SMOKE_PARAMS, random_post_training_models, run_stage, stage_env, with_sitecustomize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(smoke_data, tmp_path_factory):
    """Randomly initialised SFT and reward models of the smoke shape, and a preferences folder."""
    d = tmp_path_factory.mktemp("ppo_inputs")
    random_post_training_models(smoke_data, d)
    (d / "prefs").mkdir()
    row = {"prompt": "Hi", "context": json.dumps([{"role": "user", "content": "Hi"}])}
    for split in ("train", "validation"):
        pq.write_table(pa.Table.from_pylist([row]), d / "prefs" / f"{split}.parquet")
    return d


def params_file(tmp_path, name, **ppo):
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw["ppo"].update(ppo)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_args(data, inputs, out):
    return [
        "--model",
        str(inputs / "sft"),
        "--reward",
        str(inputs / "reward"),
        "--tokenizer",
        str(data / "tokenizer" / "tokenizer.json"),
        "--world",
        str(data / "corpus" / "world.json"),
        "--pairs",
        str(inputs / "prefs"),
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


NAN_POLICY_LOSS = """
import llmlab.training.ppo as ppo

_loss, _calls = ppo.policy_loss, [0]

def policy_loss(*args, **kwargs):
    out = _loss(*args, **kwargs)
    _calls[0] += 1
    if _calls[0] > 16:  # 2 minibatches x 2 epochs per iteration: iteration 5 on
        out = {**out, "loss": out["loss"] * float("nan")}
    return out

ppo.policy_loss = policy_loss
"""


def test_a_nan_loss_stops_ppo_naming_the_iteration_and_keeps_the_last_good_checkpoint(
    smoke_data, inputs, tmp_path
):
    env = with_sitecustomize(stage_env(tmp_path), tmp_path / "inject", NAN_POLICY_LOSS)
    params = params_file(tmp_path, "p", iterations=8, ckpt_every=2)
    r = run_stage("ppo", stage_args(smoke_data, inputs, tmp_path / "out"), tmp_path, env, params)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (
        "the PPO loss became non-finite at iteration 5" in r.stderr and "(iteration 4) is kept" in r.stderr
    ), r.stderr[-3000:]
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "metrics.json").exists()
    state = torch.load(tmp_path / "out" / "ckpt" / "last.ckpt", weights_only=True)
    assert state["iteration"] == 4
    assert all(torch.isfinite(w).all() for w in state["policy"].values())


def test_rloo_trains_the_policy_on_groups_of_replies_and_leaves_the_value_model_alone(
    smoke_data, inputs, tmp_path
):
    params = params_file(tmp_path, "rloo", advantage="rloo", samples_per_prompt=4, iterations=2)
    out = tmp_path / "out"
    r = run_stage("ppo", stage_args(smoke_data, inputs, out), tmp_path, stage_env(tmp_path), params)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["episodes"] == 2 * 8 and metrics["iterations"] == 2
    state = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    reward = load_reward_model(inputs / "reward").state_dict()
    policy_moved = any(
        not torch.equal(w, state["policy"][name])
        for name, w in load_model(inputs / "sft").state_dict().items()
    )
    assert policy_moved
    assert all(torch.equal(w, reward[name]) for name, w in state["value"].items() if name in reward)


def test_the_kl_budget_never_lowers_beta_below_kl_coef_where_tracking_the_target_does(
    smoke_data, inputs, tmp_path
):
    """A target far above any KL the policy reaches: tracking it lowers β every iteration (by the capped
    20 % with a horizon of one rollout); as a ceiling, β stays at kl_coef, the fixed-β run's."""
    finals = {}
    for mode in ("track", "ceiling"):
        params = params_file(
            tmp_path, mode, kl_coef=0.3, kl_target=1e6, kl_target_mode=mode, kl_horizon=8, iterations=2
        )
        out = tmp_path / mode
        r = run_stage("ppo", stage_args(smoke_data, inputs, out), tmp_path, stage_env(tmp_path), params)
        assert r.returncode == 0, r.stderr[-3000:]
        finals[mode] = json.loads((out / "metrics.json").read_text())["kl_coef_final"]
    assert finals["track"] == pytest.approx(0.3 * 0.8**2)
    assert finals["ceiling"] == 0.3


def test_ppo_seed_moves_only_ppos_own_randomness(smoke_data, inputs, tmp_path):
    """`ppo.seed` gives PPO other rollouts, so other weights, while the held-out prompts that compare it with
    SFT stay the run's (`seed`), so that runs differing only in PPO's seed are compared on the same prompts."""
    runs = {}
    for name, seed in (("run_seed", None), ("own_seed", 8)):
        params = params_file(tmp_path, name, seed=seed, iterations=1)
        out = tmp_path / name
        r = run_stage("ppo", stage_args(smoke_data, inputs, out), tmp_path, stage_env(tmp_path), params)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (
            torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["policy"],
            [row["prompt"] for row in json.loads((out / "report" / "replies.json").read_text())],
        )
    (weights, held_out), (other_weights, other_held_out) = runs["run_seed"], runs["own_seed"]
    assert any(not torch.equal(w, other_weights[name]) for name, w in weights.items())
    assert held_out == other_held_out and held_out
