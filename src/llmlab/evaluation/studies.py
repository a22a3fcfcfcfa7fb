"""The evaluate stage's studies: which measurement (`evaluation`, `attention_cost`, `attention_maps`) runs
on which model, with which params, and where its figures go.

Each study adds its deterministic figures to `m` (metrics/evaluate.json) and the replies and examples behind
them to `details` (reports/evaluate/details.json); `clock(name)` times a block into the details' timings.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from llmlab.data.chat_data import prompt_pool
from llmlab.data.tokenizer import BOS_ID
from llmlab.data.world import World, copy_probes, fact_sentence
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.evaluation import report as rpt
from llmlab.evaluation.attention_cost import attention_scaling, kv_cache_speedup
from llmlab.evaluation.attention_maps import attention_weights, copying_heads, interesting_heads
from llmlab.evaluation.measurements import (
    chain_of_thought,
    distractor_effect,
    fact_recall,
    name_probe,
    position_effect,
    rate_diff_by_cluster,
    rate_of,
    samples,
    stateless_completion,
    stateless_context,
    suite,
    temperature_sweep,
)
from llmlab.evaluation.rater import Rater
from llmlab.io import atomic_path, read_json
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import EvaluateConfig
from llmlab.stats import paired_diff_ci

log = logging.getLogger("llmlab.evaluate")


@contextlib.contextmanager
def timed(into: dict[str, float], name: str):
    """`with timed(timings, "suite"): ...` adds the block's wall time to `timings["suite"]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - t0


def graded_studies(
    m: dict,
    details: dict,
    models: dict[str, GPT],
    tok: Tokenizer,
    world: World,
    rater: Rater,
    cfg: EvaluateConfig,
    seed: int,
    max_digits: int,
    clock: Callable,
) -> None:
    """The studies a rater grades: the held-out suite (base, SFT and PPO on the same prompts, with the gold
    gains), knowledge (fact recall and the name probe), temperature, chain-of-thought, and the context
    (statelessness, position of a fact, distractors)."""
    groups = {p.name: p.group for p in world.people}
    tasks = prompt_pool(world, "eval", cfg.n_prompts, seed, max_digits, cfg.prompt_mix)
    with clock("suite"):
        m["suite"] = {"n_prompts": len(tasks)}
        details["suite"] = {}
        for name, model in models.items():
            m["suite"][name], details["suite"][name] = suite(
                model, tok, tasks, rater, groups, cfg.max_new_tokens, cfg.temperature, seed
            )
            log.info(
                "suite %s: format %.1f%%, accuracy %.1f%%, gold %+.2f",
                name,
                100 * m["suite"][name]["format_adherence"]["rate"],
                100 * m["suite"][name]["accuracy"]["rate"],
                m["suite"][name]["gold_score"]["mean"],
            )
        gold = {name: [r["gold"] for r in details["suite"][name]] for name in models}
        for a, b in [("sft", "base"), ("ppo", "sft"), ("dpo", "sft")][: len(models) - 1]:
            diff, half = paired_diff_ci(gold[a], gold[b])
            m["suite"][f"gold_gain_{a}_vs_{b}"] = {"mean": diff, "ci95": half, "n": len(gold[a])}
        unknown = [i for i, t in enumerate(tasks) if t.kind == "unknown"]
        invented = {name: [details["suite"][name][i]["invented"] for i in unknown] for name in models}
        asked_about = [tasks[i].person for i in unknown]
        for a in ("ppo", "dpo"):  # RLHF against SFT, each person one draw (answers about a person go alike)
            if a in models and unknown:
                for name, scale in (("sft", 1.0), ("half_sft", 0.5)):
                    m["suite"][f"hallucination_{a}_vs_{name}"] = rate_diff_by_cluster(
                        invented[a], invented["sft"], asked_about, scale_b=scale
                    )
        questions = [t.prompt for t in tasks if t.kind == "fact"][:6]
        # The base model given a question as plain text, not in the chat format: it continues a document.
        details["base_plain_text"] = [
            {"question": r["prompt"], "completion": r["completion"]}
            for r in samples(models["base"], tok, questions, 32, temperature=0.0, seed=seed)
        ]
    with clock("knowledge"):
        people = world.known()[: cfg.recall_people]
        m["knowledge"] = {}
        for name, model in models.items():
            r = fact_recall(model, tok, people, n_examples=0)
            m["knowledge"][f"fact_recall_{name}"] = rate_of(round(r.accuracy * r.n), r.n)
            m["knowledge"][f"fact_recall_{name}_by_group"] = r.by_group
            m["knowledge"][f"name_probe_{name}"] = name_probe(model, tok, world)
    with clock("temperature"):
        sweep_tasks = prompt_pool(world, "eval", cfg.temperature_prompts, seed + 1, max_digits)
        sweep = temperature_sweep(
            models["ppo"],
            tok,
            sweep_tasks,
            rater,
            cfg.temperatures,
            cfg.temperature_samples,
            cfg.max_new_tokens,
            seed,
        )
        m["temperature"] = {f"T={row['temperature']:g}": row for row in sweep}
    with clock("chain_of_thought"):
        m["chain_of_thought"] = {}
        for name in ("sft", "ppo"):
            rows = chain_of_thought(
                models[name],
                tok,
                world,
                rater,
                cfg.cot_max_digits,
                cfg.cot_per_digit,
                cfg.cot_max_new_tokens,
                seed,
            )
            m["chain_of_thought"][name] = {f"{r['digits']}_digits/{r['format']}": r for r in rows}
    with clock("context"):
        m["context"], details["context"] = stateless_context(
            models["ppo"], tok, world, rater, cfg.context_pairs, cfg.max_new_tokens, seed
        )
        m["context_base"], details["context_base"] = stateless_completion(
            models["base"], tok, world, cfg.context_pairs, seed
        )
        m["position"], m["distractors"], details["position"], details["distractors"] = {}, {}, {}, {}
        for name in ("sft", "ppo"):
            m["position"][name], details["position"][name] = position_effect(
                models[name],
                tok,
                world,
                rater,
                cfg.position_facts,
                cfg.position_trials,
                cfg.max_new_tokens,
                seed,
            )
            rows, details["distractors"][name] = distractor_effect(
                models[name],
                tok,
                world,
                rater,
                cfg.distractor_counts,
                cfg.distractor_trials,
                cfg.max_new_tokens,
                seed,
            )
            m["distractors"][name] = {f"{r['distractors']}_sentences": r for r in rows}


def attention_studies(
    details: dict,
    models: dict[str, GPT],
    tok: Tokenizer,
    world: World,
    cfg: EvaluateConfig,
    seed: int,
    device: str,
    clock: Callable,
) -> tuple:
    """The cost of attention against the context length, the KV cache's speed-up, and the base model's
    attention maps on one sentence (with the heads that copy a name). Returns the maps' weights and tokens."""
    with clock("attention_cost"):
        shape = GPTConfig(**{**models["ppo"].config.__dict__})
        lengths = sorted(cfg.attention_lengths)  # exponents fitted on the longer half, past fixed overheads
        details["attention_cost"] = attention_scaling(
            shape, lengths, device=device, seed=seed, fit_min_length=lengths[max(0, len(lengths) // 2 - 1)]
        )
        details["kv_cache"] = kv_cache_speedup(
            models["ppo"], prompt_len=16, new_tokens=list(cfg.kv_cache_new_tokens), seed=seed
        )
    with clock("attention_maps"):
        sentence = cfg.attention_sentence or (
            fact_sentence(world.known()[0], "city") + " " + fact_sentence(world.known()[0], "job")
            if world.known()
            else "The cat sat on the mat because it was warm."
        )
        ids = [tok.token_to_id("<|bos|>"), *tok.encode(sentence, add_special_tokens=False).ids][
            : models["base"].config.context_length
        ]
        weights = attention_weights(models["base"], ids)
        token_text = [tok.decode([i], skip_special_tokens=False) for i in ids]
        details["attention_maps"] = {
            "sentence": sentence,
            "tokens": token_text,
            "heads": interesting_heads(weights),
        }
        if world.people:  # the heads that copy a name from earlier in the context, on never-seen names
            names = [p for what, p, _ in copy_probes(world, 50, seed) if what == "name"]
            details["attention_maps"]["copying_heads"] = copying_heads(
                models["base"], [[BOS_ID, *tok.encode(p, add_special_tokens=False).ids] for p in names]
            )
    return weights, token_text


@dataclasses.dataclass
class Upstream:
    """What earlier stages measured, as the report shows it: the tokenizer's report, the metrics of the
    preferences, critique, reward, ppo and dpo stages (finite numbers only), and the curves of pretrain, reward and ppo."""

    tokenizer_report: dict
    stage_metrics: dict[str, dict]  # reward_model, ppo, dpo, ...: the sections of metrics/evaluate.json
    loss: dict[str, list[dict]]  # train, val
    calibration: list[dict]
    iterations: list[dict]

    @classmethod
    def read(cls, args) -> Upstream:
        """From the evaluate stage's arguments; a missing or empty file names the stage that makes it."""
        return cls(
            tokenizer_report=read_json(args.tokenizer_report, stage="tokenizer"),
            stage_metrics={
                section: finite_numbers(read_json(path, stage=stage))
                for section, stage, path in (
                    ("reward_model", "reward", args.reward_metrics),
                    ("ppo", "ppo", args.ppo_metrics),
                    ("dpo", "dpo", args.dpo_metrics),
                    ("preferences", "preferences", args.preferences_metrics),
                    ("critique", "critique", args.critique_metrics),
                )
            },
            loss={
                s: read_csv(Path(args.pretrain_plots) / f"{s}_loss.csv", "pretrain") for s in ("train", "val")
            },
            calibration=read_csv(Path(args.reward_plots) / "calibration.csv", "reward"),
            iterations=read_csv(Path(args.ppo_plots) / "iterations.csv", "ppo"),
        )


def finite_numbers(metrics: dict) -> dict:
    """The finite numbers of another stage's metrics (NaN would make `dvc metrics diff` see a change)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def read_csv(path: Path, stage: str) -> list[dict[str, float]]:
    """Rows of a plots CSV as numbers (empty cells are None)."""
    if not path.exists():
        raise MissingArtifactError(path, stage)
    with open(path, encoding="utf-8") as f:
        rows = [
            {k: float(v) if v not in ("", None) else None for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
    if not rows:
        raise LlmlabError(f"{path} has no rows (re-create it with `dvc repro {stage}`)")
    return rows


def write_plots(folder: Path, m: dict, details: dict) -> None:
    """The curves `dvc plots` draws: temperature, chain-of-thought and the cost of attention. Every file
    dvc.yaml declares is written: without a rater (real data) the graded two hold their header only."""
    tables: dict[str, tuple[list[str], list[dict]]] = {}
    temperature = [
        {
            "temperature": r["temperature"],
            "accuracy": r["accuracy"]["rate"],
            "distinct_2": r["distinct_2"],
            "unique_share": r["unique_share"],
        }
        for r in m.get("temperature", {}).values()
    ]
    tables["temperature.csv"] = (["temperature", "accuracy", "distinct_2", "unique_share"], temperature)
    by_digits: dict[int, dict] = {}
    for model, rows in m.get("chain_of_thought", {}).items():
        for r in rows.values():
            row = by_digits.setdefault(r["digits"], {"digits": r["digits"]})
            row[f"{model}_{r['format']}"] = r["accuracy"]["rate"]
    cot = list(by_digits.values())
    tables["chain_of_thought.csv"] = (list(cot[0]) if cot else ["digits"], cot)
    scaling = rpt.scaling_rows(details["attention_cost"])
    tables["attention_cost.csv"] = (list(scaling[0]), scaling)
    with atomic_path(folder, is_dir=True) as tmp:
        for name, (header, rows) in tables.items():
            with open(tmp / name, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)
