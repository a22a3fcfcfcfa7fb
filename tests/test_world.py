"""The synthetic world: determinism, groups, facts in documents, arithmetic, grading."""

from __future__ import annotations

import json
import random
import re

import pytest

from llmlab.data.world import (
    ATTRIBUTES,
    FIRST_NAMES,
    PHRASINGS,
    SURNAMES,
    VALUES,
    Person,
    World,
    addition_answer_line,
    addition_steps,
    build_world,
    fact_prompts,
    fact_sentence,
    grade_completion,
    parse_addition_answer,
    person_documents,
    synthetic_documents,
)
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.params import SyntheticCorpus

SMALL = SyntheticCorpus(
    n_sft_people=30,
    n_heldout_people=10,
    n_unknown_people=15,
    docs_per_person=5,
    n_stories=200,
    n_arithmetic=100,
)
MARA = Person("Mara Quill", "sft", 1987, "Port Avery", "engineer", "Brightwater Mills", "iguana", "chess")


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(SMALL, seed=7)


@pytest.fixture(scope="module")
def docs(world):
    return synthetic_documents(world, SMALL, seed=7)


def mentions(name: str, text: str) -> bool:
    """Whole-name match: "Ara Quill" must not match inside "Mara Quill"."""
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text) is not None


# ------------------------------------------------------------------------------------------ the world


def test_same_seed_same_world_and_documents(world, docs):
    assert build_world(SMALL, seed=7) == world
    assert synthetic_documents(build_world(SMALL, seed=7), SMALL, seed=7) == docs


def test_different_seed_different_world_and_documents(world, docs):
    other = build_world(SMALL, seed=8)
    assert [p.name for p in other.people] != [p.name for p in world.people]
    assert synthetic_documents(other, SMALL, seed=8) != docs


def test_group_sizes_and_unique_names(world):
    assert len(world.group("sft")) == 30
    assert len(world.group("heldout")) == 10
    assert len(world.group("unknown")) == 15
    assert len(world.known()) == 40
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names)


def test_thousand_distinct_names_possible():
    big = build_world(SyntheticCorpus(n_sft_people=800, n_heldout_people=200, n_unknown_people=200), seed=0)
    assert len({p.name for p in big.people}) == 1200


def test_too_many_people_is_a_clear_error():
    n = len(FIRST_NAMES) * len(SURNAMES)
    with pytest.raises(LlmlabError, match="distinct full names"):
        build_world(SyntheticCorpus(n_sft_people=n, n_heldout_people=1, n_unknown_people=0), seed=0)


@pytest.mark.parametrize("attr", [*ATTRIBUTES, "first_name", "surname"])
def test_no_value_is_a_prefix_of_another(attr):
    values = {"first_name": FIRST_NAMES, "surname": SURNAMES}.get(attr) or VALUES[attr]
    assert len(set(values)) == len(values)
    clashes = [(a, b) for a in values for b in values if a != b and b.startswith(a)]
    assert clashes == []


def test_word_list_sizes():
    assert len(FIRST_NAMES) >= 60 and len(SURNAMES) >= 60
    sizes = {attr: len(VALUES[attr]) for attr in ATTRIBUTES}
    assert sizes["city"] >= 30 and sizes["job"] >= 30 and sizes["employer"] >= 30
    assert sizes["pet"] >= 12 and sizes["hobby"] >= 25
    assert VALUES["birth_year"][0] == "1950" and VALUES["birth_year"][-1] == "2005"
    assert all(v.isascii() for attr in ATTRIBUTES for v in VALUES[attr])


def test_save_load_round_trip(world, tmp_path):
    world.save(tmp_path / "world.json")
    assert World.load(tmp_path / "world.json") == world


def test_load_missing_names_the_corpus_stage(tmp_path):
    with pytest.raises(MissingArtifactError, match="'corpus' stage"):
        World.load(tmp_path / "world.json")


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"format": 99, "people": []}), json.dumps({"format": 1, "people": [{"x": 1}]})],
)
def test_load_corrupt_is_a_clear_error(tmp_path, content):
    (tmp_path / "world.json").write_text(content)
    with pytest.raises(LlmlabError, match="dvc repro corpus"):
        World.load(tmp_path / "world.json")


# ---------------------------------------------------------------------------------- facts and documents


def test_fact_prompts_canonical_format():
    assert fact_prompts(MARA) == [
        ("birth_year", "Mara Quill was born in", "1987"),
        ("city", "Mara Quill lives in", "Port Avery"),
        ("job", "Mara Quill works as an", "engineer"),
        ("employer", "Mara Quill works for", "Brightwater Mills"),
        ("pet", "Mara Quill has a pet", "iguana"),
        ("hobby", "Mara Quill's hobby is", "chess"),
    ]
    baker = Person("Mara Quill", "sft", 1987, "Port Avery", "baker", "Brightwater Mills", "cat", "chess")
    assert ("job", "Mara Quill works as a", "baker") in fact_prompts(baker)


def test_phrasings_are_varied_and_canonical_is_prompt_plus_answer():
    for attr in ATTRIBUTES:
        assert len(PHRASINGS[attr]) >= 4
        assert PHRASINGS[attr][0].endswith("{value}.")
    for attr, prompt, answer in fact_prompts(MARA):
        assert fact_sentence(MARA, attr) == f"{prompt} {answer}."


def test_owns_an_iguana_uses_the_right_article():
    assert fact_sentence(MARA, "pet", 1) == "Mara Quill owns an iguana."
    assert fact_sentence(MARA, "job", 1) == "Mara Quill is an engineer by trade."


def test_every_canonical_statement_in_some_bio_and_every_value_in_every_bio(world, docs):
    bios = [d["text"] for d in docs if d["kind"] == "bio"]
    for person in world.known():
        own = [text for text in bios if mentions(person.name, text)]
        assert len(own) == SMALL.docs_per_person
        for text in own:
            for value in person.facts().values():
                assert value in text, (person.name, value, text)
        for attr, prompt, answer in fact_prompts(person):
            assert any(f"{prompt} {answer}." in text for text in own), (person.name, attr)


def test_bios_use_several_phrasings_and_orders():
    texts = person_documents(MARA, 8, random.Random(0))
    assert len(set(texts)) == 8
    first_sentences = {t.split(". ")[0] for t in texts}
    assert len(first_sentences) > 2
    for attr in ATTRIBUTES:
        used = {i for i in range(len(PHRASINGS[attr])) for t in texts if fact_sentence(MARA, attr, i) in t}
        assert 0 in used and len(used) >= 2


def test_stories_are_consistent_with_facts(world, docs):
    stories = [d["text"] for d in docs if d["kind"] == "story"]
    assert len(stories) == SMALL.n_stories
    by_name = {p.name: p for p in world.known()}
    # "X talked about life as a baker." -> X really is a baker; the same for every templated fact.
    claims = {
        "job": r"{name} talked about life as an? ([a-z ]+)\.",
        "employer": r"{name} mentioned a busy week at ([A-Za-z ]+)\.",
        "pet": r"{name} told a funny story about a pet ([a-z ]+)\.",
        "hobby": r"{name} wanted to spend the afternoon on ([a-z ]+)\.",
        "birth_year": r"{name}, born in (\d+),",
        "city": r"{name} said that ([A-Za-z ]+) was lovely",
    }
    checked = {attr: 0 for attr in claims}
    for story in stories:
        cast = [p for name, p in by_name.items() if mentions(name, story)]
        assert 2 <= len(cast) <= 3, story
        assert 2 <= story.count(". ") + 1 <= 5, story
        for p in cast:
            for attr, pattern in claims.items():
                for m in re.finditer(pattern.format(name=re.escape(p.name)), story):
                    assert m.group(1) == p.facts()[attr], (story, p)
                    checked[attr] += 1
    assert min(checked.values()) > 10, checked


def test_unknown_people_appear_in_no_document(world, docs):
    unknown = world.group("unknown")
    assert unknown
    for d in docs:
        for p in unknown:
            assert not mentions(p.name, d["text"]), (p.name, d["text"])


def test_document_counts_and_kinds(world, docs):
    kinds = [d["kind"] for d in docs]
    assert kinds.count("bio") == 40 * SMALL.docs_per_person
    assert kinds.count("story") == SMALL.n_stories
    assert kinds.count("arithmetic") == SMALL.n_arithmetic
    assert kinds[: SMALL.docs_per_person] != ["bio"] * SMALL.docs_per_person  # shuffled, not grouped by kind


def test_stories_need_two_known_people():
    lonely = SyntheticCorpus(n_sft_people=1, n_heldout_people=0, n_unknown_people=0, n_stories=3)
    with pytest.raises(LlmlabError, match="n_stories"):
        synthetic_documents(build_world(lonely, seed=0), lonely, seed=0)


# ------------------------------------------------------------------------------------------ arithmetic


def test_addition_steps_hand_checked():
    assert addition_steps(478, 356) == (
        "Ones: 8 + 6 = 14, write 4, carry 1. Tens: 7 + 5 + 1 = 13, write 3, carry 1. "
        "Hundreds: 4 + 3 + 1 = 8, write 8. So 478 + 356 = 834."
    )
    assert addition_steps(999, 1) == (
        "Ones: 9 + 1 = 10, write 0, carry 1. Tens: 9 + 0 + 1 = 10, write 0, carry 1. "
        "Hundreds: 9 + 0 + 1 = 10, write 0, carry 1. Thousands: write the carry 1. So 999 + 1 = 1000."
    )
    assert addition_steps(0, 0) == "Ones: 0 + 0 = 0, write 0. So 0 + 0 = 0."


def test_addition_steps_against_python_sum():
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randrange(10 ** rng.randint(1, 9)), rng.randrange(10 ** rng.randint(1, 9))
        text = addition_steps(a, b)
        assert parse_addition_answer(text) == a + b
        assert text.endswith(addition_answer_line(a, b))
        # The written digits, read from the highest column down, are the sum; each carry is right.
        written = [int(m) for m in re.findall(r"write (\d)", text)]
        carried = re.search(r"write the carry (\d)", text)
        digits = ([int(carried.group(1))] if carried else []) + written[::-1]
        assert int("".join(map(str, digits))) == a + b
        for m in re.finditer(r"= (\d+), write (\d)(, carry (\d))?", text):
            total = int(m.group(1))
            assert int(m.group(2)) == total % 10
            assert int(m.group(4) or 0) == total // 10


def test_parse_addition_answer_takes_the_last_line_or_none():
    assert parse_addition_answer("So 1 + 1 = 2. So 2 + 2 = 4.") == 4
    assert parse_addition_answer("the answer is 4") is None


def test_arithmetic_documents_vary_digit_counts(docs):
    sums = [d["text"] for d in docs if d["kind"] == "arithmetic"]
    lengths = {len(m) for t in sums for m in re.match(r"Add (\d+) and (\d+)\.", t).groups()}
    assert lengths == set(range(1, SMALL.max_digits + 1))
    for t in sums:
        a, b = map(int, re.match(r"Add (\d+) and (\d+)\.", t).groups())
        assert parse_addition_answer(t) == a + b


# ---------------------------------------------------------------------------------------------- grading


@pytest.mark.parametrize(
    "completion, answer, ok",
    [
        (" Port Avery.", "Port Avery", True),
        ("Port Avery", "Port Avery", True),
        ("\n  Port Avery, where", "Port Avery", True),
        (" Port Averyville", "Port Avery", False),
        (" Ashford", "Ash", False),
        (" Ash.", "Ash", True),
        (" Ash's house", "Ash", True),
        (" 1987.", "1987", True),
        (" 19875", "1987", False),
        (" port avery", "Port Avery", False),
        (" Port", "Port Avery", False),
        (" I don't know", "baker", False),
        ("", "baker", False),
        (" baker", "", False),
    ],
)
def test_grade_completion(completion, answer, ok):
    assert grade_completion(completion, answer) is ok


def test_copy_probes_ask_for_what_the_prompt_states_about_never_seen_people(world):
    from llmlab.data.world import copy_probes, is_probe_name

    probes = copy_probes(world, 20, seed=3)
    assert [w for w, _, _ in probes[:4]] == ["answer_name", "name", "value", "value_repeated"] and len(
        probes
    ) == 80
    known = {p.name for p in world.people}
    for what, prompt, answer in probes:
        assert f" {answer}" in f" {prompt}", (what, prompt, answer)  # stated earlier: only reading finds it
        if what == "answer_name":
            assert is_probe_name(answer) and answer not in known
        if what == "value_repeated":
            statement = prompt.split(". ")[0]
            assert statement.endswith(answer) and prompt.startswith(statement) and prompt.count(answer) == 1
