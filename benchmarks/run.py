"""Run every benchmark and rewrite the results in docs/benchmarks.md.

    make bench            # or: python benchmarks/run.py

Each benchmark's section of docs/benchmarks.md sits between `<!-- results:NAME -->` markers and is
replaced whole; the text around it (what is measured, and why) is left alone.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import pretrain_throughput  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


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
            "",
            f"Lightning keeps **{r['lightning_over_plain']:.1%}** of the plain loop's throughput "
            f"(all rounds: plain {', '.join(f'{v:,.0f}' for v in r['all_plain'])}; "
            f"Lightning {', '.join(f'{v:,.0f}' for v in r['all_lightning'])}). "
            f"Measured fp32 matmul peak: {r['matmul_peak_gflops']:.0f} GFLOP/s.",
        ]
    )


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: no <!-- results:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    result = pretrain_throughput.run(steps=300, warmup=30, rounds=3)
    print(json.dumps(result, indent=2))
    DOC.write_text(replace_section(DOC.read_text(), "pretrain", pretrain_section(result)))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
