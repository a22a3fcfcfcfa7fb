"""Stage `preferences`: the SFT model answers prompts it never saw, the simulated rater compares replies.

Inputs: models/sft (stage `sft`), the tokenizer, world.json (stage `corpus`); with
`preferences.labeller: constitution`, models/critic (stage `critique`) and data/constitution.txt.
Outputs: data/preferences/{train,validation}.parquet — prompt, context (the conversation before the
reply, JSON messages), chosen, rejected, the gold scores and whether the label (the rater's noisy one or
the feedback model's) disagrees with them (gold NaN for hf/local data) — and metrics/preferences.json.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from llmlab.data.preferences import external_pairs, rated_pairs, write_pairs
from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World
from llmlab.io import read_json, write_json
from llmlab.model.transformer import load_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training.constitution import judge as constitution_judge
from llmlab.training.constitution import load_constitution

log = logging.getLogger("llmlab.preferences")


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT model folder (from the sft stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument("--critic", required=True, help="feedback model folder (from the critique stage)")
    p.add_argument("--constitution", required=True, help="the principles, one per line")
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
            judge = None
            if cfg.labeller == "constitution":
                critic = load_model(args.critic, stage="critique")
                taught = read_json(Path(args.critic) / "taught.json", "critique")
                judge = constitution_judge(
                    critic,
                    tok,
                    load_constitution(args.constitution),
                    params.critique.principles_per_pair,
                    params.seed,
                    answerer=model if params.critique.own_answer else None,
                    max_new_tokens=params.critique.max_new_tokens,
                )
            splits, metrics = rated_pairs(model, tok, world, cfg, params.seed, judge)
            if judge is not None:
                metrics["rater_judgments"] = taught["rater_judgments"]
            log.info(
                "%d pairs labelled by the %s (%d ties dropped): %.1f%% agree with the gold order; "
                "%d rater judgments",
                metrics["pairs"],
                cfg.labeller,
                metrics["ties_dropped"],
                100 * metrics["label_gold_agreement"],
                metrics["rater_judgments"],
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
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        run.log_artifact(args.metrics)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("preferences", main, add_arguments)
