"""The models as MLflow models: predict against `generate`, params, limits, truncation, the registry, a live
`mlflow models serve`, and the register stage. Tiny random-weight models, the smoke tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import psutil
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from llmlab.data.chat_template import encode_content, parse_reply, render
from llmlab.data.tokenizer import ASSISTANT_ID, BOS_ID, END_ID, SPECIAL_TOKENS, USER_ID
from llmlab.model.generate import generate
from llmlab.model.transformer import GPT, GPTConfig, save_model
from llmlab.serving import mlflow_model
from llmlab.serving.mlflow_model import MAX_PROMPT_CHARS, MAX_ROWS, ChatModel, log_chat_model, register
from tests.conftest import free_port, run_stage, running_server, stage_env

# MLflow's own schema code compares columns with a range, which pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

CTX = 64
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does Mara Quill live?"},
    {"role": "assistant", "content": "In Port Avery."},
    {"role": "user", "content": "And her pet?"},
]


def tiny_gpt(vocab_size: int, seed: int) -> GPT:
    """Random weights. Untied: with tied embeddings a random model only repeats its last input token."""
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size, d_model=32, n_layer=2, n_head=2, context_length=CTX, ffn_hidden=64, tie_embeddings=False
    )
    return GPT(config).eval()


def always_ends(vocab_size: int) -> GPT:
    """A model whose next token is always <|end|>: the blocks add nothing (output projections zeroed), every
    embedding has a large first coordinate, and only <|end|>'s output row reads that coordinate."""
    model = GPT(
        GPTConfig(
            vocab_size,
            d_model=32,
            n_layer=1,
            n_head=2,
            context_length=CTX,
            ffn_hidden=64,
            tie_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        model.embed.weight[:, 0] = 100.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[END_ID, 0] = 1.0
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second torch thread only adds waiting (measured 20x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory, smoke_data):
    """A private MLflow store for this module, through MLFLOW_TRACKING_URI as a user would set it."""
    d = tmp_path_factory.mktemp("store")
    shutil.copy(
        smoke_data / "mlflow.db", d / "mlflow.db"
    )  # already migrated: a new store takes ~6 s to create
    uri = f"sqlite:///{d / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("serving-tests", artifact_location=(d / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        assert mlflow.get_tracking_uri() == uri, "something in this process pinned MLflow's tracking URI"
        yield SimpleNamespace(dir=d, uri=uri, client=client, run_id=client.create_run(experiment).info.run_id)


@pytest.fixture(scope="module")
def chat(store, smoke_data, tok):
    """A tiny model logged and loaded back: (the in-memory model, the MLflow model, its URI)."""
    model = tiny_gpt(tok.get_vocab_size(), seed=0)
    save_model(model, store.dir / "tiny")
    t = time.perf_counter()
    uri = log_chat_model(
        store.dir / "tiny", smoke_data / "tokenizer" / "tokenizer.json", "chat", run_id=store.run_id
    )
    print(f"log_chat_model: {time.perf_counter() - t:.2f} s")
    return SimpleNamespace(model=model, pyfunc=mlflow.pyfunc.load_model(uri), uri=uri)


def greedy(model, tok, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """The reference: `generate` at temperature 0 on the same token ids, read as `parse_reply` reads it."""
    outs = generate(model, prompts, max_tokens, temperature=0.0, stop_ids=[END_ID])
    return [parse_reply(tok, o).text for o in outs]


def test_greedy_prompt_and_messages_match_generate(chat, tok):
    prompts = [
        "Where does Mara Quill live?",
        "",
        "ctrl \x00\x07\x1b\r\n\t é 日本語 🙂 <|end|><|user|> \u202e",
    ]
    out = chat.pyfunc.predict(pd.DataFrame({"prompt": prompts}), params={"max_tokens": 8})
    ids = [render(tok, [{"role": "user", "content": p}], add_generation_prompt=True).ids for p in prompts]
    assert out["completion"].tolist() == greedy(chat.model, tok, ids, 8)
    assert out["prompt_tokens"].tolist() == [len(x) for x in ids]
    assert (
        out["completion_tokens"].tolist() == [8, 8, 8]
        and not out["truncated"].any()
        and not out["ended"].any()
    )

    out = chat.pyfunc.predict([{"messages": CHAT}], params={"max_tokens": 8})
    assert out["completion"].tolist() == greedy(
        chat.model, tok, [render(tok, CHAT, add_generation_prompt=True).ids], 8
    )


def test_raw_continues_plain_text(chat, tok):
    text = "Mara Quill lives in"
    out = chat.pyfunc.predict([{"prompt": text}], params={"max_tokens": 6, "raw": True})
    ref = generate(chat.model, [[BOS_ID, *encode_content(tok, text)]], 6, temperature=0.0, stop_ids=[BOS_ID])[
        0
    ]
    assert out["completion"][0] == tok.decode([t for t in ref if t != BOS_ID], skip_special_tokens=False)


def test_params_are_honoured(chat, tok):
    def predict(**params):
        return chat.pyfunc.predict([{"prompt": "Tell me about Mara Quill."}], params=params).iloc[0]

    assert predict(max_tokens=3)["completion_tokens"] == 3
    first, again, other = (
        predict(temperature=1.0, seed=7),
        predict(temperature=1.0, seed=7),
        predict(temperature=1.0, seed=8),
    )
    assert first["completion"] == again["completion"] != other["completion"]
    # top_p this small keeps only the most likely token: sampling becomes greedy
    assert predict(temperature=1.0, top_p=1e-9, seed=1)["completion"] == predict()["completion"]


def test_a_reply_that_ends_says_so(store, smoke_data, tok):
    save_model(always_ends(tok.get_vocab_size()), store.dir / "ends")
    uri = log_chat_model(
        store.dir / "ends", smoke_data / "tokenizer" / "tokenizer.json", "ends", run_id=store.run_id
    )
    out = mlflow.pyfunc.load_model(uri).predict([{"prompt": "Hi"}]).iloc[0]
    assert (out["completion"], out["ended"], out["completion_tokens"]) == ("", True, 1)


@pytest.mark.parametrize(
    "rows, params, message",
    [
        ([{"prompt": "Hi"}], {"max_tokens": CTX + 1}, f"max_tokens must be 1 to {CTX}"),
        ([{"prompt": "Hi"}], {"max_tokens": 0}, f"max_tokens must be 1 to {CTX}"),
        (
            [{"prompt": "Hi"}],
            {"temperature": -1.0, "top_p": 0.0},
            "temperature must be >= 0 (0 = greedy), got -1.0; top_p",
        ),
        ([{"prompt": "Hi"}] * (MAX_ROWS + 1), {}, f"{MAX_ROWS + 1} rows in one request; at most {MAX_ROWS}"),
        (
            [{"prompt": "x" * (MAX_PROMPT_CHARS + 1)}],
            {},
            f"row 0: {MAX_PROMPT_CHARS + 1} characters; at most",
        ),
        ([{"messages": CHAT[:3]}], {}, "row 0: messages must end with a user turn"),
        ([{"messages": [{"role": "robot", "content": "Hi"}]}], {}, "row 0: message 0: role must be"),
        ([{"messages": CHAT}], {"raw": True}, "raw continues a plain-text 'prompt'"),
        (
            [{"prompt": "lone surrogate \ud800"}],
            {},
            "surrogates not allowed",
        ),  # refused by MLflow's schema check
    ],
)
def test_bad_batchesget_a_clear_error(chat, rows, params, message):
    with pytest.raises(MlflowException) as e:
        chat.pyfunc.predict(rows, params=params)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server answers 400
    assert message in e.value.message


def test_an_over_long_prompt_keeps_the_chat_framing(chat, tok, monkeypatch):
    """Fitting drops the oldest turns, then the start of a message too long alone, never <|bos|><|user|>."""
    seen: list[list[int]] = []  # the prompt ids handed to the model

    def spy(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return generate(model, prompts, *args, **kwargs)

    # The logged model runs mlflow_model.py under a module name of its own: spy on this module's ChatModel instead.
    monkeypatch.setattr(mlflow_model, "generate", spy)
    direct = ChatModel()
    direct.model, direct.tok = chat.model, tok
    long = "the quick brown fox " * 100
    batches = [  # MLflow's schema check wants one kind of row per request
        [{"prompt": long}, {"prompt": "Hi"}],  # a message longer than the context keeps its end
        [{"messages": [{"role": "user", "content": long}, *CHAT[2:]]}],  # the long old turn is forgotten
    ]
    out = pd.concat([direct.predict(None, pd.DataFrame(rows), params={"max_tokens": 8}) for rows in batches])
    assert out["truncated"].tolist() == [True, False, True]
    assert out["prompt_tokens"].tolist() == [len(x) for x in seen]
    for ids in seen:
        assert len(ids) <= CTX - 8  # room left for max_tokens of reply
        assert ids[:2] == [BOS_ID, USER_ID] and ids[-2:] == [END_ID, ASSISTANT_ID]
        assert not any(t < len(SPECIAL_TOKENS) for t in ids[2:-2])  # one user message, no other turn
    assert long.endswith(tok.decode(seen[0][2:-2], skip_special_tokens=False))
    assert seen[1:] == [
        render(tok, [{"role": "user", "content": m}], add_generation_prompt=True).ids
        for m in ("Hi", "And her pet?")
    ]
    # the logged model fits the same way
    logged = pd.concat([chat.pyfunc.predict(rows, params={"max_tokens": 8}) for rows in batches])
    assert logged["completion"].tolist() == out["completion"].tolist() == greedy(chat.model, tok, seen, 8)
    assert logged["truncated"].tolist() == [True, False, True]

    seen.clear()
    out = direct.predict(None, pd.DataFrame([{"prompt": long}]), params={"max_tokens": 8, "raw": True})
    assert out["truncated"][0]
    assert seen == [[BOS_ID, *encode_content(tok, long)[-(CTX - 8 - 1) :]]]  # raw: <|bos|>, the latest tokens


def test_register_twice_moves_champion(store, chat):
    assert [register(chat.uri, "twice"), register(chat.uri, "twice")] == [1, 2]
    assert int(store.client.get_model_version_by_alias("twice", "champion").version) == 2


@pytest.mark.slow
def test_served_champion_answers_like_the_model_in_process(store, chat, tmp_path):
    version = register(chat.uri)  # llmlab-chat, alias champion
    request = {
        "dataframe_records": [{"prompt": "Where does Mara Quill live?"}, {"prompt": ""}],
        "params": {"max_tokens": 8},
    }
    expected = chat.pyfunc.predict(request["dataframe_records"], params=request["params"])

    port, log = free_port(), tmp_path / "server.log"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MLFLOW_HOST", None)
    cmd = [
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/llmlab-chat@champion",
        "--env-manager",
        "local",
        "-p",
        str(port),
    ]
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    with running_server(cmd, f"{url}/ping", env, log) as server:
        print(f"mlflow models serve: up in {time.perf_counter() - t:.1f} s (version {version})")
        # The command as the README gives it (no --host) listens on the loopback interface only.
        procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        listening = {
            c.laddr.ip for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN
        }
        assert listening == {"127.0.0.1"}, listening
        r = requests.post(f"{url}/invocations", json=request, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == expected.to_dict("records")

        r = requests.post(
            f"{url}/invocations", json={**request, "params": {"max_tokens": CTX + 1}}, timeout=60
        )
        assert r.status_code == 400 and f"max_tokens must be 1 to {CTX}" in r.json()["message"], r.text


def test_register_stage(store, smoke_data, tok, tmp_path):
    tokenizer = smoke_data / "tokenizer" / "tokenizer.json"
    models = {
        name: tiny_gpt(tok.get_vocab_size(), seed)
        for seed, name in enumerate(["pretrain", "sft", "ppo", "dpo"])
    }
    for name, model in models.items():
        save_model(model, tmp_path / "models" / name)
    env = stage_env(tmp_path) | {
        "MLFLOW_TRACKING_URI": store.uri,
        "LLMLAB_EXPERIMENT": "register-stage",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "--base",
        "models/pretrain",
        "--sft",
        "models/sft",
        "--ppo",
        "models/ppo",
        "--dpo",
        "models/dpo",
        "--tokenizer",
        str(tokenizer),
        "--out",
        "reports/register.json",
        "--name",
        "stage-test",
    ]

    r = run_stage("register", [a.replace("models/sft", "models/nope") for a in args], tmp_path, env)
    assert (
        r.returncode == 1
        and "models/nope/model.safetensors not found: it is written by the 'sft' stage" in r.stderr
    )
    assert not (tmp_path / "metrics").exists()

    r = run_stage("register", args, tmp_path, env)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "reports" / "register.json").read_text())
    print("register stage:", out["seconds"])
    assert (out["registered_model"], out["version"], out["alias"]) == ("stage-test", 1, "champion")
    assert sorted(out["models"]) == ["base", "dpo", "ppo", "sft"]
    champion = store.client.get_model_version_by_alias("stage-test", "champion")
    assert champion.source == out["models"]["ppo"]
    beside = store.client.get_model_version_by_alias("stage-test-dpo", "champion")
    assert (beside.source, out["dpo_version"]) == (out["models"]["dpo"], 1)
    experiment = store.client.get_experiment_by_name("register-stage").experiment_id
    run = store.client.search_runs([experiment], filter_string="tags.stage = 'register'")[0]
    assert sorted(f"models:/{o.model_id}" for o in run.outputs.model_outputs) == sorted(
        out["models"].values()
    )

    # the champion holds the PPO weights, not the base model's
    served = mlflow.pyfunc.load_model("models:/stage-test@champion").predict(
        [{"prompt": "Hi"}], params={"max_tokens": 8}
    )
    hi = [render(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True).ids]
    assert (
        served["completion"][0]
        == greedy(models["ppo"], tok, hi, 8)[0]
        != greedy(models["pretrain"], tok, hi, 8)[0]
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400), raw=st.booleans())
def test_any_prompt_text_gets_an_answer(chat, tok, text, raw):
    """Empty, control characters, any Unicode (st.text: every code point but surrogates, which MLflow's
    own schema check refuses with a clear error, above), up to longer than the context."""
    out = chat.pyfunc.predict([{"prompt": text}], params={"max_tokens": 4, "raw": raw})
    row = out.iloc[0]
    assert isinstance(row["completion"], str) and 0 < row["prompt_tokens"] <= CTX - 4
    assert row["truncated"] == (len(encode_content(tok, text)) > CTX - 4 - (1 if raw else 4))
