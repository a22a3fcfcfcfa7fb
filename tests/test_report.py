"""The report's verdict lines: a claim is shown only when the 95 % interval of the difference lies wholly
on its side of zero, and a difference measured the other way round is said to be the opposite."""

from __future__ import annotations

from llmlab.evaluation.measurements import rate_by_cluster, rate_diff_by_cluster, rate_of
from llmlab.evaluation.report import by_people, compare, halves, negated


def test_a_claim_is_shown_within_the_noise_or_the_opposite():
    shown = compare("RLHF raises refusals", rate_of(87, 92), rate_of(77, 92), ("PPO", "SFT"))
    assert shown.startswith("**Shown:** RLHF raises refusals") and "[+1.8, +20.3]" in shown
    noise = compare("RLHF lowers invented answers", rate_of(81, 99), rate_of(90, 99), ("SFT", "PPO"))
    assert noise.startswith("**Not shown convincingly by this model:**") and "within the noise" in noise
    opposite = compare(
        "fine-tuning costs knowledge", rate_of(1450, 1500), rate_of(1492, 1500), ("base", "PPO")
    )
    assert opposite.startswith("**Not shown by this model: the opposite was measured:**")
    assert "within the noise" not in opposite and "[-3.9, -1.9]" in opposite


def test_section_14_says_who_labelled_and_judges_the_model_path_by_ppo_gold_gain():
    from llmlab.evaluation.report import _constitution

    rater = {"gold_rater": 1, "model_labels": 0, "pairs": 14000, "rater_judgments": 14000, "gold_ties": 0}
    rater |= {
        "label_gold_agreement": 0.9,
        "label_gold_agreement_ci_low": 0.89,
        "label_gold_agreement_ci_high": 0.91,
    }
    text = _constitution({"preferences": rater, "reward_model": {}, "ppo": {}})
    assert "**14,000 rater judgments**" in text and "90.0 % [89.0–91.0]" in text and "make cai" in text
    model = rater | {"model_labels": 1, "pairs": 22000, "rater_judgments": 2000, "gold_ties": 8000}
    model |= {
        "label_gold_agreement": 0.65,
        "label_gold_agreement_ci_low": 0.64,
        "label_gold_agreement_ci_high": 0.66,
        "label_gold_agreement/fact": 0.5,
        "label_gold_agreement/harmful": 0.875,
    }
    critique = {"verdict_pairs": 200, "verdict_agreement": 0.6, "critique_exact": 0.2}
    reward = {"accuracy_gold": 0.7}
    up = {
        "gold_gain": 0.25,
        "gold_gain_ci95": 0.1,
        "sft/hallucination_rate": 0.6,
        "ppo/hallucination_rate": 0.4,
    }
    text = _constitution({"preferences": model, "critique": critique, "reward_model": reward, "ppo": up})
    assert "**2,000 rater judgments**" in text and "65.0 % [64.0–66.0] (14,000 pairs" in text
    assert "orders); by kind of prompt: fact 50.0 %, harmful 87.5 %\n" in text
    assert "70.0 %" in text and "+0.25 ± 0.10" in text and "60.0 % → 40.0 %" in text
    assert "**Shown:**" in text
    flat = _constitution(
        {"preferences": model, "critique": critique, "reward_model": reward, "ppo": up | {"gold_gain": 0.05}}
    )
    assert "**Not shown convincingly by this model:**" in flat
    assert "rewrite" not in text  # a critic measured before revisions existed: no sentence about them
    revised = critique | {
        "revisions_measured": 240,
        "revision_gold_gain": 0.4,
        "revision_gold_gain_ci95": 0.2,
        "revision_better": 0.3,
        "revision_worse": 0.1,
        "revision_invented_before": 0.8,
        "revision_invented_after": 0.5,
        "revision_unknown_prompts": 20,
    }
    text = _constitution({"preferences": model, "critique": revised, "reward_model": reward, "ppo": up})
    assert (
        "score +0.40 ± 0.20 against the replies" in text
        and "(240 replies: 30.0 % better, 10.0 % worse" in text
    )
    assert "80.0 % → 50.0 % of 20" in text and "greedy" not in text
    revised |= {"revision_gold_gain_over_greedy": -0.1, "revision_gold_gain_over_greedy_ci95": 0.15}
    text = _constitution({"preferences": model, "critique": revised, "reward_model": reward, "ppo": up})
    assert "against the SFT model's greedy reply to the same question -0.10 ± 0.15." in text


def test_section_6_says_whether_the_kl_budget_raised_beta():
    from llmlab.evaluation.report import _ppo

    m = {"ppo": {"reward_gain": 0.3, "reward_gain_ci95": 0.1, "kl_to_sft": 0.9, "kl_to_sft_ci95": 0.1}}
    rows = [{"iteration": i, "objective/scores": 0.1 * i, "objective/kl": 0.3 * i} for i in range(1, 9)]
    raised = [r | {"kl_coef": b} for r, b in zip(rows, [0.3] * 4 + [0.315, 0.33, 0.3465, 0.33], strict=True)]
    text = _ppo(m, {"ppo": "figures/ppo.png"}, raised)
    assert "raised β from 0.3 to at most 0.35 while the KL was over its budget" in text
    assert "(`ppo.kl_target`; last iteration: 0.33)" in text
    steady = _ppo(m, {"ppo": "figures/ppo.png"}, [r | {"kl_coef": 0.3} for r in rows])
    assert "β stayed at 0.3 throughout" in steady and "raised" not in steady


def test_invented_answers_by_person_are_said_per_model_or_not_at_all():
    people = ["Ada", "Ada", "Bo", "Bo", "Cy", "Cy"]
    sft = {"hallucination": rate_by_cluster([True, True, True, True, False, False], people)}
    ppo = {"hallucination": rate_by_cluster([True, True, False, False, False, False], people)}
    line = by_people({"sft": sft, "ppo": ppo})
    assert "each of the 3 unknown people as one draw" in line
    assert "SFT 66.7 % [" in line and "PPO 33.3 % [" in line
    assert by_people({"sft": {"hallucination": rate_of(4, 6)}}) == ""  # metrics from before the field


def test_a_claim_on_invented_answers_is_decided_with_each_person_one_draw():
    """30 of 60 questions against 15 of 60: the two rates' Newcombe interval shows the difference, but the
    answers come from 6 people, each answered alike, so counted by person it is within the noise."""
    people = [p for p in "ABCDEF" for _ in range(10)]
    sft = [p in "ABC" for p in people]  # 30 invented, three people always
    ppo = [p in "A" or (p == "B" and i % 2 == 0) for i, p in enumerate(people)]  # 15
    plain = compare("RLHF lowers invented answers", rate_of(30, 60), rate_of(15, 60), ("SFT", "PPO"))
    assert plain.startswith("**Shown:**")
    by_person = negated(rate_diff_by_cluster(ppo, sft, people))
    assert by_person["diff"] == 0.25 and by_person["people"] == 6
    line = compare(
        "RLHF lowers invented answers", rate_of(30, 60), rate_of(15, 60), ("SFT", "PPO"), by_person
    )
    assert (
        line.startswith("**Not shown convincingly by this model:**") and "each of 6 people one draw" in line
    )


def test_halving_is_decided_by_the_paired_difference_from_half_of_sfts_rate():
    """Ten people, four questions each; SFT invents about people 0-7 every time (80 %). PPO invents about one
    person every time (10 %): its rate minus half of SFT's is -30 points (by hand: each person's +2, -2 or 0
    questions, residual variance 10 / 9 * 17.6 / 40**2, interval [-51.7, -8.3]). PPO inventing about five
    people (50 %) is +10 points, within the noise."""
    people = [f"P{i}" for i in range(10) for _ in range(4)]
    sft = [int(p[1]) < 8 for p in people]
    low = halves(
        "halves", rate_diff_by_cluster([p == "P0" for p in people], sft, people, 0.5), ("PPO", "SFT")
    )
    assert low.startswith("**Shown:** halves (PPO's rate minus half of SFT's -30.0 points")
    assert "[-51.7, -8.3] with each of 10 people one draw" in low
    high = halves(
        "halves", rate_diff_by_cluster([int(p[1]) < 5 for p in people], sft, people, 0.5), ("PPO", "SFT")
    )
    assert "+10.0 points" in high and not high.startswith("**Shown:**")
    assert halves("halves", None, ("PPO", "SFT")) == ""  # metrics from before the field
