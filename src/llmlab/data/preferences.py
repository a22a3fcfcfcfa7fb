"""Preference pairs: the simulated human feedback of RLHF.

For each prompt of the `rl` pool the SFT model samples several replies; the rater scores them; every
two replies with different scores become a (prompt, chosen, rejected) pair. Human raters disagree with
themselves, so the label is drawn from the Bradley–Terry model on the gold scores rather than copied:

    P(a preferred to b) = σ((score_a − score_b) / τ)          τ = `label_temperature`; τ = 0: no noise

A pair of nearly equal replies is a coin flip; a clearly better reply almost always wins. Pairs with
exactly equal scores carry no preference and are dropped (and counted). The reward model only ever sees
these pairs, never the scores.

Or the pairs come from real data (`external_pairs`: a Hugging Face dataset or local files, in the
layouts of HuggingFaceH4/ultrafeedback_binarized or Anthropic/hh-rlhf). Then there is no gold score:
the reward stage reports accuracy against the labels only.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

from llmlab.data.chat_data import prompt_pool
from llmlab.data.chat_template import check_messages
from llmlab.data.sources import hf_rows, local_rows, require_usable
from llmlab.data.world import World
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.evaluation.rater import Rater
from llmlab.io import atomic_path
from llmlab.model.replies import answer
from llmlab.model.transformer import GPT
from llmlab.params import PreferencesConfig
from llmlab.stats import wilson_ci


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chosen_ended: bool
    rejected_ended: bool
    gold_chosen: float
    gold_rejected: float
    strength: int = 0  # how much better the rater says the chosen reply is (`rated_strength`); 0 from a judge
    # a judge's log-odds for the chosen reply over the rejected one (NaN: the rater labelled the pair)
    preference: float = math.nan

    @property
    def flipped(self) -> bool:
        """The label (the rater's noisy one, or a judge's) disagrees with the gold ordering."""
        return self.gold_chosen < self.gold_rejected


def bradley_terry_p(score_a: float, score_b: float, temperature: float) -> float:
    """P(a preferred to b). temperature 0 is the noise-free ordering.

    >>> round(bradley_terry_p(2.0, 0.0, 1.0), 3), bradley_terry_p(2.0, 0.0, 0.0), bradley_terry_p(1.0, 1.0, 0.5)
    (0.881, 1.0, 0.5)
    """
    if temperature == 0:
        return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / temperature))


STRENGTHS = ("negligibly better", "slightly better", "better", "significantly better")


def rated_strength(chosen: float, rejected: float) -> int:
    """How much better the rater says its chosen reply is, on Llama 2's four-point scale (Touvron et al. 2023):
    the index into `STRENGTHS`, from the gap between its scores (under 1, 1 to 2, 2 to 3, 3 and more). A
    politer wording is negligibly better; "I don't know" against an invented fact (+2 against -3),
    significantly. A label that went against the scores (the rater's noise) was a close call: negligibly.

    >>> rated_strength(2.0, -3.0), rated_strength(1.5, 1.25), rated_strength(0.0, 1.5), rated_strength(1.0, -1.0)
    (3, 0, 0, 2)
    """
    gap = chosen - rejected
    return 0 if gap < 1 else min(3, int(gap))


def make_pairs(
    prompt: str, replies: list[tuple[str, bool, float]], temperature: float, rng: random.Random
) -> tuple[list[Pair], int]:
    """All pairs of a prompt's replies (text, ended, gold score) with a drawn label; returns (pairs, ties)."""
    pairs, ties = [], 0
    for (ta, ea, sa), (tb, eb, sb) in combinations(replies, 2):
        if sa == sb:
            ties += 1
            continue
        a_wins = rng.random() < bradley_terry_p(sa, sb, temperature)
        (tc, ec, sc), (tr, er, sr) = ((ta, ea, sa), (tb, eb, sb)) if a_wins else ((tb, eb, sb), (ta, ea, sa))
        pairs.append(Pair(prompt, tc, tr, ec, er, sc, sr, rated_strength(sc, sr)))
    return pairs, ties


# ------------------------------------------------------------------------------ hf / local pairs

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_transcript(text: str) -> list[dict]:
    """An Anthropic/hh-rlhf transcript as messages.

    >>> parse_transcript("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _TURN.split(text)
    if parts[0].strip():
        raise LlmlabError("text before the first 'Human:' turn (not an hh-rlhf transcript)")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def split_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[list[dict], str, str]:
    """(context messages, chosen reply, rejected reply) of one preference row, in any of the layouts
    `params.PairColumns` describes. Raises LlmlabError saying what is wrong with the row."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None:
            if not isinstance(prompt, str):
                raise LlmlabError(f"the prompt must be a string, got {type(prompt).__name__}")
            return _nonempty(check_messages([{"role": "user", "content": prompt}]), chosen, rejected)
        chosen, rejected = parse_transcript(chosen), parse_transcript(rejected)
    elif not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise LlmlabError("chosen and rejected must both be strings or both lists of messages")
    elif (
        isinstance(prompt, str)
        and chosen
        and isinstance(chosen[0], dict)
        and chosen[0].get("role") == "assistant"
    ):
        # only the replies are messages: the prompt column holds the question
        chosen, rejected = (
            [{"role": "user", "content": prompt}, *chosen],
            [{"role": "user", "content": prompt}, *rejected],
        )
    c, r = check_messages(chosen), check_messages(rejected)
    if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise LlmlabError("chosen and rejected must end with the assistant's reply")
    if c[:-1] != r[:-1]:
        raise LlmlabError("chosen and rejected differ before their last reply (not a pair)")
    return _nonempty(c[:-1], c[-1]["content"], r[-1]["content"])


def _nonempty(context: list[dict], chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise LlmlabError(f"the {name} reply is empty (a preference needs two replies)")
    return context, chosen, rejected


def external_pairs(cfg, root: Path) -> tuple[list[dict], dict[str, int]]:
    """Pairs of `cfg.source` hf or local (`cfg` is the preferences params section), as rows of the
    preferences table without gold scores (NaN: no rater knows the truth of real data).

    Rows that do not parse, have an empty reply, or whose two replies are identical, are dropped, counted
    and the first few named in a warning; fewer than 2 usable pairs is an error.
    """
    src = cfg.hf if cfg.source == "hf" else cfg.local
    key = f"preferences.{cfg.source}"
    columns = {src.chosen_column: f"{key}.chosen_column", src.rejected_column: f"{key}.rejected_column"}
    if src.prompt_column is not None:
        columns[src.prompt_column] = f"{key}.prompt_column"
    if cfg.source == "hf":
        got = hf_rows(
            src.name,
            src.config,
            src.split,
            src.streaming,
            columns,
            key,
            root,
            src.max_pairs,
            offline_fix="preferences.source: local with preferences.local.paths",
        )
    else:
        got = local_rows(src.paths, columns, key, root)
    rows, problems, identical = [], [], 0
    for row in got.rows:
        try:
            context, chosen, rejected = split_pair(
                row.get(src.prompt_column), row[src.chosen_column], row[src.rejected_column]
            )
        except LlmlabError as e:
            problems.append(f"{row['_where']}: {e}")
            continue
        if chosen == rejected:
            identical += 1
            continue
        rows.append(
            {
                "prompt": context[-1]["content"],
                "context": json.dumps(context),
                "chosen": chosen,
                "rejected": rejected,
                "chosen_ended": True,
                "rejected_ended": True,
                "gold_chosen": math.nan,
                "gold_rejected": math.nan,
                "flipped": False,
                "task": "",
                "strength": 0,
                "preference": math.nan,
            }
        )
    require_usable(key, "pair", len(rows), len(got.rows), problems, note=f"; identical replies: {identical}")
    return rows, {
        "rows_read": len(got.rows),
        "dropped_invalid": len(problems),
        "dropped_identical": identical,
    }


Judge = Callable[[list[tuple[str, str, str]]], list[float]]
"""A labeller other than the rater: given (question, reply a, reply b) triples, how much it prefers a to b
(> 0: a is better), one number per triple. The constitution's is `llmlab.training.constitution.judge`."""


def rated_pairs(
    model: GPT, tok: Tokenizer, world: World, cfg: PreferencesConfig, seed: int, judge: Judge | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """The SFT model answers rl-pool prompts several times and the replies become pairs: labelled by the
    rater (`judge` None: its scores with Bradley–Terry noise, pairs it scores equal dropped) or by `judge`
    (every two replies that differ in text, ordered by its preference). Either way the rater's gold scores
    are kept beside each pair, for evaluation only. Returns the pairs of each split (rows of `PAIR_SCHEMA`)
    and the stage's metrics."""
    if not world.people:
        raise LlmlabError(
            "preferences.source synthetic needs the synthetic world (corpus.source: synthetic); "
            "with another corpus, use preferences.source hf or local"
        )
    tasks = prompt_pool(world, "rl", cfg.n_prompts, seed, cfg.max_digits, dict(cfg.prompt_mix))
    rater = Rater(world)
    rng = random.Random(f"{seed}/preferences")
    gen = torch.Generator().manual_seed(seed)
    n_val = max(1, round(len(tasks) * cfg.val_fraction))

    # 1. sample: each prompt repeated samples_per_prompt times, one batched, KV-cached pass per chunk
    repeated = [t for t in tasks for _ in range(cfg.samples_per_prompt)]
    replies = answer(model, tok, repeated, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, gen)
    # 2. score with the rater, 3. pair up: a noisy rater label, or the judge's
    per_task, scores, ties = [], [], 0
    for i, task in enumerate(tasks):
        own = replies[i * cfg.samples_per_prompt : (i + 1) * cfg.samples_per_prompt]
        scored = [(r.text, r.ended, rater.score(task, r.text, r.ended).total) for r in own]
        scores += [s for *_, s in scored]
        if judge is None:
            pairs, n_ties = make_pairs(task.prompt, scored, cfg.label_temperature, rng)
            ties += n_ties
        else:
            pairs = [
                Pair(task.prompt, ta, tb, ea, eb, sa, sb)
                for (ta, ea, sa), (tb, eb, sb) in combinations(scored, 2)
                if ta.strip() != tb.strip()
            ]
        per_task.append((task, pairs))
    if judge is not None:
        every = [p for _, pairs in per_task for p in pairs]
        prefer = judge([(p.prompt, p.chosen, p.rejected) for p in every])
        oriented = iter(
            replace(p, preference=x) if x > 0 else replace(_swapped(p), preference=-x)
            for p, x in zip(every, prefer, strict=True)
        )
        per_task = [(task, [next(oriented) for _ in pairs]) for task, pairs in per_task]

    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for i, (task, pairs) in enumerate(per_task):
        context = json.dumps([{"role": "user", "content": task.prompt}])
        rows = [
            {**p.__dict__, "context": context, "flipped": p.flipped, "task": json.dumps(task.to_dict())}
            for p in pairs
        ]
        splits["validation" if i < n_val else "train"] += rows
    every_row = splits["train"] + splits["validation"]
    ordered = [r for r in every_row if r["gold_chosen"] != r["gold_rejected"]]
    agree = sum(not r["flipped"] for r in ordered)
    low, high = wilson_ci(agree, len(ordered))
    by_kind: dict[str, list[bool]] = {}
    for r in ordered:
        by_kind.setdefault(json.loads(r["task"])["kind"], []).append(not r["flipped"])
    metrics = {
        "labeller": "rater" if judge is None else "constitution",
        "model_labels": int(judge is not None),
        "prompts": len(tasks),
        "pairs": len(every_row),
        "pairs_train": len(splits["train"]),
        "pairs_validation": len(splits["validation"]),
        "ties_dropped": ties,
        "gold_ties": len(every_row) - len(ordered),
        "label_flip_rate": 1 - agree / max(1, len(ordered)),
        "label_gold_agreement": agree / max(1, len(ordered)),
        "label_gold_agreement_ci_low": low,
        "label_gold_agreement_ci_high": high,
        **{f"label_gold_agreement/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "rater_judgments": len(every_row) if judge is None else 0,
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        **{f"score_p{q}": statistics.quantiles(scores, n=10)[q // 10 - 1] for q in (10, 50, 90)},
        "gold_rater": 1,
    }
    return splits, metrics


def _swapped(p: Pair) -> Pair:
    return Pair(
        p.prompt, p.rejected, p.chosen, p.rejected_ended, p.chosen_ended, p.gold_rejected, p.gold_chosen
    )


# One preference pair per row: written by the preferences stage, read by the reward and PPO stages.
PAIR_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("context", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_ended", pa.bool_()),
        ("rejected_ended", pa.bool_()),
        ("gold_chosen", pa.float64()),
        ("gold_rejected", pa.float64()),
        ("flipped", pa.bool_()),
        ("task", pa.string()),
        ("strength", pa.int8()),  # the rater's `rated_strength` (0 for a judge's labels and for real data)
        ("preference", pa.float64()),  # a judge's log-odds for chosen over rejected (NaN: rater, real data)
    ]
)


def write_pairs(out_dir: str | Path, splits: dict[str, list[dict]]) -> None:
    """Each split's pairs to `out_dir`/<split>.parquet, all or nothing (a temporary folder, then renamed)."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        for split, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), tmp / f"{split}.parquet")


def read_pairs(folder: Path, split: str) -> list[dict]:
    """The pairs of one split, as written by `write_pairs`."""
    path = folder / f"{split}.parquet"
    if not path.exists():
        raise MissingArtifactError(path, "preferences")
    rows = pq.read_table(path).to_pylist()
    if split == "train" and len(rows) < 2:
        raise LlmlabError(
            f"{path}: {len(rows)} training pairs; raise preferences.n_prompts or samples_per_prompt"
        )
    return rows


def pair_contexts(folder: Path, split: str) -> list[list[dict]]:
    """The distinct contexts (conversations before the reply) of the preference pairs of one split."""
    path = folder / f"{split}.parquet"
    if not path.exists():
        raise MissingArtifactError(path, "preferences")
    seen, out = set(), []
    for context in pq.read_table(path, columns=["context"]).column("context").to_pylist():
        if context not in seen:
            seen.add(context)
            out.append(json.loads(context))
    if not out:
        raise LlmlabError(f"{path}: no prompts; raise the number of preference pairs")
    return out
