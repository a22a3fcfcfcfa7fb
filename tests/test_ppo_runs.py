"""benchmarks/ppo_runs.py against figures written by hand: three PPO runs of one seed, one of another."""

import doctest
import json

import pytest

from benchmarks import ppo_runs


def fake_run(folder, seed, invented_sft, invented_ppo, declined, gain=0.1):
    """The files a finished run's ppo and evaluate stages leave, with only the fields the table reads."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "params.yaml").write_text(f"seed: {seed}\nppo:\n  seed: null\n")
    (folder / "metrics" / "ppo.json").write_text(
        json.dumps({"kl_to_sft": 0.8, "gold_gain": gain, "gold_gain_ci95": 0.07})
    )
    suite = {
        "sft": {"hallucination": {"rate": invented_sft}},
        "ppo": {
            "hallucination": {"rate": invented_ppo},
            "accuracy_by_kind": {"unknown": {"rate": 1 - invented_ppo}, "fact": {"rate": 0.9}},
            "over_refusal": {"rate": declined},
        },
        "gold_gain_ppo_vs_sft": {"mean": 0.2, "ci95": 0.06},
        "hallucination_ppo_vs_half_sft": {
            "diff": invented_ppo - invented_sft / 2,
            "ci_low": invented_ppo - invented_sft / 2 - 0.05,
            "ci_high": invented_ppo - invented_sft / 2 + 0.05,
        },
    }
    (folder / "metrics" / "evaluate.json").write_text(json.dumps({"suite": suite}))
    return folder


def test_rows_grouped_by_seed_and_each_seeds_rank_correlation(tmp_path, capsys):
    runs = [
        f"the default={fake_run(tmp_path / 'a', 2, 0.30, 0.20, 0.02)}",
        f"ppo.seed 1={fake_run(tmp_path / 'b', 2, 0.30, 0.05, 0.075, gain=-0.004)}",
        str(fake_run(tmp_path / "c", 1, 0.34, 0.11, 0.09)),  # another seed: its own group, first
        f"rloo={fake_run(tmp_path / 'd', 2, 0.30, 0.14, 0.064)}",
    ]
    ppo_runs.main(runs)
    out = capsys.readouterr().out.splitlines()
    assert out[2] == (
        "| 1 | c | 0.80 | +0.10 ± 0.07 | +0.20 ± 0.06 | 11.0 (0.32) | −6.0 [−11.0, −1.0] | 89.0 | 90.0 | 9.0 |"
    )
    # PPO at 5 % of 30 %: 0.17 of SFT's rate, 10 points under its half; the gain of −0.004 rounds to −0.00
    assert out[4] == (
        "|  | ppo.seed 1 | 0.80 | −0.00 ± 0.07 | +0.20 ± 0.06 | 5.0 (0.17) | −10.0 [−15.0, −5.0] | 95.0 | 90.0 | 7.5 |"
    )
    assert [line.split(" | ")[1] for line in out[3:6]] == ["the default", "ppo.seed 1", "rloo"]
    # seed 2, invented 20 / 5 / 14 against declined 2 / 7.5 / 6.4: ranks 3, 1, 2 against 1, 3, 2
    assert out[-1].endswith("over 3 PPO runs: −1.00")
    assert not any(line.startswith("seed 1:") for line in out)  # one run: no correlation


def test_ties_share_their_rank_and_the_doctests_hold():
    assert ppo_runs.spearman([1.0, 2.0, 2.0, 3.0], [3.0, 2.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: Pearson of those by hand
    assert ppo_runs.spearman([1.0, 5.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        4.5 / (4.5 * 5) ** 0.5
    )
    assert doctest.testmod(ppo_runs).failed == 0


def test_a_folder_without_ppo_metrics_is_named_with_the_fix(tmp_path):
    run = fake_run(tmp_path / "a", 2, 0.3, 0.2, 0.02)
    (run / "metrics" / "ppo.json").unlink()
    with pytest.raises(
        SystemExit, match=r"a: not a finished run .*ppo.json.*run its ppo and evaluate stages"
    ):
        ppo_runs.main([str(run)])
