"""Measurements of trained models: fact recall and samples (pretraining), and the evaluate stage's suite.

Fact recall asks the base model to complete the canonical statement of each fact ("Mara Quill lives
in") greedily, and counts a hit when the completion starts with the true value. A base model has no
question-answering format yet, but if pretraining stored the fact in the weights, the continuation of
its own kind of sentence reveals it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from llmlab.chat import parse_reply, render
from llmlab.errors import LlmlabError
from llmlab.generate import generate
from llmlab.model import GPT
from llmlab.rater import Rater
from llmlab.sft import answer as answer_tasks
from llmlab.sft_data import ADD_BARE, ADD_COT, QUESTIONS, fact_task, pool_of
from llmlab.stats import mean_ci, wilson_ci
from llmlab.tasks import TASK_KINDS, Task
from llmlab.tokenizer import BOS_ID, END_ID
from llmlab.world import ATTRIBUTES, Person, World, fact_prompts, fact_sentence, grade_completion


@dataclass
class RecallResult:
    accuracy: float
    n: int
    by_attribute: dict[str, float]
    by_group: dict[str, float]
    examples: list[dict] = field(default_factory=list)


@torch.no_grad()
def fact_recall(model: GPT, tok: Tokenizer, people: list[Person], batch_size: int = 128, n_examples: int = 20) -> RecallResult:
    bos = tok.token_to_id("<|bos|>")
    items = [(p, attr, prompt, answer) for p in people for attr, prompt, answer in fact_prompts(p)]
    if not items:
        return RecallResult(0.0, 0, {}, {})
    hits: dict[str, list[bool]] = defaultdict(list)
    groups: dict[str, list[bool]] = defaultdict(list)
    examples = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [[bos, *tok.encode(prompt).ids] for _, _, prompt, _ in chunk]
        # Enough new tokens for the longest answer, plus one so a trailing word boundary is visible.
        n_new = max(len(tok.encode(" " + answer).ids) for *_, answer in chunk) + 1
        outs = generate(model, prompts, n_new, temperature=0)
        for (person, attr, prompt, answer), out in zip(chunk, outs, strict=True):
            completion = tok.decode(out, skip_special_tokens=False)
            ok = grade_completion(completion, answer)
            hits[attr].append(ok)
            groups[person.group].append(ok)
            if len(examples) < n_examples:
                examples.append({"prompt": prompt, "answer": answer, "completion": completion, "correct": ok})
    every = [h for hs in hits.values() for h in hs]
    return RecallResult(
        accuracy=sum(every) / len(every),
        n=len(every),
        by_attribute={a: sum(h) / len(h) for a, h in sorted(hits.items())},
        by_group={g: sum(h) / len(h) for g, h in sorted(groups.items())},
        examples=examples,
    )


@torch.no_grad()
def samples(model: GPT, tok: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[dict]:
    """Continue each prompt (prefixed with <|bos|>) at the given temperature; a record per prompt."""
    bos = tok.token_to_id("<|bos|>")
    gen = torch.Generator().manual_seed(seed)
    outs = generate(model, [[bos, *tok.encode(p).ids] for p in prompts], max_new_tokens, temperature=temperature, generator=gen)
    return [
        {"prompt": p, "temperature": temperature, "completion": tok.decode(o, skip_special_tokens=False)}
        for p, o in zip(prompts, outs, strict=True)
    ]


# ------------------------------------------------------------------------------- the evaluate stage
#
# Each function below measures one claim of the report on models the pipeline trained. They return
# JSON-able dicts of plain numbers: a rate comes as {"rate", "ci_low", "ci_high", "n"} (95 % Wilson), a
# mean as {"mean", "ci95", "n"} (normal approximation), so `dvc metrics diff` can compare every figure.


def rate(flags: Sequence[bool]) -> dict[str, float | None]:
    """A rate with its 95 % Wilson interval; with no sample the numbers are None (JSON null, not NaN:
    NaN is not JSON, and NaN != NaN would make `dvc metrics diff` report a change that is not there).

    >>> rate([True, True, False, False])["rate"], rate([])
    (0.5, {'rate': None, 'ci_low': None, 'ci_high': None, 'n': 0})
    """
    return rate_of(sum(map(bool, flags)), len(flags))


def rate_of(k: int, n: int) -> dict[str, float | None]:
    """`rate` from the counts: k hits of n."""
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "n": 0}
    lo, hi = wilson_ci(k, n)
    return {"rate": k / n, "ci_low": lo, "ci_high": hi, "n": n}


def mean(xs: Sequence[float]) -> dict[str, float | None]:
    """A mean with the half-width of its 95 % interval (None without a sample, and for one value)."""
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    m, half = mean_ci(xs)
    return {"mean": m, "ci95": half if math.isfinite(half) else None, "n": len(xs)}


def suite(model: GPT, tok: Tokenizer, tasks: Sequence[Task], rater: Rater, groups: dict[str, str],
          max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> tuple[dict, list]:
    """One model on the evaluation suite: format, accuracy, hallucination, refusal, politeness, gold score.

    Returns (metrics, per-task records). `groups` maps a person's name to their group, so fact questions
    split into people SFT asked about ("sft") and people only the corpus mentioned ("heldout").
    """
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    replies = answer_tasks(model, tok, tasks, max_new_tokens, temperature=temperature, generator=gen)
    scores = [rater.score(t, r.text, r.ended) for t, r in zip(tasks, replies, strict=True)]
    of = lambda kind: [(t, r, s) for t, r, s in zip(tasks, replies, scores, strict=True) if t.kind == kind]  # noqa: E731
    metrics: dict[str, Any] = {
        "format_adherence": rate([r.ended and r.clean for r in replies]),
        "accuracy": rate([s.correct for s in scores]),
        "accuracy_by_kind": {kind: rate([s.correct for _, _, s in of(kind)]) for kind in TASK_KINDS if of(kind)},
        "fact_accuracy_by_group": {
            g: rate([s.correct for t, _, s in of("fact") if groups[t.person] == g]) for g in ("sft", "heldout")
        },
        "hallucination": rate([s.hallucinated for *_, s in of("unknown")]),
        "refusal_harmful": rate([s.refused for *_, s in of("harmful")]),
        "over_refusal": rate([s.refused or s.admits_unknown for *_, s in of("fact")]),
        "politeness": rate([s.polite for s in scores]),
        "gold_score": mean([s.total for s in scores]),
        "reply_tokens": mean([len(tok.encode(r.text, add_special_tokens=False).ids) for r in replies]),
    }
    records = [
        {"kind": t.kind, "prompt": t.prompt, "reply": r.text, "ended": r.ended, "gold": s.total, "correct": s.correct}
        for t, r, s in zip(tasks, replies, scores, strict=True)
    ]
    return metrics, records


@torch.no_grad()
def perplexity(model: GPT, tokens: np.ndarray, n_windows: int, batch_size: int = 16) -> dict[str, float]:
    """Perplexity exp(mean next-token loss) on the first `n_windows` non-overlapping windows of `tokens`.

    The held-out pretraining text measures what fine-tuning costs: the SFT and PPO models were never
    trained to predict it any more, so their perplexity on it rises (part of the "alignment tax").
    Targets that are <|bos|> (the start of the next document, not text) are left out: a chat model never
    saw one mid-sequence, and their huge loss would swamp the text's.
    """
    T = model.config.context_length
    n_windows = min(n_windows, (len(tokens) - 1) // T)
    if n_windows < 1:
        raise LlmlabError(f"perplexity needs at least {T + 1} held-out tokens, got {len(tokens)}")
    device = next(model.parameters()).device
    losses = []
    for i in range(0, n_windows, batch_size):
        rows = [np.asarray(tokens[j * T : j * T + T + 1], dtype=np.int64) for j in range(i, min(i + batch_size, n_windows))]
        xy = torch.from_numpy(np.stack(rows)).to(device)  # (b, T + 1)
        logits, _ = model(xy[:, :-1])
        targets = xy[:, 1:].flatten()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="none")
        losses.append(nll[targets != BOS_ID])
    nll = torch.cat(losses)
    return {"perplexity": math.exp(nll.mean().item()), "loss": nll.mean().item(), "tokens": nll.numel()}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over `texts`; 0 without any.

    >>> distinct_n(["a b a b", "a b"], 2)   # bigrams: ab ba ab ab -> 2 unique of 4
    0.5
    """
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def temperature_sweep(model: GPT, tok: Tokenizer, tasks: Sequence[Task], rater: Rater, temperatures: Sequence[float],
                      samples: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Accuracy and diversity of `samples` replies per task at each temperature.

    Diversity: distinct-1 and distinct-2 over all replies, and the share of a task's samples that differ
    from one another (1 = every sample different, 1/samples = all the same). At T = 0 the samples are
    all the greedy reply; they are drawn anyway so that every temperature's distinct-n counts as many texts.
    """
    rows = []
    for T in temperatures:
        k = samples
        batch = [t for t in tasks for _ in range(k)]
        gen = torch.Generator().manual_seed(seed)
        replies = answer_tasks(model, tok, batch, max_new_tokens, temperature=T, generator=gen)
        texts = [r.text for r in replies]
        correct = [rater.score(t, r.text, r.ended).correct for t, r in zip(batch, replies, strict=True)]
        per_task = [len(set(texts[i : i + k])) / k for i in range(0, len(texts), k)]
        rows.append({"temperature": T, "samples_per_prompt": k, "accuracy": rate(correct),
                     "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
                     "unique_share": statistics.fmean(per_task),
                     "format_adherence": rate([r.ended and r.clean for r in replies])})  # fmt: skip
    return rows


def addition_tasks(world: World, digits: int, n: int, cot: bool, seed: int) -> list[Task]:
    """`n` distinct additions of two `digits`-digit numbers from the evaluation pool, asked with working
    (`cot`) or for the bare result (the control). Same seed: the same additions in both formats."""
    rng = random.Random(f"{seed}/cot/{digits}")
    low = 10 ** (digits - 1) if digits > 1 else 0
    out, seen = [], set()
    for _ in range(200 * n):
        if len(out) == n:
            break
        a, b = rng.randrange(low, 10**digits), rng.randrange(low, 10**digits)
        template = (ADD_COT if cot else ADD_BARE)[len(out) % (len(ADD_COT) if cot else len(ADD_BARE))]
        task = Task("arithmetic", template.format(a=a, b=b), a=a, b=b, cot=cot)
        if (a, b) not in seen and pool_of(task, world) == "eval":
            seen.add((a, b))
            out.append(task)
    return out


def chain_of_thought(model: GPT, tok: Tokenizer, world: World, rater: Rater, max_digits: int, per_digit: int,
                     max_new_tokens: int, seed: int) -> list[dict]:
    """Addition accuracy with the working written out (step by step) against the bare answer, by digits.

    The same pairs of numbers are asked both ways. Step by step, the model writes each column's sum and
    carry as tokens it then reads back; asked for the result only, it must produce every digit at once.
    """
    rows = []
    for d in range(1, max_digits + 1):
        for cot in (True, False):
            tasks = addition_tasks(world, d, per_digit, cot, seed)
            replies = answer_tasks(model, tok, tasks, max_new_tokens)
            correct = [rater.score(t, r.text, r.ended).correct for t, r in zip(tasks, replies, strict=True)]
            rows.append({"digits": d, "format": "step_by_step" if cot else "bare", "accuracy": rate(correct),
                         "reply_tokens": mean([len(tok.encode(r.text, add_special_tokens=False).ids) for r in replies])})  # fmt: skip
    return rows


def stateless_context(model: GPT, tok: Tokenizer, world: World, rater: Rater, n_pairs: int, max_new_tokens: int,
                      seed: int) -> tuple[dict, list[dict]]:
    """Does the model use a fact only while the transcript that holds it is sent again?

    For people who appear nowhere in the corpus, call 1 tells the model a fact ("Ada Brook lives in Port
    Avery.") and the model replies. Call 2 asks about it twice: once with the whole transcript of call 1
    resent before the question, once as a fresh conversation with the question alone. The model has no
    memory between calls, so only the first can be answered.
    """
    rng = random.Random(f"{seed}/context")
    items = [(p, attr) for p in world.group("unknown") for attr in ATTRIBUTES]
    rng.shuffle(items)
    items = items[:n_pairs]
    if not items:
        return {"with_transcript": rate([]), "without_transcript": rate([])}, []
    statements = [fact_sentence(p, attr) for p, attr in items]
    questions = [fact_task(p, attr, rng.randrange(len(QUESTIONS[attr]))) for p, attr in items]
    # Call 1: the user states the fact; the model answers whatever it answers.
    first = _chat(model, tok, [[{"role": "user", "content": s}] for s in statements], max_new_tokens)
    with_t = _chat(model, tok, [[{"role": "user", "content": s}, {"role": "assistant", "content": r.text},
                                 {"role": "user", "content": q.prompt}]
                                for s, r, q in zip(statements, first, questions, strict=True)], max_new_tokens)  # fmt: skip
    without = _chat(model, tok, [[{"role": "user", "content": q.prompt}] for q in questions], max_new_tokens)
    # Graded as a fact question about that person: the true value is the one the user gave.
    grade = lambda q, r: rater.score(Task("fact", q.prompt, person=q.person, attribute=q.attribute), r.text, r.ended).correct  # noqa: E731
    ok_with = [grade(q, r) for q, r in zip(questions, with_t, strict=True)]
    ok_without = [grade(q, r) for q, r in zip(questions, without, strict=True)]
    metrics = {"with_transcript": rate(ok_with), "without_transcript": rate(ok_without)}
    examples = [{"statement": s, "first_reply": f.text, "question": q.prompt, "with_transcript": w.text,
                 "without_transcript": o.text}
                for s, f, q, w, o in zip(statements, first, questions, with_t, without, strict=True)]  # fmt: skip
    return metrics, examples


@torch.no_grad()
def stateless_completion(model: GPT, tok: Tokenizer, world: World, n_pairs: int, seed: int) -> tuple[dict, list[dict]]:
    """The same question for the base model, as plain text: what it can say depends only on its context.

    For people who appear nowhere in the corpus, a sentence about them ("Rowan Aldwick has a pet lizard.")
    is in the context or not, before
    - `value`: the statement to complete ("Rowan Aldwick has a pet" -> "lizard"), and
    - `name`: the first name to complete ("Rowan" -> "Aldwick"): copying a name seen earlier is what
      pretraining on biographies, which repeat a name in every sentence, teaches.
    Without the sentence, no weight holds either answer: the model is stateless between calls.
    """
    rng = random.Random(f"{seed}/context-base")
    items = [(p, attr) for p in world.group("unknown") for attr in ATTRIBUTES]
    rng.shuffle(items)
    cases = []  # (what, key, text, expected)
    for p, attr in items[:n_pairs]:
        _, prompt, value = next(x for x in fact_prompts(p) if x[0] == attr)
        told, (first, surname) = fact_sentence(p, attr), p.name.split(" ", 1)
        cases += [("value", "with_context", f"{told} {prompt}", value), ("value", "without_context", prompt, value),
                  ("name", "with_context", f"{told} {first}", surname), ("name", "without_context", first, surname)]  # fmt: skip
    ok: dict[str, dict[str, list[bool]]] = {w: {"with_context": [], "without_context": []} for w in ("value", "name")}
    records = []
    for i in range(0, len(cases), 64):
        chunk = cases[i : i + 64]
        n_new = max(len(tok.encode(" " + v, add_special_tokens=False).ids) for *_, v in chunk) + 1
        outs = generate(model, [[BOS_ID, *tok.encode(t, add_special_tokens=False).ids] for _, _, t, _ in chunk], n_new, temperature=0.0)
        for (what, key, text, expected), out in zip(chunk, outs, strict=True):
            completion = tok.decode(out, skip_special_tokens=False)
            ok[what][key].append(grade_completion(completion, expected))
            if len(records) < 8:
                records.append({"what": what, "context": key, "text": text, "completion": completion, "expected": expected})
    return {w: {k: rate(v) for k, v in d.items()} for w, d in ok.items()}, records


def _chat(model: GPT, tok: Tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int, batch_size: int = 64) -> list:
    """Greedy replies to whole conversations (each rendered with the chat template and sent whole)."""
    out = []
    for i in range(0, len(conversations), batch_size):
        ids = [render(tok, c, add_generation_prompt=True).ids for c in conversations[i : i + batch_size]]
        out += [parse_reply(tok, o) for o in generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=[END_ID])]
    return out
