"""Stage `reward`: a Bradley–Terry reward model on the preference pairs, initialised from SFT.

Inputs: data/preferences (stage `preferences`), models/sft (stage `sft`), the tokenizer.
Outputs: models/reward/{model.safetensors,config.json} (with the reward offset and scale),
metrics/reward.json (accuracy against the gold ordering only for rated synthetic pairs: real data has no
gold), plots/reward/calibration.csv. Resumes from checkpoints/reward/last.ckpt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import torch

from llmlab import checkpoints
from llmlab.chat import render, reply
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import write_json, write_text
from llmlab.model import load_model
from llmlab.params import Params
from llmlab.pretraining import CurveRecorder, build_trainer, loader, resume_offset, world_size
from llmlab.reward import (
    PairDataset,
    RewardModule,
    collate_pairs,
    save_reward_model,
    score_sequences,
)
from llmlab.sft import Epochs
from llmlab.stage import run_stage
from llmlab.stats import wilson_ci
from llmlab.tokenizer import load_tokenizer
from llmlab.tracking import StageRun, is_global_zero

log = logging.getLogger("llmlab.reward")


def add_arguments(p):
    p.add_argument("--pairs", required=True, help="folder of preference pairs (from the preferences stage)")
    p.add_argument("--model", required=True, help="SFT model folder (the reward model's starting point)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the reward model")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for curve and calibration CSVs")


def read_pairs(folder: Path, split: str) -> list[dict]:
    path = folder / f"{split}.parquet"
    if not path.exists():
        raise MissingArtifactError(path, "preferences")
    rows = pq.read_table(path).to_pylist()
    if split == "train" and len(rows) < 2:
        raise LlmlabError(f"{path}: {len(rows)} training pairs; raise preferences.n_prompts or samples_per_prompt")
    return rows


def main(args, params: Params) -> None:
    cfg = params.reward
    tok = load_tokenizer(args.tokenizer)
    sft = load_model(args.model, stage="sft")
    T = sft.config.context_length
    train_rows = read_pairs(Path(args.pairs), "train")
    val_rows = read_pairs(Path(args.pairs), "validation")
    if not val_rows:  # only in tiny configurations
        log.warning("no held-out pairs: validating on a tenth of the training pairs (raise preferences.n_prompts)")
        val_rows = train_rows[: max(1, len(train_rows) // 10)]
    train_base, val_set = PairDataset(tok, train_rows, T), PairDataset(tok, val_rows, T)
    items_per_step = cfg.batch_size * cfg.grad_accum * world_size(cfg)

    fp = checkpoints.fingerprint(
        {"seed": params.seed, "reward": cfg.model_dump()},
        [Path(args.pairs) / "train.parquet", Path(args.model) / "model.safetensors", args.tokenizer],
    )
    resume = checkpoints.resume_path(args.checkpoints, fp, readonly=not is_global_zero())
    L.seed_everything(params.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    module = RewardModule(sft.config, cfg, cfg.max_steps)
    module.model.backbone.load_state_dict(sft.state_dict())
    curves = CurveRecorder(cfg.log_every)

    with StageRun("reward", {"seed": params.seed, "reward": cfg.model_dump()}) as run:
        trainer = build_trainer(cfg, args.checkpoints, run.lightning_logger(), [curves], cfg.max_steps)
        first = resume_offset(resume, items_per_step)  # continue the data where the checkpoint stopped
        lengths = [max(len(c), len(r)) for c, r in train_base.items] if cfg.group_by_length else None
        train_set = Epochs(train_base, cfg.max_steps * items_per_step, params.seed, first, lengths, items_per_step)
        train_dl = loader(train_set, cfg.batch_size, trainer, collate_pairs)
        val_dl = loader(val_set, cfg.batch_size, trainer, collate_pairs)
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        if not trainer.is_global_zero:
            return

        model = module.model.eval()
        # Shift: the SFT model's own replies score 0 on average. Rated pairs are SFT replies already;
        # for real data the SFT model first answers the training prompts.
        rated = all(math.isfinite(row["gold_chosen"]) for row in train_rows + val_rows)
        replies = [s for pair in train_base.items for s in pair] if rated else sft_replies(sft, tok, train_rows, T, params.preferences.max_new_tokens, params.seed)
        r_sft = score_sequences(model, replies)
        model.offset = float(r_sft.mean())
        scale = float(r_sft.std()) if len(r_sft) > 1 else 0.0
        save_reward_model(model, args.out, scale)

        r_c = score_sequences(model, [c for c, _ in val_set.items])
        r_r = score_sequences(model, [r for _, r in val_set.items])
        metrics = {
            "pairs_train": len(train_rows),
            "pairs_validation": len(val_rows),
            "accuracy_noisy_labels": float((r_c > r_r).float().mean()),
            "margin_mean": float((r_c - r_r).mean()),
            "reward_offset": model.offset,
            "reward_scale": scale,
            "steps": int(trainer.global_step),
            "gold_rater": int(rated),
        }
        if rated:
            gold = [(row["gold_chosen"], row["gold_rejected"]) for row in val_rows]
            hits = sum((float(a - b) > 0) == (gc > gr) for a, b, (gc, gr) in zip(r_c, r_r, gold, strict=True))
            metrics["accuracy_gold"] = hits / len(gold)
            metrics["accuracy_gold_ci_low"], metrics["accuracy_gold_ci_high"] = wilson_ci(hits, len(gold))
        else:
            log.info("real preference data: no gold rater, so accuracy is against the dataset's labels only")
        table = calibration(r_c, r_r, params.seed)
        write_json(args.metrics, metrics)
        curves.write(args.plots)
        write_text(Path(args.plots) / "calibration.csv", "predicted,observed,n\n" + "".join(f"{p:.4f},{o:.4f},{n}\n" for p, o, n in table))
        run.log_metrics(metrics)
        for path in (args.metrics, args.plots, Path(args.out) / "config.json"):
            run.log_artifact(path)
        log.info("gold accuracy %s · label accuracy %.1f%% on %d held-out pairs",
                 f"{100 * metrics['accuracy_gold']:.1f}%" if rated else "n/a", 100 * metrics["accuracy_noisy_labels"], len(val_rows))


def sft_replies(sft, tok, rows: list[dict], context_length: int, max_new_tokens: int, seed: int, n: int = 256) -> list[list[int]]:
    """The SFT model's own replies (sampled, T = 1, as long as the preference stage's) to up to n training
    prompts, as reward-model inputs."""
    contexts = [json.loads(r["context"]) for r in rows[:n]]
    prompts = [render(tok, c, add_generation_prompt=True).ids for c in contexts]
    out = reply(sft, tok, contexts, max_new_tokens, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    return [(p + list(r.tokens))[-context_length:] for p, r in zip(prompts, out, strict=True)]


def calibration(r_c: torch.Tensor, r_r: torch.Tensor, seed: int, bins: int = 5) -> list[tuple[float, float, int]]:
    """Predicted P(a ≻ b) = σ(r_a − r_b) against how often a was the labelled winner, per bin.

    Each pair is shown in a random order (a, b), so the observed frequency is not trivially 1.
    """
    rng = random.Random(seed)
    points = []
    for c, r in zip(r_c.tolist(), r_r.tolist(), strict=True):
        if rng.random() < 0.5:
            points.append((torch.sigmoid(torch.tensor(c - r)).item(), 1.0))
        else:
            points.append((torch.sigmoid(torch.tensor(r - c)).item(), 0.0))
    table = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = [(p, y) for p, y in points if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if inside:
            table.append((sum(p for p, _ in inside) / len(inside), sum(y for _, y in inside) / len(inside), len(inside)))
    return table


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    run_stage("reward", main, add_arguments)
