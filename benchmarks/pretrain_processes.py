"""Two cores, two ways to use them for pretraining: one process on both threads (what the stage does), or
two processes of one thread each, joined by DDP over gloo (`pretrain.devices: 2, strategy: ddp`).

Three loops train the default model (`params.yaml` → pretrain.model) with the stage's optimiser on the
same windows, 8 sequences per optimizer step in all (the default batch), and are timed after a warm-up:
- one process, both threads, batch 8 (the stage's set-up, `pretrain_options.train`);
- two processes of one thread, batch 4 each, not joined: what two cores give when nothing is shared
  (each trains its own copy; the sum of their tokens/s is the ceiling for DDP);
- two processes of one thread, batch 4 each, DDP: gradients averaged by an all-reduce every step.

    python benchmarks/pretrain_processes.py [--steps 220] [--warmup 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, too

from benchmarks.pretrain_options import _tokens, train  # noqa: E402
from llmlab.model.transformer import GPT, GPTConfig  # noqa: E402
from llmlab.params import load_params  # noqa: E402
from llmlab.training.pretraining import TokenWindows  # noqa: E402
from llmlab.training.trainer import adamw  # noqa: E402


def _setup():
    params = load_params(ROOT / "params.yaml")
    cfg, vocab = params.pretrain, params.tokenizer.vocab_size
    return cfg, GPTConfig.from_params(cfg.model, vocab), _tokens(vocab)


def _worker(rank: int, world: int, joined: bool, steps: int, warmup: int, port: int, out) -> None:
    torch.set_num_threads(1)
    cfg, config, tokens = _setup()
    torch.manual_seed(0)
    model = GPT(config)
    if joined:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), "cpu")
    batch = cfg.batch_size // world
    windows = TokenWindows(tokens, config.context_length, steps * cfg.batch_size, 0)
    # every world-th window, as the stage's DistributedSampler(shuffle=False) deals them
    mine = torch.utils.data.Subset(windows, range(rank, len(windows), world))
    data = torch.utils.data.DataLoader(mine, batch_size=batch)
    t0 = 0.0
    for i, (x, y) in enumerate(data):
        if i == warmup:
            t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out[rank] = (steps - warmup) * batch * config.context_length / (time.perf_counter() - t0)
    if joined:
        dist.destroy_process_group()


def two_processes(joined: bool, steps: int, warmup: int, port: int) -> float:
    """Tokens/s of both processes together."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, joined, steps, warmup, port, out), nprocs=2)
        return sum(out.values())


def run(steps: int = 220, warmup: int = 20, rounds: int = 2) -> dict:
    cfg, config, tokens = _setup()
    torch.set_num_threads(2)
    one, apart, ddp = [], [], []
    for r in range(rounds):  # interleaved, so that a noisy neighbour hurts each alike
        one.append(train("stage set-up", config, cfg, tokens, steps, warmup)["tokens_per_s"])
        apart.append(two_processes(False, steps, warmup, 29500 + 2 * r))
        ddp.append(two_processes(True, steps, warmup, 29501 + 2 * r))
    return {
        "model": f"{config.n_layer} layers × {config.d_model} wide, context {config.context_length}",
        "parameters": sum(p.numel() for p in GPT(config).parameters()),
        "one_process_two_threads": one,
        "two_processes_apart": apart,
        "two_processes_ddp": ddp,
        "ddp_over_one_process": max(ddp) / max(one),
        "apart_over_one_process": max(apart) / max(one),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=220)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run(a.steps, a.warmup, a.rounds), indent=2))
