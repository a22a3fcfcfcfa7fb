"""Stage `sft`: supervised fine-tuning of the pretrained model on chat demonstrations.

Inputs: models/pretrain (stage `pretrain`), the tokenizer, world.json (stage `corpus`).
Outputs: models/sft/{model.safetensors,config.json}, metrics/sft.json, plots/sft/*.csv, reports/sft/
(replies to evaluation prompts with the rater's scores). Resumes from checkpoints/sft/last.ckpt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World
from llmlab.io import write_files, write_json
from llmlab.model.transformer import load_model, save_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training.sft import collate, collate_packed, replies_for_report, sft_datasets, summary_line
from llmlab.training.trainer import (
    CausalLMModule,
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

log = logging.getLogger("llmlab.sft")


def add_arguments(p):
    p.add_argument("--model", required=True, help="pretrained model folder (from the pretrain stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument(
        "--corpus", required=True, help="corpus folder (from the corpus stage): documents to replay"
    )
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned weights and config")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for curve CSVs")
    p.add_argument("--report", required=True, help="folder for evaluation replies")


def main(args, params: Params) -> None:
    cfg = params.sft
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    base = load_model(args.model, stage="pretrain")
    T = base.config.context_length

    data = sft_datasets(tok, world, cfg.data, Path(args.corpus), params.seed, T)
    per_step = items_per_step(cfg)
    resume = resume_and_seed(
        args.checkpoints,
        {"seed": params.seed, "sft": cfg.model_dump(), "data": data.digest()},
        [
            Path(args.model) / "model.safetensors",
            args.tokenizer,
            args.world,
            Path(args.corpus) / "train.parquet",
        ],
        params.seed,
    )
    module = CausalLMModule(base.config, cfg, cfg.max_steps)
    module.model.load_state_dict(base.state_dict())
    curves = CurveRecorder(cfg.log_every)

    with StageRun("sft", {"seed": params.seed, "sft": cfg.model_dump()}) as run:
        trainer = build_trainer(cfg, args.checkpoints, run.lightning_logger(), [curves], cfg.max_steps)
        first = resume_offset(resume, per_step)  # continue the data where the checkpoint stopped
        train_set = Epochs(data.train, cfg.max_steps * per_step, params.seed, first=first)
        batches = collate_packed if cfg.pack else collate
        train_dl, val_dl = (
            loader(train_set, cfg.batch_size, trainer, batches),
            loader(validation_batches(data.val, cfg, trainer), cfg.batch_size, trainer, batches),
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        every = loader(data.val, cfg.batch_size, trainer, batches)  # the reported loss: every held-out one
        val_loss = float(trainer.validate(module, every, verbose=False)[0]["val/loss"])
        if not trainer.is_global_zero:
            return

        model = module.model.eval()
        save_model(model, args.out)
        graded, rows, lines = replies_for_report(
            model, tok, world, cfg, params.seed, data.conversations[: data.n_val]
        )
        if not world.people:
            log.info(
                "no synthetic world: replies are not graded (no rater); see %s",
                Path(args.report) / "replies.md",
            )
        metrics = {"val_loss": val_loss, "steps": int(trainer.global_step), **data.counts(), **graded}
        write_json(args.metrics, metrics)
        curves.write(args.plots)
        write_files(args.report, {"replies.json": rows, "replies.md": "\n".join(lines) + "\n"})
        run.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=int(trainer.global_step)
        )
        for path in (args.metrics, Path(args.out) / "config.json", args.report, args.plots):
            run.log_artifact(path)
        log.info(summary_line(metrics, val_loss, data.n_val))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning_warnings()
    run_stage("sft", main, add_arguments)
