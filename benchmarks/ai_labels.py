"""Can the SFT model label preference pairs itself? A first measurement for Constitutional AI (issue 17).

In the RL phase of Constitutional AI (Bai et al. 2022) the model, not a person, compares two replies under
a written principle and says which is better; its choices replace human labels. Whether a model this small
can do that at all is the first question. This probe fine-tunes a copy of a finished run's SFT model on
`--demos` counted demonstrations (each costs one rater judgment): a principle, a question, two of the SFT
model's own replies from the run's training pairs, and the answer "A" or "B" for the one the gold rater
scores higher. It then asks the same of the run's held-out pairs and counts how often the model's choice
(the likelier of the two answer tokens) agrees with the gold ordering, before and after, by task kind,
beside the run's reward model on the same pairs.

    python benchmarks/ai_labels.py --run /tmp/seed1337/llmlab --demos 500 1000 2000 4000

Pairs whose prompt does not fit the model's context are left out (counted). Each demonstration count
trains its own copy for `--steps` steps of 32 from the same SFT weights. Not yet the pipeline's path: the
demonstrations are not taught by the sft stage, and no stage uses the labels.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reward_errors import pair_rewards  # noqa: E402
from llmlab.data.chat_template import encode_content, render  # noqa: E402
from llmlab.data.tokenizer import load_tokenizer  # noqa: E402
from llmlab.model.transformer import load_model  # noqa: E402
from llmlab.stats import wilson_ci  # noqa: E402
from llmlab.training.reward import load_reward_model  # noqa: E402

PRINCIPLE = "Answer only what you know, say so when you don't, and refuse to help harm anyone."


def comparison(tok, row: dict, a_first: bool) -> tuple[list[int], str]:
    """The prompt asking which of the pair's replies follows the principle better, and the gold answer."""
    question = json.loads(row["context"])[-1]["content"]
    better_first = row["gold_chosen"] > row["gold_rejected"]
    good, bad = (row["chosen"], row["rejected"]) if better_first else (row["rejected"], row["chosen"])
    first, second = (good, bad) if a_first else (bad, good)
    text = (
        f"Principle: {PRINCIPLE}\nQuestion: {question}\nReply A: {first}\nReply B: {second}\n"
        "Which reply follows the principle better?"
    )
    ids = render(tok, [{"role": "user", "content": text}], add_generation_prompt=True).ids
    return ids, "A" if a_first else "B"


def examples(tok, rows: list[dict], context: int, rng: random.Random) -> tuple[list[tuple], int]:
    out, left_out = [], 0
    for row in rows:
        ids, answer = comparison(tok, row, rng.random() < 0.5)
        if len(ids) < context:
            out.append((ids, answer, json.loads(row["task"])["kind"], row))
        else:
            left_out += 1
    return out, left_out


def batch(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and each row's last index (B,)."""
    idx = torch.zeros(len(items), max(len(i) for i, *_ in items), dtype=torch.long)
    for k, (ids, *_) in enumerate(items):
        idx[k, : len(ids)] = torch.tensor(ids)
    return idx, torch.tensor([len(ids) - 1 for ids, *_ in items])


@torch.no_grad()
def agreement(model, items: list[tuple], token: dict[str, int]) -> dict[str, dict]:
    """How often the likelier of "A" and "B" is the gold answer: overall and by task kind."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(items), 128):
        chunk = items[i : i + 128]
        idx, last = batch(chunk)
        logits, _ = model(idx)
        logits = logits[torch.arange(len(chunk)), last]
        says_a = logits[:, token["A"]] > logits[:, token["B"]]
        for (_, answer, kind, _), a in zip(chunk, says_a.tolist(), strict=True):
            hits[kind].append(a == (answer == "A"))
            hits["all"].append(a == (answer == "A"))
    out = {}
    for kind, h in sorted(hits.items()):
        lo, hi = wilson_ci(sum(h), len(h))
        out[kind] = {"n": len(h), "agreement": sum(h) / len(h), "ci_low": lo, "ci_high": hi}
    model.train()
    return out


def reward_model_agreement(run: Path, tok, rows: list[dict]) -> float:
    """The run's reward model on the same pairs: how often it scores the gold-better reply higher."""
    chosen, rejected = pair_rewards(load_reward_model(run / "models/reward"), tok, rows)
    gold = torch.tensor([r["gold_chosen"] > r["gold_rejected"] for r in rows])
    return float(((chosen > rejected) == gold).float().mean())


def measure(run: Path, demos: list[int], steps: int, seed: int = 0) -> dict:
    tok = load_tokenizer(run / "data/tokenizer/tokenizer.json")
    token = {}
    for letter in "AB":
        (token[letter],) = encode_content(tok, letter)  # one token each, or the probe would not be fair
    sft = load_model(run / "models/sft")
    context = sft.config.context_length
    rng = random.Random(seed)
    train_rows = pq.read_table(run / "data/preferences/train.parquet").to_pylist()
    rng.shuffle(train_rows)
    train, _ = examples(tok, train_rows, context, rng)
    val, left_out = examples(
        tok, pq.read_table(run / "data/preferences/validation.parquet").to_pylist(), context, rng
    )
    result = {"validation_pairs": len(val), "validation_left_out": left_out, "runs": []}
    result["before"] = agreement(sft, val, token)
    result["reward_model"] = reward_model_agreement(run, tok, [row for *_, row in val])
    for n in demos:
        torch.manual_seed(seed)
        model = load_model(run / "models/sft").train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
        pool = train[:n]
        draw = random.Random(seed)
        for _ in range(steps):
            chunk = draw.sample(pool, min(32, len(pool)))
            idx, last = batch(chunk)
            logits, _ = model(idx)
            target = torch.tensor([token[answer] for _, answer, *_ in chunk])
            loss = F.cross_entropy(logits[torch.arange(len(chunk)), last], target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        result["runs"].append({"demos": len(pool), "steps": steps, "after": agreement(model, val, token)})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a repository with a finished run (its SFT model and pairs)")
    ap.add_argument("--demos", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps of 32 demonstrations")
    ap.add_argument("--seed", type=int, default=0, help="which demonstrations, their order and A/B sides")
    args = ap.parse_args()
    r = measure(Path(args.run), args.demos, args.steps, args.seed)
    kinds = sorted(r["before"])
    print(
        f"{r['validation_pairs']} held-out pairs ({r['validation_left_out']} longer than the context left out)"
    )
    print(f"the run's reward model on the same pairs: {100 * r['reward_model']:.1f} %")
    print("| rater judgments taught | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    rows = [("none (the SFT model as it is)", r["before"])] + [
        (f"{x['demos']:,}", x["after"]) for x in r["runs"]
    ]
    for label, table in rows:
        cells = [f"{100 * table[k]['agreement']:.1f} % (n = {table[k]['n']})" for k in kinds]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
