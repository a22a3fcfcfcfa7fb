"""How fast can the default model learn to read names and values out of its context, given nothing else?

The default pretraining run copies never-seen names (96 %) but reads a stated value back at about chance
(docs/knowledge.md). This asks whether that is the corpus or the model: it trains the default model
(`params.yaml` → pretrain.model, or `--n-layer/--n-head`) from scratch on context documents only
(`world.context_documents`: made-up people, facts stated, then asked and answered) with a plain PyTorch
loop, and measures the copy probes of the pretraining stage (`world.copy_probes`, probe-half names) every
`--every` steps. It needs the world and tokenizer of a run: `dvc repro tokenizer` first.

    python benchmarks/copy_learning.py --steps 4000 --lr 3e-3 --write   # --write: into docs/knowledge.md
    python benchmarks/copy_learning.py --steps 1500 --every 250 --lr 6e-3 --canon-kernel 4 --seed 2   # the Canon layer
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World, context_documents, copy_probes
from llmlab.evaluation.measurements import copy_accuracy
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import load_params
from llmlab.training.trainer import adamw

ROOT = Path(__file__).resolve().parents[1]
WHAT = ("answer_name", "name", "value", "value_repeated")


def run(
    steps: int,
    every: int,
    lr: float,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_docs: int = 20_000,
    n_probes: int = 100,
    seed: int = 0,
    canon_kernel: int | None = None,
    canon_places: str | None = None,
) -> dict:
    params = load_params(ROOT / "params.yaml")
    tok = load_tokenizer(ROOT / "data" / "tokenizer" / "tokenizer.json")
    world = World.load(ROOT / "data" / "corpus" / "world.json")
    cfg = GPTConfig.from_params(params.pretrain.model, tok.get_vocab_size())
    cfg = dataclasses.replace(
        cfg,
        n_layer=n_layer or cfg.n_layer,
        n_head=n_head or cfg.n_head,
        canon_kernel=cfg.canon_kernel if canon_kernel is None else canon_kernel,
        canon_places=canon_places or cfg.canon_places,
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    bos = tok.token_to_id("<|bos|>")
    docs = context_documents(n_docs, world, random.Random(seed))
    tokens = np.array([t for e in tok.encode_batch(docs) for t in (bos, *e.ids)], dtype=np.int64)
    probes = copy_probes(world, n_probes, params.seed)
    p = params.pretrain
    opt = adamw(model, lr, 0.0, (p.beta1, p.beta2), "cpu")
    rng, T, curve = np.random.default_rng(seed), cfg.context_length, []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        warm = min(1.0, step / p.warmup_steps)
        decay = p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * warm * decay
        starts = rng.integers(0, len(tokens) - T - 1, p.batch_size)
        w = torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts]))
        _, loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            model.eval()
            acc = copy_accuracy(model, tok, probes)
            model.train()
            curve.append(
                {"step": step, "loss": round(loss.item(), 3), **{w: acc[f"copy_accuracy_{w}"] for w in WHAT}}
            )
            print(json.dumps(curve[-1]), flush=True)
    return {
        "canon_kernel": cfg.canon_kernel,
        "canon_places": cfg.canon_places,
        "seed": seed,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "lr": lr,
        "batch_size": p.batch_size,
        "tokens": len(tokens),
        "probes": n_probes,
        "seconds": round(time.perf_counter() - start),
        "curve": curve,
    }


def markdown(result: dict) -> str:
    head = (
        f"Measured {datetime.date.today()}: {result['n_layer']} layers, {result['n_head']} heads, canon kernel "
        f"{result['canon_kernel']} at {result['canon_places']}, lr {result['lr']:g}, seed {result['seed']}, batch {result['batch_size']} × "
        f"context length, {result['probes']} probe documents, {result['seconds']} s"
    )
    rows = [
        f"| {c['step']} | {c['loss']} | " + " | ".join(f"{100 * c[w]:.0f} %" for w in WHAT) + " |"
        for c in result["curve"]
    ]
    return "\n".join(
        [
            head,
            "",
            "| step | train loss | copy: answer's name | copy: surname | copy: value | copy: value, statement repeated |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument(
        "--canon-kernel", type=int, help="pretrain.model.canon_kernel (default: params.yaml's; 0: none)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--canon-places", help="pretrain.model.canon_places (default: params.yaml's), e.g. AB")
    ap.add_argument("--write", action="store_true", help="put the table into docs/knowledge.md")
    args = ap.parse_args()
    table = markdown(
        run(
            args.steps,
            args.every,
            args.lr,
            args.n_layer,
            args.n_head,
            seed=args.seed,
            canon_kernel=args.canon_kernel,
            canon_places=args.canon_places,
        )
    )
    print(table)
    if args.write:
        doc = ROOT / "docs" / "knowledge.md"
        marked = re.compile(r"(<!-- results:copy_learning -->\n).*?(<!-- /results:copy_learning -->)", re.S)
        doc.write_text(marked.sub(lambda m: m.group(1) + table + "\n" + m.group(2), doc.read_text()))
