"""Attention maps against references: the model's own block outputs, a plain-loop softmax, causality."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch

from llmlab.evaluation.attention_maps import (
    attention_weights,
    copying_heads,
    head_scores,
    interesting_heads,
    plot_heads,
)
from llmlab.model.transformer import GPT, GPTConfig

CFG = GPTConfig(vocab_size=97, d_model=32, n_layer=3, n_head=4, context_length=24, ffn_hidden=64)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_model(seed=0, std=0.3) -> GPT:
    """Large random weights, so that attention rows are far from uniform and errors would show."""
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, std)  # norm weights around 1, matrices around 0
    return model.eval()


def block_inputs_and_outputs(model: GPT, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block during the model's own forward, caught with hooks."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in model.blocks]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return seen


IDS = [3, 17, 42, 5, 5, 88, 1, 60, 23, 9, 71, 5, 42, 30, 2, 11]


def canon_mixed(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """x (T, width) mixed by hand as a Canon layer does: x_t (1 + w_0) + Σ_d w_d x_(t−d); x itself without one."""
    if weight is None:
        return x
    w = weight.to(x.dtype)
    return torch.stack(
        [x[t] * (1 + w[0]) + sum(w[d] * x[t - d] for d in range(1, len(w)) if t >= d) for t in range(len(x))]
    )


def qkv_by_hand(block, x_in: torch.Tensor) -> torch.Tensor:
    """(T, 3C): the block's queries, keys and values before RoPE, its Canon layer on them (B) applied by hand."""
    h = block.attention_input(x_in, None)[0].double()  # (T, C): normalised, then canon-mixed (A)
    b = block.attn.canon.weight.double() if block.attn.canon is not None else None
    return canon_mixed(h @ block.attn.qkv.weight.double().T, b)


def test_weights_times_values_reproduce_every_blocks_output():
    model = random_model()
    weights = attention_weights(model, IDS)
    C, nh, hs, T = CFG.d_model, CFG.n_head, CFG.head_size, len(IDS)
    for layer, (x_in, x_out) in enumerate(block_inputs_and_outputs(model, IDS)):
        block = model.blocks[layer]
        with torch.no_grad():
            v = qkv_by_hand(block, x_in)[:, 2 * C :].float()  # the values, (T, C)
            v = v.view(1, T, nh, hs).transpose(1, 2)  # (1, nh, T, hs)
            y = (weights[layer][None] @ v).transpose(1, 2).reshape(1, T, C)  # heads side by side
            x = x_in + block.attn.proj(y)
            h = block.mlp_norm(x)
            x = x + block.mlp(h if block.mlp_canon is None else block.mlp_canon(h))
        torch.testing.assert_close(x, x_out, rtol=0, atol=1e-5)


def test_one_head_matches_a_plain_loop_softmax_with_rope_written_out():
    model = random_model(seed=1)
    layer, head = 1, 2
    weights = attention_weights(model, IDS)
    x_in, _ = block_inputs_and_outputs(model, IDS)[layer]
    block, C, hs = model.blocks[layer], CFG.d_model, CFG.head_size
    with torch.no_grad():
        qkv = qkv_by_hand(block, x_in)  # (T, 3C)
        q = qkv[:, head * hs : (head + 1) * hs]  # (T, hs)
        k = qkv[:, C + head * hs : C + (head + 1) * hs]

    def rope(vec, pos):
        """Rotate each pair (i, i + hs/2) by pos · theta^(-2i/hs)."""
        out = vec.clone()
        for i in range(hs // 2):
            angle = pos * CFG.rope_theta ** (-2 * i / hs)
            a, b = vec[i].item(), vec[i + hs // 2].item()
            out[i], out[i + hs // 2] = (
                a * math.cos(angle) - b * math.sin(angle),
                b * math.cos(angle) + a * math.sin(angle),
            )
        return out

    q = [rope(q[t], t) for t in range(len(IDS))]
    k = [rope(k[t], t) for t in range(len(IDS))]
    for i in range(len(IDS)):
        scores = [
            sum(q[i][d].item() * k[j][d].item() for d in range(hs)) / math.sqrt(hs) for j in range(i + 1)
        ]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        expected = [e / sum(exps) for e in exps] + [0.0] * (len(IDS) - i - 1)
        torch.testing.assert_close(
            weights[layer, head, i].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5
        )


def test_rows_are_distributions_over_the_past_and_ignore_the_future():
    model = random_model(seed=2)
    weights = attention_weights(model, IDS)
    assert weights.shape == (CFG.n_layer, CFG.n_head, len(IDS), len(IDS))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-6)
    assert (weights.triu(diagonal=1) == 0).all()
    prefix = attention_weights(model, IDS[:7])  # changing or dropping later tokens changes no earlier row
    torch.testing.assert_close(prefix, weights[:, :, :7, :7], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        attention_weights(model, list(range(CFG.context_length + 1)))


def synthetic_heads(T=10) -> torch.Tensor:
    """(2, 2, T, T): previous-token, first-token, uniform and self heads, each exactly."""
    eye = torch.eye(T)
    previous = torch.roll(eye, shifts=-1, dims=1).tril()
    previous[0, 0] = 1.0
    first = torch.zeros(T, T)
    first[:, 0] = 1.0
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    return torch.stack([torch.stack([previous, first]), torch.stack([uniform, eye])])


def test_head_scores_and_roles_on_heads_with_known_jobs():
    weights = synthetic_heads()
    scores = {(s["layer"], s["head"]): s for s in head_scores(weights)}
    assert scores[(0, 0)]["previous_token"] == pytest.approx(1.0)
    assert scores[(0, 0)]["first_token"] == pytest.approx(0.0)
    assert scores[(0, 1)]["first_token"] == pytest.approx(1.0)
    assert scores[(1, 1)]["self"] == pytest.approx(1.0)
    assert scores[(1, 0)]["entropy"] == pytest.approx(1.0)  # uniform over the visible tokens
    assert scores[(0, 0)]["entropy"] == pytest.approx(0.0, abs=1e-6)  # one-hot rows
    # uniform row i puts 1/(i+1) on i-1: the mean over rows 2..9 of 1/(i+1)
    assert scores[(1, 0)]["previous_token"] == pytest.approx(sum(1 / (i + 1) for i in range(2, 10)) / 8)
    roles = {h["role"]: (h["layer"], h["head"]) for h in interesting_heads(weights)}
    assert roles == {"previous-token": (0, 0), "first-token": (0, 1), "focused": (1, 1), "diffuse": (1, 0)}


def test_plot_heads_writes_a_png(tmp_path):
    model = random_model()
    tokens = [
        "<|bos|>",
        "The",
        " cat",
        "\n",
        "$5",
        " sat",
        " on",
        " the",
        " mat",
        ".",
        " It",
        " was",
        " a",
        " sunny",
        " day",
        "!",
    ]
    path = tmp_path / "maps" / "heads.png"
    plot_heads(attention_weights(model, IDS), tokens, [(0, 0), (1, 2), (2, 3), (2, 1)], path, "random model")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 800 and height > 400
    with pytest.raises(ValueError, match="token strings"):
        plot_heads(attention_weights(model, IDS), tokens[:-1], [(0, 0)], path, "wrong")


def test_copying_heads_score_the_token_after_the_earlier_mention():
    """By hand on two sequences: the last token (7) appeared earlier at positions 2 and 5 (first sequence)
    and 1 (second); a head's score is its attention from the last token to positions 3 and 6, then 2,
    averaged over the sequences. A sequence whose last token is new counts for nothing."""
    model = random_model(seed=4)
    seqs = [[1, 9, 7, 40, 11, 7, 50, 12, 7], [2, 7, 33, 14, 7], [3, 4, 5]]
    w1, w2 = attention_weights(model, seqs[0]), attention_weights(model, seqs[1])
    expected = (w1[:, :, -1, [3, 6]].sum(-1) + w2[:, :, -1, [2]].sum(-1)) / 2  # (L, nh)
    top = copying_heads(model, seqs, top=3)
    assert [(h["layer"], h["head"]) for h in top] == [
        divmod(i, CFG.n_head) for i in expected.flatten().argsort(descending=True)[:3].tolist()
    ]
    assert [h["score"] for h in top] == pytest.approx(
        sorted(expected.flatten().tolist(), reverse=True)[:3], abs=1e-6
    )
    assert top[0]["uniform"] == pytest.approx((2 / 9 + 1 / 5) / 2)
    assert copying_heads(model, [[3, 4, 5]]) == []
