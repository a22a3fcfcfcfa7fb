"""The reward model: the transformer, initialised from SFT, with a scalar head instead of the LM head.

It reads the final hidden state at the last token of the reply (its `<|end|>` when it ended) and
outputs one number, r(prompt, reply). Trained on preference pairs with the Bradley–Terry loss

    loss = −log σ(r(chosen) − r(rejected) − m)  +  centring · (r(chosen) + r(rejected))²
                                                      +  lm_coef · LM loss of the chosen replies

it learns to score higher what the raters preferred: P(chosen ≻ rejected) = σ(r_c − r_r). The margin m is
`margin` plus, as in Llama 2 (Touvron et al. 2023), `strength_margin` × s / 3 where the rater said how much
better the chosen reply is (s from 0, negligibly, to 3, significantly: `preferences.rated_strength`), so that
a pair told apart by substance must be told apart by more than one told apart by style. Only
differences are learned, so the level is arbitrary; after training the reward is shifted so that the SFT
model's own replies score 0 on average (`offset`), and its spread is reported (`scale`). The optional
centring term (Eisenstein et al. 2023) keeps the level near 0 during training; the optional LM term
(GRM, Yang et al. 2024) trains the backbone's own LM head on the chosen replies alongside, so that the
hidden states stay a language model's while the head learns to compare. Pairs labelled by the model
itself (Constitutional AI) carry how sure it was; with `soft_labels` the loss is the cross-entropy against
that probability, as Bai et al. (2022) train on the feedback model's, instead of against certainty.

With `reward.likelihood` the reward model also holds a frozen copy of the SFT model and adds, with learned
weights, how likely that model finds the reply (`reply_likelihood`: the sum and the minimum of its tokens'
log-probabilities). A fact the model learned in pretraining is likely at every token; an invented one is
not, and a scalar head on the last hidden state cannot see that on its own.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file as st_save_file
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from llmlab.data.chat_template import encode_content, render
from llmlab.data.tokenizer import ASSISTANT_ID, END_ID, PAD_ID
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import atomic_path, write_json
from llmlab.model.replies import reply
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.stats import wilson_ci
from llmlab.training.trainer import adamw_with_schedule


class RewardModel(nn.Module):
    def __init__(self, config: GPTConfig, offset: float = 0.0, reads_likelihood: bool = False):
        super().__init__()
        self.backbone = GPT(config)
        self.head = nn.Linear(config.d_model, 1)
        nn.init.normal_(self.head.weight, std=1 / (config.d_model + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.offset = offset  # subtracted from every reward (set after training)
        self.reads_likelihood = reads_likelihood
        if reads_likelihood:
            # a frozen copy of the SFT model, and the learned weights of what it says about the reply
            self.reference = GPT(config).requires_grad_(False)
            self.likelihood = nn.Linear(len(LIKELIHOOD_FEATURES), 1, bias=False)
            nn.init.zeros_(self.likelihood.weight)  # training starts from the plain reward model

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        if self.reads_likelihood:
            self.reference.eval()
        return self

    def forward(
        self,
        idx: torch.Tensor,
        last: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        likelihood: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx: (B, T) sequences; last: (B,) index of each sequence's last token -> rewards (B,).

        Without `last`, the head's output at every position, (B, T): PPO's value model is this network
        read at each token. `positions` and `attn_mask` as in `GPT.forward` (for left-padded batches).
        `likelihood`: the sequences' `reply_likelihood` under the reference, (B, 2), when already known.
        """
        h = self.backbone.hidden(idx, positions, attn_mask)  # (B, T, C)
        if last is None:
            return self.head(h).squeeze(-1) - self.offset
        return self.read(h, idx, last, positions, attn_mask, likelihood)

    def read(
        self,
        h: torch.Tensor,
        idx: torch.Tensor,
        last: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        likelihood: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reward from the backbone's hidden states h (B, T, C), read at each row's `last` token, plus,
        when the model reads likelihood, the weighted `reply_likelihood` of the reply (`likelihood`, (B, 2),
        when already known; else computed here) -> (B,)."""
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        r = self.head(h_last).squeeze(-1) - self.offset
        if self.reads_likelihood:
            if likelihood is None:
                with torch.no_grad():
                    likelihood = reply_likelihood(self.reference, idx, last, positions, attn_mask)
            r = r + self.likelihood(likelihood.to(h.dtype)).squeeze(-1)
        return r


LIKELIHOOD_FEATURES = ("sum", "min")


def reply_span(idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) mask over next-token targets: True where target t + 1 is a reply token, i.e. after the
    row's last `<|assistant|>` and up to and including its `last` token. `encode_content` never writes a
    special token into a message, so the last `<|assistant|>` opens the reply."""
    T = idx.shape[1]
    pos = torch.arange(T, device=idx.device)
    start = torch.where(idx == ASSISTANT_ID, pos, -1).amax(dim=1) + 1  # (B,) first reply token
    return (pos[None, 1:] >= start[:, None]) & (pos[None, 1:] <= last[:, None])


def reply_likelihood(
    lm: GPT,
    idx: torch.Tensor,
    last: torch.Tensor,
    positions: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """How likely the language model `lm` finds each reply: the sum and the minimum of its tokens'
    log-probabilities (`LIKELIHOOD_FEATURES`) over the sequences idx (B, T) -> (B, 2). A reply without tokens
    gets 0 for both. `positions` and `attn_mask` as in `GPT.forward`.

    A fact the model has learned is likely at every token; an invented one has at least one token the model
    did not expect (its minimum), and a reply can only be unexpected at length (its sum).
    """
    span = reply_span(idx, last)  # (B, T - 1): target t + 1 is a reply token
    targets = torch.full_like(idx, -100)
    targets[:, :-1] = torch.where(span, idx[:, 1:], -100)
    logp = lm.target_logprobs(idx, targets, positions, attn_mask)[:, :-1]
    total = logp.sum(dim=1)
    lowest = torch.where(span, logp, torch.inf).amin(dim=1)
    return torch.stack([total, torch.where(span.any(dim=1), lowest, 0.0)], dim=1)


def reply_ids(tok: Tokenizer, context: list[dict], reply: str, ended: bool, context_length: int) -> list[int]:
    """The conversation so far (messages ending with a user turn) + the reply in the chat template, ending
    with <|end|> only if the reply did; a sequence longer than the context keeps its *last* tokens (the
    reward is read at the end)."""
    ids = render(tok, context, add_generation_prompt=True).ids
    ids = ids + encode_content(tok, reply) + ([END_ID] if ended else [])
    return ids[-context_length:]


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad; return (ids (B, T), index of each last real token (B,))."""
    T = max(map(len, seqs))
    idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s)
    return idx, torch.tensor([len(s) - 1 for s in seqs])


def judged_probability(preference: float | None) -> float:
    """How sure a judge is that the chosen reply is the better one: σ(log-odds / 2), its probability of "the
    chosen reply" in one reading (`preference` sums the log-odds of two, each reply shown first once; Bai et
    al. 2022 train on the feedback model's normalised probability). 1 where there is no judge's preference
    (the rater's labels, real data).

    >>> judged_probability(0.0), round(judged_probability(2.0), 4), judged_probability(float("nan"))
    (0.5, 0.7311, 1.0)
    """
    if preference is None or not math.isfinite(preference):
        return 1.0
    return 1 / (1 + math.exp(-preference / 2))


class PairDataset(Dataset):
    """The pairs' token ids, (chosen, rejected) in `items`, the rater's strength of each preference (0 to 3;
    0 where none was given) in `strengths`, the probability that the chosen reply is the better one in
    `targets` (1, or with `soft_labels` the judge's `judged_probability`), and, once `read_likelihood` has
    run, each reply's `reply_likelihood` under the frozen reference in `likelihood` ((N, 2, 2): pair, side,
    feature)."""

    def __init__(self, tok: Tokenizer, rows: list[dict], context_length: int, soft_labels: bool = False):
        self.items = []
        self.strengths = [r.get("strength") or 0 for r in rows]
        self.targets = [judged_probability(r.get("preference")) if soft_labels else 1.0 for r in rows]
        self.likelihood: torch.Tensor | None = None
        for r in rows:
            context = json.loads(r["context"])
            self.items.append(
                (
                    reply_ids(tok, context, r["chosen"], r["chosen_ended"], context_length),
                    reply_ids(tok, context, r["rejected"], r["rejected_ended"], context_length),
                )
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        likelihood = None if self.likelihood is None else self.likelihood[i]
        return (*self.items[i], self.strengths[i], likelihood, self.targets[i])

    def replies(self) -> list[list[int]]:
        """Every distinct reply sequence of the pairs (a reply is in several pairs of its prompt)."""
        return [list(seq) for seq in dict.fromkeys(tuple(seq) for pair in self.items for seq in pair)]

    def read_likelihood(self, reference: GPT, known: dict[tuple, torch.Tensor] | None = None) -> dict:
        """Fill `likelihood`: each distinct reply scored once by the frozen `reference` (it never changes, so
        training need not run it on every batch), or taken from `known` (reply -> features). Returns the
        features of every reply here, `known` included, for the next dataset or the centring."""
        known = dict(known or {})
        todo = [seq for seq in self.replies() if tuple(seq) not in known]
        known |= dict(zip(map(tuple, todo), likelihood_features(reference, todo), strict=True))
        pairs = [torch.stack([known[tuple(c)], known[tuple(r)]]) for c, r in self.items]
        self.likelihood = torch.stack(pairs) if pairs else torch.zeros(0, 2, len(LIKELIHOOD_FEATURES))
        return known


def collate_pairs(batch):
    """Chosen and rejected of every pair in one padded batch: rows [0, B) chosen, [B, 2B) rejected; the B
    pairs' strengths; the 2B replies' likelihood features in the same order (None when not read); the B
    pairs' targets."""
    idx, last = pad_batch([b[0] for b in batch] + [b[1] for b in batch])
    strengths = torch.tensor([b[2] for b in batch], dtype=torch.float32)
    targets = torch.tensor([b[4] for b in batch], dtype=torch.float32)
    if batch[0][3] is None:
        return idx, last, strengths, None, targets
    likelihood = torch.stack([b[3] for b in batch])  # (B, 2, 2)
    return idx, last, strengths, torch.cat([likelihood[:, 0], likelihood[:, 1]]), targets


def bt_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    centring: float = 0.0,
    target: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood, with optional margin (one for all pairs, or one per pair),
    reward centring, and soft labels: the cross-entropy against `target`, the probability that the chosen
    reply is the better one (1: the plain loss).

    >>> round(bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item(), 4)  # -log σ(1)
    0.3133
    >>> round(bt_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])).item(), 4)
    0.5032

    A pair the judge is 75 % sure of, the same rewards: −(0.75 · log σ(1) + 0.25 · log σ(−1)).

    >>> round(bt_loss(torch.tensor([1.0]), torch.tensor([0.0]), target=0.75).item(), 4)
    0.5633
    """
    x = r_chosen - r_rejected - margin
    loss = -(target * F.logsigmoid(x) + (1 - target) * F.logsigmoid(-x)).mean()
    if centring:
        loss = loss + centring * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def reply_lm_loss(
    backbone: GPT, h: torch.Tensor, idx: torch.Tensor, last: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy of the replies' tokens (`reply_span`), predicted from the hidden states
    `h` (B, T, C) by the backbone's LM head: their mean, or with `reduction="sum"` their sum."""
    target = reply_span(idx, last)  # position t predicts token t + 1
    logits = backbone.lm_head(h[:, :-1][target])
    return F.cross_entropy(logits, idx[:, 1:][target], reduction=reduction)


class RewardModule(L.LightningModule):
    def __init__(self, config: GPTConfig, cfg, total_steps: int):
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.model = RewardModel(config, reads_likelihood=cfg.likelihood)

    def _pair_rewards(self, batch):
        idx, last, _, likelihood, _ = batch
        r = self.model(idx, last, likelihood=likelihood)
        B = idx.shape[0] // 2
        return r[:B], r[B:]

    def margins(self, strengths: torch.Tensor) -> torch.Tensor:
        """Each pair's margin: `margin`, plus `strength_margin` × strength / 3 (Llama 2)."""
        return self.cfg.margin + self.cfg.strength_margin * strengths / 3

    def training_step(self, batch, batch_idx):
        idx, last, strengths, likelihood, targets = batch
        B = idx.shape[0] // 2
        h = self.model.backbone.hidden(idx)
        r = self.model.read(h, idx, last, likelihood=likelihood)
        rc, rr = r[:B], r[B:]
        bt = bt_loss(rc, rr, self.margins(strengths), self.cfg.centring, targets)
        logs = {"train/bt_loss": bt, "train/accuracy": (rc > rr).float().mean()}
        loss = bt
        if self.cfg.lm_coef:
            # the mean over every process's reply tokens, not the mean of each process's means (DDP averages
            # gradients over processes, whose batches hold different numbers of tokens)
            total = reply_lm_loss(self.model.backbone, h[:B], idx[:B], last[:B], reduction="sum")
            tokens = reply_span(idx[:B], last[:B]).sum().float()
            all_tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            logs["train/lm_loss"] = lm = total * self.trainer.world_size / all_tokens
            loss = bt + self.cfg.lm_coef * lm
        if self.model.reads_likelihood:
            w = self.model.likelihood.weight.detach()[0]
            logs |= {f"train/likelihood_{name}": w[i] for i, name in enumerate(LIKELIHOOD_FEATURES)}
        self.log_dict({"train/loss": loss, **logs}, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        rc, rr = self._pair_rewards(batch)
        self.log_dict(
            {
                "val/loss": bt_loss(rc, rr, self.margins(batch[2]), self.cfg.centring, batch[4]),
                "val/accuracy": (rc > rr).float().mean(),
            },
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
        )

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, self.cfg, self.total_steps, self.device.type)


def by_length(seqs: list[list[int]], batch_size: int, run) -> torch.Tensor:
    """`run(batch)` on batches of the sequences, shortest first so that little of a batch is padding; its
    per-sequence outputs concatenated back into the order given."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [run([seqs[j] for j in order[i : i + batch_size]]) for i in range(0, len(order), batch_size)]
    return torch.cat(out)[torch.argsort(torch.tensor(order))]


@torch.no_grad()
def score_sequences(
    model: RewardModel,
    seqs: list[list[int]],
    batch_size: int = 64,
    likelihood: dict[tuple, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reward of each sequence, in the order given. `likelihood`: the sequences' features under the
    reference (`PairDataset.read_likelihood`), when known."""
    if not seqs:
        return torch.zeros(0)

    def run(batch):
        known = torch.stack([likelihood[tuple(s)] for s in batch]) if likelihood else None
        return model(*pad_batch(batch), likelihood=known)

    return by_length(seqs, batch_size, run)


@torch.no_grad()
def likelihood_features(reference: GPT, seqs: list[list[int]], batch_size: int = 128) -> torch.Tensor:
    """`reply_likelihood` of each whole sequence under `reference`, in the order given, (N, 2), on the CPU
    whatever the reference's device."""
    if not seqs:
        return torch.zeros(0, len(LIKELIHOOD_FEATURES))
    reference.eval()
    device = next(reference.parameters()).device
    return by_length(
        seqs,
        batch_size,
        lambda batch: reply_likelihood(reference, *(t.to(device) for t in pad_batch(batch))).cpu(),
    )


def save_reward_model(model: RewardModel, out_dir, scale: float) -> None:
    """model.safetensors + config.json (the backbone's config, the offset and the scale)."""

    with atomic_path(out_dir, is_dir=True) as tmp:
        # Each GPT's LM head is its embedding (tied): store the embedding only. safetensors' save_model would
        # do that too, but lists the dropped names in an order that varies between processes.
        state = model.state_dict()
        tied = {f"{m}.lm_head.weight" for m in ("backbone", "reference") if hasattr(model, m)}
        st_save_file(
            {k: state[k].contiguous() for k in sorted(state) if k not in tied}, str(tmp / "model.safetensors")
        )
        write_json(
            tmp / "config.json",
            {
                "backbone": asdict(model.backbone.config),
                "offset": model.offset,
                "scale": scale,
                "reads_likelihood": model.reads_likelihood,
            },
        )


def load_reward_model(model_dir, stage: str = "reward") -> RewardModel:

    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        raise MissingArtifactError(weights, stage)
    try:
        meta = json.loads((model_dir / "config.json").read_text())
        model = RewardModel(
            GPTConfig.from_dict(meta["backbone"]),
            offset=float(meta["offset"]),
            reads_likelihood=bool(meta.get("reads_likelihood", False)),
        )
        st_load_model(model, str(weights))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise LlmlabError(
            f"{model_dir} is not a valid reward model: {str(e).splitlines()[0]} (re-create it with `dvc repro {stage}`)"
        ) from None
    return model.eval()


def sft_replies(
    sft, tok, rows: list[dict], context_length: int, max_new_tokens: int, seed: int, n: int = 256
) -> list[list[int]]:
    """The SFT model's own replies (sampled, T = 1, as long as the preference stage's) to up to n training
    prompts, as reward-model inputs."""
    contexts = [json.loads(r["context"]) for r in rows[:n]]
    prompts = [render(tok, c, add_generation_prompt=True).ids for c in contexts]
    out = reply(
        sft, tok, contexts, max_new_tokens, temperature=1.0, generator=torch.Generator().manual_seed(seed)
    )
    return [(p + list(r.tokens))[-context_length:] for p, r in zip(prompts, out, strict=True)]


def calibration(
    r_c: torch.Tensor, r_r: torch.Tensor, seed: int, bins: int = 5
) -> list[tuple[float, float, int]]:
    """Predicted P(a ≻ b) = σ(r_a − r_b) against how often a was the labelled winner, per bin.

    Each pair is shown in a random order (a, b), so the observed frequency is not trivially 1.
    """
    rng = random.Random(seed)
    points = []
    for c, r in zip(r_c.tolist(), r_r.tolist(), strict=True):
        if rng.random() < 0.5:
            points.append((torch.sigmoid(torch.tensor(c - r)).item(), 1.0))
        else:
            points.append((torch.sigmoid(torch.tensor(r - c)).item(), 0.0))
    table = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = [(p, y) for p, y in points if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if inside:
            table.append(
                (
                    sum(p for p, _ in inside) / len(inside),
                    sum(y for _, y in inside) / len(inside),
                    len(inside),
                )
            )
    return table


def reward_metrics(
    model: RewardModel,
    val_set: PairDataset,
    val_rows: list[dict],
    rated: bool,
    seed: int,
    likelihood: dict[tuple, torch.Tensor] | None = None,
) -> tuple[dict[str, float], list[tuple[float, float, int]]]:
    """How often the reward model ranks each held-out pair as labelled (`accuracy_noisy_labels`), its mean
    margin, and, for rated synthetic pairs, how often it agrees with the gold ordering (with a 95 % interval);
    and its calibration table (`calibration`). `likelihood` as in `score_sequences`."""
    r_c = score_sequences(model, [c for c, _ in val_set.items], likelihood=likelihood)
    r_r = score_sequences(model, [r for _, r in val_set.items], likelihood=likelihood)
    metrics = {
        "accuracy_noisy_labels": float((r_c > r_r).float().mean()),
        "margin_mean": float((r_c - r_r).mean()),
    }
    if rated:  # pairs the rater scores equal (possible when a judge, not the rater, made them) have no order
        gold = [(row["gold_chosen"], row["gold_rejected"]) for row in val_rows]
        judged = [  # (the reward model orders the pair as gold does, the rater's strength of the preference)
            ((float(a - b) > 0) == (gc > gr), s)
            for a, b, (gc, gr), s in zip(r_c, r_r, gold, val_set.strengths, strict=True)
            if gc != gr
        ]
        hits = [hit for hit, _ in judged]
        if hits:  # none when the rubric scores every held-out pair's replies equal (a tiny run)
            metrics["accuracy_gold"] = sum(hits) / len(hits)
            metrics["accuracy_gold_ci_low"], metrics["accuracy_gold_ci_high"] = wilson_ci(
                sum(hits), len(hits)
            )
        # by how much better the rater said the chosen reply was (`preferences.STRENGTHS`; a judge rates none)
        if any(val_set.strengths):
            for level in sorted({s for _, s in judged}):
                at = [hit for hit, s in judged if s == level]
                metrics[f"accuracy_gold_strength_{level}"] = sum(at) / len(at)
    return metrics, calibration(r_c, r_r, seed)


def centre_on_sft(
    model: RewardModel,
    sft: GPT,
    tok: Tokenizer,
    train: PairDataset,
    rows: list[dict],
    rated: bool,
    max_new_tokens: int,
    seed: int,
    likelihood: dict[tuple, torch.Tensor] | None = None,
) -> float:
    """Shift the reward so that the SFT model's own replies score 0 on average (`model.offset`), and return
    their spread (the scale PPO divides by). Rated pairs are SFT replies already; for real data the SFT
    model first answers the training prompts. `likelihood` as in `score_sequences` (for the pairs' replies)."""
    if rated:  # a reply is in several pairs: score it once and count it as often as it appears
        counts = Counter(tuple(seq) for pair in train.items for seq in pair)
        replies, weights = [list(seq) for seq in counts], list(counts.values())
    else:
        replies = sft_replies(sft, tok, rows, sft.config.context_length, max_new_tokens, seed)
        weights = [1] * len(replies)
        likelihood = None  # new replies
    scores = score_sequences(model, replies, likelihood=likelihood).double()
    w = torch.tensor(weights, dtype=torch.float64)
    mean = float((w * scores).sum() / w.sum())
    model.offset = mean
    if w.sum() < 2:
        return 0.0
    return math.sqrt(float((w * (scores - mean) ** 2).sum() / (w.sum() - 1)))  # std of every pair's reply


def calibration_csv(table: list[tuple[float, float, int]]) -> str:
    """plots/reward/calibration.csv: predicted against observed probability that the chosen reply wins."""
    return "predicted,observed,n\n" + "".join(f"{p:.4f},{o:.4f},{n}\n" for p, o, n in table)


def summary_line(metrics: dict) -> str:
    """The stage's last log line: agreement with the gold rater (when measured) and with the pairs' labels."""
    gold = f"{100 * metrics['accuracy_gold']:.1f}%" if "accuracy_gold" in metrics else "n/a"
    return (
        f"gold accuracy {gold} · label accuracy {100 * metrics['accuracy_noisy_labels']:.1f}% "
        f"on {metrics['pairs_validation']} held-out pairs"
    )
