"""Stage `pretrain`: train the transformer to predict the next token of the corpus.

Inputs: the token files and tokenizer (stage `tokenizer`), the world's ground truth (stage `corpus`).
Outputs: models/pretrain/{model.safetensors,config.json}, metrics/pretrain.json, plots/pretrain/*.csv,
reports/pretrain/ (samples, fact-recall examples). Resumes from checkpoints/pretrain/last.ckpt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llmlab.data.tokenizer import load_tokenizer, open_split, read_token_meta
from llmlab.data.world import World
from llmlab.io import write_files, write_json
from llmlab.model.transformer import GPTConfig, save_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training.pretraining import PROBES, final_measurements, probes, run_metrics, summary_line, windows
from llmlab.training.trainer import (
    Budget,
    CausalLMModule,
    CurveRecorder,
    Throughput,
    build_trainer,
    loader,
    quiet_lightning_warnings,
    resume_and_seed,
    resume_offset,
    world_size,
)

log = logging.getLogger("llmlab.pretrain")


def add_arguments(p):
    p.add_argument("--tokens", required=True, help="folder of token files (from the tokenizer stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the final weights and config")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for curve CSVs")
    p.add_argument("--report", required=True, help="folder for samples and recall examples")


def main(args, params: Params) -> None:
    cfg = params.pretrain
    meta = read_token_meta(args.tokens)
    train_tokens, val_tokens = (
        open_split(args.tokens, "train", meta),
        open_split(args.tokens, "validation", meta),
    )
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    model_config = GPTConfig.from_params(cfg.model, meta["vocab_size"])

    budget = Budget.from_params(cfg, world_size(cfg))
    # Once before anything starts: a split too small for one window fails here, not after the set-up.
    windows(train_tokens, val_tokens, meta["bos_id"], cfg, budget, params.seed)

    resume = resume_and_seed(
        args.checkpoints,
        {"seed": params.seed, "pretrain": cfg.model_dump()},
        [
            Path(args.tokens) / "meta.json",
            *(Path(args.tokens) / n for n in meta["shards"]["train"]),
            args.tokenizer,
        ],
        params.seed,
    )

    module = CausalLMModule(model_config, cfg, budget.total_steps)
    throughput = Throughput.for_run(cfg, budget.tokens_per_step, module.model.flops_per_token())
    curves = CurveRecorder(cfg.log_every)
    probe_list, copy_items = probes(world, tok, cfg, params.seed)
    callbacks = [throughput, curves, *probe_list]

    with StageRun("pretrain", {"seed": params.seed, "pretrain": cfg.model_dump()}) as run:
        trainer = build_trainer(cfg, args.checkpoints, run.lightning_logger(), callbacks, budget.total_steps)
        first = resume_offset(resume, budget.items_per_step)  # where the checkpoint stopped (TokenWindows)
        train_set, val_set = windows(
            train_tokens, val_tokens, meta["bos_id"], cfg, budget, params.seed, first
        )
        train_dl, val_dl = (
            loader(train_set, cfg.batch_size, trainer),
            loader(val_set, cfg.batch_size, trainer),
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        val_loss = float(trainer.validate(module, val_dl, verbose=False)[0]["val/loss"])
        if not trainer.is_global_zero:
            return

        model = module.model.eval()
        save_model(model, args.out)
        train_loss = curves.train[-1][1] if curves.train else float("nan")
        metrics = run_metrics(model, train_loss, val_loss, int(trainer.global_step), budget)
        # Speed is a fact about this machine and this minute, not about the model: it goes to the report
        # folder and MLflow, so that metrics/*.json of two runs are byte-identical (`dvc metrics diff` empty).
        speed = throughput.speed()
        found, files = final_measurements(model, tok, world, cfg, params.seed, copy_items)
        metrics |= found
        write_json(args.metrics, metrics)
        curves.write(args.plots, probe_list, declared=PROBES)
        write_files(args.report, files | {"throughput.json": speed})
        run.log_metrics(
            {k: v for k, v in (metrics | speed).items() if isinstance(v, int | float)},
            step=int(trainer.global_step),
        )
        for path in (args.metrics, Path(args.out) / "config.json", args.report, args.plots):
            run.log_artifact(path)
        log.info(summary_line(metrics, speed))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning_warnings()
    run_stage("pretrain", main, add_arguments)
