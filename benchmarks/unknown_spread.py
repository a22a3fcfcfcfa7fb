"""Where a model says "I don't know": 8 samples at T = 1 to each of 120 rl-pool questions about unknown
people (the people PPO trains on), counted per question and per person, and how often the run's reward
model scores an "I don't know" above an invented answer to the same question. PPO can only raise a reply
it samples: a person the model never says "I don't know" about gives it nothing to learn from
(docs/results.md, "Leave-one-out advantages").

    python benchmarks/unknown_spread.py RUN [MODEL_DIR]      # MODEL_DIR: default RUN/models/sft
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from known_unknown import sampled_replies  # noqa: E402

from llmlab.data.chat_data import prompt_pool  # noqa: E402
from llmlab.data.tokenizer import load_tokenizer  # noqa: E402
from llmlab.data.world import World  # noqa: E402
from llmlab.evaluation.rater import Rater  # noqa: E402
from llmlab.model.transformer import load_model  # noqa: E402
from llmlab.training.reward import load_reward_model  # noqa: E402

SAMPLES, QUESTIONS = 8, 120


def kinds(per_task):
    """Each (gold score, reward) as (kind, reward): "I don't know" by the rubric's line for it (nothing
    stated), "invented", or "other"."""
    return [
        [
            ("I don't know" if "admits_unknown" in s.parts else "invented" if s.hallucinated else "other", r)
            for s, r in replies
        ]
        for replies in per_task
    ]


def main() -> None:
    run = Path(sys.argv[1])
    model = load_model(sys.argv[2] if len(sys.argv) > 2 else run / "models/sft")
    world, tok = (
        World.load(run / "data/corpus/world.json"),
        load_tokenizer(run / "data/tokenizer/tokenizer.json"),
    )
    rm, rater = load_reward_model(run / "models/reward"), Rater(world)
    tasks = prompt_pool(world, "rl", QUESTIONS, 7, 4, {"unknown": 1.0})
    samples = dict(enumerate(kinds(sampled_replies(model, rm, rater, tok, tasks, SAMPLES))))
    idk = {i: sum(kind == "I don't know" for kind, _ in s) for i, s in samples.items()}
    people: dict[str, int] = defaultdict(int)
    for i, n in idk.items():
        people[tasks[i].person] += n
    wins = [
        a > b
        for s in samples.values()
        for ka, a in s
        for kb, b in s
        if ka == "I don't know" and kb == "invented"
    ]
    print(
        f"questions by how many of {SAMPLES} samples say I don't know: {sorted(Counter(idk.values()).items())}"
    )
    print(
        f"questions with at least one: {sum(n > 0 for n in idk.values())} of {len(idk)}; people: "
        f"{sum(n > 0 for n in people.values())} of {len(people)}"
    )
    print(f"reward model, same question, I don't know above an invented answer: {sum(wins)} of {len(wins)}")


if __name__ == "__main__":
    main()
