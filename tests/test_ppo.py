"""PPO: GAE against the textbook loop, the clipped losses by hand, the sequence layout, and PPO itself
on a toy task (it raises the reward; with a huge KL coefficient it stays at the reference)."""

from __future__ import annotations

import math
from collections import Counter

import lightning as L
import pytest
import torch

from llmlab.data.chat_data import GRADING_MIX
from llmlab.data.tokenizer import END_ID
from llmlab.data.world import build_world
from llmlab.errors import LlmlabError
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import PPOConfig, SyntheticCorpus
from llmlab.training.ppo import (
    KLController,
    check_replicas_agree,
    gae,
    iteration_prompts,
    kl_penalised_rewards,
    leave_one_out,
    make_sequences,
    masked_whiten,
    policy_loss,
    ppo_update,
    prompts,
    reply_logprobs,
    reply_scores,
    reply_values,
    rollout,
    value_loss,
)
from llmlab.training.reward import RewardModel, pad_batch
from llmlab.training.trainer import adamw

TINY = GPTConfig(vocab_size=24, d_model=16, n_layer=1, n_head=2, context_length=32, ffn_hidden=32)


def gae_loop(rewards, values, length, gamma, lam):
    """The textbook backwards recursion over one reply of `length` tokens."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 8, 3]
    R = max(lengths)
    rewards, values = (
        torch.randn(4, R, generator=g, dtype=torch.float64),
        torch.randn(4, R, generator=g, dtype=torch.float64),
    )
    mask = torch.arange(R)[None] < torch.tensor(lengths)[:, None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = gae_loop(rewards[i].tolist(), values[i].tolist(), n, gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-10)
        assert ret[i, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[i, :n].tolist(), strict=True)], abs=1e-10
        )
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0  # whatever sits in the padding


def test_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1; a fifth entry is padding.
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 9.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    out = policy_loss(new, old, adv, mask, cliprange=0.2)
    # max(-A·ρ, -A·clip(ρ)): max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(1.5, 1.2) = 1.5; max(0.5, 0.8) = 0.8
    assert out["loss"].item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert out["clipfrac"].item() == pytest.approx(0.5)  # the first and the last were clipped
    assert out["ratio"].item() == pytest.approx(1.0)
    assert out["approxkl"].item() == pytest.approx(0.5 * 2 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4)


def test_policy_loss_gradient_stops_outside_the_clip_range():
    new = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    out = policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.2)
    out["loss"].backward()
    assert new.grad[0, 0] == 0  # ρ = 1.5 > 1.2 with A > 0: nothing more to gain
    assert new.grad[0, 1] == pytest.approx(-1.1 / 2)  # d(-ρ)/d log ρ = -ρ, averaged over 2


def test_value_loss_by_hand():
    old = torch.zeros(1, 4)
    returns = torch.ones(1, 4)
    pred = torch.tensor([[0.5, 0.1, -0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    out = value_loss(pred, old, returns, mask, cliprange_value=0.2)
    # 0.5: max((0.5-1)², (0.2-1)²) = 0.64;  0.1: 0.81 (inside the range);  -0.5: max(2.25, (-0.2-1)²=1.44) = 2.25
    assert out["loss"].item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rewards, kl = kl_penalised_rewards(lp, ref, torch.tensor([10.0, 20.0]), mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 10.0], [-0.1 + 20.0, 0.0, 0.0]]))


def test_whitening_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    w = masked_whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w[0, 3] == 0


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    c = KLController(0.1, target=5.0, horizon=100)
    c.update(1.0, n=10)  # far below target: β shrinks by the capped 20 % · 10/100
    assert c.value == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    fixed = KLController(0.1)
    fixed.update(100.0, n=10)
    assert fixed.value == 0.1


def test_a_kl_ceiling_raises_beta_above_the_budget_and_never_lowers_it_below_its_start():
    c = KLController(0.1, target=1.0, horizon=100, ceiling=True)
    c.update(0.2, n=10)  # within the budget: β stays where it started (a fixed β would train the same)
    assert c.value == 0.1
    for _ in range(3):  # over it: β grows by the capped 20 % · 10/100 each batch
        c.update(3.0, n=10)
    assert c.value == pytest.approx(0.1 * 1.02**3)
    for _ in range(10):  # back under it: β falls back, but not below 0.1
        c.update(0.5, n=10)
    assert c.value == 0.1


LONG_PROMPT = [1, *[(5 + i) % 20 + 2 for i in range(26)], 3]  # 28 of TINY's 32 positions


@pytest.mark.parametrize(
    "prompts,replies",
    [
        ([[1, 2, 5, 3], [1, 2, 6, 7, 8, 9, 3]], [[10, 11, END_ID], [12]]),
        # each row fits the context, the layout does not (28 + 24 columns): a short prompt's reply may be
        # longer than a long prompt leaves room for (`generate` gives each row its own room)
        ([[1, 2, 5, 3], LONG_PROMPT], [[*range(4, 20), *range(4, 11), END_ID], [12, 13, END_ID]]),
    ],
    ids=["short", "wider-than-the-context"],
)
def test_sequence_layout_matches_unpadded_forward_passes(prompts, replies):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    value = RewardModel(TINY).eval()
    seqs = make_sequences(prompts, replies)
    assert seqs.mask[:, : len(replies[1])].all() and seqs.mask[1, len(replies[1]) :].sum() == 0
    assert seqs.ended.tolist() == [r[-1] == END_ID for r in replies]
    with torch.no_grad():
        lp, none = reply_logprobs(model, seqs, temperature=0.7)
        _, entropy = reply_logprobs(model, seqs, temperature=0.7, entropy=True)
        assert none is None  # the entropy is computed only where it is logged
        values = reply_values(value, seqs)
        scores = reply_scores(value, seqs, missing_eos_penalty=0.5)
        for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
            full = torch.tensor([p + r])
            logits, _ = model(full)
            logp = torch.log_softmax(logits[0, len(p) - 1 : -1] / 0.7, dim=-1)
            expected = logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(lp[i, : len(r)], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[i, : len(r)], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)
            v = value(full)[0, len(p) - 1 : -1]
            torch.testing.assert_close(values[i, : len(r)], v, atol=1e-5, rtol=0)
            alone = value(*pad_batch([p + r]))[0] - (0.0 if r[-1] == END_ID else 0.5)
            assert scores[i].item() == pytest.approx(alone.item(), abs=1e-5)
        # A minibatch of the short-prompt row alone drops the columns that are padding in all its rows.
        one = seqs.select(torch.tensor([0])).trimmed()
        assert one.ids.tolist() == [prompts[0] + replies[0]] and one.prompt_width == len(prompts[0])
        torch.testing.assert_close(reply_logprobs(model, one, 0.7)[0], lp[:1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ PPO on a toy task


class CountReward(torch.nn.Module):
    """A stand-in reward model: the number of times token 7 appears in the reply (after the prompt)."""

    def __init__(self, prompt_len: int):
        super().__init__()
        self.prompt_len = prompt_len
        self.dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, idx, last, positions=None, attn_mask=None, likelihood=None):
        cols = torch.arange(idx.shape[1])[None]
        in_reply = (cols >= self.prompt_len) & (cols <= last[:, None])
        return ((idx == 7) & in_reply).sum(dim=1).float()


def toy_ppo(kl_coef: float, iterations: int = 12, **ppo) -> tuple[float, float, float]:
    """Train a tiny policy to emit token 7; return (score before, score after, KL to the reference after)."""
    L.seed_everything(0, verbose=False)
    cfg = PPOConfig(
        **ppo,
        rollout_batch_size=32,
        minibatch_size=16,
        ppo_epochs=4,
        lr=1e-2,
        max_new_tokens=6,
        kl_coef=kl_coef,
        missing_eos_penalty=0.0,
        accelerator="cpu",
    )
    fabric = L.Fabric(accelerator="cpu", devices=1)
    ref = GPT(TINY).eval().requires_grad_(False)
    policy = GPT(TINY)
    policy.load_state_dict(ref.state_dict())
    value = RewardModel(TINY)
    policy_opt, value_opt = (
        adamw(policy, cfg.lr, 0.0, (0.9, 0.95), "cpu"),
        adamw(value, cfg.lr, 0.0, (0.9, 0.95), "cpu"),
    )
    policy, policy_opt = fabric.setup(policy, policy_opt)
    value, value_opt = fabric.setup(value, value_opt)
    prompts = [[1, 2, 3]] * cfg.rollout_batch_size
    reward = CountReward(prompt_len=3)
    value_before = [p.detach().clone() for p in value.parameters()]
    scores, kls = [], []
    for it in range(iterations):
        gen = torch.Generator().manual_seed(it)
        batch = rollout(policy, ref, reward, value, prompts, cfg, kl_coef, gen, sampler=policy.module)
        scores.append(batch.scores.mean().item())
        kls.append(batch.kl.sum(dim=1).mean().item())
        ppo_update(fabric, policy, value, policy_opt, value_opt, batch, cfg, gen)
    value_trained = any(not torch.equal(a, b) for a, b in zip(value_before, value.parameters(), strict=True))
    assert value_trained == (cfg.advantage == "gae")  # rloo has no value model to train
    return scores[0], sum(scores[-3:]) / 3, sum(kls[-3:]) / 3


def test_ppo_raises_the_reward_and_huge_beta_keeps_the_policy_at_the_reference():
    before, after, kl_free = toy_ppo(kl_coef=0.0)
    assert after > before + 1.0, (before, after)  # it learned to say 7 more often
    assert kl_free > 1.0
    _, after_tied, kl_tied = toy_ppo(kl_coef=100.0)
    assert kl_tied < 0.1 * kl_free, (kl_tied, kl_free)
    assert after_tied < after


def test_rloo_raises_the_reward_without_a_value_model():
    before, after, kl = toy_ppo(kl_coef=0.0, advantage="rloo", samples_per_prompt=4)
    assert after > before + 1.0, (before, after)
    assert kl > 1.0


def test_leave_one_out_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):
        rewards = torch.randn(4 * k, generator=g)
        expected = []
        for i in range(len(rewards)):
            group = range(i // k * k, i // k * k + k)
            others = [rewards[j].item() for j in group if j != i]
            expected.append(rewards[i].item() - sum(others) / len(others))
        torch.testing.assert_close(leave_one_out(rewards, k), torch.tensor(expected))
        assert leave_one_out(rewards, k).view(-1, k).sum(dim=1).abs().max() < 1e-5  # each group sums to 0


def test_rloo_advantages_do_not_depend_on_the_reply_they_credit():
    """Identical replies to a prompt get advantage 0; a better reply in its group gets a positive one."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 4.0])
    adv = leave_one_out(rewards, 4)
    assert adv[:4].abs().max() == 0 and adv[7] > 0 and (adv[4:7] < 0).all()


@pytest.mark.parametrize("k, world_size", [(1, 1), (1, 2), (4, 1), (4, 2), (2, 4)])
def test_iteration_prompts_keep_each_group_of_replies_on_one_process(k, world_size):
    replies, stream = 16, [f"p{i}" for i in range(100)]
    for it in (0, 3):
        per_process = [iteration_prompts(stream, it, replies, k, r, world_size) for r in range(world_size)]
        assert sum(map(len, per_process)) == replies
        drawn = Counter(p for ps in per_process for p in ps)
        assert set(drawn) == set(stream[it * replies // k : (it + 1) * replies // k])  # the next prompts
        assert set(drawn.values()) == {k}
        for ps in per_process:  # each prompt's k replies side by side, on one process
            assert ps == [p for p in dict.fromkeys(ps) for _ in range(k)]
        if k == 1:  # one reply per prompt: the layout before samples_per_prompt existed
            assert per_process == [
                [stream[it * replies + j] for j in range(r, replies, world_size)] for r in range(world_size)
            ]


class _TwoProcesses:
    """A stand-in for a 2-process Fabric whose other process holds `other`: all_reduce "max" over both.
    The other process makes the same calls, so its value is negated wherever ours is (the second call)."""

    world_size = 2

    def __init__(self, other: torch.nn.Module):
        self.other, self.calls = other, 0

    def all_reduce(self, value, reduce_op):
        assert reduce_op == "max"
        flat = torch.cat([p.detach().double().flatten() for p in self.other.parameters()])
        position = torch.arange(1, len(flat) + 1, dtype=torch.float64) / len(flat)
        theirs = torch.stack([flat.sum(), (flat * position).sum()])
        self.calls += 1
        return torch.maximum(value, theirs if self.calls % 2 else -theirs)


def test_replicas_that_drifted_apart_fail_loudly_and_equal_ones_pass():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=30, d_model=16, n_layer=1, n_head=2, context_length=16))
    twin = GPT(policy.config)
    twin.load_state_dict(policy.state_dict())
    check_replicas_agree(_TwoProcesses(twin), {"policy": policy})
    with torch.no_grad():  # two weights swapped: the plain sum alone would not see it
        w = twin.blocks[0].attn.proj.weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
    with pytest.raises(LlmlabError, match="the 2 processes' policy weights differ after training"):
        check_replicas_agree(_TwoProcesses(twin), {"policy": policy})


def test_the_prompt_mix_changes_what_ppo_trains_on_not_what_it_is_graded_on():
    """`ppo.prompt_mix` draws the training prompts; the held-out prompts the stage grades SFT and PPO on keep
    `GRADING_MIX`, so that figures stay comparable when the mix changes."""
    world = build_world(SyntheticCorpus(n_sft_people=40, n_heldout_people=10, n_unknown_people=10), seed=3)
    mixes = [{"fact": 1.0}, {"fact": 0.5, "unknown": 0.5}]
    cfgs = [PPOConfig(n_prompts=200, eval_prompts=100, prompt_mix=m) for m in mixes]
    trained = [Counter(t.kind for t in prompts(world, "", "rl", c, seed=0)) for c in cfgs]
    assert trained[0] == {"fact": 200} and 80 <= trained[1]["unknown"] <= 120
    graded = [[t.prompt for t in prompts(world, "", "eval", c, seed=0)] for c in cfgs]
    assert graded[0] == graded[1] and len(graded[0]) == 100
    # nor does the default mix: the graded prompts keep GRADING_MIX's shares whatever DEFAULT_MIX says
    kinds = Counter(t.kind for t in prompts(world, "", "eval", PPOConfig(eval_prompts=400), seed=0))
    for kind, share in GRADING_MIX.items():
        assert abs(kinds[kind] / 400 - share) < 0.06, (kind, kinds)


def test_the_reward_reads_its_likelihood_from_ppos_reference_log_probs_when_they_are_one_model():
    """When the reward model's frozen reference is PPO's reference (the SFT model, at temperature 1), the
    rollout reads the reward's likelihood features from the reference log-probs it already has: the scores
    must be those the reward model computes with its own reference. Replies may hold an <|assistant|> token:
    the reward model reads only what follows the last one, and so must the shared path."""
    from llmlab.data.tokenizer import ASSISTANT_ID
    from llmlab.training.ppo import shares_reference

    torch.manual_seed(0)
    ref = GPT(TINY).eval().requires_grad_(False)
    reward = RewardModel(TINY, reads_likelihood=True).eval()
    reward.reference.load_state_dict(ref.state_dict())
    torch.nn.init.normal_(reward.likelihood.weight)
    assert shares_reference(ref, reward, 1.0)
    assert not shares_reference(ref, reward, 0.7) and not shares_reference(ref, RewardModel(TINY), 1.0)
    assert not shares_reference(GPT(TINY), reward, 1.0)  # another model's weights

    prompts = [[1, 2, 5, ASSISTANT_ID], [1, 2, 6, 7, 8, ASSISTANT_ID], [1, ASSISTANT_ID]]
    replies = [[9, 10, END_ID], [11, ASSISTANT_ID, 12, 13], [14]]
    seqs = make_sequences(prompts, replies)
    ref_logprobs, _ = reply_logprobs(ref, seqs, 1.0)
    with torch.no_grad():
        shared = reply_scores(reward, seqs, 1.0, ref_logprobs)
        own = reply_scores(reward, seqs, 1.0)
    torch.testing.assert_close(shared, own, atol=1e-5, rtol=0)
