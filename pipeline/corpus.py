"""Stage `corpus`: the documents to pretrain on, split into train and validation.

Source `synthetic` (default) generates the synthetic world and writes its ground truth (world.json);
`hf` reads a Hugging Face dataset; `local` reads files. Outputs: <out>/{train,validation}.parquet,
<out>/world.json, and the counts in the metrics file.
"""

from __future__ import annotations

from pathlib import Path

from llmlab.data.corpus import build_corpus, write_corpus
from llmlab.io import atomic_path, write_json
from llmlab.params import Params
from llmlab.stage import run_stage
from llmlab.tracking import StageRun


def add_arguments(p):
    p.add_argument("--out", required=True, help="output folder (parquet splits + world.json)")
    p.add_argument("--metrics", required=True, help="metrics JSON file")


def main(args, params: Params) -> None:
    cfg = params.corpus
    result = build_corpus(cfg, params.seed, root=Path.cwd())
    with StageRun("corpus", {"seed": params.seed, "corpus": cfg.model_dump()}) as run:
        with atomic_path(args.out, is_dir=True) as tmp:
            write_corpus(result, tmp)
        write_json(args.metrics, result.stats)
        run.log_metrics(result.stats)
        run.log_artifact(Path(args.out) / "world.json")
        run.log_artifact(args.metrics)


if __name__ == "__main__":
    run_stage("corpus", main, add_arguments)
