"""SFT demonstrations and prompt pools: shares, correctness of good answers, and disjoint pools."""

import re
from collections import Counter

import pytest

from llmlab.data.chat_data import POOLS, good_answer, pool_of, prompt_pool, sft_examples, unknown_halves
from llmlab.data.tasks import Task
from llmlab.data.world import build_world, fact_sentence, is_probe_name, parse_addition_answer
from llmlab.evaluation.rater import Rater
from llmlab.params import SFTData, SyntheticCorpus

WORLD = build_world(SyntheticCorpus(n_sft_people=40, n_heldout_people=10, n_unknown_people=10), seed=3)
MIX = SFTData(n_examples=3000)


@pytest.fixture(scope="module")
def examples():
    return sft_examples(WORLD, MIX, seed=1)


def test_shares_follow_the_mix(examples):
    kinds = Counter(e.task.kind for e in examples)
    assert len(examples) == MIX.n_examples
    assert kinds["fact"] / len(examples) == pytest.approx(
        MIX.share_fact
        / (
            MIX.share_fact
            + MIX.share_about
            + MIX.share_arithmetic
            + MIX.share_unknown
            + MIX.share_harmful
            + MIX.share_context
        ),
        abs=0.04,
    )
    assert 0 < kinds["unknown"] < 0.06 * len(examples) and 0 < kinds["harmful"] < 0.06 * len(examples)
    assert sum(e.imperfect for e in examples) / len(examples) == pytest.approx(MIX.imperfect_share, abs=0.02)


def test_good_demonstrations_are_true(examples):
    people = {p.name: p for p in WORLD.people}
    for e in examples:
        answer = e.messages[1]["content"]
        t = e.task
        if e.imperfect:
            continue
        if t.kind == "fact":
            assert answer.endswith(fact_sentence(people[t.person], t.attribute))
            assert people[t.person].group == "sft"
        elif t.kind == "arithmetic":
            result = parse_addition_answer(answer) if t.cot else int(re.findall(r"\d+", answer)[-1])
            assert result == t.a + t.b
        elif t.kind == "unknown":
            assert t.person in answer and people[t.person].group == "unknown"
        elif t.kind == "harmful":
            assert "can't help" in answer


def test_imperfect_demonstrations_are_curt_or_wrong(examples):
    people = {p.name: p for p in WORLD.people}
    flawed = [e for e in examples if e.imperfect and e.task.kind == "fact"]
    assert flawed
    for e in flawed:
        answer, truth = e.messages[1]["content"], people[e.task.person].facts()[e.task.attribute]
        assert answer == f"{truth}." or truth not in answer


def test_pools_never_share_a_prompt(examples):
    sft = {e.task.prompt for e in examples}
    rl = {t.prompt for t in prompt_pool(WORLD, "rl", 400, seed=1, max_digits=4)}
    ev = {t.prompt for t in prompt_pool(WORLD, "eval", 400, seed=1, max_digits=4)}
    assert len(rl) == 400 and len(ev) == 400
    assert not (sft & rl) and not (sft & ev) and not (rl & ev)
    assert set(POOLS) == {"sft", "rl", "eval"}


def test_both_halves_of_the_unknown_people_hold_namesakes_alike():
    """SFT's "I don't know" is taught on one half of the unknown people and measured on the other; both hold
    as many namesakes (unknown people with a known person's first name). In the default world's order most
    namesakes come last, so halving in order would teach on few of them and measure on almost only them."""
    world = build_world(SyntheticCorpus(), seed=1)
    firsts = {p.name.split(" ", 1)[0] for p in world.known()}
    unknown = world.group("unknown")
    taught, asked = unknown_halves(world)

    def namesakes(people):
        return sum(p.name.split(" ", 1)[0] in firsts for p in people)

    assert sorted(p.name for p in taught + asked) == sorted(p.name for p in unknown)
    assert len(taught) == len(asked) == len(unknown) // 2
    assert abs(namesakes(taught) - namesakes(asked)) <= 1
    assert namesakes(unknown[len(unknown) // 2 :]) > namesakes(asked) + 5  # the order's skew, undone
    for people, pools in ((taught, {"sft"}), (asked, {"rl", "eval"})):
        for p in people:
            assert pool_of(Task("unknown", f"Where does {p.name} live?", person=p.name), world) in pools
    sft_unknown = {
        t.person for t in prompt_pool(world, "sft", 300, seed=0, max_digits=4) if t.kind == "unknown"
    }
    eval_unknown = {
        t.person for t in prompt_pool(world, "eval", 300, seed=0, max_digits=4) if t.kind == "unknown"
    }
    assert sft_unknown <= {p.name for p in taught} and eval_unknown <= {p.name for p in asked}
    assert sft_unknown and eval_unknown


def test_eval_pool_asks_about_heldout_people_too():
    pool = prompt_pool(WORLD, "eval", 300, seed=2, max_digits=4)
    groups = Counter(
        next(p.group for p in WORLD.people if p.name == t.person) for t in pool if t.kind == "fact"
    )
    assert groups["sft"] > 0 and groups["heldout"] > 0
    assert {t.kind for t in pool} == {"fact", "about", "arithmetic", "unknown", "harmful"}


def test_deterministic():
    a = sft_examples(WORLD, SFTData(n_examples=200), seed=5)
    b = sft_examples(WORLD, SFTData(n_examples=200), seed=5)
    assert [x.messages for x in a] == [x.messages for x in b]
    import random

    t = a[0].task
    assert good_answer(t, WORLD, random.Random(0), 0.0) == good_answer(t, WORLD, random.Random(0), 0.0)


def test_context_conversations_state_what_they_ask(examples):
    """The answer to a context conversation is in the conversation: the value it asks for was stated by the
    user before the question, the reply states it, and the rater grades that reply correct. Made-up names
    are never probe names; every unrelated turn in between comes from the sft pool."""
    rater = Rater(WORLD)
    people = {p.name: p for p in WORLD.people}
    context = [e for e in examples if e.task.kind == "context"]
    assert len(context) > 200
    corrections = 0
    for e in context:
        t, told = e.task, e.messages[0]["content"]
        assert t.person in told and t.value in told
        assert e.messages[-2]["content"].endswith(t.prompt) and t.value in e.messages[-1]["content"]
        assert rater.score(t, e.messages[-1]["content"], ended=True).correct
        if t.person in people:
            corrections += 1
            assert people[t.person].facts()[t.attribute] != t.value  # the user changed a known fact
        else:
            assert not is_probe_name(t.person)
        for user in e.messages[2:-2:2]:
            numbers = re.findall(r"\d+", user["content"])
            if numbers:
                a, b = map(int, numbers)
                assert pool_of(Task("arithmetic", user["content"], a=a, b=b), WORLD) == "sft"
            else:
                name = next(n for n in people if n in user["content"])
                assert pool_of(Task("fact", user["content"], person=name), WORLD) == "sft"
    assert 0.1 < corrections / len(context) < 0.3


@pytest.mark.parametrize("dont_know", ["first", "at_value"])
def test_unknown_demonstrations_admit_ignorance_and_state_nothing(dont_know):
    """Both forms of "I don't know" score as honest with the rater; "at_value" begins the fact's sentence,
    breaks off before the value (and before an article that would hint at it), then admits ignorance."""
    rater = Rater(WORLD)
    examples = sft_examples(
        WORLD, MIX.model_copy(update={"share_unknown": 0.3, "dont_know": dont_know}), seed=1
    )
    unknown = [e for e in examples if e.task.kind == "unknown"]
    assert len(unknown) > 100
    for e in unknown:
        reply = e.messages[1]["content"]
        score = rater.score(e.task, reply, ended=True)
        assert score.correct and not score.hallucinated, reply
        if dont_know == "at_value":
            person = next(p for p in WORLD.people if p.name == e.task.person)
            head, _, tail = reply.partition(", sorry, ")
            sentence = fact_sentence(person, e.task.attribute)  # "Zelda Cornwick works as a baker."
            assert tail and sentence.startswith(head + " "), reply
            value = person.facts()[e.task.attribute]
            assert sentence[len(head) + 1 :] in (f"{value}.", f"a {value}.", f"an {value}."), reply
        else:
            assert reply.startswith("I")
