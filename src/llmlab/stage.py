"""What every `pipeline/<stage>.py` shares: argument parsing, params validation, and clean failure.

A stage validates all of `params.yaml` before it writes anything. A user-fixable problem (bad params,
missing input, unreadable data) ends the process with one clear message and a non-zero exit code
(2 for params, 1 otherwise), never a traceback.

With `LLMLAB_PARAMS_TRACE=<folder>` set, a stage that succeeds writes `<folder>/<stage>.json`: the
params keys it read (`llmlab.params.recording_reads`), which the end-to-end test checks against the
`params:` that dvc.yaml declares for the stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.logging import RichHandler

from llmlab.errors import LlmlabError
from llmlab.params import Params, load_params, recording_reads

log = logging.getLogger("llmlab")


def run_stage(
    name: str,
    main: Callable[[argparse.Namespace, Params], None],
    add_arguments: Callable[[argparse.ArgumentParser], None],
    argv: list[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(prog=f"pipeline/{name}.py", description=f"The '{name}' stage of llmlab.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        trace = os.environ.get("LLMLAB_PARAMS_TRACE")
        if not trace:
            main(args, params)
            return
        with recording_reads(params) as reads:
            main(args, params)
        Path(trace).mkdir(parents=True, exist_ok=True)
        (Path(trace) / f"{name}.json").write_text(json.dumps(sorted(reads)))
    except LlmlabError as e:
        print(f"error [{name}]: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"error [{name}]: interrupted", file=sys.stderr)
        sys.exit(130)


def setup_logging() -> None:

    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    # Lightning advertises a cloud logger on every run; the one line of noise goes.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda r: "litlogger" not in r.getMessage()
    )
