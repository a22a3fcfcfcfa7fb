"""Rows of external data: a Hugging Face dataset, or files on disk. Shared by every stage that can read
data other than the synthetic world (corpus text, SFT conversations, preference pairs).

    hf      `datasets.load_dataset` of a Hub id or a local dataset folder, one split, optionally streamed
    local   glob patterns relative to the repository: .jsonl / .json (one row per object), .parquet, or a
            folder written by `datasets.Dataset.save_to_disk`; .txt files (one document each) only where
            the caller allows them (the corpus)

A row is a dict of the requested columns, plus "_where" (file and line, or dataset and row) for error
messages about its content. Every problem is one `LlmlabError` naming the params key
(`key`, e.g. "sft.data.hf") and the fix: an unreachable Hub, a missing column, a file that is not JSON.

Offline, `load_dataset` would retry the Hub for ~25 s (5 retries with backoff) before failing. So for a
Hub id we first ask the Hub about the dataset once, without retries: if that fails, the stage fails at
once with one line naming the dataset and the way out (source: local).
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmlab.errors import LlmlabError

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what errors="replace" puts in place of each undecodable byte sequence
HUB_PROBE_TIMEOUT_S = 10


@dataclass
class Rows:
    """Rows read from one source, and the U+FFFD characters that decoding introduced."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    replaced: int = 0


def require_usable(
    key: str, noun: str, n_usable: int, n_read: int, problems: list[str], note: str = ""
) -> None:
    """Warn about the rows dropped (naming the first few); fail when fewer than 2 are usable."""
    if problems:
        log.warning("%s: dropped %d of %d rows, e.g. %s", key, len(problems), n_read, "; ".join(problems[:3]))
    if n_usable < 2:
        raise LlmlabError(
            f"{key}: {n_usable} usable {noun}(s) of {n_read} read; need at least 2 "
            f"(first problems: {'; '.join(problems[:3]) or 'none'}{note})"
        )


def _missing_column(key: str, column: str, where: str, has: Sequence[str]) -> LlmlabError:
    return LlmlabError(f"{key}: '{column}' is not a column of {where}; it has {list(has)}")


# ------------------------------------------------------------------------------------------ hf


def hf_rows(
    name: str,
    config: str | None,
    split: str,
    streaming: bool,
    columns: dict[str, str],
    key: str,
    root: Path,
    max_rows: int | None = None,
    offline_fix: str = "source: local",
) -> Rows:
    """Up to `max_rows` rows of a Hugging Face dataset split.

    columns maps each wanted column to the params key that names it (for the error message), e.g.
    {"text": "corpus.hf.text_column"}. `offline_fix` is the way out an offline user is told about.
    """
    import datasets  # seconds to import: only hf sources need it
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import httpx  # the HTTP client of huggingface_hub (httpx or its fork)

    # Connection failures surface as any of these, depending on where in datasets/huggingface_hub they happen.
    load_errors = (
        datasets.exceptions.DatasetsError,
        ConnectionError,
        FileNotFoundError,
        HfHubHTTPError,
        httpx.TransportError,
        ValueError,
    )
    where = f"{key}: could not load dataset '{name}'"
    local = Path(name) if Path(name).is_absolute() else root / name
    on_hub = not local.exists()
    # The way out, for a Hub dataset; a local folder's problem is in the folder, so no hint about going offline.
    fix = f". Offline? Download it elsewhere and use {offline_fix}" if on_hub else ""
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    if on_hub and not offline:
        try:
            HfApi().dataset_info(name, timeout=HUB_PROBE_TIMEOUT_S)
        except GatedRepoError:
            raise LlmlabError(
                f"{where}: it is gated; accept its terms on the Hub, then `hf auth login`"
            ) from None
        except RepositoryNotFoundError:
            raise LlmlabError(f"{where}: no such dataset on the Hub, and no folder {local}{fix}") from None
        except HFValidationError:
            raise LlmlabError(
                f"{where}: neither a Hub dataset id (owner/name) nor an existing folder ({local})"
            ) from None
        except HfHubHTTPError as e:
            raise LlmlabError(f"{where}: the Hub answered {short(e)}{fix}") from None
        except (httpx.TransportError, OSError) as e:
            raise LlmlabError(
                f"{where}: the Hub is unreachable ({short(e)}){fix}, "
                "or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
            ) from None

    try:
        ds = datasets.load_dataset(
            str(local) if not on_hub else name, config, split=split, streaming=streaming
        )
    except load_errors as e:
        raise LlmlabError(f"{where}: {short(e)}{fix}") from None

    available = ds.column_names  # None for some streaming datasets whose features are unknown until read
    for column, column_key in columns.items():
        if available is not None and column not in available:
            raise _missing_column(column_key, column, f"'{name}'", available)
    out = Rows()
    try:
        for i, row in enumerate(ds):
            if max_rows is not None and i >= max_rows:
                break
            for column, column_key in columns.items():
                if column not in row:
                    raise _missing_column(column_key, column, f"'{name}'", sorted(row))
            out.rows.append({c: row[c] for c in columns} | {"_where": f"dataset '{name}' row {i}"})
    except load_errors as e:  # a streamed dataset can also lose the connection half-way
        raise LlmlabError(f"{where}: reading failed after {len(out.rows)} rows: {short(e)}{fix}") from None
    return out


def short(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


# --------------------------------------------------------------------------------------- local


def local_rows(
    patterns: Sequence[str], columns: dict[str, str], key: str, root: Path, txt_column: str | None = None
) -> Rows:
    """Rows of every file the glob patterns match, in pattern order, files sorted within a pattern.

    With `txt_column`, a .txt file is one row holding the whole file in that column (the corpus);
    otherwise .txt is not a supported type.
    """
    paths: list[Path] = []
    for pattern in patterns:
        for match in sorted(glob.glob(str(root / pattern), recursive=True)):
            if Path(match) not in paths:
                paths.append(Path(match))
    if not paths:
        kinds = ".txt/.jsonl/.json/.parquet" if txt_column else ".jsonl/.json/.parquet"
        raise LlmlabError(
            f"{key}.paths: no file matches {list(patterns)} (relative to {root}); put {kinds} files there or fix the patterns"
        )
    out = Rows()
    replaced_in: list[str] = []
    for path in paths:
        rows, replaced = _read_path(path, columns, key, txt_column)
        out.rows += rows
        out.replaced += replaced
        if replaced:
            replaced_in.append(f"{path} ({replaced})")
    if replaced_in:
        log.warning(
            "%s: %d undecodable byte sequence(s) replaced by U+FFFD in %s",
            key,
            out.replaced,
            ", ".join(replaced_in),
        )
    return out


def _read_path(
    path: Path, columns: dict[str, str], key: str, txt_column: str | None
) -> tuple[list[dict], int]:
    """(rows, replacement characters introduced) of one matched path, by its type."""
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path, columns, key), 0
        raise LlmlabError(
            f"{key}.paths: {path} is a folder but not one written by Dataset.save_to_disk; "
            "match the files inside it instead (e.g. 'data/raw/**/*.jsonl')"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt" and txt_column:
        text, replaced = _decode(path)
        return [{txt_column: text}], replaced
    if suffix in (".jsonl", ".json"):
        text, replaced = _decode(path)
        return _json_rows(path, text, columns, key), replaced
    if suffix == ".parquet":
        return _read_parquet(path, columns), 0
    kinds = ".txt, .jsonl, .json, .parquet" if txt_column else ".jsonl, .json, .parquet"
    raise LlmlabError(
        f"{key}.paths: {path}: unsupported file type '{suffix}' (use {kinds} or a Dataset.save_to_disk folder)"
    )


def _decode(path: Path) -> tuple[str, int]:
    """UTF-8 text of `path` with undecodable bytes replaced, and how many U+FFFD that introduced.

    Subtle: a file may already contain U+FFFD legitimately (bytes EF BF BD); those are not counted.
    """
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    return text, text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode("utf-8"))


def _json_rows(path: Path, text: str, columns: dict[str, str], key: str) -> list[dict]:
    """Rows of a .jsonl (one object per line) or .json file (a list of objects, one object, or JSON lines).

    The number next to each row is what an error message shows: its line (JSON lines) or its position
    in the list (a .json list).
    """
    whole: Any = None
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not a single JSON value: read it as JSON lines below
    if isinstance(whole, list):
        rows = list(enumerate(whole, start=1))
    elif isinstance(whole, dict):
        rows = [(1, whole)]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LlmlabError(f"{key}: {path}:{lineno}: not valid JSON ({e.msg})") from None
    out = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise LlmlabError(
                f"{key}: {path}:{lineno}: expected a JSON object with the fields {sorted(columns)}"
            )
        for column, column_key in columns.items():
            if column not in row:
                raise LlmlabError(
                    f"{column_key}: '{column}' is not a field of {path} (row {lineno} has {sorted(row)})"
                )
        out.append({c: row[c] for c in columns} | {"_where": f"{path}:{lineno}"})
    return out


def _read_parquet(path: Path, columns: dict[str, str]) -> list[dict]:
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise LlmlabError(
            f"{next(iter(columns.values())).rsplit('.', 1)[0]}: {path}: not a readable parquet file ({e})"
        ) from None
    for column, column_key in columns.items():
        if column not in names:
            raise _missing_column(column_key, column, str(path), names)
    return [row | {"_where": str(path)} for row in pq.read_table(path, columns=list(columns)).to_pylist()]


def _read_saved_dataset(path: Path, columns: dict[str, str], key: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise LlmlabError(
            f"{key}.paths: {path} holds several splits {list(ds)}; point the pattern at one of them, "
            f"e.g. '{path.name}/{next(iter(ds))}'"
        )
    for column, column_key in columns.items():
        if column not in ds.column_names:
            raise _missing_column(column_key, column, str(path), ds.column_names)
    return [{c: row[c] for c in columns} | {"_where": str(path)} for row in ds.select_columns(list(columns))]
