"""Asking a model for chat replies: the one function every stage uses (SFT's, PPO's and the evaluate
stage's graded replies, the preference stage's samples, the reward stage's shift).

Kept apart from `data/chat_template.py` (the template and the parsing), which the CLI imports without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from llmlab.data.chat_template import Reply, parse_reply, render
from llmlab.data.tasks import Task
from llmlab.data.tokenizer import END_ID
from llmlab.model.generate import generate
from llmlab.model.transformer import GPT


@torch.no_grad()
def reply(
    model: GPT,
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> list[Reply]:
    """The model's next turn in each conversation: rendered with the chat template and an open assistant
    turn, generated `batch_size` conversations at a time (in the order given: a batch runs until its longest
    reply ends, so put replies of similar length together) until <|end|> or `max_new_tokens`, then parsed.

    The one way every stage asks a model for replies (SFT, preferences, reward, PPO, evaluation)."""
    out: list[Reply] = []
    for i in range(0, len(conversations), batch_size):
        ids = [render(tok, c, add_generation_prompt=True).ids for c in conversations[i : i + batch_size]]
        outs = generate(
            model, ids, max_new_tokens, temperature=temperature, stop_ids=[END_ID], generator=generator
        )
        out += [parse_reply(tok, o) for o in outs]
    return out


def answer(
    model: GPT,
    tok: Tokenizer,
    tasks: Sequence[Task],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> list:
    """The model's reply (`chat.Reply`) to each task's prompt, one user turn each.

    A batch generates until its longest reply ends, so tasks are batched by kind, short answers
    together (a worked addition is ~60 tokens, a fact ~12): a third faster than mixed batches.
    """
    order = sorted(range(len(tasks)), key=lambda i: REPLY_LENGTH_RANK[tasks[i].kind])
    out = reply(
        model,
        tok,
        [[{"role": "user", "content": tasks[i].prompt}] for i in order],
        max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        generator=generator,
    )
    replies: list = [None] * len(tasks)
    for i, r in zip(order, out, strict=True):
        replies[i] = r
    return replies


REPLY_LENGTH_RANK = {
    "harmful": 0,
    "unknown": 1,
    "fact": 2,
    "context": 2,
    "about": 3,
    "arithmetic": 4,
}  # shortest first
