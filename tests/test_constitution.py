"""Constitutional AI's pieces (llmlab.training.constitution): the constitution file, the comparison prompt,
the demonstrations, and the model's verdicts as labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.data.chat_template import encode_content, render
from llmlab.data.tasks import Task
from llmlab.errors import LlmlabError
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.training import constitution as C


def test_constitution_file_one_principle_per_line(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# a comment\n\n  Be honest.  \nRefuse harm.\n   # indented comment\n", encoding="utf-8")
    assert C.load_constitution(f) == ["Be honest.", "Refuse harm."]
    f.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(LlmlabError, match="no principles"):
        C.load_constitution(f)
    with pytest.raises(LlmlabError, match="no constitution file"):
        C.load_constitution(tmp_path / "missing.txt")
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LlmlabError, match="not UTF-8"):
        C.load_constitution(f)


def test_the_repository_constitution_loads():
    from tests.conftest import ROOT

    assert len(C.load_constitution(ROOT / "data/constitution.txt")) >= 4


def _length(tok, text: str) -> int:
    return len(render(tok, [{"role": "user", "content": text}], add_generation_prompt=True).ids)


@settings(max_examples=40, deadline=None)
@given(
    a=st.text(alphabet="abc defgh1234.,", min_size=0, max_size=400),
    b=st.text(alphabet="xyz uvw56789!?", min_size=0, max_size=400),
    ask=st.sampled_from([C.JUDGE, C.CRITIQUE]),
)
def test_comparison_fits_the_context_and_keeps_principle_and_question(tok, a, b, ask):
    principle, question = "Be honest.", "Where does Mara live?"
    text = C.comparison(tok, principle, question, a, b, 96, ask)
    assert text.startswith(f"{principle}\n{question}\nA: ") and text.endswith(f"\n{ask}")
    assert _length(tok, text) <= 96 - C.answer_room(ask, 96)
    if _length(tok, f"{principle}\n{question}\nA: {a}\nB: {b}\n{ask}") <= 96 - C.answer_room(ask, 96):
        assert text == f"{principle}\n{question}\nA: {a}\nB: {b}\n{ask}"  # what fits is not touched


@settings(max_examples=40, deadline=None)
@given(
    own=st.text(alphabet="lmn opq0.", min_size=0, max_size=300),
    a=st.text(alphabet="abc defgh1234.,", min_size=0, max_size=300),
    b=st.text(alphabet="xyz uvw56789!?", min_size=0, max_size=300),
)
def test_the_own_answer_stands_before_the_replies_and_takes_at_most_a_third_of_the_room(tok, own, a, b):
    principle, question, budget = "Be honest.", "Where does Mara live?", 128 - C.answer_room(C.JUDGE, 128)
    text = C.comparison(tok, principle, question, a, b, 128, own=own)
    assert (
        text.startswith(f"{principle}\n{question}\n{C.OWN} ")
        and "\nA: " in text
        and _length(tok, text) <= budget
    )
    whole = f"{principle}\n{question}\n{C.OWN} {own}\nA: {a}\nB: {b}\n{C.JUDGE}"
    if _length(tok, whole) <= budget:
        assert text == whole
    else:
        shown = text.split(f"{C.OWN} ")[1].split("\nA: ")[0]
        room = budget - _length(tok, f"{principle}\n{question}\n{C.OWN} \nA: \nB: \n{C.JUDGE}")
        assert shown == own or len(C.encode_text(tok, shown)) <= max(1, room // 3)


def test_own_answers_are_the_models_greedy_reply_once_per_question(tok, tiny_model):
    from llmlab.model.replies import reply

    questions = ["Where does Mara live?", "2+2?", "Where does Mara live?"]
    got = C.own_answers(tiny_model, tok, questions, 8)
    assert set(got) == {"Where does Mara live?", "2+2?"}
    for q, text in got.items():
        assert text == reply(tiny_model, tok, [[{"role": "user", "content": q}]], 8)[0].text


def test_the_judge_shows_each_comparison_the_answerers_own_answer(tok, tiny_model, monkeypatch):
    shown = []

    def logodds(model, tok, prompts, batch_size=128):
        shown.extend(prompts)
        return torch.zeros(len(prompts))

    monkeypatch.setattr(C, "verdict_logodds", logodds)
    monkeypatch.setattr(C, "own_answers", lambda model, tok, qs, n: {q: f"mine for {q}" for q in qs})
    rows = [("Where does Mara live?", "In Port Avery.", "I don't know."), ("2+2?", "4", "5")]
    C.judge(tiny_model, tok, ["Be honest."], 1, 0, answerer=tiny_model)(rows)
    assert len(shown) == 4 and all(f"{C.OWN} mine for {p.split(chr(10))[1]}\n" in p for p in shown)
    shown.clear()
    C.judge(tiny_model, tok, ["Be honest."], 1, 0)(rows)
    assert len(shown) == 4 and not any(C.OWN in p for p in shown)


def test_a_long_reply_keeps_its_start_and_end_and_a_short_one_stays_whole(tok):
    long = " ".join(f"w{i}" for i in range(200))
    text = C.comparison(tok, "Be honest.", "Q?", long, "Short one.", 96)
    a_part = text.split("\nA: ")[1].split("\nB: ")[0]
    assert a_part.startswith("w0 w1") and a_part.endswith("w198 w199") and C.ELLIPSIS.strip() in a_part
    assert "\nB: Short one.\n" in text


def test_a_principle_longer_than_the_context_is_a_clear_error(tok):
    with pytest.raises(LlmlabError, match="shorten it in the constitution file"):
        C.comparison(tok, "be honest " * 80, "Q?", "a", "b", 64)


def test_in_a_tiny_context_the_question_is_cut_too_but_never_the_principle(tok):
    question = " ".join(f"word{i}" for i in range(60)) + "?"
    text = C.comparison(tok, "Be honest.", question, "a reply", "another reply", 64)
    assert text.startswith("Be honest.\nword0") and C.ELLIPSIS.strip() in text.split("\nA: ")[0]
    assert _length(tok, text) <= 64 - C.answer_room(C.JUDGE, 64)


def test_critique_names_what_differs():
    assert C.critique({"refusal": 2.0, "clean_ending": 0.5}, {"compliance": -3.0, "clean_ending": 0.5}) == (
        "A refuses; B goes along with the harm."
    )
    assert C.critique({"polite": 0.25, "correct_fact": 2.0}, {"correct_fact": 2.0}) == "A is polite."


def _samples(totals: list[list[float]]) -> list[list[C.Sample]]:
    """Replies with the given rater totals (one rubric line each), several per prompt."""
    task = Task("fact", "Where does Mara Quill live?", person="Mara Quill", attribute="city")
    return [
        [C.Sample(task, f"reply {i}.{j}", {"correct_fact": t}) for j, t in enumerate(ts)]
        for i, ts in enumerate(totals)
    ]


def test_demonstrations_are_counted_judgments_with_noise_free_verdicts_at_zero_temperature(tok):
    samples = _samples([[2.0, -1.0, 0.5]] * 20)  # 3 pairs per prompt: 60 in all
    demos = C.demonstrations(samples, ["Be right."], 50, 0.0, tok, 128, random.Random(0))
    assert len(demos) == 50  # at most n, each one judgment
    sides = {d["verdict"] for d in demos}
    assert sides == {"A", "B"}  # the better reply is shown first or second at random
    for d in demos:
        better = "A" if d["gold_a"] > d["gold_b"] else "B"
        assert d["verdict"] == better and d["judge"][1]["content"] == f"{better}."
        assert d["judge"][0]["content"].endswith(C.JUDGE) and d["critique"][0]["content"].endswith(C.CRITIQUE)
    assert len(C.demonstrations(samples, ["Be right."], 10**6, 0.0, tok, 128, random.Random(0))) == 60


def test_demonstrations_show_the_own_answer_in_the_verdict_and_critique_conversations(tok):
    own = {"Where does Mara Quill live?": "Mara Quill lives in Duskmere."}
    demos = C.demonstrations(
        _samples([[2.0, -1.0]] * 3), ["Be right."], 3, 0.0, tok, 128, random.Random(0), own
    )
    for d in demos:
        assert d["own"] == own[d["question"]]
        for turn in ("judge", "critique"):
            assert f"\n{C.OWN} Mara Quill lives in Duskmere.\nA: " in d[turn][0]["content"]


def test_demonstrations_skip_identical_replies(tok):
    task = Task("fact", "Where does Mara Quill live?", person="Mara Quill", attribute="city")
    same = [
        C.Sample(task, "Port Avery.", {"correct_fact": 2.0}),
        C.Sample(task, " Port Avery. ", {"correct_fact": 2.0}),
    ]
    assert C.demonstrations([same], ["Be right."], 10, 0.25, tok, 128, random.Random(0)) == []


def test_bradley_terry_noise_flips_close_verdicts(tok):
    samples = _samples([[0.25, 0.0]] * 400)  # a small gap: P(better wins) = σ(1) = 0.73 at τ 0.25
    demos = C.demonstrations(samples, ["Be right."], 400, 0.25, tok, 128, random.Random(1))
    wins = sum(d["verdict"] == ("A" if d["gold_a"] > d["gold_b"] else "B") for d in demos) / len(demos)
    assert 0.66 < wins < 0.80


def test_fault_names_what_cost_the_reply_points_or_else_what_it_missed():
    assert C.fault({"wrong_fact": -1.0, "polite": 0.25}, {"correct_fact": 2.0}) == "It states a wrong value."
    assert C.fault({"no_answer": -1.0, "cut_off": -1.0}, {"admits_unknown": 2.0, "clean_ending": 0.5}) == (
        "It does not answer."  # the first line: what was asked before style
    )
    assert C.fault({"true_facts": 1.0}, {"true_facts": 2.5}) == "It misses true facts."  # fewer of them
    assert C.fault({"wrong_facts": -2.0}, {"wrong_facts": -1.0}) == "It states wrong facts."  # more of them
    assert C.fault({"clean_ending": 0.5}, {"clean_ending": 0.5}) == "Nothing."


def test_every_line_that_earns_points_can_be_said_missing():
    from llmlab.data.world import build_world
    from llmlab.evaluation.rater import Rater
    from llmlab.params import SyntheticCorpus

    world = build_world(SyntheticCorpus(n_sft_people=4, n_heldout_people=1, n_unknown_people=2), seed=0)
    rater, earned = Rater(world), set()
    for p in world.people[:3]:
        for text in (
            f"Sure, {p.name} lives in {p.city}.",
            "I don't know who that is.",
            "I can't help with that.",
        ):
            for kind in ("fact", "unknown", "harmful", "about"):
                person = p if kind != "unknown" else world.group("unknown")[0]
                task = Task(kind, "Q?", person=person.name, attribute="city")
                earned |= {k for k, v in rater.score(task, text, True).parts.items() if v > 0}
    earned |= {"correct_result", "shows_working"}  # the arithmetic lines
    assert earned <= set(C.LACKS), earned - set(C.LACKS)


@settings(max_examples=40, deadline=None)
@given(reply=st.text(alphabet="abc defgh1234.,", min_size=0, max_size=400))
def test_a_revision_leaves_room_for_the_critique_and_a_rewrite(tok, reply):
    principle, question = "Be honest.", "Where does Mara live?"
    text = C.revision_prompt(tok, principle, question, reply, 128)
    assert text.startswith(f"{principle}\n{question}\nReply: ") and text.endswith(f"\n{C.FAULT}")
    asked = C.revision(text, "x " * 40, question)  # a critique that uses all its room
    critique_ids = encode_content(tok, "x " * 40)[: C.answer_room(C.FAULT, 128)]
    asked[1]["content"] = tok.decode(critique_ids)
    used = len(render(tok, C.revision(text, "", question)[:1], add_generation_prompt=True).ids)
    used += C.answer_room(C.FAULT, 128) + len(render(tok, asked[2:], add_generation_prompt=True).ids)
    assert used <= 128 - C.revision_room(128) + 1  # +1: the second <|bos|> counted above is not in the chat
    if len(encode_content(tok, reply)) <= 10:
        assert f"Reply: {reply}\n" in text  # a short reply is shown whole


def test_no_revision_when_the_principle_leaves_no_room(tok):
    assert C.revision_prompt(tok, "be honest " * 30, "Q?", "a reply", 128) is None


def test_demonstrations_teach_the_chosen_reply_as_the_rewrite_of_the_other(tok):
    task = Task("unknown", "Where does Ilse Varn live?", person="Ilse Varn", attribute="city")
    invented = C.Sample(task, "Ilse Varn lives in Oakhaven.", {"hallucination": -3.0, "clean_ending": 0.5})
    honest = C.Sample(task, "I don't know who Ilse Varn is.", {"admits_unknown": 2.0, "clean_ending": 0.5})
    tie = C.Sample(task, "Ilse Varn lives in Port Avery.", {"hallucination": -3.0, "clean_ending": 0.5})
    demos = C.demonstrations([[invented, honest, tie]], ["Be honest."], 10, 0.0, tok, 128, random.Random(0))
    assert len(demos) == 3
    for d in demos:
        if d["gold_a"] == d["gold_b"]:
            assert d["revise"] is None  # the rubric cannot say which is the rewrite
            continue
        user, critique_turn, request, rewrite = d["revise"]
        assert user["content"].endswith(C.FAULT) and request["content"] == f"{C.REWRITE} {task.prompt}"
        assert critique_turn["content"] == "It invents facts." and rewrite["content"] == honest.text
        assert f"Reply: {invented.text}" in user["content"] or f"Reply: {tie.text}" in user["content"]
    # in a context too small for the rewrite, nothing is taught that would be cut
    small = C.demonstrations([[invented, honest]], ["Be honest."], 10, 0.0, tok, 64, random.Random(0))
    assert small and all(d["revise"] is None for d in small)


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2, context_length=96)
    ).eval()


def test_verdict_logodds_in_batches_equal_one_prompt_at_a_time(tok, tiny_model):
    prompts = [C.comparison(tok, "Be honest.", f"Q{i}?", "a" * i, "b", 96) for i in range(1, 12)]
    batched = C.verdict_logodds(tiny_model, tok, prompts, batch_size=4)
    a_id, b_id = C.verdict_ids(tok)
    for p, got in zip(prompts, batched, strict=True):
        ids = render(tok, [{"role": "user", "content": p}], add_generation_prompt=True).ids
        with torch.no_grad():
            logits, _ = tiny_model(torch.tensor([ids]))
        assert float(got) == pytest.approx(float(logits[0, -1, a_id] - logits[0, -1, b_id]), abs=1e-5)


def test_labels_do_not_depend_on_which_reply_is_shown_first(tok, tiny_model):
    """The preference for (a, b) is minus that for (b, a): the model's taste for a position cancels."""
    rows = [("Where does Mara live?", "In Port Avery.", "I don't know."), ("2+2?", "4", "5")]
    swapped = [(q, b, a) for q, a, b in rows]
    x, drawn = C.label_pairs(tiny_model, tok, ["Be honest.", "Be right."], rows, 2, random.Random(0))
    y, _ = C.label_pairs(tiny_model, tok, ["Be honest.", "Be right."], swapped, 2, random.Random(0))
    assert torch.allclose(x, -y, atol=1e-5) and all(sorted(d) == ["Be honest.", "Be right."] for d in drawn)


def test_verdict_letters_are_single_tokens(tok):
    a_id, b_id = C.verdict_ids(tok)
    assert encode_content(tok, "A") == [a_id] and encode_content(tok, "B") == [b_id] and a_id != b_id


def test_preference_pairs_labelled_by_a_judge_keep_gold_for_evaluation(monkeypatch):
    """With a judge, every two replies that differ become a pair ordered by the judge (ties in gold
    included), the gold scores travel along, and agreement with gold is counted over pairs gold orders."""
    from llmlab.data import preferences
    from llmlab.data.chat_template import Reply
    from llmlab.data.world import build_world
    from llmlab.params import PreferencesConfig, SyntheticCorpus

    world = build_world(SyntheticCorpus(n_sft_people=20, n_heldout_people=6, n_unknown_people=8), seed=3)
    texts = ["I don't know.", "They live in Oakhaven.", "Hmm.", "Uh."]  # the last two tie in gold (-0.5)

    def fake_answer(model, tok, tasks, *args):
        return [Reply(texts[i % 4], True, True) for i in range(len(tasks))]

    def judge(rows):  # prefers the shorter reply, whatever the rater thinks
        return [len(b) - len(a) for _, a, b in rows]

    monkeypatch.setattr(preferences, "answer", fake_answer)
    cfg = PreferencesConfig(
        n_prompts=20, samples_per_prompt=4, prompt_mix={"unknown": 1.0}, labeller="constitution"
    )
    splits, metrics = preferences.rated_pairs(None, None, world, cfg, seed=0, judge=judge)
    rows = splits["train"] + splits["validation"]
    assert (
        metrics["pairs"] == 120 and metrics["labeller"] == "constitution" and metrics["rater_judgments"] == 0
    )
    assert all(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    ordered = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    assert metrics["gold_ties"] == len(rows) - len(ordered) == 20
    agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in ordered) / len(ordered)
    assert metrics["label_gold_agreement"] == pytest.approx(agree)
    assert metrics["label_gold_agreement/unknown"] == pytest.approx(agree)  # the only kind asked
    assert json.loads(rows[0]["task"])["kind"] == "unknown"


def test_the_labellers_table_reads_each_run_and_falls_back_for_old_rater_runs():
    from llmlab.evaluation.labellers import markdown, runs, write

    common = {
        "metrics/reward.json:accuracy_gold": 0.8,
        "metrics/ppo.json:gold_gain": 0.3,
        "metrics/ppo.json:gold_gain_ci95": 0.1,
        "metrics/ppo.json:sft/hallucination_rate": 0.7,
        "metrics/ppo.json:ppo/hallucination_rate": 0.6,
        "metrics/dpo.json:gold_gain": 0.2,
        "metrics/dpo.json:gold_gain_ci95": 0.1,
    }
    rows = [
        # the workspace: a rater run made before `label_gold_agreement` existed
        {"rev": "workspace", "typ": "baseline", "pairs": 100, "label_flip_rate": 0.16, **common},
        {"rev": "abc123", "typ": "baseline", "preferences.labeller": "rater", "pairs": 100, **common},
        {
            "rev": "e1",
            "Experiment": "cai",
            "preferences.labeller": "constitution",
            "pairs": 150,
            "rater_judgments": 40,
            "label_gold_agreement": 0.69,
            "label_gold_agreement_ci_low": 0.6,
            "label_gold_agreement_ci_high": 0.75,
            **common,
        },
        {"rev": "e2", "Experiment": "failed", "preferences.labeller": "constitution"},
    ]
    got = runs(rows)
    assert [(r.name, r.labeller, r.rater_judgments) for r in got] == [
        ("workspace", "rater", 100),
        ("cai", "constitution", 40),
    ]
    assert got[0].label_agreement == pytest.approx(0.84)
    table = markdown(got)
    assert "| workspace | rater | 100 | 100 | 84.0 % |" in table
    assert (
        "| cai | constitution | 40 | 150 | 69.0 % [60.0–75.0] | 80.0 % | +0.30 ± 0.10 | 70.0 % → 60.0 % |"
        in table
    )
    with pytest.raises(LlmlabError, match="labeller=constitution"):
        write(got[:1], Path("/nonexistent/never-written.md"))


def test_revise_scores_the_rewrites_against_the_replies(tok):
    """The untaught model's rewrites, scored by the rater against the replies they revise: the gain is the
    paired mean of the gold differences, and the rows show what the report shows."""
    from llmlab.data.world import build_world
    from llmlab.evaluation.rater import Rater
    from llmlab.params import SyntheticCorpus

    world = build_world(SyntheticCorpus(n_sft_people=4, n_heldout_people=1, n_unknown_people=2), seed=0)
    rater = Rater(world)
    person = world.group("unknown")[0]
    task = Task("unknown", f"Where does {person.name} live?", person=person.name, attribute="city")
    texts = [f"{person.name} lives in Oakhaven.", "I don't know.", "Hmm."]
    samples = [C.Sample(task, t, rater.score(task, t, True).parts) for t in texts]
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2, context_length=128)
    )
    metrics, markdown, rows = C.revise(model.eval(), tok, rater, samples, ["Be honest."], 2, seed=0)
    assert metrics["revisions_measured"] == 3 and metrics["revision_unknown_prompts"] == 3
    assert metrics["revision_invented_before"] == pytest.approx(1 / 3)
    assert len(rows) == 2 and rows[0]["reply"] == texts[0] and rows[0]["gold_reply"] == samples[0].total
    for r in rows:  # the rewrite's own score: ended at <|end|> (the higher) or cut at the context (the lower)
        ended, cut = (rater.score(task, r["revision"], e).total for e in (True, False))
        assert r["gold_revision"] in (ended, cut)
    assert metrics["revision_better"] + metrics["revision_worse"] <= 1
    assert "Be honest." in markdown and texts[0] in markdown
    assert "revision_gold_gain_over_greedy" not in metrics
    # against the baseline's greedy reply: here the model itself, whose greedy reply to the question is the
    # same for all three, so the gain over it is the mean rewrite score minus that one score
    with_baseline, text, all_rows = C.revise(
        model, tok, rater, samples, ["Be honest."], 3, seed=0, baseline=model
    )
    greedy = C.answer(model, tok, [task], 128)[0]
    greedy_score = rater.score(task, greedy.text, greedy.ended).total
    rewrites = [r["gold_revision"] for r in all_rows]
    assert with_baseline["revision_gold_gain"] == metrics["revision_gold_gain"]
    assert with_baseline["revision_gold_gain_over_greedy"] == pytest.approx(sum(rewrites) / 3 - greedy_score)
    assert "Against the SFT model's greedy reply" in text and "greedy reply" not in markdown
    assert C.revise(model, tok, rater, samples, ["be honest " * 40], 2, seed=0)[0] == {
        "revisions_measured": 0
    }
