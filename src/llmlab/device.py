"""Which device a params section's `accelerator` means on this machine.

Apart from the training code so that a stage that only runs models (evaluate) need not import
Lightning, which takes seconds.
"""

from __future__ import annotations

import torch

from llmlab.errors import LlmlabError


def uses_cuda(accelerator: str) -> bool:
    """Whether a params section's `accelerator` puts the run on a CUDA GPU on this machine."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def pick_device(accelerator: str) -> str:
    """A params section's accelerator -> a torch device; one asked for by name and absent is an error, not a fallback."""
    if uses_cuda(accelerator):
        return "cuda"
    if accelerator in ("auto", "mps") and torch.backends.mps.is_available():
        return "mps"
    if accelerator in ("auto", "cpu"):
        return "cpu"
    raise LlmlabError(
        f"accelerator {accelerator!r} is asked for, but this machine has no such device: use auto or cpu"
    )
