"""The corpus stage: every source, the empty/undecodable bookkeeping, the split and the written files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmlab.data.corpus import build_corpus, iter_corpus, read_corpus, write_corpus
from llmlab.data.world import World
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.params import CorpusConfig, HFCorpus, LocalCorpus, SyntheticCorpus

SMALL = SyntheticCorpus(
    n_sft_people=20,
    n_heldout_people=5,
    n_unknown_people=5,
    docs_per_person=4,
    n_stories=50,
    n_context=30,
    n_arithmetic=50,
)


def local(*paths: str, text_column: str = "text", val_fraction: float = 0.25) -> CorpusConfig:
    return CorpusConfig(
        source="local",
        val_fraction=val_fraction,
        local=LocalCorpus(paths=list(paths), text_column=text_column),
    )


def hf(name: str, **kw) -> CorpusConfig:
    return CorpusConfig(source="hf", val_fraction=0.25, hf=HFCorpus(name=name, **kw))


def texts(result) -> list[str]:
    return sorted(d["text"] for d in result.train + result.validation)


# ----------------------------------------------------------------------------------- synthetic + split


def test_synthetic_split_sizes_kinds_and_stats():
    cfg = CorpusConfig(val_fraction=0.1, synthetic=SMALL)
    result = build_corpus(cfg, seed=3, root=Path("."))
    n = 25 * 4 + 50 + 30 + 50
    assert len(result.validation) == round(n * 0.1) and len(result.train) == n - round(n * 0.1)
    assert result.world is not None and len(result.world.people) == 30
    s = result.stats
    assert (s["documents"], s["documents_train"], s["documents_validation"]) == (
        n,
        len(result.train),
        len(result.validation),
    )
    assert (s["documents_bio"], s["documents_story"], s["documents_context"], s["documents_arithmetic"]) == (
        100,
        50,
        30,
        50,
    )
    assert s["characters_train"] == sum(len(d["text"]) for d in result.train)
    assert s["characters_validation"] == sum(len(d["text"]) for d in result.validation)
    assert s["dropped_empty"] == 0 and s["replaced_characters"] == 0
    assert {d["kind"] for d in result.validation} <= {"bio", "story", "context", "arithmetic"}


def test_split_is_deterministic_by_seed():
    cfg = CorpusConfig(synthetic=SMALL)
    a, b, c = (build_corpus(cfg, seed=s, root=Path(".")) for s in (3, 3, 4))
    assert (a.train, a.validation) == (b.train, b.validation)
    assert a.validation != c.validation


def test_default_synthetic_corpus_has_every_document():
    cfg = CorpusConfig()
    s = cfg.synthetic
    result = build_corpus(cfg, seed=1337, root=Path("."))
    known = s.n_sft_people + s.n_heldout_people
    assert result.stats["documents"] == known * s.docs_per_person + s.n_stories + s.n_context + s.n_arithmetic


def test_split_keeps_one_document_each_side(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    result = build_corpus(local("*.txt", val_fraction=0.01), seed=0, root=tmp_path)
    assert len(result.train) == 1 and len(result.validation) == 1


def test_fewer_than_two_documents_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("only one")
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(LlmlabError, match="need at least 2"):
        build_corpus(local("*.txt"), seed=0, root=tmp_path)


# ----------------------------------------------------------------------------------------------- local


def test_local_txt_one_document_per_file_empty_dropped(tmp_path):
    (tmp_path / "raw").mkdir()
    for i, text in enumerate(["first story\n", "second story", "", "  \n\t", "third story"]):
        (tmp_path / "raw" / f"{i}.txt").write_text(text)
    result = build_corpus(local("raw/*.txt"), seed=0, root=tmp_path)
    assert texts(result) == ["first story", "second story", "third story"]
    assert result.stats["dropped_empty"] == 2
    assert result.stats["documents_external"] == 3
    assert {d["kind"] for d in result.train + result.validation} == {"external"}
    assert result.world is None


def test_local_txt_invalid_utf8_is_replaced_counted_and_logged(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("caf\u00e9 \ufffd already here")  # a genuine U+FFFD is not counted
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world \xc3")  # 3 undecodable sequences
    with caplog.at_level(logging.WARNING, logger="llmlab.data.corpus"):
        result = build_corpus(local("*.txt"), seed=0, root=tmp_path)
    assert result.stats["replaced_characters"] == 3
    assert "hello \ufffd\ufffd world \ufffd" in texts(result)
    assert "bad.txt" in caplog.text and "good.txt" not in caplog.text


def test_local_jsonl_rows_and_bad_bytes(tmp_path):
    lines = [
        json.dumps({"text": "row one", "id": 1}),
        "",
        json.dumps({"text": "", "id": 2}),
        json.dumps({"text": None}),
    ]
    data = "\n".join(lines).encode() + b'\n{"text": "row \xff four"}\n'
    (tmp_path / "a.jsonl").write_bytes(data)
    result = build_corpus(local("*.jsonl"), seed=0, root=tmp_path)
    assert texts(result) == ["row one", "row \ufffd four"]
    assert result.stats["dropped_empty"] == 2
    assert result.stats["replaced_characters"] == 1


def test_local_json_list_and_custom_column(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": "alpha"}, {"body": "beta"}, {"body": "gamma"}]))
    result = build_corpus(local("*.json", text_column="body"), seed=0, root=tmp_path)
    assert texts(result) == ["alpha", "beta", "gamma"]


def test_local_jsonl_missing_column_names_column_and_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(LlmlabError, match=r"'text'.*a\.jsonl.*content") as e:
        build_corpus(local("*.jsonl"), seed=0, root=tmp_path)
    assert "corpus.local.text_column" in str(e.value)


def test_local_parquet_rows_and_missing_column(tmp_path):
    pq.write_table(pa.table({"text": ["p1", "p2", None, "p3"], "n": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    result = build_corpus(local("*.parquet"), seed=0, root=tmp_path)
    assert texts(result) == ["p1", "p2", "p3"] and result.stats["dropped_empty"] == 1
    with pytest.raises(LlmlabError, match=r"'body' is not a column of .*a\.parquet; it has \['text', 'n'\]"):
        build_corpus(local("*.parquet", text_column="body"), seed=0, root=tmp_path)


def test_local_parquet_non_text_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(LlmlabError, match="holds int values, not text"):
        build_corpus(local("*.parquet"), seed=0, root=tmp_path)


def test_local_save_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["s1", "s2", "s3"], "label": [0, 1, 0]}).save_to_disk(
        str(tmp_path / "saved")
    )
    result = build_corpus(local("saved"), seed=0, root=tmp_path)
    assert texts(result) == ["s1", "s2", "s3"]
    with pytest.raises(LlmlabError, match=r"'body' is not a column .*saved.*\['text', 'label'\]"):
        build_corpus(local("saved", text_column="body"), seed=0, root=tmp_path)


def test_local_mixed_sources_and_recursive_glob(tmp_path):
    (tmp_path / "raw" / "deep").mkdir(parents=True)
    (tmp_path / "raw" / "deep" / "a.txt").write_text("from txt")
    (tmp_path / "raw" / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    result = build_corpus(local("raw/**/*.txt", "raw/*.jsonl", "raw/deep/*.txt"), seed=0, root=tmp_path)
    assert texts(result) == ["from jsonl", "from txt"]  # a file matched twice is read once


def test_local_no_match_names_the_patterns(tmp_path):
    with pytest.raises(LlmlabError, match=r"no file matches \['data/raw/\*\.txt'\]"):
        build_corpus(local("data/raw/*.txt"), seed=0, root=tmp_path)


def test_local_unsupported_type_and_plain_folder(tmp_path):
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(LlmlabError, match=r"unsupported file type '\.csv'"):
        build_corpus(local("*.csv"), seed=0, root=tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(LlmlabError, match="not one written by Dataset.save_to_disk"):
        build_corpus(local("folder"), seed=0, root=tmp_path)


# -------------------------------------------------------------------------------------------------- hf


@pytest.fixture
def parquet_dataset_dir(tmp_path, monkeypatch):
    """A local folder `load_dataset` reads offline; non-streaming caches go to tmp_path, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pq.write_table(
        pa.table({"text": [f"hf doc {i}" for i in range(10)], "n": list(range(10))}), folder / "train.parquet"
    )
    return folder


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_local_folder_loads(parquet_dataset_dir, streaming):
    root = parquet_dataset_dir.parent
    result = build_corpus(hf("my_dataset", streaming=streaming, max_documents=None), seed=0, root=root)
    assert texts(result) == sorted(f"hf doc {i}" for i in range(10))
    capped = build_corpus(
        hf(str(parquet_dataset_dir), streaming=streaming, max_documents=4), seed=0, root=Path("/")
    )
    assert texts(capped) == [f"hf doc {i}" for i in range(4)]


def test_hf_missing_column_lists_the_columns(parquet_dataset_dir):
    with pytest.raises(LlmlabError, match=r"'body' is not a column of 'my_dataset'; it has \['text', 'n'\]"):
        build_corpus(hf("my_dataset", text_column="body"), seed=0, root=parquet_dataset_dir.parent)


def test_hf_bad_split_is_one_clear_line(parquet_dataset_dir):
    with pytest.raises(LlmlabError, match="could not load dataset 'my_dataset'.*validation") as e:
        build_corpus(hf("my_dataset", split="validation"), seed=0, root=parquet_dataset_dir.parent)
    assert "\n" not in str(e.value)


_OFFLINE_SCRIPT = """
import sys, time
from pathlib import Path
from llmlab.data.corpus import build_corpus
from llmlab.errors import LlmlabError
from llmlab.params import CorpusConfig, HFCorpus
t0 = time.perf_counter()
try:
    build_corpus(CorpusConfig(source="hf", hf=HFCorpus(name="llmlab-test/no-such-dataset")), 0, Path(sys.argv[1]))
except LlmlabError as e:
    print(f"{time.perf_counter() - t0:.2f}")
    print(e)
"""


def test_hf_nonexistent_dataset_offline_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    seconds, message = run.stdout.strip().split("\n", 1)
    assert float(seconds) < 5
    assert "\n" not in message
    assert "'llmlab-test/no-such-dataset'" in message and "corpus.source: local" in message
    assert "Traceback" not in run.stderr


def test_hf_nonexistent_dataset_fails_fast_without_offline_env(tmp_path):
    """No offline variables: on a machine without network the Hub probe fails at once (no 25 s of
    retries); with network the Hub answers "not found". Either way one clear line, quickly."""
    t0 = time.perf_counter()
    with pytest.raises(
        LlmlabError, match=r"could not load dataset 'llmlab-test/no-such-dataset'.*corpus\.source: local"
    ):
        build_corpus(hf("llmlab-test/no-such-dataset"), seed=0, root=tmp_path)
    assert time.perf_counter() - t0 < 15


# ------------------------------------------------------------------------------------------ write / read


def test_write_read_round_trip_synthetic(tmp_path):
    result = build_corpus(CorpusConfig(synthetic=SMALL), seed=1, root=Path("."))
    write_corpus(result, tmp_path / "corpus")
    assert read_corpus(tmp_path / "corpus", "train") == [d["text"] for d in result.train]
    assert read_corpus(tmp_path / "corpus", "validation") == [d["text"] for d in result.validation]
    table = pq.read_table(tmp_path / "corpus" / "train.parquet")
    assert table.column_names == ["text", "kind"]
    assert table.column("kind").to_pylist() == [d["kind"] for d in result.train]
    assert World.load(tmp_path / "corpus" / "world.json") == result.world
    assert not [p.name for p in (tmp_path / "corpus").iterdir() if ".tmp-" in p.name]


def test_write_is_byte_stable(tmp_path):
    result = build_corpus(CorpusConfig(synthetic=SMALL), seed=1, root=Path("."))
    write_corpus(result, tmp_path / "a")
    write_corpus(result, tmp_path / "b")
    for name in ("train.parquet", "validation.parquet", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_write_external_corpus_writes_an_empty_world(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    write_corpus(build_corpus(local("*.txt"), seed=0, root=tmp_path), tmp_path / "out")
    world = World.load(tmp_path / "out" / "world.json")
    assert world.people == [] and world.source == "local"
    assert json.loads((tmp_path / "out" / "world.json").read_text())["source"] == "local"


def test_read_corpus_missing_names_the_stage(tmp_path):
    with pytest.raises(MissingArtifactError, match="'corpus' stage"):
        read_corpus(tmp_path, "train")
    with pytest.raises(MissingArtifactError, match="'corpus' stage"):
        iter_corpus(tmp_path, "train")  # at the call, not at the first text


def test_iter_corpus_streams_the_same_texts_across_row_groups(tmp_path):
    texts = [f"document {i} " * (i % 7) for i in range(2500)]
    with pq.ParquetWriter(tmp_path / "train.parquet", pa.schema([("text", pa.string())])) as w:
        for start in range(0, len(texts), 1000):  # three row groups, read in batches of 300
            w.write_table(pa.table({"text": texts[start : start + 1000]}))
    streamed = iter_corpus(tmp_path, "train", batch_rows=300)
    assert not isinstance(streamed, list) and list(streamed) == texts == read_corpus(tmp_path, "train")


def test_local_json_single_object_empty_list_and_bad_line(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"text": "one object"}, indent=2))
    (tmp_path / "b.json").write_text("[]")
    (tmp_path / "c.json").write_text(
        json.dumps({"text": "json lines"}) + "\n" + json.dumps({"text": "in .json"})
    )
    result = build_corpus(local("*.json"), seed=0, root=tmp_path)
    assert texts(result) == ["in .json", "json lines", "one object"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    with pytest.raises(LlmlabError, match=r"d\.jsonl:2: not valid JSON"):
        build_corpus(local("*.jsonl"), seed=0, root=tmp_path)
