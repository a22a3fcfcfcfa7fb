"""Stage `ppo`: RLHF. The SFT model is optimised with PPO against the reward model, with a KL penalty to
the SFT model; then the SFT and the PPO model answer the same held-out prompts and the rater grades both.

Inputs: models/sft (stage `sft`), models/reward (stage `reward`), the tokenizer, world.json, and
data/preferences (stage `preferences`). Prompts come from the world's rl pool and are graded by the rater
(gold); without a synthetic world (real corpus and preference data) they are the preference pairs'
prompts, and only the reward model's score and the KL are reported.
Outputs: models/ppo/{model.safetensors,config.json}, metrics/ppo.json, plots/ppo/iterations.csv,
reports/ppo/ (the two models' replies side by side). Resumes from checkpoints/ppo/last.ckpt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World
from llmlab.evaluation.rater import Rater
from llmlab.io import csv_text, write_files, write_json, write_text
from llmlab.model.transformer import load_model, save_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training import checkpoints
from llmlab.training.ppo import (
    KLController,
    compare_with_sft,
    launch_fabric,
    prompts,
    replies_markdown,
    restored_state,
    setup_models,
    summary_lines,
    train,
    training_summary,
)
from llmlab.training.reward import load_reward_model

log = logging.getLogger("llmlab.ppo")


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT model folder: the policy's start and the reference")
    p.add_argument("--reward", required=True, help="reward model folder (from the reward stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument(
        "--pairs", required=True, help="preference pairs folder: the prompts when there is no synthetic world"
    )
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the PPO policy's weights and config")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for the per-iteration CSV")
    p.add_argument("--report", required=True, help="folder for the SFT and PPO replies")


def main(args, params: Params) -> None:
    cfg = params.ppo
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    sft = load_model(args.model, stage="sft")
    reward_model = load_reward_model(args.reward, stage="reward")
    rater = Rater(world) if world.people else None
    if not rater:
        log.info("no synthetic world: prompts from the preference pairs, and no gold rater")
    seed = params.seed if cfg.seed is None else cfg.seed  # PPO's own randomness
    pool = prompts(world, args.pairs, "rl", cfg, seed)

    fabric = launch_fabric(cfg)
    fabric.seed_everything(seed, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)

    m = setup_models(fabric, sft, reward_model, cfg)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.kl_target_mode == "ceiling")

    fp = checkpoints.fingerprint(
        {"seed": params.seed, "ppo": cfg.model_dump()},
        [
            Path(args.model) / "model.safetensors",
            Path(args.reward) / "model.safetensors",
            Path(args.reward) / "config.json",
            Path(args.pairs) / "train.parquet",
            args.tokenizer,
            args.world,
        ],
    )
    state = restored_state(fabric, m, kl, args.checkpoints, fp)
    with StageRun("ppo", {"seed": params.seed, "ppo": cfg.model_dump()}) as run:
        history = train(fabric, m, tok, pool, cfg, kl, state, seed, rater, args.checkpoints, run.log_metrics)
        if not fabric.is_global_zero:
            return

        trained = m.policy.module.eval()
        save_model(trained, args.out)
        eval_prompts = prompts(world, args.pairs, "eval", cfg, params.seed)
        metrics, rows = compare_with_sft(
            trained, m.ref, m.reward, tok, eval_prompts, rater, world, cfg, params.seed, fabric.device
        )
        metrics |= {
            "iterations": cfg.iterations,
            "episodes": cfg.iterations * cfg.rollout_batch_size,
            "kl_coef_final": kl.value,
        }
        metrics |= training_summary(history)
        write_json(args.metrics, metrics)
        write_text(Path(args.plots) / "iterations.csv", csv_text(history))
        write_files(args.report, {"replies.json": rows, "replies.md": replies_markdown(rows)})
        run.log_metrics(metrics)
        for path in (args.metrics, args.plots, args.report, Path(args.out) / "config.json"):
            run.log_artifact(path)
        for line in summary_lines(metrics):
            log.info(line)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("ppo", main, add_arguments)
