"""Autoregressive sampling: one token at a time, each appended to the context before the next is drawn.

The model maps a sequence to a distribution over the next token; generation is a loop around it:

    logits = model(context)[-1]             # scores for every vocabulary entry
    probs  = softmax(logits / temperature)  # T < 1 sharpens, T > 1 flattens, T = 0 is argmax
    token  = sample(probs)                  # after top-k / top-p truncation
    context = context + [token]

With a KV cache (the default) the prompt is run once and each later step feeds only the new token.
`stream` is the same loop for one prompt, yielding each token as it is drawn (for a chat that prints the
reply while it is written).
Prompts in a batch have different lengths: they are left-padded, the padding is masked out of attention,
and each row's rotary positions count only its real tokens, so a row's output does not depend on what
else is in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from llmlab.model.transformer import GPT, KVCache, padded_attention_mask


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from (B, V) logits. temperature 0 means greedy (argmax).

    top_k keeps the k highest-scoring tokens; top_p keeps the smallest set of most likely tokens whose
    probability adds up to at least p (always at least one). E.g. probs [0.5, 0.3, 0.2] with top_p=0.7
    keeps the first two: 0.5 < 0.7, then 0.5 + 0.3 >= 0.7.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of all strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt; return the new tokens per prompt (a stop token, if drawn, is included last).

    A prompt longer than context_length - 1 keeps only its most recent tokens, and each row stops at the
    context length (this model has no positions beyond it): a row has the room its own prompt leaves, not
    the room of the batch's longest prompt.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with <|bos|>)")
    ctx = model.config.context_length
    device = next(model.parameters()).device
    prompts = [list(p)[-(ctx - 1) :] for p in prompts]
    B, P = len(prompts), max(len(p) for p in prompts)
    room = torch.tensor([max(0, min(max_new_tokens, ctx - len(p))) for p in prompts], device=device)
    n_new = int(room.max())
    S_max = P + n_new  # beyond ctx when prompts differ in length: positions, not slots, stop at ctx

    tokens = torch.full((B, S_max), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, S_max, dtype=torch.bool, device=device)  # False for left padding
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p) : P] = True
    valid[:, P:] = True  # every generated slot holds a real token
    padded = bool((~valid[:, :P]).any())
    # (B, S_max): each row counts from its first real token; a row that reached the context length has
    # finished, and the slots it still fills while it waits to leave the batch stay at the last position
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0, max=ctx - 1)

    # Rows still generating: a row that has drawn a stop token leaves the batch once a quarter of the
    # batch has (its cache rows are dropped with it), so a batch costs about the sum of its replies'
    # lengths rather than its size times the longest reply.
    rows = torch.arange(B, device=device)
    live_valid, live_positions, live_room = valid, positions, room

    def forward(start: int, end: int, cache: KVCache | None) -> torch.Tensor:
        """Logits at position end - 1 for the live rows' tokens in [start, end) (all of [0, end) without a cache)."""
        mask = padded_attention_mask(live_valid[:, :end], end - start) if padded else None
        pos = live_positions[:, start:end] if padded else None
        logits, _ = model(tokens[rows, start:end], positions=pos, attn_mask=mask, cache=cache, last_only=True)
        return logits[:, -1]  # (live rows, V)

    cache = (
        KVCache(model.config, B, S_max, device, dtype=next(model.parameters()).dtype) if use_cache else None
    )
    logits = forward(0, P, cache)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # of the live rows
    steps = 0
    for t in range(n_new):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (live rows,)
        tokens[rows, P + t] = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        finished |= torch.isin(nxt, stop) | (live_room <= t + 1)
        steps = t + 1
        if steps == n_new or finished.all():
            break
        if finished.sum() * 4 >= len(rows):
            keep = ~finished
            rows, finished, live_room = rows[keep], finished[keep], live_room[keep]
            live_valid, live_positions = live_valid[keep], live_positions[keep]
            if cache is not None:
                cache.keep(keep)
        logits = forward(P + t, P + t + 1, cache) if use_cache else forward(0, P + t + 1, None)
    out = tokens[:, P : P + steps].tolist()
    return [_cut_at_stop(row[:r], stop_ids) for row, r in zip(out, room.tolist(), strict=True)]


@torch.no_grad()
def stream(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Continue one prompt, yielding each new token as soon as it is drawn (a stop token is yielded last).

    The same loop as `generate` for a batch of one, so it yields exactly the tokens `generate` returns,
    greedy or sampled with the same seeded generator: the same forward calls, then one `sample_next` per
    step. What it adds is time to first token: a chat can print a reply while it is being written.
    """
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token (start it with <|bos|>)")
    ctx = model.config.context_length
    device = next(model.parameters()).device
    prompt = list(prompt)[-(ctx - 1) :]
    n_new = max(0, min(max_new_tokens, ctx - len(prompt)))
    cache = KVCache(model.config, 1, len(prompt) + n_new, device, dtype=next(model.parameters()).dtype)
    logits, _ = model(torch.tensor([prompt], dtype=torch.long, device=device), cache=cache, last_only=True)
    for t in range(n_new):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (1,)
        token = int(nxt.item())
        yield token
        if token in stop_ids or t + 1 == n_new:
            return
        logits, _ = model(nxt[:, None], cache=cache, last_only=True)  # only the new token goes through


def _cut_at_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    """[5, 7, STOP, PAD, PAD] -> [5, 7, STOP]; a row that never stopped is returned whole."""
    for i, tok in enumerate(row):
        if tok in stop_ids:
            return row[: i + 1]
    return row
