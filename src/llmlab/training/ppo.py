"""RLHF with PPO: the SFT model, now a policy, learns to write replies the reward model scores higher,
while a KL penalty keeps it close to the SFT model it started from.

Four models take part (InstructGPT, Ouyang et al. 2022):

    policy      π       initialised from SFT, trained
    reference   π_ref   the SFT model, frozen: the KL penalty measures how far π has moved from it
    reward      r       the reward model (stage `reward`), frozen: scores a whole reply
    value       V       initialised from the reward model, trained: predicts the return from each token

Each iteration (numbered as in the code below):

    1. sample one reply per prompt from π, batched, with the KV cache;
    2. log-probabilities of the sampled tokens under π and π_ref, at the sampling temperature;
    3. score each reply with r, minus `missing_eos_penalty` when it never produced <|end|>;
    4. per-token reward  r_t = −β·(log π(y_t) − log π_ref(y_t)),  plus the score at the reply's last token;
    5. advantages by GAE(γ, λ) against V, then whitened; returns = advantages + values
       (or, with `advantage: rloo`, one per reply: its KL-penalised reward minus the mean of the other
       replies to the same prompt, scaled to unit spread; V is then neither used nor trained);
    6. `ppo_epochs` passes over shuffled minibatches: the clipped policy loss
           max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)),  ρ = π_new(y_t) / π_old(y_t)
       plus vf_coef × the clipped value loss
           ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²);
    7. the KL controller updates β: by default a budget (β rises while the KL per reply is over
       `kl_target`, never falls below `kl_coef`); `track` steers it towards the target both ways, and
       `kl_target: null` keeps it fixed.

Choices:

- **Lightning Fabric, not a LightningModule.** One PPO iteration is "generate, score, then several epochs
  over the batch just generated, with two models and two optimisers"; the Trainer's loop (a dataloader,
  one optimiser step per batch) fits it only when bent with manual optimisation and a fake dataloader.
  Fabric keeps the loop plain Python and still gives the same accelerator, precision, DDP and
  checkpointing switches as the other stages.
- **Value model initialised from the reward model**, a separate network (InstructGPT; the N+
  implementation details). The reward model already knows which replies score well, so the first value
  estimates are informed, and a separate network keeps value-loss gradients out of the policy. It costs
  one more forward and backward pass per update; at this model size that is affordable.

Deviations from InstructGPT and from "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024):

- No pretraining-gradient mix (InstructGPT's PPO-ptx): the loss is PPO's alone.
- A reply without <|end|> keeps its score minus `missing_eos_penalty` (TRL), rather than a fixed −1.
- Constant learning rate (N+ anneals it linearly to 0); AdamW's ε is PyTorch's 1e-8, not 1e-5.
- Advantages are whitened per process, not over all processes of a distributed run (as TRL does).
- Scale: 64 prompts per iteration in minibatches of 16, against 512 in N+; 2 PPO epochs by default
  (both papers use 4) to fit the laptop's time budget.
- The reward is not normalised during PPO; the reward stage already shifted it so the SFT model's own
  replies score 0 on average (InstructGPT normalises the same way, once, before RL).
- β as a ceiling on the KL by default: InstructGPT fixes β, Ziegler et al. (2019) steer it to a target both
  ways. Steering down lets an early, quiet policy overshoot; a fixed β lets a policy facing a weak reward
  model (the model's own labels, docs/results.md "A KL budget for PPO") run to 2-4 nats and lose gold.
- `objective/entropy` is TRL's estimate: the mean over replies of the summed −log π of the sampled
  tokens. No entropy bonus is added to the loss (neither paper uses one).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from llmlab.data.chat_data import prompt_pool
from llmlab.data.chat_template import parse_reply, render
from llmlab.data.preferences import pair_contexts
from llmlab.data.tasks import Task
from llmlab.data.tokenizer import END_ID, PAD_ID
from llmlab.data.world import World
from llmlab.errors import LlmlabError
from llmlab.evaluation.rater import Rater, chat_metrics
from llmlab.model.generate import generate
from llmlab.model.replies import REPLY_LENGTH_RANK, reply
from llmlab.model.transformer import GPT, padded_attention_mask
from llmlab.stats import mean_ci, paired_diff_ci, wilson_ci
from llmlab.tracking import is_global_zero
from llmlab.training import checkpoints
from llmlab.training.checkpoints import AtomicCheckpointIO
from llmlab.training.reward import RewardModel, reply_span
from llmlab.training.trainer import Epochs, adamw, fused_adamw_clips

log = logging.getLogger("llmlab.training.ppo")

# ------------------------------------------------------------------------------------ the pieces


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask is true.

    >>> masked_mean(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]]))
    tensor(1.5000)
    """
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries; entries outside the mask become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over each reply, vectorised.

        δ_t = r_t + γ·V_{t+1} − V_t          (V after the last token is 0: the episode ends there)
        A_t = Σ_k (γλ)^k · δ_{t+k}

    rewards, values, mask: (B, R) with the reply's tokens first and padding after. Returns
    (advantages, returns = advantages + values), 0 on padding. tests/test_ppo.py checks it against the
    textbook backwards loop.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    next_values = F.pad(values[:, 1:], (0, 1))  # V_{t+1}, 0 past the end
    deltas = rewards + gamma * next_values - values  # 0 on padding
    R = rewards.shape[1]
    t = torch.arange(R, device=rewards.device)
    lag = t[None, :] - t[:, None]  # lag[t, s] = s − t
    decay = torch.where(
        lag >= 0,
        torch.tensor(gamma * lam, dtype=values.dtype, device=values.device).pow(lag.clamp(min=0)),
        0.0,
    )
    advantages = deltas @ decay.T  # A[b, t] = Σ_s δ[b, s] · (γλ)^(s − t) for s ≥ t
    return advantages * m, (advantages + values) * m


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate (as a loss to minimise), and what TRL reports about it."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return {
        "loss": masked_mean(torch.maximum(unclipped, clipped), mask),
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approxkl": 0.5 * masked_mean(logratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> dict[str, torch.Tensor]:
    """The clipped value loss ½·max((V − R)², (V_clipped − R)²), V_clipped within ε_v of the rollout's V."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return {
        "loss": 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask),
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
    }


def kl_penalised_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −β·(log π − log π_ref), with each reply's score added at its last token.

    Returns (rewards, kl), both (B, R) and 0 on padding. kl is the k1 estimate log π − log π_ref of the
    sampled token; summed over a reply, its expectation is KL(π ‖ π_ref) of that reply.
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    last = m.sum(dim=1).long() - 1  # (B,) index of each reply's last token
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    return rewards, kl


def leave_one_out(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024): rewards (B,) hold k
    consecutive replies to each prompt; each reply's advantage is its reward minus the mean reward of the
    other k − 1 replies to the same prompt, a baseline that does not depend on the reply itself.

    >>> leave_one_out(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    tensor([-3.0000, -1.5000,  4.5000, -1.5000, -1.5000,  3.0000])
    """
    groups = rewards.view(-1, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).view(-1)


class KLController:
    """β, fixed or adaptive (Ziegler et al. 2019): with a target, after each batch

        β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)

    where KL is the batch's mean KL per reply and n the replies in the batch. With `ceiling` the target is a
    budget rather than a set point: β rises while the KL is above it and falls back while below, but never
    under its initial value, so a policy that stays within the budget trains exactly as with a fixed β.

    >>> c = KLController(0.1, target=6.0, horizon=100)
    >>> c.update(12.0, n=10); round(c.value, 4)  # KL twice the target: β grows, by at most 20 % · 10/100
    0.102
    >>> c = KLController(0.1, target=6.0, horizon=100, ceiling=True)
    >>> c.update(1.0, n=10); c.value  # within the budget: β stays at its initial value
    0.1
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000, ceiling: bool = False):
        self.value, self.target, self.horizon = init, target, horizon
        self.floor = init if ceiling else 0.0

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.floor, self.value * (1.0 + error * n / self.horizon))


# ------------------------------------------------------------------------------------ rollouts


@dataclass
class Sequences:
    """A batch of prompt + reply sequences laid out for one forward pass of every model.

    Prompts are left-padded to width P and replies right-padded to width R, so the reply tokens of every
    row start at column P:

        PAD PAD <bos> <user> ... <assistant> | y_0 y_1 <end> PAD
        <bos> <user> ...         <assistant> | y_0 y_1 y_2   y_3

    `positions` counts each row's real tokens from 0 (padding never shifts RoPE), `attn_mask` hides the
    padding, and the logits that predict reply token t are at column P − 1 + t.
    """

    ids: torch.Tensor  # (B, P + R)
    valid: torch.Tensor  # (B, P + R) bool, False on padding
    positions: torch.Tensor  # (B, P + R)
    attn_mask: torch.Tensor  # (B, 1, P + R, P + R)
    prompt_width: int  # P

    @property
    def response(self) -> torch.Tensor:
        """(B, R) reply tokens, PAD after each reply's end."""
        return self.ids[:, self.prompt_width :]

    @property
    def mask(self) -> torch.Tensor:
        """(B, R) True on reply tokens (the closing <|end|> included)."""
        return self.valid[:, self.prompt_width :]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    @property
    def ended(self) -> torch.Tensor:
        """(B,) True where the reply closed with <|end|>."""
        last = self.lengths - 1
        return self.response[torch.arange(len(last)), last] == END_ID

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, rows: torch.Tensor) -> Sequences:
        return Sequences(
            self.ids[rows], self.valid[rows], self.positions[rows], self.attn_mask[rows], self.prompt_width
        )

    def trimmed(self) -> Sequences:
        """The same rows without the columns that are padding in every row: a minibatch of short replies
        then costs what short replies cost."""
        P = self.prompt_width
        first = int(self.valid[:, :P].long().argmax(dim=1).min())  # the longest prompt's first token
        end = P + int(self.lengths.max())
        return Sequences(
            self.ids[:, first:end],
            self.valid[:, first:end],
            self.positions[:, first:end],
            self.attn_mask[:, :, first:end, first:end],
            P - first,
        )

    def to(self, device) -> Sequences:
        return Sequences(
            self.ids.to(device),
            self.valid.to(device),
            self.positions.to(device),
            self.attn_mask.to(device),
            self.prompt_width,
        )


def make_sequences(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]]) -> Sequences:
    """Lay out prompts and their replies (each reply at least one token) as `Sequences`."""
    if any(len(r) == 0 for r in replies):
        raise ValueError("every reply needs at least one token")
    P, R = max(map(len, prompts)), max(map(len, replies))
    B = len(prompts)
    ids = torch.full((B, P + R), PAD_ID, dtype=torch.long)
    valid = torch.zeros(B, P + R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(list(p))
        ids[i, P : P + len(r)] = torch.tensor(list(r))
        valid[i, P - len(p) : P + len(r)] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return Sequences(ids, valid, positions, padded_attention_mask(valid, P + R), P)


def reply_logprobs(
    policy, seqs: Sequences, temperature: float, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | context) of each reply token at `temperature`, and, when asked, the entropy of π there
    (for the logs only: no gradient flows through it); (B, R) each, the entropy None when not asked.

    `policy` is called like GPT (a Fabric-wrapped GPT too, so that DDP sees the forward pass).
    """
    P, R = seqs.prompt_width, seqs.response.shape[1]
    # only the logits that predict reply tokens: the prompt's positions skip the LM head
    logits, _ = policy(seqs.ids, positions=seqs.positions, attn_mask=seqs.attn_mask, logits_from=P - 1)
    logits = logits[:, :R].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, seqs.response.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, -(logp_all.exp() * logp_all).sum(dim=-1)


def reply_values(value_model, seqs: Sequences) -> torch.Tensor:
    """V at the state before each reply token (the same columns as the logits), (B, R)."""
    v = value_model(seqs.ids, None, seqs.positions, seqs.attn_mask)
    P, R = seqs.prompt_width, seqs.response.shape[1]
    return v[:, P - 1 : P + R - 1].float()


def reply_scores(
    reward_model: RewardModel,
    seqs: Sequences,
    missing_eos_penalty: float,
    ref_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reward model's score of each whole reply, read at its last token; minus the penalty if it never ended.

    `ref_logprobs`: the reply tokens' log-probabilities (B, R) at temperature 1 under the model that *is* the
    reward model's reference (`shares_reference`): its likelihood features are read from them instead of
    running that model over the sequences again."""
    last = seqs.prompt_width + seqs.lengths - 1
    likelihood = None
    if ref_logprobs is not None:
        P, R = seqs.prompt_width, seqs.response.shape[1]
        span = reply_span(seqs.ids, last)[:, P - 1 : P + R - 1]  # (B, R): the reply tokens the reward reads
        total = torch.where(span, ref_logprobs, 0.0).sum(dim=1)
        lowest = torch.where(span, ref_logprobs, torch.inf).amin(dim=1)
        likelihood = torch.stack([total, torch.where(span.any(dim=1), lowest, 0.0)], dim=1)
    scores = reward_model(seqs.ids, last, seqs.positions, seqs.attn_mask, likelihood=likelihood).float()
    return scores - missing_eos_penalty * (~seqs.ended).float()


def shares_reference(ref: GPT, reward_model, temperature: float) -> bool:
    """Whether the reward model reads its likelihood features from the very model PPO holds as its reference,
    at the temperature PPO scores replies at (1): then one forward pass of it serves both."""
    other = getattr(reward_model, "reference", None)
    if not getattr(reward_model, "reads_likelihood", False) or temperature != 1.0 or other is None:
        return False
    mine, theirs = ref.state_dict(), other.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@dataclass
class Rollout:
    """One iteration's batch with everything PPO needs (tensors (B, R) unless noted)."""

    seqs: Sequences
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,)
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor


@torch.no_grad()
def rollout(
    policy,
    ref: GPT,
    reward_model: RewardModel,
    value_model,
    prompts: Sequence[Sequence[int]],
    cfg,
    kl_coef: float,
    generator: torch.Generator | None = None,
    sampler: GPT | None = None,
    shared_reference: bool = False,
) -> Rollout:
    """Phases 1–5 for one batch of prompts. `sampler` is the bare policy for generation (default: policy);
    `shared_reference`: `ref` is the reward model's reference too (`shares_reference`)."""
    device = next(ref.parameters()).device
    # 1. sample
    replies = generate(
        sampler or policy,
        prompts,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        stop_ids=[END_ID],
        generator=generator,
    )
    replies = [r or [END_ID] for r in replies]  # no room left in the context: an empty, ended reply
    seqs = make_sequences(prompts, replies).to(device)
    # 2. log-probabilities under the policy and the reference, at the sampling temperature
    logprobs, _ = reply_logprobs(policy, seqs, cfg.temperature)
    ref_logprobs, _ = reply_logprobs(ref, seqs, cfg.temperature)
    # 3. score, with the penalty for a reply that never ended
    scores = reply_scores(
        reward_model, seqs, cfg.missing_eos_penalty, ref_logprobs if shared_reference else None
    )
    # 4. per-token rewards: the KL penalty on every token, the score on the last
    rewards, kl = kl_penalised_rewards(logprobs, ref_logprobs, scores, seqs.mask, kl_coef)
    # 5. advantages: GAE against the value model's estimates, whitened; or each reply's against the others
    #    to its prompt (rloo), with no value model
    if cfg.advantage == "rloo":
        per_reply = leave_one_out(scores - kl_coef * kl.sum(dim=1), cfg.samples_per_prompt)
        advantages = (per_reply / per_reply.std().clamp(min=1e-8))[:, None] * seqs.mask
        values = returns = torch.zeros_like(advantages)
    else:
        values = reply_values(value_model, seqs) * seqs.mask
        advantages, returns = gae(rewards, values, seqs.mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, seqs.mask)
    return Rollout(
        seqs, logprobs * seqs.mask, ref_logprobs * seqs.mask, values, scores, rewards, kl, advantages, returns
    )


class NonFiniteLoss(ArithmeticError):
    """A PPO loss became NaN or infinite; the stage turns it into a message naming the iteration."""


def ppo_update(
    fabric,
    policy,
    value_model,
    policy_opt,
    value_opt,
    batch: Rollout,
    cfg,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Phase 6: `ppo_epochs` passes over shuffled minibatches; returns the averages TRL logs."""
    n, trains_value = len(batch.seqs), cfg.advantage == "gae"
    stats: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio", "entropy")
    }
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.minibatch_size):
            rows = order[start : start + cfg.minibatch_size].to(batch.seqs.ids.device)
            mb = batch.seqs.select(rows).trimmed()
            m, R = mb.mask, mb.mask.shape[1]
            logprobs, entropy = reply_logprobs(policy, mb, cfg.temperature, entropy=True)
            pg = policy_loss(logprobs, batch.logprobs[rows, :R], batch.advantages[rows, :R], m, cfg.cliprange)
            if trains_value:
                values = reply_values(value_model, mb)
                vf = value_loss(
                    values, batch.values[rows, :R], batch.returns[rows, :R], m, cfg.cliprange_value
                )
                loss = pg["loss"] + cfg.vf_coef * vf["loss"]
            else:
                vf = {"loss": torch.zeros_like(pg["loss"]), "clipfrac": torch.zeros_like(pg["loss"])}
                loss = pg["loss"]
            if not torch.isfinite(loss):  # before backward: the weights stay those of the last good update
                raise NonFiniteLoss(f"policy loss {pg['loss'].item()}, value loss {vf['loss'].item()}")
            policy_opt.zero_grad(set_to_none=True)
            value_opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            if cfg.grad_clip:
                fabric.clip_gradients(policy, policy_opt, max_norm=cfg.grad_clip)
                if trains_value:
                    fabric.clip_gradients(value_model, value_opt, max_norm=cfg.grad_clip)
            policy_opt.step()
            if trains_value:
                value_opt.step()
            with torch.no_grad():
                for k, v in (
                    ("pg_loss", pg["loss"]),
                    ("vf_loss", vf["loss"]),
                    ("pg_clipfrac", pg["clipfrac"]),
                    ("vf_clipfrac", vf["clipfrac"]),
                    ("approxkl", pg["approxkl"]),
                    ("ratio", pg["ratio"]),
                    ("entropy", masked_mean(entropy, m)),
                ):
                    stats[k].append(v.detach())
    return {k: float(torch.stack(v).mean()) for k, v in stats.items()}


def rollout_metrics(batch: Rollout, kl_coef: float) -> dict[str, float]:
    """The rollout half of TRL's per-iteration metrics (means over the batch's replies)."""
    non_score = -kl_coef * batch.kl.sum(dim=1)
    return {
        "objective/kl": float(batch.kl.sum(dim=1).mean()),
        "objective/entropy": float((-batch.logprobs).sum(dim=1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((batch.scores + non_score).mean()),
        "objective/scores": float(batch.scores.mean()),
        "val/num_eos_tokens": float(batch.seqs.ended.sum()),
        "val/reply_length": float(batch.seqs.lengths.float().mean()),
        "val/value_mean": float(masked_mean(batch.values, batch.seqs.mask)),
        "kl_coef": kl_coef,
    }


def update_metrics(stats: dict[str, float]) -> dict[str, float]:
    """The update half of TRL's metrics, under TRL's names."""
    return {
        "policy/approxkl_avg": stats["approxkl"],
        "policy/clipfrac_avg": stats["pg_clipfrac"],
        "policy/entropy_avg": stats["entropy"],
        "loss/policy_avg": stats["pg_loss"],
        "loss/value_avg": stats["vf_loss"],
        "val/clipfrac_avg": stats["vf_clipfrac"],
        "val/ratio": stats["ratio"],
    }


def check_replicas_agree(fabric, models: dict[str, torch.nn.Module]) -> None:
    """Under DDP every process holds its own copy of the weights and applies the same averaged gradients,
    so the copies must stay equal; rank 0 saves its own. Compare a fingerprint of each copy (the sum and a
    position-weighted sum of every weight, in float64) across processes, and fail loudly if they drifted."""
    if fabric.world_size == 1:
        return
    for name, model in models.items():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        position = torch.arange(1, len(flat) + 1, dtype=torch.float64, device=flat.device) / len(flat)
        mine = torch.stack([flat.sum(), (flat * position).sum()])
        highest, lowest = fabric.all_reduce(mine, reduce_op="max"), -fabric.all_reduce(-mine, reduce_op="max")
        if not torch.allclose(highest, lowest, rtol=1e-9, atol=1e-9):
            raise LlmlabError(
                f"ppo: the {fabric.world_size} processes' {name} weights differ after training (fingerprints from "
                f"{lowest.tolist()} to {highest.tolist()}); DDP lost synchronisation: please report this with the params"
            )


# The stage's pieces around the loop: models on the device, gold metrics, the SFT-against-PPO comparison.


def frozen(fabric: L.Fabric, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is only ever run forward: on the device, in the run's precision, no gradients."""
    model.requires_grad_(False)
    return fabric.to_device(fabric.strategy.precision.convert_module(model)).eval()


def context_of(prompt) -> list[dict]:
    """The conversation to answer: a Task's single user turn, or a preference pair's context."""
    return [{"role": "user", "content": prompt.prompt}] if isinstance(prompt, Task) else prompt


def mean_over_processes(fabric: L.Fabric, metrics: dict[str, float]) -> dict[str, float]:
    keys = list(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=fabric.device)
    return dict(zip(keys, fabric.all_reduce(values, reduce_op="mean").tolist(), strict=True))


def gold_metrics(tok, rater: Rater, tasks, batch) -> dict[str, float]:
    """The rater's score of the rollout's replies: logged next to the reward model's, never optimised."""
    lengths = batch.seqs.lengths.tolist()
    scores = []
    unknown = hallucinated = 0
    for task, row, n in zip(tasks, batch.seqs.response.tolist(), lengths, strict=True):
        r = parse_reply(tok, row[:n])
        s = rater.score(task, r.text, r.ended)
        scores.append(s.total)
        if task.kind == "unknown":
            unknown += 1
            hallucinated += s.hallucinated
    return {
        "gold/score": statistics.fmean(scores),
        "gold/unknown_prompts": unknown,
        "gold/hallucinations": hallucinated,
    }


@torch.no_grad()
def compare_with_sft(
    policy: GPT,
    ref: GPT,
    reward_model,
    tok,
    prompts: list,
    rater: Rater | None,
    world: World,
    cfg,
    seed: int,
    device,
    tuned: str = "ppo",
) -> tuple[dict, list[dict]]:
    """SFT against the tuned `policy` (named `tuned`: ppo, or dpo) on held-out prompts: greedy replies scored
    by the reward model and (with a world) graded by the rater, each gain with its paired 95 % interval;
    and the KL of replies sampled at ppo.temperature, as in PPO's training."""
    metrics: dict[str, float] = {"n_prompts": len(prompts)}
    if rater:  # short replies batched together (see replies.answer); the order of the prompts is the report's
        prompts = sorted(prompts, key=lambda t: REPLY_LENGTH_RANK[t.kind])
    contexts = [context_of(t) for t in prompts]
    ids = [render(tok, c, add_generation_prompt=True).ids for c in contexts]
    replies: dict[str, list] = {}
    gold: dict[str, list[float]] = {}
    proxy: dict[str, list[float]] = {}
    for name, model in (("sft", ref), (tuned, policy)):
        replies[name] = reply(model, tok, contexts, cfg.eval_max_new_tokens)
        seqs = make_sequences(ids, [list(r.tokens) or [END_ID] for r in replies[name]]).to(device)
        proxy[name] = reply_scores(reward_model, seqs, cfg.missing_eos_penalty).tolist()
        metrics[f"{name}/reward_score_mean"] = statistics.fmean(proxy[name])
        if rater:
            scores = [rater.score(t, r.text, r.ended) for t, r in zip(prompts, replies[name], strict=True)]
            gold[name] = [sc.total for sc in scores]
            groups = {p.name: p.group for p in world.people}
            metrics |= {
                f"{name}/{k}": v
                for k, v in chat_metrics(prompts, replies[name], rater, groups).items()
                if k != "n_prompts"
            }
            unknown = [sc.hallucinated for t, sc in zip(prompts, scores, strict=True) if t.kind == "unknown"]
            if unknown:
                lo, hi = wilson_ci(sum(unknown), len(unknown))
                metrics |= {f"{name}/hallucination_ci_low": lo, f"{name}/hallucination_ci_high": hi}
    metrics["reward_gain"], metrics["reward_gain_ci95"] = paired_diff_ci(proxy[tuned], proxy["sft"])
    if rater:
        metrics["gold_gain"], metrics["gold_gain_ci95"] = paired_diff_ci(gold[tuned], gold["sft"])
    # KL(π ‖ π_ref) per reply, estimated on replies sampled from the policy as in training.
    gen = torch.Generator(device).manual_seed(seed)
    sampled = reply(policy, tok, contexts, cfg.max_new_tokens, temperature=cfg.temperature, generator=gen)
    kls = []
    for i in range(0, len(ids), 64):
        seqs = make_sequences(ids[i : i + 64], [list(r.tokens) or [END_ID] for r in sampled[i : i + 64]]).to(
            device
        )
        lp, _ = reply_logprobs(policy, seqs, cfg.temperature)
        lp_ref, _ = reply_logprobs(ref, seqs, cfg.temperature)
        kls += ((lp - lp_ref) * seqs.mask).sum(dim=1).tolist()
    metrics["kl_to_sft"], metrics["kl_to_sft_ci95"] = mean_ci(kls)
    rows = []
    for i, t in enumerate(prompts):
        row = {
            "kind": t.kind if rater else "prompt",
            "prompt": context_of(t)[-1]["content"],
            "sft": replies["sft"][i].text,
            tuned: replies[tuned][i].text,
            "reward_sft": proxy["sft"][i],
            f"reward_{tuned}": proxy[tuned][i],
        }
        if rater:
            row |= {"gold_sft": gold["sft"][i], f"gold_{tuned}": gold[tuned][i]}
        rows.append(row)
    return metrics, rows


def replies_markdown(rows: list[dict], tuned: str = "ppo", per_kind: int = 6) -> str:
    """A few replies of each kind, SFT's and the tuned model's (`tuned`: ppo or dpo) side by side."""
    lines = [f"# SFT and {tuned.upper()} on the same held-out prompts (greedy replies)\n"]
    for kind in sorted({r["kind"] for r in rows}):
        lines.append(f"\n## {kind}\n")
        for r in [r for r in rows if r["kind"] == kind][:per_kind]:
            grade = {
                m: f"reward {r[f'reward_{m}']:+.2f}"
                + (f", gold {r[f'gold_{m}']:+.2f}" if "gold_sft" in r else "")
                for m in ("sft", tuned)
            }
            lines.append(
                f"- `{r['prompt']}`\n  - SFT ({grade['sft']}): {r['sft']!r}\n"
                f"  - {tuned.upper()} ({grade[tuned]}): {r[tuned]!r}"
            )
    return "\n".join(lines) + "\n"


@dataclass
class Models:
    """The four models of PPO on the run's device: the trained two (Fabric-wrapped) with their optimisers."""

    policy: torch.nn.Module
    value: torch.nn.Module
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    ref: GPT
    reward: RewardModel
    shared_reference: bool = False  # ref is the reward model's reference too: its log-probs serve both


def setup_models(fabric: L.Fabric, sft: GPT, reward_model: RewardModel, cfg) -> Models:
    """The policy starts as a copy of the SFT model (which stays, frozen, as the reference) and the value
    model as a copy of the reward model (which stays, frozen, as the scorer); each trained copy gets AdamW."""
    policy = GPT(sft.config)
    policy.load_state_dict(sft.state_dict())
    value = RewardModel(reward_model.backbone.config, offset=reward_model.offset)  # no frozen reference
    value.backbone.load_state_dict(reward_model.backbone.state_dict())
    value.head.load_state_dict(reward_model.head.state_dict())
    betas, device = (cfg.beta1, cfg.beta2), fabric.device.type
    fused = fused_adamw_clips(cfg.precision, cfg.grad_clip, trainer="fabric")
    policy, policy_opt = fabric.setup(policy, adamw(policy, cfg.lr, cfg.weight_decay, betas, device, fused))
    value, value_opt = fabric.setup(value, adamw(value, cfg.lr, cfg.weight_decay, betas, device, fused))
    ref, reward = frozen(fabric, sft), frozen(fabric, reward_model)
    shared = shares_reference(ref, reward, cfg.temperature)
    return Models(policy, value, policy_opt, value_opt, ref, reward, shared)


def iteration(
    fabric: L.Fabric, m: Models, tok, tasks: Sequence, cfg, kl_coef: float, seed: int, rater: Rater | None
) -> dict[str, float]:
    """One PPO iteration on this process's `tasks`: phases 1–5 (`rollout`), then 6 (`ppo_update`); its
    metrics averaged over processes, with the rater's gold score of the rollout when there is a rater.
    Raises NonFiniteLoss before any weight changes if a loss is not finite."""
    prompts = [render(tok, context_of(t), add_generation_prompt=True).ids for t in tasks]
    sample_gen = torch.Generator(fabric.device).manual_seed(seed)
    shuffle_gen = torch.Generator().manual_seed(seed)
    batch = rollout(
        m.policy,
        m.ref,
        m.reward,
        m.value,
        prompts,
        cfg,
        kl_coef,
        sample_gen,
        sampler=m.policy.module,
        shared_reference=m.shared_reference,
    )
    stats = ppo_update(fabric, m.policy, m.value, m.policy_opt, m.value_opt, batch, cfg, shuffle_gen)
    metrics = {**rollout_metrics(batch, kl_coef), **update_metrics(stats)}
    if rater:
        metrics |= gold_metrics(tok, rater, tasks, batch)
    metrics = mean_over_processes(fabric, metrics)
    metrics["val/num_eos_tokens"] *= fabric.world_size  # a total, like TRL's
    if metrics.get("gold/unknown_prompts"):
        metrics["gold/hallucination_rate"] = metrics["gold/hallucinations"] / metrics["gold/unknown_prompts"]
    return metrics


def training_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """The last tenth of training's mean KL, reward-model score and (with a rater) gold score."""
    last = history[-max(1, len(history) // 10) :]
    keys = (("objective/kl", "kl"), ("objective/scores", "reward_score"), ("gold/score", "gold_score"))
    return {
        f"train/{name}_final": statistics.fmean(h[key] for h in last)
        for key, name in keys
        if last and key in last[0]
    }


def summary_lines(metrics: dict[str, float], tuned: str = "ppo") -> list[str]:
    """The comparison with SFT in a line or two, for the log."""
    m, t = metrics, tuned
    lines = []
    if "gold_gain" in m:
        lines.append(
            f"gold {m['sft/gold_score_mean']:.2f} → {m[f'{t}/gold_score_mean']:.2f} (gain {m['gold_gain']:+.2f} ± "
            f"{m['gold_gain_ci95']:.2f}, n={m['n_prompts']:.0f}) · hallucination "
            f"{100 * m.get('sft/hallucination_rate', 0):.0f}% → {100 * m.get(f'{t}/hallucination_rate', 0):.0f}%"
        )
    lines.append(
        f"reward model score {m['sft/reward_score_mean']:.2f} → {m[f'{t}/reward_score_mean']:.2f} (gain "
        f"{m['reward_gain']:+.2f} ± {m['reward_gain_ci95']:.2f}, n={m['n_prompts']:.0f}) · KL to SFT {m['kl_to_sft']:.2f}"
    )
    return lines


def launch_fabric(cfg) -> L.Fabric:
    """Lightning Fabric for the ppo section's accelerator, devices, strategy, nodes and precision, launched
    (its processes started), with atomic checkpoint writes; the rollout must split into whole minibatches
    on every process."""
    fabric = L.Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        plugins=[AtomicCheckpointIO()],
    )
    fabric.launch()
    if cfg.rollout_batch_size % (fabric.world_size * cfg.minibatch_size):
        raise LlmlabError(
            f"ppo.rollout_batch_size ({cfg.rollout_batch_size}) must split into {fabric.world_size} processes × whole "
            f"minibatches of ppo.minibatch_size ({cfg.minibatch_size})"
        )
    if (cfg.rollout_batch_size // cfg.samples_per_prompt) % fabric.world_size:
        raise LlmlabError(
            f"the {cfg.rollout_batch_size // cfg.samples_per_prompt} prompts of a rollout (ppo.rollout_batch_size / "
            f"ppo.samples_per_prompt) must split evenly into {fabric.world_size} processes"
        )
    return fabric


def iteration_line(m: dict[str, float], iteration: int, iterations: int, batch: int) -> str:
    """One iteration's log line: the reward model's score, the KL, the gold score, clipping and ended replies."""
    gold = f"{m['gold/score']:+.2f}" if "gold/score" in m else "n/a"
    return (
        f"iteration {iteration}/{iterations} · score {m['objective/scores']:+.2f} · kl {m['objective/kl']:.2f} · "
        f"gold {gold} · clipfrac {m['policy/clipfrac_avg']:.2f} · {m['val/num_eos_tokens']:.0f}/{batch} ended"
    )


def prompts(world: World, pairs: str | Path, purpose: str, cfg, seed: int) -> list:
    """PPO's prompts: to train on (`purpose` "rl", ppo.n_prompts in ppo.prompt_mix) or to compare the SFT and
    PPO models on ("eval", ppo.eval_prompts), from the world's pools; without a synthetic world, the
    preference pairs' prompts (train or validation split), which no rater can grade."""
    if world.people:
        if purpose == "rl":
            return prompt_pool(world, "rl", cfg.n_prompts, seed, cfg.max_digits, dict(cfg.prompt_mix))
        return prompt_pool(world, "eval", cfg.eval_prompts, seed, cfg.max_digits)
    n = cfg.n_prompts if purpose == "rl" else cfg.eval_prompts
    return pair_contexts(Path(pairs), "train" if purpose == "rl" else "validation")[:n]


def iteration_prompts(stream: Sequence, it: int, replies: int, k: int, rank: int, world_size: int) -> list:
    """This process's prompts of iteration `it`, one per reply: the iteration's replies / k prompts are
    stream[it·(replies / k) …], each process takes every world_size-th of them, and each appears k times
    side by side (a whole group of replies stays on one process).

    >>> iteration_prompts("abcdefgh", 1, 8, 2, 0, 2)   # iteration 1 draws e f g h; process 0 gets e and g
    ['e', 'e', 'g', 'g']
    """
    n = replies // k
    return [stream[it * n + j] for j in range(rank, n, world_size) for _ in range(k)]


def restored_state(fabric: L.Fabric, m: Models, kl: KLController, ckpt_dir: str | Path, fp) -> dict:
    """What a PPO checkpoint holds (both models, both optimisers, the iteration, the KL coefficient and the
    per-iteration history), loaded from `ckpt_dir`'s last checkpoint when its fingerprint `fp` (params and
    input files) matches this run, else fresh."""
    state = {
        "policy": m.policy,
        "value": m.value,
        "policy_opt": m.policy_opt,
        "value_opt": m.value_opt,
        "iteration": 0,
        "kl_coef": kl.value,
        "history": [],
    }
    resume = checkpoints.resume_path(ckpt_dir, fp, readonly=not is_global_zero())
    if resume is not None:
        fabric.load(resume, state, weights_only=True)
        kl.value = state["kl_coef"]
    return state


def train(
    fabric: L.Fabric,
    m: Models,
    tok,
    pool: list,
    cfg,
    kl: KLController,
    state: dict,
    seed: int,
    rater: Rater | None,
    ckpt_dir: str | Path,
    log_metrics,
) -> list[dict[str, float]]:
    """PPO's iterations from `state["iteration"]` on (`restored_state`), each on the next
    rollout_batch_size / samples_per_prompt prompts of `pool` (shuffled epoch by epoch), each prompt
    samples_per_prompt times side by side, checkpointed every ppo.ckpt_every; returns the per-iteration
    history. Each process takes every world_size-th prompt of an iteration, and its sampling seed depends
    on the iteration, so a resumed run draws what the first would have."""
    B, W, rank, k = cfg.rollout_batch_size, fabric.world_size, fabric.global_rank, cfg.samples_per_prompt
    stream = Epochs(pool, cfg.iterations * B // k, seed)
    history: list[dict[str, float]] = state["history"]
    for it in range(state["iteration"], cfg.iterations):
        tasks = iteration_prompts(stream, it, B, k, rank, W)
        try:
            metrics = iteration(
                fabric, m, tok, tasks, cfg, kl.value, seed * 1_000_003 + it * 1009 + rank, rater
            )
        except NonFiniteLoss as e:
            kept = checkpoints.kept_checkpoint(ckpt_dir, it + 1, cfg.ckpt_every, "iteration")
            raise LlmlabError(
                f"the PPO loss became non-finite at iteration {it + 1} ({e}); nothing of it was saved, "
                f"and {kept}. Lower ppo.lr or raise ppo.kl_coef"
            ) from None
        metrics["episode"] = float((it + 1) * B)
        kl.update(metrics["objective/kl"], B)
        history.append({"iteration": it + 1, **metrics})
        log_metrics(metrics, step=it + 1)
        log.info(iteration_line(metrics, it + 1, cfg.iterations, B))
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iterations:
            state.update(iteration=it + 1, kl_coef=kl.value)
            fabric.save(Path(ckpt_dir) / checkpoints.LAST, state)
    check_replicas_agree(fabric, {"policy": m.policy, "value": m.value})
    if W > 1:
        log.info("the %d processes' policy and value weights agree", W)
    return history
