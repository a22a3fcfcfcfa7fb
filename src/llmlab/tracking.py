"""MLflow tracking: one pipeline run per `dvc repro`, one child run per stage that actually ran.

The store is `sqlite:///mlflow.db` at the repository root unless `MLFLOW_TRACKING_URI` says otherwise
(e.g. `http://mlflow.internal:5000` for a team server). `mlflow ui --backend-store-uri sqlite:///mlflow.db`
shows it.

How stages find their pipeline run: DVC runs each stage as a child process of one `dvc repro` (or
`dvc exp run`) process. Each stage walks up its process tree to that DVC process and uses its pid and
start time as the key of the pipeline run: the first stage creates the run, the next ones find it by
that tag. `LLMLAB_PIPELINE_RUN_ID` overrides this (to attach stages to a run you made yourself). A stage
started by hand, outside DVC, gets a pipeline run of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import requests

from llmlab import provenance
from llmlab.errors import LlmlabError

# mlflow and Lightning are imported where they are used: importing them takes seconds, and `git_info`
# and the server check are used without them (by checkpoints, and before any work starts).

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_ENV = "LLMLAB_EXPERIMENT"
DEFAULT_EXPERIMENT = "llmlab"
PIPELINE_RUN_ENV = "LLMLAB_PIPELINE_RUN_ID"
ARTIFACTS_DIR = "mlartifacts"  # artifact root for the embedded SQLite store (git-ignored)
# The experiment holds model training, not a GenAI app: the tag and value MLflow's UI itself writes for
# that. MLflow 3.17's UI picks its view from the URL's `?workflowType=machine_learning` (or the last view
# chosen in that browser) instead, which is why the README's link carries it (checked in Chromium).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CODE_DIRS = ("src/", "pipeline/")  # deps under these are code, not inputs a run trained on

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when an HTTP tracking server does not answer.

    MLflow's own client retries with back-off for minutes; one probe of the server's /health endpoint
    turns that into one clear error.
    """
    if not uri.startswith(("http://", "https://")):
        return

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        raise LlmlabError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {type(e).__name__}. "
            f"Start it, or unset MLFLOW_TRACKING_URI to use the local store {DEFAULT_TRACKING_URI}"
        ) from None


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    """Commit and dirty flag of the working tree ('unknown' outside a git repository)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": str(bool(status)).lower()}


def is_global_zero() -> bool:
    """Whether this process is rank 0 of a distributed run (or not distributed), before any Trainer exists.

    Lightning's launcher sets LOCAL_RANK / NODE_RANK in the processes it starts; torchrun sets RANK; SLURM
    sets SLURM_PROCID.
    """
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _process_key(proc) -> str:
    """`host:pid:start`: names one process, even after its pid is reused."""
    return f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"


def _dvc_process_key() -> str | None:
    """`host:pid:start` of the nearest ancestor `dvc repro` / `dvc exp run` process, if any."""

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = " ".join(proc.cmdline())
            if "dvc" in cmd and (" repro" in cmd or " exp" in cmd):
                return _process_key(proc)
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def _is_gone(key: str | None) -> bool:
    """Whether the process a `host:pid:start` key names has ended (False for another host's, or unknown)."""

    host, _, rest = (key or "").partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        proc = psutil.Process(int(pid))
        return int(proc.create_time()) != int(start) or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'pretrain': {'model': {'d_model': 128}}} -> {'pretrain.model.d_model': 128}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """The MLflow child run of one stage. Use as a context manager; it ends FINISHED or FAILED.

    with StageRun("pretrain", params={"pretrain": cfg.model_dump()}) as run:
        run.log_metrics({"val/loss": 2.1}, step=100)
        run.log_artifact("models/pretrain/config.json")
    """

    def __init__(
        self, stage: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ):
        self.stage = stage
        self.params = dict(params or {})
        self.extra_tags = dict(tags or {})
        self.uri = tracking_uri()
        self.client = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.lost: str | None = None  # why tracking stopped, once it has
        self.not_logged: list[str] = []
        self._dvc_paths: tuple[list[str], list[str]] | None = None

    # -- setup -------------------------------------------------------------------------------------

    def __enter__(self) -> StageRun:
        if not is_global_zero():  # only rank 0 talks to MLflow; the other ranks' runs are no-ops
            return self
        for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # MLflow's client retries a failed request 7 times with exponential back-off (minutes); a stage
        # that has lost its server should not stall training for that long. A user's own setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        check_reachable(self.uri)
        try:
            self.client = MlflowClient(self.uri)
            self._start()
        except Exception as e:  # the server or store failed between the probe and here: still before any work
            raise LlmlabError(
                f"MLflow tracking at {self.uri} failed while starting the '{self.stage}' run: "
                f"{_first_line(e)}"
            ) from None
        return self

    def _start(self) -> None:
        from mlflow.entities import Param

        experiment_id = self._experiment_id()
        git = git_info()
        dvc_key = _dvc_process_key()
        self._end_runs_of_killed_processes(experiment_id)
        self.parent_run_id = self._pipeline_run(experiment_id, git, dvc_key)
        self.client.update_run(self.parent_run_id, status="RUNNING")
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": self.stage,
            "mlflow.source.git.commit": git["git_commit"],
            "stage": self.stage,
            "process": _process_key(psutil.Process()),
            **git,
            **self.extra_tags,
        }
        # Under `dvc repro`: the hashes of this stage's deps now (its outs' at the end), as dvc.lock has them.
        self._dvc_paths = provenance.stage_paths(self.stage) if dvc_key else None
        if self._dvc_paths:
            tags |= {"dvc.stage": self.stage, **provenance.hashes(self._dvc_paths[0], "dvc.deps")}
        params_json = json.dumps(self.params, sort_keys=True, default=str)
        if len(params_json) <= 8000:  # MLflow's limit for a tag value; every value is a param as well
            tags["params"] = params_json
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.stage)
        self.run_id = run.info.run_id
        if self._dvc_paths:
            self._log_inputs(
                {k.removeprefix("dvc.deps."): v for k, v in tags.items() if k.startswith("dvc.deps.")}
            )
        flat = _flatten(self.params)
        items = [Param(k, str(v)) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _log_inputs(self, deps: Mapping[str, str]) -> None:
        """The stage's DVC-tracked inputs (its deps that are not code) as the run's dataset inputs: the path as
        name and source, the hash `dvc.lock` has as digest, so the runs table's Dataset column says what each
        run read, and two runs read the same data exactly when their digests are equal."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=path,
                    digest=digest,
                    source_type="local",
                    source=json.dumps({"uri": path}),
                ),
                tags=[InputTag("mlflow.data.context", "model" if path.startswith("models/") else "data")],
            )
            for path, digest in sorted(deps.items())
            if not path.startswith(CODE_DIRS)
        ]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def _end_runs_of_killed_processes(self, experiment_id: str) -> None:
        """A stage killed (SIGKILL, power cut) cannot end its MLflow run, which would show RUNNING forever:
        runs whose process (a stage's, or a pipeline run's `dvc repro`) has ended are marked KILLED."""
        for run in self.client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=500):
            tags = run.data.tags
            if _is_gone(tags.get("process") or tags.get("pipeline_key")):
                self.client.set_terminated(run.info.run_id, "KILLED")
                log.info(
                    "MLflow: run %s (%s) was left running by a killed process: marked KILLED",
                    run.info.run_id,
                    tags.get("mlflow.runName", "?"),
                )

    def _experiment_id(self) -> str:
        name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get("mlflow.experimentKind") is None:  # made by hand, or by an older llmlab
                for key, value in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts next to the SQLite file, not in ./mlruns of the cwd
            db = Path(self.uri.removeprefix("sqlite:///"))
            location = (db.resolve().parent / ARTIFACTS_DIR).as_uri()
        return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)

    def _pipeline_run(self, experiment_id: str, git: dict[str, str], key: str | None) -> str:
        explicit = os.environ.get(PIPELINE_RUN_ENV)
        if explicit:
            return explicit
        if key is not None:
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.pipeline_key = '{key}'", max_results=1
            )
            if found:
                return found[0].info.run_id
        name = time.strftime("pipeline %Y-%m-%d %H:%M:%S")
        tags = {
            "mlflow.runName": name,
            "pipeline_key": key or "manual",
            "mlflow.source.git.commit": git["git_commit"],
            **git,
        }
        return self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    # -- logging -----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.tracked(
                f"{len(batch[i : i + 1000])} metric values",
                self.client.log_batch,
                self.run_id,
                metrics=batch[i : i + 1000],
            )

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, pipeline: bool = False
    ) -> None:
        """Log a file or a folder to this stage's run; with `pipeline`, to the pipeline run as well (where
        the report belongs: the first thing a user opening the pipeline run in the UI should see)."""
        if self.run_id is None:
            return
        path = Path(path)
        log_one = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        for run_id in (self.run_id, self.parent_run_id) if pipeline else (self.run_id,):
            self.tracked(f"artifact {path}", log_one, run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.run_id is not None:
            self.tracked(f"artifact {artifact_file}", self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.run_id is not None:
            self.tracked(f"artifact {artifact_file}", self.client.log_dict, self.run_id, obj, artifact_file)

    def tracked(self, what: str, call, *args, **kwargs) -> Any:
        """`call(*args, **kwargs)` to MLflow, which must never stop training: the first failure (the
        server went away, the store's disk filled) is one warning, and from then on nothing more is sent
        (no minutes of retries per call); `not_logged` lists what was left out, for the warning at the end."""
        if self.lost is not None:
            self.not_logged.append(what)
            return None
        try:
            return call(*args, **kwargs)
        except (
            Exception
        ) as e:  # MlflowException, requests' ConnectionError, OSError, sqlite errors: all alike here
            self.lost = _first_line(e)
            self.not_logged.append(what)
            log.warning(
                "MLflow tracking at %s failed while logging %s (%s): the '%s' stage goes on without "
                "tracking; its outputs and metrics files are not affected",
                self.uri,
                what,
                self.lost,
                self.stage,
            )
            return None

    def lightning_logger(self):
        """A Lightning logger writing into this run. Every rank gets one (callbacks such as
        LearningRateMonitor insist), but only rank 0's writes anything: its methods are rank-zero-only."""
        return buffered_mlflow_logger(self.uri, self.run_id, tracker=self)

    # -- teardown ----------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        status = "FINISHED" if exc_type is None else "FAILED"
        from mlflow import flush_async_logging

        if exc_type is None and self._dvc_paths:
            for key, value in provenance.hashes(self._dvc_paths[1], "dvc.outs").items():
                self.tracked(f"tag {key}", self.client.set_tag, self.run_id, key, value)
        self.tracked("pending asynchronous values", flush_async_logging)
        self.tracked(f"the run's end ({status})", self.client.set_terminated, self.run_id, status)
        # The pipeline run ends with its latest stage (DVC gives no "pipeline finished" hook): FINISHED
        # after every stage that succeeded, FAILED as soon as one fails.
        if not os.environ.get(PIPELINE_RUN_ENV):
            self.tracked(
                f"the pipeline run's end ({status})", self.client.set_terminated, self.parent_run_id, status
            )
        if self.lost is not None:
            log.warning(
                "MLflow: not logged after tracking failed (%s): %s. The stage's outputs and metrics files "
                "are complete; `dvc repro --force %s` with the server back logs them again",
                self.lost,
                _summary(self.not_logged),
                self.stage,
            )


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _summary(items: list[str]) -> str:
    """'3 × 1 metric values, artifact a.json' — repeated items counted."""

    return ", ".join(f"{n} × {what}" if n > 1 else what for what, n in Counter(items).items())


def buffered_mlflow_logger(
    uri: str,
    run_id: str | None = None,
    experiment: str | None = None,
    flush_every_s: float = 15.0,
    tracker: StageRun | None = None,
):
    """Lightning's MLFlowLogger, writing metrics in one batch every `flush_every_s` seconds.

    Why: with the SQLite store, each `log_batch` is a transaction through SQLAlchemy, a few ms of CPU;
    logged every 10 steps of a ~70 ms step it cost the pretraining stage ~7 % of its throughput
    (measured, benchmarks/pretrain_throughput.py), and MLflow's asynchronous mode only moves that work
    to a thread that competes for the same two cores. Buffering keeps every logged step and costs
    nothing measurable. A failed flush (tracking server gone) is reported once and training goes on;
    with a `tracker` (the stage's StageRun) the failure is shared: after it, neither sends anything more.
    """

    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class BufferedMLFlowLogger(MLFlowLogger):
        def __init__(self):
            super().__init__(
                experiment_name=experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT),
                tracking_uri=uri,
                run_id=run_id,
            )
            self._pending: list = []
            self._last_flush = time.monotonic()

        @rank_zero_only
        def log_metrics(self, metrics, step=None):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending += [
                Metric(re.sub("[^a-zA-Z0-9_/. -]+", "", k), float(v), now, step or 0)
                for k, v in metrics.items()
                if not isinstance(v, str)
            ]
            if time.monotonic() - self._last_flush >= flush_every_s:
                self.flush()

        @rank_zero_only
        def flush(self):
            pending, self._pending, self._last_flush = self._pending, [], time.monotonic()
            if not pending:
                return
            for i in range(0, len(pending), 1000):
                self._send(
                    f"{len(pending[i : i + 1000])} training metric values",
                    self.experiment.log_batch,
                    self.run_id,
                    metrics=pending[i : i + 1000],
                )

        def _send(self, what, call, *args, **kwargs):
            if tracker is not None:
                return tracker.tracked(what, call, *args, **kwargs)
            try:
                return call(*args, **kwargs)
            except Exception as e:  # as StageRun.tracked: tracking never stops training
                log.warning("MLflow: could not log %s (%s); training goes on", what, _first_line(e))

        @rank_zero_only
        def log_hyperparams(self, params) -> None:  # Lightning calls it at the start of every fit/validate
            self._send("hyperparameters", super().log_hyperparams, params)

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            self.flush()
            # Lightning ends the run when `fit` ends; a stage's run ends with the stage (StageRun), which
            # still evaluates after fit: a kill then must leave it RUNNING (the next run marks it KILLED).
            if tracker is None:
                self._send("the training run's end", super().finalize, status)

    return BufferedMLFlowLogger()
