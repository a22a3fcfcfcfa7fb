"""Where the reward model agrees with the rater, and where it does not: its gold agreement on the validation
pairs of a finished run, by task kind, split into pairs whose replies differ in *substance* (a different
task line of the rubric fires: a right against a wrong fact, "I don't know" against an invented one) and
pairs that differ in *style* only (politeness, a clean ending, rambling).

    python benchmarks/reward_errors.py                     # the run in this repository
    python benchmarks/reward_errors.py --run /tmp/seed1/llmlab --model /tmp/other/reward   # another

The last row is every validation pair: with `--model`, another reward model's gold agreement on this run's
held-out pairs, so two reward models trained on differently made pairs are compared on the same pairs.

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


def measure(run: Path, model: Path | None = None) -> dict:
    tok = load_tokenizer(run / "data/tokenizer/tokenizer.json")
    rm = load_reward_model(model or run / "models/reward").eval()
    rater = Rater(World.load(run / "data/corpus/world.json"))
    rows = pq.read_table(run / "data/preferences/validation.parquet").to_pylist()
    chosen, rejected = (x.tolist() for x in pair_rewards(rm, tok, rows))
    agree: dict[tuple[str, str], list[bool]] = defaultdict(list)
    every: list[bool] = []
    for row, c, r in zip(rows, chosen, rejected, strict=True):
        task = Task(**json.loads(row["task"]))
        a = rater.score(task, row["chosen"], row["chosen_ended"])
        b = rater.score(task, row["rejected"], row["rejected_ended"])
        differs = "substance" if substance(a) != substance(b) else "style only"
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
    args = ap.parse_args()
    table = measure(Path(args.run), Path(args.model) if args.model else None)
    print("| task kind | replies differ in | pairs | reward model agrees with gold (95 % CI) |")
    print("|---|---|---|---|")
    for key, v in table.items():
        kind, differs = key.split("/")
        print(
            f"| {kind} | {differs} | {v['n']} | {v['agreement']:.1%} ({v['ci_low']:.1%}–{v['ci_high']:.1%}) |"
        )


if __name__ == "__main__":
    main()
