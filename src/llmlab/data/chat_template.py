"""The chat template: one function turns a conversation into tokens, for training and for inference alike.

A conversation is a list of `{"role": ..., "content": ...}` messages, the format Hugging Face chat
datasets use. The model sees it as

    <|bos|><|user|> Where does Mara Quill live?<|end|><|assistant|> Mara Quill lives in Port Avery.<|end|>

Each message's text is encoded after one space, as Llama's SentencePiece tokenizer adds a "dummy prefix"
(`encode_content`). Without it a reply's first word is not the token it is in running text: "Fleur"
after `<|assistant|>` is "F" + "leur", while the corpus has " Fleur" as one token, so the model would
have to learn to spell each name it starts a reply with, and it copied the names of people it was not
fine-tuned on badly ("Rleur Underhill works as a locksmith").

A chat model is still a next-token predictor: "answering" is continuing this text after `<|assistant|>`
and stopping by producing `<|end|>`. There is no memory between calls — each turn, the whole transcript
is rendered again and sent whole.

`render` also returns the loss mask of supervised fine-tuning: True on the tokens the assistant writes
(its content and its closing `<|end|>`, so that it learns to stop), False on everything it is given
(`<|bos|>`, role tokens, the user's words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from llmlab.data.tokenizer import ASSISTANT_ID, BOS_ID, END_ID, SPECIAL_TOKENS, USER_ID
from llmlab.errors import LlmlabError

ROLE_IDS = {"user": USER_ID, "assistant": ASSISTANT_ID}
_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ChatTokens:
    ids: list[int]
    loss_mask: list[bool]  # True where SFT takes the loss (assistant content + its <|end|>)


def clean_text(text: str) -> str:
    """Text the tokenizer accepts: a lone UTF-16 surrogate (JSON allows "\\ud800") becomes U+FFFD.

    Any other string, control characters and special-token text included, is left as it is.
    """
    return _SURROGATE.sub("\ufffd", text)


CONTENT_PREFIX = " "  # before every message's text (see the module docstring)


def encode_content(tok: Tokenizer, text: str) -> list[int]:
    """Encode a message's text, after `CONTENT_PREFIX`, so that it can never produce a special token
    (`encode_text`); `decode_content` gives the text back."""
    return encode_text(tok, CONTENT_PREFIX + text)


def decode_content(tok: Tokenizer, ids: Sequence[int]) -> str:
    """A message's text from its ids (`encode_content`'s inverse): the decoded text without its prefix."""
    return tok.decode(list(ids), skip_special_tokens=False).removeprefix(CONTENT_PREFIX)


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Encode text so that it can never produce a special token.

    The literal text "<|end|>" in a user's message must stay text: as the special token it would end the
    turn early (a prompt injection). Each special-token string found in the text is encoded as "<" plus
    the rest, which the tokenizer then reads as plain characters; decoding gives the text back exactly,
    except that a lone surrogate, which is not a character and which the tokenizer refuses (TypeError),
    comes back as U+FFFD (`clean_text`).
    """
    text = clean_text(text)
    ids: list[int] = []
    pos = 0
    for m in _SPECIAL.finditer(text):
        ids += tok.encode(text[pos : m.start()], add_special_tokens=False).ids if m.start() > pos else []
        ids += (
            tok.encode("<", add_special_tokens=False).ids
            + tok.encode(m.group()[1:], add_special_tokens=False).ids
        )
        pos = m.end()
    if pos < len(text):
        ids += tok.encode(text[pos:], add_special_tokens=False).ids
    return ids


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """Validate a conversation; a system message is folded into the first user turn (no system token).

    Raises LlmlabError naming the message at fault: a role other than system/user/assistant, content that
    is not a string, or turns that do not alternate user → assistant.
    """
    out: list[dict] = []
    system = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LlmlabError(f"message {i}: must be a mapping with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise LlmlabError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system":
            system += content + "\n\n"
            continue
        if role not in ROLE_IDS:
            raise LlmlabError(f"message {i}: role must be 'user', 'assistant' or 'system', got {role!r}")
        expected = "user" if not out or out[-1]["role"] == "assistant" else "assistant"
        if role != expected:
            raise LlmlabError(
                f"message {i}: expected a {expected} turn, got {role!r} (turns must alternate, user first)"
            )
        out.append({"role": role, "content": (system + content) if system and not out else content})
    return out


def render(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> ChatTokens:
    """Token ids of a conversation and the SFT loss mask. With `add_generation_prompt`, end with
    `<|assistant|>` so the model's continuation is the assistant's reply.

    For [user "Hi", assistant "Hello"]:  ids  <|bos|> <|user|> " Hi" <|end|> <|assistant|> " Hello" <|end|>
                                         mask    0       0      0      0         0            1       1
    """
    ids, mask = [BOS_ID], [False]
    for m in check_messages(messages):
        content = encode_content(tok, m["content"])
        learn = m["role"] == "assistant"
        ids += [ROLE_IDS[m["role"]], *content, END_ID]
        mask += [False, *([learn] * len(content)), learn]
    if add_generation_prompt:
        ids.append(ASSISTANT_ID)
        mask.append(False)
    return ChatTokens(ids, mask)


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The same conversation as text, for logs and reports (not for encoding: see `encode_content`)."""
    parts = ["<|bos|>"]
    for m in check_messages(messages):
        parts.append(f"<|{m['role']}|>{CONTENT_PREFIX}{m['content']}<|end|>")
    if add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


@dataclass(frozen=True)
class Reply:
    text: str  # the assistant's words, without the closing <|end|>
    ended: bool  # the model closed its turn with <|end|> (within the length limit)
    clean: bool  # no special token inside the reply: format adherence
    tokens: tuple[int, ...] = ()  # what the model generated, the closing <|end|> included


def parse_reply(tok: Tokenizer, generated: Sequence[int]) -> Reply:
    """Read the tokens generated after `<|assistant|>`: cut at the first `<|end|>`.

    clean is False when the reply contains another special token (a role token: the model started
    writing the user's turn) before its end.
    """
    ended = END_ID in generated
    body = list(generated[: generated.index(END_ID)] if ended else generated)
    clean = not any(t < len(SPECIAL_TOKENS) for t in body)
    return Reply(decode_content(tok, body), ended, clean, tuple(generated))
