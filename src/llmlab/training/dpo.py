"""Direct Preference Optimization (Rafailov et al. 2023): the SFT model trained on the preference pairs
directly, with no reward model and no sampling, against a frozen copy of itself.

For a prompt x with chosen reply y_w and rejected reply y_l, the implicit reward of a reply is
β · (log π(y | x) − log π_ref(y | x)), and the loss is the Bradley–Terry loss on the two implicit rewards:

    L = −log σ( β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))] )

with log π(y | x) the sum of the reply's token log-probabilities (the prompt's tokens are not scored).
π_ref is the SFT model and never changes, so its log-probabilities are computed once, before training
(TRL's `precompute_ref_log_probs`), and travel with each pair. The logged names are TRL's:
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from llmlab.data.chat_template import encode_content, render
from llmlab.data.tokenizer import END_ID, PAD_ID
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.training.trainer import adamw_with_schedule


def pair_sequences(tok: Tokenizer, row: dict, context_length: int) -> tuple[list[int], int, list[int], int]:
    """(chosen ids, where its reply starts, rejected ids, where its reply starts): the conversation in the
    chat template followed by each reply (with <|end|> if it ended). A sequence longer than the context
    loses its prompt's first tokens; a reply longer than the context keeps its first context_length − 1."""
    prompt = render(tok, json.loads(row["context"]), add_generation_prompt=True).ids
    out: list = []
    for side in ("chosen", "rejected"):
        reply = (encode_content(tok, row[side]) + ([END_ID] if row[f"{side}_ended"] else []))[
            : context_length - 1
        ]
        ids = (prompt + reply)[-context_length:]
        out += [ids, len(ids) - len(reply)]
    return tuple(out)


class DPOPairs(Dataset):
    """Preference pairs as token sequences, each with the reference model's log-probability of its two
    replies (`reference_logps`); an item is (chosen, chosen_start, rejected, rejected_start, ref_c, ref_r)."""

    def __init__(self, tok: Tokenizer, rows: list[dict], context_length: int):
        self.items = [pair_sequences(tok, r, context_length) for r in rows]
        self.ref = torch.zeros(len(self.items), 2)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return (*self.items[i], float(self.ref[i, 0]), float(self.ref[i, 1]))

    def lengths(self) -> list[int]:
        """The longer sequence of each pair (for batches of similar length: `training.Epochs`)."""
        return [max(len(c), len(r)) for c, _, r, _ in self.items]

    @torch.no_grad()
    def reference_logps(self, ref: GPT, needed: Iterable[int] | None = None, batch_size: int = 128) -> None:
        """Score the two replies of every pair in `needed` (default: all) with the frozen reference model,
        once. Each reply is batched with replies of about its own length, whichever pair it belongs to: a pair
        often sets a short reply against a long one, and batches of whole pairs were padded to 2.8 times the
        tokens they hold (the default run's 4,800 pairs, seed 1337)."""
        ref.eval()
        pairs = sorted(set(range(len(self)) if needed is None else needed))
        replies = sorted(  # (length, pair, side: 0 chosen, 1 rejected)
            (len(self.items[i][2 * side]), i, side) for i in pairs for side in (0, 1)
        )
        for start in range(0, len(replies), batch_size):
            batch = replies[start : start + batch_size]
            idx, targets = pad_replies([self.items[i][2 * side : 2 * side + 2] for _, i, side in batch])
            rows, sides = zip(*[(i, side) for _, i, side in batch], strict=True)
            self.ref[list(rows), list(sides)] = sequence_logps(ref, idx, targets)


def pad_replies(seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, where the reply starts) of each sequence -> right-padded (idx, targets), the targets −100
    outside the replies."""
    T = max(len(s) for s, _ in seqs)
    idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s)
        targets[i, start - 1 : len(s) - 1] = torch.tensor(s[start:])  # position t predicts token t + 1
    return idx, targets


def collate_dpo(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [0, B) chosen, [B, 2B) rejected, right-padded: (idx, targets with −100 outside the replies,
    reference log-probs of the chosen (B,), of the rejected (B,))."""
    idx, targets = pad_replies([(b[0], b[1]) for b in batch] + [(b[2], b[3]) for b in batch])
    ref_c = torch.tensor([b[4] for b in batch])
    ref_r = torch.tensor([b[5] for b in batch])
    return idx, targets, ref_c, ref_r


def sequence_logps(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target | prefix) where the target is not −100: (B,)."""
    return model.target_logprobs(idx, targets).sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (mean over pairs) and the implicit rewards of the chosen and rejected replies.

    label_smoothing ε is conservative DPO (Mitchell 2023): the label is taken to be wrong with probability ε.

    >>> loss, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    >>> round(rc.item(), 2), round(rr.item(), 2), round(loss.item(), 4)  # -log σ(0.5 - (-0.5)) = -log σ(1)
    (0.5, -0.5, 0.3133)
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss.mean(), chosen.detach(), rejected.detach()


class DPOModule(L.LightningModule):
    """The policy (a GPT, initialised from the SFT model by the stage) trained with `dpo_loss`."""

    def __init__(self, model_config: GPTConfig, cfg, total_steps: int):
        super().__init__()
        self.save_hyperparameters(
            {"model_config": asdict(model_config), "train": cfg.model_dump(), "total_steps": total_steps}
        )
        self.cfg, self.total_steps = cfg, total_steps
        self.model = GPT(model_config)

    def _step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx, targets, ref_c, ref_r = batch
        logps = sequence_logps(self.model, idx, targets)
        n = idx.shape[0] // 2
        loss, rc, rr = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, self.cfg.beta, self.cfg.label_smoothing)
        return loss, {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (rc > rr).float().mean(),
            "rewards/margins": (rc - rr).mean(),
            "logps/chosen": logps[:n].detach().mean(),
            "logps/rejected": logps[n:].detach().mean(),
        }

    def training_step(self, batch, batch_idx):
        loss, logged = self._step(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, prog_bar=False
        )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, logged = self._step(batch)
        logged = {"val/loss": loss, **{f"val/{k}": v for k, v in logged.items()}}
        self.log_dict(logged, on_step=False, on_epoch=True, prog_bar=False, sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, self.cfg, self.total_steps, self.device.type)
