"""llmlab's Llama with Canon layers, for `transformers`: each attention input mixes in the tokens before it.

`llmlab export` copies this file next to the weights of a model trained with `pretrain.model.canon_kernel`
> 0 (as `modeling_llmlab.py`, named in config.json's `auto_map`), since Llama has no such layer; load the
folder with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. The file imports nothing
from llmlab, so the folder works where llmlab is not installed.

The mixing (`llmlab.model.transformer.CanonMix`) reads the normalised attention inputs of the 3 positions
before each token within one forward pass, so the model runs without a KV cache: `use_cache` is off in the
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

    def __init__(self, canon_kernel: int = 4, **kwargs):
        self.canon_kernel = canon_kernel
        super().__init__(**kwargs)


class CanonRMSNorm(LlamaRMSNorm):
    """RMSNorm, then out_t = h_t * (1 + w_0) + sum_d w_d * h_(t-d), with zeros before the first token."""

    def __init__(self, hidden_size: int, eps: float, kernel: int):
        super().__init__(hidden_size, eps=eps)
        self.canon = nn.Parameter(torch.zeros(kernel, hidden_size))

    def forward(self, hidden_states):
        h = super().forward(hidden_states)
        out = h * (1 + self.canon[0])
        T = h.shape[1]
        for d in range(1, self.canon.shape[0]):
            out = out + self.canon[d] * nn.functional.pad(h, (0, 0, d, 0))[:, :T]
        return out


class LlmlabCanonForCausalLM(LlamaForCausalLM):
    config_class = LlmlabCanonConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.input_layernorm = CanonRMSNorm(config.hidden_size, config.rms_norm_eps, config.canon_kernel)
        self.post_init()

    def forward(self, *args, use_cache=None, **kwargs):
        if use_cache:
            raise ValueError(
                "this model's Canon layers read the tokens before each one in the same forward pass, which a "
                "KV cache does not keep: generate with use_cache=False (the generation config's default)"
            )
        return super().forward(*args, use_cache=False, **kwargs)
