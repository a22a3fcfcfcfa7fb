"""Talking to a trained model: load it by stage name, fit the conversation into its context, stream a reply.

`llmlab chat`, `llmlab generate` and the MLflow model (`llmlab.serving.mlflow_model`) are thin layers over this module,
and an HTTP server could be too: nothing here reads a terminal.

A chat model keeps no state between calls. Each turn the whole conversation is rendered with the chat
template (`llmlab.data.chat_template.render`) and sent whole; the reply is appended to the transcript for the next
turn. Prompt and reply must fit in the model's context window (`context_length` tokens, positions beyond
it do not exist), so before each turn `fit_prompt` leaves `max_new_tokens` of room for the reply: it
forgets the oldest turns first, and cuts the start of a single message that is too long on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from llmlab.data.chat_template import (
    Reply,
    clean_text,
    decode_content,
    encode_content,
    encode_text,
    parse_reply,
    render,
)
from llmlab.data.tokenizer import BOS_ID, END_ID, load_tokenizer
from llmlab.errors import LlmlabError

if TYPE_CHECKING:  # torch takes seconds to import; the CLI reads `Sampling`'s defaults for --help without it
    import torch

    from llmlab.model.transformer import GPT

MODELS = {
    "base": ("models/pretrain", "pretrain"),
    "sft": ("models/sft", "sft"),
    "ppo": ("models/ppo", "ppo"),
    "dpo": ("models/dpo", "dpo"),
}
"""Model names -> (folder, the DVC stage that writes it). Any other name is taken as a folder path."""


# ------------------------------------------------------------------------------------------ loading


def load(model: str | Path, tokenizer: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The model named `model` (a name of `MODELS`, or a folder written by `save_model`) and its tokenizer.

    Every failure is an LlmlabError that names the missing file and how to get it.
    """
    folder, stage = MODELS.get(str(model), (model, None))
    folder = Path(folder)
    fix = (
        f"run `dvc repro {stage}` or pass --model PATH"
        if stage
        else f"--model takes {', '.join(MODELS)} or a folder with config.json + model.safetensors"
    )
    for name in ("model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise LlmlabError(f"{folder / name} not found: {fix}")
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise LlmlabError(f"{tokenizer} not found: run `dvc repro tokenizer` or pass --tokenizer PATH")
    from llmlab.model.transformer import (
        load_model,
    )  # torch, only when a model is loaded (see TYPE_CHECKING above)

    tok = load_tokenizer(tokenizer)
    net = load_model(folder, stage, device)
    if tok.get_vocab_size() != net.config.vocab_size:
        raise LlmlabError(
            f"{tokenizer} has {tok.get_vocab_size()} tokens but {folder} was trained with {net.config.vocab_size}: "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    return net, tok


# ----------------------------------------------------------------------------------------- sampling


MIN_PROMPT_TOKENS = 5
"""The shortest chat prompt: <|bos|> <|user|> one token <|end|> <|assistant|>."""


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn; every value is checked on construction (all problems reported at once)."""

    temperature: float = 0.8
    """Softmax temperature: 0 is greedy (always the most likely token), 1 the model's own distribution."""
    top_p: float | None = 0.95
    """Sample only from the most likely tokens that together hold this probability (None or 1: all)."""
    max_new_tokens: int = 64
    """Longest reply. This much room is kept free in the context, so it also bounds what the prompt keeps."""

    def __post_init__(self):
        problems = []
        t = self.temperature
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            problems.append(f"temperature must be a number >= 0 (0 is greedy), got {t!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens < 1:
            problems.append(f"max-new-tokens must be at least 1, got {self.max_new_tokens!r}")
        if problems:
            raise LlmlabError("; ".join(problems))

    def prompt_budget(self, context_length: int) -> int:
        """Tokens the prompt may use: the context minus the reply's room.

        >>> Sampling(max_new_tokens=64).prompt_budget(128)
        64
        """
        if self.max_new_tokens > context_length - MIN_PROMPT_TOKENS:
            raise LlmlabError(
                f"max-new-tokens must be at most {context_length - MIN_PROMPT_TOKENS} for this model, got "
                f"{self.max_new_tokens}: its context of {context_length} tokens must also hold the prompt"
            )
        return context_length - self.max_new_tokens


def parse_temperature(value: str | float) -> float:
    """A temperature typed by a user: "0.5" -> 0.5; anything else is an LlmlabError that says what is allowed."""
    try:
        t = float(value)
    except ValueError:
        raise LlmlabError(f"temperature must be a number >= 0 (0 is greedy), got {value!r}") from None
    return Sampling(temperature=t).temperature


def seeded_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A random generator for reproducible sampling; None (torch's global one) without a seed."""
    import torch

    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------- context budget


@dataclass(frozen=True)
class Prompt:
    """What is sent to the model for one turn."""

    ids: list[int]
    messages: list[dict]  # the conversation `ids` renders: the turns kept, then the new user message
    dropped_turns: int = 0  # oldest user+assistant pairs forgotten to make room
    truncated_tokens: int = 0  # tokens cut from the start of the new user message

    @property
    def truncated(self) -> bool:
        """Something was left out to fit: an old turn, or the start of the new message."""
        return self.dropped_turns > 0 or self.truncated_tokens > 0


def fit_prompt(tok: Tokenizer, history: Sequence[dict], user_text: str, max_tokens: int) -> Prompt:
    """Render `history` + the new user message in at most `max_tokens` tokens, ready for the reply.

    First forget the oldest turns (a user message and its reply at a time), then, if the new message is
    too long on its own, keep only its end (the question is usually last). History must alternate
    user/assistant and end with an assistant reply, as `ChatSession` keeps it.
    """
    history = list(history)
    dropped = 0
    while True:
        messages = [*history, {"role": "user", "content": user_text}]
        ids = render(tok, messages, add_generation_prompt=True).ids
        if len(ids) <= max_tokens:
            return Prompt(ids, messages, dropped)
        if not history:
            break
        history, dropped = history[2:], dropped + 1
    # The new message alone is too long (`ids` renders just it): keep its end.
    # The frame around the text; `keep_end` counts the text with its message prefix.
    frame = render(tok, [{"role": "user", "content": ""}], add_generation_prompt=True).ids
    overhead = len(frame) - len(encode_content(tok, ""))
    messages = [{"role": "user", "content": keep_end(tok, user_text, max_tokens - overhead)}]
    kept = render(tok, messages, add_generation_prompt=True).ids
    return Prompt(kept, messages, dropped, truncated_tokens=len(ids) - len(kept))


def keep_end(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """The longest end of `text` that encodes in at most `max_tokens` tokens.

    Cut in characters, not tokens, so the kept text re-encodes the same way on every later turn (a cut
    token list can start in the middle of a character). Binary search on where the kept part starts:
    the token count falls as the start moves right (not strictly: BPE may merge differently after a cut,
    hence the final walk).
    """
    if max_tokens <= 0:
        return ""

    def n_tokens(i: int) -> int:
        return len(encode_content(tok, text[i:]))

    # A token is at most `longest` bytes, so at most that many characters: no start further back can fit.
    longest = max(len(piece) for piece in tok.get_vocab())  # byte-level pieces: one character per byte
    lo, hi = max(0, len(text) - max_tokens * longest), len(text)  # invariant: text[hi:] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if n_tokens(mid) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    while n_tokens(hi) > max_tokens:
        hi += 1
    return text[hi:]


def fit_raw(tok: Tokenizer, text: str, max_tokens: int) -> tuple[list[int], int]:
    """<|bos|> and the end of `text` as plain text (no chat template) in at most `max_tokens` tokens, and
    how many tokens were cut from its start. A continuation is sent once, never re-rendered, so unlike
    `keep_end` this may cut in tokens.

    ids of text [7, 8, 9], max_tokens 3 -> ([BOS_ID, 8, 9], 1)
    """
    content = encode_text(tok, text)  # as the corpus is read: no message prefix
    kept = content[max(0, len(content) - (max_tokens - 1)) :]
    return [BOS_ID, *kept], len(content) - len(kept)


# -------------------------------------------------------------------------------------------- chat


class TextStream:
    """Token ids in, printable text out, one token at a time.

    subtle: a byte-level BPE token can hold part of a character ("é" is two bytes, an emoji four, and
    they can land in different tokens). Decoding such a prefix gives U+FFFD, so text is held back while
    it ends in U+FFFD and released once the character is whole. Each piece is the new end of the decoded
    text so far, so the pieces always add up to `tok.decode(all ids)`, or, for a `reply`, to the message
    text `decode_content` reads from them.
    """

    def __init__(self, tok: Tokenizer, reply: bool = False):
        self.tok, self.reply, self.ids, self.text = tok, reply, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decoded()
        return "" if text.endswith("\ufffd") else self._advance(text)

    def flush(self) -> str:
        """Whatever is held back at the end (a character the model never finished prints as U+FFFD)."""
        return self._advance(self._decoded())

    def _decoded(self) -> str:
        if self.reply:
            return decode_content(self.tok, self.ids)
        return self.tok.decode(self.ids, skip_special_tokens=False)

    def _advance(self, text: str) -> str:
        new, self.text = text[len(self.text) :], text
        return new


@dataclass(frozen=True)
class Turn:
    """One finished exchange."""

    prompt: Prompt
    tokens: list[int]  # generated ids, with the closing <|end|> when the model wrote one
    reply: Reply

    @property
    def context_tokens(self) -> int:
        """Tokens of the context in use after the reply: the prompt plus the reply."""
        return len(self.prompt.ids) + len(self.tokens)


@dataclass
class ChatSession:
    """A conversation with a model: the transcript, the sampling settings, and the context budget.

    The model is stateless: `prepare` renders the whole transcript plus the new message each turn (older
    turns forgotten if it does not fit), `stream` sends it and yields the reply's text as it is written,
    and once the reply is complete appends the exchange to `messages`. `send` does both without streaming.

        session = ChatSession(model, tok, Sampling(temperature=0))
        turn = session.send("Where does Mara Quill live?")
        turn.reply.text, turn.context_tokens
    """

    model: GPT
    tok: Tokenizer
    sampling: Sampling = field(default_factory=Sampling)
    generator: torch.Generator | None = None
    messages: list[dict] = field(default_factory=list)
    last_turn: Turn | None = None

    def __post_init__(self):
        self.sampling.prompt_budget(self.context_length)  # fail now, not at the first message

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def reset(self) -> None:
        """Forget the conversation."""
        self.messages, self.last_turn = [], None

    def set_temperature(self, value: str | float) -> None:
        self.sampling = replace(self.sampling, temperature=parse_temperature(value))

    def prepare(self, user_text: str) -> Prompt:
        """The prompt for the next turn; nothing changes until its reply has been streamed."""
        budget = self.sampling.prompt_budget(self.context_length)
        # encode_content cleans on its own; cleaning here too keeps the transcript to the text the model saw
        return fit_prompt(self.tok, self.messages, clean_text(user_text), budget)

    def stream(self, prompt: Prompt) -> Iterator[str]:
        """Yield the reply's text piece by piece. When the reply is complete (it wrote <|end|> or reached
        max_new_tokens) the exchange joins the transcript and `last_turn`; an abandoned reply does not."""
        from llmlab.model.generate import stream as stream_tokens

        s = self.sampling
        tokens: list[int] = []
        text = TextStream(self.tok, reply=True)
        for token in stream_tokens(
            self.model,
            prompt.ids,
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            stop_ids=[END_ID],
            generator=self.generator,
        ):
            tokens.append(token)
            if token != END_ID and (piece := text.push(token)):
                yield piece
        if piece := text.flush():
            yield piece
        reply = parse_reply(self.tok, tokens)
        self.messages = [*prompt.messages, {"role": "assistant", "content": reply.text}]
        self.last_turn = Turn(prompt, tokens, reply)

    def send(self, user_text: str) -> Turn:
        """One whole turn without streaming."""
        for _ in self.stream(self.prepare(user_text)):
            pass
        assert self.last_turn is not None
        return self.last_turn


# ----------------------------------------------------------------------------------------- one-shot


@dataclass(frozen=True)
class Completion:
    text: str  # without the stop token
    ended: bool  # the model stopped by itself (<|end|>; in raw mode also <|bos|>, the next document)
    tokens: int  # tokens generated, the stop token included


@dataclass(frozen=True)
class Completions:
    prompt_ids: list[int]
    completions: list[Completion]
    truncated_tokens: int  # tokens cut from the start of the prompt to fit the context


def complete(
    model: GPT,
    tok: Tokenizer,
    text: str,
    *,
    n: int = 1,
    raw: bool = False,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
) -> Completions:
    """Sample `n` completions of one prompt, as one batch.

    By default `text` is a user message in the chat template and each completion is the assistant's
    reply. With `raw`, `text` is continued as plain text after <|bos|> (what the base model was trained
    on), and a completion ends where the model starts a new document (<|bos|>) or writes <|end|>.
    """
    from llmlab.model.generate import generate

    if n < 1:
        raise LlmlabError(f"n must be at least 1, got {n}")
    sampling = sampling or Sampling()
    budget = sampling.prompt_budget(model.config.context_length)
    if raw:
        (ids, cut), stop = fit_raw(tok, text, budget), [BOS_ID, END_ID]
    else:
        prompt = fit_prompt(tok, [], text, budget)
        ids, cut, stop = prompt.ids, prompt.truncated_tokens, [END_ID]
    outs = generate(
        model,
        [ids] * n,
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop_ids=stop,
        generator=generator,
    )
    completions = []
    for out in outs:
        ended = bool(out) and out[-1] in stop
        body = out[:-1] if ended else out
        text = tok.decode(body, skip_special_tokens=False) if raw else decode_content(tok, body)
        completions.append(Completion(text, ended, len(out)))
    return Completions(ids, completions, cut)
