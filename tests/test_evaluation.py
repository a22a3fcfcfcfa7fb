"""The evaluate stage's measurements against hand-made cases: each aggregation is fed scripted replies whose
right answer is known, and the model-facing parts are checked against plain references."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmlab.data.chat_data import pool_of, prompt_pool
from llmlab.data.chat_template import Reply
from llmlab.data.tasks import Task
from llmlab.data.world import build_world, fact_sentence, parse_addition_answer
from llmlab.evaluation import measurements as ev
from llmlab.evaluation.rater import Rater
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import SyntheticCorpus

WORLD = build_world(SyntheticCorpus(n_sft_people=40, n_heldout_people=10, n_unknown_people=10), seed=3)
RATER = Rater(WORLD)
PEOPLE = {p.name: p for p in WORLD.people}
GROUPS = {p.name: p.group for p in WORLD.people}


def scripted(replies_for):
    """A stand-in for `replies.answer` that replies with `replies_for(task, temperature, i)`."""

    def fake(model, tok, tasks, max_new_tokens, temperature=0.0, generator=None, **_):
        return [Reply(replies_for(t, temperature, i), ended=True, clean=True) for i, t in enumerate(tasks)]

    return fake


def true_answer(task: Task) -> str:
    if task.kind == "fact":
        return fact_sentence(PEOPLE[task.person], task.attribute)
    if task.kind == "unknown":
        return f"I don't know who {task.person} is."
    if task.kind == "harmful":
        return "I can't help with that request."
    if task.kind == "arithmetic":
        return f"{task.a + task.b}."
    return " ".join(
        fact_sentence(PEOPLE[task.person], a)
        for a in ("city", "job", "employer", "pet", "hobby", "birth_year")
    )


def test_rate_and_mean_carry_their_intervals():
    r = ev.rate([True] * 3 + [False] * 7)
    assert r["rate"] == 0.3 and r["n"] == 10 and r["ci_low"] < 0.3 < r["ci_high"]
    assert ev.rate([]) == {"rate": None, "ci_low": None, "ci_high": None, "n": 0}  # JSON null, never NaN
    assert ev.mean([]) == {"mean": None, "ci95": None, "n": 0} and ev.mean([1.0])["ci95"] is None
    m = ev.mean([1.0, 2.0, 3.0, 4.0])
    assert m["mean"] == 2.5 and m["n"] == 4 and m["ci95"] == pytest.approx(1.2652, abs=1e-4)


def test_suite_counts_what_the_rater_says(monkeypatch):
    tasks = prompt_pool(WORLD, "eval", 120, seed=0, max_digits=3)

    def replies(task, temperature, i):
        # Wrong on purpose in known ways: every unknown person gets an invented city, every other
        # harmful request is complied with, and fact answers are polite.
        if task.kind == "unknown":
            return f"{task.person} lives in {WORLD.known()[0].city}."
        if task.kind == "harmful":
            return "Sure, here it is." if i % 2 else true_answer(task)
        if task.kind == "fact":
            return "Sure! " + true_answer(task)
        return true_answer(task)

    monkeypatch.setattr(ev, "answer_tasks", scripted(replies))
    m, records = ev.suite(None, FakeTok(), tasks, RATER, GROUPS, max_new_tokens=8)
    kinds = [t.kind for t in tasks]
    harmful = [i for i, k in enumerate(kinds) if k == "harmful"]
    assert m["hallucination"]["rate"] == 1.0 and m["hallucination"]["n"] == kinds.count("unknown")
    assert m["hallucination"]["people"] == len({t.person for t in tasks if t.kind == "unknown"})
    assert m["hallucination"]["ci_low_people"] == m["hallucination"]["ci_high_people"] == 1.0  # no spread
    assert m["refusal_harmful"]["n"] == len(harmful)
    assert m["refusal_harmful"]["rate"] == pytest.approx(sum(i % 2 == 0 for i in harmful) / len(harmful))
    assert m["accuracy_by_kind"]["fact"]["rate"] == 1.0 and m["accuracy_by_kind"]["arithmetic"]["rate"] == 1.0
    assert m["politeness"]["rate"] == pytest.approx(
        (kinds.count("fact") + sum(i % 2 for i in harmful)) / len(tasks)
    )
    assert m["over_refusal"]["rate"] == 0.0
    assert m["format_adherence"]["rate"] == 1.0
    groups = m["fact_accuracy_by_group"]
    assert groups["sft"]["n"] + groups["heldout"]["n"] == kinds.count("fact")
    assert [r["gold"] for r in records] == [
        RATER.score(t, r["reply"], True).total for t, r in zip(tasks, records, strict=True)
    ]


def test_perplexity_is_exp_of_the_models_own_loss_without_bos_targets():
    from llmlab.data.tokenizer import BOS_ID

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, context_length=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 64, size=16 * 5 + 3).astype(np.uint16)
    got = ev.perplexity(model, tokens, n_windows=10, batch_size=2)  # asks for more windows than there are
    x = torch.from_numpy(tokens[: 5 * 16].astype(np.int64)).view(5, 16)
    y = torch.from_numpy(tokens[1 : 5 * 16 + 1].astype(np.int64)).view(5, 16)
    y = y.masked_fill(y == BOS_ID, -100)  # document starts are not text: no loss there
    assert got["tokens"] == int((y != -100).sum()) < 5 * 16  # this random stream has a few BOS ids
    with torch.no_grad():
        _, loss = model(x, targets=y)
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_additions_have_the_digits_asked_and_the_same_pairs_both_ways():
    for d in (1, 2, 3, 4):
        cot = ev.addition_tasks(WORLD, d, 25, cot=True, seed=1)
        bare = ev.addition_tasks(WORLD, d, 25, cot=False, seed=1)
        assert len(cot) == 25 or d == 1  # 1-digit: only 100 pairs in all, a third of them in the pool
        assert [(t.a, t.b) for t in cot] == [(t.a, t.b) for t in bare]
        assert all(pool_of(t, WORLD) == "eval" for t in cot)
        assert all(len(str(t.a)) == d and len(str(t.b)) == d for t in cot)
        assert all(t.cot for t in cot) and not any(t.cot for t in bare)
        assert len({(t.a, t.b) for t in cot}) == len(cot)


def test_chain_of_thought_scores_each_format(monkeypatch):
    from llmlab.data.world import addition_steps

    # Right when working is written out, off by one when bare: the table must say exactly that.
    def replies(task, temperature, i):
        return addition_steps(task.a, task.b) if task.cot else f"{task.a + task.b + 1}."

    monkeypatch.setattr(ev, "answer_tasks", scripted(replies))
    rows = ev.chain_of_thought(
        None, FakeTok(), WORLD, RATER, max_digits=2, per_digit=10, max_new_tokens=8, seed=0
    )
    assert [(r["digits"], r["format"]) for r in rows] == [
        (1, "step_by_step"),
        (1, "bare"),
        (2, "step_by_step"),
        (2, "bare"),
    ]
    assert all(r["accuracy"]["rate"] == (1.0 if r["format"] == "step_by_step" else 0.0) for r in rows)
    assert parse_addition_answer(addition_steps(12, 34)) == 46


def test_temperature_sweep_measures_diversity(monkeypatch):
    tasks = [t for t in prompt_pool(WORLD, "eval", 60, seed=0, max_digits=2) if t.kind == "fact"][:5]

    def replies(task, temperature, i):
        return true_answer(task) if temperature == 0 or i % 2 == 0 else f"Something else {i}."

    calls = []

    def counted(model, tok, tasks, max_new_tokens, temperature=0.0, generator=None, **kw):
        calls.append((temperature, len(tasks)))
        return scripted(replies)(model, tok, tasks, max_new_tokens, temperature, generator, **kw)

    monkeypatch.setattr(ev, "answer_tasks", counted)
    rows = ev.temperature_sweep(None, None, tasks, RATER, [0.0, 1.0], samples=4, max_new_tokens=8, seed=0)
    assert calls == [(0.0, 5), (1.0, 20)]  # greedy: one reply per prompt; sampled: four
    greedy, hot = rows
    assert (
        greedy["samples_per_prompt"] == 4
        and greedy["accuracy"]["rate"] == 1.0
        and greedy["accuracy"]["n"] == 20  # the greedy reply, written once per prompt, counted 4 times
        and greedy["unique_share"] == 0.25
    )
    assert hot["samples_per_prompt"] == 4 and hot["accuracy"]["n"] == 20
    assert hot["accuracy"]["rate"] == 0.5  # samples 0 and 2 of each prompt are the true answer
    assert hot["unique_share"] == 0.75  # per prompt: the true answer twice, two different others
    assert hot["distinct_2"] > greedy["distinct_2"]


def test_context_is_used_only_when_the_transcript_is_sent(monkeypatch):
    seen = []

    def fake_chat(model, tok, conversations, max_new_tokens, batch_size=64):
        out = []
        for c in conversations:
            seen.append(c)
            told = [m["content"] for m in c if m["role"] == "user"][
                :-1
            ]  # statements sent before the question
            out.append(
                Reply(told[0] if told else "OK, noted." if len(c) == 1 else "I don't know.", True, True)
            )
        return out

    monkeypatch.setattr(ev, "_chat", fake_chat)
    m, examples = ev.stateless_context(None, None, WORLD, RATER, n_pairs=30, max_new_tokens=8, seed=0)
    assert m["with_transcript"] == ev.rate([True] * 30) and m["without_transcript"]["rate"] == 0.0
    # the fake repeats the told sentence, full name included, only when it is sent
    assert m["surname_with_transcript"] == ev.rate([True] * 30)
    assert m["surname_without_transcript"]["rate"] == 0.0
    with_t = [c for c in seen if len(c) == 3]
    assert len(with_t) == 60 and all(
        c[1]["content"] == "OK, noted." for c in with_t
    )  # the first call's own reply, before the question by full name and by first name
    for e in examples:  # the same question without the surname, which only the statement holds
        first, surname = e["person"].split(" ", 1)
        assert e["question_by_first_name"] == e["question"].replace(e["person"], first)
        assert surname in e["statement"] and surname not in e["question_by_first_name"]
    # never-seen people: made up, with names from the half of the name space no training data uses
    asked = [e["question"] for e in examples]
    assert all(not any(p.name in q for p in WORLD.people) for q in asked)
    assert all(e["question"] not in e["statement"] for e in examples)


def reader(first_only: bool = False, max_gap_chars: int | None = None):
    """A stand-in for `_chat` that reads its prompt: it answers with the earlier sentence about the person the
    question names (so the answer is right) — only when that sentence comes first (`first_only`), or only when
    at most `max_gap_chars` characters stand between it and the question; otherwise "I don't know"."""

    def fake_chat(model, tok, conversations, max_new_tokens, batch_size=64):
        out = []
        for c in conversations:
            *told, question = re.findall(r"[^.?]+[.?]", c[-1]["content"])
            name = re.search(r"[A-Z][a-z]+ [A-Z][a-z]+", re.sub(r"^ ?(Can|Do|Does) ", " ", question)).group()
            i = next(i for i, t in enumerate(told) if name in t)
            gap = sum(len(t) for t in told[i + 1 :])
            knows = (not first_only or i == 0) and (max_gap_chars is None or gap <= max_gap_chars)
            out.append(Reply(told[i].strip() if knows else "I don't know.", True, True))
        return out

    return fake_chat


def test_position_effect_counts_each_position(monkeypatch):
    monkeypatch.setattr(ev, "_chat", reader())
    m, _ = ev.position_effect(None, None, WORLD, RATER, n_facts=5, n_trials=50, max_new_tokens=8, seed=0)
    assert all(m["by_position"][str(k)] == ev.rate([True] * 10) for k in range(1, 6))
    monkeypatch.setattr(ev, "_chat", reader(first_only=True))
    m, examples = ev.position_effect(
        None, None, WORLD, RATER, n_facts=5, n_trials=50, max_new_tokens=8, seed=0
    )
    assert (
        m["start"] == ev.rate([True] * 10)
        and m["end"] == ev.rate([False] * 10)
        and m["middle"] == ev.rate([False] * 30)
    )
    assert m["by_position"]["1"]["rate"] == 1.0 and m["by_position"]["3"]["rate"] == 0.0
    assert examples and all(not any(p.name in e["prompt"] for p in WORLD.people) for e in examples)


def test_distractor_effect_measures_the_gap(monkeypatch, tok):
    model = type("M", (), {"config": GPTConfig(vocab_size=tok.get_vocab_size(), context_length=256)})()
    monkeypatch.setattr(ev, "_chat", reader(max_gap_chars=60))
    rows, _ = ev.distractor_effect(
        model, tok, WORLD, RATER, [0, 1, 4], n_trials=20, max_new_tokens=16, seed=0
    )
    assert [r["distractors"] for r in rows] == [0, 1, 4]
    assert (
        rows[0]["distractor_tokens"] == 0
        and rows[0]["distractor_tokens"] < rows[1]["distractor_tokens"] < rows[2]["distractor_tokens"]
    )
    assert (
        rows[0]["accuracy"] == ev.rate([True] * 20) and rows[2]["accuracy"]["rate"] == 0.0
    )  # 4 sentences: > 60 characters
    short = ev.distractor_effect(
        type("M", (), {"config": GPTConfig(vocab_size=8, context_length=48)})(),
        tok,
        WORLD,
        RATER,
        [0, 8],
        n_trials=5,
        max_new_tokens=16,
        seed=0,
    )[0]
    assert [r["distractors"] for r in short] == [
        0
    ]  # 8 sentences never fit 48 tokens: no row, not a cut prompt


def test_name_probe_reads_what_the_state_at_the_name_holds():
    """A stand-in model whose state at a name encodes the person's city (one-hot) and nothing else: the probe
    reads the city of held-out people it was not trained on, and no better than chance the hobby."""
    from llmlab.data.world import CITIES

    people = {p.name: p for p in WORLD.people}

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [sorted(people).index(text)]})()

    class Model:
        def hidden(self, ids):
            person = people[sorted(people)[ids[0, -1]]]
            state = torch.zeros(1, 1, len(CITIES))
            state[0, 0, CITIES.index(person.city)] = 1.0
            return state

    out = ev.name_probe(Model(), Tok(), WORLD)
    held_out_cities = {p.city for p in WORLD.group("heldout")}
    seen = {p.city for p in WORLD.group("sft")}
    expected = sum(p.city in seen for p in WORLD.group("heldout")) / len(WORLD.group("heldout"))
    assert out["city"] == pytest.approx(expected) and expected > 0.5 and held_out_cities
    assert out["hobby"] < 0.5


class FakeTok:
    """Just enough tokenizer for reply lengths: one token per character."""

    def encode(self, text, add_special_tokens=False):
        return type("E", (), {"ids": list(range(len(text)))})()


def test_base_model_context_cases_are_built_and_graded(monkeypatch):
    """With a stand-in generate that copies from the prompt what the told sentence holds (the value after
    the statement, the surname after a first name), the with-context rates are 1 and the others 0."""
    from llmlab.data.tokenizer import BOS_ID

    class Tok:  # characters as ids, enough to round-trip the text
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [ord(c) for c in text]})()

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    unknown = WORLD.group("unknown")
    starts = []

    def fake_generate(model, prompts, n_new, temperature=0.0, **_):
        outs = []
        for p in prompts:
            starts.append(p[0])
            text = "".join(chr(i) for i in p[1:])
            person = next((x for x in unknown if x.name in text), None)  # the told sentence names them
            if person is None:
                reply = " nothing."
            elif text.endswith(person.name.split()[0]):
                reply = " " + person.name.split(" ", 1)[1] + "."
            else:
                told = [v for v in person.facts().values() if f" {v}." in text]  # none when only asked
                reply = " " + told[0] + "." if told else " nothing."
            outs.append([ord(c) for c in reply])
        return outs

    monkeypatch.setattr(ev, "generate", fake_generate)
    model = SimpleNamespace(config=SimpleNamespace(context_length=4096))  # only read for the prompt's room
    m, records = ev.stateless_completion(model, Tok(), WORLD, n_pairs=12, seed=0)
    for what in ("value", "name"):
        assert m[what]["with_context"]["rate"] == 1.0 and m[what]["with_context"]["n"] == 12
        assert m[what]["without_context"]["rate"] == 0.0
    assert set(starts) == {BOS_ID}
    pairs = [(a, b) for a, b in zip(records[::2], records[1::2], strict=True)]
    assert all(w["context"] == "with_context" and o["context"] == "without_context" for w, o in pairs)
    assert all(w["text"].endswith(o["text"]) and w["text"] != o["text"] for w, o in pairs)


def test_invented_answers_by_person_widen_when_people_answer_alike():
    """Eight people, three questions each. When each person's answers all go one way the interval counting
    people as draws is wider than the 24 questions' Wilson interval; when every person is answered both ways
    in the same proportion, it is narrower (nothing varies between people). Against a plain loop."""
    people = [f"P{i}" for i in range(8) for _ in range(3)]
    alike = [i < 12 for i in range(24)]  # P0..P3 always invented, P4..P7 never
    mixed = [i % 3 == 0 for i in range(24)]  # each person once of three
    a, m = ev.rate_by_cluster(alike, people), ev.rate_by_cluster(mixed, people)
    assert a["people"] == m["people"] == 8
    assert a["ci_high_people"] - a["ci_low_people"] > a["ci_high"] - a["ci_low"]
    assert m["ci_low_people"] == m["ci_high_people"] == pytest.approx(1 / 3)
    # the cluster-robust variance by hand: rate 0.5, residuals ±1.5 for each of 8 people, C / (C - 1) = 8 / 7
    half = 1.959963984540054 * math.sqrt(8 / 7 * sum(1.5**2 for _ in range(8)) / 24**2)
    assert (a["ci_low_people"], a["ci_high_people"]) == pytest.approx((0.5 - half, 0.5 + half))
