"""Does a reward model tell a known person from an unknown one? It scores fixed replies to rl- and eval-pool
questions: for unknown people "I don't know who X is." against an invented fact, for known people the true
fact against "I don't know". Prints how often, and by how much, the better reply wins; then the same
reward model on the SFT model's own replies (4 samples at T = 1 to 150 rl-pool unknown-people prompts),
split by what the gold rater calls them (docs/results.md).

    python benchmarks/known_unknown.py RUN [REWARD_MODEL_DIR]
"""

import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmlab.data.chat_data import prompt_pool  # noqa: E402
from llmlab.data.tokenizer import load_tokenizer  # noqa: E402
from llmlab.data.world import World, fact_sentence  # noqa: E402
from llmlab.evaluation.rater import Rater, Score  # noqa: E402
from llmlab.model.replies import reply  # noqa: E402
from llmlab.model.transformer import load_model  # noqa: E402
from llmlab.training.reward import load_reward_model, reply_ids, score_sequences  # noqa: E402


def fixed_replies(w: World, seed: int = 0) -> tuple[Callable, Callable, Callable]:
    """Three replies to a fact question (task -> text): "I don't know who X is.", an invented fact (the
    asked attribute taken from a random known person) and the true fact sentence."""
    rng, known, byname = random.Random(seed), w.known(), {p.name: p for p in w.people}

    def idk(t):
        return f"I don't know who {t.person} is."

    def invented(t):
        p = byname[t.person]
        return fact_sentence(
            type(p)(**{**p.__dict__, t.attribute: getattr(rng.choice(known), t.attribute)}), t.attribute
        )

    def true(t):
        return fact_sentence(byname[t.person], t.attribute)

    return idk, invented, true


def sampled_replies(model, rm, rater: Rater, tok, tasks, samples: int) -> list[list[tuple[Score, float]]]:
    """`samples` replies at T = 1 (seeds 0, 1, …) to each task: per task, each reply's gold score (the
    rater's `Score`) and the reward model's."""
    contexts = [[{"role": "user", "content": t.prompt}] for t in tasks]
    length = rm.backbone.config.context_length
    out: list[list[tuple[Score, float]]] = [[] for _ in tasks]
    for k in range(samples):
        replies = reply(model, tok, contexts, 96, temperature=1.0, generator=torch.Generator().manual_seed(k))
        rewards = score_sequences(
            rm, [reply_ids(tok, c, r.text, r.ended, length) for c, r in zip(contexts, replies, strict=True)]
        )
        for i, (t, r, x) in enumerate(zip(tasks, replies, rewards.tolist(), strict=True)):
            out[i].append((rater.score(t, r.text, r.ended), x))
    return out


def main() -> None:
    run = Path(sys.argv[1])
    rm = load_reward_model(sys.argv[2] if len(sys.argv) > 2 else run / "models/reward")
    w = World.load(run / "data/corpus/world.json")
    tok = load_tokenizer(run / "data/tokenizer/tokenizer.json")
    L = rm.backbone.config.context_length

    def wins(tasks, good, bad):
        def score(reply):
            return score_sequences(
                rm,
                [reply_ids(tok, [{"role": "user", "content": t.prompt}], reply(t), True, L) for t in tasks],
            )

        a, b = score(good), score(bad)
        return f"{(a > b).float().mean().item():.1%} (mean margin {(a - b).mean().item():+.2f})"

    idk, invented, true = fixed_replies(w)
    for pool in ("rl", "eval"):
        unk = prompt_pool(w, pool, 300, 7, 4, {"unknown": 1.0})
        fact = prompt_pool(w, pool, 300, 7, 4, {"fact": 1.0})
        print(
            f"{pool} pool: unknown people, I don't know > invented: {wins(unk, idk, invented)} · "
            f"known people, true fact > I don't know: {wins(fact, true, idk)}"
        )

    unk = prompt_pool(w, "rl", 150, 7, 4, {"unknown": 1.0})
    by_class: dict[str, list[tuple[float, float]]] = {"I don't know": [], "invented": [], "other": []}
    for replies in sampled_replies(load_model(run / "models/sft"), rm, Rater(w), tok, unk, 4):
        for s, reward in replies:
            kind = "I don't know" if s.admits_unknown else "invented" if s.hallucinated else "other"
            by_class[kind].append((reward, s.total))
    for kind, xs in by_class.items():
        if xs:
            r, g = torch.tensor(xs).T
            print(
                f"SFT samples, unknown people, {kind}: {len(xs)} · reward {r.mean():+.2f} ± {r.std():.2f} "
                f"(mean ± s.d.) · gold {g.mean():+.2f}"
            )


if __name__ == "__main__":
    main()
