"""Unknown people with a known person's first name ("namesakes"): how each model answers them in the evaluate
stage's suite, against unknown people whose first name is new, and how often an invented answer about a
namesake states the fact of the known person of that first name (against a random known person's, as chance).
Reads a finished run's `reports/evaluate/details.json` and `data/corpus/world.json` (docs/results.md,
"Namesakes").

    python benchmarks/namesakes.py RUN [RUN ...]
"""

import json
import random
import sys
from collections import Counter
from pathlib import Path


def first_name(name: str) -> str:
    return name.split(" ", 1)[0]


def facts(person: dict) -> list[str]:
    return [str(v) for k, v in person.items() if k not in ("name", "group")]


def namesake_table(run: Path) -> list[str]:
    details = json.loads((run / "reports" / "evaluate" / "details.json").read_text())
    people = json.loads((run / "data" / "corpus" / "world.json").read_text())["people"]
    known = [p for p in people if p["group"] in ("sft", "heldout")]
    by_first = {first_name(p["name"]): p for p in known}
    unknown = [p["name"] for p in people if p["group"] == "unknown"]
    rng = random.Random(0)
    lines = [f"{run}:"]
    for model, rows in details["suite"].items():
        c: Counter = Counter()
        asked: set[str] = set()
        for r in rows:
            if r["kind"] != "unknown":
                continue
            name = next(n for n in unknown if n in r["prompt"])
            asked.add(name)
            namesake = by_first.get(first_name(name))
            admits = r["gold"] > 0  # the rater: an "I don't know" phrase and no value
            c["questions", namesake is not None] += 1
            c["admits", namesake is not None] += admits
            if namesake and not admits:
                c["invented"] += 1
                c["fact"] += any(v in r["reply"] for v in facts(namesake))
                c["chance"] += (
                    sum(any(v in r["reply"] for v in facts(rng.choice(known))) for _ in range(50)) / 50
                )
        lines.append(
            f"  {model}: unknown people asked about {len(asked)}, namesakes {sum(first_name(n) in by_first for n in asked)}"
            f' · "I don\'t know" to namesakes {c["admits", True]}/{c["questions", True]},'
            f" to new first names {c['admits', False]}/{c['questions', False]}"
            f" · invented answers about namesakes stating the namesake's fact {c['fact']}/{c['invented']}"
            f" (a random known person's: {c['chance'] / max(c['invented'], 1):.0%})"
        )
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print("\n".join(namesake_table(Path(arg))))
