"""The `llmlab` command line."""

import subprocess
import sys

from llmlab.data.tokenizer import load_tokenizer


def llmlab(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "llmlab.serving.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_count_tokens_from_file_and_stdin(smoke_data, tmp_path):
    tok_path = smoke_data / "tokenizer" / "tokenizer.json"
    text = "Add 478 and 356. Ones: 8 + 6 = 14, write 4, carry 1.\n"
    expected = len(load_tokenizer(tok_path).encode(text).ids)
    f = tmp_path / "t.txt"
    f.write_text(text)
    r = llmlab("count-tokens", str(f), "--tokenizer", str(tok_path))
    assert r.returncode == 0 and r.stdout.strip() == str(expected)
    r = llmlab("count-tokens", "-", "--tokenizer", str(tok_path), stdin=text)
    assert r.stdout.strip() == str(expected)
    r = llmlab("count-tokens", "-v", str(f), "--tokenizer", str(tok_path))
    assert r.stdout.startswith(f"{expected} tokens, {len(text)} characters")


def test_count_tokens_errors_are_one_line(smoke_data, tmp_path):
    r = llmlab(
        "count-tokens",
        str(tmp_path / "missing.txt"),
        "--tokenizer",
        str(smoke_data / "tokenizer" / "tokenizer.json"),
    )
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    r = llmlab("count-tokens", str(bad), "--tokenizer", str(smoke_data / "tokenizer" / "tokenizer.json"))
    assert r.returncode == 1 and "not UTF-8" in r.stderr
    r = llmlab("count-tokens", "-", "--tokenizer", str(tmp_path / "nope.json"), stdin="hi")
    assert r.returncode == 1 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
