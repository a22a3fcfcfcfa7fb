"""Provenance: which inputs made an artifact, recorded with the MLflow run that made it.

Under `dvc repro`, a stage's MLflow run is tagged with the hash of every dependency and output that
`dvc.yaml` lists for it (`dvc.deps.<path>`, `dvc.outs.<path>`), computed the way DVC computes them, so
the tags equal the stage's entry in `dvc.lock`: a file's md5, and for a folder the md5 of its sorted
listing of (md5, relative path) with `.dir` appended. Going from a model in the MLflow UI to the commit
and data that made it, or from a `dvc.lock` entry to its run, is a string comparison
(tests/test_pipeline_e2e.py checks every hash against `dvc.lock`).

Files that `.dvcignore` hides from DVC (Python's `__pycache__`) are skipped here as well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from llmlab.io import file_hash

IGNORED_DIRS = {"__pycache__"}  # keep in step with .dvcignore
IGNORED_SUFFIXES = (".pyc",)


def dvc_md5(path: str | Path) -> str:
    """The hash `dvc.lock` records for `path`: md5 of a file, or `<md5 of the listing>.dir` of a folder."""
    path = Path(path)
    if not path.is_dir():
        return file_hash(path, "md5")
    entries = [
        {"md5": file_hash(f, "md5"), "relpath": f.relative_to(path).as_posix()}
        for f in path.rglob("*")
        if f.is_file()
        and not f.name.endswith(IGNORED_SUFFIXES)
        and not IGNORED_DIRS & set(f.relative_to(path).parts)
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def stage_paths(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> tuple[list[str], list[str]] | None:
    """(deps, outs) of `stage` as `dvc.yaml` lists them (outs include metrics and plots), or None when
    there is no such file or stage (a stage run by hand, outside the pipeline)."""
    try:
        spec = yaml.safe_load(Path(dvc_yaml).read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None

    def paths(entries) -> list[str]:  # an entry is a path, or {path: {options}}
        return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]

    outs = paths(spec.get("outs")) + paths(spec.get("metrics")) + paths(spec.get("plots"))
    return paths(spec.get("deps")), outs


def hashes(paths: list[str], prefix: str) -> dict[str, str]:
    """{'<prefix>.<path>': dvc hash} for each path that exists."""
    return {f"{prefix}.{p}": dvc_md5(p) for p in paths if Path(p).exists()}
