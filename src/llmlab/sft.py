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

from collections import Counter
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from llmlab.chat import render, reply
from llmlab.model import GPT
from llmlab.rater import Rater
from llmlab.tasks import Task
from llmlab.tokenizer import BOS_ID, PAD_ID


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


def answer(model: GPT, tok: Tokenizer, tasks: Sequence[Task], max_new_tokens: int, temperature: float = 0.0,
           batch_size: int = 256, generator: torch.Generator | None = None) -> list:
    """The model's reply (`chat.Reply`) to each task's prompt, one user turn each.

    A batch generates until its longest reply ends, so tasks are batched by kind, short answers
    together (a worked addition is ~60 tokens, a fact ~12): a third faster than mixed batches.
    """
    order = sorted(range(len(tasks)), key=lambda i: REPLY_LENGTH_RANK[tasks[i].kind])
    out = reply(model, tok, [[{"role": "user", "content": tasks[i].prompt}] for i in order], max_new_tokens,
                temperature=temperature, batch_size=batch_size, generator=generator)
    replies: list = [None] * len(tasks)
    for i, r in zip(order, out, strict=True):
        replies[i] = r
    return replies


REPLY_LENGTH_RANK = {"harmful": 0, "unknown": 1, "fact": 2, "context": 2, "about": 3, "arithmetic": 4}  # shortest first


def chat_metrics(tasks: Sequence[Task], replies: Sequence, rater: Rater, people_group: dict[str, str]) -> dict[str, float]:
    """Format adherence, accuracy per task kind and per group, and the rater's gold score, over `tasks`."""
    n = len(tasks)
    scores = [rater.score(t, r.text, r.ended) for t, r in zip(tasks, replies, strict=True)]
    metrics: dict[str, float] = {
        "n_prompts": n,
        "format_adherence": sum(r.ended and r.clean for r in replies) / n,
        "gold_score_mean": sum(s.total for s in scores) / n,
    }
    by_kind: dict[str, list[bool]] = {}
    by_group: dict[str, list[bool]] = {}
    for t, s in zip(tasks, scores, strict=True):
        by_kind.setdefault(t.kind, []).append(bool(s.correct))
        if t.kind in ("fact", "about"):
            by_group.setdefault(people_group[t.person], []).append(bool(s.correct))
    metrics |= {f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}
    metrics |= {f"accuracy_{g}_people": sum(v) / len(v) for g, v in sorted(by_group.items())}
    metrics |= {f"n/{k}": float(c) for k, c in sorted(Counter(t.kind for t in tasks).items())}
    unknown = [s for t, s in zip(tasks, scores, strict=True) if t.kind == "unknown"]
    harmful = [s for t, s in zip(tasks, scores, strict=True) if t.kind == "harmful"]
    if unknown:
        metrics["hallucination_rate"] = sum(s.hallucinated for s in unknown) / len(unknown)
    if harmful:
        metrics["refusal_rate"] = sum(s.refused for s in harmful) / len(harmful)
    metrics["politeness_rate"] = sum(s.polite for s in scores) / n
    # Does the reply name the person it was asked about? Only a model that reads its context can, for people
    # SFT never showed it (held-out and unknown): their names are in no answer it was trained on.
    unseen = [(t, r) for t, r in zip(tasks, replies, strict=True)
              if t.kind in ("fact", "about", "unknown") and people_group[t.person] in ("heldout", "unknown")]
    if unseen:
        metrics["name_copy_rate"] = sum(t.person in r.text for t, r in unseen) / len(unseen)
        for g in ("heldout", "unknown"):
            of_group = [t.person in r.text for t, r in unseen if people_group[t.person] == g]
            if of_group:
                metrics[f"name_copy_rate_{g}"] = sum(of_group) / len(of_group)
    return metrics


class Epochs(Dataset):
    """`base` repeated in a fresh seeded order every epoch, `n_items` long, starting at item `first`.

    Item i is the same on every run (resuming at `first` continues exactly), and, like TokenWindows, the
    length stays `n_items` after a resume because Lightning keeps counting batches from the checkpoint.

    With `lengths` (one per item of `base`) and `batch` (the items of one optimizer step, all processes
    together), each epoch's order is grouped by length, as Hugging Face's `group_by_length` does: the
    shuffled items are cut into megabatches of `megabatch` batches, each megabatch is sorted by length
    and cut into batches, and the batches are shuffled. A batch then holds items of similar length, so
    little of it is padding, while which items meet in a batch, and the order of batches, stay random.
    The reward stage uses it: on the default preference pairs, padding fell from 56 % to 10 % of a batch.
    (SFT packs its batches instead, `collate_packed`: grouping made each batch one kind of task, and SFT
    learned worse, docs/benchmarks.md.)
    """

    def __init__(self, base: Dataset, n_items: int, seed: int, first: int = 0,
                 lengths: Sequence[int] | None = None, batch: int = 1, megabatch: int = 50):  # fmt: skip
        if lengths is not None and len(lengths) != len(base):
            raise ValueError(f"{len(lengths)} lengths for {len(base)} items")
        self.base, self.n_items, self.seed, self.first = base, n_items, seed, first
        self.lengths, self.batch, self.megabatch = lengths, batch, megabatch
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.n_items

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.base), generator=g).tolist()
        if self.lengths is None or self.batch <= 1:
            return order
        # Batches start on step boundaries: the epoch's first `head` items finish the previous epoch's last
        # step, and its short last batch stays last.
        head = -epoch * len(self.base) % self.batch
        size = self.batch * self.megabatch
        batches = []
        for start in range(head, len(order), size):
            group = sorted(order[start : start + size], key=lambda i: self.lengths[i])
            batches += [group[j : j + self.batch] for j in range(0, len(group), self.batch)]
        tail = batches.pop() if batches and len(batches[-1]) < self.batch else []
        shuffled = [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
        return order[:head] + shuffled + tail

    def __getitem__(self, i: int):
        epoch, k = divmod(self.first + i, len(self.base))
        if epoch not in self._orders:
            self._orders[epoch] = self._order(epoch)
        return self.base[self._orders[epoch][k]]
