"""The GPU recipe's data path, run as a user runs it, with `dvc repro` in a copy of the repository: its data
sections and three Hub datasets (TinyStories, smoltalk, ultrafeedback_binarized's message lists: the second
preference layout) read from folders in the Hub's layout with those datasets' schemas and split names, with
a tiny model at the recipe's precision. No world, so no rater; the pipeline runs to the end, the registered
model included."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, hub_layout, repo_copy, stage_env
from tests.test_real_data_path import raw_data, repro, sentence

pytestmark = pytest.mark.slow
RECIPE = ROOT / "recipes" / "gpu-tinystories.yaml"


def test_the_recipes_data_path_runs_to_the_end_under_dvc_repro(tmp_path):
    repo_copy(tmp_path)
    rng = random.Random(0)
    chats, ultrafeedback = raw_data(tmp_path / "data" / "raw", rng)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 300
    env = stage_env(tmp_path)
    recipe = yaml.safe_load(RECIPE.read_text())
    hub = {
        "corpus": hub_layout(
            tmp_path / "hub" / "TinyStories",
            recipe["corpus"]["hf"]["split"],
            [{"text": " ".join(sentence(rng) for _ in range(8))} for _ in range(60)],
        ),
        "sft": hub_layout(
            tmp_path / "hub" / "smoltalk",
            recipe["sft"]["data"]["hf"]["split"],
            [{**c, "full_topic": "chat"} for c in chats],
        ),
        "preferences": hub_layout(
            tmp_path / "hub" / "ultrafeedback",
            recipe["preferences"]["hf"]["split"],
            [{**row, "score_chosen": 8.0} for row in ultrafeedback],
        ),
    }
    params["corpus"] = recipe["corpus"] | {
        "hf": recipe["corpus"]["hf"] | {"name": hub["corpus"]},
        "val_fraction": 0.1,
    }
    params["sft"]["data"] = recipe["sft"]["data"] | {
        "hf": recipe["sft"]["data"]["hf"] | {"name": hub["sft"], "config": None}
    }
    params["preferences"].update(source="hf", hf=recipe["preferences"]["hf"] | {"name": hub["preferences"]})
    # The recipe's precision in every training stage (bf16-mixed: autocast, on the CPU here as on a GPU); its
    # torch.compile stays off, which would only add minutes of compiling to a test of the data path.
    for section, value in recipe.items():
        if isinstance(value, dict) and "precision" in value:
            params[section]["precision"] = value["precision"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = repro(tmp_path, env)
    for stage in ("corpus", "sft", "preferences", "reward", "ppo", "evaluate", "register"):
        assert f"Running stage '{stage}'" in done.stdout, stage
    prefs = json.loads((tmp_path / "metrics/preferences.json").read_text())
    assert prefs["pairs"] == 40 and prefs["gold_rater"] == 0
    assert json.loads((tmp_path / "metrics/sft.json").read_text())["examples"] == 80
    status = subprocess.run(["dvc", "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # every declared output exists: nothing left to run
