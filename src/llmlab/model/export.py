"""The llmlab transformer as a Hugging Face `transformers` Llama: config, weights and tokenizer, exactly.

llmlab fuses q/k/v into one projection and gate/up into another; Llama keeps them apart. Splitting the
fused matrices by rows gives Llama's weights unchanged, and both use the same "rotate half" RoPE layout,
so the two models compute the same logits (tests/test_model.py and tests/test_export.py check it).

`export_hf` writes a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
load offline, with a chat template that gives the ids of `llmlab.data.chat_template.render`. A model with Canon
layers (`pretrain.model.canon_kernel`), which Llama lacks, is written with its own model class
(`llmlab.model.hf_canon`) and loads with `trust_remote_code=True`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llmlab.data.tokenizer import BOS_ID, END_ID, PAD_ID, SPECIAL_TOKENS, hf_tokenizer
from llmlab.errors import LlmlabError
from llmlab.io import atomic_path
from llmlab.model.transformer import GPT, GPTConfig

FORMATS = ("hf",)
# what `hf_canon.py` is called in an exported folder (the module config.json's auto_map names)
CANON_MODULE = "modeling_llmlab"

CHAT_TEMPLATE = (
    """{#- llmlab's chat template (llmlab.data.chat_template.render): <|bos|> then <|role|>, a space, content, <|end|> per message.
A system message is folded into the first user turn; turns alternate user, assistant. -#}
{%- set ns = namespace(system='', turns=0) -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception('message content must be a string') -}}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system = ns.system + message['content'] + '\n\n' -%}
    {%- else -%}
        {%- if message['role'] != ['user', 'assistant'][ns.turns % 2] -%}
            {{- raise_exception('turns must alternate user, assistant (user first), roles user/assistant/system') -}}
        {%- endif -%}
        {%- set content = ns.system + message['content'] if ns.turns == 0 else message['content'] -%}
        {%- for special in SPECIALS -%}
            {%- if special in content -%}
                {{- raise_exception('message text contains ' + special + ', which this tokenizer would read as the special token: use llmlab.data.chat_template.render, which keeps it text') -}}
            {%- endif -%}
        {%- endfor -%}
        {{- '<|' + message['role'] + '|> ' + content + '<|end|>' -}}
        {%- set ns.turns = ns.turns + 1 -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""
).replace("SPECIALS", repr(list(SPECIAL_TOKENS)))
"""Jinja for `tokenizer.apply_chat_template`, giving the same ids as `llmlab.data.chat_template.render`.

subtle: a template makes text and the tokenizer then reads special tokens out of it, so "<|end|>" typed
in a message would become the special token (a prompt injection). `encode_content` keeps such text as
plain characters; no text the template could write tokenizes the same way, so it refuses instead.
"""


def llama_config_kwargs(
    c: GPTConfig, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None
) -> dict:
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
        places = c.canon_places if c.canon_kernel else ""
        # `hf_canon.CanonRMSNorm` and `CanonLinear`: the mixing weights beside the norm's or the projection's
        if "A" in places:
            out[q + "input_layernorm.canon"] = sd[p + "canon.weight"]
        if "B" in places:
            for name, w in zip("qkv", sd[p + "attn.canon.weight"].split(c.d_model, dim=1), strict=True):
                out[q + f"self_attn.{name}_proj.canon"] = w
        if "C" in places:
            out[q + "post_attention_layernorm.canon"] = sd[p + "mlp_canon.weight"]
        if "D" in places:
            w_gate, w_up = sd[p + "mlp.canon.weight"].split(c.ffn_hidden, dim=1)
            out[q + "mlp.gate_proj.canon"], out[q + "mlp.up_proj.canon"] = w_gate, w_up
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_hf(model: GPT, tokenizer_path: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write `model` and its tokenizer as a `transformers` Llama folder, atomically; return the folder.

    config.json (LlamaConfig, float32), model.safetensors (Llama's names; a tied head is not stored twice,
    `tie_word_embeddings` makes transformers share it on loading), generation_config.json (eos is
    <|end|>, where a reply ends), and tokenizer.json + tokenizer_config.json + chat_template.jinja.
    An existing folder that is not empty is replaced only with `force`.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig  # seconds to import: only `llmlab export` needs it

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmlabError(f"{out_dir} is a file: pass a folder to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise LlmlabError(f"{out_dir} is not empty: pass --force to replace it, or export into a new folder")
    c = model.config
    kwargs = llama_config_kwargs(c, bos_id=BOS_ID, eos_id=END_ID, pad_id=PAD_ID)
    if c.canon_kernel:  # Llama has no Canon layer: the model class travels with the folder (hf_canon.py)
        from llmlab.model.hf_canon import LlmlabCanonConfig

        config = LlmlabCanonConfig(
            canon_kernel=c.canon_kernel, canon_places=c.canon_places, use_cache=False, **kwargs
        )
        config.architectures = ["LlmlabCanonForCausalLM"]
        config.auto_map = {
            "AutoConfig": f"{CANON_MODULE}.LlmlabCanonConfig",
            "AutoModelForCausalLM": f"{CANON_MODULE}.LlmlabCanonForCausalLM",
        }
    else:
        config = LlamaConfig(**kwargs)
        config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    tok = hf_tokenizer(tokenizer_path)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = c.context_length
    with atomic_path(out_dir, is_dir=True) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=END_ID, pad_token_id=PAD_ID, use_cache=not c.canon_kernel
        ).save_pretrained(tmp)
        if c.canon_kernel:
            shutil.copyfile(Path(__file__).with_name("hf_canon.py"), tmp / f"{CANON_MODULE}.py")
        save_file(llama_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # not 0600: see save_model
        tok.save_pretrained(tmp)
    return out_dir
