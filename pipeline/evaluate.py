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

import contextlib
import csv
import functools
import logging
import math
import os
import time
from pathlib import Path

import torch

from llmlab import report as rpt
from llmlab.attention_cost import attention_scaling, kv_cache_speedup
from llmlab.attention_maps import attention_weights, copying_heads, interesting_heads
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.evaluation import (
    chain_of_thought,
    distractor_effect,
    fact_recall,
    name_probe,
    perplexity,
    position_effect,
    rate_of,
    samples,
    stateless_completion,
    stateless_context,
    suite,
    temperature_sweep,
)
from llmlab.io import atomic_path, read_json, write_json, write_text
from llmlab.model import GPTConfig, load_model
from llmlab.params import Params
from llmlab.rater import Rater
from llmlab.sft_data import prompt_pool
from llmlab.stage import run_stage
from llmlab.stats import paired_diff_ci
from llmlab.tokenizer import BOS_ID, load_tokenizer, open_split, read_token_meta
from llmlab.tracking import StageRun
from llmlab.world import World, copy_probes, fact_sentence

log = logging.getLogger("llmlab.evaluate")

MODELS = {"base": "pretrain", "sft": "sft", "ppo": "ppo"}  # report name -> the stage that writes it


def add_arguments(p):
    p.add_argument("--base", required=True, help="pretrained model folder (stage pretrain)")
    p.add_argument("--sft", required=True, help="SFT model folder (stage sft)")
    p.add_argument("--ppo", required=True, help="PPO model folder (stage ppo)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (stage tokenizer)")
    p.add_argument("--tokenizer-report", required=True, help="report.json of the tokenizer stage")
    p.add_argument("--tokens", required=True, help="token files folder (validation split: held-out text)")
    p.add_argument("--world", required=True, help="world.json (stage corpus)")
    p.add_argument("--pretrain-plots", required=True, help="loss curves of the pretrain stage")
    p.add_argument("--reward-metrics", required=True, help="metrics/reward.json")
    p.add_argument("--reward-plots", required=True, help="calibration of the reward stage")
    p.add_argument("--ppo-metrics", required=True, help="metrics/ppo.json")
    p.add_argument("--ppo-plots", required=True, help="per-iteration curves of the ppo stage")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--plots", required=True, help="folder for the dvc plots CSVs")
    p.add_argument("--report", required=True, help="the report's markdown file (figures go beside it)")
    p.add_argument("--details", required=True, help="folder for the replies and timings behind the report")


def main(args, params: Params) -> None:
    cfg, seed = params.evaluate, params.seed
    torch.manual_seed(seed)
    device = pick_device(cfg.accelerator)
    tok = load_tokenizer(args.tokenizer)
    models = {name: load_model(getattr(args, name), stage=stage, device=device) for name, stage in MODELS.items()}
    world = World.load(args.world)
    rater = Rater(world) if world.people else None
    meta = read_token_meta(args.tokens)
    held_out = open_split(args.tokens, "validation", meta)
    tokenizer_report = read_json(args.tokenizer_report, stage="tokenizer")
    reward_metrics = read_json(args.reward_metrics, stage="reward")
    ppo_metrics = read_json(args.ppo_metrics, stage="ppo")
    loss = {split: read_csv(Path(args.pretrain_plots) / f"{split}_loss.csv", "pretrain") for split in ("train", "val")}
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
            m["pretraining"] = {"final_train_loss": loss["train"][-1]["loss"], "final_val_loss": loss["val"][-1]["loss"],
                                "steps": int(loss["train"][-1]["step"])}  # fmt: skip
        if rater:
            groups = {p.name: p.group for p in world.people}
            tasks = prompt_pool(world, "eval", cfg.n_prompts, seed, params.ppo.max_digits)
            with clock("suite"):
                m["suite"] = {"n_prompts": len(tasks)}
                details["suite"] = {}
                for name, model in models.items():
                    m["suite"][name], details["suite"][name] = suite(
                        model, tok, tasks, rater, groups, cfg.max_new_tokens, cfg.temperature, seed
                    )
                    log.info("suite %s: format %.1f%%, accuracy %.1f%%, gold %+.2f", name,
                             100 * m["suite"][name]["format_adherence"]["rate"], 100 * m["suite"][name]["accuracy"]["rate"],
                             m["suite"][name]["gold_score"]["mean"])  # fmt: skip
                gold = {name: [r["gold"] for r in details["suite"][name]] for name in models}
                for a, b in (("sft", "base"), ("ppo", "sft")):
                    diff, half = paired_diff_ci(gold[a], gold[b])
                    m["suite"][f"gold_gain_{a}_vs_{b}"] = {"mean": diff, "ci95": half, "n": len(gold[a])}
                questions = [t.prompt for t in tasks if t.kind == "fact"][:6]
                # The base model given a question as plain text, not in the chat format: it continues a document.
                details["base_plain_text"] = [{"question": r["prompt"], "completion": r["completion"]}
                                              for r in samples(models["base"], tok, questions, 32, temperature=0.0, seed=seed)]  # fmt: skip
            with clock("knowledge"):
                people = world.known()[: cfg.recall_people]
                m["knowledge"] = {}
                for name, model in models.items():
                    r = fact_recall(model, tok, people, n_examples=0)
                    m["knowledge"][f"fact_recall_{name}"] = rate_of(round(r.accuracy * r.n), r.n)
                    m["knowledge"][f"fact_recall_{name}_by_group"] = r.by_group
                    m["knowledge"][f"name_probe_{name}"] = name_probe(model, tok, world)
            with clock("temperature"):
                sweep_tasks = prompt_pool(world, "eval", cfg.temperature_prompts, seed + 1, params.ppo.max_digits)
                sweep = temperature_sweep(models["ppo"], tok, sweep_tasks, rater, cfg.temperatures, cfg.temperature_samples,
                                          cfg.max_new_tokens, seed)  # fmt: skip
                m["temperature"] = {f"T={row['temperature']:g}": row for row in sweep}
            with clock("chain_of_thought"):
                m["chain_of_thought"] = {}
                for name in ("sft", "ppo"):
                    rows = chain_of_thought(models[name], tok, world, rater, cfg.cot_max_digits, cfg.cot_per_digit,
                                            cfg.cot_max_new_tokens, seed)  # fmt: skip
                    m["chain_of_thought"][name] = {f"{r['digits']}_digits/{r['format']}": r for r in rows}
            with clock("context"):
                m["context"], details["context"] = stateless_context(models["ppo"], tok, world, rater, cfg.context_pairs,
                                                                     cfg.max_new_tokens, seed)  # fmt: skip
                m["context_base"], details["context_base"] = stateless_completion(models["base"], tok, world, cfg.context_pairs, seed)
                m["position"], m["distractors"], details["position"], details["distractors"] = {}, {}, {}, {}
                for name in ("sft", "ppo"):
                    m["position"][name], details["position"][name] = position_effect(
                        models[name], tok, world, rater, cfg.position_facts, cfg.position_trials, cfg.max_new_tokens, seed)
                    rows, details["distractors"][name] = distractor_effect(
                        models[name], tok, world, rater, cfg.distractor_counts, cfg.distractor_trials, cfg.max_new_tokens, seed)
                    m["distractors"][name] = {f"{r['distractors']}_sentences": r for r in rows}
        else:
            log.info("no synthetic world (real corpus and data): no rater, so the graded sections are skipped")
        with clock("alignment_tax"):
            m["perplexity"] = {name: perplexity(model, held_out, cfg.perplexity_windows) for name, model in models.items()}
        m["reward_model"] = finite_numbers(reward_metrics)
        m["ppo"] = finite_numbers(ppo_metrics)

        with clock("attention_cost"):
            shape = GPTConfig(**{**models["ppo"].config.__dict__})
            lengths = sorted(cfg.attention_lengths)  # exponents fitted on the longer half, past fixed overheads
            details["attention_cost"] = attention_scaling(shape, lengths, device=device, seed=seed,
                                                          fit_min_length=lengths[max(0, len(lengths) // 2 - 1)])  # fmt: skip
            details["kv_cache"] = kv_cache_speedup(models["ppo"], prompt_len=16, new_tokens=list(cfg.kv_cache_new_tokens), seed=seed)
        with clock("attention_maps"):
            sentence = cfg.attention_sentence or (fact_sentence(world.known()[0], "city") + " " + fact_sentence(world.known()[0], "job")
                                                  if world.known() else "The cat sat on the mat because it was warm.")  # fmt: skip
            ids = [tok.token_to_id("<|bos|>"), *tok.encode(sentence, add_special_tokens=False).ids][: models["base"].config.context_length]
            weights = attention_weights(models["base"], ids)
            token_text = [tok.decode([i], skip_special_tokens=False) for i in ids]
            details["attention_maps"] = {"sentence": sentence, "tokens": token_text, "heads": interesting_heads(weights)}
            if world.people:  # the heads that copy a name from earlier in the context, on never-seen names
                names = [p for what, p, _ in copy_probes(world, 50, seed) if what == "name"]
                details["attention_maps"]["copying_heads"] = copying_heads(
                    models["base"], [[BOS_ID, *tok.encode(p, add_special_tokens=False).ids] for p in names])

        with clock("report"):
            with atomic_path(Path(args.report).parent / "figures", is_dir=True) as figures:
                plots = rpt.figures(figures, m, details, loss, calibration, iterations, weights, token_text)
            text = rpt.markdown(m, details, {k: f"figures/{v}" for k, v in plots.items()}, iterations)
            write_text(args.report, text)
        write_json(args.metrics, m)
        write_plots(Path(args.plots), m, details)
        write_json(Path(args.details) / "details.json", details)

        run.log_metrics(rpt.flat(m))
        run.log_artifact(args.metrics, pipeline=True)
        run.log_artifact(args.report, pipeline=True)
        run.log_artifact(Path(args.report).parent / "figures", "figures", pipeline=True)
        run.log_artifact(args.details, "evaluate")
        log.info("report: %s (%d figures); timings %s", args.report, len(plots),
                 {k: round(v, 1) for k, v in details["timings_s"].items()})  # fmt: skip


def finite_numbers(metrics: dict) -> dict:
    """The finite numbers of another stage's metrics (NaN would make `dvc metrics diff` see a change)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def pick_device(accelerator: str) -> str:
    """evaluate.accelerator -> a torch device; one asked for by name and absent is an error, not a fallback."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("auto", "mps") and torch.backends.mps.is_available():
        return "mps"
    if accelerator in ("auto", "cpu"):
        return "cpu"
    raise LlmlabError(f"evaluate.accelerator is {accelerator!r} but this machine has no such device: use auto or cpu")


@contextlib.contextmanager
def timed(into: dict[str, float], name: str):
    """`with timed(timings, "suite"): ...` adds the block's wall time to `timings["suite"]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - t0


def read_csv(path: Path, stage: str) -> list[dict[str, float]]:
    """Rows of a plots CSV as numbers (empty cells are None)."""
    if not path.exists():
        raise MissingArtifactError(path, stage)
    with open(path, encoding="utf-8") as f:
        rows = [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise LlmlabError(f"{path} has no rows (re-create it with `dvc repro {stage}`)")
    return rows


def write_plots(folder: Path, m: dict, details: dict) -> None:
    """The curves `dvc plots` draws: temperature, chain-of-thought and the cost of attention."""
    tables = {}
    if "temperature" in m:
        tables["temperature.csv"] = [{"temperature": r["temperature"], "accuracy": r["accuracy"]["rate"],
                                      "distinct_2": r["distinct_2"], "unique_share": r["unique_share"]}
                                     for r in m["temperature"].values()]  # fmt: skip
    if "chain_of_thought" in m:
        by_digits: dict[int, dict] = {}
        for model, rows in m["chain_of_thought"].items():
            for r in rows.values():
                by_digits.setdefault(r["digits"], {"digits": r["digits"]})[f"{model}_{r['format']}"] = r["accuracy"]["rate"]
        tables["chain_of_thought.csv"] = list(by_digits.values())
    tables["attention_cost.csv"] = rpt.scaling_rows(details["attention_cost"])
    with atomic_path(folder, is_dir=True) as tmp:
        for name, rows in tables.items():
            with open(tmp / name, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("evaluate", main, add_arguments)
