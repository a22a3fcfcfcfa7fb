"""The `llmlab` command: small tools around the pipeline's artifacts.

    llmlab count-tokens [FILE|-]     token count of a text with the trained tokenizer
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmlab.errors import LlmlabError

DEFAULT_TOKENIZER = "data/tokenizer/tokenizer.json"


def count_tokens_cmd(args: argparse.Namespace) -> None:
    from llmlab.tokenizer import count_tokens

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmlab", description="Tools for the llmlab pipeline's artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("count-tokens", help="count the tokens of a text with the trained tokenizer")
    p.add_argument("file", nargs="?", default="-", help="text file, or - for standard input (default)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer.json (default: {DEFAULT_TOKENIZER})")
    p.add_argument("-v", "--verbose", action="store_true", help="also print characters and characters per token")
    p.set_defaults(func=count_tokens_cmd)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
