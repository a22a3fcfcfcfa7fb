"""Stage `pretrain`: train the transformer to predict the next token of the corpus.

Inputs: the token files and tokenizer (stage `tokenizer`), the world's ground truth (stage `corpus`).
Outputs: models/pretrain/{model.safetensors,config.json}, metrics/pretrain.json, plots/pretrain/*.csv,
reports/pretrain/ (samples, fact-recall examples). Resumes from checkpoints/pretrain/last.ckpt.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from llmlab.errors import LlmlabError
from llmlab.io import write_json, write_text
from llmlab.mfu import matmul_peak_flops
from llmlab.model import GPTConfig, save_model
from llmlab.params import Params
from llmlab.pretraining import (
    FixedWindows,
    TokenWindows,
    document_starts,
    final_measurements,
    probes,
    summary_line,
)
from llmlab.stage import run_stage
from llmlab.tokenizer import load_tokenizer, open_split, read_token_meta
from llmlab.tracking import StageRun
from llmlab.training import (
    Budget,
    CausalLMModule,
    CurveRecorder,
    Throughput,
    build_trainer,
    loader,
    quiet_lightning_warnings,
    resume_and_seed,
    resume_offset,
    uses_cuda,
    world_size,
)
from llmlab.world import World

log = logging.getLogger("llmlab.pretrain")

SAMPLE_PROMPTS = ["Add 47 and 38.", "One morning,"]


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
    try:
        # val_batches per process: the validation set is the same for the same global batch.
        val_set = FixedWindows(
            val_tokens, cfg.model.context_length, cfg.val_batches * cfg.batch_size * budget.world_size
        )
        starts = document_starts(train_tokens, meta["bos_id"], cfg.window_start)
        TokenWindows(
            train_tokens, cfg.model.context_length, budget.n_items, params.seed, starts=starts
        )  # validates the size
    except ValueError as e:
        raise LlmlabError(f"pretrain: {e}") from None

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
    device_type = "cuda" if uses_cuda(cfg.accelerator) else "cpu"
    peak_dtype = torch.bfloat16 if "bf16" in cfg.precision else torch.float32
    peak = matmul_peak_flops(device_type, peak_dtype)
    throughput = Throughput(budget.tokens_per_step, module.model.flops_per_token(), peak, cfg.log_every)
    curves = CurveRecorder(cfg.log_every)
    probe_list, copy_items = probes(world, tok, cfg, params.seed)
    callbacks = [throughput, curves, *probe_list]

    with StageRun("pretrain", {"seed": params.seed, "pretrain": cfg.model_dump()}) as run:
        trainer = build_trainer(cfg, args.checkpoints, run.lightning_logger(), callbacks, budget.total_steps)
        first_item = resume_offset(
            resume, budget.items_per_step
        )  # where the checkpoint stopped (see TokenWindows)
        train_set = TokenWindows(
            train_tokens,
            cfg.model.context_length,
            budget.n_items,
            params.seed,
            first=first_item,
            starts=starts,
        )
        train_dl, val_dl = (
            loader(train_set, cfg.batch_size, trainer),
            loader(val_set, cfg.batch_size, trainer),
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        val_loss = float(trainer.validate(module, val_dl, verbose=False)[0]["val/loss"])
        if not trainer.is_global_zero:
            return

        # A neighbour busy at start-up would deflate the peak (and inflate MFU): take the better of two.
        throughput.peak = max(peak, matmul_peak_flops(device_type, peak_dtype))
        model = module.model.eval()
        save_model(model, args.out)
        metrics = {
            "train_loss": curves.train[-1][1] if curves.train else float("nan"),
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss),
            "steps": int(trainer.global_step),
            "tokens": int(trainer.global_step) * budget.tokens_per_step,
            "params": model.num_params(non_embedding=False),
        }
        # Speed is a fact about this machine and this minute, not about the model: it goes to the report
        # folder and MLflow, so that metrics/*.json of two runs are byte-identical (`dvc metrics diff` empty).
        speed = {
            "tokens_per_s": throughput.tokens_per_second(),
            "mfu": throughput.mfu(),
            "matmul_peak_gflops": throughput.peak / 1e9,
            "train_seconds": throughput.train_time,
        }
        found, files = final_measurements(model, tok, world, cfg, params.seed, copy_items)
        metrics |= found
        write_json(args.metrics, metrics)
        curves.write(args.plots, probe_list)
        report = Path(args.report)
        write_json(report / "throughput.json", speed)
        for name, content in files.items():
            (write_text if name.endswith(".md") else write_json)(report / name, content)
        run.log_metrics(
            {k: v for k, v in (metrics | speed).items() if isinstance(v, int | float)},
            step=int(trainer.global_step),
        )
        for path in (args.metrics, Path(args.out) / "config.json", report, args.plots):
            run.log_artifact(path)
        log.info(summary_line(metrics, speed))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning_warnings()
    run_stage("pretrain", main, add_arguments)
