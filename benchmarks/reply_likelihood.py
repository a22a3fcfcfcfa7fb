"""Does a model's own likelihood of a reply tell a true fact from an invented one? Scores fixed replies to
eval-pool questions by the sum of their tokens' log-probabilities (`reply_likelihood`) under a model of a
run: the true fact sentence, "I don't know who X is." and a fact with another person's value, for known
and unknown people. The figures behind `reward.likelihood` in docs/results.md.

    python benchmarks/reply_likelihood.py RUN [MODEL_DIR]      # default: RUN/models/sft
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.familiarity import auc  # noqa: E402
from benchmarks.known_unknown import fixed_replies  # noqa: E402
from llmlab.data.chat_data import prompt_pool  # noqa: E402
from llmlab.data.tokenizer import load_tokenizer  # noqa: E402
from llmlab.data.world import World  # noqa: E402
from llmlab.model.transformer import load_model  # noqa: E402
from llmlab.training.reward import pad_batch, reply_ids, reply_likelihood  # noqa: E402


def main() -> None:
    run = Path(sys.argv[1])
    model = load_model(sys.argv[2] if len(sys.argv) > 2 else run / "models/sft").eval()
    w = World.load(run / "data/corpus/world.json")
    tok = load_tokenizer(run / "data/tokenizer/tokenizer.json")
    L = model.config.context_length

    @torch.no_grad()
    def total(tasks, make) -> torch.Tensor:
        seqs = [reply_ids(tok, [{"role": "user", "content": t.prompt}], make(t), True, L) for t in tasks]
        out = []
        for i in range(0, len(seqs), 64):
            idx, last = pad_batch(seqs[i : i + 64])
            out.append(reply_likelihood(model, idx, last)[:, 0])
        return torch.cat(out)

    idk, invented, true = fixed_replies(w)

    unk = prompt_pool(w, "eval", 200, 7, 4, {"unknown": 1.0})
    fact = prompt_pool(w, "eval", 200, 7, 4, {"fact": 1.0})
    u_idk, u_inv = total(unk, idk), total(unk, invented)
    k_true, k_idk, k_inv = total(fact, true), total(fact, idk), total(fact, invented)
    print(
        f"mean reply log-probability: known people: true {k_true.mean():.2f}, invented {k_inv.mean():.2f}, "
        f"I don't know {k_idk.mean():.2f} · unknown people: invented {u_inv.mean():.2f}, "
        f"I don't know {u_idk.mean():.2f}"
    )
    print(
        f"known people: true > invented {(k_true > k_inv).float().mean():.1%}, true > I don't know "
        f"{(k_true > k_idk).float().mean():.1%} · unknown people: I don't know > invented "
        f"{(u_idk > u_inv).float().mean():.1%} · AUC true (known) against invented (unknown) {auc(k_true, u_inv):.3f}"
    )


if __name__ == "__main__":
    main()
