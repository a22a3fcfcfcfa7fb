"""benchmarks/seeds.py: the results-over-seeds table, from runs' metrics made up here."""

from __future__ import annotations

import pytest

from benchmarks.measure import replace_section
from benchmarks.seeds import readme_table, table


def rate(r: float, half_width: float = 0.05, n: int = 150) -> dict:
    return {"rate": r, "ci_low": r - half_width, "ci_high": r + half_width, "n": n}


def model(hallucination: float, formatted: float) -> dict:
    return {
        "format_adherence": rate(formatted),
        "fact_accuracy_by_group": {"heldout": rate(0.7)},
        "hallucination": rate(hallucination),
        "accuracy_by_kind": {"fact": rate(0.8), "unknown": rate(0.1)},
        "refusal_harmful": rate(0.9),
        "over_refusal": rate(0.03),
    }


def run(
    seed: int, rm_gold: float, ppo_gain: float, ppo_hallucination: float, told: float = 0.5, **extra
) -> dict:
    gain = {"mean": 0.3, "ci95": 0.1}
    return {
        "seed": seed,
        "commit": "abc1234",
        "total_s": 600.0,
        "machine": "Some CPU with AVX-512",
        **extra,
        "metrics": {
            "pretrain": {"fact_recall": 0.95, "copy_accuracy_name": 0.96, "copy_accuracy_value": 0.1},
            "sft": {"name_copy_rate": 0.9},
            "reward": {"accuracy_gold": rm_gold},
            "ppo": {"gold_gain": ppo_gain, "gold_gain_ci95": 0.1, "kl_to_sft": 1.0},
            "dpo": {"gold_gain": 0.3, "gold_gain_ci95": 0.1, "kl_to_sft": 2.0},
            "evaluate": {
                "context": {"with_transcript": rate(told), "without_transcript": rate(0.02)},
                "suite": {
                    "base": model(0.9, 0.1),
                    "sft": model(0.8, 0.99),
                    "ppo": model(ppo_hallucination, 0.99),
                    "dpo": model(0.8, 0.99),
                    "gold_gain_sft_vs_base": gain,
                    "gold_gain_ppo_vs_sft": gain,
                    "gold_gain_dpo_vs_sft": gain,
                },
            },
        },
    }


def row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_mean_spread_per_seed_values_and_each_claim_checked_on_each_seed():
    text = table(
        [
            run(1, rm_gold=0.84, ppo_gain=0.30, ppo_hallucination=0.35),
            run(2, 0.86, ppo_gain=0.05, ppo_hallucination=0.70, told=0.05, untimed="shared the machine"),
        ]
    )
    assert row(text, "reward model agrees with gold, %") == ["85.0", "1.4", "84.0", "86.0", "84.0", "86.0"]
    assert row(text, "PPO: gold gain over SFT (stage, 500 prompts)") == [
        "+0.17",
        "0.18",
        "+0.05",
        "+0.30",
        "+0.30",
        "+0.05",
    ]
    # an untimed run's time is left out of the figure, and the header says why
    assert row(text, "whole pipeline, minutes") == ["10.0", "0.0", "10.0", "10.0", "10.0", "—"]
    assert "seed 2's run shared the machine, so its whole-pipeline time is not given" in text
    assert "on Some CPU with AVX-512" in text
    # gain 0.30 ± 0.10 holds, 0.05 ± 0.10 does not; invented answers 35 % ≤ half of 80 %, 70 % is not
    assert row(text, "PPO raises the gold score over SFT (stage)") == ["1 of 2", "yes", "**no**"]
    assert row(text, "PPO's invented answers ≤ half of SFT's (suite)") == ["1 of 2", "yes", "**no**"]
    assert row(text, "the reward model agrees with gold on ≥ 85 % of pairs") == ["1 of 2", "**no**", "yes"]
    # a told fact: 50 % ± 5 with the transcript against 2 % ± 5 without holds; 5 % against 2 % does not
    assert row(text, "the model is stateless: a told fact is used only with the transcript resent") == [
        "1 of 2",
        "yes",
        "**no**",
    ]
    assert row(text, "a fact told, then asked: answered with the transcript resent, %")[-2:] == [
        "50.0",
        "5.0",
    ]


def test_a_claim_a_run_did_not_measure_counts_only_the_runs_that_did():
    name = {"surname_with_transcript": rate(0.3), "surname_without_transcript": rate(0.0, 0.01)}
    older = run(2, 0.84, 0.3, 0.3)
    newer = run(1, 0.84, 0.3, 0.3)
    newer["metrics"]["evaluate"]["context"] |= name
    text = table([newer, older])
    claim = "the model is stateless: a told name is used only with the transcript resent"
    assert row(text, claim) == ["1 of 1", "yes", "—"]
    assert row(
        text, "a name told, then asked by first name: the surname given with the transcript resent, %"
    )[-3:] == ["30.0", "30.0", "—"]
    assert f"| {claim} | 1 of 1 |" in readme_table([newer, older])


def test_invented_answers_lowered_is_judged_by_person_where_the_run_measured_it():
    """PPO 72 % ± 5 against SFT 80 % ± 5: the Wilson intervals overlap. Seed 1's paired, person-clustered
    difference lies below zero and decides; seed 2 has no such figure, so the Wilson intervals do."""
    paired = run(1, 0.84, 0.3, ppo_hallucination=0.72)
    paired["metrics"]["evaluate"]["suite"]["hallucination_ppo_vs_sft"] = {
        "diff": -0.08,
        "ci_low": -0.12,
        "ci_high": -0.04,
        "n": 150,
        "people": 25,
    }
    text = table([paired, run(2, 0.84, 0.3, ppo_hallucination=0.72)])
    assert row(text, "PPO lowers invented answers about unknown people (suite)") == [
        "1 of 2",
        "yes",
        "**no**",
    ]
    label = (
        "invented answers, PPO − SFT, points, each unknown person one draw (upper end of its 95 % interval)"
    )
    assert row(text, label)[-2:] == ["-4.0", "—"]


def test_halving_with_its_interval_is_counted_only_on_runs_that_measured_it():
    """PPO 35 % against SFT 80 %: halved by the point estimate on both seeds; seed 1's paired difference from
    half of SFT's rate reaches above zero, so the halving is not shown with its interval there; seed 2 did
    not measure it."""
    paired = run(1, 0.84, 0.3, ppo_hallucination=0.35)
    paired["metrics"]["evaluate"]["suite"]["hallucination_ppo_vs_half_sft"] = {
        "diff": -0.05,
        "ci_low": -0.12,
        "ci_high": 0.02,
        "n": 150,
        "people": 75,
    }
    text = table([paired, run(2, 0.84, 0.3, ppo_hallucination=0.35)])
    assert row(text, "PPO's invented answers ≤ half of SFT's (suite)")[:3] == ["2 of 2", "yes", "yes"]
    claim = (
        "PPO's invented answers ≤ half of SFT's, with its 95 % interval, each unknown person one draw (suite)"
    )
    assert row(text, claim) == ["0 of 1", "**no**", "—"]
    label = "invented answers, PPO − half of SFT's, points, each unknown person one draw (upper end of its 95 % interval)"
    assert row(text, label)[-2:] == ["+2.0", "—"]


def test_runs_left_untimed_for_the_same_reason_are_named_together():
    why = "shared the machine"
    text = table([run(s, 0.84, 0.3, 0.3, untimed=why) for s in (1, 2, 3)])
    assert (
        "the runs of seeds 1, 2 and 3 shared the machine, so their whole-pipeline times are not given" in text
    )
    assert row(text, "whole pipeline, minutes")[-3:] == ["—", "—", "—"]
    assert "| whole pipeline, minutes | — | not measured by these runs |" in readme_table(
        [run(s, 0.84, 0.3, 0.3, untimed=why) for s in (1, 2, 3)]
    )


def test_the_readme_table_is_the_seed_tables_means_ranges_and_claims(tmp_path):
    runs = [
        run(1, rm_gold=0.84, ppo_gain=0.30, ppo_hallucination=0.35),
        run(2, 0.86, ppo_gain=0.05, ppo_hallucination=0.70, untimed="shared the machine"),
    ]
    short = readme_table(runs)
    assert "| reward model agrees with gold, % | 85.0 | 84.0 – 86.0 |" in short
    assert "| whole pipeline, minutes | 10.0 | 1 seed measured |" in short
    assert "| PPO's invented answers ≤ half of SFT's (suite) | 1 of 2 |" in short
    assert "stage, 500 prompts" not in short  # only the rows README_FIGURES names
    assert short.startswith("Over 2 seeds of the default params")
    assert row(table(runs), "reward model agrees with gold, %")[0] == "85.0"  # the long table's mean

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:readme -->\nSTALE\n<!-- /results:readme -->\nafter\n")
    written = replace_section(readme.read_text(), "readme", short, readme)
    assert (
        "STALE" not in written and short in written and written.endswith("<!-- /results:readme -->\nafter\n")
    )
    assert replace_section(written, "readme", short, readme) == written
    with pytest.raises(SystemExit, match="no <!-- results:seeds -->"):
        replace_section(written, "seeds", short, readme)
