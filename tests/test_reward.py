"""The reward model: Bradley–Terry loss by hand, reading the reward at the last token, and training signal."""

import math

import pytest
import torch

from llmlab.data.tokenizer import ASSISTANT_ID, USER_ID
from llmlab.model.transformer import GPTConfig
from llmlab.training.reward import (
    RewardModel,
    bt_loss,
    load_reward_model,
    pad_batch,
    reply_lm_loss,
    save_reward_model,
    score_sequences,
)

CFG = GPTConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, context_length=32, ffn_hidden=32)


def test_bt_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2  # -log σ(x) = log(1 + e^-x)
    assert bt_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)
    assert bt_loss(rc, rr, margin=1.0).item() == pytest.approx(
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2, rel=1e-6
    )
    centred = bt_loss(rc, rr, centring=0.1).item() - expected
    assert centred == pytest.approx(0.1 * (4.0 + 1.0) / 2, rel=1e-6)


def test_per_pair_margins_by_hand_and_from_the_rated_strength():
    from llmlab.params import RewardConfig
    from llmlab.training.reward import RewardModule, collate_pairs

    rc, rr, m = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 2.0])
    by_hand = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(3.0))) / 2  # -log σ(rc - rr - m), each pair
    assert bt_loss(rc, rr, m).item() == pytest.approx(by_hand, rel=1e-6)
    module = RewardModule(CFG, RewardConfig(margin=0.25, strength_margin=1.5), total_steps=1)
    idx, last, strengths, likelihood, targets = collate_pairs(
        [([1, 2], [1, 3, 4], 3, None, 1.0), ([1, 5, 6], [1, 7], 0, None, 0.75), ([1], [1, 8], 1, None, 1.0)]
    )
    assert idx.shape == (6, 3) and last.tolist() == [1, 2, 0, 2, 1, 1] and strengths.tolist() == [3, 0, 1]
    assert targets.tolist() == [1.0, 0.75, 1.0]
    assert likelihood is None  # not read: the reward model computes it (or does not read likelihood)
    assert module.margins(strengths).tolist() == pytest.approx([1.75, 0.25, 0.75])


def test_soft_labels_are_the_cross_entropy_against_the_judges_probability(monkeypatch):
    """With `soft_labels`, a judge's pair is learned with σ(preference / 2) as the target; the rater's pairs
    (no preference) stay certain; the loss is the plain cross-entropy, by hand; and the reward gap that
    minimises it is the judge's own log-odds of one reading, not an unbounded one."""
    from llmlab.training import reward
    from llmlab.training.reward import PairDataset, judged_probability

    monkeypatch.setattr(reward, "reply_ids", lambda tok, context, reply, ended, T: [1, 2])  # no tokenizer
    rows = [
        {"context": "[]", "chosen": "Yes.", "rejected": "No.", "chosen_ended": True, "rejected_ended": True}
        | {"strength": 0, "preference": p}
        for p in (2.0, float("nan"), 0.0)
    ]
    assert PairDataset(None, rows, 64).targets == [1.0, 1.0, 1.0]  # off: every label certain
    targets = PairDataset(None, rows, 64, soft_labels=True).targets
    assert targets == pytest.approx([1 / (1 + math.exp(-1.0)), 1.0, 0.5])
    assert judged_probability(None) == 1.0
    rc, rr, t = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor(targets)
    by_hand = [
        -(p * math.log(1 / (1 + math.exp(-d))) + (1 - p) * math.log(1 / (1 + math.exp(d))))
        for p, d in zip(targets, (1.0, -0.5, -2.0), strict=True)
    ]
    assert bt_loss(rc, rr, target=t).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    gap = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([gap], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        bt_loss(gap, torch.zeros(1), target=torch.tensor([targets[0]])).backward()
        opt.step()
    assert gap.item() == pytest.approx(1.0, abs=1e-3)  # logit(σ(2 / 2))


def test_a_strength_margin_sets_strongly_preferred_pairs_further_apart():
    """Two groups of pairs, each told apart by its own tokens: with Llama 2's margin the group the rater called
    significantly better ends further apart, against the other group, than without it; the other group's
    pairs end where they did."""

    def gaps(strength_margin: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = RewardModel(CFG)
        chosen = [[1, 4, 10 + i] for i in range(8)] + [[1, 4, 20 + i] for i in range(8)]  # strong, weak
        rejected = [[1, 4, 30 + i] for i in range(8)] + [[1, 4, 40 + i] for i in range(8)]
        margin = strength_margin * torch.tensor([3.0] * 8 + [0.0] * 8) / 3
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        for _ in range(40):  # short of separating them without bound
            r = model(*pad_batch(chosen + rejected))
            loss = bt_loss(r[:16], r[16:], margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            gap = (lambda r: r[:16] - r[16:])(model(*pad_batch(chosen + rejected)))
        return gap[:8].mean().item(), gap[8:].mean().item()

    strong, weak = gaps(3.0)
    strong_plain, weak_plain = gaps(0.0)
    assert strong - weak > strong_plain - weak_plain + 0.5
    assert weak == pytest.approx(weak_plain, abs=0.2)


def test_reward_is_read_at_the_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    model = RewardModel(CFG).eval()
    short, longer = [1, 5, 6], [1, 5, 6, 7, 8]
    idx, last = pad_batch([short, longer])
    assert last.tolist() == [2, 4]
    both = model(idx, last)
    alone = model(*pad_batch([short]))
    assert both[0].item() == pytest.approx(alone[0].item(), abs=1e-5)  # padding after it changes nothing


def test_training_on_pairs_separates_chosen_from_rejected():
    torch.manual_seed(0)
    model = RewardModel(CFG)
    chosen = [[1, 3, 4, 10 + i] for i in range(8)]  # chosen replies end in tokens 10..17
    rejected = [[1, 3, 4, 30 + i] for i in range(8)]  # rejected ones in 30..37
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        idx, last = pad_batch(chosen + rejected)
        r = model(idx, last)
        loss = bt_loss(r[:8], r[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r = model(*pad_batch(chosen + rejected))
    assert (r[:8] > r[8:]).all()


def test_save_load_round_trip_with_offset(tmp_path):
    torch.manual_seed(1)
    model = RewardModel(CFG).eval()
    model.offset = 0.75
    save_reward_model(model, tmp_path / "rm", scale=1.5)
    again = load_reward_model(tmp_path / "rm")
    idx, last = pad_batch([[1, 2, 3]])
    assert again(idx, last).item() == pytest.approx(model(idx, last).item(), abs=1e-6)
    assert again.offset == 0.75


def test_missing_reward_model_names_the_stage(tmp_path):
    from llmlab.errors import MissingArtifactError

    with pytest.raises(MissingArtifactError, match="reward"):
        load_reward_model(tmp_path / "nope")


def test_score_sequences_batches_by_length_but_answers_in_the_order_given():
    torch.manual_seed(0)
    model = RewardModel(CFG).eval()
    seqs = [[1, *range(5, 5 + n)] for n in (9, 2, 14, 5, 1, 7)]
    scores = score_sequences(model, seqs, batch_size=4)
    alone = torch.cat([model(*pad_batch([s])) for s in seqs])
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-5)
    assert not scores.requires_grad and score_sequences(model, []).shape == (0,)


def test_calibration_bins_predicted_against_observed_by_hand():
    from llmlab.training.reward import calibration

    # Margins of +10 (σ ≈ 1) and 0 (σ = 0.5): each pair is shown as (chosen, rejected) or swapped at random,
    # so a confident pair lands in the top bin (observed 1) or the bottom one (observed 0), an unsure one in
    # the middle bin, where half are observed wins only if the coin says so.
    r_c, r_r = torch.tensor([10.0] * 50 + [0.0] * 50), torch.tensor([0.0] * 100)
    table = calibration(r_c, r_r, seed=0)
    by_bin = {round(p, 1): (o, n) for p, o, n in table}
    assert sum(n for _, _, n in table) == 100 and set(by_bin) == {0.0, 0.5, 1.0}
    assert by_bin[1.0][0] == 1.0 and by_bin[0.0][0] == 0.0  # σ(10) shown as chosen first: always right
    assert by_bin[0.5][1] == 50  # every unsure pair in the middle bin
    assert by_bin[1.0][1] + by_bin[0.0][1] == 50


def test_reply_lm_loss_is_the_cross_entropy_of_the_reply_tokens_only():
    """Against a plain loop: only tokens after the last <|assistant|>, up to each row's last, are targets."""
    torch.manual_seed(0)
    model = RewardModel(CFG).eval()
    A, U = ASSISTANT_ID, USER_ID
    rows = [
        [1, U, 7, 8, A, 9, 10, 11],  # reply 9 10 11
        [1, U, 7, A, 12, 2, U, 13, A, 14, 15],  # two turns: only the last reply (14 15) counts
    ]
    idx, last = pad_batch(rows)
    with torch.no_grad():
        h = model.backbone.hidden(idx)
        got = reply_lm_loss(model.backbone, h, idx, last).item()
        logp = torch.log_softmax(model.backbone.lm_head(h), -1)
    terms = []
    for b, row in enumerate(rows):
        start = max(i for i, t in enumerate(row) if t == A) + 1
        terms += [-logp[b, t - 1, row[t]].item() for t in range(start, len(row))]
    assert len(terms) == 5
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_reply_likelihood_is_the_sum_and_minimum_of_the_reply_tokens_log_probabilities():
    """Against a plain loop over each row's reply tokens (after the last <|assistant|>, up to its last)."""
    from llmlab.model.transformer import GPT
    from llmlab.training.reward import reply_likelihood

    torch.manual_seed(0)
    lm = GPT(CFG).eval()
    A, U = ASSISTANT_ID, USER_ID
    rows = [[1, U, 7, 8, A, 9, 10, 11], [1, U, 7, A, 12, 2, U, 13, A, 14, 15], [1, U, 7, A]]
    idx, last = pad_batch(rows)
    with torch.no_grad():
        logits, _ = lm(idx)
        got = reply_likelihood(lm, idx, last)
        logp = torch.log_softmax(logits, -1)
    for b, row in enumerate(rows):
        start = max(i for i, t in enumerate(row) if t == A) + 1
        terms = [logp[b, t - 1, row[t]].item() for t in range(start, len(row))]
        expected = (sum(terms), min(terms)) if terms else (0.0, 0.0)  # the third row has no reply yet
        assert got[b].tolist() == pytest.approx(expected, rel=1e-5)


def test_a_reward_model_that_reads_likelihood_starts_as_the_plain_one_and_keeps_its_reference_frozen(
    tmp_path,
):
    torch.manual_seed(0)
    plain = RewardModel(CFG)
    reads = RewardModel(CFG, reads_likelihood=True)
    reads.load_state_dict(plain.state_dict(), strict=False)  # same backbone and head; reference left random
    rows = [[1, USER_ID, 7, ASSISTANT_ID, 9, 10], [1, USER_ID, 8, ASSISTANT_ID, 11]]
    idx, last = pad_batch(rows)
    torch.testing.assert_close(reads(idx, last), plain(idx, last))  # the likelihood weights start at 0

    frozen = {k: v.clone() for k, v in reads.reference.state_dict().items()}
    opt = torch.optim.AdamW([p for p in reads.parameters() if p.requires_grad], lr=1e-2)
    reads.train()
    assert not reads.reference.training
    for _ in range(3):
        r = reads(idx, last)
        loss = bt_loss(r[:1], r[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert reads.likelihood.weight.abs().sum() > 0  # the weights learn
    for k, v in reads.reference.state_dict().items():
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)  # the reference does not

    save_reward_model(reads.eval(), tmp_path / "rm", scale=1.0)
    again = load_reward_model(tmp_path / "rm")
    assert again.reads_likelihood
    torch.testing.assert_close(again(idx, last), reads(idx, last))


def test_centring_scores_each_reply_once_but_weighs_it_by_its_pairs():
    """A reply in three pairs counts three times in the offset and the scale, as if every pair's two
    replies were scored one by one (which the stage did before, at three times the cost)."""
    from types import SimpleNamespace

    from llmlab.training.reward import centre_on_sft

    torch.manual_seed(0)
    model = RewardModel(CFG).eval()
    a, b, c, d = [1, 5, 6], [1, 5, 7, 8], [1, 9], [1, 5, 6, 2, 3]
    pairs = SimpleNamespace(items=[(a, b), (a, c), (a, d), (b, c)])
    every_side = score_sequences(model, [s for pair in pairs.items for s in pair])
    scale = centre_on_sft(model, None, None, pairs, [], True, 8, 0)
    assert model.offset == pytest.approx(every_side.mean().item(), abs=1e-6)
    assert scale == pytest.approx(every_side.std().item(), abs=1e-6)


def test_likelihood_read_once_per_reply_gives_the_rewards_computed_batch_by_batch():
    """The stage scores each distinct reply under the frozen reference once, before training
    (`PairDataset.read_likelihood`); training batches, the held-out metrics and the centring then read those
    features. Rewards and the loss's gradient must be what the model computes on its own, batch by batch."""
    from llmlab.training.reward import PairDataset, collate_pairs, likelihood_features, reply_likelihood

    torch.manual_seed(0)
    model = RewardModel(CFG, reads_likelihood=True)
    torch.nn.init.normal_(model.likelihood.weight)  # read it, or the test could not fail
    a = [1, USER_ID, 7, ASSISTANT_ID, 9, 10]
    b = [1, USER_ID, 7, ASSISTANT_ID, 11]
    c = [1, USER_ID, 8, ASSISTANT_ID, 12, 13, 14]
    pairs = PairDataset.__new__(PairDataset)
    pairs.items, pairs.strengths, pairs.likelihood = [(a, b), (a, c), (c, b)], [3, 1, 0], None
    pairs.targets = [1.0, 1.0, 1.0]
    assert pairs.replies() == [a, b, c]  # each reply once, in order of appearance
    known = pairs.read_likelihood(model.reference)
    for seq in (a, b, c):
        alone = reply_likelihood(model.reference, torch.tensor([seq]), torch.tensor([len(seq) - 1]))[0]
        torch.testing.assert_close(known[tuple(seq)], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        likelihood_features(model.reference, [c, a]), torch.stack([known[tuple(c)], known[tuple(a)]])
    )

    idx, last, strengths, likelihood, targets = collate_pairs([pairs[i] for i in range(3)])
    assert likelihood.shape == (6, 2)
    given = model(idx, last, likelihood=likelihood)
    computed = model(idx, last)
    torch.testing.assert_close(given, computed, atol=1e-5, rtol=0)
    grads = []
    for kwargs in ({"likelihood": likelihood}, {}):
        model.zero_grad()
        r = model(idx, last, **kwargs)
        bt_loss(r[:3], r[3:]).backward()
        grads.append(model.likelihood.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)

    seqs = [c, a, b]
    torch.testing.assert_close(
        score_sequences(model, seqs, likelihood=known), score_sequences(model, seqs), atol=1e-5, rtol=0
    )
    # a reply without known features (a new one) is an error, not a silent zero
    with pytest.raises(KeyError):
        score_sequences(model, [[1, USER_ID, 5, ASSISTANT_ID, 6]], likelihood=known)
