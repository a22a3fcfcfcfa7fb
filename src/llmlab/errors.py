"""User-facing errors: each says what is wrong and how to fix it; the CLI prints it without a traceback."""

from __future__ import annotations

import re
import shutil
from pathlib import Path


class LlmlabError(Exception):
    """An error the user can fix (bad input, missing artifact). Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []

    def __str__(self) -> str:
        return "\n".join([self.message, *(f"  {d}" for d in self.details)])


class ParamsError(LlmlabError):
    """Invalid params. Exit code 2, like a usage error."""

    exit_code = 2


class MissingArtifactError(LlmlabError):
    """An input that an earlier stage writes is absent: the message names that stage."""

    def __init__(self, path, stage: str):
        super().__init__(f"{path} not found: it is written by the '{stage}' stage (run `dvc repro {stage}`)")


class OutputWriteError(LlmlabError):
    """Writing an output failed (disk full, no permission, file too large); `llmlab.io.atomic_path` has
    already removed the temporary, so nothing half-written is left under the output's name."""

    def __init__(self, path: str | Path, cause: BaseException):
        # Inside a folder being written, name the file as it will be: `.out.tmp-1a2b3c4d/x` -> `out/x`.
        path = Path(re.sub(r"(^|/)\.([^/]+)\.tmp-[0-9a-f]{8}(?=/|$)", r"\1\2", str(path)))
        reason = (
            getattr(cause, "strerror", None)
            or (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        )
        try:
            free = f"; {shutil.disk_usage(_existing_parent(path)).free / 1e9:.1f} GB free on that disk"
        except OSError:
            free = ""
        super().__init__(
            f"could not write {path}: {reason}{free}. Nothing half-written was left under that name; free "
            f"space or fix the folder's permissions, then run again (training stages resume from their last checkpoint)"
        )


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
