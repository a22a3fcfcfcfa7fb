"""Resumable training checkpoints that are safe to trust.

- A checkpoint is written to a temporary file and renamed into place, so a kill mid-write never leaves a
  `last.ckpt` that a later run reads as valid but is truncated.
- Next to the checkpoints, `fingerprint.json` records what they were trained from: the stage's resolved
  params (`config`), the sha256 of each input file, the git commit, and one digest of all of it. A re-run
  resumes only when the digest matches; after a params or data change the stale checkpoints are
  discarded and training starts over.
- Checkpoints are loaded only from the stage's own checkpoint directory, with `weights_only=True`
  (no arbitrary pickle is executed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from llmlab.errors import LlmlabError
from llmlab.io import atomic_path, file_hash, write_json
from llmlab.tracking import git_info

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are temp-file + rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's checkpoints are trained from: `digest` decides whether a re-run may resume them."""

    digest: str
    config: Any = None
    inputs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of its contents


def kept_checkpoint(ckpt_dir: str | Path, failed_at: int, every: int, unit: str = "step") -> str:
    """What a run that failed at step (or iteration) `failed_at` leaves to resume from, for its error message:
    the last checkpoint, written every `every`, or none."""
    last, good = Path(ckpt_dir) / LAST, (failed_at - 1) // every * every
    return (
        f"{last} ({unit} {good}) is kept"
        if last.exists() and good > 0
        else "no checkpoint was written before it"
    )


def fingerprint(config: Any, input_files: list[str | Path]) -> Fingerprint:
    """The resolved config and the input files' contents (what the weights depend on), hashed."""
    inputs = {str(p): file_hash(p) for p in sorted(str(p) for p in input_files)}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path, digest in inputs.items():
        h.update(path.encode())
        h.update(digest.encode())
    return Fingerprint(h.hexdigest(), json.loads(json.dumps(config, default=str)), inputs)


def resume_path(ckpt_dir: str | Path, fp: Fingerprint | str, readonly: bool = False) -> Path | None:
    """The checkpoint to resume from, or None. Clears `ckpt_dir` when its fingerprint is stale
    (unless `readonly`: the other ranks of a distributed run only look)."""

    fp = fp if isinstance(fp, Fingerprint) else Fingerprint(fp)
    ckpt_dir = Path(ckpt_dir)
    fp_file = ckpt_dir / "fingerprint.json"
    last = ckpt_dir / LAST
    old = None
    if fp_file.exists():
        try:
            old = json.loads(fp_file.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            old = None
    if old != fp.digest:
        if readonly:
            return None
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            log.info("checkpoints in %s were made from other params or data: starting over", ckpt_dir)
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            fp_file, {"fingerprint": fp.digest, "config": fp.config, "inputs": fp.inputs, **git_info()}
        )
        return None
    # Leftover temporaries of a killed write are never read; drop them.
    for tmp in [] if readonly else ckpt_dir.glob(".*.tmp-*"):
        tmp.unlink() if tmp.is_file() else shutil.rmtree(tmp)
    if last.exists() and os.path.getsize(last) > 0:
        check_readable(last)
        log.info("resuming from %s", last)
        return last
    return None


def check_readable(path: Path) -> None:
    """Open a checkpoint the safe way before anything resumes from it: `weights_only` unpickles tensors
    and plain containers only, never code, so a foreign or crafted file is refused without running it,
    and a damaged one gives one clear error instead of a traceback deep inside Lightning."""

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a foreign object), RuntimeError / EOFError (a damaged file)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise LlmlabError(
            f"{path} cannot be read as a checkpoint of this stage ({type(e).__name__}: {reason}); it is damaged "
            f"or was not written here, and nothing in it was run. Delete {path.parent} to start the stage over"
        ) from None
