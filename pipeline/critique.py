"""Stage `critique`: Constitutional AI's feedback model, taught from a counted number of rater judgments.

Inputs: models/sft (stage `sft`), the tokenizer, world.json (stage `corpus`), data/constitution.txt.
Outputs: models/critic/{model.safetensors,config.json,taught.json}, metrics/critique.json, plots/critique/*.csv,
reports/critique/ (held-out comparisons: the model's verdict and the critique it wrote beside the rater's;
held-out replies: what it says each does wrong, and its rewrite, scored by the rater).
Resumes from checkpoints/critique/last.ckpt.

Runs only with `preferences.labeller: constitution`; with the rater as labeller (the default) it writes a
note in place of the model and teaches nothing, so that the default pipeline pays nothing for it.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from llmlab.data.tokenizer import load_tokenizer
from llmlab.data.world import World
from llmlab.evaluation.rater import Rater
from llmlab.io import atomic_path, write_files, write_json
from llmlab.model.transformer import load_model, save_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun
from llmlab.training.constitution import (
    demonstrations,
    held_out_report,
    load_constitution,
    own_answers,
    revise,
    sft_pool_samples,
)
from llmlab.training.sft import ChatDataset, collate

log = logging.getLogger("llmlab.critique")
HELD_OUT = 0.1  # share of the SFT-pool prompts whose comparisons measure the taught model


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT model folder (from the sft stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument("--constitution", required=True, help="the principles, one per line")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the feedback model")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for curve CSVs")
    p.add_argument("--report", required=True, help="folder for the held-out critiques")


def skip(args, params: Params, why: str) -> None:
    """Outputs that say the stage taught nothing (DVC needs its outputs to exist), in a run of its own."""
    note = f"No feedback model: {why}. Run `dvc exp run -S preferences.labeller=constitution` for one.\n"
    metrics = {"taught": 0, "rater_judgments": 0}
    with StageRun("critique", {"preferences": {"labeller": params.preferences.labeller}}) as run:
        with atomic_path(args.out, is_dir=True) as tmp:
            (tmp / "NOT_TRAINED.txt").write_text(note, encoding="utf-8")
        write_files(args.plots, {"train_loss.csv": "step,train_loss\n", "val_loss.csv": "step,val_loss\n"})
        write_files(args.report, {"critiques.md": note})
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.metrics)
    log.info("nothing to teach: %s", why)


def main(args, params: Params) -> None:
    cfg, prefs = params.critique, params.preferences
    if prefs.labeller != "constitution":
        return skip(args, params, "preferences.labeller is rater")
    constitution = load_constitution(args.constitution)
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    if not world.people:
        return skip(args, params, "no synthetic world (the demonstrations need the rater)")
    # Lightning only when there is something to teach: the default run skips, and starts 4 s sooner without it.
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

    quiet_lightning_warnings()
    sft = load_model(args.model, stage="sft")
    T = sft.config.context_length

    samples = sft_pool_samples(
        sft,
        tok,
        world,
        cfg.n_prompts,
        cfg.samples_per_prompt,
        cfg.temperature,
        cfg.max_new_tokens,
        params.seed,
    )
    n_val = max(1, round(len(samples) * HELD_OUT))
    rng = random.Random(f"{params.seed}/critique")
    answers = (
        own_answers(sft, tok, [replies[0].task.prompt for replies in samples], cfg.max_new_tokens)
        if cfg.own_answer
        else None
    )
    taught = demonstrations(
        samples[n_val:], constitution, cfg.demonstrations, prefs.label_temperature, tok, T, rng, answers
    )
    held_out = demonstrations(
        samples[:n_val], constitution, 10**9, prefs.label_temperature, tok, T, rng, answers
    )
    critiqued = round(cfg.critique_share * len(taught))  # the verdict is taught for every judgment
    revisions = [d["revise"] for d in taught[: round(cfg.revision_share * len(taught))] if d["revise"]]
    # The comparison critiques go to the reviser when there is one: beside the verdicts they outweigh the
    # verdict's one token in the loss, and the labels suffered (docs/results.md).
    to_reviser = cfg.critiques_taught_to == "reviser" and bool(revisions) and cfg.revision_steps > 0
    critiques = [d["critique"] for d in taught[:critiqued]]
    held_out_critiques = [d["critique"] for d in held_out]
    critic_gets, reviser_gets = ([], critiques) if to_reviser else (critiques, [])
    critic_checks, reviser_checks = ([], held_out_critiques) if to_reviser else (held_out_critiques, [])
    critic_data = (
        ChatDataset(tok, [d["judge"] for d in taught] + critic_gets, T),
        ChatDataset(tok, [d["judge"] for d in held_out] + critic_checks, T),
    )
    reviser_data = (
        ChatDataset(tok, revisions + reviser_gets, T),
        ChatDataset(
            tok, ([d["revise"] for d in held_out if d["revise"]] or revisions[:1]) + reviser_checks, T
        ),
    )
    log.info(
        "%d demonstrations taught (each one rater judgment; %d of them as a revision too), %d held-out "
        "comparisons, %d principles",
        len(taught),
        len(revisions),
        len(held_out),
        len(constitution),
    )
    per_step = items_per_step(cfg)
    inputs = [Path(args.model) / "model.safetensors", args.tokenizer, args.world, args.constitution]
    fingerprint = {"seed": params.seed, "critique": cfg.model_dump(), "constitution": constitution}

    def teach(data, steps: int, ckpt_dir: Path, logger, callbacks) -> tuple:
        """A copy of the SFT model taught `data` (train, held-out) for `steps`, resumable from `ckpt_dir`:
        (the model, its loss on every held-out conversation, the trainer)."""
        train_base, val_set = data
        resume = resume_and_seed(ckpt_dir, fingerprint, inputs, params.seed)
        module = CausalLMModule(sft.config, cfg, steps)
        module.model.load_state_dict(sft.state_dict())
        trainer = build_trainer(cfg, ckpt_dir, logger, callbacks, steps)
        train_set = Epochs(train_base, steps * per_step, params.seed, first=resume_offset(resume, per_step))
        train_dl, val_dl = (
            loader(train_set, cfg.batch_size, trainer, collate),
            loader(validation_batches(val_set, cfg, trainer), cfg.batch_size, trainer, collate),
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None, weights_only=True)
        every = loader(val_set, cfg.batch_size, trainer, collate)  # the reported loss: every held-out one
        val_loss = float(trainer.validate(module, every, verbose=False)[0]["val/loss"])
        return module.model.eval(), val_loss, trainer

    curves = CurveRecorder(cfg.log_every)
    with StageRun("critique", {"seed": params.seed, "critique": cfg.model_dump()}) as run:
        # The feedback model and the reviser are two copies: taught together, the rewrites pulled the
        # verdicts to chance (labels 52.0 % against 67.5 % on seed 1337, docs/results.md).
        critic, val_loss, trainer = teach(
            critic_data, cfg.max_steps, Path(args.checkpoints), run.lightning_logger(), [curves]
        )
        reviser = None
        if revisions and cfg.revision_steps:
            reviser, reviser_val_loss, _ = teach(
                reviser_data, cfg.revision_steps, Path(args.checkpoints) / "reviser", False, []
            )
        if not trainer.is_global_zero:
            return
        save_model(critic, args.out)
        write_json(Path(args.out) / "taught.json", {"rater_judgments": len(taught)})
        measured, markdown, rows = held_out_report(
            critic,
            tok,
            held_out,
            cfg.principles_per_pair,
            cfg.critiques_shown,
            params.seed,
            writer=reviser if to_reviser else None,
        )
        revised, revised_md, revised_rows = {"revisions_measured": 0}, "No reviser was taught.\n", []
        if reviser is not None:
            save_model(reviser, Path(args.out) / "reviser")
            own = [s for replies in samples[:n_val] for s in replies][: cfg.revisions_measured]
            revised, revised_md, revised_rows = revise(
                reviser, tok, Rater(world), own, constitution, cfg.critiques_shown, params.seed, sft
            )
            revised["reviser_val_loss"] = reviser_val_loss
        metrics = {
            "taught": len(taught),
            "critiques_taught": critiqued,
            "critiques_taught_to_reviser": int(to_reviser),
            "revisions_taught": len(revisions),
            "rater_judgments": len(taught),
            "principles": len(constitution),
            "held_out_comparisons": len(held_out),
            "val_loss": val_loss,
            "steps": int(trainer.global_step),
            **measured,
            **revised,
        }
        write_json(args.metrics, metrics)
        curves.write(args.plots)
        write_files(
            args.report,
            {
                "critiques.md": markdown,
                "critiques.json": rows,
                "revisions.md": revised_md,
                "revisions.json": revised_rows,
            },
        )
        run.log_metrics(metrics, step=int(trainer.global_step))
        for path in (args.metrics, args.plots, args.report, Path(args.out) / "config.json"):
            run.log_artifact(path)
        log.info(
            "verdicts agree with the rater on %.1f%% of %d held-out SFT-pool comparisons; "
            "critiques written word for word as the rater's: %.1f%%",
            100 * metrics["verdict_agreement"],
            metrics["verdict_pairs"],
            100 * metrics["critique_exact"],
        )
        if revised["revisions_measured"]:
            log.info(
                "its rewrites of %d held-out replies score %+.2f ± %.2f against them (gold rubric)",
                revised["revisions_measured"],
                revised["revision_gold_gain"],
                revised["revision_gold_gain_ci95"],
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("critique", main, add_arguments)
