"""The whole transformer: a decoder-only, Llama-shaped language model in plain PyTorch (no Lightning here).

    tokens ─► embedding ─► N × [ x + Attn(Canon(RMSNorm(x))) ; x + SwiGLU(RMSNorm(x)) ] ─► RMSNorm ─► LM head ─► logits

How it differs from GPT-2 (and why it is Llama-shaped):
- RMSNorm instead of LayerNorm (no mean subtraction, no bias), applied before each sub-layer (pre-norm).
- No learned position embedding: rotary embeddings (RoPE) rotate queries and keys by an angle that
  grows with the position, so attention scores depend on the *relative* distance between tokens.
- SwiGLU feed-forward (silu(x W_gate) * (x W_up)) W_down instead of gelu(x W1) W2.
- No biases anywhere. The LM head may share the embedding matrix (`tie_embeddings`).
How it differs from Llama: one fused q/k/v projection and one fused gate/up projection (one matmul
instead of three / two — faster on small widths); no grouped-query attention. Both are a reshuffle of
the same weights, which is why `llmlab export` can write a `transformers` Llama checkpoint exactly for a
model without the one real addition: by default (`canon_kernel` 4) each attention input is first mixed
with the three tokens before it (`CanonMix`), which lets this small model learn to read a value stated
earlier in its context within the default budget (docs/knowledge.md). Llama has no such layer: such a
model is exported with its own `transformers` class (`llmlab.model.hf_canon`); `canon_kernel` 0 removes
the layer and leaves a plain Llama block. `canon_places` puts the same mixing at Allen-Zhu's other places too:
B on the projected queries, keys and values (each channel with its own weights, so that a key can carry the
token before its own while its query keeps its own), C before the feed-forward, D on its gate and up
projections.

Attention goes through `F.scaled_dot_product_attention`, which picks a fused kernel (flash attention on
GPUs) and never materialises the (T, T) score matrix when it can avoid it. Its cost still grows as T²:
every token attends to every earlier token.

Shapes in comments: B batch, T new tokens, S all key positions (cached + new), C d_model,
nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import atomic_path, read_json, write_json


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    context_length: int = 128
    ffn_hidden: int = 352
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    canon_kernel: int = 4
    canon_places: str = "AB"

    def canon_channels(self) -> dict[str, int]:
        """Each Canon place of this model and the width it mixes: A the attention input, B the queries, keys
        and values, C the feed-forward input, D the feed-forward's gate and up projections (Allen-Zhu 2025)."""
        if not self.canon_kernel:
            return {}
        width = {"A": self.d_model, "B": 3 * self.d_model, "C": self.d_model, "D": 2 * self.ffn_hidden}
        return {place: width[place] for place in self.canon_places}

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_params(cls, model_params, vocab_size: int) -> GPTConfig:
        """Build from a `params.ModelConfig` section; derives ffn_hidden when it is null."""
        fields = model_params.model_dump()
        if fields["ffn_hidden"] is None:
            fields["ffn_hidden"] = default_ffn_hidden(fields["d_model"])
        return cls(vocab_size=vocab_size, **fields)

    def to_json(self, path: str | Path) -> None:

        write_json(path, asdict(self))

    @classmethod
    def from_dict(cls, fields: dict) -> GPTConfig:
        """A config as `to_json` wrote it; one written before `canon_kernel` existed is a plain Llama block, one
        written before `canon_places` existed has its Canon layers before attention only."""
        return cls(**{"canon_kernel": 0, "canon_places": "A", **fields})

    @classmethod
    def from_json(cls, path: str | Path, stage: str | None = None) -> GPTConfig:

        raw = read_json(path, stage)
        try:
            return cls.from_dict(raw)
        except TypeError as e:
            raise LlmlabError(f"{path} is not an llmlab model config: {e}") from None


def default_ffn_hidden(d_model: int, multiple_of: int = 32) -> int:
    """Llama's rule: 2/3 of 4·d_model (keeps SwiGLU's three matrices at the cost of GPT's two), rounded up.

    >>> default_ffn_hidden(128)   # 2/3 · 512 = 341.3 -> 352
    352
    """
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 whatever the input dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_size: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (max_len, head_size) each.

    Dimension pair i rotates with frequency theta^(-2i/hs): fast in the first dims, slow in the last.
    Layout is the "rotate half" one of Hugging Face's Llama (dims i and i + hs/2 form a pair).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+hs/2}) pair by its angle. x: (B, nh, T, hs); cos, sin: (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated_half * sin


class KVCache:
    """Keys and values of every layer for the positions seen so far, so each new token costs one step.

    Without a cache, generating token t re-runs the model over all t tokens (O(t²) attention work per
    token); with it, only the new token's q/k/v are computed and its query attends to the stored keys.
    `valid` marks real tokens: prompts in a batch are left-padded, and padding must never be attended to.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled so far (same for every row; padding fills the short rows)
        # each Canon place's last canon_kernel - 1 inputs per layer, (n_layer, B, K - 1, width): the next
        # tokens' mixing reads them
        back = max(0, config.canon_kernel - 1)
        self.recent = {
            place: torch.zeros(config.n_layer, batch_size, back, width, device=device, dtype=dtype)
            for place, width in config.canon_channels().items()
        }

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (a bool mask or indices): rows that finished leave."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.recent = {place: recent[:, rows] for place, recent in self.recent.items()}
        self.valid = self.valid[rows]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.canon = canon_at("B", config)

    def heads(self, x, cos, sin, positions=None, cache=None, layer=0):
        """Queries and keys (rotated) and values of x (B, T, C), 3 × (B, nh, T, hs): all before SDPA."""
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C)
        if self.canon is not None:
            qkv = self.canon(qkv, positions, cache, layer)
        q, k, v = qkv.split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x, cos, sin, attn_mask=None, cache: KVCache | None = None, layer: int = 0, positions=None
    ):
        B, T, C = x.shape
        q, k, v = self.heads(x, cos, sin, positions, cache, layer)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k = cache.k[layer, :, :, : start + T]  # (B, nh, S, hs)
            v = cache.v[layer, :, :, : start + T]  # (B, nh, S, hs)
        if attn_mask is None:
            # Training and unpadded prefill: the plain causal mask, which lets SDPA use its fastest kernels.
            # (With a cache and T == 1 the single query may see every key: no mask at all.)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.hidden = config.ffn_hidden
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)
        self.canon = canon_at("D", config)

    def forward(self, x, positions=None, cache=None, layer=0):
        gate_up = self.gate_up(x)  # (B, T, 2 hidden)
        if self.canon is not None:
            gate_up = self.canon(gate_up, positions, cache, layer)
        gate, up = gate_up.split(self.hidden, dim=-1)  # 2 × (B, T, hidden)
        return self.down(F.silu(gate) * up)


INIT_STD_CANON = 0.2


class CanonMix(nn.Module):
    """A causal depthwise convolution over the last `kernel` tokens, added to its input: each channel of token
    t becomes x_t + Σ_d w_d · x_(t−d), d = 0 … kernel − 1 ("Canon layers", Allen-Zhu 2025, Physics of Language
    Models part 4.1). Random at init, as a convolution's weights are (zero weights make it a plain block, but
    then value reading was no faster to learn: docs/knowledge.md). It hands each token its neighbours'
    features before attention, so that a later mention can be matched on several earlier tokens at once
    (the name and the relation a stated value follows) rather than through a chain of attention layers."""

    def __init__(self, d_model: int, kernel: int, place: str = "A"):
        super().__init__()
        self.place = place  # which of the cache's recent inputs it continues
        self.weight = nn.Parameter(torch.randn(kernel, d_model) * INIT_STD_CANON)

    def forward(self, x, positions=None, cache: KVCache | None = None, layer: int = 0):
        """x (B, T, C). positions (B, T), when given: a token at position p mixes only the p tokens of its
        own sequence before it (no mixing across a packed conversation's start or from left padding). None:
        one sequence per row, continuing the cache if there is one (zeros before its first token)."""
        T, back = x.shape[1], self.weight.shape[0] - 1
        # (B, back + T, C): the cached inputs before this chunk, or zeros before a sequence's first token
        recent = cache.recent[self.place] if cache is not None else None
        seen = torch.cat([recent[layer], x], dim=1) if recent is not None else F.pad(x, (0, 0, back, 0))
        if recent is not None and back:
            recent[layer] = seen[:, -back:]
        out = x * (1 + self.weight[0])
        for d in range(1, back + 1):
            shifted = seen[:, back - d : back - d + T]  # x_(t−d), (B, T, C)
            if positions is not None:
                shifted = shifted * (positions >= d)[..., None]
            out = out + self.weight[d] * shifted
        return out


def canon_at(place: str, config: GPTConfig) -> CanonMix | None:
    """The Canon layer of this place (A, B, C or D: `GPTConfig.canon_channels`), or None where it has none."""
    width = config.canon_channels().get(place)
    return CanonMix(width, config.canon_kernel, place) if width else None


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.canon = canon_at("A", config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp_canon = canon_at("C", config)
        self.mlp = SwiGLU(config)

    def attention_input(self, x, positions, cache=None, layer=0):
        """What the attention reads: the normalised residual stream, mixed over recent tokens if canon."""
        h = self.attn_norm(x)
        return h if self.canon is None else self.canon(h, positions, cache, layer)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, positions=None):
        x = x + self.attn(
            self.attention_input(x, positions, cache, layer), cos, sin, attn_mask, cache, layer, positions
        )
        h = self.mlp_norm(x)
        if self.mlp_canon is not None:
            h = self.mlp_canon(h, positions, cache, layer)
        return x + self.mlp(h, positions, cache, layer)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_size, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the residual projections get std / sqrt(2 · n_layer), so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the embedding matrix (the usual convention for FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def hidden(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final, normalised hidden state of every position, (B, T, C): what the LM head (or a
        reward head) reads. Arguments as in `forward`."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            if start + T > self.config.context_length:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds context_length {self.config.context_length}"
                )
            cos = self.rope_cos[start : start + T][None, None]  # (1, 1, T, hs)
            sin = self.rope_sin[start : start + T][None, None]
        else:
            cos = self.rope_cos[positions][:, None]  # (B, 1, T, hs)
            sin = self.rope_sin[positions][:, None]
            back = self.config.canon_kernel - 1
            if back > 0 and cache is not None and int(positions.min()) >= back:
                # Past here positions only mask the Canon layers' mixing at a sequence's first tokens; every
                # token has canon_kernel - 1 of its own before it (decoding after a prompt's first tokens),
                # so the masks would all be ones: skipping them saves two operations per mixed token back,
                # per place and layer, in each step of generation, and changes no number. (Only with a
                # cache: training and scoring would pay the check's device sync and rarely skip anything.)
                positions = None
        if attn_mask is None and start > 0 and T > 1:
            # Subtle: SDPA's is_causal aligns the mask top-left, wrong for a chunk after cached keys.
            attn_mask = padded_attention_mask(
                torch.ones(B, start + T, dtype=torch.bool, device=idx.device), T
            )
        x = self.embed(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, cache, i, positions)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_from: int = 0,
    ):
        """Logits for every position, and the mean next-token cross-entropy when `targets` is given.

        idx: (B, T) token ids. targets: (B, T), -100 where no loss is taken.
        positions: (B, T) position of each token for RoPE (default: cache.length + arange(T)).
        attn_mask: (B, 1, T, S) bool, True where a query may attend to a key; None = plain causal.
        last_only: logits for the last position only, (B, 1, V): all that generation reads. The LM head
        then runs on one position per row instead of T, which in the prefill of a long prompt saves the
        largest matmul and the (B, T, V) tensor.
        logits_from: logits for positions logits_from.. only, (B, T - logits_from, V): PPO reads only those
        that predict a reply, and the prompt's positions skip the LM head.
        """
        h = self.hidden(idx, positions, attn_mask, cache)  # (B, T, C)
        if (last_only or logits_from) and targets is not None:
            raise ValueError(
                "last_only and logits_from give no loss: targets need the logits of every position"
            )
        if last_only:
            h = h[:, -1:]
        elif logits_from:
            h = h[:, logits_from:]
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
        )
        return logits, loss

    def target_logprobs(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(targets[b, t] | idx[b, :t + 1]) where a target is given (not -100), 0 elsewhere: (B, T).

        Only the positions with a target go through the LM head and the softmax, so a prompt costs its
        share of the blocks and nothing of the (T, V) logits: DPO and the reward model's likelihood score
        replies, and a third to a half of each of their batches is prompt or padding.
        """
        keep = targets != -100
        h = self.hidden(idx, positions, attn_mask)[keep]  # (K, C): the positions that predict a target
        logp = torch.log_softmax(self.lm_head(h).float(), dim=-1)
        picked = logp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)  # (K,)
        return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(
            keep, picked
        )

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM's estimate: 6·N + 12·L·C·T.

        N counts the weights used in matmuls: every block and the LM head, but not the embedding lookup
        (with tied embeddings the head's matrix *is* the embedding, counted once). 6·N is a multiply-add
        per weight forward (2) and twice that backward (4); 12·L·C·T the attention scores and weighted sum,
        which grow with the sequence length T (the O(n²) cost: O(n) per token).
        """
        T = seq_len or self.config.context_length
        c = self.config
        n_matmul = self.num_params(non_embedding=True) + c.vocab_size * c.d_model * c.tie_embeddings
        return 6 * n_matmul + 12 * c.n_layer * c.d_model * T


def padded_attention_mask(valid: torch.Tensor, n_new: int) -> torch.Tensor:
    """The (B, 1, T, S) mask for the last `n_new` of S positions when some keys are padding.

    valid: (B, S) True for real tokens. Query i (absolute position S - n_new + i) may attend key j when
    j <= its position and key j is real. Subtle: a padding query would have no key at all, and SDPA
    returns NaN for a row with nothing to attend to, so every query may always attend to itself
    (padding outputs are garbage but finite, and nothing real ever reads them).

    >>> padded_attention_mask(torch.tensor([[False, True, True]]), 3)[0, 0].int()
    tensor([[1, 0, 0],
            [0, 1, 0],
            [0, 1, 1]], dtype=torch.int32)
    """
    S = valid.shape[1]
    q_pos = torch.arange(S - n_new, S, device=valid.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=valid.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    mask = causal[None] & valid[:, None, :]  # (B, T, S)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]  # (B, 1, T, S)


def save_model(model: GPT, out_dir: str | Path) -> None:
    """Write `model.safetensors` + `config.json` into `out_dir`, atomically (the folder appears complete)."""

    with atomic_path(out_dir, is_dir=True) as tmp:
        model.config.to_json(tmp / "config.json")
        st_save_model(model, str(tmp / "model.safetensors"))
        # subtle: safetensors creates its file owner-only (0600); give it config.json's mode (0666 - umask)
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")


def load_model(model_dir: str | Path, stage: str | None = None, device="cpu") -> GPT:
    """Load a model written by `save_model`. Only safetensors: no pickle is ever unpickled here."""

    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        if stage:
            raise MissingArtifactError(weights, stage)
        raise LlmlabError(f"{weights} not found")
    config = GPTConfig.from_json(model_dir / "config.json", stage)
    model = GPT(config)
    try:
        st_load_model(model, str(weights), device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        hint = f" (re-create it with `dvc repro {stage}`)" if stage else ""
        raise LlmlabError(
            f"{weights} is not a valid llmlab checkpoint: {str(e).splitlines()[0]}{hint}"
        ) from None
    return model.to(device).eval()
