"""Outputs are written whole or not at all, and a failed write is one clear error.

The write failures are real ones from the kernel, made in this process: a file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored) makes every write past the limit fail with EFBIG, as a full disk
fails with ENOSPC, whichever library writes (Python, torch.save, safetensors' Rust code, pyarrow).
"""

from __future__ import annotations

import contextlib
import random
import resource
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmlab.errors import LlmlabError, OutputWriteError
from llmlab.io import atomic_path, write_json
from llmlab.model.transformer import GPT, GPTConfig, load_model, save_model
from llmlab.training.checkpoints import AtomicCheckpointIO

LIMIT = 20_000  # bytes: more than any small JSON here, less than the model and the checkpoint


@contextlib.contextmanager
def file_size_limit(n: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=300, d_model=32, n_layer=2, n_head=2, context_length=32)
    )  # ~200 KB of weights


def test_a_failed_model_write_keeps_the_previous_model_and_leaves_nothing(model, tmp_path):
    out = tmp_path / "models" / "pretrain"
    save_model(model, out)
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with file_size_limit(LIMIT), pytest.raises(OutputWriteError) as e:
        save_model(model, out)
    message = str(e.value)
    assert (
        message.startswith(f"could not write {out}: ")
        and "File too large" in message
        and "GB free" in message
    )
    assert (out / "model.safetensors").read_bytes() == before  # the old output is untouched
    load_model(out)
    assert leftovers(tmp_path) == []


def test_a_failed_checkpoint_write_leaves_no_checkpoint(model, tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    with file_size_limit(LIMIT), pytest.raises(OutputWriteError, match="could not write .*last.ckpt: "):
        AtomicCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "global_step": 3}, path)
    assert not path.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["json", "parquet", "folder"])
def test_failed_writes_of_every_kind_are_one_error_and_leave_nothing(kind, tmp_path):
    rng = random.Random(0)
    big = [{"text": rng.randbytes(50).hex(), "i": i} for i in range(1000)]  # ~100 KB even compressed
    out = tmp_path / f"out.{kind}"
    with file_size_limit(LIMIT), pytest.raises(OutputWriteError, match=f"could not write {out}"):
        if kind == "json":
            write_json(out, big)
        elif kind == "parquet":
            with atomic_path(out) as tmp:
                pq.write_table(pa.Table.from_pylist(big), tmp, compression="none")
        else:
            with atomic_path(out, is_dir=True) as tmp:
                (tmp / "small.json").write_text("{}")
                write_json(tmp / "big.json", big)
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_output_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "reports").write_text("a file where a folder should be")
    with pytest.raises(OutputWriteError, match="could not write .*reports/x.json: "):
        write_json(tmp_path / "reports" / "x.json", {"a": 1})


def test_other_errors_pass_through_unchanged_and_still_leave_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("partial")
        1 / 0  # noqa: B018 - a bug in the code that writes: not a write failure, not re-labelled
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LlmlabError, match="^ours$"), atomic_path(tmp_path / "d", is_dir=True):
        raise LlmlabError("ours")
    assert list(tmp_path.iterdir()) == []


def test_csv_text_takes_every_key_in_first_seen_order_and_leaves_missing_cells_empty():
    from llmlab.io import csv_text

    assert (
        csv_text([{"step": 1, "loss": 2.5}, {"step": 2, "gold": 0.5}]) == "step,loss,gold\n1,2.5,\n2,,0.5\n"
    )
