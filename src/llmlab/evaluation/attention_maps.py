"""What attention looks at: every head's attention probabilities, recomputed from the model's weights.

The model itself never shows them: `CausalSelfAttention` calls `F.scaled_dot_product_attention`, whose
fused kernels never materialise the (T, T) matrix. Here each layer's attention is redone the textbook way,
from the same weights and the same rotary positions,

    q, k, v = RMSNorm(x) W_qkv             (then RoPE rotates q and k by their positions)
    A       = softmax(q kᵀ / √hs + causal)  (T, T) per head: row i is what token i reads from tokens 0..i
    y       = A v                           (then W_proj mixes the heads back into the residual stream)

so A is exactly what the model uses (a test recombines A with v and gets the block's output back).

A few heads have recognisable jobs even in small models: a "previous-token" head puts its weight on the
token just before (the first half of an induction circuit), a "first-token" head parks weight on
position 0 when it has nothing better to do (an attention sink), and some heads spread their weight
evenly. `head_scores` puts a number on each of these so a report can say what a head does.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.model.transformer import GPT, Block


def layer_qkv(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The queries, keys (rotated) and values one block's attention computes from its input x (B, T, C).

    The same steps as `CausalSelfAttention.forward`, stopped before SDPA. Returns 3 × (B, nh, T, hs).
    """
    return block.attn.heads(block.attention_input(x, None), cos, sin)


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √hs) with every key after the query masked out: (B, nh, T, T), rows sum to 1.

    Subtle: the mask sets future scores to -inf *before* the softmax, so exp(-inf) = 0 and the remaining
    weights renormalise among tokens 0..i; zeroing them after the softmax would leave rows summing to < 1.
    """
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T): the matrix that makes attention O(T²)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # True above the diagonal
    return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@torch.no_grad()
def attention_weights(model: GPT, ids: list[int]) -> torch.Tensor:
    """Every head's attention probabilities on one sequence: (n_layer, n_head, T, T), on the CPU.

    weights[l, h, i, j] is how much token i reads from token j in head h of layer l; zero for j > i.
    Each block is run by the model's own forward, so layer l sees exactly the residual stream it sees
    in `model(ids)`; only the probabilities are recomputed alongside.
    """
    T = len(ids)
    if not 0 < T <= model.config.context_length:
        raise ValueError(f"need 1 to {model.config.context_length} token ids (the context length), got {T}")
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    cos, sin = model.rope_cos[:T][None, None], model.rope_sin[:T][None, None]  # (1, 1, T, hs)
    x = model.embed(idx)  # (1, T, C)
    per_layer = []
    for block in model.blocks:
        q, k, _ = layer_qkv(block, x, cos, sin)
        per_layer.append(causal_attention_probs(q, k)[0])  # (nh, T, T)
        x = block(x, cos, sin)
    return torch.stack(per_layer).float().cpu()  # (L, nh, T, T)


def head_scores(weights: torch.Tensor) -> list[dict]:
    """One dict per head of (L, nh, T, T) weights, numbers in [0, 1], averaged over the rows i >= 2.

    previous_token: mean weight on token i - 1.  first_token: mean weight on token 0.
    self: mean weight on token i itself.  entropy: mean row entropy divided by its maximum log(i + 1)
    (1 = uniform over the visible tokens, 0 = all on one token), so long and short rows count alike.
    Rows 0 and 1 are left out: row 0 can only attend to itself, and in row 1 the previous token *is*
    the first token. E.g. a head whose rows are all one-hot on i - 1 scores previous_token 1, entropy 0.
    """
    L, nh, T, _ = weights.shape
    if T < 3:
        raise ValueError(f"head scores need at least 3 tokens (rows 0 and 1 are left out), got {T}")
    rows = torch.arange(2, T)
    w = weights[:, :, rows]  # (L, nh, T-2, T)
    previous = w[:, :, torch.arange(T - 2), rows - 1].mean(-1)  # (L, nh)
    first = w[:, :, :, 0].mean(-1)
    self_ = w[:, :, torch.arange(T - 2), rows].mean(-1)
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)  # (L, nh, T-2), nats
    entropy = (entropy / rows.float().add(1).log()).mean(-1)  # divided by log(i + 1), the uniform row's
    return [
        {
            "layer": layer,
            "head": head,
            "previous_token": previous[layer, head].item(),
            "first_token": first[layer, head].item(),
            "self": self_[layer, head].item(),
            "entropy": entropy[layer, head].item(),
        }
        for layer in range(L)
        for head in range(nh)
    ]


# What makes a head "interesting", best first: (role, the score it is picked by, higher is better?).
ROLES = (
    ("previous-token", "previous_token", True),
    ("first-token", "first_token", True),
    ("focused", "entropy", False),
    ("diffuse", "entropy", True),
)


def interesting_heads(weights: torch.Tensor) -> list[dict]:
    """One head per role in `ROLES`, each a different head: its `head_scores` dict plus a "role" key.

    A role goes to the best head not already picked, so with fewer heads than roles the last roles
    are left out. Say a head looks at the previous token only if its score says so (e.g. > 0.5): the
    best of a model's heads at a role may still be poor at it.
    """
    scores = head_scores(weights)
    picked: list[dict] = []
    for role, key, higher in ROLES:
        free = [s for s in scores if all((s["layer"], s["head"]) != (p["layer"], p["head"]) for p in picked)]
        if not free:
            break
        best = max(free, key=lambda s: s[key] if higher else -s[key])
        picked.append({"role": role, **best})
    return picked


def copying_heads(model: GPT, sequences: list[list[int]], top: int = 3) -> list[dict]:
    """The heads that copy a name: in each sequence the last token repeats an earlier token (the first
    name, mentioned again), and a copying (induction) head attends from it to the token *after* the
    earlier mention (the surname it should predict next). Returns the `top` heads by their mean attention
    on that token, as {"layer", "head", "score"}, plus what a head that looked anywhere uniformly would put
    there ("uniform", the same for every head).

    e.g. "... Brisa Talmont works as a nurse. What is Brisa Talmont's job? Brisa": from the last "Brisa" to
    the first " Talmont".
    """
    L, nh = model.config.n_layer, model.config.n_head
    total, uniform, n = torch.zeros(L, nh), 0.0, 0
    for ids in sequences:
        ids = ids[-model.config.context_length :]
        targets = [j + 1 for j in range(len(ids) - 2) if ids[j] == ids[-1]]
        if not targets:
            continue
        weights = attention_weights(model, ids)  # (L, nh, T, T)
        total += weights[:, :, -1, targets].sum(-1)
        uniform += len(targets) / len(ids)
        n += 1
    if not n:
        return []
    mean = total / n
    order = mean.flatten().argsort(descending=True)[:top].tolist()
    return [
        {"layer": i // nh, "head": i % nh, "score": float(mean.flatten()[i]), "uniform": uniform / n}
        for i in order
    ]


def _tick_label(token: str) -> str:
    """A token as an axis label: whitespace made visible, and `$` escaped so matplotlib shows no maths."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·").replace("$", r"\$") or "∅"


def plot_heads(
    weights: torch.Tensor,
    tokens: list[str],
    heads: list[tuple[int, int]],
    path: str | Path,
    title: str,
    captions: list[str] | None = None,
) -> None:
    """A grid of heat maps, one per (layer, head): rows are queries, columns the keys they attend to.

    tokens: the T token strings (both axes). captions: an optional line under each panel's title (e.g.
    the head's role and score). One shared colour bar from 0 to 1, so heads compare.
    """
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = weights.shape[-1]
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token strings for attention over {T} tokens")
    if not heads:
        raise ValueError("no heads to plot: pass at least one (layer, head)")
    if captions is not None and len(captions) != len(heads):
        raise ValueError(f"{len(captions)} captions for {len(heads)} heads")
    labels = [_tick_label(t) for t in tokens]
    ncols = 2 if len(heads) == 4 else min(len(heads), 3)  # 4 as 2 × 2, otherwise rows of up to 3
    nrows = math.ceil(len(heads) / ncols)
    cell = 0.25 * T + 1.2  # inches per panel: room for ~15 labels
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * cell + 1.2, nrows * cell + 0.8), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(heads) :]:
        ax.axis("off")
    for n, (ax, (layer, head)) in enumerate(zip(axes.flat, heads, strict=False)):
        image = ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}, head {head}" + (f"\n{captions[n]}" if captions else ""), fontsize=9)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        if n % ncols == 0:
            ax.set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.7, label="attention weight")
    fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
