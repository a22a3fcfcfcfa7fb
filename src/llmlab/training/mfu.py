"""The machine's matmul peak, measured: the denominator of model FLOPs utilisation (MFU).

A vendor's datasheet peak means little on a laptop CPU (turbo, thermal limits, BLAS build), so llmlab
measures what a large square matmul actually reaches here, in the dtype training uses, and reports MFU
against that. MFU below 100 % is the share lost to small matrices, attention, norms, the optimiser and
the framework.
"""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 1.0
) -> float:
    """FLOP/s of repeated (n × n) @ (n × n) matmuls, best of several timed rounds.

    One n×n matmul is 2·n³ FLOPs (a multiply and an add per term). n is 1024 on CPU (large enough to
    saturate BLAS, small enough to time in a second) and 8192 on GPUs.
    """
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: thread pools, clocks, caches
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 4
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best
