"""Real chat and preference data (hf / local sources): the readers, the schemas, and what gets dropped."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmlab.data.chat_data import external_conversations
from llmlab.errors import LlmlabError
from llmlab.params import SFTData

GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *GOOD]
ENDS_WITH_USER = [*GOOD, {"role": "user", "content": "And?"}]
BAD_ROLE = [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_conversations_are_checked_and_bad_ones_dropped_and_counted(tmp_path, caplog):
    write_jsonl(
        tmp_path / "data/raw/chat/a.jsonl",
        [{"messages": m} for m in (GOOD, WITH_SYSTEM, ENDS_WITH_USER, BAD_ROLE)],
    )
    write_jsonl(
        tmp_path / "data/raw/chat/b.jsonl", [{"messages": json.dumps(GOOD)}, {"messages": "not json"}]
    )
    convs, stats = external_conversations(SFTData(source="local"), tmp_path)
    assert stats == {"conversations_read": 6, "dropped_invalid": 3}
    assert convs[0] == GOOD and convs[2] == GOOD
    assert convs[1][0] == {"role": "user", "content": "Be brief.\n\nHi"}  # the system message, folded in
    assert "a.jsonl:3" in caplog.text and "assistant turn" in caplog.text


def test_no_usable_conversation_is_an_error_naming_the_problem(tmp_path):
    write_jsonl(tmp_path / "data/raw/chat/a.jsonl", [{"messages": ENDS_WITH_USER}, {"messages": BAD_ROLE}])
    with pytest.raises(
        LlmlabError, match=r"sft.data.local: 0 usable conversation\(s\) of 2 read.*role must be"
    ):
        external_conversations(SFTData(source="local"), tmp_path)
    write_jsonl(tmp_path / "data/raw/chat/a.jsonl", [{"text": "hi"}])
    with pytest.raises(LlmlabError, match=r"sft.data.local.messages_column: 'messages' is not a field"):
        external_conversations(SFTData(source="local"), tmp_path)


def test_parquet_and_saved_datasets_hold_messages_as_lists_of_structs(tmp_path):
    raw = tmp_path / "data/raw/chat"
    raw.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"messages": GOOD}, {"messages": WITH_SYSTEM}]), raw / "a.parquet")
    cfg = SFTData(source="local", local={"paths": ["data/raw/chat/*.parquet"]})
    convs, _ = external_conversations(cfg, tmp_path)
    assert convs[0] == GOOD and len(convs) == 2
    # The hf source with a dataset folder (what load_dataset reads when the Hub is out of reach).
    datasets.Dataset.from_list([{"messages": GOOD, "id": 1}] * 3).to_parquet(
        str(tmp_path / "hfdata" / "train.parquet")
    )
    cfg = SFTData(
        source="hf",
        hf={"name": str(tmp_path / "hfdata"), "config": None, "streaming": False, "max_examples": 2},
    )
    convs, stats = external_conversations(cfg, tmp_path)
    assert convs == [GOOD, GOOD] and stats["conversations_read"] == 2


# ------------------------------------------------------------------------------ preference pairs

from llmlab.data.preferences import external_pairs, split_pair  # noqa: E402
from llmlab.params import PreferencesConfig  # noqa: E402

USER = [{"role": "user", "content": "Capital of France?"}]


def test_the_three_public_pair_layouts_give_the_same_pair():
    expected = (USER, "Paris.", "Lyon.")
    assert split_pair("Capital of France?", "Paris.", "Lyon.") == expected  # plain strings
    ultra = (
        USER + [{"role": "assistant", "content": "Paris."}],
        USER + [{"role": "assistant", "content": "Lyon."}],
    )
    assert split_pair("Capital of France?", *ultra) == expected  # ultrafeedback_binarized
    hh = (
        "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
        "\n\nHuman: Capital of France?\n\nAssistant: Lyon.",
    )
    assert split_pair(None, *hh) == expected  # hh-rlhf transcripts
    only_replies = ([{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "Lyon."}])
    assert split_pair("Capital of France?", *only_replies) == expected


def test_multi_turn_transcripts_keep_the_shared_conversation_as_context():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?"
    context, chosen, rejected = split_pair(
        None, shared + "\n\nAssistant: Paris.", shared + "\n\nAssistant: Lyon."
    )
    assert [m["role"] for m in context] == ["user", "assistant", "user"] and (chosen, rejected) == (
        "Paris.",
        "Lyon.",
    )


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (("q", "a", ["x"]), "both be strings or both lists"),
        (
            (None, "\n\nHuman: a\n\nAssistant: b", "\n\nHuman: DIFFERENT\n\nAssistant: c"),
            "differ before their last reply",
        ),
        ((None, "no markers here", "\n\nHuman: a\n\nAssistant: c"), "not an hh-rlhf transcript"),
        ((None, "\n\nHuman: a", "\n\nHuman: a"), "must end with the assistant's reply"),
        ((3, "a", "b"), "prompt must be a string"),
        (("q", "", "b"), "the chosen reply is empty"),
        (
            (None, "\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant:  "),
            "the rejected reply is empty",
        ),
        (
            (
                None,
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            ),
            "the chosen reply is empty",
        ),
    ],
)
def test_malformed_pairs_say_what_is_wrong(row, problem):
    with pytest.raises(LlmlabError, match=problem):
        split_pair(*row)


def test_external_pairs_from_files_and_datasets(tmp_path, caplog):
    write_jsonl(
        tmp_path / "data/raw/preferences/hh.jsonl",
        [
            {"chosen": "\n\nHuman: Q1\n\nAssistant: good", "rejected": "\n\nHuman: Q1\n\nAssistant: bad"},
            {"chosen": "\n\nHuman: Q2\n\nAssistant: same", "rejected": "\n\nHuman: Q2\n\nAssistant: same"},
            {"chosen": "garbage", "rejected": "\n\nHuman: Q3\n\nAssistant: x"},
            {"chosen": "\n\nHuman: Q4\n\nAssistant: fine", "rejected": "\n\nHuman: Q4\n\nAssistant: worse"},
        ],
    )
    cfg = PreferencesConfig(source="local", local={"prompt_column": None})
    rows, stats = external_pairs(cfg, tmp_path)
    assert stats == {"rows_read": 4, "dropped_invalid": 1, "dropped_identical": 1}
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("Q1", "good", "bad"),
        ("Q4", "fine", "worse"),
    ]
    assert (
        json.loads(rows[0]["context"]) == [{"role": "user", "content": "Q1"}]
        and rows[0]["gold_chosen"] != rows[0]["gold_chosen"]
    )  # NaN
    assert "hh.jsonl:3" in caplog.text
    # ultrafeedback's layout in a saved dataset folder, read as hf
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": f"Q{i}",
                "chosen": USER + [{"role": "assistant", "content": "a"}],
                "rejected": USER + [{"role": "assistant", "content": "b"}],
                "score": 1.0,
            }
            for i in range(3)
        ]
    )
    ds.save_to_disk(str(tmp_path / "ultra"))
    cfg = PreferencesConfig(source="local", local={"paths": ["ultra"]})
    rows, _ = external_pairs(cfg, tmp_path)
    assert len(rows) == 3 and rows[0]["chosen"] == "a"
    with pytest.raises(LlmlabError, match=r"preferences.local.chosen_column: 'better' is not a column"):
        external_pairs(
            PreferencesConfig(source="local", local={"paths": ["ultra"], "chosen_column": "better"}), tmp_path
        )
