"""The report's verdict lines: a claim is shown only when the 95 % interval of the difference lies wholly
on its side of zero, and a difference measured the other way round is said to be the opposite."""

from __future__ import annotations

from llmlab.evaluation.measurements import rate_of
from llmlab.evaluation.report import compare


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
