"""What attention costs, measured: time and memory against the sequence length T, and the KV cache.

The claim under test is "attention is O(n²)". Every token's query is scored against every earlier key,
so one layer computes a (T, T) matrix per head:

    scores = q kᵀ / √hs      2·T²·hs multiply-adds per head   (B, nh, T, T)
    A      = softmax(scores + causal mask)                    (B, nh, T, T)
    y      = A v             2·T²·hs again                     (B, nh, T, hs)

Time grows as T² and, written this way, so does memory: the score matrix is really allocated.
`F.scaled_dot_product_attention` (what the model uses) does the same arithmetic in tiles and never holds
the whole matrix, so its memory grows as T while its time still grows as T².

The whole model grows more slowly at first. Per token, each layer also runs its projections and its
SwiGLU, 2·(4·C² + 3·C·F) FLOPs whatever T is, and the LM head adds 2·C·V; causal attention adds only
2·T·C (half the score matrix is masked and skipped). Time is therefore ≈ a·T + b·T², and its log-log
slope is 1 + T / (T + T*) with T* = a / b: close to 1 while T << T*, 1.5 at T*, tending to 2 above.
From the FLOP counts alone,

    T* = 4·C + 3·F + V / L        (C = d_model, F = ffn_hidden, V = vocab, L = n_layer)

which is 512 + 1056 + 512 = 2080 tokens for the default config (C 128, F 352, V 2048, L 4): a small
model's matmuls on C-wide vectors outweigh attention until T reaches ~16·C. `attention_scaling` reports
that estimate next to the slopes it measures, and a measured T* from a fit of c + a·T + b·T² (c: the
per-call overhead that flattens every curve at small T): the two differ by how efficiently the hardware
runs each part (FLOPs are not seconds).

Subtle: the explicit way's measured time can grow faster than T². Its softmax and masking make several
passes over the (B, nh, T, T) matrix, which are limited by memory bandwidth; once the matrix no longer
fits the CPU's caches (64 MiB at T = 2048 with 4 heads, against a 32 MiB L3 here) each pass slows down.
Its memory grows exactly as T², and SDPA's (which never holds the matrix) as T.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from llmlab.evaluation.attention_maps import causal_attention_probs
from llmlab.model.generate import generate
from llmlab.model.transformer import GPT, GPTConfig

PATHS = ("attention_explicit", "attention_sdpa", "model")  # what attention_scaling measures, in its result


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √hs + causal mask) v, materialising the (B, nh, T, T) matrix. Inputs (B, nh, T, hs)."""
    return causal_attention_probs(q, k) @ v  # (B, nh, T, hs)


def flops_crossover_length(config: GPTConfig) -> float:
    """The T at which causal attention's FLOPs equal those of everything else in a forward pass.

    Per token and layer: 2·T·C for attention (q·k and A·v, each 2·C·T/2 over the visible half),
    2·(4·C² + 3·C·F) for the projections and the SwiGLU, plus 2·C·V / L for the LM head shared out.
    Equal when T = 4·C + 3·F + V / L. E.g. C 128, F 352, V 2048, L 4 -> 512 + 1056 + 512 = 2080.
    """
    C, F_, V, L = config.d_model, config.ffn_hidden, config.vocab_size, config.n_layer
    return 4 * C + 3 * F_ + V / L


def fit_power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit of y ≈ a·x^k in log-log space: log y = log a + k·log x. Returns (k, a).

    E.g. xs [1, 2, 4], ys [3, 12, 48] (= 3·x²) -> (2.0, 3.0).
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need at least 2 (x, y) pairs of equal count, got {len(xs)} x and {len(ys)} y")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("a power law is fitted on logarithms: every x and y must be > 0")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)
    return k, math.exp(my - k * mx)


def fit_cost_model(lengths: list[int], times: list[float]) -> tuple[float, float, float]:
    """Least-squares fit of t ≈ c + a·T + b·T², each point weighted by 1 / t (relative errors). Returns
    (c, a, b).

    c is the per-call overhead (Python, dispatch), a the per-token cost that does not depend on T
    (projections, MLP, LM head), b the per-pair cost of attention; a / b is the T at which the last two
    are equal.
    """
    T = torch.tensor(lengths, dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64)
    design = torch.stack([torch.ones_like(T), T, T**2], dim=1) / t[:, None]  # rows / t: relative residuals
    c, a, b = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution[:, 0].tolist()
    return c, a, b


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with n intra-op CPU threads (None: leave torch's setting), then restore the setting."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median wall time of `repeats` calls of fn, in seconds, after one untimed warm-up call (if warmup)."""
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by one call of fn and alive at the same time.

    Counted from zero at the call: weights and inputs that exist before it are not included, its output
    is (it is alive when the call ends). On CUDA this is torch.cuda.max_memory_allocated() minus the
    bytes allocated before. A CPU has no allocator statistics, so there the call runs under
    torch.profiler with profile_memory=True, which records every allocation (+bytes) and free (-bytes)
    with a timestamp; the peak of their running sum is the same quantity. (Only the raw event list has
    the timestamps, so this reads the profiler's `kineto_results`; the tables it prints only give each
    operator's net total.)
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


@torch.no_grad()
def attention_scaling(
    config: GPTConfig,
    lengths: list[int],
    batch_size: int = 1,
    repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
    fit_min_length: int = 256,
    threads: int | None = 1,
) -> dict:
    """Forward time and peak memory against the sequence length T, with fitted exponents.

    For each T in `lengths`, three forwards on random inputs (the cost does not depend on the values):
      attention_explicit: one layer's attention core on (B, nh, T, hs) q, k, v, the textbook way
        (`explicit_attention`: the (T, T) matrix is materialised). The q/k/v and output projections
        are not included: they cost T·C², and they are in "model".
      attention_sdpa: the same q, k, v through F.scaled_dot_product_attention(is_causal=True), as the
        model computes it (fused kernel, no (T, T) matrix).
      model: the whole GPT forward, ids (B, T) -> logits, with this config's shape, random weights and
        context_length raised to max(lengths).
    Time is the median of `repeats` calls after a warm-up; memory is `peak_memory` of one more call
    (peak bytes alive at once, above what existed before the call, output included).
    Exponents: `fit_power_law` over the lengths >= fit_min_length only, where fixed per-call overheads
    (Python, kernel launches, thread wake-up) no longer hide the growth.
    threads: CPU threads while measuring, 1 by default (None: torch's setting). On several threads the
    parallel efficiency itself grows with T (small matmuls do not split well), which bends the slopes,
    and on a shared machine one busy core stalls every multi-threaded op.

    Returns {"config": asdict(config used), "device", "batch_size", "repeats", "threads", "lengths",
    "fit_lengths": the lengths fitted, "flops_crossover_length": `flops_crossover_length`,
    "attention_explicit" / "attention_sdpa" / "model": {"time_s": [per length], "memory_bytes": [...],
    "time_exponent": k, "memory_exponent": k}, "model_fit": {"c_s", "a_s_per_token", "b_s_per_token_pair",
    "crossover_length": a / b or None if b <= 0} (`fit_cost_model` of the model's times, all lengths),
    "total_s": wall time of this call}.
    """
    start = time.perf_counter()
    lengths = sorted(lengths)
    fit_lengths = [T for T in lengths if T >= fit_min_length]
    if min(lengths) < 1 or len(fit_lengths) < 2:
        raise ValueError(
            f"lengths {lengths}: need positive lengths, at least 2 of them >= fit_min_length={fit_min_length}"
        )
    dev = torch.device(device)
    config = dataclasses.replace(config, context_length=max(config.context_length, max(lengths)))
    torch.manual_seed(seed)
    model = GPT(config).to(dev).eval()
    B, nh, hs = batch_size, config.n_head, config.head_size

    result: dict = {name: {"time_s": [], "memory_bytes": []} for name in PATHS}
    with torch_threads(threads):
        n_threads = torch.get_num_threads()
        for T in lengths:
            q, k, v = torch.randn(3, B, nh, T, hs, device=dev).unbind(0)  # 3 × (B, nh, T, hs)
            ids = torch.randint(0, config.vocab_size, (B, T), device=dev)
            calls = {
                "attention_explicit": lambda q=q, k=k, v=v: explicit_attention(q, k, v),
                "attention_sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True
                ),
                "model": lambda ids=ids: model(ids),
            }
            for name, fn in calls.items():
                result[name]["time_s"].append(median_time(fn, repeats, dev))
                result[name]["memory_bytes"].append(peak_memory(fn, dev))

    fitted = [i for i, T in enumerate(lengths) if T >= fit_min_length]
    for name in PATHS:
        for measure, key in (("time_s", "time_exponent"), ("memory_bytes", "memory_exponent")):
            ys = result[name][measure]
            result[name][key] = fit_power_law([lengths[i] for i in fitted], [ys[i] for i in fitted])[0]
    c, a, b = fit_cost_model(lengths, result["model"]["time_s"])
    return {
        "config": dataclasses.asdict(config),
        "device": str(dev),
        "batch_size": B,
        "repeats": repeats,
        "threads": n_threads,
        "lengths": lengths,
        "fit_lengths": fit_lengths,
        "flops_crossover_length": flops_crossover_length(config),
        **result,
        "model_fit": {
            "c_s": c,
            "a_s_per_token": a,
            "b_s_per_token_pair": b,
            "crossover_length": a / b if b > 0 else None,
        },
        "total_s": time.perf_counter() - start,
    }


@torch.no_grad()
def kv_cache_speedup(
    model: GPT,
    prompt_len: int,
    new_tokens: list[int],
    batch_size: int = 1,
    repeats: int = 1,
    seed: int = 0,
    threads: int | None = 1,
) -> dict:
    """Greedy generation with and without the KV cache: wall time, tokens/s and the speed-up.

    Without a cache, token t re-runs the model over all prompt_len + t tokens, so N new tokens cost
    ~N·(P + N/2) token-forwards plus O(N·(P + N)²) attention; with it, each token costs one token's
    forward plus attention to the stored keys. Both calls are `llmlab.model.generate.generate` on the same
    random prompts (temperature 0, no stop token), and must return the same tokens. One short generation
    each way warms up first; then each time is the median of `repeats` calls (1 by default: the uncached
    call is the long one, ~2.5 s for 256 tokens after a 32-token prompt with the default config on one
    CPU thread, and averages over its many steps).
    threads: CPU threads while measuring, as in `attention_scaling`.

    The model's context_length bounds prompt_len + max(new_tokens). When it is too short, every run uses
    a fresh GPT of the same shape with random weights and a long enough context instead ("model":
    "random"), since the cost does not depend on the weights; otherwise the model given ("model":
    "given").

    Returns {"model": "given" | "random", "context_length", "prompt_len", "batch_size", "repeats", "threads",
    "runs": [{"new_tokens", "cached_s", "uncached_s" (median seconds per generate call),
    "cached_tokens_per_s", "uncached_tokens_per_s" (new tokens × batch / s), "speedup" (uncached_s /
    cached_s), "same_tokens": bool} per entry of new_tokens], "total_s": wall time of this call}.
    """
    start = time.perf_counter()
    if prompt_len < 1 or min(new_tokens) < 1:
        raise ValueError(f"prompt_len ({prompt_len}) and every new_tokens ({new_tokens}) must be >= 1")
    needed = prompt_len + max(new_tokens)
    which = "given"
    if needed > model.config.context_length:
        torch.manual_seed(seed)
        model = GPT(dataclasses.replace(model.config, context_length=needed)).to(
            next(model.parameters()).device
        )
        which = "random"
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen).tolist()

    runs = []
    with torch_threads(threads):
        n_threads = torch.get_num_threads()
        for use_cache in (True, False):  # warm-up: thread pools, allocator, first-call dispatch
            generate(model, prompts, 2, temperature=0.0, use_cache=use_cache)
        for n in new_tokens:
            runs.append(_cached_vs_uncached(model, prompts, n, repeats, device))
    return {
        "model": which,
        "context_length": model.config.context_length,
        "prompt_len": prompt_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": n_threads,
        "runs": runs,
        "total_s": time.perf_counter() - start,
    }


def _cached_vs_uncached(model: GPT, prompts: list[list[int]], n: int, repeats: int, device) -> dict:
    """One entry of kv_cache_speedup's "runs": greedy generation of n tokens, with and without the cache."""
    out: dict[bool, list[list[int]]] = {}

    def run(use_cache: bool) -> None:
        out[use_cache] = generate(model, prompts, n, temperature=0.0, use_cache=use_cache)

    cached_s = median_time(lambda: run(True), repeats, device, warmup=False)
    uncached_s = median_time(lambda: run(False), repeats, device, warmup=False)
    batch_size = len(prompts)
    return {
        "new_tokens": n,
        "cached_s": cached_s,
        "uncached_s": uncached_s,
        "cached_tokens_per_s": n * batch_size / cached_s,
        "uncached_tokens_per_s": n * batch_size / uncached_s,
        "speedup": uncached_s / cached_s,
        "same_tokens": out[True] == out[False],
    }


def plot_scaling(result: dict, path: str | Path) -> None:
    """Two log-log panels from `attention_scaling`: time and peak memory against T, fitted slopes in the
    legend, and a T² reference line through each panel's last explicit-attention point."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result["lengths"]
    labels = {
        "attention_explicit": "attention, explicit (1 layer)",
        "attention_sdpa": "attention, SDPA (1 layer)",
        "model": "whole model",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, measure, key, unit in (
        (axes[0], "time_s", "time_exponent", "forward time (s)"),
        (axes[1], "memory_bytes", "memory_exponent", "peak memory (bytes)"),
    ):
        for name in PATHS:
            ax.plot(
                lengths, result[name][measure], "o-", label=f"{labels[name]}: slope {result[name][key]:.2f}"
            )
        anchor = result["attention_explicit"][measure][-1]
        ax.plot(
            lengths, [anchor * (T / lengths[-1]) ** 2 for T in lengths], "k--", lw=1, label="∝ T² (reference)"
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fit_from = result["fit_lengths"][0]
    fig.suptitle(
        f"Cost against sequence length ({result['device']}, batch {result['batch_size']}; "
        f"slopes fitted for T ≥ {fit_from})"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
