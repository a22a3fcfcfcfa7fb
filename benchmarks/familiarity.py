"""Where in its reply does the chat model know whom it does not know? For people it read about (SFT people,
held-out people) and people it never saw (the world's unknown people and 200 names made up here):

1. *At the value*: the probability of its most likely next token after the reply's "X lives in" (the chat
   template, the question "Where does X live?"), the mean per group, and how well that one number tells
   held-out people from unknown ones (AUC).
2. *At the reply's first token*: a logistic-regression probe on the hidden state there, fitted on SFT
   people against the first half of the unknown and made-up names, its AUC on held-out people against the
   other half.

    python benchmarks/familiarity.py RUN [--model models/sft]

docs/results.md ("Saying so where the value would stand") quotes it: where the model can tell, that is where
an "I don't know" has to be decided (`sft.data.dont_know: at_value`).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmlab.data.chat_template import encode_text, render  # noqa: E402
from llmlab.data.tokenizer import load_tokenizer  # noqa: E402
from llmlab.data.world import World, invented_people  # noqa: E402
from llmlab.model.transformer import load_model  # noqa: E402

QUESTION = "Where does {name} live?"


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


@torch.no_grad()
def read(model, tok, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each name: (top-1 probability after "X lives in" in the reply, hidden state at the reply's start)."""
    top, first = [], []
    for name in names:
        prompt = render(
            tok, [{"role": "user", "content": QUESTION.format(name=name)}], add_generation_prompt=True
        )
        ids = torch.tensor([prompt.ids + encode_text(tok, f" {name} lives in")])
        logits = model(ids)[0][0, -1]
        top.append(logits.softmax(-1).max())
        first.append(model.hidden(ids[:, : len(prompt.ids)])[0, -1])
    return torch.stack(top), torch.stack(first)


def probe(x_train, y_train, x_test, steps: int = 500) -> torch.Tensor:
    """Logistic regression (standardised features, L2 1e-2), fitted with Adam; scores of x_test."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(x_train @ w + b, y_train)
            + 1e-2 * w.square().sum()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x_test @ w + b).detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a repository with a finished run")
    ap.add_argument("--model", default="models/sft", help="the model folder, relative to the run")
    args = ap.parse_args()
    torch.manual_seed(0)
    world = World.load(args.run / "data/corpus/world.json")
    model = load_model(args.run / args.model).eval()
    tok = load_tokenizer(args.run / "data/tokenizer/tokenizer.json")
    made_up = [p.name for p in invented_people(200, random.Random(0), {p.name for p in world.people})]
    groups = {g: [p.name for p in world.group(g)] for g in ("sft", "heldout", "unknown")} | {
        "made up": made_up
    }
    top, first = {}, {}
    for group, names in groups.items():
        top[group], first[group] = read(model, tok, names)

    print('| people | n | top-1 probability after "X lives in" (mean) |')
    print("|---|---|---|")
    for group in groups:
        print(f"| {group} | {len(groups[group])} | {top[group].mean():.2f} |")
    strangers = torch.cat([top["unknown"], top["made up"]])
    print(
        f"\nAt the value: held-out against unknown and made-up people, AUC {auc(top['heldout'], strangers):.2f}"
    )

    half_u, half_m = len(groups["unknown"]) // 2, len(made_up) // 2
    train_neg = torch.cat([first["unknown"][:half_u], first["made up"][:half_m]])
    test_neg = torch.cat([first["unknown"][half_u:], first["made up"][half_m:]])
    x_train = torch.cat([first["sft"], train_neg])
    y_train = torch.cat([torch.ones(len(first["sft"])), torch.zeros(len(train_neg))])
    scores = probe(x_train, y_train, torch.cat([first["heldout"], test_neg]))
    n_held = len(first["heldout"])
    print(
        f"At the reply's first token: a linear probe, held-out against unknown and made-up people it was not "
        f"fitted on, AUC {auc(scores[:n_held], scores[n_held:]):.2f}"
    )


if __name__ == "__main__":
    main()
