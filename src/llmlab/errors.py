"""User-facing errors: each says what is wrong and how to fix it; the CLI prints it without a traceback."""

from __future__ import annotations


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
