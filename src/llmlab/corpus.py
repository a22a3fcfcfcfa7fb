"""The corpus stage: documents from one source, split into train and validation, written as parquet.

Three sources (`corpus.source` in params.yaml):

    synthetic   the fictional world of `llmlab.world` (biographies, stories, additions) + its world.json
    hf          a Hugging Face dataset via `datasets.load_dataset` (a Hub id or a local dataset folder)
    local       files under the repository: .txt (one document per file), .jsonl / .json (one per row),
                .parquet (one per row), or a folder written by `datasets.Dataset.save_to_disk`

Whatever the source, a document is a record {"text": ..., "kind": ...} (kind "external" for hf/local).
Surrounding whitespace is trimmed; documents left empty are dropped and counted. Bytes that are not
UTF-8 (.txt / .jsonl / .json) are replaced by U+FFFD, counted, and the files named in a warning: a
corpus with a few stray bytes still builds, but you hear about it.

The split is a deterministic shuffle by the seed: `val_fraction` of the documents (at least one) go to
validation. For the synthetic source the split is over documents, not people; that is fine because
every fact is stated in several documents.

Outputs (`write_corpus`): train.parquet and validation.parquet (columns text, kind) and world.json. The
world file is always written, so DVC has a stable output; for hf/local it holds no people and its
"source" says where the text came from, and later stages skip fact recall.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import atomic_path
from llmlab.params import CorpusConfig, HFCorpus, LocalCorpus
from llmlab.world import Document, World, build_world, synthetic_documents

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
REPLACEMENT = "\ufffd"  # what errors="replace" puts in place of each undecodable byte sequence
HUB_PROBE_TIMEOUT_S = 10


@dataclass
class CorpusResult:
    train: list[Document]
    validation: list[Document]
    world: World | None  # None unless the source is synthetic
    stats: dict[str, int | float]
    source: str = "synthetic"


@dataclass
class _Texts:
    """Raw texts read from one source, with the counts the stats report."""

    texts: list[str] = field(default_factory=list)
    replaced: int = 0  # U+FFFD characters introduced by decoding


def build_corpus(cfg: CorpusConfig, seed: int, root: Path) -> CorpusResult:
    """Read or generate the documents of `cfg.source`, drop empty ones, and split them by `seed`.

    `root` is the repository root: local glob patterns (and a local hf dataset folder) are relative to it.
    stats keys: documents, documents_train, documents_validation, characters_train, characters_validation,
    dropped_empty, replaced_characters, and documents_<kind> for each kind present (bio, story,
    arithmetic; or external).
    """
    world = None
    replaced = 0
    if cfg.source == "synthetic":
        world = build_world(cfg.synthetic, seed)
        docs = synthetic_documents(world, cfg.synthetic, seed)
    else:
        raw = _hf_texts(cfg.hf, root) if cfg.source == "hf" else _local_texts(cfg.local, root)
        docs = [{"text": t, "kind": "external"} for t in raw.texts]
        replaced = raw.replaced

    kept = [{"text": d["text"].strip(), "kind": d["kind"]} for d in docs if d["text"].strip()]
    dropped = len(docs) - len(kept)
    if len(kept) < 2:
        raise LlmlabError(
            f"corpus.{cfg.source}: {len(kept)} non-empty document(s) ({dropped} empty dropped); need at least 2, "
            "one for train and one for validation: add more documents"
        )
    random.Random(f"{seed}/split").shuffle(kept)
    # At least one document on each side, whatever val_fraction says.
    n_val = min(max(1, round(len(kept) * cfg.val_fraction)), len(kept) - 1)
    validation, train = kept[:n_val], kept[n_val:]

    stats: dict[str, int | float] = {
        "documents": len(kept),
        "documents_train": len(train),
        "documents_validation": len(validation),
        "characters_train": sum(len(d["text"]) for d in train),
        "characters_validation": sum(len(d["text"]) for d in validation),
        "dropped_empty": dropped,
        "replaced_characters": replaced,
    }
    for kind, n in sorted(Counter(d["kind"] for d in kept).items()):
        stats[f"documents_{kind}"] = n
    log.info(
        "corpus (%s): %d train / %d validation documents, %d empty dropped",
        cfg.source,
        len(train),
        n_val,
        dropped,
    )
    return CorpusResult(train=train, validation=validation, world=world, stats=stats, source=cfg.source)


def write_corpus(result: CorpusResult, out_dir: Path) -> None:
    """Write train.parquet, validation.parquet (columns text, kind) and world.json into `out_dir`."""
    out_dir = Path(out_dir)
    for split, docs in (("train", result.train), ("validation", result.validation)):
        table = pa.table(
            {"text": [d["text"] for d in docs], "kind": [d["kind"] for d in docs]},
            schema=pa.schema([("text", pa.string()), ("kind", pa.string())]),
        )
        with atomic_path(out_dir / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp)
    world = result.world if result.world is not None else World(people=[], source=result.source)
    world.save(out_dir / "world.json")


def read_corpus(out_dir: Path, split: str) -> list[str]:
    """The texts of one split written by `write_corpus`; a missing file names the `corpus` stage."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(out_dir) / f"{split}.parquet"
    if not path.exists():
        raise MissingArtifactError(path, "corpus")
    try:
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowInvalid, KeyError) as e:
        raise LlmlabError(
            f"{path}: unreadable corpus file ({e}); re-create it with `dvc repro corpus`"
        ) from None


# ------------------------------------------------------------------------------------------ source: hf


def _hf_texts(cfg: HFCorpus, root: Path) -> _Texts:
    """Up to `max_documents` texts of a Hugging Face dataset split.

    Offline, `load_dataset` would retry the Hub for ~25 s (5 retries with backoff) before failing. So for
    a Hub id we first ask the Hub about the dataset once, without retries: if that fails, the stage fails
    at once with one line naming the dataset and the way out (corpus.source: local).
    """
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import httpx  # the HTTP client of huggingface_hub (httpx or its fork)

    # Connection failures surface as any of these, depending on where in datasets/huggingface_hub they happen.
    load_errors = (datasets.exceptions.DatasetsError, ConnectionError, FileNotFoundError, HfHubHTTPError,
                   httpx.TransportError, ValueError)  # fmt: skip
    where = f"corpus.hf: could not load dataset '{cfg.name}'"
    local = Path(cfg.name) if Path(cfg.name).is_absolute() else root / cfg.name
    on_hub = not local.exists()
    # The way out, for a Hub dataset; a local folder's problem is in the folder, so no hint about going offline.
    fix = (
        ". Offline? Download it elsewhere and use corpus.source: local with corpus.local.paths (e.g. data/raw/*.parquet)"
        if on_hub
        else ""
    )
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    if on_hub and not offline:
        try:
            HfApi().dataset_info(cfg.name, timeout=HUB_PROBE_TIMEOUT_S)
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
            raise LlmlabError(f"{where}: the Hub answered {_short(e)}{fix}") from None
        except (httpx.TransportError, OSError) as e:
            raise LlmlabError(
                f"{where}: the Hub is unreachable ({_short(e)}){fix}, "
                "or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
            ) from None

    try:
        ds = datasets.load_dataset(
            str(local) if not on_hub else cfg.name, cfg.config, split=cfg.split, streaming=cfg.streaming
        )
    except load_errors as e:
        raise LlmlabError(f"{where}: {_short(e)}{fix}") from None

    columns = ds.column_names  # None for some streaming datasets whose features are unknown until read
    if columns is not None and cfg.text_column not in columns:
        raise LlmlabError(
            f"corpus.hf.text_column: '{cfg.text_column}' is not a column of '{cfg.name}'; it has {columns}"
        )
    out = _Texts()
    try:
        for i, row in enumerate(ds):
            if cfg.max_documents is not None and i >= cfg.max_documents:
                break
            if cfg.text_column not in row:
                raise LlmlabError(
                    f"corpus.hf.text_column: '{cfg.text_column}' is not a column of '{cfg.name}'; it has {sorted(row)}"
                )
            out.texts.append(_as_text(row[cfg.text_column], f"dataset '{cfg.name}'", cfg.text_column))
    except load_errors as e:  # a streamed dataset can also lose the connection half-way
        raise LlmlabError(
            f"{where}: reading failed after {len(out.texts)} documents: {_short(e)}{fix}"
        ) from None
    return out


def _short(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


# --------------------------------------------------------------------------------------- source: local


def _local_texts(cfg: LocalCorpus, root: Path) -> _Texts:
    """Texts of every file the glob patterns match, in pattern order, files sorted within a pattern."""
    paths: list[Path] = []
    for pattern in cfg.paths:
        for match in sorted(glob.glob(str(root / pattern), recursive=True)):
            if Path(match) not in paths:
                paths.append(Path(match))
    if not paths:
        raise LlmlabError(
            f"corpus.local.paths: no file matches {cfg.paths} (relative to {root}); "
            "put .txt/.jsonl/.json/.parquet files there or fix the patterns"
        )
    out = _Texts()
    replaced_in: list[str] = []
    for path in paths:
        texts, replaced = _read_local(path, cfg.text_column)
        out.texts += texts
        out.replaced += replaced
        if replaced:
            replaced_in.append(f"{path} ({replaced})")
    if replaced_in:
        log.warning(
            "corpus.local: %d undecodable byte sequence(s) replaced by U+FFFD in %s",
            out.replaced,
            ", ".join(replaced_in),
        )
    return out


def _read_local(path: Path, column: str) -> tuple[list[str], int]:
    """(texts, replacement characters introduced) of one matched path, by its type."""
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path, column), 0
        raise LlmlabError(
            f"corpus.local.paths: {path} is a folder but not one written by Dataset.save_to_disk; "
            "match the files inside it instead (e.g. 'data/raw/**/*.txt')"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text, replaced = _decode(path)
        return [text], replaced
    if suffix in (".jsonl", ".json"):
        text, replaced = _decode(path)
        return _json_rows(path, text, column), replaced
    if suffix == ".parquet":
        return _read_parquet(path, column), 0
    raise LlmlabError(
        f"corpus.local.paths: {path}: unsupported file type '{suffix}' "
        "(use .txt, .jsonl, .json, .parquet or a Dataset.save_to_disk folder)"
    )


def _decode(path: Path) -> tuple[str, int]:
    """UTF-8 text of `path` with undecodable bytes replaced, and how many U+FFFD that introduced.

    Subtle: a file may already contain U+FFFD legitimately (bytes EF BF BD); those are not counted.
    """
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    return text, text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode("utf-8"))


def _json_rows(path: Path, text: str, column: str) -> list[str]:
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
                raise LlmlabError(f"corpus.local: {path}:{lineno}: not valid JSON ({e.msg})") from None
    texts = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise LlmlabError(
                f"corpus.local: {path}:{lineno}: expected a JSON object with a '{column}' field"
            )
        if column not in row:
            raise LlmlabError(
                f"corpus.local.text_column: '{column}' is not a field of {path} (row {lineno} has {sorted(row)})"
            )
        texts.append(_as_text(row[column], f"{path}:{lineno}", column))
    return texts


def _read_parquet(path: Path, column: str) -> list[str]:
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise LlmlabError(f"corpus.local: {path}: not a readable parquet file ({e})") from None
    if column not in names:
        raise LlmlabError(f"corpus.local.text_column: '{column}' is not a column of {path}; it has {names}")
    values = pq.read_table(path, columns=[column]).column(column)
    return [_as_text(v, str(path), column) for v in values.to_pylist()]


def _read_saved_dataset(path: Path, column: str) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise LlmlabError(
            f"corpus.local.paths: {path} holds several splits {list(ds)}; point the pattern at one of them, "
            f"e.g. '{path.name}/{next(iter(ds))}'"
        )
    if column not in ds.column_names:
        raise LlmlabError(
            f"corpus.local.text_column: '{column}' is not a column of {path}; it has {ds.column_names}"
        )
    return [_as_text(v, str(path), column) for v in ds[column]]


def _as_text(value: Any, where: str, column: str) -> str:
    """A text cell as a string: None counts as an empty document, anything else but str is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LlmlabError(
            f"{where}: column '{column}' holds {type(value).__name__} values, not text; pick the text column"
        )
    return value
