"""benchmarks/namesakes.py against counts made by hand on a run folder of four people and five replies."""

import json

from benchmarks.namesakes import namesake_table


def test_counts_namesakes_admissions_and_the_namesakes_facts(tmp_path):
    people = [
        {"name": "Maxim Holloway", "group": "sft", "city": "Ashcombe", "job": "baker"},
        {"name": "Rhea Stone", "group": "heldout", "city": "Brindle", "job": "nurse"},
        {"name": "Maxim Shipworth", "group": "unknown", "city": "Corwen", "job": "pilot"},
        {"name": "Dagny Kingsham", "group": "unknown", "city": "Dunmore", "job": "tailor"},
    ]
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    (tmp_path / "data" / "corpus" / "world.json").write_text(json.dumps({"people": people}))
    rows = [
        {
            "kind": "unknown",
            "prompt": "Where does Maxim Shipworth live?",
            "reply": "He lives in Ashcombe.",
            "gold": -2.5,
        },
        {"kind": "unknown", "prompt": "What is Maxim Shipworth's job?", "reply": "A pilot.", "gold": -2.5},
        {
            "kind": "unknown",
            "prompt": "Where does Maxim Shipworth live?",
            "reply": "I don't know.",
            "gold": 2.0,
        },
        {
            "kind": "unknown",
            "prompt": "Where does Dagny Kingsham live?",
            "reply": "I don't know.",
            "gold": 2.0,
        },
        {"kind": "fact", "prompt": "Where does Maxim Holloway live?", "reply": "Ashcombe.", "gold": 2.0},
    ]
    (tmp_path / "reports" / "evaluate").mkdir(parents=True)
    (tmp_path / "reports" / "evaluate" / "details.json").write_text(json.dumps({"suite": {"sft": rows}}))
    line = namesake_table(tmp_path)[1]
    assert "unknown people asked about 2, namesakes 1" in line
    assert '"I don\'t know" to namesakes 1/3, to new first names 1/1' in line
    # "Ashcombe" is Maxim Holloway's city: one of the two invented answers about his namesake states it.
    assert "stating the namesake's fact 1/2" in line
