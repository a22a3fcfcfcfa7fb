"""The rater's labels against the model's own (Constitutional AI), from the workspace's DVC experiments.

Bai et al. (2022) claim that a model judging its replies against written principles can replace most of
the human labels RLHF needs. llmlab's rater is a gold standard, so the claim can be checked: one row per
run (the workspace and each DVC experiment), with who labelled the preference pairs, how many rater
judgments that took, how often the labels order a pair as the rater's rubric does, and what the reward
model, PPO and DPO trained on them reached:

    dvc exp run -S preferences.labeller=constitution   # the workspace's run is the rater's
    python -m llmlab.evaluation.labellers               # reports/constitution.md

(`make cai` does both.) Like the over-optimisation sweep, the table is not part of reports/report.md,
whose outputs follow from the evaluate stage's deps alone; each run's report has its own section 14.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import LlmlabError
from llmlab.evaluation.sweep import experiments_command
from llmlab.io import write_text

PARAM = "preferences.labeller"
FILES = {
    "preferences": "metrics/preferences.json",
    "reward": "metrics/reward.json",
    "ppo": "metrics/ppo.json",
    "dpo": "metrics/dpo.json",
}


@dataclass(frozen=True)
class Run:
    name: str
    labeller: str
    rater_judgments: float
    pairs: float
    label_agreement: float
    label_ci: tuple[float, float]
    reward_gold: float
    ppo_gold_gain: float
    ppo_gold_ci95: float
    invented: tuple[float, float]  # SFT, PPO: invented answers about unknown people
    dpo_gold_gain: float
    dpo_gold_ci95: float


def _metric(row: Mapping, file: str, key: str):
    """`dvc.api.exp_show` names a metric `key`, or `<file>:key` when another metrics file has it too."""
    value = row.get(f"{FILES[file]}:{key}", row.get(key))
    return float(value) if isinstance(value, (int, float)) else math.nan


def runs(rows: Iterable[Mapping]) -> list[Run]:
    """The runs of `dvc.api.exp_show()` rows that measured their labels (the workspace and experiments;
    baseline commits, which the workspace repeats, left out), rater-labelled first."""
    out = []
    for row in rows:
        if row.get("typ") == "baseline" and row.get("rev") != "workspace":
            continue
        labeller = row.get(PARAM, "rater")  # runs before the parameter existed were the rater's
        agreement = _metric(row, "preferences", "label_gold_agreement")
        judgments = _metric(row, "preferences", "rater_judgments")
        ci = (
            _metric(row, "preferences", "label_gold_agreement_ci_low"),
            _metric(row, "preferences", "label_gold_agreement_ci_high"),
        )
        if labeller == "rater" and math.isnan(agreement):  # a run made before these were measured: the
            agreement = 1 - _metric(row, "preferences", "label_flip_rate")  # rater dropped gold ties, so
            judgments = _metric(row, "preferences", "pairs")  # the flip rate is over the same pairs
        if labeller not in ("rater", "constitution") or math.isnan(agreement):
            continue  # not run yet, failed, or not a synthetic run
        out.append(
            Run(
                name=row.get("Experiment") or row.get("rev") or "?",
                labeller=labeller,
                rater_judgments=judgments,
                pairs=_metric(row, "preferences", "pairs"),
                label_agreement=agreement,
                label_ci=ci,
                reward_gold=_metric(row, "reward", "accuracy_gold"),
                ppo_gold_gain=_metric(row, "ppo", "gold_gain"),
                ppo_gold_ci95=_metric(row, "ppo", "gold_gain_ci95"),
                invented=(
                    _metric(row, "ppo", "sft/hallucination_rate"),
                    _metric(row, "ppo", "ppo/hallucination_rate"),
                ),
                dpo_gold_gain=_metric(row, "dpo", "gold_gain"),
                dpo_gold_ci95=_metric(row, "dpo", "gold_gain_ci95"),
            )
        )
    # After `dvc exp run` in the workspace (not queued), the workspace holds the last experiment's results.
    named = {(r.labeller, r.label_agreement, r.reward_gold) for r in out if r.name != "workspace"}
    out = [
        r for r in out if r.name != "workspace" or (r.labeller, r.label_agreement, r.reward_gold) not in named
    ]
    return sorted(out, key=lambda r: (r.labeller != "rater", r.name))


def _interval(ci: tuple[float, float]) -> str:
    return "" if any(math.isnan(x) for x in ci) else f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def markdown(rs: list[Run]) -> str:
    rows = [
        f"| {r.name} | {r.labeller} | {r.rater_judgments:,.0f} | {r.pairs:,.0f} "
        f"| {100 * r.label_agreement:.1f} %{_interval(r.label_ci)} "
        f"| {100 * r.reward_gold:.1f} % | {r.ppo_gold_gain:+.2f} ± {r.ppo_gold_ci95:.2f} "
        f"| {100 * r.invented[0]:.1f} % → {100 * r.invented[1]:.1f} % "
        f"| {r.dpo_gold_gain:+.2f} ± {r.dpo_gold_ci95:.2f} |"
        for r in rs
    ]
    lines = [
        "# Who labels the preference pairs: the rater, or the model under a constitution",
        "",
        f"One row per run (`{PARAM}`), from each run's metrics files. Labels agree: how often a label orders",
        "the pair as the rater's rubric does (pairs the rubric scores equal left out), with its 95 % interval.",
        "Reward model: gold agreement on held-out pairs. PPO and DPO: the gold score's gain over SFT on the",
        "ppo stage's held-out prompts. Made by `python -m llmlab.evaluation.labellers`.",
        "",
        "| run | labeller | rater judgments | pairs | labels agree with gold | reward model | PPO gold gain "
        "| invented answers, SFT → PPO | DPO gold gain |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(lines)


def write(rs: list[Run], out: Path) -> None:
    if not any(r.labeller == "constitution" for r in rs):
        raise LlmlabError(
            f"no run labelled by the model found among {len(rs)} run(s): "
            f"run `dvc exp run -S {PARAM}=constitution` first (or `make cai`)"
        )
    write_text(out, markdown(rs))


def main(argv: list[str] | None = None) -> int:
    def make(rows: list[Mapping], out: Path) -> str:
        rs = runs(rows)
        write(rs, out)
        return f"{out}: {len(rs)} runs"

    return experiments_command(argv, __doc__.splitlines()[0], "reports/constitution.md", make)


if __name__ == "__main__":
    sys.exit(main())
