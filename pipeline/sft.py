"""Stage `sft`: supervised fine-tuning of the pretrained model on chat demonstrations.

Inputs: models/pretrain (stage `pretrain`), the tokenizer, world.json (stage `corpus`).
Outputs: models/sft/{model.safetensors,config.json}, metrics/sft.json, plots/sft/*.csv, reports/sft/
(replies to evaluation prompts with the rater's scores). Resumes from checkpoints/sft/last.ckpt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from llmlab.errors import LlmlabError
from llmlab.io import write_json, write_text
from llmlab.model import load_model, save_model
from llmlab.params import Params
from llmlab.sft import (
    ChatDataset,
    add_replay,
    collate,
    collate_packed,
    graded_replies,
    summary_line,
    training_conversations,
    ungraded_replies,
)
from llmlab.stage import run_stage
from llmlab.tokenizer import load_tokenizer
from llmlab.tracking import StageRun
from llmlab.training import (
    CausalLMModule,
    CurveRecorder,
    Epochs,
    build_trainer,
    items_per_step,
    loader,
    quiet_lightning_warnings,
    resume_and_seed,
    resume_offset,
)
from llmlab.world import World

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

    conversations, data_stats = training_conversations(world, cfg.data, params.seed)
    n_val = max(1, len(conversations) // 20)
    val_set = ChatDataset(tok, conversations[:n_val], T)
    train_base = ChatDataset(tok, conversations[n_val:], T)
    n_replay = add_replay(train_base, tok, Path(args.corpus), cfg.data.replay_share, params.seed, T)
    per_step = items_per_step(cfg)

    if not len(train_base) or not len(val_set):
        raise LlmlabError(
            f"sft: no conversation fits the context of {T} tokens with an answer in it "
            f"({train_base.no_answer + val_set.no_answer} left out); use shorter conversations or a longer context"
        )
    digest = hashlib.sha256(
        json.dumps(conversations, sort_keys=True).encode()
    ).hexdigest()  # hf/local data can change
    resume = resume_and_seed(
        args.checkpoints,
        {"seed": params.seed, "sft": cfg.model_dump(), "data": digest},
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
        train_set = Epochs(train_base, cfg.max_steps * per_step, params.seed, first=first)
        batches = collate_packed if cfg.pack else collate
        train_dl, val_dl = (
            loader(train_set, cfg.batch_size, trainer, batches),
            loader(val_set, cfg.batch_size, trainer, batches),
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        val_loss = float(trainer.validate(module, val_dl, verbose=False)[0]["val/loss"])
        if not trainer.is_global_zero:
            return

        model = module.model.eval()
        save_model(model, args.out)
        metrics = {
            "val_loss": val_loss,
            "steps": int(trainer.global_step),
            "examples": len(conversations),
            "truncated": train_base.truncated + val_set.truncated,
            "no_answer": train_base.no_answer + val_set.no_answer,
            "replayed_documents": n_replay,
            **data_stats,
        }
        report = Path(args.report)
        if world.people:  # the rater can grade replies to the world's evaluation prompts
            graded, rows, lines = graded_replies(model, tok, world, cfg, params.seed)
            metrics |= graded
        else:  # no ground truth: the replies to held-out conversations' first turns, ungraded
            log.info("no synthetic world: replies are not graded (no rater); see %s", report / "replies.md")
            rows, lines = ungraded_replies(model, tok, conversations[:n_val], cfg.max_new_tokens)
        write_json(args.metrics, metrics)
        curves.write(args.plots)
        write_json(report / "replies.json", rows)
        write_text(report / "replies.md", "\n".join(lines) + "\n")
        run.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=int(trainer.global_step)
        )
        for path in (args.metrics, Path(args.out) / "config.json", report, args.plots):
            run.log_artifact(path)
        log.info(summary_line(metrics, val_loss, n_val))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning_warnings()
    run_stage("sft", main, add_arguments)
