"""No pickle from a file a user could be handed is ever run: a crafted pickle where a checkpoint or a model
belongs is refused with a clear error, and the code inside it does not execute. A truncated or foreign
model folder is one clear error too."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmlab.errors import LlmlabError
from llmlab.io import write_json
from llmlab.model.transformer import GPT, GPTConfig, load_model, save_model
from llmlab.training.checkpoints import LAST, resume_path


class Payload:
    """Unpickling this runs a shell command that creates a file: proof that the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_dir(tmp_path, content) -> tuple:
    """A checkpoint folder whose fingerprint matches, so resume_path would resume from `content`."""
    d = tmp_path / "ckpt"
    d.mkdir()
    write_json(d / "fingerprint.json", {"fingerprint": "fp"})
    torch.save(content, d / LAST)
    return d


def test_a_crafted_pickle_as_a_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    d = checkpoint_dir(tmp_path, {"state_dict": {}, "evil": Payload(marker)})
    with pytest.raises(LlmlabError, match=r"cannot be read as a checkpoint.*nothing in it was run.*Delete"):
        resume_path(d, "fp")
    assert not marker.exists()


def test_a_damaged_checkpoint_gives_a_clear_error(tmp_path):
    d = checkpoint_dir(tmp_path, {"state_dict": {"w": torch.ones(1000)}, "global_step": 3})
    data = (d / LAST).read_bytes()
    (d / LAST).write_bytes(data[: len(data) // 2])  # truncated, as a disk failure would leave it
    with pytest.raises(LlmlabError, match="cannot be read as a checkpoint"):
        resume_path(d, "fp")


def test_a_good_checkpoint_is_resumed(tmp_path):
    d = checkpoint_dir(tmp_path, {"state_dict": {"w": torch.ones(3)}, "global_step": 3})
    assert resume_path(d, "fp") == d / LAST


def test_a_crafted_pickle_as_model_weights_is_refused_and_not_run(tmp_path):
    model_dir = tmp_path / "model"
    save_model(GPT(GPTConfig(vocab_size=32, d_model=16, n_layer=1, n_head=2, context_length=8)), model_dir)
    marker = tmp_path / "pwned"
    torch.save(
        {"embed.weight": Payload(marker)}, model_dir / "model.safetensors"
    )  # a pickle, named as weights
    with pytest.raises(LlmlabError, match="is not a valid llmlab checkpoint"):
        load_model(model_dir)
    assert not marker.exists()


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _foreign_weights(d):  # a valid safetensors file of another model (names and shapes of its own)
    save_file({"transformer.wte.weight": torch.zeros(50, 8)}, str(d / "model.safetensors"))


def _other_shape(d):  # llmlab names, another width
    other = GPT(GPTConfig(vocab_size=32, d_model=32, n_layer=1, n_head=2, context_length=8))
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items() if k != "lm_head.weight"},
        str(d / "model.safetensors"),
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "model.safetensors is not a valid llmlab checkpoint: Error while deserializing header"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 5),
            "model.safetensors is not a valid llmlab checkpoint",
        ),
        (
            _foreign_weights,
            "model.safetensors is not a valid llmlab checkpoint: Error(s) in loading state_dict",
        ),
        (_other_shape, "model.safetensors is not a valid llmlab checkpoint: Error(s) in loading state_dict"),
        (lambda d: (d / "config.json").write_text('{"d_model": '), "config.json is not valid JSON"),
        (
            lambda d: (d / "config.json").write_text('{"hidden_size": 768}'),
            "config.json is not an llmlab model config",
        ),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json is not an llmlab model config"),
        (lambda d: (d / "config.json").unlink(), "config.json not found"),
    ],
    ids=[
        "truncated",
        "five-bytes",
        "foreign-weights",
        "other-shape",
        "broken-config",
        "foreign-config",
        "list-config",
        "no-config",
    ],
)
def test_a_truncated_or_foreign_model_folder_is_one_clear_error(tmp_path, damage, message):
    model_dir = tmp_path / "model"
    save_model(GPT(GPTConfig(vocab_size=32, d_model=16, n_layer=1, n_head=2, context_length=8)), model_dir)
    damage(model_dir)
    with pytest.raises(LlmlabError) as e:
        load_model(model_dir)
    assert message in str(e.value)


def test_the_servers_the_docs_start_listen_on_loopback_by_default():
    """`mlflow ui` / `mlflow server` and `mlflow models serve` as the README gives them (no --host) bind
    127.0.0.1 (the live `mlflow models serve` test checks the socket too); no doc or script binds 0.0.0.0."""
    from mlflow.cli import cli

    for command in (cli.commands["server"], cli.commands["models"].commands["serve"]):
        host = next(p for p in command.params if p.name == "host")
        assert host.default == "127.0.0.1", command.name
    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", root / "Makefile", *root.glob("docs/*.md"), *root.glob("src/llmlab/*.py")]
    binds_all = re.compile(r"(--host|-h|host\s*=)\s*['\"]?0\.0\.0\.0")
    assert not [d.name for d in docs if binds_all.search(d.read_text())]
