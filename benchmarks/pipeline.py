"""The whole default pipeline, stage by stage: wall time and peak memory, in a fresh clone.

Clones this repository into a temporary folder and runs `dvc repro --single-item <stage>` for each stage
in order, each under a small probe process whose RUSAGE_CHILDREN peak is that stage's maximum resident
set size (the stage process is DVC's child, and DVC waits for it). The wall time of each includes DVC's
own start and hashing, as a user's `dvc repro` does. Takes as long as the pipeline (~17 minutes on 2 cores).

    python benchmarks/pipeline.py       # prints JSON; `python benchmarks/run.py pipeline` writes the doc
    python benchmarks/pipeline.py --seed 7 --keep /tmp/seed7   # another seed; keep the run's folder

The JSON also holds every `metrics/*.json` of the run, for the results over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, too

from benchmarks.measure import machine, run_measured  # noqa: E402


def run(keep: str | None = None, seed: int | None = None) -> dict:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    with tempfile.TemporaryDirectory() as d:
        repo = Path(keep or d) / "llmlab"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        if seed is not None:  # the whole params file as committed, but this seed
            params = yaml.safe_load((repo / "params.yaml").read_text())
            (repo / "params.yaml").write_text(yaml.safe_dump({**params, "seed": seed}, sort_keys=False))
        # PYTHONPATH: the clone's own library, not the one the venv's editable install points at.
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
            "PYTHONPATH": str(repo / "src"),
        }
        rows = []
        for stage in stages:
            m = run_measured(["dvc", "repro", "--single-item", stage], cwd=repo, env=env)
            if m.returncode != 0:
                raise SystemExit(f"stage {stage} failed:\n{m.output[-2000:]}")
            rows.append({"stage": stage, "seconds": m.seconds, "peak_rss_mb": m.peak_rss_mb})
            print(json.dumps(rows[-1]), flush=True)
        metrics = {p.stem: json.loads(p.read_text()) for p in sorted((repo / "metrics").glob("*.json"))}
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        )
    return {
        "commit": commit.stdout.strip(),
        "seed": seed,
        "machine": machine(),
        "stages": rows,
        "total_s": sum(r["seconds"] for r in rows),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "metrics": metrics,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the whole default pipeline, stage by stage, in a fresh clone")
    ap.add_argument("--seed", type=int, help="run with this seed instead of params.yaml's")
    ap.add_argument("--keep", help="keep the run's folder here (default: a temporary one, removed)")
    args = ap.parse_args()
    print(json.dumps(run(args.keep, args.seed), indent=2))
