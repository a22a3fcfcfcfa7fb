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

from llmlab import checkpoints
from llmlab.errors import LlmlabError
from llmlab.io import csv_text, write_json, write_text
from llmlab.model import load_model, save_model
from llmlab.params import Params
from llmlab.ppo import (
    KLController,
    NonFiniteLoss,
    check_replicas_agree,
    compare_with_sft,
    iteration,
    iteration_line,
    launch_fabric,
    replies_markdown,
    setup_models,
    summary_lines,
    training_summary,
)
from llmlab.preferences import pair_contexts
from llmlab.rater import Rater
from llmlab.reward import load_reward_model
from llmlab.sft_data import prompt_pool
from llmlab.stage import run_stage
from llmlab.tokenizer import load_tokenizer
from llmlab.tracking import StageRun, is_global_zero
from llmlab.training import Epochs
from llmlab.world import World

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
    if rater:
        pool: list = prompt_pool(
            world, "rl", cfg.n_prompts, params.seed, cfg.max_digits, dict(cfg.prompt_mix)
        )
    else:
        log.info("no synthetic world: prompts from the preference pairs, and no gold rater")
        pool = pair_contexts(Path(args.pairs), "train")[: cfg.n_prompts]

    fabric = launch_fabric(cfg)
    W, rank = fabric.world_size, fabric.global_rank
    fabric.seed_everything(params.seed, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)

    m = setup_models(fabric, sft, reward_model, cfg)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

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
    resume = checkpoints.resume_path(args.checkpoints, fp, readonly=not is_global_zero())
    state = {
        "policy": m.policy,
        "value": m.value,
        "policy_opt": m.policy_opt,
        "value_opt": m.value_opt,
        "iteration": 0,
        "kl_coef": kl.value,
        "history": [],
    }
    if resume is not None:
        fabric.load(resume, state, weights_only=True)
        kl.value = state["kl_coef"]
    history: list[dict[str, float]] = state["history"]
    B = cfg.rollout_batch_size
    stream = Epochs(pool, cfg.iterations * B, params.seed)  # prompt j of iteration i is stream[i·B + j]

    with StageRun("ppo", {"seed": params.seed, "ppo": cfg.model_dump()}) as run:
        for it in range(state["iteration"], cfg.iterations):
            tasks = [stream[it * B + j] for j in range(rank, B, W)]
            try:  # the same draws after a resume
                metrics = iteration(
                    fabric, m, tok, tasks, cfg, kl.value, params.seed * 1_000_003 + it * 1009 + rank, rater
                )
            except NonFiniteLoss as e:
                kept = checkpoints.kept_checkpoint(args.checkpoints, it + 1, cfg.ckpt_every, "iteration")
                raise LlmlabError(
                    f"the PPO loss became non-finite at iteration {it + 1} ({e}); nothing of it was saved, "
                    f"and {kept}. Lower ppo.lr or raise ppo.kl_coef"
                ) from None
            metrics["episode"] = float((it + 1) * B)
            kl.update(metrics["objective/kl"], B)
            history.append({"iteration": it + 1, **metrics})
            run.log_metrics(metrics, step=it + 1)
            log.info(iteration_line(metrics, it + 1, cfg.iterations, B))
            if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iterations:
                state.update(iteration=it + 1, kl_coef=kl.value)
                fabric.save(Path(args.checkpoints) / checkpoints.LAST, state)
        check_replicas_agree(fabric, {"policy": m.policy, "value": m.value})
        if W > 1:
            log.info("the %d processes' policy and value weights agree", W)
        if not fabric.is_global_zero:
            return

        trained = m.policy.module.eval()
        save_model(trained, args.out)
        if rater:
            eval_prompts: list = prompt_pool(world, "eval", cfg.eval_prompts, params.seed, cfg.max_digits)
        else:
            eval_prompts = pair_contexts(Path(args.pairs), "validation")[: cfg.eval_prompts]
        metrics, rows = compare_with_sft(
            trained, m.ref, m.reward, tok, eval_prompts, rater, world, cfg, params.seed, fabric.device
        )
        metrics |= {"iterations": cfg.iterations, "episodes": cfg.iterations * B, "kl_coef_final": kl.value}
        metrics |= training_summary(history)
        write_json(args.metrics, metrics)
        write_text(Path(args.plots) / "iterations.csv", csv_text(history))
        report = Path(args.report)
        write_json(report / "replies.json", rows)
        write_text(report / "replies.md", replies_markdown(rows))
        run.log_metrics(metrics)
        for path in (args.metrics, args.plots, report, Path(args.out) / "config.json"):
            run.log_artifact(path)
        for line in summary_lines(metrics):
            log.info(line)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("ppo", main, add_arguments)
