"""DPO against references: the loss and implicit rewards by hand, sequence log-probabilities against a
plain loop over positions, the masking of the prompt, truncation, and a few steps of training that
raise the chosen reply over the rejected one relative to the frozen reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab.data.chat_template import encode_content, render
from llmlab.data.tokenizer import END_ID
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.training.dpo import DPOPairs, collate_dpo, dpo_loss, pair_sequences, sequence_logps


def row(
    tok,
    prompt="Where does Mara Quill live?",
    chosen="Mara Quill lives in Port Avery.",
    rejected="I don't know.",
):
    return {
        "context": json.dumps([{"role": "user", "content": prompt}]),
        "chosen": chosen,
        "rejected": rejected,
        "chosen_ended": True,
        "rejected_ended": False,
    }


def test_dpo_loss_and_rewards_by_hand():
    # policy − reference: chosen +1, rejected −1 → β = 0.5 gives rewards +0.5, −0.5, margin 1: −log σ(1)
    loss, rc, rr = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    # ε = 0.1: 0.9 · −log σ(1) + 0.1 · −log σ(−1)
    smoothed, *_ = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5, 0.1
    )
    expected = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert smoothed.item() == pytest.approx(expected)
    # At the start (policy = reference) the loss is log 2 whatever β.
    start, *_ = dpo_loss(
        torch.tensor([-5.0, -1.0]),
        torch.tensor([-2.0, -7.0]),
        torch.tensor([-5.0, -1.0]),
        torch.tensor([-2.0, -7.0]),
        3.0,
    )
    assert start.item() == pytest.approx(math.log(2))


def test_pair_sequences_mark_where_each_reply_starts(tok):
    r = row(tok)
    chosen, c_start, rejected, r_start = pair_sequences(tok, r, 128)
    prompt = render(tok, json.loads(r["context"]), add_generation_prompt=True).ids
    assert chosen[:c_start] == prompt == rejected[:r_start]
    assert chosen[c_start:] == encode_content(tok, r["chosen"]) + [END_ID]
    assert rejected[r_start:] == encode_content(tok, r["rejected"])  # it did not end: no <|end|>


def test_a_long_prompt_loses_its_start_and_the_reply_is_kept_whole(tok):
    r = row(tok, prompt="Tell me about the river. " * 40)
    chosen, start, _, _ = pair_sequences(tok, r, 64)
    assert len(chosen) == 64 and chosen[start:] == encode_content(tok, r["chosen"]) + [END_ID]


def test_collate_scores_only_the_reply_tokens(tok):
    items = [
        pair_sequences(tok, row(tok), 128) + (0.0, 0.0),
        pair_sequences(tok, row(tok, "Hi"), 128) + (0.0, 0.0),
    ]
    idx, targets, *_ = collate_dpo(items)
    assert idx.shape[0] == 4
    for i, (seq, start) in enumerate(
        [
            (items[0][0], items[0][1]),
            (items[1][0], items[1][1]),
            (items[0][2], items[0][3]),
            (items[1][2], items[1][3]),
        ]
    ):
        scored = (targets[i] != -100).nonzero().flatten().tolist()
        assert scored == list(range(start - 1, len(seq) - 1))  # position t predicts token t + 1
        assert targets[i, start - 1 : len(seq) - 1].tolist() == seq[start:]


def test_sequence_logps_equal_a_plain_loop_over_positions(tok):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2, context_length=128)
    ).eval()
    items = [
        pair_sequences(tok, row(tok), 128) + (0.0, 0.0),
        pair_sequences(tok, row(tok, "Hi"), 128) + (0.0, 0.0),
    ]
    idx, targets, *_ = collate_dpo(items)
    with torch.no_grad():
        got = sequence_logps(model, idx, targets)
    for i, (seq, start) in enumerate(
        [
            (items[0][0], items[0][1]),
            (items[1][0], items[1][1]),
            (items[0][2], items[0][3]),
            (items[1][2], items[1][3]),
        ]
    ):
        total = 0.0
        with torch.no_grad():
            for t in range(start, len(seq)):  # each reply token given everything before it, unpadded
                logits, _ = model(torch.tensor([seq[:t]]))
                total += torch.log_softmax(logits[0, -1], -1)[seq[t]].item()
        assert got[i].item() == pytest.approx(total, abs=1e-4)


def test_training_raises_the_chosen_reply_over_the_rejected_against_the_reference(tok):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2, context_length=128)
    ref = GPT(config).eval()
    policy = GPT(config)
    policy.load_state_dict(ref.state_dict())
    rows = [
        row(tok, f"Where does person {i} live?", f"Person {i} lives in Port Avery.", "I don't know.")
        for i in range(8)
    ]
    pairs = DPOPairs(tok, rows, 128)
    pairs.reference_logps(ref)
    idx, targets, ref_c, ref_r = collate_dpo([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        start = sequence_logps(policy, idx, targets)
    assert torch.allclose(start[:8], ref_c, atol=1e-4) and torch.allclose(start[8:], ref_r, atol=1e-4)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(20):
        logps = sequence_logps(policy, idx, targets)
        loss, rc, rr = dpo_loss(logps[:8], logps[8:], ref_c, ref_r, beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < math.log(2) - 0.1 and (rc > rr).all()


def test_reference_logps_batches_replies_by_length_and_scores_only_the_needed_pairs(tok):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=2, n_head=2, context_length=128)
    ref = GPT(config).eval()
    rows = [  # a short reply against a long one, in both orders, so batches mix replies of several pairs
        row(
            tok,
            f"Where does person {i} live?",
            "No." if i % 2 else f"Person {i} lives in Port Avery " * 3,
            "Hm.",
        )
        for i in range(6)
    ]
    pairs = DPOPairs(tok, rows, 128)
    pairs.reference_logps(ref, needed=[0, 2, 5, 2], batch_size=3)
    for i in range(6):
        for side in (0, 1):
            if i not in (0, 2, 5):
                assert pairs.ref[i, side] == 0
                continue
            seq, start = pairs.items[i][2 * side : 2 * side + 2]
            targets = torch.full((1, len(seq)), -100)
            targets[0, start - 1 : -1] = torch.tensor(seq[start:])
            with torch.no_grad():
                alone = sequence_logps(ref, torch.tensor([seq]), targets)
            assert pairs.ref[i, side].item() == pytest.approx(alone.item(), abs=1e-4)
