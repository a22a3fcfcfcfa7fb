"""The order in which SFT and the reward model see their items (llmlab.sft.Epochs), with and without
grouping by length: every epoch is a permutation, batches start on step boundaries, a resume continues
the same stream, and grouping removes most of the padding."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.sft import Epochs


def _stream(epochs: Epochs) -> list:
    return [epochs[i] for i in range(len(epochs))]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 20),
    megabatch=st.integers(1, 8),
    n_epochs=st.integers(1, 4),
    seed=st.integers(0, 10),
    grouped=st.booleans(),
)
def test_every_epoch_is_a_permutation_and_a_resume_continues_it(n, batch, megabatch, n_epochs, seed, grouped):
    lengths = [random.Random(seed * 7919 + i).randint(1, 100) for i in range(n)] if grouped else None
    n_items = n * n_epochs
    stream = _stream(Epochs(list(range(n)), n_items, seed, lengths=lengths, batch=batch, megabatch=megabatch))
    for e in range(n_epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    first = batch * (n_items // batch // 2)  # a resume at a step boundary, halfway
    resumed = _stream(Epochs(list(range(n)), n_items - first, seed, first, lengths, batch, megabatch))
    assert resumed == stream[first:]


def test_without_lengths_the_order_is_the_plain_shuffle():
    plain = _stream(Epochs(list(range(50)), 120, seed=3))
    assert _stream(Epochs(list(range(50)), 120, seed=3, lengths=[1] * 50, batch=1)) == plain
    assert plain[:50] != list(range(50))


def test_grouped_batches_are_of_similar_length_and_start_on_step_boundaries():
    n, batch, n_epochs = 1003, 16, 3  # 1003 is not a multiple of 16: epochs start mid-step
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(8, 20), rng.randint(60, 120)]) for _ in range(n)]

    def padding_share(epochs: Epochs) -> float:
        stream = _stream(epochs)
        steps = [stream[i : i + batch] for i in range(0, len(stream) - batch + 1, batch)]
        padded = sum(max(lengths[j] for j in s) * batch for s in steps)
        return 1 - sum(lengths[j] for s in steps for j in s) / padded

    plain = padding_share(Epochs(list(range(n)), n * n_epochs, seed=1))
    grouped = padding_share(Epochs(list(range(n)), n * n_epochs, seed=1, lengths=lengths, batch=batch))
    assert plain > 0.35 and grouped < 0.05, (plain, grouped)


def test_grouped_batches_still_come_in_random_order():
    lengths = list(range(400))  # sorted already: a grouping that forgot to shuffle would keep this order
    stream = _stream(Epochs(list(range(400)), 400, seed=2, lengths=lengths, batch=10, megabatch=40))
    firsts = [stream[i] for i in range(0, 400, 10)]
    assert firsts != sorted(firsts)
    # which items meet in a batch is random too: a megabatch is a random subset, sorted
    def batches(seed):
        stream = _stream(Epochs(list(range(400)), 400, seed, lengths=lengths, batch=10, megabatch=4))
        return {frozenset(stream[i : i + 10]) for i in range(0, 400, 10)}

    assert batches(5) != batches(6)
