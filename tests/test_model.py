"""The transformer against references: causality, the KV cache, padding, and transformers' Llama."""

import math

import pytest
import torch

from llmlab.model.generate import generate, sample_next
from llmlab.model.transformer import (
    GPT,
    CanonMix,
    GPTConfig,
    RMSNorm,
    apply_rope,
    default_ffn_hidden,
    padded_attention_mask,
    rope_tables,
)

CFG = GPTConfig(
    vocab_size=97,
    d_model=32,
    n_layer=2,
    n_head=4,
    context_length=48,
    ffn_hidden=64,
    canon_kernel=0,
    canon_places="A",
)
CANON = GPTConfig(**{**CFG.__dict__, "canon_kernel": 4})
CANON_EVERYWHERE = GPTConfig(**{**CANON.__dict__, "canon_places": "ABCD"})
# every test of the cache, padding and batching runs on each: canon mixing reads the previous tokens, which
# the cache, left padding and rows leaving the batch must hand over exactly, at every place it sits
BOTH = pytest.mark.parametrize(
    "config", [CFG, CANON, CANON_EVERYWHERE], ids=["plain", "canon", "canon-everywhere"]
)


def random_model(config=CFG, seed=0, std=0.3, tie=True) -> GPT:
    """A model with large random weights, so that greedy decoding gives varied tokens (not one repeated)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


@BOTH
def test_changing_a_future_token_never_changes_earlier_logits(config):
    model = random_model(config)
    x = torch.randint(0, CFG.vocab_size, (2, 20))
    base, _ = model(x)
    for j in (1, 7, 19):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % CFG.vocab_size
        out, _ = model(y)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
        assert not torch.allclose(out[:, j], base[:, j])


def test_loss_is_cross_entropy_of_next_token_and_ignores_minus_100():
    model = random_model()
    x = torch.randint(0, CFG.vocab_size, (1, 6))
    t = torch.tensor([[5, -100, 7, 8, -100, 1]])
    logits, loss = model(x, t)
    logp = torch.log_softmax(logits[0], -1)
    expected = -(logp[0, 5] + logp[2, 7] + logp[3, 8] + logp[5, 1]) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_last_only_gives_the_last_positions_logits_and_no_loss():
    model = random_model()
    x = torch.randint(0, CFG.vocab_size, (3, 11))
    every, _ = model(x)
    last, _ = model(x, last_only=True)
    assert last.shape == (3, 1, CFG.vocab_size)
    torch.testing.assert_close(last[:, 0], every[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(x, x, last_only=True)


def test_logits_from_gives_the_later_positions_logits_and_no_loss():
    model = random_model()
    x = torch.randint(0, CFG.vocab_size, (3, 11))
    every, _ = model(x)
    later, _ = model(x, logits_from=4)
    assert later.shape == (3, 7, CFG.vocab_size)
    torch.testing.assert_close(later, every[:, 4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_from"):
        model(x, x, logits_from=4)


def test_target_logprobs_read_only_the_targets_but_equal_the_full_softmax_and_its_gradient():
    """`target_logprobs` sends only the positions with a target through the LM head: the values and the
    gradient must be those of the whole (B, T, V) log-softmax, picked by hand."""
    model = random_model(std=0.1)
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    t = torch.full((2, 9), -100)
    t[0, 2:6] = torch.tensor([3, 1, 4, 1])
    t[1, 7] = 5
    got = model.target_logprobs(x, t)
    logp = torch.log_softmax(model(x)[0], -1)
    expected = torch.zeros(2, 9)
    for b, i in zip(*torch.nonzero(t != -100, as_tuple=True), strict=True):
        expected[b, i] = logp[b, i, t[b, i]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), model.blocks[0].attn.qkv.weight)
    (g_expected,) = torch.autograd.grad(expected.sum(), model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-4, atol=1e-6)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-5)
    expected = torch.tensor([[1 / rms, 4 / rms, 1.5 / rms, -4 / rms]])
    torch.testing.assert_close(norm(x), expected)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 64, 10_000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m].view(1, 1, 1, 8), sin[m].view(1, 1, 1, 8))
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n].view(1, 1, 1, 8), sin[n].view(1, 1, 1, 8))
        return (qm * kn).sum().item()

    assert score(10, 3) == pytest.approx(score(40, 33), abs=1e-4)
    assert score(5, 5) == pytest.approx((q * k).sum().item(), abs=1e-5)  # distance 0: no rotation


def test_default_ffn_hidden():
    assert default_ffn_hidden(128) == 352
    assert default_ffn_hidden(768) == 2048


def test_padded_mask_lets_queries_see_only_real_past_keys():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m = padded_attention_mask(valid, 2)[:, 0].int()
    assert m.tolist() == [[[0, 0, 1, 0], [0, 0, 1, 1]], [[1, 1, 1, 0], [1, 1, 1, 1]]]


@BOTH
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_and_uncached_greedy_generation_agree(seed, config):
    model = random_model(config, seed=seed)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    cached = generate(model, prompts, 30, temperature=0)
    uncached = generate(model, prompts, 30, temperature=0, use_cache=False)
    assert cached == uncached
    assert len(set(cached[0])) > 3, "the test model should not be degenerate"


@BOTH
def test_a_row_does_not_depend_on_its_batch_neighbours(config):
    model = random_model(config, seed=3)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    batched = generate(model, prompts, 20, temperature=0)
    alone = [generate(model, [p], 20, temperature=0)[0] for p in prompts]
    assert batched == alone


@BOTH
def test_a_long_prompt_in_the_batch_does_not_shorten_the_others_replies(config):
    """Each row has the room its own prompt leaves in the context: a short conversation batched with one
    that nearly fills the context gets the reply it gets alone, and the long one is cut where it must be."""
    model = random_model(config, seed=8)
    ctx = config.context_length
    prompts = [[1, 5, 6], [1, *range(2, ctx - 6)], [1, 9, 4, 2, 8]]  # the middle one leaves 7 tokens free
    for use_cache in (True, False):
        batched = generate(model, prompts, 30, temperature=0, use_cache=use_cache)
        alone = [generate(model, [p], 30, temperature=0, use_cache=use_cache)[0] for p in prompts]
        assert batched == alone
        assert [len(o) for o in batched] == [30, 7, 30]
    stops = [alone[0][4]]  # the first row stops early, the others run to their own limits
    batched = generate(model, prompts, 30, temperature=0, stop_ids=stops)
    assert batched == [generate(model, [p], 30, temperature=0, stop_ids=stops)[0] for p in prompts]


@BOTH
def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(config):
    model = random_model(config, seed=6)
    prompts = [[1, *range(2 + i, 4 + 2 * i)] for i in range(8)]  # left-padded: 2 to 16 tokens
    free = generate(model, prompts, 25, temperature=0)
    stops = [free[0][3], free[5][10]]  # rows end at different steps (and some never)
    batched = generate(model, prompts, 25, temperature=0, stop_ids=stops)
    assert len({len(o) for o in batched}) > 2, "the rows should stop at different steps"
    assert batched == [generate(model, [p], 25, temperature=0, stop_ids=stops)[0] for p in prompts]
    assert batched == generate(model, prompts, 25, temperature=0, stop_ids=stops, use_cache=False)


def test_generation_stops_at_stop_token_and_at_context_length():
    model = random_model(seed=4)
    free = generate(model, [[1, 2, 3]], 10, temperature=0)[0]
    stop = free[4]
    out = generate(model, [[1, 2, 3]], 10, temperature=0, stop_ids=[stop])[0]
    assert out == free[: free.index(stop) + 1]
    long = generate(model, [[1] * 40], 100, temperature=0)[0]
    assert len(long) == CFG.context_length - 40


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = random_model(seed=5)
    a = generate(model, [[1, 2]], 15, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, [[1, 2]], 15, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_top_k_and_top_p_truncate_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert int(sample_next(logits, 0.0)) == 0
    draws = {int(sample_next(logits, 1.0, top_p=0.4, generator=g)) for _ in range(50)}
    assert draws == {0}  # the most likely token is always kept


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 4000
    cold = sum(int(sample_next(logits, 0.5, generator=g)) == 0 for _ in range(n)) / n
    hot = sum(int(sample_next(logits, 2.0, generator=g)) == 0 for _ in range(n)) / n
    p = lambda T: math.exp(2 / T) / sum(math.exp(v / T) for v in (2, 1, 0))  # noqa: E731
    assert cold == pytest.approx(p(0.5), abs=0.03)
    assert hot == pytest.approx(p(2.0), abs=0.03)


def test_canon_mixing_by_hand():
    """x_t + Σ_d w_d · x_(t−d) per channel, and a token at position p reaches back at most p tokens."""
    mix = CanonMix(3, 3)
    torch.nn.init.normal_(mix.weight)
    w = mix.weight.detach()
    x = torch.randn(1, 5, 3)
    positions = torch.tensor([[0, 1, 0, 1, 2]])  # two sequences packed in one row: 2 tokens, then 3
    by_hand = []
    for t in range(5):
        out = x[0, t] * (1 + w[0])
        for d in (1, 2):
            if positions[0, t] >= d:
                out = out + w[d] * x[0, t - d]
        by_hand.append(out)
    torch.testing.assert_close(mix(x, positions), torch.stack(by_hand)[None])


@pytest.mark.parametrize("config", [CANON, CANON_EVERYWHERE], ids=["canon", "canon-everywhere"])
def test_canon_with_zero_weights_is_the_plain_model(config):
    torch.manual_seed(0)
    plain, canon = GPT(CFG), GPT(config)
    missing, unexpected = canon.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.endswith("canon.weight") for name in missing)
    mixes = [m for m in canon.modules() if isinstance(m, CanonMix)]
    assert len(mixes) == len(config.canon_places) * config.n_layer
    for mix in mixes:
        torch.nn.init.zeros_(mix.weight)  # zero mixing weights: the plain block
    x = torch.randint(0, CFG.vocab_size, (2, 12))
    torch.testing.assert_close(canon(x)[0], plain(x)[0], rtol=0, atol=0)


def test_canon_places_mix_what_they_name():
    """B mixes the projected queries, keys and values, each channel with its own weights, so that a key can
    carry the token before its own while the query keeps its own token: the first attention layer's queries
    and keys, computed by hand from the projection and the mixing."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CANON.__dict__, "canon_places": "B"})).eval()
    block = model.blocks[0]
    assert block.canon is None and block.mlp_canon is None and block.mlp.canon is None
    x = model.embed(torch.randint(0, CFG.vocab_size, (1, 6)))
    h = block.attn_norm(x)
    qkv, w = block.attn.qkv(h)[0], block.attn.canon.weight  # (T, 3C), (K, 3C)
    by_hand = torch.stack(
        [qkv[t] * (1 + w[0]) + sum(w[d] * qkv[t - d] for d in range(1, 4) if t >= d) for t in range(6)]
    )
    cos, sin = model.rope_cos[:6][None, None], model.rope_sin[:6][None, None]
    q, k, v = block.attn.heads(h, cos, sin)
    C, nh = CFG.d_model, CFG.n_head
    heads = lambda m: m.view(6, nh, C // nh).transpose(0, 1)[None]  # noqa: E731
    torch.testing.assert_close(v, heads(by_hand[:, 2 * C :]))
    torch.testing.assert_close(k, apply_rope(heads(by_hand[:, C : 2 * C]), cos, sin))
    torch.testing.assert_close(q, apply_rope(heads(by_hand[:, :C]), cos, sin))


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_llama(tie):
    transformers = pytest.importorskip("transformers")
    from llmlab.model.export import llama_config_kwargs, llama_state_dict

    config = GPTConfig(**{**CFG.__dict__, "tie_embeddings": tie})  # a plain Llama block
    model = random_model(config, seed=6, std=0.1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_kwargs(config)))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # the tied head is the embedding
    if tie:
        hf.tie_weights()
    hf.eval()
    x = torch.randint(0, 97, (2, 30))
    ours, _ = model(x)
    theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_flops_per_token_by_hand():
    # per block: qkv 32·96 + proj 32·32 + gate_up 32·128 + down 64·32 + 2 norms · 32 = 10304; two blocks,
    # the final norm (32) and the tied head (97·32) -> N = 23744. Attention: 12 · 2 · 32 · 48 = 36864.
    assert random_model().flops_per_token() == 6 * 23744 + 36864


def test_a_config_written_before_canon_kernel_existed_loads_as_the_plain_block(tmp_path):
    """Models saved before the field (then always plain Llama blocks) keep loading as what they are, although
    the default is now the Canon block."""
    import json
    from dataclasses import asdict

    old = {k: v for k, v in asdict(CANON).items() if k != "canon_kernel"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert GPTConfig.from_json(tmp_path / "config.json") == CFG
    assert GPTConfig.from_json(tmp_path / "config.json").canon_kernel == 0
    assert GPTConfig(vocab_size=97).canon_kernel == 4


def test_a_config_written_before_canon_places_existed_loads_with_the_layer_before_attention(tmp_path):
    import json
    from dataclasses import asdict

    old = {k: v for k, v in asdict(CANON).items() if k != "canon_places"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert GPTConfig.from_json(tmp_path / "config.json") == CANON
    assert CANON.canon_places == "A" and GPTConfig(vocab_size=97).canon_places == "AB"
