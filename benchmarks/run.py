"""Run every benchmark and rewrite the results in docs/benchmarks.md.

    make bench                                  # or: python benchmarks/run.py
    python benchmarks/run.py generation tokenizer  # only some (pretrain, options, generation, tokenizer, ppo, pipeline)

Each benchmark's section of docs/benchmarks.md sits between `<!-- results:NAME -->` markers and is
replaced whole; the text around it (what is measured, and why) is left alone.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    generation,
    pipeline,
    ppo_iteration,
    pretrain_options,
    pretrain_throughput,
    tokenizer_data,
)
from benchmarks.measure import machine, replace_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


def pretrain_section(r: dict) -> str:
    return "\n".join(
        [
            f"Measured {datetime.date.today()} on {machine()}.",
            f"Model: {r['model']}; batch {r['batch']}; best of {len(r['all_plain'])} interleaved rounds each.",
            "",
            "| loop | tokens/s | MFU (vs fp32 matmul peak) |",
            "|---|---|---|",
            f"| plain PyTorch | {r['plain_tokens_per_s']:,.0f} | {r['plain_mfu']:.1%} |",
            f"| Lightning stage | {r['lightning_tokens_per_s']:,.0f} | {r['lightning_mfu']:.1%} |",
            f"| Lightning stage, `pretrain.compile: true` | {r['compiled_tokens_per_s']:,.0f} | "
            f"{r['compiled_tokens_per_s'] * r['lightning_mfu'] / r['lightning_tokens_per_s']:.1%} |",
            f"| GPT-2-shaped baseline, minimal loop ({r['gpt2_params']:,} parameters; ours {r['params']:,}) "
            f"| {r['gpt2_tokens_per_s']:,.0f} | — |",
            "",
            f"Lightning keeps **{r['lightning_over_plain']:.1%}** of the plain loop's throughput; the stage runs at "
            f"**{r['lightning_over_gpt2']:.2f}×** the GPT-2-shaped baseline (goal ≥ 1.1×) "
            f"(all rounds: plain {', '.join(f'{v:,.0f}' for v in r['all_plain'])}; "
            f"Lightning {', '.join(f'{v:,.0f}' for v in r['all_lightning'])}; "
            f"baseline {', '.join(f'{v:,.0f}' for v in r['all_gpt2'])}). "
            f"Compiled, the stage runs at **{r['compiled_over_gpt2']:.2f}×** the baseline (all rounds: "
            f"{', '.join(f'{v:,.0f}' for v in r['all_compiled'])}; warm-up steps including the compile: "
            f"{', '.join(f'{v:.0f} s' for v in r['compiled_warmup_s'])}). "
            f"Measured fp32 matmul peak: {r['matmul_peak_gflops']:.0f} GFLOP/s.",
        ]
    )


def options_section(r: dict) -> str:
    rows = [
        f"| {v['variant']} | {v['tokens_per_s']:,.0f} | **{v['vs_stage']:.2f}×** | {v['warmup_s']:.1f} s | {v['final_loss']:.3f} |"
        for v in r["variants"]
    ]
    return "\n".join(
        [
            f"Measured {datetime.date.today()} on {machine()}.",
            f"Model: {r['model']}; batch {r['batch']}; {r['steps']} steps, timed after {r['warmup']}; best of {r['rounds']} interleaved rounds.",
            "",
            "| variant | tokens/s | against the stage's set-up | warm-up (incl. compiling) | loss, last 50 steps |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def generation_section(r: dict) -> str:
    rows = [
        f"| {x['batch']} | {x['new_tokens']:,} | {x['cached_tokens_per_s']:,.0f} | {x['uncached_tokens_per_s']:,.0f} | "
        f"**{x['speedup']:.1f}×** | {'yes' if x['same_tokens'] else 'NO'} |"
        for x in r["runs"]
    ]
    return "\n".join(
        [
            f"Measured {datetime.date.today()} on {machine()}.",
            f"Model: {r['model']}, random weights; a {r['prompt_len']}-token prompt; greedy.",
            "",
            "| batch | new tokens | cached tokens/s | uncached tokens/s | speed-up | same tokens |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def tokenizer_section(r: dict) -> str:
    t = r["tokenizer"]
    lines = [
        f"Measured {datetime.date.today()} on {machine()}.",
        "",
        f"- BPE training (vocabulary {t['vocab_size']:,}): {t['train_mb']:.0f} MB of text in {t['train_s']:.1f} s, "
        f"**{t['train_mb_per_s']:.1f} MB/s**.",
        f"- Batch encoding: {t['encode_mb']:.0f} MB into {t['encode_tokens']:,} tokens in {t['encode_s']:.1f} s, "
        f"**{t['encode_tokens_per_s']:,.0f} tokens/s**.",
        "",
        "| corpus | parquet | tokenizer stage (train + encode) | train tokens | shards | peak memory of the stage | "
        "loader: own memory / shard pages resident |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {d['corpus_gb']:g} GB of text | {d['parquet_mb']:,.0f} MB | {d['stage_s']:.0f} s | {d['train_tokens']:,} | "
            f"{d['shards']} ({d['token_mb']:,.0f} MB) | **{d['peak_rss_mb']:,.0f} MB** | {d['loader_anon_mb']:,.0f} MB / "
            f"{d['loader_file_mb']:,.0f} MB |"
            for d in r["data"]
        ],
    ]
    return "\n".join(lines)


def ppo_section(r: dict) -> str:
    return "\n".join(
        [
            f"Measured {datetime.date.today()} on {machine()}; {r['iterations_timed']} iterations after a warm-up.",
            "",
            "| phase | seconds per iteration | share |",
            "|---|---|---|",
            f"| generation (sampling {r['rollout_batch_size']} replies, KV cache) | {r['generation_s']:.2f} | **{r['generation_share']:.0%}** |",
            f"| scoring (policy, reference, reward and value passes; GAE) | {r['scoring_s']:.2f} | {r['scoring_s'] / r['total_s']:.0%} |",
            f"| optimisation (PPO epochs) | {r['update_s']:.2f} | {r['update_s'] / r['total_s']:.0%} |",
            f"| total | {r['total_s']:.2f} | |",
            "",
            f"**{r['episodes_per_s']:.1f} episodes per second**; replies averaged {r['mean_reply_tokens']:.0f} tokens.",
        ]
    )


def pipeline_section(r: dict) -> str:
    return "\n".join(
        [
            f"Measured {datetime.date.today()} on {r.get('machine') or machine()}: `dvc repro --single-item` stage by "
            f"stage in a fresh clone (commit {r['commit']}, seed {r['seed'] if r['seed'] is not None else 'of params.yaml'}).",
            "",
            "| stage | wall time | peak memory |",
            "|---|---|---|",
            *[
                f"| {x['stage']} | {x['seconds'] // 60:.0f} min {x['seconds'] % 60:.0f} s | {x['peak_rss_mb']:,.0f} MB |"
                for x in r["stages"]
            ],
            f"| **whole pipeline** | **{r['total_s'] // 60:.0f} min {r['total_s'] % 60:.0f} s** | {r['peak_rss_mb']:,.0f} MB |",
        ]
    )


BENCHMARKS = {
    "pretrain": (lambda: pretrain_throughput.run(steps=300, warmup=30, rounds=3), pretrain_section),
    "options": (pretrain_options.run, options_section),
    "generation": (generation.run, generation_section),
    "tokenizer": (tokenizer_data.run, tokenizer_section),
    "ppo": (ppo_iteration.run, ppo_section),
    "pipeline": (pipeline.run, pipeline_section),  # ~17 minutes
}


def main() -> None:
    names = sys.argv[1:] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    for name in names:
        measure, section = BENCHMARKS[name]
        result = measure()
        print(json.dumps(result, indent=2))
        DOC.write_text(replace_section(DOC.read_text(), name, section(result), DOC))
        print(f"wrote the {name} section of {DOC}")


if __name__ == "__main__":
    main()
