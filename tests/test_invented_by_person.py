"""benchmarks/invented_by_person.py against counts made by hand: three unknown people, two questions each."""

import json

from benchmarks.invented_by_person import lines
from llmlab.data.world import build_world
from llmlab.params import SyntheticCorpus


def test_rates_by_person_and_the_paired_differences(tmp_path):
    world = build_world(SyntheticCorpus(n_sft_people=2, n_heldout_people=0, n_unknown_people=3), seed=0)
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    world.save(tmp_path / "data" / "corpus" / "world.json")
    known, unknown = world.known()[0], world.group("unknown")
    invent = lambda p: f"{p.name} lives in {known.city}."  # noqa: E731 (a value stated: invented)
    admit = lambda p: f"I don't know who {p.name} is."  # noqa: E731

    def rows(replies):
        return [
            {
                "kind": "unknown",
                "prompt": f"Where does {p.name} live?",
                "reply": r(p),
                "ended": True,
                "gold": 0,
            }
            for p in unknown
            for r in replies[p.name]
        ]

    a, b, c = (p.name for p in unknown)
    sft = rows({a: [invent, invent], b: [invent, invent], c: [invent, admit]})  # 5 of 6
    ppo = rows({a: [admit, admit], b: [invent, admit], c: [admit, admit]})  # 1 of 6
    (tmp_path / "reports" / "evaluate").mkdir(parents=True)
    (tmp_path / "reports" / "evaluate" / "details.json").write_text(
        json.dumps({"suite": {"sft": sft, "ppo": ppo}})
    )
    out = lines(tmp_path)
    assert out[0].endswith("6 questions about 3 unknown people")
    assert out[1].startswith("  sft: 83.3 %") and out[2].startswith("  ppo: 16.7 %")
    # per person, ppo − sft: −2, −1, −1 hits of 2; the difference −4/6, the halving 1/6 − 5/12 = −3/12
    assert "ppo − sft: -66.7 points" in out[3] and "ppo − sft / 2: -25.0 points" in out[3]
