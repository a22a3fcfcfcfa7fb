"""Batches of variable-length items. The order in which SFT and the reward model see them
(llmlab.training.trainer.Epochs), with and without grouping by length: every epoch is a permutation, batches start on
step boundaries, a resume continues the same stream, and grouping removes most of the padding. And
SFT's packed batches (llmlab.training.sft.collate_packed): the loss and gradient of the padded batch, in fewer rows."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.model.transformer import GPT, CanonMix, GPTConfig
from llmlab.training.sft import collate, collate_packed
from llmlab.training.trainer import Epochs


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


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(2, 30), st.integers(0, 2**16)), min_size=1, max_size=12),
    st.sampled_from(["", "A", "ABCD"]),
)
def test_a_packed_batch_gives_the_loss_and_gradient_of_the_padded_one(shapes, canon):
    """With canon mixing too, at each place: a packed conversation's first tokens must not mix in the one
    before."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=40,
            d_model=16,
            n_layer=2,
            n_head=2,
            context_length=32,
            canon_kernel=4 if canon else 0,
            canon_places=canon or "A",
        )
    )
    for mix in (m for m in model.modules() if isinstance(m, CanonMix)):
        torch.nn.init.normal_(mix.weight, std=0.5)
    batch = []
    for length, seed in shapes:
        rng = random.Random(seed)
        mask = [False] + [rng.random() < 0.6 for _ in range(length - 1)]
        mask[rng.randrange(1, length)] = True  # something to learn, as ChatDataset guarantees
        batch.append(([rng.randrange(5, 40) for _ in range(length)], mask))

    def loss_and_grads(inputs):
        model.zero_grad()
        _, loss = model(*inputs)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    padded, packed = collate(batch), collate_packed(batch)
    assert packed[0].shape[0] <= padded[0].shape[0] and packed[0].shape[1] == padded[0].shape[1]
    assert (packed[1] != -100).sum() == (padded[1] != -100).sum()
    (l1, g1), (l2, g2) = loss_and_grads(padded), loss_and_grads(packed)
    assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-6)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_packing_halves_the_rows_of_a_batch_of_short_and_long_conversations():
    rng = random.Random(0)
    batch = [
        ([1] * n, [False] + [True] * (n - 1))
        for n in (rng.choice([rng.randint(8, 20), rng.randint(60, 120)]) for _ in range(16))
    ]
    assert collate_packed(batch)[0].numel() <= 0.6 * collate(batch)[0].numel()


def test_validation_during_training_reads_the_first_val_batches_batches_of_every_process():
    from types import SimpleNamespace

    from llmlab.training.trainer import validation_batches

    cfg = SimpleNamespace(val_batches=3, batch_size=4)
    assert list(validation_batches(list(range(100)), cfg, SimpleNamespace(world_size=2))) == list(range(24))
    assert list(validation_batches(list(range(5)), cfg, SimpleNamespace(world_size=1))) == list(range(5))
