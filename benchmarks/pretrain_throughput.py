"""Pretraining throughput: the Lightning stage against a minimal plain-PyTorch loop, same model and batch,
and against the simplest strong baseline, a GPT-2-shaped model of the same size (`gpt2_baseline.py`).

Both train the default model (`params.yaml` → pretrain.model) on the same token windows with the same
optimiser, schedule and gradient clipping. The Lightning side is the stage's own Trainer
(`build_trainer`: checkpointing, LR monitor, progress bar, MLflow logging to a temporary store) without
validation; the plain side is forward, backward, clip, step. Tokens/s are timed after `warmup` steps.
The two are interleaved (plain, Lightning, plain, Lightning) and the best of each is kept, so that a
noisy neighbour hurts both alike. MFU is against the fp32 matmul peak measured in the same run.

The stage is also timed with `pretrain.compile: true` (the model under `torch.compile`), the candidate for
issue 16's goal of 1.1× the baseline. Its warm-up steps include compiling; Inductor keeps its cache between
processes (`/tmp/torchinductor_<user>`), so only the first round on a machine compiles from scratch, as
only a user's first run does; the warm-up of each round is reported.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import load_params
from llmlab.training.mfu import matmul_peak_flops
from llmlab.training.pretraining import TokenWindows
from llmlab.training.trainer import CausalLMModule, build_trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, too

from benchmarks import gpt2_baseline  # noqa: E402
from benchmarks.pretrain_options import _tokens, train  # noqa: E402


class _Clock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()


def plain_loop(config: GPTConfig, cfg, tokens, steps: int, warmup: int) -> float:
    """Forward, backward, clip, step: the stage's own set-up without Lightning (pretrain_options.train)."""
    return train("stage set-up", config, cfg, tokens, steps, warmup)["tokens_per_s"]


def lightning_stage(
    config: GPTConfig,
    cfg,
    tokens,
    steps: int,
    warmup: int,
    compile: bool = False,
    warmups: list | None = None,
) -> float:
    from llmlab.tracking import buffered_mlflow_logger

    torch.manual_seed(0)
    cfg = cfg.model_copy(update={"val_every": steps + 1, "accelerator": "cpu", "compile": compile})
    module = CausalLMModule(config, cfg, steps)
    clock = _Clock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        logger = buffered_mlflow_logger(f"sqlite:///{tmp}/mlflow.db", experiment="bench")
        trainer = build_trainer(cfg, tmp, logger, [clock], steps)
        data = torch.utils.data.DataLoader(
            TokenWindows(tokens, config.context_length, steps * cfg.batch_size, 0), batch_size=cfg.batch_size
        )
        start = time.perf_counter()
        trainer.fit(module, data)
    if warmups is not None:
        warmups.append(clock.t0 - start)
    return (steps - warmup) * cfg.batch_size * config.context_length / (clock.t1 - clock.t0)


def run(steps: int = 300, warmup: int = 20, rounds: int = 2) -> dict:
    params = load_params(ROOT / "params.yaml")
    cfg, vocab_size = params.pretrain, params.tokenizer.vocab_size
    tokens = _tokens(vocab_size)
    config = GPTConfig.from_params(cfg.model, vocab_size)
    peak = matmul_peak_flops("cpu", torch.float32)
    plain, lit, gpt2, compiled, compile_warmups = [], [], [], [], []
    for _ in range(rounds):
        gpt2.append(gpt2_baseline.train(config, cfg, tokens, steps, warmup))
        plain.append(plain_loop(config, cfg, tokens, steps, warmup))
        lit.append(lightning_stage(config, cfg, tokens, steps, warmup))
        compiled.append(lightning_stage(config, cfg, tokens, steps, warmup, True, compile_warmups))
    flops = GPT(config).flops_per_token()
    best_plain, best_lit, best_gpt2, best_compiled = max(plain), max(lit), max(gpt2), max(compiled)
    return {
        "model": f"{config.n_layer} layers × {config.d_model} wide, context {config.context_length}, vocab {config.vocab_size}",
        "batch": f"{cfg.batch_size} × {config.context_length} tokens",
        "plain_tokens_per_s": best_plain,
        "lightning_tokens_per_s": best_lit,
        "lightning_over_plain": best_lit / best_plain,
        "gpt2_tokens_per_s": best_gpt2,
        "lightning_over_gpt2": best_lit / best_gpt2,
        "compiled_tokens_per_s": best_compiled,
        "compiled_over_gpt2": best_compiled / best_gpt2,
        "compiled_warmup_s": compile_warmups,
        "params": sum(p.numel() for p in GPT(config).parameters()),
        "gpt2_params": gpt2_baseline.parameters(config),
        "matmul_peak_gflops": peak / 1e9,
        "plain_mfu": best_plain * flops / peak,
        "lightning_mfu": best_lit * flops / peak,
        "all_plain": plain,
        "all_lightning": lit,
        "all_gpt2": gpt2,
        "all_compiled": compiled,
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import json

    print(json.dumps(run(), indent=2))
