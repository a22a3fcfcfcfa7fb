"""llmlab's Llama with Canon layers, for `transformers`: what a layer reads mixes in the tokens before it.

`llmlab export` copies this file next to the weights of a model trained with `pretrain.model.canon_kernel`
> 0 (as `modeling_llmlab.py`, named in config.json's `auto_map`), since Llama has no such layer; load the
folder with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. The file imports nothing
from llmlab, so the folder works where llmlab is not installed.

The mixing (`llmlab.model.transformer.CanonMix`) reads the normalised attention inputs (and, at the other
places `canon_places` names, the projected queries, keys and values, the feed-forward's input, its gate and up
projections) of the 3 positions before each token within one forward pass, so the model runs without a KV cache: `use_cache` is off in the
config and the generation config, and a forward pass asked to cache refuses. A batch must not be
left-padded either (the padding would be mixed into the first tokens); `tests/test_export.py` checks the
logits and greedy tokens against llmlab's own model.
"""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class LlmlabCanonConfig(LlamaConfig):
    model_type = "llmlab_canon"

    def __init__(self, canon_kernel: int = 4, canon_places: str = "A", **kwargs):
        self.canon_kernel = canon_kernel
        self.canon_places = canon_places  # A before attention, B on q/k/v, C before the MLP, D on gate/up
        super().__init__(**kwargs)


def canon_mix(h, weight):
    """out_t = h_t * (1 + w_0) + sum_d w_d * h_(t-d), per channel, with zeros before the first token."""
    out = h * (1 + weight[0])
    T = h.shape[1]
    for d in range(1, weight.shape[0]):
        out = out + weight[d] * nn.functional.pad(h, (0, 0, d, 0))[:, :T]
    return out


class CanonRMSNorm(LlamaRMSNorm):
    """RMSNorm, then the Canon mixing of its output (places A and C)."""

    def __init__(self, hidden_size: int, eps: float, kernel: int):
        super().__init__(hidden_size, eps=eps)
        self.canon = nn.Parameter(torch.zeros(kernel, hidden_size))

    def forward(self, hidden_states):
        return canon_mix(super().forward(hidden_states), self.canon)


class CanonLinear(nn.Linear):
    """A projection without bias, then the Canon mixing of its output (places B and D)."""

    def __init__(self, in_features: int, out_features: int, kernel: int):
        super().__init__(in_features, out_features, bias=False)
        self.canon = nn.Parameter(torch.zeros(kernel, out_features))

    def forward(self, x):
        return canon_mix(super().forward(x), self.canon)


class LlmlabCanonForCausalLM(LlamaForCausalLM):
    config_class = LlmlabCanonConfig

    def __init__(self, config):
        super().__init__(config)
        C, H, K = config.hidden_size, config.intermediate_size, config.canon_kernel
        for layer in self.model.layers:
            if "A" in config.canon_places:
                layer.input_layernorm = CanonRMSNorm(C, config.rms_norm_eps, K)
            if "B" in config.canon_places:
                attn = layer.self_attn
                attn.q_proj, attn.k_proj, attn.v_proj = (CanonLinear(C, C, K) for _ in range(3))
            if "C" in config.canon_places:
                layer.post_attention_layernorm = CanonRMSNorm(C, config.rms_norm_eps, K)
            if "D" in config.canon_places:
                layer.mlp.gate_proj, layer.mlp.up_proj = CanonLinear(C, H, K), CanonLinear(C, H, K)
        self.post_init()

    def forward(self, *args, use_cache=None, **kwargs):
        if use_cache:
            raise ValueError(
                "this model's Canon layers read the tokens before each one in the same forward pass, which a "
                "KV cache does not keep: generate with use_cache=False (the generation config's default)"
            )
        return super().forward(*args, use_cache=False, **kwargs)
