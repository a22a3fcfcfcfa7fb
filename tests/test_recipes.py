"""The GPU recipe (recipes/gpu-tinystories.yaml): valid params of the documented shape, and its data path
(the three Hub datasets it names) on small local datasets with the same schemas and split names, saved
here in the Hub's file layout, since the Hub is out of reach on these machines."""

from __future__ import annotations

import datasets
import torch

from llmlab.data.chat_data import external_conversations
from llmlab.data.corpus import build_corpus
from llmlab.data.preferences import external_pairs
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import load_params
from tests.conftest import ROOT, hub_layout

RECIPE = ROOT / "recipes" / "gpu-tinystories.yaml"


def test_the_recipe_is_valid_and_has_the_documented_shape():
    p = load_params(RECIPE)
    config = GPTConfig.from_params(p.pretrain.model, p.tokenizer.vocab_size)
    with torch.device("meta"):  # the shape only: no 440 MB of weights
        n = GPT(config).num_params(non_embedding=False)
    assert 100e6 < n < 130e6, n
    assert (p.corpus.source, p.corpus.hf.name) == ("hf", "roneneldan/TinyStories")
    assert (p.sft.data.source, p.preferences.source) == ("hf", "hf")
    for section in (p.pretrain, p.sft, p.reward, p.ppo):
        assert (
            section.accelerator == "auto" and section.precision == "bf16-mixed" and section.devices == "auto"
        )


def test_the_recipe_reads_datasets_with_the_schemas_of_the_ones_it_names(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    p = load_params(RECIPE)
    turn = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    stories = hub_layout(
        tmp_path / "TinyStories",
        p.corpus.hf.split,
        [{"text": f"Once upon a time, story {i}."} for i in range(20)],
    )
    chat = hub_layout(
        tmp_path / "smoltalk",
        p.sft.data.hf.split,
        [{"messages": turn, "full_topic": "greeting"} for _ in range(10)],
    )
    prefs = hub_layout(
        tmp_path / "ultrafeedback",
        p.preferences.hf.split,
        [
            {
                "prompt": turn[0]["content"],
                "chosen": [turn[0], {"role": "assistant", "content": f"good {i}"}],
                "rejected": [turn[0], {"role": "assistant", "content": f"bad {i}"}],
                "score_chosen": 8.0,
            }
            for i in range(10)
        ],
    )

    corpus = p.corpus.model_copy(update={"hf": p.corpus.hf.model_copy(update={"name": stories})})
    docs = build_corpus(corpus, seed=0, root=tmp_path)
    assert len(docs.train) + len(docs.validation) == 20

    data = p.sft.data.model_copy(
        update={"hf": p.sft.data.hf.model_copy(update={"name": chat, "config": None})}
    )
    convs, stats = external_conversations(data, tmp_path)
    assert convs[0] == turn and stats["conversations_read"] == 10

    pref = p.preferences.model_copy(update={"hf": p.preferences.hf.model_copy(update={"name": prefs})})
    rows, stats = external_pairs(pref, tmp_path)
    assert len(rows) == 10 and (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]) == (
        "Hi there",
        "good 0",
        "bad 0",
    )
