"""The critique stage with a reviser: a model whose context leaves room for rewrites (the tiny
configuration's 64 tokens do not, so the end-to-end run in tests/test_pipeline_e2e.py teaches no reviser).
The stage runs in this process on replies made here, so that the rubric surely tells them apart."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from llmlab.data.tasks import Task
from llmlab.data.world import World
from llmlab.evaluation.rater import Rater
from llmlab.model.transformer import GPT, GPTConfig, load_model, save_model
from llmlab.training.constitution import Sample
from tests.conftest import ROOT, SMOKE_PARAMS

pytestmark = pytest.mark.slow


def test_the_stage_teaches_a_reviser_beside_the_feedback_model(smoke_data, tok, tmp_path, monkeypatch):
    world = World.load(smoke_data / "corpus" / "world.json")
    rater = Rater(world)
    known, unknown = world.group("sft")[0], world.group("unknown")[0]

    def own_replies(
        model, tok, world, n_prompts, k, *args
    ):  # the SFT model's replies, as the stage samples them
        out = []
        for i in range(n_prompts):
            p = known if i % 2 else unknown
            task = Task(
                "fact" if i % 2 else "unknown", f"Where does {p.name} live?", person=p.name, attribute="city"
            )
            texts = [f"{p.name} lives in {p.city}.", "I don't know who that is.", "Hmm."][:k]
            out.append([Sample(task, t, rater.score(task, t, True).parts) for t in texts])
        return out

    spec = importlib.util.spec_from_file_location("pipeline_critique", ROOT / "pipeline" / "critique.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.setattr(stage, "sft_pool_samples", own_replies)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    torch.manual_seed(0)
    save_model(
        GPT(GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2, context_length=128)),
        tmp_path / "sft",
    )
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw["preferences"]["labeller"] = "constitution"
    raw["critique"] |= {"n_prompts": 20, "revision_steps": 4, "revisions_measured": 12, "critiques_shown": 3}
    raw["critique"]["own_answer"] = True  # the comparisons show the SFT model's own answer
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "constitution.txt").write_text("Be honest.\nBe right.\n")
    out = tmp_path / "out"
    stage.run_stage(
        "critique",
        stage.main,
        stage.add_arguments,
        [
            "--params", str(tmp_path / "params.yaml"),
            "--model", str(tmp_path / "sft"),
            "--tokenizer", str(smoke_data / "tokenizer" / "tokenizer.json"),
            "--world", str(smoke_data / "corpus" / "world.json"),
            "--constitution", str(tmp_path / "constitution.txt"),
            "--checkpoints", str(out / "checkpoints"),
            "--out", str(out / "critic"),
            "--metrics", str(out / "critique.json"),
            "--plots", str(out / "plots"),
            "--report", str(out / "report"),
        ],
    )  # fmt: skip
    metrics = json.loads((out / "critique.json").read_text())
    assert metrics["taught"] == 40 and 0 < metrics["revisions_taught"] <= 40
    assert metrics["critiques_taught_to_reviser"] == 1  # the feedback model learns verdicts alone
    assert metrics["revisions_measured"] == 6  # the 2 held-out prompts' 3 replies each (12 asked for)
    critic, reviser = load_model(out / "critic"), load_model(out / "critic" / "reviser")
    assert not torch.equal(critic.lm_head.weight, reviser.lm_head.weight)  # two models, taught apart
    assert (out / "checkpoints" / "reviser" / "last.ckpt").exists()
    rows = json.loads((out / "report" / "revisions.json").read_text())
    assert len(rows) == 3 and all(r["principle"] in ("Be honest.", "Be right.") for r in rows)
    assert "Where does" in (out / "report" / "revisions.md").read_text()
    assert (out / "report" / "critiques.md").read_text().count("its own answer, shown beside them") == 3
