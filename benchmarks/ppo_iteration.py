"""Seconds per PPO iteration at the default model shape, on any accelerator, split into generation
(sampling the replies with the KV cache), scoring (log-probabilities under policy and reference, reward
and value passes, GAE) and optimisation (the PPO epochs); episodes (replies) per second.

Random weights and random prompts: this measures speed and that the GPU path runs with finite losses,
not learning. Random weights write long replies (most run to max_new_tokens), the slow case.
Usage: python benchmarks/ppo_iteration.py --accelerator cuda --precision bf16-mixed
       python benchmarks/ppo_iteration.py --advantage rloo --samples-per-prompt 4   # no value model
"""

from __future__ import annotations

import argparse
import json
import math
import time
from types import SimpleNamespace

import lightning as L
import torch

import llmlab.training.ppo
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import PPOConfig
from llmlab.training.ppo import ppo_update, rollout
from llmlab.training.reward import RewardModel
from llmlab.training.trainer import adamw


class _Timed:
    """Wraps llmlab.training.ppo's `generate` to add up the seconds spent in it (the sampling phase of a rollout)."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.seconds = fn, sync, 0.0

    def __call__(self, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--advantage", default="gae", choices=["gae", "rloo"])
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    args = ap.parse_args()
    print(
        json.dumps(
            run(args.accelerator, args.precision, args.iterations, args.advantage, args.samples_per_prompt)
        )
    )


def run(
    accelerator: str = "cpu",
    precision: str = "32-true",
    iterations: int = 5,
    advantage: str = "gae",
    samples_per_prompt: int = 1,
) -> dict:
    args = SimpleNamespace(accelerator=accelerator, precision=precision, iterations=iterations)
    cfg = PPOConfig(
        accelerator=args.accelerator,
        precision=args.precision,
        advantage=advantage,
        samples_per_prompt=samples_per_prompt,
    )
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
    prompts = [
        [1, 2, *torch.randint(5, 2048, (int(n),), generator=g).tolist(), 3]
        for n in torch.randint(8, 24, (cfg.rollout_batch_size // samples_per_prompt,), generator=g)
        for _ in range(samples_per_prompt)
    ]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    timed = _Timed(llmlab.training.ppo.generate, sync)
    llmlab.training.ppo.generate = timed
    times = []
    try:
        for it in range(args.iterations):
            sample_gen = torch.Generator(fabric.device).manual_seed(it)
            sync()
            timed.seconds = 0.0
            t0 = time.perf_counter()
            with fabric.autocast():
                batch = rollout(
                    policy, ref, reward, value, prompts, cfg, cfg.kl_coef, sample_gen, sampler=policy.module
                )
            sync()
            t1 = time.perf_counter()
            stats = ppo_update(
                fabric, policy, value, policy_opt, value_opt, batch, cfg, torch.Generator().manual_seed(it)
            )
            sync()
            times.append(
                (
                    timed.seconds,
                    t1 - t0 - timed.seconds,
                    time.perf_counter() - t1,
                    float(batch.seqs.lengths.float().mean()),
                )
            )
            assert all(math.isfinite(v) for v in stats.values()), stats
    finally:
        llmlab.training.ppo.generate = timed.fn
    warm = times[1:] or times

    def mean(i: int) -> float:
        return sum(t[i] for t in warm) / len(warm)

    total = mean(0) + mean(1) + mean(2)
    return {
        "accelerator": args.accelerator,
        "precision": args.precision,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "rollout_batch_size": len(prompts),
        "advantage": advantage,
        "samples_per_prompt": samples_per_prompt,
        "generation_s": mean(0),
        "scoring_s": mean(1),
        "update_s": mean(2),
        "total_s": total,
        "generation_share": mean(0) / total,
        "episodes_per_s": len(prompts) / total,
        "mean_reply_tokens": mean(3),
        "iterations_timed": len(warm),
    }


if __name__ == "__main__":
    main()
