"""The simplest strong baseline for pretraining speed: a GPT-2-shaped model trained by a minimal loop.

Same width, depth, heads, context and vocabulary as the stage's model, and about its parameter count, but
GPT-2's parts: learned absolute positions instead of rotary, a GELU MLP (4 × wide) instead of SwiGLU,
LayerNorm (no bias) instead of RMSNorm, one fused q/k/v projection and PyTorch's fused attention, tied
embeddings. The loop is forward, backward, clip, AdamW step, with the stage's batch and data windows.
`benchmarks/pretrain_throughput.py` times it beside the stage in the same rounds.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.model.transformer import GPTConfig
from llmlab.training.pretraining import TokenWindows


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.d_model
        self.tok = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.context_length, d)
        self.blocks = nn.ModuleList(Block(d, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied, like the stage's default
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def train(config: GPTConfig, cfg, tokens, steps: int, warmup: int) -> float:
    """Tokens per second of the minimal loop after `warmup` steps."""
    torch.manual_seed(0)
    model = GPT2(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    data = torch.utils.data.DataLoader(
        TokenWindows(tokens, config.context_length, steps * cfg.batch_size, 0), batch_size=cfg.batch_size
    )
    t0 = 0.0
    for i, (x, y) in enumerate(data):
        if i == warmup:
            t0 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warmup) * cfg.batch_size * config.context_length / (time.perf_counter() - t0)


def parameters(config: GPTConfig) -> int:
    return sum(p.numel() for p in GPT2(config).parameters())
