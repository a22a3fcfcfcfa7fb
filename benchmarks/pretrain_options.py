"""Pretraining speed options on this machine: which of SDPA, fused AdamW, a fused RMSNorm, torch.compile and
bf16 autocast pay, and what the Canon places of the model cost.

Each variant trains the default model (`params.yaml` → pretrain) with a plain PyTorch loop on the same
token windows from the same initial weights, and changes one thing against the stage's own set-up
(SDPA attention, fused AdamW, fp32, eager):

- `manual attention`: softmax(q·kᵀ/√d + causal mask)·v written out, instead of
  `F.scaled_dot_product_attention`;
- `unfused AdamW`: the multi-tensor (`foreach`) AdamW instead of the fused kernel;
- `fused RMSNorm`: PyTorch's `F.rms_norm` (one kernel) instead of the model's RMSNorm written out in
  float32 (square, mean, rsqrt, two products); the same function in fp32;
- `torch.compile`: the model wrapped in `torch.compile` (its compile time reported separately);
- `bf16 autocast`: forward and loss under `torch.autocast(dtype=bfloat16)`, master weights in fp32 —
  what Lightning's `bf16-mixed` does;
- `Canon at …`: the model with its Canon layers at other places (`pretrain.model.canon_places`): at A alone
  when the default has more, at A and B when it has A alone. Not a speed option but the price of one.

Tokens/s are timed after a warm-up (which includes compilation). Variants are interleaved round by round
and the best round of each is kept. The loss of the last 50 steps is reported next to the speed, so that
a faster variant that learns differently (bf16) shows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config
import torch.nn.functional as F

from llmlab.data.tokenizer import open_split
from llmlab.model.transformer import GPT, GPTConfig, RMSNorm
from llmlab.params import load_params
from llmlab.training.pretraining import TokenWindows
from llmlab.training.trainer import adamw, lr_at

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [
    "stage set-up",
    "manual attention",
    "unfused AdamW",
    "fused RMSNorm",
    "torch.compile",
    "bf16 autocast",
]


def _manual_sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    return scores.softmax(-1) @ v


@contextlib.contextmanager
def _attention(manual: bool):
    if not manual:
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _manual_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _rms_norm(fused: bool):
    if not fused:
        yield
        return
    original = RMSNorm.forward
    RMSNorm.forward = lambda self, x: F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
    try:
        yield
    finally:
        RMSNorm.forward = original


def _tokens(vocab_size: int):
    """The pipeline's training tokens if the tokenizer stage has run here, else random ids."""
    real = ROOT / "data" / "tokens"
    if (real / "meta.json").exists():
        return open_split(real, "train")
    return np.random.default_rng(0).integers(0, vocab_size, 400_000).astype(np.uint16)


def other_canon_places(config: GPTConfig) -> str:
    """The variant's Canon places: A alone if the default mixes more, else A and B."""
    return "A" if config.canon_places != "A" else "AB"


def train(variant: str, config: GPTConfig, cfg, tokens, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    if variant.startswith("Canon at "):
        config = dataclasses.replace(config, canon_places=other_canon_places(config))
    model = GPT(config)
    opt = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), "cpu")
    if variant == "unfused AdamW":
        opt = torch.optim.AdamW(
            opt.param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=True
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg, steps))
    if variant == "torch.compile":
        # Compiled from scratch, as on a user's first run: the warm-up includes the whole compilation.
        torch._inductor.config.force_disable_caches = True
    forward = torch.compile(model) if variant == "torch.compile" else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16 autocast")
    data = torch.utils.data.DataLoader(
        TokenWindows(tokens, config.context_length, steps * cfg.batch_size, 0), batch_size=cfg.batch_size
    )
    losses, t_start, t0 = [], time.perf_counter(), 0.0
    with _attention(variant == "manual attention"), _rms_norm(variant == "fused RMSNorm"):
        for i, (x, y) in enumerate(data):
            if i == warmup:
                t0 = time.perf_counter()
                warmup_s = t0 - t_start
            with autocast:
                _, loss = forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": (steps - warmup) * cfg.batch_size * config.context_length / seconds,
        "warmup_s": warmup_s,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
    }


def run(steps: int = 300, warmup: int = 20, rounds: int = 3) -> dict:
    params = load_params(ROOT / "params.yaml")
    cfg, vocab_size = params.pretrain, params.tokenizer.vocab_size
    tokens = _tokens(vocab_size)
    config = GPTConfig.from_params(cfg.model, vocab_size)
    variants = [*VARIANTS, f"Canon at {other_canon_places(config)}"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            runs[variant].append(train(variant, config, cfg, tokens, steps, warmup))
            torch._dynamo.reset()
    base = max(r["tokens_per_s"] for r in runs["stage set-up"])
    rows = []
    for variant, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])
        rows.append(
            {
                "variant": variant,
                **best,
                "vs_stage": best["tokens_per_s"] / base,
                "all_tokens_per_s": [r["tokens_per_s"] for r in results],
            }
        )
    return {
        "model": f"{config.n_layer} layers × {config.d_model} wide, context {config.context_length}, vocab "
        f"{config.vocab_size}, Canon layers at {config.canon_places}",
        "batch": f"{cfg.batch_size} × {config.context_length} tokens",
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "variants": rows,
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 300, rounds=1), indent=2))
