"""Invented answers about unknown people, each person one draw: for each model of a finished run, the suite's
rate with its Wilson interval (questions as draws) and its interval by person; for PPO and DPO, the paired,
person-clustered difference from SFT, and the same for the model's rate minus half of SFT's (below zero with
its interval: the halving is shown, not only measured). Reads `reports/evaluate/details.json` and
`data/corpus/world.json`, and grades the replies again with the rater, so runs made before the evaluate stage
counted by person (cebeab8) are read too (docs/results.md, "Invented answers, each person one draw").

    python benchmarks/invented_by_person.py RUN [RUN ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmlab.data.tasks import Task
from llmlab.data.world import World
from llmlab.evaluation.measurements import rate_by_cluster, rate_diff_by_cluster
from llmlab.evaluation.rater import Rater


def invented(run: Path) -> tuple[dict[str, list[bool]], list[str]]:
    """Each model's invented-or-not per question about an unknown person, and the person of each question."""
    details = json.loads((run / "reports" / "evaluate" / "details.json").read_text())
    world = World.load(run / "data" / "corpus" / "world.json")
    rater = Rater(world)
    unknown = [p.name for p in world.group("unknown")]
    flags, people = {}, []
    for model, rows in details["suite"].items():
        rows = [r for r in rows if r["kind"] == "unknown"]
        names = [
            max((n for n in unknown if n in r["prompt"]), key=len) for r in rows
        ]  # the longest: a name may hold another
        flags[model] = [
            rater.score(Task("unknown", r["prompt"], person=n), r["reply"], r["ended"]).hallucinated
            for r, n in zip(rows, names, strict=True)
        ]
        people = names  # the same questions, in the same order, for every model
    return flags, people


def lines(run: Path) -> list[str]:
    flags, people = invented(run)
    out = [f"{run}: {len(people)} questions about {len(set(people))} unknown people"]
    for model, f in flags.items():
        r = rate_by_cluster(f, people)
        out.append(
            f"  {model}: {100 * r['rate']:.1f} %, Wilson [{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}], "
            f"by person [{100 * r['ci_low_people']:.1f}–{100 * r['ci_high_people']:.1f}]"
        )
    for model in ("ppo", "dpo"):
        if model not in flags or "sft" not in flags:
            continue
        d = rate_diff_by_cluster(flags[model], flags["sft"], people)
        h = rate_diff_by_cluster(flags[model], flags["sft"], people, scale_b=0.5)
        out.append(
            f"  {model} − sft: {100 * d['diff']:+.1f} points [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]; "
            f"{model} − sft / 2: {100 * h['diff']:+.1f} points [{100 * h['ci_low']:+.1f}, {100 * h['ci_high']:+.1f}]"
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print("\n".join(lines(Path(arg))))
