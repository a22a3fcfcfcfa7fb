"""Stage `evaluate`: every claim of the report measured on the models this run trained.

One held-out suite (evaluation-pool prompts: never used by SFT, the preference data, PPO or DPO) is
answered by the base, SFT, PPO and DPO models with the same sampling settings and graded by the rater.
Around it, each report section's measurement (`llmlab.evaluation.studies` says which runs on which model).

Outputs: metrics/evaluate.json (deterministic: no timings, so `dvc metrics diff` shows only real changes),
plots/evaluate/*.csv (for `dvc plots`), reports/report.md with its PNG figures in reports/figures/, and
reports/evaluate/ (every reply and timing behind the report), also logged to the MLflow pipeline run.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from llmlab.data.tokenizer import load_tokenizer, open_split, read_token_meta
from llmlab.data.world import World
from llmlab.device import pick_device
from llmlab.evaluation import report as rpt
from llmlab.evaluation.measurements import perplexity
from llmlab.evaluation.rater import Rater
from llmlab.evaluation.studies import Upstream, attention_studies, graded_studies, timed, write_plots
from llmlab.io import write_json
from llmlab.model.transformer import load_model
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun

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
    p.add_argument("--preferences-metrics", required=True, help="metrics/preferences.json (who labelled)")
    p.add_argument("--critique-metrics", required=True, help="metrics/critique.json")
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
    held_out = open_split(args.tokens, "validation", read_token_meta(args.tokens))
    upstream = Upstream.read(args)

    with StageRun("evaluate", {"seed": seed, "evaluate": cfg.model_dump()}) as run:
        m: dict = {}  # metrics/evaluate.json: deterministic figures only
        details: dict = {"timings_s": {}}  # replies, examples and timings behind the report
        clock = functools.partial(timed, details["timings_s"])

        with clock("tokens"):
            m["tokens"] = rpt.token_figures(upstream.tokenizer_report)
            examples = upstream.tokenizer_report.get("examples", [])
            details["example_tokens"] = {e["word"]: e["tokens"] for e in examples}
        with clock("pretraining"):
            m["pretraining"] = rpt.pretraining_figures(upstream.loss)
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
        m.update(upstream.stage_metrics)

        weights, token_text = attention_studies(details, models, tok, world, cfg, seed, device, clock)

        with clock("report"):
            n_figures = rpt.write_report(
                args.report,
                m,
                details,
                upstream.loss,
                upstream.calibration,
                upstream.iterations,
                weights,
                token_text,
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
