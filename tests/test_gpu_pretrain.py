"""benchmarks/gpu_pretrain.py, the GPU check of issue 16, tried where it is prepared: on a CPU, tiny."""

from __future__ import annotations

import pytest

from benchmarks.gpu_pretrain import ROOT, datasheet_peak, markdown_row, run


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),  # the SXM module, as the lent H100 names itself
        ("NVIDIA H100 PCIe", 756.0e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312.0e12),
        ("Some other card", None),
    ],
)
def test_the_datasheet_peak_is_the_dense_bf16_one_of_the_named_gpu(name, peak):
    assert datasheet_peak(name) == peak


def test_a_dry_run_on_the_cpu_times_the_steps_after_the_warmup_and_computes_mfu():
    r = run(ROOT / "recipes" / "gpu-tinystories.yaml", steps=8, warmup=2, accelerator="cpu", tiny=True)
    assert r["device"] == "cpu" and r["steps"] == 8 and r["tokens_per_step"] == 4 * 2 * 64
    assert r["tokens_per_s"] > 0 and r["matmul_peak_flops"] > 0
    assert r["mfu_vs_measured_peak"] == pytest.approx(
        r["flops_per_token"] * r["tokens_per_s"] / r["matmul_peak_flops"]
    )
    assert r["mfu_vs_datasheet"] is None  # no datasheet peak for a CPU
    assert markdown_row(r).startswith("| cpu × 1 | 2 layers × 64, 2 heads, context 64, vocabulary 512 |")
