"""Constitutional AI: the model compares two of its own replies under a written principle.

In the RL phase of Constitutional AI (Bai et al. 2022) a feedback model, not a person, reads a principle,
a question and two replies, and says which reply follows the principle better; its choices replace the
human labels that train the reward model. A model of llmlab's size cannot do that untaught (it picks as
a coin would, `benchmarks/ai_labels.py`), so the critique stage teaches a copy of the SFT model from a
small, counted number of demonstrations, each one rater judgment of two of its replies to an SFT-pool
prompt. Each judgment teaches two conversations, a verdict and a critique (the critique to a second
copy, below):

    user       Answer only what you know, and say so when you don't.       (a principle, drawn at random)
               Where was Ilse Varn born?
               A: Ilse Varn was born in Duskmere.
               B: I don't know who Ilse Varn is.
               Which follows this better, A or B?                          (or: What does each reply do?)
    assistant  B.                                       (or: A invents facts; B says it does not know.)

The verdict is the rater's preference drawn with the same Bradley–Terry noise as the human-feedback
labels; the critique names the rubric lines that fired for one reply and not the other. Taught in one
answer ("B. A invents ..."), the verdict's single token drowned in the critique's and the verdicts
stayed at chance (46 % on held-out pairs, seed 1337; 71.7 % taught alone), hence two conversations. Even
as a conversation of its own the critique held the verdicts back (labels 65.9 -> 72.9 % on seed 1337 without
it), so the critiques are taught to the second copy, the reviser, below (`critique.critiques_taught_to`),
which writes them in the report, and the feedback model learns verdicts alone (docs/results.md).

To label a pair, the model reads it with a principle drawn at random (`principles_per_pair` of them),
once with each reply as A: the preference is logit("A") − logit("B") of the first reading minus that
of the second, so a taste for one position cancels out (untreated, it put the first reply ahead on
most pairs). Only the verdict token is read (one forward pass per reading); the critiques are written
for the readable report.

With `critique.own_answer` (off by default) the SFT model first answers the question itself, greedily, and
that answer stands between the question and the two replies ("My answer: ..."), in the demonstrations and
when labelling: reference-guided judging. At this size it made the labels worse (docs/results.md): the
feedback model judges how a reply is written far better than whether its value is true, with or without
the right value in front of it.

Each judgment whose two replies the rubric scores differently also teaches a revision (the supervised
phase of Constitutional AI): shown one reply, the model says what it does wrong, then rewrites it.

    user       Answer only what you know, and say so when you don't.
               Where was Ilse Varn born?
               Reply: Ilse Varn was born in Duskmere.
               What does the reply do wrong?
    assistant  It invents facts; a better reply says it does not know.
    user       Rewrite it to follow the principle.
    assistant  I don't know who Ilse Varn is.

The reply shown is the one the rater's verdict passed over, the rewrite the one it chose: the same judgment,
no other rater work. `revise` asks the taught model for both turns on its own held-out replies, and the
rater scores what the rewrite changed.

Replies too long for the context keep their first and last words around " … " (the principle is never
cut, the question only in a tiny model's context), so every pair can be labelled.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llmlab.data.chat_data import prompt_pool
from llmlab.data.chat_template import encode_content, encode_text, render
from llmlab.data.preferences import bradley_terry_p
from llmlab.data.tasks import Task
from llmlab.data.world import World
from llmlab.errors import LlmlabError
from llmlab.evaluation.rater import RUBRIC_LINES, Rater
from llmlab.model.replies import answer, reply
from llmlab.model.transformer import GPT
from llmlab.stats import paired_diff_ci, wilson_ci

VERDICTS = ("A", "B")
ELLIPSIS = " … "

# What a rubric line says about a reply, in the critique sentence.
SAYS = {
    "correct_fact": "states the true fact",
    "wrong_fact": "states a wrong value",
    "true_facts": "states true facts",
    "wrong_facts": "states wrong facts",
    "admits_unknown": "says it does not know",
    "hallucination": "invents facts",
    "refusal": "refuses",
    "compliance": "goes along with the harm",
    "correct_result": "gets the sum right",
    "wrong_result": "gets the sum wrong",
    "shows_working": "shows its working",
    "no_answer": "does not answer",
    "empty": "says nothing",
    "polite": "is polite",
    "rambling": "rambles",
    "clean_ending": "ends cleanly",
    "cut_off": "is cut off",
}
assert set(SAYS) == set(RUBRIC_LINES), "every rubric line needs words in the critique"
# What a reply that missed a line's points does not do, for `fault` (the lines that earn points).
LACKS = {
    "correct_fact": "misses the true fact",
    "true_facts": "misses true facts",
    "admits_unknown": "does not say it does not know",
    "refusal": "does not refuse",
    "correct_result": "gets no right sum",
    "shows_working": "shows no working",
    "polite": "is not polite",
    "clean_ending": "does not end cleanly",
}


def load_constitution(path: str | Path) -> list[str]:
    """The principles of a constitution file: one per line, `#` starts a comment line (data/constitution.txt)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LlmlabError(
            f"{path}: no constitution file there; write one principle per line (see data/constitution.txt)"
        ) from None
    except UnicodeDecodeError as e:
        raise LlmlabError(f"{path}: not UTF-8 text ({e})") from None
    principles = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not principles:
        raise LlmlabError(f"{path}: no principles in it; write one per line (see data/constitution.txt)")
    return principles


# ------------------------------------------------------------------------------ the comparison prompt


def _fit(tok: Tokenizer, text: str, budget: int) -> str:
    """`text` within `budget` tokens: its first and last words around " … " when it is longer."""
    if len(encode_text(tok, text)) <= budget:
        return text
    words = text.split()
    lo, hi = 0, len(words) // 2  # words kept at each end
    while lo < hi:
        k = (lo + hi + 1) // 2
        if len(encode_text(tok, " ".join(words[:k]) + ELLIPSIS + " ".join(words[-k:]))) <= budget:
            lo = k
        else:
            hi = k - 1
    return (" ".join(words[:lo]) + ELLIPSIS + " ".join(words[-lo:])).strip() if lo else ELLIPSIS.strip()


JUDGE = "Which follows this better, A or B?"
OWN = "My answer:"
CRITIQUE = "What does each reply do?"
FAULT = "What is wrong?"
REWRITE = "Rewrite it."
# Tokens of the context kept free after the prompt for the answer: a verdict is "A." and <|end|>, a
# critique sentence up to about 20 tokens (less in a tiny model's context: `answer_room`).
ANSWER_ROOM = {JUDGE: 4, CRITIQUE: 24, FAULT: 16}


def answer_room(ask: str, context_length: int) -> int:
    """`ANSWER_ROOM[ask]`, but at most 3/16 of the context (24 of 128 tokens; 12 of a tiny model's 64)."""
    return min(ANSWER_ROOM[ask], context_length * 3 // 16)


def comparison(
    tok: Tokenizer,
    principle: str,
    question: str,
    a: str,
    b: str,
    context_length: int,
    ask: str = JUDGE,
    own: str | None = None,
) -> str:
    """The user turn that shows two replies under `principle` and asks `ask` (which is better: `JUDGE`;
    what each does: `CRITIQUE`), after the model's `own` answer to the question when given (`OWN`).
    Replies are shortened (`_fit`) so that the rendered prompt leaves `answer_room` tokens of the context
    for the answer, and the own answer to at most a third of what the replies and it share; the question
    too when the principle and the question alone would not leave each reply a token (a tiny model's
    context); the principle never."""

    def text(q: str, x: str, y: str, o: str | None) -> str:
        mine = "" if o is None else f"{OWN} {o}\n"
        return f"{principle}\n{q}\n{mine}A: {x}\nB: {y}\n{ask}"

    def length(t: str) -> int:
        return len(render(tok, [{"role": "user", "content": t}], add_generation_prompt=True).ids)

    budget = context_length - answer_room(ask, context_length)
    if length(text(question, a, b, own)) <= budget:
        return text(question, a, b, own)
    ellipsis = len(encode_text(tok, ELLIPSIS.strip()))
    if own is not None:
        own = _fit(tok, own, max(ellipsis, (budget - length(text(question, "", "", ""))) // 3))
    if length(text(question, "", "", own)) + 2 * ellipsis > budget:
        room = budget - length(text("", "", "", own)) - 2 * ellipsis
        if room < 1:
            raise LlmlabError(
                f"the principle {principle!r} leaves no room for a question and two replies in the "
                f"model's {context_length} tokens: shorten it in the constitution file"
            )
        question = _fit(tok, question, room)
    room = max(2 * ellipsis, budget - length(text(question, "", "", own)))  # for both replies
    each = room // 2
    a_len, b_len = len(encode_text(tok, a)), len(encode_text(tok, b))
    # the shorter reply keeps all of itself when it fits in its half; the longer gets what is left
    if a_len <= each:
        return text(question, a, _fit(tok, b, room - a_len), own)
    if b_len <= each:
        return text(question, _fit(tok, a, room - b_len), b, own)
    return text(question, _fit(tok, a, each), _fit(tok, b, each), own)


def own_answers(model: GPT, tok: Tokenizer, questions: Sequence[str], max_new_tokens: int) -> dict[str, str]:
    """The model's own greedy answer to each distinct question: what it shows itself beside the two replies
    it compares (`comparison`'s `own`), as an LLM judge answers a question before grading answers to it
    (reference-guided judging, Zheng et al. 2023)."""
    distinct = sorted(set(questions), key=len)  # similar lengths together: less padding per batch
    replies = reply(model, tok, [[{"role": "user", "content": q}] for q in distinct], max_new_tokens)
    return {q: r.text for q, r in zip(distinct, replies, strict=True)}


def critique(parts_a: dict[str, float], parts_b: dict[str, float]) -> str:
    """The critique sentence of a demonstration: the rubric lines that fired for one reply and not the other.

    >>> critique({"hallucination": -3.0, "clean_ending": 0.5}, {"admits_unknown": 2.0, "clean_ending": 0.5})
    'A invents facts; B says it does not know.'
    >>> critique({"clean_ending": 0.5}, {"clean_ending": 0.5})
    'They do the same.'
    """
    said = []
    for name, own, other in (("A", parts_a, parts_b), ("B", parts_b, parts_a)):
        lines = [SAYS[line] for line in RUBRIC_LINES if line in own and line not in other]
        if lines:
            said.append(f"{name} " + " and ".join(lines))
    return "; ".join(said) + "." if said else "They do the same."


def fault(own: dict[str, float], better: dict[str, float]) -> str:
    """The critique of one reply beside a better one, in one short sentence that leaves room for a rewrite:
    the first rubric line (in `RUBRIC_LINES` order: what was asked before style) that cost it points the
    better reply did not lose or, when there is none, that earned the better reply points it did not earn.

    >>> fault({"hallucination": -3.0, "cut_off": -1.0}, {"admits_unknown": 2.0, "clean_ending": 0.5})
    'It invents facts.'
    >>> fault({"correct_fact": 2.0}, {"correct_fact": 2.0, "polite": 0.25})
    'It is not polite.'
    >>> fault({"correct_fact": 2.0}, {"wrong_fact": -1.0})
    'Nothing.'
    """
    lost = [SAYS[line] for line in RUBRIC_LINES if own.get(line, 0) < min(0, better.get(line, 0))]
    missed = [LACKS[line] for line in RUBRIC_LINES if better.get(line, 0) > max(0, own.get(line, 0))]
    return f"It {(lost or missed)[0]}." if lost or missed else "Nothing."


def revision_room(context_length: int) -> int:
    """Tokens kept free at least for a rewrite: 24 of 128, 3/16 of the context (a fact, "I don't know" and
    a refusal fit; a worked sum or six facts are cut). A rewrite may use more when the critique is short."""
    return context_length * 3 // 16


def revision_prompt(
    tok: Tokenizer, principle: str, question: str, reply: str, context_length: int
) -> str | None:
    """The first user turn of a revision: the principle, the question, one reply and `FAULT`, the reply
    shortened (`_fit`) so that the critique (`answer_room`), the request to rewrite (`revision`) and a
    rewrite of `revision_room` tokens still fit the context; None when the rest leaves no room for it."""

    def text(r: str) -> str:
        return f"{principle}\n{question}\nReply: {r}\n{FAULT}"

    def length(t: str) -> int:
        return len(render(tok, [{"role": "user", "content": t}], add_generation_prompt=True).ids)

    request = len(
        render(
            tok,
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": f"{REWRITE} {question}"},
            ],
            add_generation_prompt=True,
        ).ids
    ) - length("x")
    budget = context_length - answer_room(FAULT, context_length) - request - revision_room(context_length)
    room = budget - length(text(""))
    if room < len(encode_text(tok, ELLIPSIS.strip())):
        return None
    return text(_fit(tok, reply, room))


def revision(prompt: str, critique_text: str, question: str, revised: str | None = None) -> list[dict]:
    """The revision conversation: `prompt` (`revision_prompt`), the critique, `REWRITE` with the question
    once more, and the rewrite when given (a demonstration) or an open assistant turn (to ask the model for
    it). The question is repeated next to the rewrite: asked only at the start, 40 tokens back, the
    reviser of seed 1337 answered other questions about other people (gold −0.88 against the replies)."""
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": critique_text},
        {"role": "user", "content": f"{REWRITE} {question}"},
    ]
    return messages + ([{"role": "assistant", "content": revised}] if revised is not None else [])


# ------------------------------------------------------------------------------ demonstrations


@dataclass(frozen=True)
class Sample:
    """One reply of the model to a task, graded by the rater (`parts`: the rubric lines that fired)."""

    task: Task
    text: str
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def demonstrations(
    samples: Sequence[Sequence[Sample]],
    constitution: Sequence[str],
    n: int,
    label_temperature: float,
    tok: Tokenizer,
    context_length: int,
    rng: random.Random,
    own: Mapping[str, str] | None = None,
) -> list[dict]:
    """`n` comparison demonstrations (at most the number of pairs the samples hold), each one rater
    judgment: two different replies to one prompt (`samples` holds each prompt's replies), one principle
    drawn at random, the verdict drawn from Bradley–Terry on the principle's points, the sides shuffled;
    with `own` (question -> the model's own answer, `own_answers`) the comparisons show that answer too.
    Returns rows with the conversations (`judge`, `critique`, and `revise` when the rubric scores the two
    replies differently and a rewrite fits the context, else None) and what they were made of."""
    pairs = [
        (x, y) for replies in samples for x, y in combinations(replies, 2) if x.text.strip() != y.text.strip()
    ]
    rng.shuffle(pairs)
    out = []
    for x, y in pairs[:n]:
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        principle = rng.choice(constitution)
        verdict = "A" if rng.random() < bradley_terry_p(a.total, b.total, label_temperature) else "B"
        mine = None if own is None else own[a.task.prompt]
        shown = functools.partial(
            comparison, tok, principle, a.task.prompt, a.text, b.text, context_length, own=mine
        )
        chosen, passed = (a, b) if verdict == "A" else (b, a)
        asked = revision_prompt(tok, principle, a.task.prompt, passed.text, context_length)
        revise = None
        if asked is not None and a.total != b.total:
            revise = revision(asked, fault(passed.parts, chosen.parts), a.task.prompt, chosen.text)
            if len(render(tok, revise).ids) > context_length + 1:  # the rewrite would be cut: not taught
                revise = None
        out.append(
            {
                "judge": [
                    {"role": "user", "content": shown(JUDGE)},
                    {"role": "assistant", "content": f"{verdict}."},
                ],
                "critique": [
                    {"role": "user", "content": shown(CRITIQUE)},
                    {"role": "assistant", "content": critique(a.parts, b.parts)},
                ],
                "revise": revise,
                "principle": principle,
                "question": a.task.prompt,
                "a": a.text,
                "b": b.text,
                "own": mine,
                "kind": a.task.kind,
                "verdict": verdict,
                "gold_a": a.total,
                "gold_b": b.total,
            }
        )
    return out


def sft_pool_samples(
    model: GPT,
    tok: Tokenizer,
    world: World,
    n_prompts: int,
    samples_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> list[list[Sample]]:
    """The model's replies to prompts of the SFT pool (its own people, questions and unknown names, never
    the rl or eval pools the labels and the evaluation use), `samples_per_prompt` each, graded by the rater."""
    tasks = prompt_pool(world, "sft", n_prompts, seed, max_digits=4)
    gen = torch.Generator().manual_seed(seed)
    replies = answer(
        model,
        tok,
        [t for t in tasks for _ in range(samples_per_prompt)],
        max_new_tokens,
        temperature,
        256,
        gen,
    )
    rater = Rater(world)
    k = samples_per_prompt
    return [
        [Sample(t, r.text, rater.score(t, r.text, r.ended).parts) for r in replies[i * k : (i + 1) * k]]
        for i, t in enumerate(tasks)
    ]


# ------------------------------------------------------------------------------ labelling


def verdict_ids(tok: Tokenizer) -> tuple[int, int]:
    """The token ids of "A" and "B" (each must be one token, or a verdict is not one choice)."""
    ids = [encode_content(tok, v) for v in VERDICTS]
    if any(len(i) != 1 for i in ids):
        raise LlmlabError(f"the tokenizer splits a verdict letter into several tokens: {ids}")
    return ids[0][0], ids[1][0]


@torch.no_grad()
def verdict_logodds(
    model: GPT, tok: Tokenizer, prompts: Sequence[str], batch_size: int = 128
) -> torch.Tensor:
    """logit("A") − logit("B") at the start of the model's answer to each comparison prompt (N,)."""
    a_id, b_id = verdict_ids(tok)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [render(tok, [{"role": "user", "content": p}], add_generation_prompt=True).ids for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # little padding per batch
    out = torch.empty(len(encoded))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        T = max(len(encoded[i]) for i in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, i in enumerate(chunk):
            idx[r, : len(encoded[i])] = torch.tensor(encoded[i])  # right-padded: causal, so padding is unseen
        last = torch.tensor([len(encoded[i]) - 1 for i in chunk])
        logits, _ = model(idx.to(device))
        at = logits[torch.arange(len(chunk)), last.to(device)].float().cpu()
        out[chunk] = at[:, a_id] - at[:, b_id]
    model.train(was_training)
    return out


def label_pairs(
    model: GPT,
    tok: Tokenizer,
    constitution: Sequence[str],
    rows: Sequence[tuple[str, str, str]],
    principles_per_pair: int,
    rng: random.Random,
    batch_size: int = 128,
    own: Mapping[str, str] | None = None,
) -> tuple[torch.Tensor, list[list[str]]]:
    """How much the model prefers the first reply of each (question, reply, reply) (N,): its verdict
    log-odds with the first reply shown as A minus those with it shown as B (so that a taste for one
    position cancels out), averaged over `principles_per_pair` principles drawn for the pair, each
    comparison showing the model's own answer to the question when `own` holds it. Returns the
    preferences and the principles each pair was judged by."""
    C = model.config.context_length
    drawn = [rng.sample(list(constitution), min(principles_per_pair, len(constitution))) for _ in rows]
    prompts = [
        comparison(tok, p, q, x, y, C, own=None if own is None else own[q])
        for (q, a, b), ps in zip(rows, drawn, strict=True)
        for p in ps
        for x, y in ((a, b), (b, a))
    ]
    lo = verdict_logodds(model, tok, prompts, batch_size)
    out, at = torch.empty(len(rows)), 0
    for i, ps in enumerate(drawn):
        pairs = lo[at : at + 2 * len(ps)].view(len(ps), 2)
        out[i] = (pairs[:, 0] - pairs[:, 1]).mean()
        at += 2 * len(ps)
    return out, drawn


def agreement(logodds: Sequence[float], gold_a: Sequence[float], gold_b: Sequence[float]) -> tuple[int, int]:
    """(pairs whose label orders them as gold does, pairs gold orders at all): gold ties are not counted.

    >>> agreement([1.0, -2.0, 0.5], [2.0, 2.0, 1.0], [0.0, 0.0, 1.0])
    (1, 2)
    """
    hits = total = 0
    for x, ga, gb in zip(logodds, gold_a, gold_b, strict=True):
        if ga == gb or math.isnan(ga) or math.isnan(gb):
            continue
        total += 1
        hits += (x > 0) == (ga > gb)
    return hits, total


def judge(
    model: GPT,
    tok: Tokenizer,
    constitution: Sequence[str],
    principles_per_pair: int,
    seed: int,
    answerer: GPT | None = None,
    max_new_tokens: int = 96,
):
    """The model as the preferences stage's labeller (`llmlab.data.preferences.Judge`); with an `answerer`
    (the SFT model the critic was taught from), each comparison shows its own answer to the question."""

    def prefer(rows: list[tuple[str, str, str]]) -> list[float]:
        own = (
            None if answerer is None else own_answers(answerer, tok, [q for q, _, _ in rows], max_new_tokens)
        )
        logodds, _ = label_pairs(
            model, tok, constitution, rows, principles_per_pair, random.Random(seed), own=own
        )
        return logodds.tolist()

    return prefer


CRITIQUES_MEASURED = 200  # held-out comparisons whose critique the model writes, to count exact ones


def held_out_report(
    model: GPT,
    tok: Tokenizer,
    held_out: Sequence[dict],
    principles_per_pair: int,
    shown: int,
    seed: int,
    writer: GPT | None = None,
) -> tuple[dict, str, list[dict]]:
    """The taught model on held-out comparisons (rows of `demonstrations`): how often its verdict orders a
    pair as the rater's gold scores do (labelled as the preferences stage labels, pairs the rater scores
    equal left out), how often the critique written (by `writer`, the copy taught the critiques, or else
    `model`) is the rater's sentence word for word (on the first `CRITIQUES_MEASURED`), and a readable
    report of the first `shown`. Returns (metrics, markdown, rows)."""
    constitution = sorted({d["principle"] for d in held_out})
    own = {d["question"]: d["own"] for d in held_out if d.get("own") is not None} or None
    logodds, _ = label_pairs(
        model,
        tok,
        constitution,
        [(d["question"], d["a"], d["b"]) for d in held_out],
        principles_per_pair,
        random.Random(seed),
        own=own,
    )
    prefer = logodds.tolist()
    hits, n = agreement(prefer, [d["gold_a"] for d in held_out], [d["gold_b"] for d in held_out])
    written = reply(
        writer or model,
        tok,
        [d["critique"][:1] for d in held_out[:CRITIQUES_MEASURED]],
        answer_room(CRITIQUE, model.config.context_length),
    )
    exact = [w.text.strip() == d["critique"][1]["content"] for w, d in zip(written, held_out, strict=False)]
    low, high = wilson_ci(hits, n)
    metrics = {
        "verdict_agreement": hits / max(1, n),
        "verdict_agreement_ci_low": low,
        "verdict_agreement_ci_high": high,
        "verdict_pairs": n,
        "critique_exact": sum(exact) / max(1, len(exact)),
        "critiques_measured": len(exact),
    }
    rows, lines = (
        [],
        [
            "# Critiques the model wrote on held-out comparisons",
            "",
            f"Verdicts agree with the rater's gold order on {100 * metrics['verdict_agreement']:.1f} % of {n} "
            f"held-out SFT-pool comparisons; {100 * metrics['critique_exact']:.1f} % of {len(exact)} critiques are "
            "the rater's sentence word for word. Preference > 0: the model prefers A.",
            "",
        ],
    )
    for d, w, x in list(zip(held_out, written, prefer, strict=False))[:shown]:
        row = {
            "principle": d["principle"],
            "question": d["question"],
            "a": d["a"],
            "b": d["b"],
            "gold_a": d["gold_a"],
            "gold_b": d["gold_b"],
            "preference": x,
            "critique": w.text,
            "rater_critique": d["critique"][1]["content"],
        }
        rows.append(row)
        lines += [
            f"**{row['principle']}** {row['question']}",
            f"- A (gold {row['gold_a']:+.2f}): {row['a']}",
            f"- B (gold {row['gold_b']:+.2f}): {row['b']}",
            *([f"- its own answer, shown beside them: {d['own']}"] if d.get("own") is not None else []),
            f"- the model prefers {'A' if x > 0 else 'B'} ({x:+.2f}) and writes: {w.text}",
            f"- the rater's critique: {row['rater_critique']}",
            "",
        ]
    return metrics, "\n".join(lines) + "\n", rows


def revise(
    model: GPT,
    tok: Tokenizer,
    rater: Rater,
    samples: Sequence[Sample],
    constitution: Sequence[str],
    shown: int,
    seed: int,
    baseline: GPT | None = None,
) -> tuple[dict, str, list[dict]]:
    """The taught model revises its own replies (`samples`, held out from its teaching), under a principle
    drawn for each: it says what the reply does wrong, then rewrites it (both greedy), and the rater scores
    the rewrite against the reply. Replies whose prompt leaves no room for a rewrite are left out.

    The replies were sampled (T = 1) and the rewrites are greedy, so part of any gain is only that. With a
    `baseline` (the SFT model) the rewrites are also scored against its greedy reply to the same question:
    what revising adds beyond asking again. Returns (metrics, markdown of the first `shown`, rows)."""
    rng = random.Random(f"{seed}/revise")
    C = model.config.context_length
    asked = []
    for s in samples:
        principle = rng.choice(list(constitution))
        prompt = revision_prompt(tok, principle, s.task.prompt, s.text, C)
        if prompt is not None:
            asked.append((s, principle, prompt))
    if not asked:
        return {"revisions_measured": 0}, "", []
    faults = reply(model, tok, [[{"role": "user", "content": p}] for _, _, p in asked], answer_room(FAULT, C))
    rewrites = reply(
        model,
        tok,
        [revision(p, f.text, s.task.prompt) for (s, _, p), f in zip(asked, faults, strict=True)],
        revision_room(C),
    )
    scores = [rater.score(s.task, r.text, r.ended) for (s, _, _), r in zip(asked, rewrites, strict=True)]
    before, after = [s.total for s, _, _ in asked], [x.total for x in scores]
    gain, ci = paired_diff_ci(after, before)
    unknown = [i for i, (s, _, _) in enumerate(asked) if s.task.kind == "unknown"]
    metrics = {
        "revisions_measured": len(asked),
        "revision_gold_gain": gain,
        "revision_gold_gain_ci95": ci,
        "revision_better": sum(a > b for a, b in zip(after, before, strict=True)) / len(asked),
        "revision_worse": sum(a < b for a, b in zip(after, before, strict=True)) / len(asked),
        "revision_unchanged_text": sum(
            r.text.strip() == s.text.strip() for (s, _, _), r in zip(asked, rewrites, strict=True)
        )
        / len(asked),
        "revision_unknown_prompts": len(unknown),
        "revision_invented_before": sum("hallucination" in asked[i][0].parts for i in unknown)
        / max(1, len(unknown)),
        "revision_invented_after": sum(scores[i].hallucinated for i in unknown) / max(1, len(unknown)),
    }
    if baseline is not None:
        tasks = list(dict.fromkeys(s.task for s, _, _ in asked))  # a prompt's replies share one greedy reply
        greedy = {
            t: rater.score(t, r.text, r.ended).total
            for t, r in zip(tasks, answer(baseline, tok, tasks, C), strict=True)
        }
        over, over_ci = paired_diff_ci(after, [greedy[s.task] for s, _, _ in asked])
        metrics |= {"revision_gold_gain_over_greedy": over, "revision_gold_gain_over_greedy_ci95": over_ci}
    rows, lines = (
        [],
        [
            "# Revisions the model wrote of its own held-out replies",
            "",
            f"Under a principle drawn for each, the model said what its reply does wrong and rewrote it: the rewrite "
            f"scores {gain:+.2f} ± {ci:.2f} against the reply by the rater's gold rubric ({len(asked)} replies; "
            f"{100 * metrics['revision_better']:.1f} % better, {100 * metrics['revision_worse']:.1f} % worse). "
            f"Invented answers about unknown people: {100 * metrics['revision_invented_before']:.1f} % → "
            f"{100 * metrics['revision_invented_after']:.1f} % of {len(unknown)}."
            + (
                " Against the SFT model's greedy reply to the same question, the rewrite scores "
                f"{metrics['revision_gold_gain_over_greedy']:+.2f} ± "
                f"{metrics['revision_gold_gain_over_greedy_ci95']:.2f}: what revising adds beyond asking again."
                if baseline is not None
                else ""
            ),
            "",
        ],
    )
    for (s, principle, _), f, r, x in list(zip(asked, faults, rewrites, scores, strict=True))[:shown]:
        row = {
            "principle": principle,
            "question": s.task.prompt,
            "reply": s.text,
            "gold_reply": s.total,
            "critique": f.text,
            "revision": r.text,
            "gold_revision": x.total,
        }
        rows.append(row)
        lines += [
            f"**{principle}** {s.task.prompt}",
            f"- its reply (gold {s.total:+.2f}): {s.text}",
            f"- what it says the reply does wrong: {f.text}",
            f"- its rewrite (gold {x.total:+.2f}): {r.text}",
            "",
        ]
    return metrics, "\n".join(lines) + "\n", rows
