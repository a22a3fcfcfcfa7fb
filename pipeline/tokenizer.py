"""Stage `tokenizer`: train byte-level BPE on the train split and tokenise the corpus for pretraining.

Outputs: <out>/tokenizer.json (loads in `transformers.PreTrainedTokenizerFast`), <tokens>/{train,validation}-NNNNN.bin
(flat token ids, one <|bos|> before each document, in shards of tokenizer.shard_tokens) with <tokens>/meta.json, and the tokenizer report
(characters per token, tokens per number, example words split into tokens).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llmlab.data.corpus import iter_corpus, read_corpus
from llmlab.data.tokenizer import (
    flat_metrics,
    save_tokenizer,
    tokenize_to_shards,
    tokenizer_report,
    train_tokenizer,
    write_token_meta,
)
from llmlab.io import atomic_path, write_json, write_text
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun

log = logging.getLogger("llmlab.tokenizer")


def add_arguments(p):
    p.add_argument("--corpus", required=True, help="corpus folder (from the corpus stage)")
    p.add_argument("--out", required=True, help="folder for tokenizer.json")
    p.add_argument("--tokens", required=True, help="folder for the token files")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--report", required=True, help="folder for the tokenizer report")


def main(args, params: Params) -> None:
    cfg = params.tokenizer
    # The training split is streamed (twice: to learn the vocabulary, then to encode), so a corpus larger
    # than memory works; the validation split is small and read whole, for the report.
    corpus = Path(args.corpus)
    iter_corpus(corpus, "train")  # a missing file is an error before any run starts
    validation = read_corpus(corpus, "validation")
    with StageRun("tokenizer", {"tokenizer": cfg.model_dump()}) as run:
        tok = train_tokenizer(iter_corpus(corpus, "train"), cfg)
        save_tokenizer(tok, Path(args.out) / "tokenizer.json")
        with atomic_path(args.tokens, is_dir=True) as tmp:
            shards, counts = {}, {}
            for split, texts in (("train", iter_corpus(corpus, "train")), ("validation", validation)):
                shards[split], counts[split] = tokenize_to_shards(tok, texts, tmp, split, cfg.shard_tokens)
            write_token_meta(tmp, tok, counts, shards)
        report = tokenizer_report(tok, validation)
        metrics = {**flat_metrics(report), **{f"tokens_{s}": n for s, n in counts.items()}}
        write_json(args.metrics, metrics)
        write_json(Path(args.report) / "report.json", report)
        write_text(Path(args.report) / "examples.md", _examples_markdown(report))
        run.log_metrics(metrics)
        for path in (
            Path(args.out) / "tokenizer.json",
            args.report,
            args.metrics,
            Path(args.tokens) / "meta.json",
        ):
            run.log_artifact(path)
        log.info(
            "vocab %d · %.2f characters per token · %s train tokens",
            report["vocab_size"],
            report["chars_per_token"],
            f"{counts['train']:,}",
        )


def _examples_markdown(report: dict) -> str:
    lines = ["| text | tokens | count |", "|---|---|---|"]
    for ex in report["examples"]:
        pieces = " · ".join(f"`{t}`" for t in ex["tokens"])
        lines.append(f"| `{ex['word']}` | {pieces} | {ex['n_tokens']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    run_stage("tokenizer", main, add_arguments)
