"""Atomic output: a file or folder appears under its final name complete, or not at all.

Everything a stage writes goes through `atomic_path`: it hands out a temporary sibling path, and only
when the block finishes without an exception is that renamed over the final path (`os.replace` is atomic
on one filesystem). A killed process leaves a `*.tmp-*` sibling that nothing reads, never a truncated file.
A write that fails (disk full, no permission, file too large) removes the temporary and becomes one
`OutputWriteError` naming the output, instead of a traceback from whichever library was writing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmlab.errors import LlmlabError, MissingArtifactError, OutputWriteError


@contextmanager
def atomic_path(path: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it to `path` (replacing what was there)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp.mkdir()
    except OSError as e:
        raise OutputWriteError(path, e) from None
    try:
        yield tmp
        if is_dir and path.is_dir():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if _is_write_failure(e):
            raise OutputWriteError(path, e) from None
        raise


def _is_write_failure(e: BaseException) -> bool:
    """An OSError, or what torch.save and safetensors raise when the OS refuses a write."""
    text = str(e)
    return (
        isinstance(e, OSError)
        or (type(e).__name__ == "SafetensorError" and "I/O error" in text)
        or (isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text))
    )


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's contents, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as pretty, key-sorted JSON (stable bytes for DVC hashing), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_files(folder: str | Path, files: dict[str, Any]) -> None:
    """Write each `name: content` into `folder`: text for .md, .txt and .csv names, JSON for the rest."""
    for name, content in files.items():
        if name.endswith((".md", ".txt", ".csv")):
            write_text(Path(folder) / name, content)
        else:
            write_json(Path(folder) / name, content)


def read_json(path: str | Path, stage: str | None = None) -> Any:
    """Read JSON; a missing file names the stage that writes it, a corrupt one says so."""

    path = Path(path)
    if not path.exists():
        if stage:
            raise MissingArtifactError(path, stage)
        raise LlmlabError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        hint = f" (re-create it with `dvc repro {stage}`)" if stage else ""
        raise LlmlabError(f"{path} is not valid JSON: {e}{hint}") from None


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV text: every key a column, in first-seen order; a key a row lacks is an empty cell."""
    out = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))  # every key, first-seen order
    writer = csv.DictWriter(
        out, fieldnames=fields, restval="", lineterminator="\n"
    )  # a rate with no sample: empty
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
