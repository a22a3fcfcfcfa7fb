"""Stage `dpo`: Direct Preference Optimization of the SFT model on the preference pairs, the alternative
to reward model + PPO; then SFT and DPO answer PPO's held-out prompts and are compared exactly as PPO is.

Inputs: data/preferences (stage `preferences`), models/sft (stage `sft`), models/reward (only to score the
replies of the comparison), the tokenizer, world.json.
Outputs: models/dpo/{model.safetensors,config.json}, metrics/dpo.json, plots/dpo/*.csv, reports/dpo/ (the
two models' replies side by side). Resumes from checkpoints/dpo/last.ckpt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llmlab.data.preferences import read_pairs
from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World
from llmlab.evaluation.rater import Rater
from llmlab.io import write_files, write_json
from llmlab.model.transformer import load_model, save_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training.dpo import DPOModule, DPOPairs, collate_dpo
from llmlab.training.ppo import compare_with_sft, prompts, replies_markdown, summary_lines
from llmlab.training.reward import load_reward_model
from llmlab.training.trainer import (
    CurveRecorder,
    Epochs,
    build_trainer,
    items_per_step,
    loader,
    quiet_lightning_warnings,
    resume_and_seed,
    resume_offset,
    world_size,
)

log = logging.getLogger("llmlab.dpo")


def add_arguments(p):
    p.add_argument("--pairs", required=True, help="folder of preference pairs (from the preferences stage)")
    p.add_argument("--model", required=True, help="SFT model folder: the policy's start and the reference")
    p.add_argument("--reward", required=True, help="reward model folder: scores the compared replies")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the DPO model")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for curve CSVs")
    p.add_argument("--report", required=True, help="folder for the SFT and DPO replies")


def main(args, params: Params) -> None:
    cfg = params.dpo
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    sft = load_model(args.model, stage="sft")
    T = sft.config.context_length
    train_rows = read_pairs(Path(args.pairs), "train")
    val_rows = read_pairs(Path(args.pairs), "validation") or train_rows[: max(1, len(train_rows) // 10)]
    val_rows = val_rows[
        : cfg.val_batches * cfg.batch_size * world_size(cfg)
    ]  # the same pairs every validation
    train_base, val_set = DPOPairs(tok, train_rows, T), DPOPairs(tok, val_rows, T)
    per_step = items_per_step(cfg)
    order = Epochs(train_base, cfg.max_steps * per_step, params.seed, 0, train_base.lengths(), per_step)
    # π_ref never changes: its log-probabilities once, before training, for the pairs training will use.
    train_base.reference_logps(sft, {order.base_index(i) for i in range(len(order))})
    val_set.reference_logps(sft)

    resume = resume_and_seed(
        args.checkpoints,
        {"seed": params.seed, "dpo": cfg.model_dump()},
        [Path(args.pairs) / "train.parquet", Path(args.model) / "model.safetensors", args.tokenizer],
        params.seed,
    )
    module = DPOModule(sft.config, cfg, cfg.max_steps)
    module.model.load_state_dict(sft.state_dict())
    curves = CurveRecorder(cfg.log_every)

    with StageRun("dpo", {"seed": params.seed, "dpo": cfg.model_dump()}) as run:
        trainer = build_trainer(cfg, args.checkpoints, run.lightning_logger(), [curves], cfg.max_steps)
        first = resume_offset(resume, per_step)  # continue the data where the checkpoint stopped
        train_set = Epochs(train_base, len(order), params.seed, first, train_base.lengths(), per_step)
        train_dl = loader(train_set, cfg.batch_size, trainer, collate_dpo)
        val_dl = loader(val_set, cfg.batch_size, trainer, collate_dpo)
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        if not trainer.is_global_zero:
            return
        validated = trainer.validate(module, val_dl, verbose=False)[0]

        trained = module.model.eval()
        save_model(trained, args.out)
        device = next(trained.parameters()).device
        rater = Rater(world) if world.people else None
        eval_prompts = prompts(world, args.pairs, "eval", params.ppo, params.seed)
        reward = load_reward_model(args.reward, stage="reward").to(device).eval()
        ref = sft.to(device).eval()
        metrics, rows = compare_with_sft(
            trained, ref, reward, tok, eval_prompts, rater, world, params.ppo, params.seed, device, "dpo"
        )
        metrics |= {k.replace("val/", "val_"): float(v) for k, v in validated.items()}
        metrics |= {
            "steps": int(trainer.global_step),
            "pairs_train": len(train_rows),
            "pairs_validation": len(val_rows),
        }
        write_json(args.metrics, metrics)
        curves.write(args.plots)
        write_files(args.report, {"replies.json": rows, "replies.md": replies_markdown(rows, "dpo")})
        run.log_metrics(metrics, step=int(trainer.global_step))
        for path in (args.metrics, args.plots, args.report, Path(args.out) / "config.json"):
            run.log_artifact(path)
        for line in summary_lines(metrics, "dpo"):
            log.info(line)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning_warnings()
    run_stage("dpo", main, add_arguments)
