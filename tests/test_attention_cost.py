"""Attention cost against references: the fits on exact series, memory counted exactly, SDPA, the cache."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from llmlab.evaluation.attention_cost import (
    PATHS,
    attention_scaling,
    explicit_attention,
    fit_cost_model,
    fit_power_law,
    flops_crossover_length,
    kv_cache_speedup,
    peak_memory,
    plot_scaling,
)
from llmlab.model.transformer import GPT, GPTConfig

TINY = GPTConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, context_length=48, ffn_hidden=64)


def test_power_law_fit_recovers_an_exact_quadratic_and_a_cubic():
    xs = [64, 128, 256, 512, 1024]
    k, a = fit_power_law(xs, [3e-9 * x**2 for x in xs])
    assert k == pytest.approx(2.0, abs=1e-12)
    assert a == pytest.approx(3e-9, rel=1e-9)
    assert fit_power_law(xs, [x**3 for x in xs])[0] == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="> 0"):
        fit_power_law([1, 2], [0.0, 1.0])


def test_cost_model_fit_recovers_all_three_terms_and_the_crossover():
    lengths = [64, 128, 256, 512, 1024, 2048]
    c, a, b = fit_cost_model(lengths, [3e-3 + 2e-5 * T + 1e-8 * T**2 for T in lengths])
    assert c == pytest.approx(3e-3, rel=1e-6)
    assert a == pytest.approx(2e-5, rel=1e-6)
    assert b == pytest.approx(1e-8, rel=1e-6)
    # the local slope of a·T + b·T² is 1.5 exactly at T = a / b
    T = a / b
    slope, _ = fit_power_law([T * 0.999, T * 1.001], [a * t + b * t**2 for t in (T * 0.999, T * 1.001)])
    assert slope == pytest.approx(1.5, abs=1e-3)


def test_flops_crossover_matches_the_models_own_weight_count():
    """T* is where 2·L·C·T (causal attention, per token) equals 2 × the matmul weights (everything else)."""
    config = GPTConfig(vocab_size=2048, d_model=128, n_layer=4, n_head=4, ffn_hidden=352)
    model = GPT(config)
    norms = (2 * config.n_layer + 1) * config.d_model  # RMSNorm gains: weights, but in no matmul
    canon = (
        config.n_layer * config.canon_kernel * sum(config.canon_channels().values())
    )  # per channel: no matmul
    matmul_weights = model.num_params(non_embedding=True) - norms - canon + config.vocab_size * config.d_model
    assert flops_crossover_length(config) == 2080
    assert flops_crossover_length(config) == pytest.approx(matmul_weights / (config.n_layer * config.d_model))


def test_explicit_attention_equals_sdpa():
    q, k, v = torch.randn(3, 2, 4, 37, 8).unbind(0)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(explicit_attention(q, k, v), expected, rtol=0, atol=1e-5)


def test_peak_memory_is_the_peak_of_live_bytes_not_their_sum():
    def one_mib_then_half():
        a = torch.ones(256 * 1024)  # 1 MiB of float32
        del a
        return torch.ones(128 * 1024)  # 0.5 MiB, allocated after the first is freed

    assert peak_memory(one_mib_then_half, torch.device("cpu")) == 1024 * 1024


def test_attention_scaling_structure_and_quadratic_memory_of_explicit_attention(tmp_path):
    lengths = [32, 64, 128, 256]
    threads = torch.get_num_threads()
    r = attention_scaling(TINY, lengths, batch_size=2, repeats=1, fit_min_length=64, threads=1)
    assert r["threads"] == 1 and torch.get_num_threads() == threads  # measured on one, then restored
    assert r["lengths"] == lengths and r["fit_lengths"] == [64, 128, 256]
    assert r["config"]["context_length"] == 256
    for name in PATHS:
        assert len(r[name]["time_s"]) == len(r[name]["memory_bytes"]) == len(lengths)
        assert all(t > 0 for t in r[name]["time_s"])
        assert {"time_exponent", "memory_exponent"} <= r[name].keys()
    memory = r["attention_explicit"]["memory_bytes"]
    assert memory[-1] / memory[-2] >= 3.5  # 128 -> 256 tokens: the (T, T) matrices dominate
    # at least one (B, nh, T, T) float32 matrix is alive at the peak
    assert memory[-1] >= 2 * TINY.n_head * 256 * 256 * 4
    assert r["attention_explicit"]["memory_exponent"] > 1.8
    path = tmp_path / "scaling.png"
    plot_scaling(r, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[1] > 800
    with pytest.raises(ValueError, match="fit_min_length"):
        attention_scaling(TINY, [16, 32], fit_min_length=64)


def random_model(std=0.3) -> GPT:
    """Large random weights, so that greedy decoding gives varied tokens (not one repeated)."""
    torch.manual_seed(0)
    model = GPT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


def test_kv_cache_speedup_gives_the_same_tokens_with_and_without_the_cache():
    model = random_model()
    r = kv_cache_speedup(model, prompt_len=8, new_tokens=[4, 30], batch_size=2)
    assert r["model"] == "given" and r["context_length"] == TINY.context_length
    assert [run["new_tokens"] for run in r["runs"]] == [4, 30]
    assert all(run["same_tokens"] for run in r["runs"])
    run = r["runs"][1]
    assert run["speedup"] == pytest.approx(run["uncached_s"] / run["cached_s"])
    assert run["cached_tokens_per_s"] == pytest.approx(30 * 2 / run["cached_s"])
    longer = kv_cache_speedup(model, prompt_len=8, new_tokens=[50])  # 58 > 48: a fresh, longer model
    assert longer["model"] == "random" and longer["context_length"] == 58
    assert longer["runs"][0]["same_tokens"]
