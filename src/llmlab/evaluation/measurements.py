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

from llmlab.data.chat_data import ADD_BARE, ADD_COT, pool_of
from llmlab.data.chat_template import encode_content, render
from llmlab.data.tasks import TASK_KINDS, Task
from llmlab.data.tokenizer import BOS_ID
from llmlab.data.world import (
    ATTRIBUTES,
    PHRASINGS,
    QUESTIONS,
    Person,
    World,
    fact_prompts,
    fact_sentence,
    grade_completion,
    invented_people,
)
from llmlab.errors import LlmlabError
from llmlab.evaluation.rater import Rater
from llmlab.model.generate import generate
from llmlab.model.replies import answer as answer_tasks
from llmlab.model.replies import reply
from llmlab.model.transformer import GPT
from llmlab.stats import clustered_diff_ci, clustered_rate_ci, mean_ci, wilson_ci


@dataclass
class RecallResult:
    accuracy: float
    n: int
    by_attribute: dict[str, float]
    by_group: dict[str, float]
    examples: list[dict] = field(default_factory=list)


@torch.no_grad()
def complete(
    model: GPT, tok: Tokenizer, items: Sequence[tuple[str, str]], batch_size: int = 128
) -> list[tuple[str, bool]]:
    """Greedy completion of each (prompt, answer) after <|bos|>, graded by `grade_completion`: a list of
    (completion, correct), in the order given. A prompt is cut from the left so that it and the answer fit
    the context. Batched shortest prompt first, so that little of a batch is left padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    graded: dict[int, tuple[str, bool]] = {}
    for i in range(0, len(items), batch_size):
        chunk = [items[j] for j in order[i : i + batch_size]]
        # Enough new tokens for the longest answer, plus one so a trailing word boundary is visible.
        n_new = max(len(tok.encode(" " + answer, add_special_tokens=False).ids) for _, answer in chunk) + 1
        keep = model.config.context_length - n_new
        prompts = [[BOS_ID, *tok.encode(prompt, add_special_tokens=False).ids][-keep:] for prompt, _ in chunk]
        outs = generate(model, prompts, n_new, temperature=0)
        for j, (_, answer), o in zip(order[i : i + batch_size], chunk, outs, strict=True):
            completion = tok.decode(o, skip_special_tokens=False)
            graded[j] = (completion, grade_completion(completion, answer))
    return [graded[j] for j in range(len(items))]


@torch.no_grad()
def fact_recall(
    model: GPT, tok: Tokenizer, people: list[Person], batch_size: int = 128, n_examples: int = 20
) -> RecallResult:
    items = [(p, attr, prompt, answer) for p in people for attr, prompt, answer in fact_prompts(p)]
    if not items:
        return RecallResult(0.0, 0, {}, {})
    hits: dict[str, list[bool]] = defaultdict(list)
    groups: dict[str, list[bool]] = defaultdict(list)
    examples = []
    graded = complete(model, tok, [(prompt, answer) for *_, prompt, answer in items], batch_size)
    for (person, attr, prompt, answer), (completion, ok) in zip(items, graded, strict=True):
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
def name_probe(model: GPT, tok: Tokenizer, world: World, ridge: float = 1.0) -> dict[str, float]:
    """Is an attribute stored *at the name*? A linear probe reads it from the model's final hidden state at
    the last token of "<|bos|> Full Name", alone (Allen-Zhu & Li 2023, Part 3.1, P-probing).

    Per attribute, a ridge-regression classifier (one-hot targets, W = (XᵀX + λI)⁻¹XᵀY on standardised
    states, prediction = the largest output) is fitted on the SFT people's states and tested on the held-out
    people's: the share of held-out people whose value it predicts, and the mean over attributes ("mean").
    High here and low in question answering means the knowledge is stored but not extracted; low here, the
    name alone does not carry it linearly.
    """
    train, test = world.group("sft"), world.group("heldout")
    if not train or not test:
        return {}

    def states(people: list[Person]) -> torch.Tensor:
        rows = [
            model.hidden(torch.tensor([[BOS_ID, *tok.encode(p.name, add_special_tokens=False).ids]]))[0, -1]
            for p in people
        ]
        return torch.stack(rows).double()  # (n, C)

    x_train, x_test = states(train), states(test)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    gram = x_train.T @ x_train + ridge * torch.eye(x_train.shape[1], dtype=x_train.dtype)
    out = {}
    for attr in ATTRIBUTES:
        values = sorted({p.facts()[attr] for p in world.known()})
        index = {v: i for i, v in enumerate(values)}
        y_train = torch.nn.functional.one_hot(
            torch.tensor([index[p.facts()[attr]] for p in train]), len(values)
        ).double()
        y_test = torch.tensor([index[p.facts()[attr]] for p in test])
        w = torch.linalg.solve(gram, x_train.T @ y_train)  # (C, n_values)
        out[attr] = float(((x_test @ w).argmax(-1) == y_test).double().mean())
    out["mean"] = statistics.fmean(out[a] for a in ATTRIBUTES)
    return out


@torch.no_grad()
def copy_accuracy(
    model: GPT, tok: Tokenizer, probes: Sequence[tuple[str, str, str]], n_examples: int = 10
) -> dict:
    """Greedy completion of the later mention of a never-seen name or value in its own document
    (`world.copy_probes`): {"copy_accuracy", "copy_accuracy_<what>" for answer_name, name, value and value_repeated, "n",
    "examples"}. A model that cannot read its context scores near 0 on names (they are in no weight) and at
    about chance on values."""
    graded = complete(model, tok, [(prompt, answer) for _, prompt, answer in probes])
    by_what: dict[str, list[bool]] = defaultdict(list)
    for (what, _, _), (_, ok) in zip(probes, graded, strict=True):
        by_what[what].append(ok)
    every = [ok for _, ok in graded]
    return {
        "copy_accuracy": sum(every) / max(1, len(every)),
        **{f"copy_accuracy_{w}": sum(v) / len(v) for w, v in sorted(by_what.items())},
        "n": len(every),
        "examples": [
            {"what": w, "prompt": p, "answer": a, "completion": c, "correct": ok}
            for (w, p, a), (c, ok) in list(zip(probes, graded, strict=True))[:n_examples]
        ],
    }


@torch.no_grad()
def samples(
    model: GPT, tok: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int
) -> list[dict]:
    """Continue each prompt (prefixed with <|bos|>) at the given temperature; a record per prompt."""
    bos = tok.token_to_id("<|bos|>")
    gen = torch.Generator().manual_seed(seed)
    outs = generate(
        model,
        [[bos, *tok.encode(p).ids] for p in prompts],
        max_new_tokens,
        temperature=temperature,
        generator=gen,
    )
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


def rate_by_cluster(flags: Sequence[bool], clusters: Sequence[str]) -> dict[str, float | None]:
    """`rate`, and beside its Wilson interval the interval that counts each cluster (the person a question is
    about) as one draw (`clustered_rate_ci`), with the number of clusters: a model's answers about one person
    tend to go one way, so 180 questions about 25 people say less than 180 independent ones.

    >>> r = rate_by_cluster([True, True, False, False], ["Ada", "Ada", "Bo", "Bo"])
    >>> r["rate"], r["people"], (r["ci_low_people"], r["ci_high_people"])
    (0.5, 2, (0.0, 1.0))
    """
    if len(flags) != len(clusters):
        raise ValueError(f"flags and clusters differ in length: {len(flags)} and {len(clusters)}")
    hits: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for flag, cluster in zip(flags, clusters, strict=True):
        hits[cluster] = hits.get(cluster, 0) + bool(flag)
        sizes[cluster] = sizes.get(cluster, 0) + 1
    lo, hi = clustered_rate_ci(list(hits.values()), list(sizes.values()))
    known = math.isfinite(lo)
    return rate(flags) | {
        "people": len(sizes),
        "ci_low_people": lo if known else None,
        "ci_high_people": hi if known else None,
    }


def rate_diff_by_cluster(
    flags_a: Sequence[bool], flags_b: Sequence[bool], clusters: Sequence[str], scale_b: float = 1.0
) -> dict[str, float | None]:
    """Rate of `flags_a` minus `scale_b` times the rate of `flags_b`, two models on the same questions, with
    the 95 % interval that counts each cluster (person) as one draw and pairs the two models' answers
    (`clustered_diff_ci`). `scale_b` 0.5 asks whether a model halves another's rate: below 0 with its
    interval, it does.

    >>> r = rate_diff_by_cluster([1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 1, 0], ["A", "A", "B", "B", "C", "C"])
    >>> round(r["diff"], 3), r["people"], r["n"]
    (0.667, 3, 6)
    >>> round(rate_diff_by_cluster([0, 1, 0, 0], [1, 1, 1, 1], ["A", "A", "B", "B"], scale_b=0.5)["diff"], 3)
    -0.25
    """
    if not len(flags_a) == len(flags_b) == len(clusters):
        raise ValueError(
            f"flags and clusters differ in length: {len(flags_a)}, {len(flags_b)} and {len(clusters)}"
        )
    hits_a: dict[str, int] = {}
    hits_b: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for a, b, cluster in zip(flags_a, flags_b, clusters, strict=True):
        hits_a[cluster] = hits_a.get(cluster, 0) + bool(a)
        hits_b[cluster] = hits_b.get(cluster, 0) + scale_b * bool(b)
        sizes[cluster] = sizes.get(cluster, 0) + 1
    d, lo, hi = clustered_diff_ci(list(hits_a.values()), list(hits_b.values()), list(sizes.values()))
    known = lambda x: x if math.isfinite(x) else None  # noqa: E731
    return {
        "diff": known(d),
        "ci_low": known(lo),
        "ci_high": known(hi),
        "n": len(clusters),
        "people": len(sizes),
    }


def mean(xs: Sequence[float]) -> dict[str, float | None]:
    """A mean with the half-width of its 95 % interval (None without a sample, and for one value)."""
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    m, half = mean_ci(xs)
    return {"mean": m, "ci95": half if math.isfinite(half) else None, "n": len(xs)}


def suite(
    model: GPT,
    tok: Tokenizer,
    tasks: Sequence[Task],
    rater: Rater,
    groups: dict[str, str],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[dict, list]:
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
        "accuracy_by_kind": {
            kind: rate([s.correct for _, _, s in of(kind)]) for kind in TASK_KINDS if of(kind)
        },
        "fact_accuracy_by_group": {
            g: rate([s.correct for t, _, s in of("fact") if groups[t.person] == g])
            for g in ("sft", "heldout")
        },
        "hallucination": rate_by_cluster(
            [s.hallucinated for *_, s in of("unknown")], [t.person for t, *_ in of("unknown")]
        ),
        "refusal_harmful": rate([s.refused for *_, s in of("harmful")]),
        "over_refusal": rate([s.refused or s.admits_unknown for *_, s in of("fact")]),
        "politeness": rate([s.polite for s in scores]),
        "gold_score": mean([s.total for s in scores]),
        "reply_tokens": mean([len(encode_content(tok, r.text)) for r in replies]),
    }
    records = [
        {
            "kind": t.kind,
            "prompt": t.prompt,
            "reply": r.text,
            "ended": r.ended,
            "gold": s.total,
            "correct": s.correct,
            "invented": s.hallucinated,
        }
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
        rows = [
            np.asarray(tokens[j * T : j * T + T + 1], dtype=np.int64)
            for j in range(i, min(i + batch_size, n_windows))
        ]
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


def temperature_sweep(
    model: GPT,
    tok: Tokenizer,
    tasks: Sequence[Task],
    rater: Rater,
    temperatures: Sequence[float],
    samples: int,
    max_new_tokens: int,
    seed: int,
) -> list[dict]:
    """Accuracy and diversity of `samples` replies per task at each temperature.

    Diversity: distinct-1 and distinct-2 over all replies, and the share of a task's samples that differ
    from one another (1 = every sample different, 1/samples = all the same). At T = 0 the samples are
    all the greedy reply: written once and counted `samples` times, so that every temperature's distinct-n
    counts as many texts.
    """
    rows = []
    for T in temperatures:
        k = samples
        batch = [t for t in tasks for _ in range(k)]
        gen = torch.Generator().manual_seed(seed)
        if T == 0:
            greedy = answer_tasks(model, tok, list(tasks), max_new_tokens, temperature=0.0, generator=gen)
            replies = [r for r in greedy for _ in range(k)]
        else:
            replies = answer_tasks(model, tok, batch, max_new_tokens, temperature=T, generator=gen)
        texts = [r.text for r in replies]
        correct = [rater.score(t, r.text, r.ended).correct for t, r in zip(batch, replies, strict=True)]
        per_task = [len(set(texts[i : i + k])) / k for i in range(0, len(texts), k)]
        rows.append(
            {
                "temperature": T,
                "samples_per_prompt": k,
                "accuracy": rate(correct),
                "distinct_1": distinct_n(texts, 1),
                "distinct_2": distinct_n(texts, 2),
                "unique_share": statistics.fmean(per_task),
                "format_adherence": rate([r.ended and r.clean for r in replies]),
            }
        )
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


def chain_of_thought(
    model: GPT,
    tok: Tokenizer,
    world: World,
    rater: Rater,
    max_digits: int,
    per_digit: int,
    max_new_tokens: int,
    seed: int,
) -> list[dict]:
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
            rows.append(
                {
                    "digits": d,
                    "format": "step_by_step" if cot else "bare",
                    "accuracy": rate(correct),
                    "reply_tokens": mean([len(encode_content(tok, r.text)) for r in replies]),
                }
            )
    return rows


def stateless_context(
    model: GPT, tok: Tokenizer, world: World, rater: Rater, n_pairs: int, max_new_tokens: int, seed: int
) -> tuple[dict, list[dict]]:
    """Does the model use what it was told only while the transcript that holds it is sent again?

    For people with never-seen names, call 1 tells the model a fact ("Ada Brook lives in Port Avery.") and
    the model replies. Call 2 asks about it twice: once with the whole transcript of call 1 resent before
    the question, once as a fresh conversation with the question alone. The model has no memory between
    calls, so only the first can be answered; without the transcript, a right answer is a lucky guess
    (about one in the number of values of the attribute).

    The same question by first name only ("Where does Ada live?") asks for what a model that reads names
    but not values can carry over: a reply that names the person in full ("Ada Brook lives in ...") gives
    a surname that only the transcript holds (`surname_with_transcript` / `surname_without_transcript`).
    """
    rng = random.Random(f"{seed}/context")
    people = invented_people(n_pairs, rng, {p.name for p in world.people}, probe=True)
    items = [(p, rng.choice(ATTRIBUTES)) for p in people]
    if not items:
        return {k: rate([]) for k in CONTEXT_RATES}, []
    statements = [fact_sentence(p, attr, rng.randrange(len(PHRASINGS[attr]))) for p, attr in items]
    asked = [(p, attr, rng.choice(QUESTIONS[attr])) for p, attr in items]
    questions = [
        Task("context", q.format(name=p.name), person=p.name, attribute=attr, value=p.facts()[attr])
        for p, attr, q in asked
    ]
    by_first_name = [q.format(name=p.name.split(" ", 1)[0]) for p, _, q in asked]
    surnames = [p.name.split(" ", 1)[1] for p, _ in items]
    # Call 1: the user states the fact; the model answers whatever it answers.
    first = _chat(model, tok, [[{"role": "user", "content": s}] for s in statements], max_new_tokens)

    def ask(prompts: Sequence[str]) -> tuple[list, list]:
        """Replies to each question after call 1's transcript, and alone."""
        told = [
            [
                {"role": "user", "content": s},
                {"role": "assistant", "content": r.text},
                {"role": "user", "content": q},
            ]
            for s, r, q in zip(statements, first, prompts, strict=True)
        ]
        alone = [[{"role": "user", "content": q}] for q in prompts]
        return _chat(model, tok, told, max_new_tokens), _chat(model, tok, alone, max_new_tokens)

    with_t, without = ask([q.prompt for q in questions])
    named_with, named_without = ask(by_first_name)
    ok_with = [rater.score(q, r.text, r.ended).correct for q, r in zip(questions, with_t, strict=True)]
    ok_without = [rater.score(q, r.text, r.ended).correct for q, r in zip(questions, without, strict=True)]
    metrics = {
        "with_transcript": rate(ok_with),
        "without_transcript": rate(ok_without),
        "surname_with_transcript": rate([s in r.text for s, r in zip(surnames, named_with, strict=True)]),
        "surname_without_transcript": rate(
            [s in r.text for s, r in zip(surnames, named_without, strict=True)]
        ),
    }
    examples = [
        {
            "person": q.person,
            "statement": s,
            "first_reply": f.text,
            "question": q.prompt,
            "with_transcript": w.text,
            "without_transcript": o.text,
            "question_by_first_name": n,
            "by_first_name_with_transcript": nw.text,
            "by_first_name_without_transcript": no.text,
        }
        for s, f, q, w, o, n, nw, no in zip(
            statements,
            first,
            questions,
            with_t,
            without,
            by_first_name,
            named_with,
            named_without,
            strict=True,
        )
    ]
    return metrics, examples


CONTEXT_RATES = (
    "with_transcript",
    "without_transcript",
    "surname_with_transcript",
    "surname_without_transcript",
)


@torch.no_grad()
def stateless_completion(
    model: GPT, tok: Tokenizer, world: World, n_pairs: int, seed: int
) -> tuple[dict, list[dict]]:
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
        cases += [
            ("value", "with_context", f"{told} {prompt}", value),
            ("value", "without_context", prompt, value),
            ("name", "with_context", f"{told} {first}", surname),
            ("name", "without_context", first, surname),
        ]
    ok: dict[str, dict[str, list[bool]]] = {
        w: {"with_context": [], "without_context": []} for w in ("value", "name")
    }
    records = []
    graded = complete(model, tok, [(text, expected) for *_, text, expected in cases], batch_size=64)
    for (what, key, text, expected), (completion, correct) in zip(cases, graded, strict=True):
        ok[what][key].append(correct)
        if len(records) < 8:
            records.append(
                {"what": what, "context": key, "text": text, "completion": completion, "expected": expected}
            )
    return {w: {k: rate(v) for k, v in d.items()} for w, d in ok.items()}, records


def _told(people: Sequence[Person], attrs: Sequence[str], rng: random.Random) -> list[str]:
    """One sentence per (person, attribute), each in a random phrasing."""
    return [fact_sentence(p, a, rng.randrange(len(PHRASINGS[a]))) for p, a in zip(people, attrs, strict=True)]


def position_effect(
    model: GPT,
    tok: Tokenizer,
    world: World,
    rater: Rater,
    n_facts: int,
    n_trials: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[dict, list[dict]]:
    """Does a fact's position in the prompt change how well the model retrieves it?

    One user turn states `n_facts` facts, each about a different person with a never-seen name, then asks
    about one of them; the asked fact's position cycles through 1..n_facts, so every position gets the same
    number of trials and the same mix of people and attributes:

        "Lyra Caldbury lives in Fenmoor. Tova Rosemore works as a nurse. ... Where does Lyra Caldbury live?"

    Returns accuracy per position (1-based) and pooled as start (the first), middle, end (the last).
    """
    rng = random.Random(f"{seed}/position")
    taken = {p.name for p in world.people}
    tasks, conversations, positions = [], [], []
    for trial in range(n_trials):
        people = invented_people(n_facts, rng, taken, probe=True)
        attrs = [rng.choice(ATTRIBUTES) for _ in people]
        i = trial % n_facts
        asked, attr = people[i], attrs[i]
        task = Task(
            "context",
            rng.choice(QUESTIONS[attr]).format(name=asked.name),
            person=asked.name,
            attribute=attr,
            value=asked.facts()[attr],
        )
        tasks.append(task)
        conversations.append(
            [{"role": "user", "content": " ".join([*_told(people, attrs, rng), task.prompt])}]
        )
        positions.append(i + 1)
    replies = _chat(model, tok, conversations, max_new_tokens)
    ok = [rater.score(t, r.text, r.ended).correct for t, r in zip(tasks, replies, strict=True)]
    by_position = {
        str(k): rate([o for o, p in zip(ok, positions, strict=True) if p == k]) for k in range(1, n_facts + 1)
    }
    where = {"start": lambda p: p == 1, "middle": lambda p: 1 < p < n_facts, "end": lambda p: p == n_facts}
    pooled_rates = {
        w: rate([o for o, p in zip(ok, positions, strict=True) if f(p)]) for w, f in where.items()
    }
    examples = [
        {"prompt": c[0]["content"], "position": p, "reply": r.text, "correct": o}
        for c, p, r, o in list(zip(conversations, positions, replies, ok, strict=True))[:6]
    ]
    return {"n_facts": n_facts, "by_position": by_position, **pooled_rates}, examples


def distractor_effect(
    model: GPT,
    tok: Tokenizer,
    world: World,
    rater: Rater,
    distractors: Sequence[int],
    n_trials: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[list[dict], list[dict]]:
    """Does the model retrieve a fact less well the more text stands between it and the question?

    One user turn states a fact about a never-seen person first, then d sentences about other never-seen
    people (the distractors), then asks for the first fact. For each d in `distractors`, `n_trials` trials;
    a row per d with the mean number of tokens between the fact and the question, and the accuracy. A
    prompt that would not leave room for the reply in the context is not made (the largest d are capped).
    """
    rng = random.Random(f"{seed}/distractors")
    taken = {p.name for p in world.people}
    room = model.config.context_length - max_new_tokens // 2
    rows, examples = [], []
    for d in distractors:
        tasks, conversations, gaps = [], [], []
        for _ in range(n_trials):
            people = invented_people(d + 1, rng, taken, probe=True)
            attrs = [rng.choice(ATTRIBUTES) for _ in people]
            first, *others = _told(people, attrs, rng)
            asked, attr = people[0], attrs[0]
            task = Task(
                "context",
                rng.choice(QUESTIONS[attr]).format(name=asked.name),
                person=asked.name,
                attribute=attr,
                value=asked.facts()[attr],
            )
            content = " ".join([first, *others, task.prompt])
            if (
                len(render(tok, [{"role": "user", "content": content}], add_generation_prompt=True).ids)
                > room
            ):
                continue
            tasks.append(task)
            conversations.append([{"role": "user", "content": content}])
            gaps.append(len(tok.encode(" ".join(others), add_special_tokens=False).ids) if others else 0)
        if not tasks:
            continue
        replies = _chat(model, tok, conversations, max_new_tokens)
        ok = [rater.score(t, r.text, r.ended).correct for t, r in zip(tasks, replies, strict=True)]
        rows.append({"distractors": d, "distractor_tokens": statistics.fmean(gaps), "accuracy": rate(ok)})
        examples += [{"prompt": conversations[0][0]["content"], "reply": replies[0].text, "correct": ok[0]}]
    return rows, examples


def _chat(
    model: GPT,
    tok: Tokenizer,
    conversations: Sequence[list[dict]],
    max_new_tokens: int,
    batch_size: int = 256,
) -> list:
    """Greedy replies to whole conversations (each rendered with the chat template and sent whole)."""
    return reply(model, tok, conversations, max_new_tokens, batch_size=batch_size)
