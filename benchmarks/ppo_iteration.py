"""Seconds per PPO iteration (rollout, then update) at the default model shape, on any accelerator.

Random weights and random prompts: this measures speed and that the GPU path runs with finite losses,
not learning. Usage: python benchmarks/ppo_iteration.py --accelerator cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import math
import time

import lightning as L
import torch

from llmlab.model import GPT, GPTConfig
from llmlab.params import PPOConfig
from llmlab.ppo import ppo_update, rollout
from llmlab.pretraining import adamw
from llmlab.reward import RewardModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--iterations", type=int, default=5)
    args = ap.parse_args()
    cfg = PPOConfig(accelerator=args.accelerator, precision=args.precision)
    fabric = L.Fabric(accelerator=args.accelerator, devices=1, precision=args.precision)
    fabric.seed_everything(0, verbose=False)
    shape = GPTConfig(vocab_size=2048, d_model=128, n_layer=4, n_head=4, context_length=128)
    ref = fabric.to_device(GPT(shape)).eval().requires_grad_(False)
    reward = fabric.to_device(RewardModel(shape)).eval().requires_grad_(False)
    policy, value = GPT(shape), RewardModel(shape)
    policy.load_state_dict(ref.state_dict())
    dev = fabric.device.type
    policy, policy_opt = fabric.setup(policy, adamw(policy, cfg.lr, 0.0, (0.9, 0.95), dev))
    value, value_opt = fabric.setup(value, adamw(value, cfg.lr, 0.0, (0.9, 0.95), dev))
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 2, *torch.randint(5, 2048, (int(n),), generator=g).tolist(), 3] for n in torch.randint(8, 24, (64,), generator=g)]
    times = []
    for it in range(args.iterations):
        sample_gen = torch.Generator(fabric.device).manual_seed(it)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with fabric.autocast():
            batch = rollout(policy, ref, reward, value, prompts, cfg, cfg.kl_coef, sample_gen, sampler=policy.module)
        if dev == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        stats = ppo_update(fabric, policy, value, policy_opt, value_opt, batch, cfg, torch.Generator().manual_seed(it))
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append((t1 - t0, time.perf_counter() - t1, float(batch.seqs.lengths.float().mean())))
        assert all(math.isfinite(v) for v in stats.values()), stats
    warm = times[1:] or times
    print(json.dumps({
        "accelerator": args.accelerator, "precision": args.precision,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "rollout_s": sum(t[0] for t in warm) / len(warm), "update_s": sum(t[1] for t in warm) / len(warm),
        "mean_reply_tokens": sum(t[2] for t in warm) / len(warm), "iterations_timed": len(warm),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
