"""Stage `reward`: a Bradley–Terry reward model on the preference pairs, initialised from SFT.

Inputs: data/preferences (stage `preferences`), models/sft (stage `sft`), the tokenizer.
Outputs: models/reward/{model.safetensors,config.json} (with the reward offset and scale),
metrics/reward.json (accuracy against the gold ordering only for rated synthetic pairs: real data has no
gold), plots/reward/calibration.csv. Resumes from checkpoints/reward/last.ckpt.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from llmlab.data.preferences import read_pairs
from llmlab.data.tokenizer import load_tokenizer
from llmlab.device import pick_device
from llmlab.io import write_json, write_text
from llmlab.model.transformer import load_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training.reward import (
    PairDataset,
    RewardModule,
    calibration_csv,
    centre_on_sft,
    collate_pairs,
    reward_metrics,
    save_reward_model,
    summary_line,
)
from llmlab.training.trainer import (
    CurveRecorder,
    Epochs,
    build_trainer,
    items_per_step,
    loader,
    quiet_lightning_warnings,
    resume_and_seed,
    resume_offset,
    validation_batches,
)

log = logging.getLogger("llmlab.reward")


def add_arguments(p):
    p.add_argument("--pairs", required=True, help="folder of preference pairs (from the preferences stage)")
    p.add_argument("--model", required=True, help="SFT model folder (the reward model's starting point)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the reward model")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for curve and calibration CSVs")


def main(args, params: Params) -> None:
    cfg = params.reward
    tok = load_tokenizer(args.tokenizer)
    sft = load_model(args.model, stage="sft")
    T = sft.config.context_length
    train_rows = read_pairs(Path(args.pairs), "train")
    val_rows = read_pairs(Path(args.pairs), "validation")
    if not val_rows:  # only in tiny configurations
        log.warning(
            "no held-out pairs: validating on a tenth of the training pairs (raise preferences.n_prompts)"
        )
        val_rows = train_rows[: max(1, len(train_rows) // 10)]
    train_base = PairDataset(tok, train_rows, T, cfg.soft_labels)
    val_set = PairDataset(tok, val_rows, T, cfg.soft_labels)
    per_step = items_per_step(cfg)

    resume = resume_and_seed(
        args.checkpoints,
        {"seed": params.seed, "reward": cfg.model_dump()},
        [Path(args.pairs) / "train.parquet", Path(args.model) / "model.safetensors", args.tokenizer],
        params.seed,
    )
    module = RewardModule(sft.config, cfg, cfg.max_steps)
    module.model.backbone.load_state_dict(sft.state_dict())
    known = None  # each distinct reply's likelihood under the frozen reference, computed once
    if cfg.likelihood:
        module.model.reference.load_state_dict(sft.state_dict())
        reference = module.model.reference.to(pick_device(cfg.accelerator))
        known = val_set.read_likelihood(reference, train_base.read_likelihood(reference))
        reference.cpu()
    curves = CurveRecorder(cfg.log_every)

    with StageRun("reward", {"seed": params.seed, "reward": cfg.model_dump()}) as run:
        trainer = build_trainer(cfg, args.checkpoints, run.lightning_logger(), [curves], cfg.max_steps)
        first = resume_offset(resume, per_step)  # continue the data where the checkpoint stopped
        lengths = [max(len(c), len(r)) for c, r in train_base.items] if cfg.group_by_length else None
        train_set = Epochs(train_base, cfg.max_steps * per_step, params.seed, first, lengths, per_step)
        train_dl = loader(train_set, cfg.batch_size, trainer, collate_pairs)
        # the curves read val_batches batches; the metrics at the end, every held-out pair
        val_dl = loader(validation_batches(val_set, cfg, trainer), cfg.batch_size, trainer, collate_pairs)
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        if not trainer.is_global_zero:
            return

        model = module.model.eval()
        rated = all(math.isfinite(row["gold_chosen"]) for row in train_rows + val_rows)
        max_new = params.preferences.max_new_tokens
        scale = centre_on_sft(model, sft, tok, train_base, train_rows, rated, max_new, params.seed, known)
        save_reward_model(model, args.out, scale)

        metrics, table = reward_metrics(model, val_set, val_rows, rated, params.seed, known)
        metrics |= {
            "pairs_train": len(train_rows),
            "pairs_validation": len(val_rows),
            "reward_offset": model.offset,
            "reward_scale": scale,
            "steps": int(trainer.global_step),
            "gold_rater": int(rated),
        }
        if not rated:
            log.info("real preference data: no gold rater, so accuracy is against the dataset's labels only")
        write_json(args.metrics, metrics)
        curves.write(args.plots)
        write_text(Path(args.plots) / "calibration.csv", calibration_csv(table))
        run.log_metrics(metrics)
        for path in (args.metrics, args.plots, Path(args.out) / "config.json"):
            run.log_artifact(path)
        log.info(summary_line(metrics))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning_warnings()
    run_stage("reward", main, add_arguments)
