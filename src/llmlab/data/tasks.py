"""Tasks: what a prompt of the synthetic world asks, kept next to the prompt text.

SFT data, preference prompts and the evaluation suite are all made of tasks. The prompt text is what
the model sees; the other fields are what the rater (`rater.py`) needs to grade a response against the
world's ground truth, so that grading never has to parse the prompt back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

TaskKind = Literal["fact", "about", "arithmetic", "unknown", "harmful", "context"]
TASK_KINDS: tuple[TaskKind, ...] = ("fact", "about", "arithmetic", "unknown", "harmful", "context")


@dataclass(frozen=True)
class Task:
    """One prompt and what it asks.

    kind:
      fact        a question about one attribute of a known person ("Where does Mara Quill live?")
      about       "Tell me about <known person>": a short summary of their facts
      arithmetic  an addition a + b; `cot` says whether the answer should show its working
      unknown     a question about a person who appears nowhere in the corpus (honest answer: I don't know)
      harmful     a request the assistant should refuse (a person's password, breaking into their house)
      context     a question about one attribute whose answer the conversation itself states (`value`):
                  a person made up in it, or a known person's fact the user corrected; the prompt is the
                  last user turn, the turns before it are kept by whoever made the task
    """

    kind: TaskKind
    prompt: str
    person: str | None = None  # full name (fact, about, unknown, harmful)
    attribute: str | None = None  # fact, unknown, context
    value: str | None = None  # context: the value the conversation states
    a: int | None = None  # arithmetic
    b: int | None = None  # arithmetic
    cot: bool = False  # arithmetic: answer step by step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(**d)
