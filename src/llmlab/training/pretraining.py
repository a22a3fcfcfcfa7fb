"""Pretraining's data and measurements: windows of the tokenised corpus for next-token prediction, the
probes measured as training goes, and what the stage measures on the finished model.

The objective is the whole of pretraining: for every position t, maximise log p(token[t+1] | tokens[≤t]).
The loop, the optimiser and the Lightning glue are shared with the other training stages (`trainer.py`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from llmlab.data.world import World, copy_probes, fact_prompts
from llmlab.errors import LlmlabError
from llmlab.evaluation.measurements import copy_accuracy, fact_recall, samples
from llmlab.model.transformer import GPT
from llmlab.params import PretrainConfig
from llmlab.training.trainer import Budget, Probe

SAMPLE_PROMPTS = ["Add 47 and 38.", "One morning,"]


class TokenWindows(Dataset):
    """Windows of context_length + 1 tokens from a flat token array: x = w[:-1], y = w[1:].

    Item i starts at a position drawn from a generator seeded by (seed, i), so an item is the same on
    every run and on every rank: anywhere in the array, or, given `starts` (the positions of <|bos|>,
    `document_starts`), at the start of a document. Resuming: a run restored at optimizer step k continues
    with global item `first` = k · (items per step). Subtle: Lightning keeps counting batches from where the
    checkpoint left off and ends the epoch at len(dataset) batches, so the dataset keeps its full length and
    index i maps to global item first + i; the tail past the budget is never read, because max_steps ends
    training first.
    """

    def __init__(
        self,
        tokens,
        context_length: int,
        n_items: int,
        seed: int,
        first: int = 0,
        starts: np.ndarray | None = None,
    ):
        if len(tokens) < context_length + 2:
            raise ValueError(
                f"token file has {len(tokens)} tokens, fewer than context_length + 2 = {context_length + 2}"
            )
        if starts is not None:
            starts = starts[starts <= len(tokens) - context_length - 1]
            if not len(starts):
                raise ValueError("no document starts before the last window: the token file holds no <|bos|>")
        self.tokens, self.T, self.n_items, self.seed, self.first, self.starts = (
            tokens,
            context_length,
            n_items,
            seed,
            first,
            starts,
        )

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.first + i))
        if self.starts is None:
            start = int(rng.integers(0, len(self.tokens) - self.T - 1))
        else:
            start = int(self.starts[rng.integers(0, len(self.starts))])
        w = torch.from_numpy(self.tokens[start : start + self.T + 1].astype(np.int64))
        return w[:-1], w[1:]


def document_starts(tokens, bos_id: int, window_start: str) -> np.ndarray | None:
    """Where TokenWindows may start: every <|bos|> for window_start "document", anywhere (None) otherwise."""
    return tokens.positions_of(bos_id) if window_start == "document" else None


class FixedWindows(Dataset):
    """n evenly spaced windows of the validation tokens: the same set at every validation."""

    def __init__(self, tokens: np.ndarray, context_length: int, n_items: int):
        if len(tokens) < context_length + 2:
            raise ValueError(
                f"validation split has {len(tokens)} tokens, fewer than context_length + 2 = {context_length + 2}: "
                "raise corpus.val_fraction or lower pretrain.model.context_length"
            )
        last = len(tokens) - context_length - 1
        self.starts = np.linspace(0, last, n_items).astype(np.int64)
        self.tokens, self.T = tokens, context_length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        w = torch.from_numpy(self.tokens[s : s + self.T + 1].astype(np.int64))
        return w[:-1], w[1:]


def windows(
    train_tokens, val_tokens, bos_id: int, cfg: PretrainConfig, budget: Budget, seed: int, first: int = 0
) -> tuple[TokenWindows, FixedWindows]:
    """The run's training windows, from global item `first` (`resume_offset`), and the validation windows
    (val_batches per process: the same validation set for the same global batch). A split too small for
    one window is an LlmlabError that says which param to change."""
    try:
        val = FixedWindows(
            val_tokens, cfg.model.context_length, cfg.val_batches * cfg.batch_size * budget.world_size
        )
        starts = document_starts(train_tokens, bos_id, cfg.window_start)
        train = TokenWindows(
            train_tokens, cfg.model.context_length, budget.n_items, seed, first=first, starts=starts
        )
    except ValueError as e:
        raise LlmlabError(f"pretrain: {e}") from None
    return train, val


def run_metrics(
    model: GPT, train_loss: float, val_loss: float, steps: int, budget: Budget
) -> dict[str, float]:
    """What the finished run measured about itself (loss, perplexity, its size), for metrics/pretrain.json."""
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "steps": steps,
        "tokens": steps * budget.tokens_per_step,
        "params": model.num_params(non_embedding=False),
    }


PROBES = ("fact_recall", "copy_accuracy")
"""The curves of plots/pretrain/ besides the losses (dvc.yaml declares both)."""


def probes(world: World, tok: Tokenizer, cfg: PretrainConfig, seed: int) -> tuple[list[Probe], list]:
    """What is measured at every validation: fact recall on `recall_probe_people` people spread over the
    world, and copy accuracy on `copy_probes` context documents; and the copy probes themselves."""
    known = world.known()
    people = (
        known[:: max(1, len(known) // cfg.recall_probe_people)][: cfg.recall_probe_people]
        if cfg.recall_probe_people
        else []
    )
    out = [Probe("fact_recall", lambda model: fact_recall(model, tok, people).accuracy)] if people else []
    copy_items = copy_probes(world, cfg.copy_probes, seed) if world.people else []
    if copy_items:
        out.append(
            Probe("copy_accuracy", lambda model: copy_accuracy(model, tok, copy_items)["copy_accuracy"])
        )
    return out, copy_items


def final_measurements(
    model: GPT, tok: Tokenizer, world: World, cfg: PretrainConfig, seed: int, copy_items: list
) -> tuple[dict[str, float], dict[str, object]]:
    """The finished model's fact recall (every known person, or `recall_people`) and copy accuracy as
    metrics, and the report files behind them: samples at T = 0 and 1, recall and copy examples."""
    people = world.known()[: cfg.recall_people] if cfg.recall_people else world.known()
    recall = fact_recall(model, tok, people)
    prompts = [prompt for p in people[:2] for _, prompt, _ in fact_prompts(p)[:2]] + SAMPLE_PROMPTS
    rows = [row for t in (0.0, 1.0) for row in samples(model, tok, prompts, cfg.sample_tokens, t, seed)]
    metrics: dict[str, float] = {}
    if recall.n:  # no synthetic world (hf / local corpus): nothing to recall
        metrics |= {
            "fact_recall": recall.accuracy,
            "fact_recall_n": recall.n,
            **{f"fact_recall_by_attribute/{k}": v for k, v in recall.by_attribute.items()},
            **{f"fact_recall_by_group/{k}": v for k, v in recall.by_group.items()},
        }
    files: dict[str, object] = {
        "samples.json": rows,
        "fact_recall_examples.json": recall.examples,
        "samples.md": _samples_markdown(rows),
    }
    if copy_items:
        copying = copy_accuracy(model, tok, copy_items)
        metrics |= {k: v for k, v in copying.items() if k.startswith("copy_accuracy")} | {
            "copy_accuracy_n": copying["n"]
        }
        files["copy_examples.json"] = copying["examples"]
    return metrics, files


def _samples_markdown(rows: list[dict]) -> str:
    lines = ["# Pretrained model samples", ""]
    for r in rows:
        lines += [f"**T={r['temperature']}** `{r['prompt']}` →", "", "```", r["completion"], "```", ""]
    return "\n".join(lines)


def summary_line(metrics: dict, speed: dict) -> str:
    """The stage's last log line: validation loss, fact recall, copy accuracy and speed."""
    recall = f"{metrics['fact_recall']:.1%}" if "fact_recall" in metrics else "n/a (no synthetic world)"
    copying = f"{metrics['copy_accuracy']:.1%}" if "copy_accuracy" in metrics else "n/a"
    return (
        f"val loss {metrics['val_loss']:.3f} (ppl {metrics['val_perplexity']:.1f}) · fact recall {recall} · copy accuracy "
        f"{copying} · {speed['tokens_per_s']:.0f} tokens/s · MFU {100 * speed['mfu']:.1f}%"
    )
