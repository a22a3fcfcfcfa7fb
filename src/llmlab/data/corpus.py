"""The corpus stage: documents from one source, split into train and validation, written as parquet.

Three sources (`corpus.source` in params.yaml):

    synthetic   the fictional world of `llmlab.data.world` (biographies, stories, additions) + its world.json
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

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmlab.data.sources import hf_rows, local_rows
from llmlab.data.world import Document, World, build_world, synthetic_documents
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import atomic_path
from llmlab.params import CorpusConfig, HFCorpus, LocalCorpus

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
    return list(iter_corpus(out_dir, split))


def iter_corpus(out_dir: Path, split: str, batch_rows: int = 4096) -> Iterator[str]:
    """The same texts as `read_corpus`, streamed a parquet batch at a time: memory holds one batch,
    whatever the size of the corpus. A missing file is an error now, not at the first text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(out_dir) / f"{split}.parquet"
    if not path.exists():
        raise MissingArtifactError(path, "corpus")

    def texts() -> Iterator[str]:
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["text"]):
                yield from batch.column(0).to_pylist()
        except (pa.ArrowInvalid, KeyError) as e:
            raise LlmlabError(
                f"{path}: unreadable corpus file ({e}); re-create it with `dvc repro corpus`"
            ) from None

    return texts()


# ------------------------------------------------------------------------------------------ sources


def _hf_texts(cfg: HFCorpus, root: Path) -> _Texts:
    """Up to `max_documents` texts of a Hugging Face dataset split."""
    got = hf_rows(
        cfg.name,
        cfg.config,
        cfg.split,
        cfg.streaming,
        {cfg.text_column: "corpus.hf.text_column"},
        "corpus.hf",
        root,
        cfg.max_documents,
        offline_fix="corpus.source: local with corpus.local.paths (e.g. data/raw/*.parquet)",
    )
    return _Texts([_as_text(r[cfg.text_column], f"dataset '{cfg.name}'", cfg.text_column) for r in got.rows])


def _local_texts(cfg: LocalCorpus, root: Path) -> _Texts:
    """Texts of every file the glob patterns match (a .txt file is one document)."""
    got = local_rows(
        cfg.paths,
        {cfg.text_column: "corpus.local.text_column"},
        "corpus.local",
        root,
        txt_column=cfg.text_column,
    )
    return _Texts(
        [_as_text(r[cfg.text_column], r.get("_where", "?"), cfg.text_column) for r in got.rows], got.replaced
    )


def _as_text(value: Any, where: str, column: str) -> str:
    """A text cell as a string: None counts as an empty document, anything else but str is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LlmlabError(
            f"{where}: column '{column}' holds {type(value).__name__} values, not text; pick the text column"
        )
    return value
