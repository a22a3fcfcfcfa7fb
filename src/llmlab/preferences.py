"""Preference pairs: the simulated human feedback of RLHF.

For each prompt of the `rl` pool the SFT model samples several replies; the rater scores them; every
two replies with different scores become a (prompt, chosen, rejected) pair. Human raters disagree with
themselves, so the label is drawn from the Bradley–Terry model on the gold scores rather than copied:

    P(a preferred to b) = σ((score_a − score_b) / τ)          τ = `label_temperature`; τ = 0: no noise

A pair of nearly equal replies is a coin flip; a clearly better reply almost always wins. Pairs with
exactly equal scores carry no preference and are dropped (and counted). The reward model only ever sees
these pairs, never the scores.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chosen_ended: bool
    rejected_ended: bool
    gold_chosen: float
    gold_rejected: float

    @property
    def flipped(self) -> bool:
        """The noisy label disagrees with the gold ordering."""
        return self.gold_chosen < self.gold_rejected


def bradley_terry_p(score_a: float, score_b: float, temperature: float) -> float:
    """P(a preferred to b). temperature 0 is the noise-free ordering.

    >>> round(bradley_terry_p(2.0, 0.0, 1.0), 3), bradley_terry_p(2.0, 0.0, 0.0), bradley_terry_p(1.0, 1.0, 0.5)
    (0.881, 1.0, 0.5)
    """
    if temperature == 0:
        return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / temperature))


def make_pairs(prompt: str, replies: list[tuple[str, bool, float]], temperature: float, rng: random.Random) -> tuple[list[Pair], int]:
    """All pairs of a prompt's replies (text, ended, gold score) with a drawn label; returns (pairs, ties)."""
    pairs, ties = [], 0
    for (ta, ea, sa), (tb, eb, sb) in combinations(replies, 2):
        if sa == sb:
            ties += 1
            continue
        a_wins = rng.random() < bradley_terry_p(sa, sb, temperature)
        (tc, ec, sc), (tr, er, sr) = ((ta, ea, sa), (tb, eb, sb)) if a_wins else ((tb, eb, sb), (ta, ea, sa))
        pairs.append(Pair(prompt, tc, tr, ec, er, sc, sr))
    return pairs, ties
