"""Preference pairs: Bradley–Terry label noise against its formula, ties, and pair bookkeeping."""

import json
import math
import random

import pytest

from llmlab.data.preferences import bradley_terry_p, make_pairs, rated_strength


def test_noise_free_labels_follow_the_scores():
    pairs, ties = make_pairs(
        "p", [("a", True, 1.0), ("b", True, 3.0), ("c", False, 1.0)], 0.0, random.Random(0)
    )
    assert ties == 1  # a and c score the same
    assert {(p.chosen, p.rejected) for p in pairs} == {("b", "a"), ("b", "c")}
    assert not any(p.flipped for p in pairs)
    b_over_c = next(p for p in pairs if p.rejected == "c")
    assert (b_over_c.chosen_ended, b_over_c.rejected_ended, b_over_c.gold_chosen, b_over_c.gold_rejected) == (
        True,
        False,
        3.0,
        1.0,
    )


@pytest.mark.parametrize(("gap", "tau"), [(0.5, 0.5), (1.0, 0.5), (2.0, 1.0)])
def test_flip_rate_matches_bradley_terry(gap, tau):
    rng = random.Random(1)
    n = 4000
    flips = sum(
        make_pairs("p", [("good", True, gap), ("bad", True, 0.0)], tau, rng)[0][0].flipped for _ in range(n)
    )
    expected = 1 - 1 / (1 + math.exp(-gap / tau))
    assert flips / n == pytest.approx(expected, abs=0.025)


def test_the_rater_says_how_much_better_and_a_label_against_its_scores_was_a_close_call():
    """Llama 2's four-point scale from the gap between the rater's scores; a flipped label rates 0."""
    pairs, _ = make_pairs(
        "p", [("idk", True, 2.0), ("invented", True, -3.0), ("polite idk", True, 2.25)], 0.0, random.Random(0)
    )
    strength = {(p.chosen, p.rejected): p.strength for p in pairs}
    assert strength == {("idk", "invented"): 3, ("polite idk", "invented"): 3, ("polite idk", "idk"): 0}
    assert [rated_strength(g, 0.0) for g in (0.25, 0.99, 1.0, 1.5, 2.0, 2.9, 3.0, 7.0)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    rng = random.Random(3)
    flipped = next(
        p
        for p in (make_pairs("p", [("a", True, 1.5), ("b", True, 0.0)], 2.0, rng)[0][0] for _ in range(100))
        if p.flipped
    )
    assert flipped.strength == 0 and flipped.gold_chosen - flipped.gold_rejected == -1.5


def test_bradley_terry_is_symmetric():
    for a, b, t in [(1.0, 0.0, 0.3), (-2.0, 1.5, 1.0)]:
        assert bradley_terry_p(a, b, t) + bradley_terry_p(b, a, t) == pytest.approx(1.0)


def test_pairs_written_are_read_back_and_a_missing_split_names_the_stage(tmp_path):
    from llmlab.data.preferences import pair_contexts, read_pairs, write_pairs
    from llmlab.errors import MissingArtifactError

    row = {
        "prompt": "Hi",
        "context": '[{"role": "user", "content": "Hi"}]',
        "chosen": "Hello.",
        "rejected": "Go.",
        "chosen_ended": True,
        "rejected_ended": False,
        "gold_chosen": 1.0,
        "gold_rejected": -1.0,
        "flipped": False,
        "task": "{}",
        "strength": 2,
    }
    write_pairs(tmp_path / "pairs", {"train": [row, row | {"chosen": "Hey."}], "validation": [row]})
    assert read_pairs(tmp_path / "pairs", "train")[1]["chosen"] == "Hey."
    assert read_pairs(tmp_path / "pairs", "train")[1]["strength"] == 2
    assert pair_contexts(tmp_path / "pairs", "train") == [
        [{"role": "user", "content": "Hi"}]
    ]  # distinct contexts
    with pytest.raises(MissingArtifactError, match="preferences"):
        read_pairs(tmp_path / "nowhere", "train")


def test_pairs_ask_the_kinds_of_preferences_prompt_mix(monkeypatch):
    """`preferences.prompt_mix` decides which kinds of rl prompts the SFT model is sampled on."""
    from llmlab.data import preferences
    from llmlab.data.chat_template import Reply
    from llmlab.data.world import build_world
    from llmlab.params import PreferencesConfig, SyntheticCorpus

    world = build_world(SyntheticCorpus(n_sft_people=20, n_heldout_people=6, n_unknown_people=8), seed=3)

    def fake_answer(model, tok, tasks, *args):  # alternately honest and invented, so that every prompt pairs
        return [
            Reply("I don't know." if i % 2 else "They live in Oakhaven.", True, True)
            for i in range(len(tasks))
        ]

    monkeypatch.setattr(preferences, "answer", fake_answer)
    cfg = PreferencesConfig(n_prompts=30, samples_per_prompt=2, prompt_mix={"unknown": 1.0})
    splits, metrics = preferences.rated_pairs(None, None, world, cfg, seed=0)
    kinds = {json.loads(r["task"])["kind"] for split in splits.values() for r in split}
    assert kinds == {"unknown"} and metrics["pairs"] == 30
