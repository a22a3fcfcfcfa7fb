"""Measurements of a trained model: fact recall and samples.

Fact recall asks the base model to complete the canonical statement of each fact ("Mara Quill lives
in") greedily, and counts a hit when the completion starts with the true value. A base model has no
question-answering format yet, but if pretraining stored the fact in the weights, the continuation of
its own kind of sentence reveals it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from llmlab.generate import generate
from llmlab.model import GPT
from llmlab.world import Person, fact_prompts, grade_completion


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
