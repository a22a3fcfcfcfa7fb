"""Where the reward model agrees with the rater, and where it does not: its gold agreement on the validation
pairs of a finished run, by task kind, split into pairs whose replies differ in *substance* (a different
task line of the rubric fires: a right against a wrong fact, "I don't know" against an invented one) and
pairs that differ in *style* only (politeness, a clean ending, rambling).

    python benchmarks/reward_errors.py                     # the run in this repository
    python benchmarks/reward_errors.py --run /tmp/seed1/llmlab --model /tmp/other/reward   # another

The last row is every validation pair: with `--model`, another reward model's gold agreement on this run's
held-out pairs, so two reward models trained on differently made pairs are compared on the same pairs.

    python benchmarks/reward_errors.py --labels            # the pairs' labels instead of the reward model

With `--labels`, the labels themselves (a run with `preferences.labeller: constitution`: the model's
own), on every pair of both splits, and each substance row split again by whether the SFT model's own
greedy reply to the prompt scores as well as the pair's better reply: whether the labeller misjudges
what the model it was taught from knows.

A reward model that is right on style and at chance on substance gives PPO a gradient towards style,
and none away from invented answers: docs/results.md ("Why RLHF does not lower invented answers").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmlab.data.tasks import Task  # noqa: E402
from llmlab.data.tokenizer import load_tokenizer  # noqa: E402
from llmlab.data.world import World  # noqa: E402
from llmlab.evaluation.rater import Rater  # noqa: E402
from llmlab.model.replies import answer  # noqa: E402
from llmlab.model.transformer import load_model  # noqa: E402
from llmlab.stats import wilson_ci  # noqa: E402
from llmlab.training.reward import load_reward_model, reply_ids, score_sequences  # noqa: E402

STYLE_PARTS = {"polite", "clean_ending", "cut_off", "rambling"}


def substance(score) -> frozenset[str]:
    """The rubric lines that fired other than the style lines: what the reply says, not how."""
    return frozenset(k for k in score.parts if k not in STYLE_PARTS)


@torch.no_grad()
def pair_rewards(rm, tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's scores of each preference row's chosen and rejected replies."""
    length = rm.backbone.config.context_length

    def ids(row, which):
        return reply_ids(tok, json.loads(row["context"]), row[which], row[f"{which}_ended"], length)

    return score_sequences(rm, [ids(r, "chosen") for r in rows]), score_sequences(
        rm, [ids(r, "rejected") for r in rows]
    )


def sft_knows(run: Path, tok, rater: Rater, tasks: list[Task]) -> dict[Task, float]:
    """The gold score of the run's SFT model's greedy reply to each distinct task."""
    distinct = list(dict.fromkeys(tasks))
    sft = load_model(run / "models/sft", stage="sft")
    replies = answer(sft, tok, distinct, 96)
    return {t: rater.score(t, r.text, r.ended).total for t, r in zip(distinct, replies, strict=True)}


def measure(run: Path, model: Path | None = None, labels: bool = False) -> dict:
    tok = load_tokenizer(run / "data/tokenizer/tokenizer.json")
    rater = Rater(World.load(run / "data/corpus/world.json"))
    splits = ("train", "validation") if labels else ("validation",)
    rows = [r for s in splits for r in pq.read_table(run / f"data/preferences/{s}.parquet").to_pylist()]
    rows = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]  # gold orders the pair
    tasks = [Task(**json.loads(row["task"])) for row in rows]
    if labels:  # the label orders the pair chosen over rejected
        chosen, rejected, greedy = [1.0] * len(rows), [0.0] * len(rows), sft_knows(run, tok, rater, tasks)
    else:
        rm = load_reward_model(model or run / "models/reward").eval()
        chosen, rejected = (x.tolist() for x in pair_rewards(rm, tok, rows))
    agree: dict[tuple[str, str], list[bool]] = defaultdict(list)
    every: list[bool] = []
    for row, task, c, r in zip(rows, tasks, chosen, rejected, strict=True):
        a = rater.score(task, row["chosen"], row["chosen_ended"])
        b = rater.score(task, row["rejected"], row["rejected_ended"])
        differs = "substance" if substance(a) != substance(b) else "style only"
        if labels and differs == "substance":
            knows = greedy[task] >= max(row["gold_chosen"], row["gold_rejected"])
            differs += ", SFT's greedy reply as good" if knows else ", SFT's greedy reply worse"
        agree[(task.kind, differs)].append((c > r) == (row["gold_chosen"] > row["gold_rejected"]))
        every.append(agree[(task.kind, differs)][-1])
    out = {}
    for (kind, differs), hits in [*sorted(agree.items()), (("all", "either"), every)]:
        lo, hi = wilson_ci(sum(hits), len(hits))
        out[f"{kind}/{differs}"] = {
            "n": len(hits),
            "agreement": sum(hits) / len(hits),
            "ci_low": lo,
            "ci_high": hi,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT), help="a repository with a finished run (default: this one)")
    ap.add_argument("--model", help="another reward model folder to measure on the same pairs")
    ap.add_argument("--labels", action="store_true", help="the pairs' labels, not the reward model")
    args = ap.parse_args()
    table = measure(Path(args.run), Path(args.model) if args.model else None, args.labels)
    who = "labels agree" if args.labels else "reward model agrees"
    print(f"| task kind | replies differ in | pairs | {who} with gold (95 % CI) |")
    print("|---|---|---|---|")
    for key, v in table.items():
        kind, differs = key.split("/")
        print(
            f"| {kind} | {differs} | {v['n']} | {v['agreement']:.1%} ({v['ci_low']:.1%}–{v['ci_high']:.1%}) |"
        )


if __name__ == "__main__":
    main()
