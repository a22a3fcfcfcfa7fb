"""Tokenizer and data throughput, and the memory of tokenising a corpus larger than memory should need.

- BPE training: MB of text per second (`llmlab.data.tokenizer.train_tokenizer`, the default tokenizer params).
- Batch encoding: tokens per second (`tokenize_to_shards`, `encode_batch` on every core).
- Data: the real `tokenizer` stage (`pipeline/tokenizer.py`, learning the vocabulary and encoding) run
  as a process on a generated corpus of 0.25 GB and of 1 GB. Its peak memory is the process's maximum
  resident set size (getrusage). The training split is streamed, so the peak should not grow with the
  corpus.

The text is generated: documents of pseudo-words drawn from a Zipf distribution, with numbers and
punctuation, so that BPE has realistic work (the synthetic world corpus is only a few MB).

    python benchmarks/tokenizer_data.py            # prints JSON; `make bench` writes docs/benchmarks.md
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmlab.data.tokenizer import tokenize_to_shards, train_tokenizer
from llmlab.params import TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, too

from benchmarks.measure import run_measured  # noqa: E402


def documents(n_bytes: int, seed: int = 0) -> Iterator[str]:
    """About `n_bytes` of text in ~600-byte documents of Zipf-distributed pseudo-words."""
    rng = np.random.default_rng(seed)
    syllables = [
        "ka",
        "ri",
        "mo",
        "ten",
        "sa",
        "lu",
        "dor",
        "vi",
        "ne",
        "pa",
        "the",
        "and",
        "in",
        "ol",
        "gra",
        "st",
    ]
    words = np.array(["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(30_000)])
    made = 0
    while made < n_bytes:
        ranks = np.minimum(rng.zipf(1.2, 100), len(words)) - 1
        text = " ".join(words[ranks]).capitalize() + f", {rng.integers(0, 10_000)}. "
        text = text * 2 + text[: len(text) // 2]  # ~600 bytes; repeats as real text does
        made += len(text)
        yield text


def write_corpus(folder: Path, n_bytes: int) -> None:
    """train.parquet (~n_bytes, in row groups) and a small validation.parquet, as the corpus stage writes."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(folder / "train.parquet", schema) as w:
        batch: list[str] = []
        for doc in documents(n_bytes, seed=1):
            batch.append(doc)
            if len(batch) == 20_000:
                w.write_table(pa.table({"text": batch}, schema=schema))
                batch = []
        if batch:
            w.write_table(pa.table({"text": batch}, schema=schema))
    pq.write_table(
        pa.table({"text": list(documents(2_000_000, seed=2))}, schema=schema), folder / "validation.parquet"
    )


def tokenizer_throughput(train_mb: int = 20, encode_mb: int = 100) -> dict:
    cfg = TokenizerConfig()
    train = list(documents(train_mb * 10**6, seed=3))
    t0 = time.perf_counter()
    tok = train_tokenizer(train, cfg)
    train_s = time.perf_counter() - t0
    encode = list(documents(encode_mb * 10**6, seed=4))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        _, n = tokenize_to_shards(tok, encode, d, "train", TokenizerConfig().shard_tokens)
        encode_s = time.perf_counter() - t0
    return {
        "vocab_size": tok.get_vocab_size(),
        "train_mb": sum(map(len, train)) / 1e6,
        "train_s": train_s,
        "train_mb_per_s": sum(map(len, train)) / 1e6 / train_s,
        "encode_mb": sum(map(len, encode)) / 1e6,
        "encode_tokens": n,
        "encode_s": encode_s,
        "encode_tokens_per_s": n / encode_s,
    }


def stage_on_corpus(gb: float) -> dict:
    """The tokenizer stage on a generated corpus of `gb` GB: wall time, tokens, peak RSS of the process."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("LLMLAB_BENCH_TMP")) as d:
        d = Path(d)
        t0 = time.perf_counter()
        write_corpus(d / "corpus", int(gb * 1e9))
        make_s = time.perf_counter() - t0
        size = (d / "corpus" / "train.parquet").stat().st_size
        cmd = [
            sys.executable,
            str(ROOT / "pipeline" / "tokenizer.py"),
            "--params",
            str(ROOT / "params.yaml"),
            "--corpus",
            str(d / "corpus"),
            "--out",
            str(d / "tok"),
            "--tokens",
            str(d / "tokens"),
            "--metrics",
            str(d / "m.json"),
            "--report",
            str(d / "report"),
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
        m = run_measured(cmd, env=env)
        if m.returncode != 0:
            raise SystemExit(f"tokenizer stage failed:\n{m.output[-3000:]}")
        meta = json.loads((d / "tokens" / "meta.json").read_text())
        loader = run_measured([sys.executable, "-c", READ_WINDOWS, str(d / "tokens")], env=env)
        if loader.returncode != 0:
            raise SystemExit(f"reading windows failed:\n{loader.output[-3000:]}")
        anon_kb, file_kb = map(int, re.search(r"loader memory kB: (\d+) (\d+)", loader.output).groups())
        return {
            "corpus_gb": gb,
            "parquet_mb": size / 1e6,
            "make_corpus_s": make_s,
            "stage_s": m.seconds,
            "train_tokens": meta["splits"]["train"],
            "shards": len(meta["shards"]["train"]),
            "token_mb": sum((d / "tokens" / f).stat().st_size for f in meta["shards"]["train"]) / 1e6,
            "peak_rss_mb": m.peak_rss_mb,
            "loader_peak_rss_mb": loader.peak_rss_mb,
            "loader_anon_mb": anon_kb / 1024,
            "loader_file_mb": file_kb / 1024,
        }


# The pretraining loader over the shards: 20,000 random windows of 1,025 tokens, in a process of its own.
# It prints the process's own memory (RssAnon: what it allocated) and the pages of the mapped shards that
# are resident (RssFile: page cache, which the kernel's read-ahead fills and drops under pressure).
READ_WINDOWS = """
import sys
from pathlib import Path
from llmlab.training.pretraining import TokenWindows
from llmlab.data.tokenizer import open_split
windows = TokenWindows(open_split(sys.argv[1], "train"), 1024, 20_000, seed=0)
print(sum(int(windows[i][0][0]) for i in range(len(windows))))
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print("loader memory kB:", status["RssAnon"].split()[0], status["RssFile"].split()[0])
"""


def run(sizes_gb=(0.25, 1.0)) -> dict:
    result = {"tokenizer": tokenizer_throughput()}
    print(json.dumps(result["tokenizer"]), flush=True)
    result["data"] = []
    for gb in sizes_gb:
        result["data"].append(stage_on_corpus(gb))
        print(json.dumps(result["data"][-1]), flush=True)
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
