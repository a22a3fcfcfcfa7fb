"""dvc.yaml is the truth about what each stage depends on: its code deps follow from the code.

DVC reruns a stage when one of its deps changes, so a library file a stage imports but does not list is
a silent stale output: edit it, `dvc status` says "up to date", and the outputs no longer match the
code. Here each stage's code deps are derived from its script's imports (the import closure within
`llmlab`, imports inside functions included) and compared with what dvc.yaml lists. The end-to-end test
checks the same thing through DVC itself (it edits a library file and reads `dvc status`), and checks
the params each stage reads in a real run against its `params:` (`llmlab.params.recording_reads`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from llmlab.params import Params
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])
PACKAGE = "src/llmlab"


def imported_files(path: Path) -> set[str]:
    """The `src/llmlab/...` files that `path` imports, repository-relative, at any depth in the file.

    `from llmlab.data.world import Person` -> {"src/llmlab/data/world.py"}; `from llmlab import model` -> the
    package's __init__.py and model.py. Imports outside llmlab are ignored.
    """
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llmlab":
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.split(".")[0] == "llmlab")
    files = set()
    for module in modules:
        parts = module.split(".")
        for i in range(
            1, len(parts) + 1
        ):  # importing llmlab.a.b runs llmlab/__init__.py and llmlab/a/__init__.py
            stem = "src/" + "/".join(parts[:i])
            for candidate in (f"{stem}.py", f"{stem}/__init__.py"):
                if (ROOT / candidate).is_file():
                    files.add(candidate)
    return files


def import_closure(script: str) -> set[str]:
    """Every llmlab file that running `script` can import, directly or through another llmlab file."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for f in imported_files(ROOT / todo.pop()) - seen:
            seen.add(f)
            todo.append(f)
    return seen


def listed_code(stage: str) -> set[str]:
    return {d for d in DVC["stages"][stage]["deps"] if d.startswith(("src/", "pipeline/"))}


def stages_importing(file: str) -> set[str]:
    """The stages whose script imports `file` (or lists the whole package, as `register` does)."""
    return {s for s in STAGES if file in import_closure(f"pipeline/{s}.py") or PACKAGE in listed_code(s)}


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_scripts_import_closure(stage):
    script = f"pipeline/{stage}.py"
    listed = listed_code(stage)
    if PACKAGE in listed:  # the whole package: nothing it imports can be missing
        assert listed == {script, PACKAGE}, listed
        return
    closure = import_closure(script)
    missing, extra = sorted(closure - listed), sorted(listed - closure - {script})
    assert not missing and not extra, (
        f"dvc.yaml, stage {stage}: deps should list exactly {script} and the llmlab files it imports; "
        f"add {missing}, remove {extra} (`python -m tests.test_dvc_yaml` rewrites them)"
    )


def test_every_listed_dep_exists():
    for stage, spec in DVC["stages"].items():
        for dep in spec["deps"]:
            if dep.startswith(("src/", "pipeline/")):
                assert (ROOT / dep).exists(), f"dvc.yaml, stage {stage}: dep {dep} does not exist"


def test_every_params_section_is_declared_by_some_stage():
    declared = {key.split(".")[0] for spec in DVC["stages"].values() for key in spec.get("params", [])}
    assert declared == set(Params.model_fields)


@pytest.mark.parametrize(
    "params_file", ["params.yaml", "tests/params.smoke.yaml", "recipes/gpu-tinystories.yaml"]
)
def test_every_param_a_stage_lists_is_in_each_params_file(params_file):
    """DVC refuses to run a stage whose listed param is missing from the params file (`dvc repro -P`,
    `--params`): each key dvc.yaml names must be spelled out in every params file users run with."""
    raw = yaml.safe_load((ROOT / params_file).read_text())
    for stage, spec in DVC["stages"].items():
        for key in spec.get("params", []):
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, (
                    f"{params_file}: {key} (stage {stage}) missing"
                )
                node = node[part]


def test_no_stage_script_imports_another():
    for stage in STAGES:
        source = (ROOT / "pipeline" / f"{stage}.py").read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                assert not any(n.split(".")[0] == "pipeline" for n in names), (stage, names)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command_matches_its_script(stage):
    """The command in dvc.yaml runs pipeline/<stage>.py with arguments its parser accepts."""
    argv = shlex.split(DVC["stages"][stage]["cmd"])
    assert argv[:2] == ["python", f"pipeline/{stage}.py"]
    module_spec = importlib.util.spec_from_file_location(
        f"pipeline_{stage}", ROOT / "pipeline" / f"{stage}.py"
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    parser.parse_args(argv[2:])  # exits (SystemExit) on an unknown or missing argument


def test_import_closure_follows_imports_inside_functions(tmp_path):
    """The closure is the reference the deps are checked against, so it is checked too: a file reached
    only through an import inside a function, two files deep, is in it; an unrelated one is not."""
    closure = import_closure("pipeline/corpus.py")
    assert {
        "src/llmlab/__init__.py",
        "src/llmlab/data/corpus.py",
        "src/llmlab/data/world.py",
        "src/llmlab/params.py",
    } <= closure
    assert "src/llmlab/training/ppo.py" not in closure
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from llmlab.data.corpus import build_corpus\n")
    assert "src/llmlab/data/world.py" in import_closure(str(script))  # ROOT / an absolute path is that path


def write_code_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's `src/llmlab/...` deps in dvc.yaml as its script's import closure, in place,
    keeping every other line (comments, data deps, order) as it is."""
    lines, out, stage = path.read_text(encoding="utf-8").split("\n"), [], None
    for i, line in enumerate(lines):
        header = (
            line[2:-1]
            if line.startswith("  ") and not line.startswith("   ") and line.endswith(":")
            else None
        )
        if header in DVC["stages"]:
            stage = header
        is_code = line.startswith("      - src/llmlab/") and stage and PACKAGE not in listed_code(stage)
        if not is_code:
            out.append(line)
        elif not lines[i - 1].startswith(
            "      - src/llmlab/"
        ):  # the first of the block: write the whole closure
            out += [f"      - {f}" for f in sorted(import_closure(f"pipeline/{stage}.py"))]
    path.write_text("\n".join(out), encoding="utf-8")


if __name__ == "__main__":
    write_code_deps()
