"""Pretraining at the GPU recipe's model shape through the stage's own Trainer: tokens/s and MFU.

Issue 16 asks, when a GPU is lent, for pretraining at `recipes/gpu-tinystories.yaml`'s model shape (12 ×
768, context 1024, vocabulary 32,768: GPT-2 small's shape) for a few minutes, with bf16 MFU against the
GPU's dense bf16 peak (goal ≥ 45 %). This script is that measurement, prepared and tried on the CPU, so that
GPU time goes to measuring:

    python benchmarks/gpu_pretrain.py                      # on the GPU: the recipe's pretrain section as is
    python benchmarks/gpu_pretrain.py --tiny --steps 8     # a dry run of the same code on a CPU (seconds)

The model, batch, gradient accumulation, precision, `torch.compile` and optimiser are the recipe's; the
Trainer is the pretrain stage's (`build_trainer`, without a logger); the tokens are random (throughput does
not depend on them). Tokens/s are counted over the optimizer steps after `--warmup` (compiling happens in
the first). MFU = FLOPs per token (6·N + 12·L·C·T, `GPT.flops_per_token`) × tokens/s ÷ the peak: the
datasheet's dense bf16 peak where the GPU is one this file knows, and the bf16 matmul peak measured in the
same run (`llmlab.training.mfu`), which is what the silicon reaches on one large product.

On the lent GPU machines llmlab's own dependencies are installed but for pydantic (the params):
docs/benchmarks.md ("GPU") gives the command, with pydantic carried as wheels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the GPU machines run it from a copy of the tree, not installed
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmlab.model.transformer import GPTConfig  # noqa: E402
from llmlab.params import load_params  # noqa: E402
from llmlab.training.mfu import matmul_peak_flops  # noqa: E402
from llmlab.training.pretraining import TokenWindows  # noqa: E402
from llmlab.training.trainer import CausalLMModule, build_trainer, loader  # noqa: E402

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; matched against
# torch.cuda.get_device_name() in this order (the H100's PCIe card has a lower peak than its SXM module).
DATASHEET_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0e12),
    ("L40S", 362.05e12),
    ("A10G", 70.0e12),
)

# --tiny: the same code on a CPU in seconds (model, batch and precision shrunk; nothing compiled).
TINY = {"d_model": 64, "n_layer": 2, "n_head": 2, "context_length": 64}


def datasheet_peak(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name`, or None for a device this table does not know."""
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


class StepClock(L.Callback):
    """Wall time at the end of each optimizer step (after the device has finished it)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())


def run(recipe: Path, steps: int, warmup: int, accelerator: str | None, tiny: bool) -> dict | None:
    params = load_params(recipe)
    cfg, vocab = params.pretrain, params.tokenizer.vocab_size
    update = {"val_every": steps + 1, "ckpt_every": steps + 1, "max_steps": steps, "max_tokens": None}
    if accelerator:
        update["accelerator"] = accelerator
    if tiny:
        update |= {"precision": "32-true", "compile": False, "batch_size": 4, "grad_accum": 2, "devices": 1}
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=TINY)})
        vocab = 512
    cfg = cfg.model_copy(update=update)
    config = GPTConfig.from_params(cfg.model, vocab)
    tokens = np.random.default_rng(0).integers(0, vocab, size=4_000_000, dtype=np.uint16)
    per_step = (
        cfg.batch_size * cfg.grad_accum * config.context_length
    )  # tokens per optimizer step, one device
    torch.manual_seed(0)
    module = CausalLMModule(config, cfg, steps)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, tmp, False, [clock], steps)
        items = steps * cfg.batch_size * cfg.grad_accum * trainer.world_size
        windows = TokenWindows(tokens, config.context_length, items, 0)
        data = loader(windows, cfg.batch_size, trainer)  # the stage's own, in order (its DDP split too)
        start = time.perf_counter()
        trainer.fit(module, data)
    if trainer.global_rank != 0:
        return None
    device = module.device
    if len(clock.times) <= warmup + 1:
        raise SystemExit(
            f"{len(clock.times)} optimizer steps timed: give --steps well above --warmup {warmup}"
        )
    timed = clock.times[warmup:]
    devices = trainer.world_size
    tokens_per_s = per_step * devices * (len(timed) - 1) / (timed[-1] - timed[0])
    flops = module.model.flops_per_token()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if "bf16" in cfg.precision else torch.float32
    measured = matmul_peak_flops(device, dtype)
    sheet = datasheet_peak(name) if device.type == "cuda" else None
    return {
        "device": name,
        "devices": devices,
        "torch": torch.__version__,
        "precision": cfg.precision,
        "compile": cfg.compile,
        "model": f"{config.n_layer} layers × {config.d_model}, {config.n_head} heads, context "
        f"{config.context_length}, vocabulary {config.vocab_size}",
        "params": module.model.num_params(),
        "tokens_per_step": per_step * devices,
        "steps": len(clock.times),
        "warmup_steps": warmup,
        "warmup_s": clock.times[warmup - 1] - start if warmup else 0.0,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "matmul_peak_flops": measured,
        "mfu_vs_measured_peak": flops * tokens_per_s / (measured * devices),
        "datasheet_peak_flops": sheet,
        "mfu_vs_datasheet": flops * tokens_per_s / (sheet * devices) if sheet else None,
    }


def markdown_row(r: dict) -> str:
    """One row of docs/benchmarks.md's GPU table."""
    sheet = f"{r['mfu_vs_datasheet']:.1%}" if r["mfu_vs_datasheet"] is not None else "— (peak unknown)"
    return (
        f"| {r['device']} × {r['devices']} | {r['model']} | {r['precision']}, compile {r['compile']} | "
        f"{r['tokens_per_s']:,.0f} | {sheet} | {r['mfu_vs_measured_peak']:.1%} "
        f"({r['matmul_peak_flops'] / 1e12:.3g} TFLOP/s) | {r['warmup_s']:.0f} s |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "gpu-tinystories.yaml")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps in all (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the timing (compiling)")
    ap.add_argument("--accelerator", help="override the recipe's accelerator (e.g. cpu for a dry run)")
    ap.add_argument("--tiny", action="store_true", help="a small model on a CPU: try the script, not the GPU")
    ap.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = ap.parse_args()
    result = run(args.recipe, args.steps, args.warmup, args.accelerator, args.tiny)
    if result is None:  # a DDP process other than the first
        return
    print(json.dumps(result, indent=2))
    print(markdown_row(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
