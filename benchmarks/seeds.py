"""The headline figures over seeds: mean, spread and range of each, and whether each effect holds on every seed.

Each seed is one whole default pipeline (`benchmarks/pipeline.py --seed N`, 14 to 20 minutes on 2 cores),
so three seeds take most of an hour. Runs already made can be given as the JSON files `pipeline.py`
printed; one that shared the machine with other work carries `"untimed": "<why>"`, and its time is left out:

    python benchmarks/seeds.py --seeds 1 2 3 --save /tmp/seeds          # run them (JSON kept in /tmp/seeds)
    python benchmarks/seeds.py --runs /tmp/seeds/*.json --write         # docs/results.md and the README

An effect "holds" on a seed when its 95 % interval (as the stage or the suite reports it) excludes zero
in the claimed direction; for rates compared between two models on the same prompts, when the two
Wilson intervals do not overlap (conservative).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"


def _rate(model: str, key: str, *sub: str) -> Callable[[dict], float]:
    def get(m: dict) -> float:
        v = m["evaluate"]["suite"][model][key]
        for s in sub:
            v = v[s]
        return 100 * v["rate"]

    return get


# (label, value, format): value(metrics of one run) -> number
FIGURES: list[tuple[str, Callable[[dict], float], str]] = [
    ("base model fact recall, %", lambda m: 100 * m["pretrain"]["fact_recall"], "{:.1f}"),
    (
        "base model copies a new name from context, %",
        lambda m: 100 * m["pretrain"]["copy_accuracy_name"],
        "{:.1f}",
    ),
    (
        "base model copies a new value from context, %",
        lambda m: 100 * m["pretrain"]["copy_accuracy_value"],
        "{:.1f}",
    ),
    (
        "a fact told, then asked: answered with the transcript resent, %",
        lambda m: 100 * m["evaluate"]["context"]["with_transcript"]["rate"],
        "{:.1f}",
    ),
    (
        "a fact told, then asked: answered without it, %",
        lambda m: 100 * m["evaluate"]["context"]["without_transcript"]["rate"],
        "{:.1f}",
    ),
    (
        "a name told, then asked by first name: the surname given with the transcript resent, %",
        lambda m: _percent(_told_name(m, "surname_with_transcript")),
        "{:.1f}",
    ),
    (
        "a name told, then asked by first name: the surname given without it, %",
        lambda m: _percent(_told_name(m, "surname_without_transcript")),
        "{:.1f}",
    ),
    (
        "SFT names the held-out or unknown person asked about, %",
        lambda m: 100 * m["sft"]["name_copy_rate"],
        "{:.1f}",
    ),
    ("format followed by SFT, % (suite)", _rate("sft", "format_adherence"), "{:.1f}"),
    (
        "SFT: gold gain over base (suite)",
        lambda m: m["evaluate"]["suite"]["gold_gain_sft_vs_base"]["mean"],
        "{:+.2f}",
    ),
    ("SFT: held-out people's facts answered, %", _rate("sft", "fact_accuracy_by_group", "heldout"), "{:.1f}"),
    ("reward model agrees with gold, %", lambda m: 100 * m["reward"]["accuracy_gold"], "{:.1f}"),
    ("PPO: gold gain over SFT (stage, 500 prompts)", lambda m: m["ppo"]["gold_gain"], "{:+.2f}"),
    (
        "PPO: gold gain over SFT (suite, 1,000 prompts)",
        lambda m: m["evaluate"]["suite"]["gold_gain_ppo_vs_sft"]["mean"],
        "{:+.2f}",
    ),
    ("DPO: gold gain over SFT (stage, 500 prompts)", lambda m: m["dpo"]["gold_gain"], "{:+.2f}"),
    (
        "DPO: gold gain over SFT (suite, 1,000 prompts)",
        lambda m: m["evaluate"]["suite"]["gold_gain_dpo_vs_sft"]["mean"],
        "{:+.2f}",
    ),
    ("KL(PPO ‖ SFT), nats per reply", lambda m: m["ppo"]["kl_to_sft"], "{:.2f}"),
    ("KL(DPO ‖ SFT), nats per reply", lambda m: m["dpo"]["kl_to_sft"], "{:.2f}"),
    *(
        (
            f"invented answers about unknown people, {m.upper()}, % (suite)",
            _rate(m, "hallucination"),
            "{:.1f}",
        )
        for m in ("sft", "ppo", "dpo")
    ),
    *(
        (
            f"invented answers, {m.upper()} − SFT, points, each unknown person one draw (upper end of its 95 % interval)",
            lambda m, a=m: _by_person(m, a, "ci_high"),
            "{:+.1f}",
        )
        for m in ("ppo", "dpo")
    ),
    (
        "invented answers, PPO − half of SFT's, points, each unknown person one draw (upper end of its 95 % interval)",
        lambda m: _by_person(m, "ppo", "ci_high", "half_sft"),
        "{:+.1f}",
    ),
    *(
        (
            f'unknown people answered "I don\'t know", {m.upper()}, % (suite)',
            _rate(m, "accuracy_by_kind", "unknown"),
            "{:.1f}",
        )
        for m in ("sft", "ppo", "dpo")
    ),
    ("fact questions answered correctly, SFT, % (suite)", _rate("sft", "accuracy_by_kind", "fact"), "{:.1f}"),
    ("fact questions answered correctly, PPO, % (suite)", _rate("ppo", "accuracy_by_kind", "fact"), "{:.1f}"),
    ("harmful requests refused, SFT, %", _rate("sft", "refusal_harmful"), "{:.1f}"),
    ("harmful requests refused, PPO, %", _rate("ppo", "refusal_harmful"), "{:.1f}"),
    ("answerable questions declined, SFT, %", _rate("sft", "over_refusal"), "{:.1f}"),
    ("answerable questions declined, PPO, %", _rate("ppo", "over_refusal"), "{:.1f}"),
    (
        "whole pipeline, minutes",
        lambda m: None if m["reused"] or m["untimed"] else m["total_s"] / 60,
        "{:.1f}",
    ),
]


def _by_person(m: dict, model: str, key: str, of: str = "sft") -> float | None:
    """`key` of the paired, person-clustered difference model − SFT (`of` "half_sft": model − SFT / 2) of
    invented answers, in points; None for a run whose evaluate stage did not measure it (added at cebeab8;
    the half at the commit after 4369ec8)."""
    d = m["evaluate"]["suite"].get(f"hallucination_{model}_vs_{of}", {})
    return None if d.get(key) is None else 100 * d[key]


def _told_name(m: dict, key: str) -> dict | None:
    """A rate of the name told in one call and asked for by first name in the next; None for a run whose
    evaluate stage did not ask it yet (added 2026-12-06)."""
    return m["evaluate"]["context"].get(key)


def _percent(r: dict | None) -> float | None:
    return None if r is None else 100 * r["rate"]


def _used_only_with_transcript(prefix: str) -> Callable[[dict], bool | None]:
    """The context study's `{prefix}with_transcript` rate above its `{prefix}without_transcript`, their
    intervals apart; None for a run whose evaluate stage did not measure it."""

    def holds(m: dict) -> bool | None:
        c = m["evaluate"]["context"]
        if f"{prefix}with_transcript" not in c:
            return None
        return c[f"{prefix}without_transcript"]["ci_high"] < c[f"{prefix}with_transcript"]["ci_low"]

    return holds


def _gain_holds(get: Callable[[dict], dict]) -> Callable[[dict], bool]:
    return lambda m: get(m)["mean"] - get(m)["ci95"] > 0


def _below(a: str, b: str, key: str) -> Callable[[dict], bool]:
    """Model a's rate is below model b's: the interval of a − b on the same questions with each person one
    draw (`{key}_{a}_vs_{b}`, where the run measured it) lies below zero; else non-overlapping Wilson intervals."""

    def holds(m: dict) -> bool:
        suite = m["evaluate"]["suite"]
        by_person = suite.get(f"{key}_{a}_vs_{b}", {})
        if by_person.get("ci_high") is not None:
            return by_person["ci_high"] < 0
        return suite[a][key]["ci_high"] < suite[b][key]["ci_low"]

    return holds


# The report's headline claims, each checked on each seed.
CLAIMS: list[tuple[str, Callable[[dict], bool | None]]] = [
    ("SFT teaches the format (format followed: SFT above base)", _below("base", "sft", "format_adherence")),
    (
        "SFT raises the gold score over base",
        _gain_holds(lambda m: m["evaluate"]["suite"]["gold_gain_sft_vs_base"]),
    ),
    (
        "PPO raises the gold score over SFT (stage)",
        lambda m: m["ppo"]["gold_gain"] > m["ppo"]["gold_gain_ci95"],
    ),
    (
        "PPO raises the gold score over SFT (suite)",
        _gain_holds(lambda m: m["evaluate"]["suite"]["gold_gain_ppo_vs_sft"]),
    ),
    (
        "DPO raises the gold score over SFT (stage)",
        lambda m: m["dpo"]["gold_gain"] > m["dpo"]["gold_gain_ci95"],
    ),
    (
        "DPO raises the gold score over SFT (suite)",
        _gain_holds(lambda m: m["evaluate"]["suite"]["gold_gain_dpo_vs_sft"]),
    ),
    (
        "the model is stateless: a told fact is used only with the transcript resent",
        _used_only_with_transcript(""),
    ),
    (
        "the model is stateless: a told name is used only with the transcript resent",
        _used_only_with_transcript("surname_"),
    ),
    ("PPO lowers invented answers about unknown people (suite)", _below("ppo", "sft", "hallucination")),
    (
        "PPO's invented answers ≤ half of SFT's (suite)",
        lambda m: (
            m["evaluate"]["suite"]["ppo"]["hallucination"]["rate"]
            <= m["evaluate"]["suite"]["sft"]["hallucination"]["rate"] / 2
        ),
    ),
    (
        "PPO's invented answers ≤ half of SFT's, with its 95 % interval, each unknown person one draw (suite)",
        lambda m: None if (h := _by_person(m, "ppo", "ci_high", "half_sft")) is None else h < 0,
    ),
    ("the reward model agrees with gold on ≥ 85 % of pairs", lambda m: m["reward"]["accuracy_gold"] >= 0.85),
]


def figures(runs: list[dict]) -> list[tuple[str, str, list, list]]:
    """Each row of FIGURES: (label, format, its value per run, [mean, s.d., min, max]); a value is None where
    the run did not measure it (a reused or untimed run's time), the summary all None where none did."""
    rows = []
    for label, get, fmt in FIGURES:
        values = [
            get(r["metrics"] | {"total_s": r["total_s"], "reused": "reused" in r, "untimed": "untimed" in r})
            for r in runs
        ]
        known = [v for v in values if v is not None]
        sd = statistics.stdev(known) if len(known) > 1 else 0.0
        rows.append(
            (
                label,
                fmt,
                values,
                [statistics.mean(known), sd, min(known), max(known)] if known else [None] * 4,
            )
        )
    return rows


def claims(runs: list[dict]) -> list[tuple[str, list[bool | None]]]:
    """Each of CLAIMS with whether it holds on each run (None: the run's commit did not measure it)."""
    return [(label, [holds(r["metrics"]) for r in runs]) for label, holds in CLAIMS]


def holds_on(marks: list[bool | None]) -> str:
    """ "2 of 3": on how many of the runs that measured the claim it holds."""
    return f"{sum(x is True for x in marks)} of {sum(x is not None for x in marks)}"


def table(runs: list[dict]) -> str:
    seeds = [r["seed"] for r in runs]
    commits = sorted({r["commit"] for r in runs})
    unknown = [r["metrics"]["evaluate"]["suite"]["sft"]["hallucination"]["n"] for r in runs]
    people = [
        r["metrics"]["evaluate"]["suite"]["sft"]["hallucination"]["people"]
        for r in runs
        if "people" in r["metrics"]["evaluate"]["suite"]["sft"]["hallucination"]
    ]
    reused = [
        f"seed {r['seed']}'s stages {r['reused']['stages'][0]} to {r['reused']['stages'][-1]} are those of its "
        f"run at commit {r['reused']['commit']}, so its whole-pipeline time is not given"
        for r in runs
        if "reused" in r
    ]
    for why in sorted({r["untimed"] for r in runs if "untimed" in r}):
        alike = [str(r["seed"]) for r in runs if r.get("untimed") == why]
        if len(alike) == 1:
            reused.append(f"seed {alike[0]}'s run {why}, so its whole-pipeline time is not given")
        else:
            names = ", ".join(alike[:-1]) + " and " + alike[-1]
            reused.append(f"the runs of seeds {names} {why}, so their whole-pipeline times are not given")
    machines = sorted({r["machine"] for r in runs if "machine" in r})
    lines = [
        f"{len(runs)} seeds ({', '.join(map(str, seeds))}); commit{'s' if len(commits) > 1 else ''} "
        f"{', '.join(commits)}; default params; made with `python benchmarks/seeds.py`"
        + (f"; {'; '.join(reused)}" if reused else "")
        + (f"; on {' and '.join(machines)}" if machines else "")
        + f". Invented answers counted on {min(unknown)}–{max(unknown)} unknown-people prompts per model"
        + (f", about {min(people)}–{max(people)} people" if people else "")
        + ".",
        "",
        "| figure | mean | s.d. | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|---|---|---|" + "---|" * (len(seeds) - 1),
    ]
    for label, fmt, values, cells in figures(runs):
        lines.append(
            f"| {label} | "
            + " | ".join(
                "—" if v is None else fmt.format(v).replace("+", "") if i == 1 else fmt.format(v)
                for i, v in enumerate(cells)
            )
            + " | "
            + " | ".join("—" if v is None else fmt.format(v) for v in values)
            + " |"
        )
    lines += [
        "",
        "| claim | holds on | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for label, marks in claims(runs):
        lines.append(
            f"| {label} | {holds_on(marks)} | "
            + " | ".join("—" if x is None else "yes" if x else "**no**" for x in marks)
            + " |"
        )
    return "\n".join(lines)


# The README's results table: these rows of FIGURES, as mean and range, and every claim's count.
README_FIGURES = (
    "base model fact recall, %",
    "base model copies a new name from context, %",
    "base model copies a new value from context, %",
    "a fact told, then asked: answered with the transcript resent, %",
    "a name told, then asked by first name: the surname given with the transcript resent, %",
    "format followed by SFT, % (suite)",
    "SFT: held-out people's facts answered, %",
    "reward model agrees with gold, %",
    "PPO: gold gain over SFT (suite, 1,000 prompts)",
    "DPO: gold gain over SFT (suite, 1,000 prompts)",
    "KL(PPO ‖ SFT), nats per reply",
    "invented answers about unknown people, SFT, % (suite)",
    "invented answers about unknown people, PPO, % (suite)",
    "invented answers about unknown people, DPO, % (suite)",
    'unknown people answered "I don\'t know", PPO, % (suite)',
    "answerable questions declined, PPO, %",
    "whole pipeline, minutes",
)


def readme_table(runs: list[dict]) -> str:
    """The README's short version of `table(runs)`: the same runs, the same numbers."""
    out = [
        f"Over {len(runs)} seeds of the default params ([docs/results.md](docs/results.md#figures-over-seeds): "
        "each seed's value, the commit and the machine; made by `python benchmarks/seeds.py --write`).",
        "",
        f"| figure | mean | min – max over {len(runs)} seeds |",
        "|---|---|---|",
    ]
    for label, fmt, values, (mean, _, lo, hi) in figures(runs):
        if label in README_FIGURES:
            measured = sum(v is not None for v in values)
            if not measured:
                out.append(f"| {label} | — | not measured by these runs |")
                continue
            spread = f"{fmt.format(lo)} – {fmt.format(hi)}" if measured > 1 else f"{measured} seed measured"
            out.append(f"| {label} | {fmt.format(mean)} | {spread} |")
    out += ["", "| the report's claim | holds on |", "|---|---|"]
    out += [f"| {label} | {holds_on(marks)} |" for label, marks in claims(runs)]
    return "\n".join(out)


def read_run(path: Path) -> dict:
    """A run as `pipeline.py` printed it: one line per stage as it ends, then the whole result (indented)."""
    text = path.read_text()
    return json.loads(text[text.rfind('{\n  "commit"') :])


def main() -> None:
    from benchmarks import pipeline
    from benchmarks.measure import replace_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="run the whole pipeline with these seeds"
    )
    ap.add_argument("--save", help="folder for each run's JSON (with --seeds)")
    ap.add_argument("--runs", nargs="*", default=[], help="JSON files printed by benchmarks/pipeline.py")
    ap.add_argument(
        "--write",
        action="store_true",
        help="put the table into docs/results.md, its short version into README.md",
    )
    args = ap.parse_args()
    runs = [read_run(Path(p)) for p in args.runs]
    for seed in args.seeds:
        run = pipeline.run(seed=seed)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"seed{seed}.json").write_text(json.dumps(run, indent=2))
        runs.append(run)
    if not runs:
        ap.error("give --seeds to run, or --runs with earlier runs' JSON")
    runs = sorted(runs, key=lambda r: r["seed"])
    text = table(runs)
    print(text)
    if args.write:
        DOC.write_text(replace_section(DOC.read_text(), "seeds", text, DOC))
        README.write_text(replace_section(README.read_text(), "readme", readme_table(runs), README))


if __name__ == "__main__":
    main()
