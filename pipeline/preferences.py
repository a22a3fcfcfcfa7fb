"""Stage `preferences`: the SFT model answers prompts it never saw, the simulated rater compares replies.

Inputs: models/sft (stage `sft`), the tokenizer, world.json (stage `corpus`).
Outputs: data/preferences/{train,validation}.parquet — prompt, context (the conversation before the
reply, JSON messages), chosen, rejected, the gold scores and whether the noisy label disagrees with them
(gold NaN for hf/local data) — and metrics/preferences.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llmlab.errors import LlmlabError
from llmlab.io import atomic_path, write_json
from llmlab.model import load_model
from llmlab.params import Params
from llmlab.preferences import external_pairs, make_pairs
from llmlab.rater import Rater
from llmlab.sft import answer
from llmlab.sft_data import prompt_pool
from llmlab.stage import run_stage
from llmlab.tokenizer import load_tokenizer
from llmlab.tracking import StageRun
from llmlab.world import World

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
            splits, metrics = rated_pairs(args, params)
        else:
            rows, metrics = external_pairs(cfg, Path.cwd())
            random.Random(f"{params.seed}/preferences").shuffle(rows)
            n_val = max(1, round(len(rows) * cfg.val_fraction))
            splits = {"validation": rows[:n_val], "train": rows[n_val:]}
            metrics |= {"pairs": len(rows), "pairs_train": len(rows) - n_val, "pairs_validation": n_val, "gold_rater": 0}
            log.info("%d pairs from %s (%d rows dropped); no gold rater for real data", len(rows), cfg.source, metrics["dropped_invalid"])
        with atomic_path(args.out, is_dir=True) as tmp:
            for split, rows in splits.items():
                pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), tmp / f"{split}.parquet")
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.metrics)


def rated_pairs(args, params: Params) -> tuple[dict[str, list[dict]], dict]:
    """The SFT model answers rl-pool prompts several times; the rater's scores make noisy-labelled pairs."""
    cfg = params.preferences
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    if not world.people:
        raise LlmlabError(
            "preferences.source synthetic needs the synthetic world (corpus.source: synthetic); "
            "with another corpus, use preferences.source hf or local"
        )
    model = load_model(args.model, stage="sft")
    tasks = prompt_pool(world, "rl", cfg.n_prompts, params.seed, max_digits=cfg.max_digits)
    rater = Rater(world)
    rng = random.Random(f"{params.seed}/preferences")
    gen = torch.Generator().manual_seed(params.seed)
    n_val = max(1, round(len(tasks) * cfg.val_fraction))

    # 1. sample: each prompt repeated samples_per_prompt times, one batched, KV-cached pass per chunk
    repeated = [t for t in tasks for _ in range(cfg.samples_per_prompt)]
    replies = answer(model, tok, repeated, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, gen)
    # 2. score with the rater, 3. pair up with Bradley–Terry label noise
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    scores, ties = [], 0
    for i, task in enumerate(tasks):
        own = replies[i * cfg.samples_per_prompt : (i + 1) * cfg.samples_per_prompt]
        scored = [(r.text, r.ended, rater.score(task, r.text, r.ended).total) for r in own]
        scores += [s for *_, s in scored]
        pairs, n_ties = make_pairs(task.prompt, scored, cfg.label_temperature, rng)
        ties += n_ties
        context = json.dumps([{"role": "user", "content": task.prompt}])
        rows = [{**p.__dict__, "context": context, "flipped": p.flipped, "task": json.dumps(task.to_dict())} for p in pairs]
        splits["validation" if i < n_val else "train"] += rows
    every = splits["train"] + splits["validation"]
    metrics = {
        "prompts": len(tasks),
        "pairs": len(every),
        "pairs_train": len(splits["train"]),
        "pairs_validation": len(splits["validation"]),
        "ties_dropped": ties,
        "label_flip_rate": sum(r["flipped"] for r in every) / max(1, len(every)),
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        **{f"score_p{q}": statistics.quantiles(scores, n=10)[q // 10 - 1] for q in (10, 50, 90)},
        "gold_rater": 1,
    }
    log.info("%d pairs (%d ties dropped), label flip rate %.1f%%", len(every), ties, 100 * metrics["label_flip_rate"])
    return splits, metrics


_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()), ("context", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("chosen_ended", pa.bool_()), ("rejected_ended", pa.bool_()),
        ("gold_chosen", pa.float64()), ("gold_rejected", pa.float64()),
        ("flipped", pa.bool_()), ("task", pa.string()),
    ]
)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("preferences", main, add_arguments)
