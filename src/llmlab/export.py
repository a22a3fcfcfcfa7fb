"""The llmlab transformer as a Hugging Face `transformers` Llama: config and weights, exactly.

llmlab fuses q/k/v into one projection and gate/up into another; Llama keeps them apart. Splitting the
fused matrices by rows gives Llama's weights unchanged, and both use the same "rotate half" RoPE layout,
so the two models compute the same logits (tests/test_model.py checks it).
"""

from __future__ import annotations

import torch

from llmlab.model import GPT, GPTConfig


def llama_config_kwargs(c: GPTConfig, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """Arguments for `transformers.LlamaConfig` describing the same network."""
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameter names and shapes -> Llama's (`model.layers.0.self_attn.q_proj.weight`, …)."""
    c, sd = model.config, model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split(c.d_model, dim=0)  # rows: [q; k; v]
        gate, up = sd[p + "mlp.gate_up.weight"].split(c.ffn_hidden, dim=0)  # rows: [gate; up]
        out |= {
            q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            q + "self_attn.q_proj.weight": wq,
            q + "self_attn.k_proj.weight": wk,
            q + "self_attn.v_proj.weight": wv,
            q + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
            q + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            q + "mlp.gate_proj.weight": gate,
            q + "mlp.up_proj.weight": up,
            q + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
        }
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
