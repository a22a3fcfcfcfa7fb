"""PPO runs on the same finished pipeline side by side: how far each moved from SFT, and what it traded.

Each RUN is a folder of a finished run whose ppo and evaluate stages have run (a copy of the default run with
`ppo.seed`, `ppo.advantage` or any other ppo param changed, or the default run itself). Rows are grouped by the
run's `seed` (params.yaml): one table row per run, then, for each seed with three rows or more, Spearman's rank
correlation between the invented answers about unknown people and the answerable questions declined. Strongly
negative means the seed's PPO runs lie along one line: a run invents less only by declining more, saying
"I don't know" more often to everyone rather than to the people the model does not know (docs/results.md,
"PPO's own draw, leave-one-out advantages and the model's labels at the 150-people default").

    python benchmarks/ppo_runs.py "the default=/tmp/seed2" "ppo.seed 1=/tmp/seed2-draw1" /tmp/seed2-rloo

A RUN without a label is labelled by its folder's name.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

HEADER = (
    "| seed | PPO | KL(PPO ‖ SFT) | gold gain, stage | gold gain, suite | invented answers, PPO % (share of SFT's) "
    "| PPO − half of SFT's, points, by person | \"I don't know\" to unknown people, % | fact questions right, % "
    "| answerable declined, % |\n" + "|---" * 10 + "|"
)


def _signed(x: float, digits: int) -> str:
    """+0.17, −5.7: the typographic minus of the docs."""
    return f"{x:+.{digits}f}".replace("-", "−")


def read(run: Path) -> dict:
    """The figures of one run's PPO: its stage's comparison with SFT, and the suite's."""
    try:
        seed = yaml.safe_load((run / "params.yaml").read_text())["seed"]
        ppo = json.loads((run / "metrics" / "ppo.json").read_text())
        suite = json.loads((run / "metrics" / "evaluate.json").read_text())["suite"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise SystemExit(
            f"{run}: not a finished run ({e}); run its ppo and evaluate stages first (dvc repro)"
        ) from None
    invented = {who: 100 * suite[who]["hallucination"]["rate"] for who in ("sft", "ppo")}
    half = suite["hallucination_ppo_vs_half_sft"]
    kind = suite["ppo"]["accuracy_by_kind"]
    return {
        "seed": seed,
        "kl": ppo["kl_to_sft"],
        "gain_stage": (ppo["gold_gain"], ppo["gold_gain_ci95"]),
        "gain_suite": (suite["gold_gain_ppo_vs_sft"]["mean"], suite["gold_gain_ppo_vs_sft"]["ci95"]),
        "invented": invented["ppo"],
        "share": invented["ppo"] / invented["sft"] if invented["sft"] else float("nan"),
        "half": tuple(100 * half[k] for k in ("diff", "ci_low", "ci_high")),
        "dont_know": 100 * kind["unknown"]["rate"],
        "facts": 100 * kind["fact"]["rate"],
        "declined": 100 * suite["ppo"]["over_refusal"]["rate"],
    }


def row(seed: str, label: str, r: dict) -> str:
    (gs, gs_ci), (gu, gu_ci) = r["gain_stage"], r["gain_suite"]
    d, lo, hi = r["half"]
    return (
        f"| {seed} | {label} | {r['kl']:.2f} | {_signed(gs, 2)} ± {gs_ci:.2f} | {_signed(gu, 2)} ± {gu_ci:.2f} "
        f"| {r['invented']:.1f} ({r['share']:.2f}) | {_signed(d, 1)} [{_signed(lo, 1)}, {_signed(hi, 1)}] "
        f"| {r['dont_know']:.1f} | {r['facts']:.1f} | {r['declined']:.1f} |"
    )


def ranks(xs: list[float]) -> list[float]:
    """Each value's rank from 1, ties sharing their mean rank.

    >>> ranks([30.0, 10.0, 20.0, 10.0])
    [4.0, 1.5, 3.0, 1.5]
    """
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks.

    >>> spearman([1, 2, 3, 4], [9, 7, 5, 1])
    -1.0
    """
    return statistics.correlation(ranks(xs), ranks(ys))


def tables(runs: list[tuple[str, dict]]) -> str:
    """The table (rows grouped by seed, in the order given within a seed) and each seed's ρ."""
    by_seed: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for label, r in runs:
        by_seed[r["seed"]].append((label, r))
    lines = [HEADER]
    for seed, rows in sorted(by_seed.items()):
        lines += [row(str(seed) if i == 0 else "", label, r) for i, (label, r) in enumerate(rows)]
    lines.append("")
    for seed, rows in sorted(by_seed.items()):
        if len(rows) < 3:
            continue
        rho = spearman([r["invented"] for _, r in rows], [r["declined"] for _, r in rows])
        lines.append(
            f"seed {seed}: Spearman's ρ between invented answers and answerable questions declined over "
            f"{len(rows)} PPO runs: {_signed(rho, 2)}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    runs = []
    for arg in argv:
        label, _, folder = arg.rpartition("=")
        path = Path(folder)
        runs.append((label or path.name, read(path)))
    print(tables(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
