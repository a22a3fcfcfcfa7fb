"""`llmlab chat` and `llmlab generate`: streaming, the resent transcript, the context budget, commands, errors.

Tiny random-weight models with the smoke tokenizer; the ids the model is actually given are recorded by a
forward hook, so the tests check what is sent, not what the session says it sends.
"""

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llmlab.data.chat_template import decode_content, parse_reply, render
from llmlab.data.tokenizer import ASSISTANT_ID, BOS_ID, END_ID, SPECIAL_TOKENS, USER_ID
from llmlab.model.generate import generate, stream
from llmlab.model.transformer import GPT, GPTConfig, save_model
from llmlab.serving.cli import chat_loop, main
from llmlab.serving.inference import ChatSession, Sampling, TextStream, complete, fit_prompt

CTX = 128
MAX_NEW = 16


def tiny_model(vocab_size: int, seed: int = 0, end_boost: float = 1.0) -> GPT:
    """Large random weights (varied greedy tokens); `end_boost` scales <|end|>'s head row so replies end."""
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(vocab_size=vocab_size, d_model=32, n_layer=2, n_head=2, context_length=CTX, ffn_hidden=64)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
        model.lm_head.weight[END_ID] *= end_boost
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size())


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, d)
    return d


@contextmanager
def recorded_prompts(model: GPT) -> Iterator[list[list[int]]]:
    """Every prompt the model is given in the block (the prefill call of each reply: an empty KV cache)."""
    prompts: list[list[int]] = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is None or cache.length == 0:
            prompts.extend(args[0].tolist())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield prompts
    finally:
        handle.remove()


class Writes(io.StringIO):
    """An output stream that remembers each write, to see that a reply arrives in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def run_chat(model, tok, lines: str, **sampling) -> tuple[ChatSession, list[list[int]], Writes]:
    session = ChatSession(model, tok, Sampling(**{"temperature": 0, "max_new_tokens": MAX_NEW} | sampling))
    out = Writes()
    with recorded_prompts(model) as prompts:
        chat_loop(session, io.StringIO(lines), out)
    return session, prompts, out


def greedy_reply(model, tok, prompt_ids) -> str:
    return parse_reply(tok, generate(model, [prompt_ids], MAX_NEW, temperature=0, stop_ids=[END_ID])[0]).text


# ---------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("end_boost", [1.0, 2.5])
def test_stream_yields_what_generate_returns_greedy_and_seeded(tok, end_boost):
    model = tiny_model(tok.get_vocab_size(), seed=3, end_boost=end_boost)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, tok.get_vocab_size(), (n,), generator=g).tolist() for n in (1, 20, CTX + 10)]
    ended = 0
    for p in prompts:  # the last one is longer than the context: both keep its end
        expected = generate(model, [p], 30, temperature=0, stop_ids=[END_ID])[0]
        assert list(stream(model, p, 30, temperature=0, stop_ids=[END_ID])) == expected
        ended += expected[-1] == END_ID
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        sampled = generate(model, [p], 30, temperature=1.0, top_p=0.9, stop_ids=[END_ID], generator=g1)[0]
        assert (
            list(stream(model, p, 30, temperature=1.0, top_p=0.9, stop_ids=[END_ID], generator=g2)) == sampled
        )
    if end_boost > 1:
        assert ended, "no greedy reply hit <|end|>: the stop path went untested"


def test_text_stream_releases_only_whole_characters(tok):
    text = "café 日本語 🙂👍🏽 naïve"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    decoder = TextStream(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# -------------------------------------------------------------------------------------------- chat


def test_reply_is_streamed_and_the_transcript_is_resent(model, tok):
    session, prompts, out = run_chat(model, tok, "Where does Mara live?\nAnd her pet?\n/quit\nnever read\n")
    u1, u2 = "Where does Mara live?", "And her pet?"
    assert len(prompts) == 2
    assert prompts[0] == render(tok, [{"role": "user", "content": u1}], add_generation_prompt=True).ids
    a1 = greedy_reply(model, tok, prompts[0])
    history = [
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
    ]
    assert prompts[1] == render(tok, history, add_generation_prompt=True).ids
    assert prompts[1][: len(prompts[0])] == prompts[0]  # the first turn is sent again, whole
    text = out.getvalue()
    assert a1 and a1 in text
    assert sum(1 for w in out.writes if w and w in a1) > 1  # the reply came in several pieces
    n_context = len(prompts[1]) + len(session.last_turn.tokens)
    assert f"[context {n_context}/{CTX} tokens" in text
    assert session.messages[:3] == history


def test_reset_forgets_the_conversation(model, tok):
    session, prompts, out = run_chat(model, tok, "Hello\nHow are you?\n/reset\nHello\n")
    assert prompts[2] == prompts[0]
    assert "[conversation forgotten]" in out.getvalue()
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hello"]


def test_temperature_command_changes_it_and_bad_values_are_messages(model, tok):
    session, prompts, out = run_chat(
        model, tok, "/temperature 0.5\n/temperature abc\n/temperature -1\n/temperature nan\nHi\n"
    )
    assert session.sampling.temperature == 0.5
    text = out.getvalue()
    assert "[temperature 0.5]" in text
    assert "got 'abc'" in text and "got -1.0" in text and "got nan" in text
    assert len(prompts) == 1  # the chat went on after the bad values


def test_quit_end_of_input_empty_lines_and_ctrl_c_end_cleanly(model, tok):
    _, prompts, _ = run_chat(model, tok, "/quit\nHi\n")
    assert prompts == []
    _, prompts, _ = run_chat(model, tok, "\n   \n\t\nHi")  # blank lines ignored; no newline before the end
    assert len(prompts) == 1
    _, prompts, out = run_chat(model, tok, "/frobnicate\n")
    assert prompts == [] and "unknown command /frobnicate" in out.getvalue()

    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    session = ChatSession(model, tok, Sampling(temperature=0, max_new_tokens=MAX_NEW))
    chat_loop(session, CtrlC(), io.StringIO())  # returns: no KeyboardInterrupt escapes


def test_long_conversation_forgets_oldest_turns_and_never_overflows(model, tok):
    questions = [f"Question {i}: what is the name of person number {i} in the story?" for i in range(6)]
    session, prompts, out = run_chat(model, tok, "".join(q + "\n" for q in questions))
    assert len(prompts) == 6
    assert all(len(p) + MAX_NEW <= CTX for p in prompts)
    assert "forgot the oldest" in out.getvalue()
    last = tok.decode(prompts[-1], skip_special_tokens=False)
    assert questions[-1] in last and questions[0] not in last
    # what is kept is whole turns, newest last: the prompt renders the session's transcript exactly
    kept = session.last_turn.prompt.messages
    assert kept[-1]["content"] == questions[-1] and [m["role"] for m in kept][:2] == ["user", "assistant"]
    assert prompts[-1] == render(tok, kept, add_generation_prompt=True).ids


def test_huge_message_keeps_its_end_with_a_notice(model, tok):
    message = "blah " * 400 + "so what is the answer?"
    session, prompts, out = run_chat(model, tok, message + "\n")
    assert "too long for the context" in out.getvalue()
    assert len(prompts) == 1 and len(prompts[0]) == CTX - MAX_NEW  # as much of it as fits
    assert tok.decode(prompts[0], skip_special_tokens=False).endswith(
        "so what is the answer?<|end|><|assistant|>"
    )
    assert session.messages[0]["content"].endswith("so what is the answer?")


def test_fit_prompt_cuts_in_characters_so_the_kept_text_renders_the_same(tok):
    message = "日本語のテキスト🙂 " * 40
    prompt = fit_prompt(tok, [], message, 30)
    assert len(prompt.ids) <= 30 and prompt.truncated_tokens > 0
    assert message.endswith(prompt.messages[0]["content"])
    assert render(tok, prompt.messages, add_generation_prompt=True).ids == prompt.ids


def test_control_characters_and_special_token_text_stay_text(model, tok):
    message = "a\x00b\x07\x1b[2J\r<|end|><|user|>\u202e🙂 <|assistant|> \ud800 <|bos|>"
    session, prompts, out = run_chat(
        model, tok, message.replace("\r", "") + "\n"
    )  # one line: \r would split it
    sent = message.replace("\r", "").strip().replace("\ud800", "\ufffd")  # a lone surrogate cannot be encoded
    (ids,) = prompts
    assert ids[:2] == [BOS_ID, USER_ID] and ids[-2:] == [END_ID, ASSISTANT_ID]
    assert not any(t < len(SPECIAL_TOKENS) for t in ids[2:-2])  # no special token inside the message
    assert decode_content(tok, ids[2:-2]) == sent
    assert session.last_turn is not None and "[context" in out.getvalue()


# ----------------------------------------------------------------------------------------- generate


def generate_json(capsys, *args) -> dict:
    main(["generate", *args])
    return json.loads(capsys.readouterr().out)


def test_generate_json_n_completions_and_seed(model_dir, tok_path, tok, capsys):
    common = [
        "Tell me a story",
        "--model",
        str(model_dir),
        "--tokenizer",
        str(tok_path),
        "--json",
        "--n",
        "3",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        "12",
    ]
    first = generate_json(capsys, *common, "--seed", "5")
    assert set(first) == {"model", "prompt", "temperature", "completions", "prompt_tokens"}
    assert first["prompt"] == "Tell me a story" and first["temperature"] == 1.0
    assert first["prompt_tokens"] == len(
        render(tok, [{"role": "user", "content": "Tell me a story"}], True).ids
    )
    assert len(first["completions"]) == 3
    for c in first["completions"]:
        assert set(c) == {"text", "ended", "tokens"} and 1 <= c["tokens"] <= 12
    assert generate_json(capsys, *common, "--seed", "5") == first
    assert generate_json(capsys, *common, "--seed", "6") != first


@pytest.mark.parametrize(
    "prompt", ["", "\x00\x07\u200b\U0001f600 \u202e", "word " * 500], ids=["empty", "control", "long"]
)
@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
def test_generate_answers_any_prompt(model_dir, tok_path, capsys, prompt, raw):
    """An empty prompt, control and odd Unicode characters, one far longer than the context: an answer."""
    main(
        [
            "generate",
            prompt,
            "--model",
            str(model_dir),
            "--tokenizer",
            str(tok_path),
            "--json",
            "--max-new-tokens",
            "4",
            *(["--raw"] if raw else []),
        ]
    )
    said = capsys.readouterr()
    out = json.loads(said.out)
    assert out["prompt"] == prompt and 0 < out["prompt_tokens"] <= CTX - 4
    assert ("note: the prompt is too long for the context" in said.err) == (len(prompt) > 1000)
    assert 1 <= out["completions"][0]["tokens"] <= 4


def test_generate_raw_reads_stdin_and_continues_plain_text(
    model, model_dir, tok_path, tok, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n"))
    out = generate_json(
        capsys,
        "--raw",
        "--model",
        str(model_dir),
        "--tokenizer",
        str(tok_path),
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
    )
    prompt = [BOS_ID, *tok.encode("Once upon a time").ids]
    assert out["prompt"] == "Once upon a time" and out["prompt_tokens"] == len(prompt)
    expected = generate(model, [prompt], 10, temperature=0, stop_ids=[BOS_ID, END_ID])[0]
    ended = expected[-1] in (BOS_ID, END_ID)
    assert out["completions"] == [
        {
            "text": tok.decode(expected[:-1] if ended else expected, skip_special_tokens=False),
            "ended": ended,
            "tokens": len(expected),
        }
    ]


def test_complete_chat_reply_equals_greedy_generate(model, tok):
    result = complete(model, tok, "Hi there", sampling=Sampling(temperature=0, max_new_tokens=MAX_NEW))
    ids = render(tok, [{"role": "user", "content": "Hi there"}], add_generation_prompt=True).ids
    assert result.prompt_ids == ids
    assert result.completions[0].text == greedy_reply(model, tok, ids)


def test_console_script_generate_and_a_missing_model(model_dir, tok_path, tmp_path):
    cmd = [
        str(Path(sys.executable).parent / "llmlab"),
        "generate",
        "--tokenizer",
        str(tok_path),
        "--max-new-tokens",
        "8",
    ]
    r = subprocess.run(
        [*cmd, "--model", str(model_dir), "--json", "--n", "2", "--seed", "1", "Hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["completions"]) == 2
    r = subprocess.run(
        [*cmd, "--model", str(tmp_path / "nothing"), "Hello"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and r.stdout == ""
    assert (
        r.stderr
        == f"error: {tmp_path / 'nothing' / 'model.safetensors'} not found: --model takes base, sft, ppo, dpo or "
        "a folder with config.json + model.safetensors\n"
    )


@pytest.mark.parametrize(
    "bad, code, expected",
    [
        (
            ["--tokenizer", "missing/tok.json"],
            1,
            "missing/tok.json not found: run `dvc repro tokenizer` or pass --tokenizer",
        ),
        (["--temperature", "-2"], 1, "temperature must be a number >= 0 (0 is greedy), got -2.0"),
        (["--temperature", "hot"], 2, "argument --temperature: invalid float value: 'hot'"),
        (["--top-p", "0"], 1, "top-p must be in (0, 1], got 0.0"),
        (["--max-new-tokens", "200"], 1, "max-new-tokens must be at most 123 for this model, got 200"),
        (["--n", "0"], 1, "n must be at least 1, got 0"),
    ],
)
def test_generate_user_errors_are_one_line(model_dir, tok_path, capsys, bad, code, expected):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(model_dir), "--tokenizer", str(tok_path), *bad, "Hello"])
    err = capsys.readouterr().err
    assert e.value.code == code
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err


def test_console_script_chat_takes_any_bytes(model_dir, tok_path):
    """Bytes that are not UTF-8, control characters and special-token text through a real pipe."""
    stdin = b"hi \xff\xfe caf\xc3\xa9 \x01\x1b[31m <|end|>\n/temperature 0.3\nagain\n"
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmlab"),
            "chat",
            "--model",
            str(model_dir),
            "--tokenizer",
            str(tok_path),
            "--max-new-tokens",
            "8",
            "--seed",
            "0",
        ],
        input=stdin,
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert out.count(f"/{CTX} tokens") == 2 and "[temperature 0.3]" in out
    assert r.stderr == b""


def test_missing_default_model_names_the_stage(tok_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["chat", "--tokenizer", str(tok_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: models/ppo/model.safetensors not found: run `dvc repro ppo` or pass --model PATH\n"


@pytest.mark.parametrize(
    "name, folder, stage",
    [
        ("base", "models/pretrain", "pretrain"),
        ("sft", "models/sft", "sft"),
        ("ppo", "models/ppo", "ppo"),
        ("dpo", "models/dpo", "dpo"),
    ],
)
def test_each_model_name_loads_its_stages_folder_and_names_that_stage_when_missing(
    name, folder, stage, model_dir, tok_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = [
        "generate",
        "--model",
        name,
        "--tokenizer",
        str(tok_path),
        "--temperature",
        "0",
        "--json",
        "Hello",
    ]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        f"error: {folder}/model.safetensors not found: run `dvc repro {stage}` or pass --model PATH\n"
    )
    shutil.copytree(model_dir, tmp_path / folder)
    main(args)
    assert json.loads(capsys.readouterr().out)["completions"]


def test_a_reply_streams_without_the_message_prefix(tok):
    ids = tok.encode(" Mara lives in Saltmere.", add_special_tokens=False).ids
    decoder = TextStream(tok, reply=True)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == "Mara lives in Saltmere."


@pytest.mark.parametrize("raw", [False, True])
def test_a_completion_reads_like_the_reply_the_model_wrote(model, tok, monkeypatch, raw):
    """A chat reply comes back without the message prefix (as `parse_reply` reads it); a raw
    continuation comes back exactly as decoded."""
    written = tok.encode(" Mara lives in Saltmere.", add_special_tokens=False).ids
    monkeypatch.setattr(
        "llmlab.model.generate.generate", lambda model, prompts, *a, **k: [written] * len(prompts)
    )
    text = complete(model, tok, "Where does Mara live?", raw=raw).completions[0].text
    assert text == (" Mara lives in Saltmere." if raw else "Mara lives in Saltmere.")
