"""Shared fixtures: the repository root, the tiny configuration, and stage runs in subprocesses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = ROOT / "tests" / "params.smoke.yaml"
# Under `pytest -n N` (make test) N test processes share the machine's cores: each, and each stage it starts,
# uses one thread, since the tiny configuration's matrices gain nothing from more and N processes of
# all-core thread pools only wait on each other.
SHARED_CORES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
if SHARED_CORES:
    torch.set_num_threads(1)


def stage_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a stage subprocess: this interpreter's venv first on PATH, a private MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("LLMLAB_PIPELINE_RUN_ID", None)
    if SHARED_CORES:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_stage(
    stage: str,
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    params: Path = SMOKE_PARAMS,
    timeout=600,
    launcher: list[str] | None = None,
):
    """Run a stage's entry point as a process, as `dvc repro` does (or under `launcher`, e.g. torchrun)."""
    cmd = [
        *(launcher or [sys.executable]),
        str(ROOT / "pipeline" / f"{stage}.py"),
        "--params",
        str(params),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def with_sitecustomize(env: dict[str, str], folder: Path, code: str) -> dict[str, str]:
    """`env` for a subprocess that first runs `code` (a fault injected from outside: Python imports
    `sitecustomize` from the path at start-up, before the stage's own code)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return env | {"PYTHONPATH": f"{folder}{os.pathsep}{env.get('PYTHONPATH', '')}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    cmd: list[str], ready_url: str, env: dict[str, str], log: Path, timeout_s: float = 90
) -> Iterator[subprocess.Popen]:
    """Start a server (`mlflow server`, `mlflow models serve`) in its own process group, wait until
    `ready_url` answers 200, and always stop the whole group afterwards (the CLI and its workers).
    Yields the process (the leader of its group: `os.killpg(proc.pid, ...)` stops it early)."""
    import requests

    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(ready_url, timeout=1).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy starting up
                pass
            try:
                server.wait(timeout=0.25)  # the pause between polls, and a check that the server still runs
                pytest.fail(f"{cmd[0]} exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, (
                    f"no answer on {ready_url} after {timeout_s} s:\n{log.read_text()[-3000:]}"
                )
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real MLflow tracking server on 127.0.0.1 with its own SQLite store and artifact folder, as a team
    would run it. Yields (url, process)."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{url}/health", stage_env(folder), folder / "server.log") as proc:
        yield url, proc


# The files that run whole pipelines under `dvc repro`, longest first (the e2e module: about 6 of the fast
# default's 7.5 minutes on 2 cores; the real-data and recipe runs about 2 each).
LONGEST_FILES = ("test_pipeline_e2e.py", "test_real_data_path.py", "test_recipe_data_path.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other slow tests (several processes), then the rest, each in its
    file's order: with `make test`'s `-n auto --dist loadfile` each file goes to one process, and the long
    files started first end together with the short ones instead of after them (longest first is the
    classic rule for scheduling jobs on a few machines)."""

    def rank(item) -> int:
        name = item.path.name
        if name in LONGEST_FILES:
            return LONGEST_FILES.index(name)
        return len(LONGEST_FILES) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """corpus + tokenizer stages of the tiny configuration, run once per test session."""
    d = tmp_path_factory.mktemp("smoke_data")
    env = stage_env(d)
    r = run_stage("corpus", ["--out", "corpus", "--metrics", "metrics/corpus.json"], d, env)
    assert r.returncode == 0, r.stderr
    r = run_stage(
        "tokenizer",
        [
            "--corpus",
            "corpus",
            "--out",
            "tokenizer",
            "--tokens",
            "tokens",
            "--metrics",
            "metrics/tokenizer.json",
            "--report",
            "report",
        ],
        d,
        env,
    )
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def tok_path(smoke_data) -> Path:
    """The tiny configuration's trained tokenizer.json."""
    return smoke_data / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok(tok_path):
    from llmlab.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_path)


def random_post_training_models(smoke_data: Path, folder: Path) -> None:
    """Randomly initialised SFT (`folder`/sft) and reward (`folder`/reward) models of a small shape, on
    the smoke tokenizer's vocabulary: inputs for the reward and ppo stages without training them first."""
    import torch

    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.model.transformer import GPT, GPTConfig, save_model
    from llmlab.training.reward import RewardModel, save_reward_model

    vocab = load_tokenizer(smoke_data / "tokenizer" / "tokenizer.json").get_vocab_size()
    cfg = GPTConfig(vocab_size=vocab, d_model=32, n_layer=2, n_head=2, context_length=64)
    torch.manual_seed(0)
    save_model(GPT(cfg), folder / "sft")
    save_reward_model(RewardModel(cfg), folder / "reward", scale=1.0)


def repo_copy(dest: Path) -> str:
    """The files git would check out (tracked + untracked-but-not-ignored, but not this checkout's own
    dvc.lock), committed in a new repo with the tiny configuration as params.yaml; returns the commit."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for f in filter(None, files):
        if f == "dvc.lock":
            continue
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    shutil.copy(SMOKE_PARAMS, dest / "params.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True
    ).stdout.strip()


def hub_layout(folder, split: str, rows: list[dict]) -> str:
    """A dataset folder as the Hub keeps it (data/<split>-00000-of-00001.parquet): load_dataset finds the split."""
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return str(folder)
