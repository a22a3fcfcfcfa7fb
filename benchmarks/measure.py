"""Run a command and measure it: wall time and the peak memory of its process tree."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# A fresh interpreter per command, so that its RUSAGE_CHILDREN peak is this command's alone (a process's
# children's peak includes their waited-for descendants: DVC's stage process, for one).
_PROBE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_rss_mb: float  # the largest maximum resident set size of the command's processes
    output: str  # stdout and stderr, for a failure message


def run_measured(cmd: list[str], **kwargs) -> Measured:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PROBE, *cmd], capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - t0
    code, max_rss_kb = map(int, out.stdout.split()[-2:])
    return Measured(code, seconds, max_rss_kb / 1024, out.stdout + out.stderr)


def machine() -> str:
    """The CPU, whether it has AVX-512 (other floating-point paths without it: docs/results.md), the threads
    torch uses, and the versions: the line every benchmark result names its machine with."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line
    except OSError:
        pass
    simd = " with AVX-512" if " avx512f" in flags else " without AVX-512" if flags else ""
    threads = torch.get_num_threads()
    return (
        f"{cpu}{simd}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def replace_section(text: str, name: str, body: str, where: Path) -> str:
    """`text` with what stands between its `<!-- results:NAME -->` and `<!-- /results:NAME -->` lines replaced by
    `body`: a generated section of a doc, the prose around it kept."""
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where}: no <!-- results:{name} --> ... <!-- /results:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
