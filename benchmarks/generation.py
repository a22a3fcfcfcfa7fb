"""Generation speed with and without the KV cache, at the default model shape (`params.yaml` →
pretrain.model, random weights: speed does not depend on them), in one run.

For each batch size (1, 16) and number of new tokens (64, 256, 1,024): greedy `llmlab.model.generate.generate`
after a 16-token prompt, with the cache and without it (every step re-runs the whole sequence), the
same random prompts, on all the machine's threads. The two must return the same tokens. The model's
context is stretched to prompt + new tokens (rotary positions have no fixed table).

    python benchmarks/generation.py          # prints JSON; `make bench` writes docs/benchmarks.md
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from llmlab.evaluation.attention_cost import kv_cache_speedup
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def run(new_tokens=(64, 256, 1024), batch_sizes=(1, 16), prompt_len: int = 16) -> dict:
    cfg = load_params(ROOT / "params.yaml").pretrain.model
    shape = GPTConfig.from_params(cfg, vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(shape, context_length=prompt_len + max(new_tokens))).eval()
    rows = []
    for batch in batch_sizes:
        for n in new_tokens:
            # Uncached generation costs ~n²/2 token-forwards: one timed call for the long cases, three otherwise.
            repeats = 3 if n * batch <= 4096 else 1
            r = kv_cache_speedup(model, prompt_len, [n], batch_size=batch, repeats=repeats, threads=None)
            rows.append({"batch": batch, "repeats": repeats, **r["runs"][0]})
            print(json.dumps(rows[-1]), flush=True)
    return {
        "model": f"{shape.n_layer} layers × {shape.d_model} wide, vocab 2048",
        "prompt_len": prompt_len,
        "threads": torch.get_num_threads(),
        "runs": rows,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
