"""The `llmlab` command: small tools around the pipeline's artifacts.

    llmlab chat [--model base|sft|ppo|dpo|PATH]      talk to a model in the terminal, replies streamed
    llmlab generate [PROMPT|-] [--n N] [--json]      one-shot completions of a prompt
    llmlab export --format hf DIR                    the model as a transformers Llama folder
    llmlab count-tokens [FILE|-]                     token count of a text with the trained tokenizer

The commands are a thin layer over `llmlab.serving.inference` (loading, context budget, streaming) and
`llmlab.model.export`; a user's mistake prints one `error: ...` line that says how to fix it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

# Each command imports what it needs when it runs (torch takes seconds): `llmlab --help` starts at once.
from llmlab.errors import LlmlabError
from llmlab.serving.inference import MODELS, Sampling

if TYPE_CHECKING:
    from llmlab.serving.inference import ChatSession

DEFAULT_TOKENIZER = "data/tokenizer/tokenizer.json"
DEFAULT_MODEL = "ppo"
CHAT_COMMANDS = (
    "/reset forgets the conversation, /temperature T changes the temperature, /quit (or Ctrl-D) ends"
)
_COMMAND = re.compile(r"/[A-Za-z]+(\s|$)")


# ------------------------------------------------------------------------------------- count-tokens


def count_tokens_cmd(args: argparse.Namespace) -> None:
    from llmlab.data.tokenizer import count_tokens

    if args.file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LlmlabError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise LlmlabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    n = count_tokens(text, args.tokenizer)
    if args.verbose:
        print(f"{n} tokens, {len(text)} characters ({len(text) / max(n, 1):.2f} characters per token)")
    else:
        print(n)


# --------------------------------------------------------------------------------------------- chat


def chat_loop(session: ChatSession, inp: TextIO, out: TextIO) -> None:
    """Talk: read the user's lines from `inp`, stream the replies to `out`. Ends at /quit, end of input or
    Ctrl-C. No terminal needed (tests pass text streams); on one, input() gives line editing."""

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    ctx = session.context_length
    say(
        f"[context {ctx} tokens, temperature {session.sampling.temperature:g}, replies up to "
        f"{session.sampling.max_new_tokens} tokens. The model keeps no memory: each turn the whole conversation "
        "is sent again, and the oldest turns are forgotten when it no longer fits]"
    )
    say(f"[{CHAT_COMMANDS}]")
    try:
        while (line := _read_line(inp, out)) is not None:
            line = line.strip()
            if not line:
                continue
            if _COMMAND.match(line):
                command, _, arg = line.partition(" ")
                if command == "/quit":
                    break
                if command == "/reset":
                    session.reset()
                    say("[conversation forgotten]")
                elif command == "/temperature":
                    try:
                        if arg.strip():
                            session.set_temperature(arg.strip())
                        say(f"[temperature {session.sampling.temperature:g}]")
                    except LlmlabError as e:
                        say(f"[{e}]")
                else:
                    say(f"[unknown command {command}: {CHAT_COMMANDS}]")
                continue
            prompt = session.prepare(line)
            if prompt.dropped_turns:
                n = prompt.dropped_turns
                say(f"[forgot the oldest {n} turn{'s' * (n > 1)} to fit the context of {ctx} tokens]")
            if prompt.truncated_tokens:
                say(
                    f"[your message is too long for the context: its first {prompt.truncated_tokens} tokens were cut]"
                )
            for piece in session.stream(prompt):
                out.write(piece)
                out.flush()
            turn = session.last_turn
            cut = "" if turn.reply.ended else f"; the reply stopped at max-new-tokens {len(turn.tokens)}"
            say(f"\n[context {turn.context_tokens}/{ctx} tokens{cut}]")
    except KeyboardInterrupt:
        say("")


def _read_line(inp: TextIO, out: TextIO) -> str | None:
    """The next line, or None at end of input. A terminal gets a "> " prompt with line editing."""
    if inp is sys.stdin and inp.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        try:
            return input("> ")
        except EOFError:
            out.write("\n")
            return None
    return inp.readline() or None


def chat_cmd(args: argparse.Namespace) -> None:
    """Interactive chat. The model is stateless: each turn the whole transcript is rendered with the chat
    template and sent again; the oldest turns are forgotten when it no longer fits the context."""
    from llmlab.serving.inference import ChatSession, load, seeded_generator

    sampling = _sampling(args)
    model, tok = load(args.model, args.tokenizer)
    _tolerant_stdio()
    chat_loop(ChatSession(model, tok, sampling, seeded_generator(args.seed)), sys.stdin, sys.stdout)


# ----------------------------------------------------------------------------------------- generate


def generate_cmd(args: argparse.Namespace) -> None:
    from llmlab.serving.inference import complete, load, seeded_generator

    sampling = _sampling(args)
    _tolerant_stdio()
    if args.prompt in (None, "-"):
        text = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    else:
        text = args.prompt
    model, tok = load(args.model, args.tokenizer)
    result = complete(
        model, tok, text, n=args.n, raw=args.raw, sampling=sampling, generator=seeded_generator(args.seed)
    )
    if result.truncated_tokens:
        print(
            f"note: the prompt is too long for the context: its first {result.truncated_tokens} tokens were cut",
            file=sys.stderr,
        )
    if args.json:
        record = {
            "model": str(args.model),
            "prompt": text,
            "temperature": sampling.temperature,
            "completions": [
                {"text": c.text, "ended": c.ended, "tokens": c.tokens} for c in result.completions
            ],
            "prompt_tokens": len(result.prompt_ids),
        }
        print(json.dumps(record, ensure_ascii=False))
        return
    for i, c in enumerate(result.completions):
        if len(result.completions) > 1:
            print(f"--- {i + 1}/{len(result.completions)} ---")
        print(c.text)


# ------------------------------------------------------------------------------------------- export


def export_cmd(args: argparse.Namespace) -> None:
    from llmlab.model.export import FORMATS, export_hf
    from llmlab.serving.inference import load

    if args.format not in FORMATS:
        raise LlmlabError(
            f"unknown export format {args.format!r}: pass --format {' or '.join(FORMATS)} "
            "(hf: a transformers Llama folder)"
        )
    model, _ = load(args.model, args.tokenizer)
    out = export_hf(model, args.tokenizer, args.dir, force=args.force)
    remote = (
        ", trust_remote_code=True: its Canon layers' class is in the folder"
        if model.config.canon_kernel
        else ""
    )
    print(
        f"wrote {out} (load it with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained{remote})"
    )


# ------------------------------------------------------------------------------------------- common


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)


def _tolerant_stdio() -> None:
    """Bytes that are not UTF-8 on stdin become U+FFFD instead of a UnicodeDecodeError."""
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(f"{name} = {folder}" for name, (folder, _) in MODELS.items())
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{', '.join(MODELS)} ({names}) or a folder with config.json + model.safetensors "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer.json (default: {DEFAULT_TOKENIZER})"
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = Sampling()
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help=f"0 is greedy, 1 the model's distribution (default: {d.temperature})",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=d.top_p,
        help=f"sample from the most likely tokens holding this probability (default: {d.top_p})",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"longest reply; this much of the context is kept free for it (default: {d.max_new_tokens})",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: none)")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="llmlab", description="Tools for the llmlab pipeline's artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "chat",
        help="talk to a model in the terminal (replies streamed)",
        description=chat_cmd.__doc__ + f" In the chat: {CHAT_COMMANDS}.",
    )
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=chat_cmd)

    p = sub.add_parser(
        "generate",
        help="one-shot completions of a prompt",
        description="Complete PROMPT (or standard input). By default PROMPT is a user message in "
        "the chat template and the output is the reply; --raw continues plain text.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt, or - (or nothing) for standard input")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument(
        "--n", type=int, default=1, help="number of completions, sampled as one batch (default: 1)"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object with the prompt and the completions"
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="continue the text itself (after <|bos|>: what the base model was trained on)",
    )
    p.set_defaults(func=generate_cmd)

    p = sub.add_parser(
        "export",
        help="write the model as a transformers Llama folder",
        description="Write config.json, model.safetensors, generation_config.json and the "
        "tokenizer (with a chat template) into DIR, atomically.",
    )
    p.add_argument(
        "dir", metavar="DIR", help="the folder to write (must not exist or be empty, unless --force)"
    )
    p.add_argument(
        "--format",
        default="hf",
        help="hf: transformers LlamaForCausalLM + tokenizer; a model with Canon layers gets its own class, loaded "
        "with trust_remote_code=True (default: hf)",
    )
    _add_model_args(p)
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    p.set_defaults(func=export_cmd)

    p = sub.add_parser("count-tokens", help="count the tokens of a text with the trained tokenizer")
    p.add_argument("file", nargs="?", default="-", help="text file, or - for standard input (default)")
    p.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer.json (default: {DEFAULT_TOKENIZER})"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also print characters and characters per token"
    )
    p.set_defaults(func=count_tokens_cmd)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
