"""Supervised fine-tuning: the same next-token loss as pretraining, taken only on the assistant's tokens.

Pretraining taught the model to continue text; SFT shows it conversations in the chat template and
trains it to continue `<|assistant|>` with a helpful answer and then `<|end|>`. The user's words, the
template tokens and the padding are in the input but not in the loss (their targets are -100):

    input   <|bos|> <|user|> Where does Mara live ? <|end|> <|assistant|> Mara lives in Port Avery . <|end|>
    target     -      -       -     -     -    -     -         Mara       lives in Port Avery . <|end|>  -

Truncation rule: a conversation longer than context_length + 1 tokens keeps its first context_length + 1
tokens (the prompt and the start of the answer) and is counted in `truncated`; the cut answer then has no
`<|end|>` to learn from, which is why the count is reported. A conversation whose first answer starts
beyond the context has nothing to learn from at all: it is left out and counted in `no_answer`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from llmlab.data.chat_data import external_conversations, prompt_pool, sft_examples
from llmlab.data.chat_template import render
from llmlab.data.corpus import read_corpus
from llmlab.data.tokenizer import BOS_ID, PAD_ID
from llmlab.data.world import World
from llmlab.errors import LlmlabError
from llmlab.evaluation.rater import Rater, chat_metrics
from llmlab.model.replies import answer, reply
from llmlab.model.transformer import GPT
from llmlab.params import SFTConfig, SFTData


class ChatDataset(Dataset):
    """Rendered conversations: (ids, loss mask) per example, truncated to context_length + 1 tokens."""

    def __init__(self, tok: Tokenizer, conversations: Sequence[list[dict]], context_length: int):
        self.items: list[tuple[list[int], list[bool]]] = []
        self.truncated = 0  # cut to the context
        self.no_answer = 0  # cut before the first assistant token: nothing to learn, left out
        for messages in conversations:
            chat = render(tok, messages)
            if len(chat.ids) > context_length + 1:
                self.truncated += 1
            ids, mask = chat.ids[: context_length + 1], chat.loss_mask[: context_length + 1]
            if not any(mask[1:]):
                self.no_answer += 1
                continue
            self.items.append((ids, mask))

    def add_documents(self, tok: Tokenizer, texts: Sequence[str], context_length: int) -> None:
        """Add plain documents (pretraining replay): <|bos|> + the text, the loss on every token, the first
        context_length + 1 tokens of a longer one."""
        for text in texts:
            ids = [BOS_ID, *tok.encode(text, add_special_tokens=False).ids][: context_length + 1]
            self.items.append((ids, [True] * len(ids)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(batch: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; x = ids[:-1], y = ids[1:] with -100 where no loss is taken.

    >>> x, y = collate([([1, 2, 7, 4], [False, False, True, True]), ([1, 2, 9], [False, False, True])])
    >>> x.tolist(), y.tolist()
    ([[1, 2, 7], [1, 2, 0]], [[-100, 7, 4], [-100, 9, -100]])
    """
    T = max(len(ids) for ids, _ in batch) - 1
    x = torch.full((len(batch), T), PAD_ID, dtype=torch.long)
    y = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(batch):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        learn = torch.tensor(mask[1:])  # the mask of the token being predicted
        y[i, :n] = torch.where(learn, target, torch.full_like(target, -100))
    return x, y


def collate_packed(batch: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, ...]:
    """The batch of `collate`, with its conversations packed side by side into fewer rows: the same
    targets, the same loss and gradient, less padding to compute (on the default data about half the
    tokens of `collate`'s batch; tests/test_batching.py checks both against `collate`).

    Rows are as wide as the longest conversation; conversations go into the first row with room, longest
    first. Each keeps its own positions (RoPE restarts at 0) and attends only within itself, so packing
    changes nothing a conversation sees. Returns (x, y, positions, attn_mask (R, 1, W, W)), the
    arguments of `GPT.forward` in order.

    >>> batch = [([1, 2, 7, 4], [False, False, True, True]), ([1, 9], [False, True]), ([1, 8, 6], [False, True, True])]
    >>> x, y, pos, mask = collate_packed(batch)  # 3 rows of 3 in `collate`; here 2
    >>> x.tolist(), y.tolist(), pos.tolist()
    ([[1, 2, 7], [1, 8, 1]], [[-100, 7, 4], [8, 6, 9]], [[0, 1, 2], [0, 1, 0]])
    >>> mask[1, 0].int().tolist()  # row 2: the third conversation, then the second, each seeing only itself
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    n = [len(ids) - 1 for ids, _ in batch]
    width = max(n)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(batch)), key=lambda i: -n[i]):  # first fit, longest first
        r = next((r for r, free in enumerate(room) if free >= n[i]), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n[i]
    x = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # which conversation; -1 on padding
    for r, items in enumerate(rows):
        at = 0
        for s, i in enumerate(items):
            ids, mask = batch[i]
            k = n[i]
            x[r, at : at + k] = torch.tensor(ids[:-1])
            learn = torch.tensor(mask[1:])  # the mask of the token being predicted
            y[r, at : at + k] = torch.where(learn, torch.tensor(ids[1:]), -100)
            positions[r, at : at + k] = torch.arange(k)
            segment[r, at : at + k] = s
            at += k
    q = torch.arange(width)
    causal = q[None, :] <= q[:, None]  # (W, W): key <= query
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)  # (R, W, W)
    # Subtle: a padding query would see no key, and SDPA gives NaN for such a row: it sees itself.
    attn_mask = (causal[None] & same) | torch.eye(width, dtype=torch.bool)[None]
    return x, y, positions, attn_mask[:, None]


def training_conversations(world: World, data: SFTData, seed: int) -> tuple[list[list[dict]], dict]:
    """The conversations SFT trains on, in a seeded order: made from the synthetic world, or read from
    real chat data (hf / local) with the reader's counts of what it kept and dropped."""
    if data.source == "synthetic":
        if not world.people:
            raise LlmlabError(
                "sft.data.source synthetic needs the synthetic world (corpus.source: synthetic); "
                "with another corpus, use sft.data.source hf or local"
            )
        return [e.messages for e in sft_examples(world, data, seed)], {}
    conversations, stats = external_conversations(data, Path.cwd())
    random.Random(f"{seed}/sft-split").shuffle(conversations)
    return conversations, stats


def add_replay(
    train: ChatDataset, tok: Tokenizer, corpus_dir: Path, share: float, seed: int, context_length: int
) -> int:
    """Add pretraining documents to `train` so that they make `share` of its items (replay against
    forgetting: docs/knowledge.md); returns how many."""
    n = round(len(train) * share / (1 - share))
    if n:
        picked = random.Random(f"{seed}/replay").choices(read_corpus(corpus_dir, "train"), k=n)
        train.add_documents(tok, picked, context_length)
    return n


@dataclass
class SFTDatasets:
    """What SFT trains and validates on: the conversations (the first n_val held out for validation), the
    two datasets, how many replayed pretraining documents the training set holds, and the data's counts."""

    conversations: list[list[dict]]
    n_val: int
    train: ChatDataset
    val: ChatDataset
    n_replay: int
    stats: dict

    def digest(self) -> str:
        """A hash of the conversations (hf/local data can change under the same params)."""
        return hashlib.sha256(json.dumps(self.conversations, sort_keys=True).encode()).hexdigest()

    def counts(self) -> dict:
        """The data's part of metrics/sft.json."""
        return {
            "examples": len(self.conversations),
            "truncated": self.train.truncated + self.val.truncated,
            "no_answer": self.train.no_answer + self.val.no_answer,
            "replayed_documents": self.n_replay,
            **self.stats,
        }


def sft_datasets(
    tok: Tokenizer, world: World, data: SFTData, corpus_dir: Path, seed: int, context_length: int
) -> SFTDatasets:
    """`training_conversations` split 1:19 into validation and training, with replayed documents added to
    training (`add_replay`); an LlmlabError when no conversation fits the context with an answer in it."""
    conversations, stats = training_conversations(world, data, seed)
    n_val = max(1, len(conversations) // 20)
    val = ChatDataset(tok, conversations[:n_val], context_length)
    train = ChatDataset(tok, conversations[n_val:], context_length)
    n_replay = add_replay(train, tok, corpus_dir, data.replay_share, seed, context_length)
    if not len(train) or not len(val):
        raise LlmlabError(
            f"sft: no conversation fits the context of {context_length} tokens with an answer in it "
            f"({train.no_answer + val.no_answer} left out); use shorter conversations or a longer context"
        )
    return SFTDatasets(conversations, n_val, train, val, n_replay, stats)


def replies_for_report(
    model: GPT, tok: Tokenizer, world: World, cfg: SFTConfig, seed: int, held_out: list[list[dict]]
) -> tuple[dict, list[dict], list[str]]:
    """The fine-tuned model's replies for reports/sft: graded by the rater on the world's evaluation pool
    (`graded_replies`), or without a synthetic world, ungraded replies to held-out conversations."""
    if world.people:
        return graded_replies(model, tok, world, cfg, seed)
    return {}, *ungraded_replies(model, tok, held_out, cfg.max_new_tokens)


def graded_replies(
    model: GPT, tok: Tokenizer, world: World, cfg: SFTConfig, seed: int
) -> tuple[dict, list[dict], list[str]]:
    """The fine-tuned model's greedy replies to `eval_prompts` evaluation-pool prompts, graded by the rater:
    `chat_metrics`, the rows of reports/sft/replies.json and the first 40 as markdown lines."""
    tasks = prompt_pool(world, "eval", cfg.eval_prompts, seed, cfg.data.max_digits)
    replies = answer(model, tok, tasks, cfg.max_new_tokens)
    rater = Rater(world)
    metrics = chat_metrics(tasks, replies, rater, {p.name: p.group for p in world.people})
    rows = [
        {
            "prompt": t.prompt,
            "kind": t.kind,
            "reply": r.text,
            "ended": r.ended,
            "gold": rater.score(t, r.text, r.ended).total,
        }
        for t, r in zip(tasks, replies, strict=True)
    ]
    lines = [f"- **{r['kind']}** `{r['prompt']}` → {r['reply']!r} (gold {r['gold']:+.2f})" for r in rows[:40]]
    return metrics, rows, lines


def ungraded_replies(
    model: GPT, tok: Tokenizer, held_out: list[list[dict]], max_new_tokens: int
) -> tuple[list[dict], list[str]]:
    """With no ground truth: the replies to the first turns of up to 20 held-out conversations."""
    firsts = [c[:1] for c in held_out[:20]]
    rows = [
        {"prompt": m[0]["content"], "reply": r.text}
        for m, r in zip(firsts, reply(model, tok, firsts, max_new_tokens), strict=True)
    ]
    return rows, [f"- `{r['prompt'][:200]}` → {r['reply']!r}" for r in rows]


def summary_line(metrics: dict, val_loss: float, n_val: int) -> str:
    """The stage's last log line: the validation loss, and with graded replies format, accuracy and gold."""
    if "format_adherence" not in metrics:
        return f"val loss {val_loss:.3f} on {n_val} held-out conversations"
    return (
        f"val loss {val_loss:.3f} · format {100 * metrics['format_adherence']:.1f}% · fact accuracy "
        f"{100 * metrics.get('accuracy/fact', 0):.1f}% (held-out people {100 * metrics.get('accuracy_heldout_people', 0):.1f}%) "
        f"· gold {metrics['gold_score_mean']:.2f}"
    )
