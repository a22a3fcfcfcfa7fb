"""Stage `preferences`: the SFT model answers prompts it never saw, the simulated rater compares replies.

Inputs: models/sft (stage `sft`), the tokenizer, world.json (stage `corpus`).
Outputs: data/preferences/{train,validation}.parquet — prompt, context (the conversation before the
reply, JSON messages), chosen, rejected, the gold scores and whether the noisy label disagrees with them
(gold NaN for hf/local data) — and metrics/preferences.json.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from llmlab.data.preferences import external_pairs, rated_pairs, write_pairs
from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World
from llmlab.io import write_json
from llmlab.model.transformer import load_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun

log = logging.getLogger("llmlab.preferences")


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT model folder (from the sft stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument("--out", required=True, help="folder for the pair files")
    p.add_argument("--metrics", required=True, help="metrics JSON file")


def main(args, params: Params) -> None:
    cfg = params.preferences
    with StageRun("preferences", {"seed": params.seed, "preferences": cfg.model_dump()}) as run:
        if cfg.source == "synthetic":
            model, tok, world = (
                load_model(args.model, stage="sft"),
                load_tokenizer(args.tokenizer),
                World.load(args.world),
            )
            splits, metrics = rated_pairs(model, tok, world, cfg, params.seed)
            log.info(
                "%d pairs (%d ties dropped), label flip rate %.1f%%",
                metrics["pairs"],
                metrics["ties_dropped"],
                100 * metrics["label_flip_rate"],
            )
        else:
            rows, metrics = external_pairs(cfg, Path.cwd())
            random.Random(f"{params.seed}/preferences").shuffle(rows)
            n_val = max(1, round(len(rows) * cfg.val_fraction))
            splits = {"validation": rows[:n_val], "train": rows[n_val:]}
            metrics |= {
                "pairs": len(rows),
                "pairs_train": len(rows) - n_val,
                "pairs_validation": n_val,
                "gold_rater": 0,
            }
            log.info(
                "%d pairs from %s (%d rows dropped); no gold rater for real data",
                len(rows),
                cfg.source,
                metrics["dropped_invalid"],
            )
        write_pairs(args.out, splits)
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.metrics)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("preferences", main, add_arguments)
