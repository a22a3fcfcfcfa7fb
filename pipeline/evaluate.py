"""Stage `evaluate`: every claim of the report measured on the models this run trained.

One held-out suite (evaluation-pool prompts: never used by SFT, the preference data or PPO) is answered
by the base, SFT and PPO models with the same sampling settings and graded by the rater. Around it, the
measurements of each report section: tokenisation, the loss curve, fact recall, the alignment tax
(perplexity on held-out pretraining text), the reward model's accuracy and calibration, PPO's curves,
temperature, chain-of-thought, the cost of attention, statelessness, and attention maps.

Inputs: models/{pretrain,sft,ppo}, the tokenizer and its report, data/tokens (validation split),
world.json, and the metrics/plots of the pretrain, reward and ppo stages.
Outputs: metrics/evaluate.json (deterministic: no timings, so `dvc metrics diff` shows only real changes),
plots/evaluate/*.csv (for `dvc plots`), reports/report.md with its PNG figures in reports/figures/, and
reports/evaluate/ (every reply and timing behind the report). The report and figures are also logged to
the MLflow pipeline run.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from llmlab import report as rpt
from llmlab.evaluation import perplexity
from llmlab.io import read_json, write_json
from llmlab.model import load_model
from llmlab.params import Params
from llmlab.rater import Rater
from llmlab.stage import run_stage
from llmlab.studies import attention_studies, finite_numbers, graded_studies, read_csv, timed, write_plots
from llmlab.tokenizer import load_tokenizer, open_split, read_token_meta
from llmlab.tracking import StageRun
from llmlab.training import pick_device
from llmlab.world import World

log = logging.getLogger("llmlab.evaluate")

MODELS = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "dpo": "dpo"}  # report name -> its stage


def add_arguments(p):
    p.add_argument("--base", required=True, help="pretrained model folder (stage pretrain)")
    p.add_argument("--sft", required=True, help="SFT model folder (stage sft)")
    p.add_argument("--ppo", required=True, help="PPO model folder (stage ppo)")
    p.add_argument("--dpo", required=True, help="DPO model folder (stage dpo)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (stage tokenizer)")
    p.add_argument("--tokenizer-report", required=True, help="report.json of the tokenizer stage")
    p.add_argument("--tokens", required=True, help="token files folder (validation split: held-out text)")
    p.add_argument("--world", required=True, help="world.json (stage corpus)")
    p.add_argument("--pretrain-plots", required=True, help="loss curves of the pretrain stage")
    p.add_argument("--reward-metrics", required=True, help="metrics/reward.json")
    p.add_argument("--reward-plots", required=True, help="calibration of the reward stage")
    p.add_argument("--ppo-metrics", required=True, help="metrics/ppo.json")
    p.add_argument("--ppo-plots", required=True, help="per-iteration curves of the ppo stage")
    p.add_argument("--dpo-metrics", required=True, help="metrics/dpo.json")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--plots", required=True, help="folder for the dvc plots CSVs")
    p.add_argument("--report", required=True, help="the report's markdown file (figures go beside it)")
    p.add_argument("--details", required=True, help="folder for the replies and timings behind the report")


def main(args, params: Params) -> None:
    cfg, seed = params.evaluate, params.seed
    torch.manual_seed(seed)
    device = pick_device(cfg.accelerator)
    tok = load_tokenizer(args.tokenizer)
    models = {
        name: load_model(getattr(args, name), stage=stage, device=device) for name, stage in MODELS.items()
    }
    world = World.load(args.world)
    rater = Rater(world) if world.people else None
    meta = read_token_meta(args.tokens)
    held_out = open_split(args.tokens, "validation", meta)
    tokenizer_report = read_json(args.tokenizer_report, stage="tokenizer")
    reward_metrics = read_json(args.reward_metrics, stage="reward")
    ppo_metrics = read_json(args.ppo_metrics, stage="ppo")
    dpo_metrics = read_json(args.dpo_metrics, stage="dpo")
    loss = {
        split: read_csv(Path(args.pretrain_plots) / f"{split}_loss.csv", "pretrain")
        for split in ("train", "val")
    }
    calibration = read_csv(Path(args.reward_plots) / "calibration.csv", "reward")
    iterations = read_csv(Path(args.ppo_plots) / "iterations.csv", "ppo")

    with StageRun("evaluate", {"seed": seed, "evaluate": cfg.model_dump()}) as run:
        m: dict = {}  # metrics/evaluate.json: deterministic figures only
        details: dict = {"timings_s": {}}  # replies, examples and timings behind the report
        clock = functools.partial(timed, details["timings_s"])

        with clock("tokens"):
            m["tokens"] = rpt.token_figures(tokenizer_report)
            details["example_tokens"] = {e["word"]: e["tokens"] for e in tokenizer_report.get("examples", [])}
        with clock("pretraining"):
            m["pretraining"] = rpt.pretraining_figures(loss)
        if rater:
            graded_studies(m, details, models, tok, world, rater, cfg, seed, params.ppo.max_digits, clock)
        else:
            log.info(
                "no synthetic world (real corpus and data): no rater, so the graded sections are skipped"
            )
        with clock("alignment_tax"):
            m["perplexity"] = {
                name: perplexity(model, held_out, cfg.perplexity_windows) for name, model in models.items()
            }
        m["reward_model"] = finite_numbers(reward_metrics)
        m["ppo"] = finite_numbers(ppo_metrics)
        m["dpo"] = finite_numbers(dpo_metrics)

        weights, token_text = attention_studies(details, models, tok, world, cfg, seed, device, clock)

        with clock("report"):
            n_figures = rpt.write_report(
                args.report, m, details, loss, calibration, iterations, weights, token_text
            )
        write_json(args.metrics, m)
        write_plots(Path(args.plots), m, details)
        write_json(Path(args.details) / "details.json", details)

        run.log_metrics(rpt.flat(m))
        run.log_artifact(args.metrics, pipeline=True)
        run.log_artifact(args.report, pipeline=True)
        run.log_artifact(Path(args.report).parent / "figures", "figures", pipeline=True)
        run.log_artifact(args.details, "evaluate")
        timings = {k: round(v, 1) for k, v in details["timings_s"].items()}
        log.info("report: %s (%d figures); timings %s", args.report, n_figures, timings)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("evaluate", main, add_arguments)
