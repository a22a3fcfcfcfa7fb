"""Over-optimisation across a sweep of PPO's KL coefficient β, from the workspace's DVC experiments.

Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization") plot, against √KL between the tuned
policy and its start, the score of the reward model being optimised (the proxy) and the score of the
gold rater it imitates. The proxy keeps rising; the gold score rises, peaks and falls once the policy
exploits the reward model's mistakes. llmlab's rater is that gold standard, so every point is measured.

A smaller β lets PPO move further from SFT. One point per DVC experiment, read from `metrics/ppo.json`
(the ppo stage compares PPO and SFT on 500 held-out prompts: `kl_to_sft`, `reward_gain`, `gold_gain`). The
experiments hold β fixed (`ppo.kl_target` null): the default's KL budget would stop the very drift the
sweep is there to show. The workspace's run is the 0.3 point, within its budget:

    dvc exp run ppo --queue -S 'ppo.kl_coef=0.01,0.03,0.1,1.0' -S ppo.kl_target=null
    dvc exp run --run-all
    python -m llmlab.evaluation.sweep                            # reports/overoptimisation.{md,png}

(`make sweep` does the three.) The figure is not part of reports/report.md: the evaluate stage's outputs
follow from its deps alone, and experiments are not among them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import LlmlabError
from llmlab.io import atomic_path, write_text

PARAM = "ppo.kl_coef"
METRICS = "metrics/ppo.json"


@dataclass(frozen=True)
class Point:
    name: str  # the experiment's name, or "workspace"
    beta: float
    kl: float  # KL(PPO ‖ SFT), nats per reply, on the held-out prompts
    reward_gain: float  # reward-model score, PPO − SFT
    gold_gain: float  # gold rater's score, PPO − SFT
    gold_ci95: float


def _metric(row: Mapping, key: str):
    """`dvc.api.exp_show` names a metric `key`, or `metrics/ppo.json:key` when another file has it too."""
    return row.get(f"{METRICS}:{key}", row.get(key))


def points(rows: Iterable[Mapping]) -> list[Point]:
    """The sweep's points from `dvc.api.exp_show()` rows: the workspace and every experiment with PPO's
    metrics, sorted by KL. Baseline commits are left out (the workspace repeats the newest)."""
    out = []
    for row in rows:
        if row.get("typ") == "baseline" and row.get("rev") != "workspace":
            continue
        values = [row.get(PARAM), *(_metric(row, k) for k in ("kl_to_sft", "reward_gain", "gold_gain"))]
        if any(not isinstance(v, (int, float)) for v in values):
            continue  # not run yet, failed, or made before the ppo stage reported these
        beta, kl, reward, gold = values
        ci = _metric(row, "gold_gain_ci95")
        name = row.get("Experiment") or row.get("rev") or "?"
        out.append(Point(name, float(beta), float(kl), float(reward), float(gold), float(ci or 0.0)))
    # After `dvc exp run` in the workspace (not queued), the workspace holds the last experiment's results:
    # one point, under the experiment's name.
    named = {(p.beta, p.kl, p.reward_gain, p.gold_gain) for p in out if p.name != "workspace"}
    out = [p for p in out if p.name != "workspace" or (p.beta, p.kl, p.reward_gain, p.gold_gain) not in named]
    return sorted(out, key=lambda p: p.kl)


def markdown(pts: list[Point], figure: str) -> str:
    rows = [
        f"| {p.name} | {p.beta:g} | {p.kl:.2f} | {math.sqrt(max(p.kl, 0)):.2f} | {p.reward_gain:+.2f} "
        f"| {p.gold_gain:+.2f} ± {p.gold_ci95:.2f} |"
        for p in pts
    ]
    best = max(pts, key=lambda p: p.gold_gain)
    furthest = pts[-1]
    if best is pts[0] and len(pts) > 1:
        verdict = (
            f"The gold gain is highest at the smallest KL of the sweep (β {best.beta:g}, {best.gold_gain:+.2f}) and "
            f"falls to {furthest.gold_gain:+.2f} at the furthest (β {furthest.beta:g}, √KL "
            f"{math.sqrt(furthest.kl):.2f}), while the reward model's gain rises to {furthest.reward_gain:+.2f}: "
            "past the peak already; a larger β would show the rise before it."
        )
    elif furthest is best:
        verdict = (
            "The gold score is highest at the largest KL of the sweep: no peak within this range; "
            "a smaller β would move further."
        )
    else:
        verdict = (
            f"The gold gain peaks at β {best.beta:g} (√KL {math.sqrt(best.kl):.2f}, {best.gold_gain:+.2f}) and "
            f"is {furthest.gold_gain:+.2f} at the furthest point (β {furthest.beta:g}, √KL "
            f"{math.sqrt(furthest.kl):.2f}), where the reward model's gain is {furthest.reward_gain:+.2f}."
        )
    return "\n".join(
        [
            "# Over-optimisation: the reward model's score and the gold score against √KL",
            "",
            f"One point per DVC experiment (`{PARAM}` swept); from each run's `{METRICS}` (PPO − SFT on",
            "the ppo stage's held-out prompts, greedy replies). Made by `python -m llmlab.evaluation.sweep`.",
            "",
            f"![over-optimisation]({figure})",
            "",
            "| experiment | β | KL to SFT | √KL | reward-model gain | gold gain (95 % CI) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            verdict,
            "",
        ]
    )


def plot(pts: list[Point], path: Path) -> None:
    import matplotlib  # here: Agg must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [math.sqrt(max(p.kl, 0.0)) for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [p.reward_gain for p in pts], "o-", label="reward-model score (optimised)")
    gold, ci = [p.gold_gain for p in pts], [p.gold_ci95 for p in pts]
    ax.errorbar(x, gold, yerr=ci, fmt="s-", capsize=3, label="gold score (rater, never seen)")
    for p, xi in zip(pts, x, strict=True):
        ax.annotate(
            f"β {p.beta:g}", (xi, p.gold_gain), textcoords="offset points", xytext=(4, -12), fontsize=8
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("√KL(PPO ‖ SFT)  (KL in nats per reply)")
    ax.set_ylabel("gain over SFT")
    ax.set_title("Over-optimisation across PPO's β")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write(pts: list[Point], out: Path) -> None:
    """`out`.md (table and verdict) and `out`.png (the figure), beside each other."""
    if len(pts) < 2:
        raise LlmlabError(
            f"the over-optimisation figure needs at least 2 runs with {METRICS}, found {len(pts)}: "
            f"queue a sweep with `dvc exp run ppo --queue -S '{PARAM}=0.03,0.1,1.0'`, then `dvc exp run --run-all`"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(pts, out.with_suffix(".png"))
    write_text(out.with_suffix(".md"), markdown(pts, out.with_suffix(".png").name))


def experiments_command(
    argv: list[str] | None, description: str, default_out: str, make: Callable[[list[Mapping], Path], str]
) -> int:
    """A command that turns the DVC experiments of `--repo` into a report at `--out`: `make(rows, out)`
    writes it from `dvc.api.exp_show` rows and says what it wrote; an LlmlabError is one line, exit 1."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--repo", default=".", help="the DVC repository whose experiments to read (default: .)")
    ap.add_argument("--out", default=default_out, help="where to write (default: %(default)s)")
    args = ap.parse_args(argv)
    import dvc.api  # here: DVC takes a second to import, and only these commands need it

    try:
        print(make(dvc.api.exp_show(repo=args.repo), Path(args.out)))
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    def make(rows: list[Mapping], out: Path) -> str:
        pts = points(rows)
        write(pts, out)
        return f"{out}.md, {out}.png: {len(pts)} runs"

    return experiments_command(argv, __doc__.splitlines()[0], "reports/overoptimisation", make)


if __name__ == "__main__":
    sys.exit(main())
