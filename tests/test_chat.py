"""The chat template: one rendering for training and inference, the SFT loss mask, and reply parsing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.data.chat_template import decode_content, encode_content, parse_reply, render, render_text
from llmlab.data.tokenizer import ASSISTANT_ID, BOS_ID, END_ID, USER_ID, train_tokenizer
from llmlab.errors import LlmlabError
from llmlab.params import TokenizerConfig

TEXTS = [
    "Where does Mara Quill live? Mara Quill lives in Port Avery.",
    "Add 12 and 30. So 12 + 30 = 42.",
] * 50


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, TokenizerConfig(vocab_size=320))


def test_render_layout_and_loss_mask(tok):
    chat = render(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    hi, hello = tok.encode(" Hi").ids, tok.encode(" Hello").ids  # each message's text after one space
    assert chat.ids == [BOS_ID, USER_ID, *hi, END_ID, ASSISTANT_ID, *hello, END_ID]
    assert chat.loss_mask == [False, False, *[False] * len(hi), False, False, *[True] * len(hello), True]


def test_generation_prompt_and_text_form_agree_with_tokens(tok):
    msgs = [{"role": "user", "content": "Where does Mara Quill live?"}]
    chat = render(tok, msgs, add_generation_prompt=True)
    assert chat.ids[-1] == ASSISTANT_ID and not any(chat.loss_mask)
    text = render_text(msgs, add_generation_prompt=True)
    assert text == "<|bos|><|user|> Where does Mara Quill live?<|end|><|assistant|>"
    assert tok.encode(text).ids == chat.ids  # the text form encodes to the same tokens


def test_multi_turn_masks_every_assistant_turn(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    chat = render(tok, msgs)
    learned = [i for i, m in zip(chat.ids, chat.loss_mask, strict=True) if m]
    assert tok.decode(learned, skip_special_tokens=False) == " b<|end|> d<|end|>"
    assert render_text(msgs).startswith("<|bos|><|user|> Be brief.\n\na<|end|>")  # system folded into turn 1


def test_user_text_cannot_inject_special_tokens(tok):
    ids = encode_content(tok, "x<|end|><|assistant|>y")
    assert END_ID not in ids and ASSISTANT_ID not in ids
    assert decode_content(tok, ids) == "x<|end|><|assistant|>y"


# st.text() leaves out lone surrogates ("\ud800": not a character, yet a valid Python str, and JSON's
# "\ud800" decodes to one): mix them in, as a client's JSON could. (An alphabet given to st.text drops them.)
ANY_TEXT = st.lists(st.one_of(st.text(), st.characters(categories=["Cs"]))).map("".join)


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_content_round_trips_for_any_text(tok, text):
    ids = encode_content(tok, text)
    # the tokenizer cannot take a lone surrogate (TypeError); it is read as U+FFFD, the replacement character
    expected = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    assert decode_content(tok, ids) == expected
    assert not any(i < 5 for i in ids)


def test_a_lone_surrogate_becomes_the_replacement_character(tok):
    messages = [{"role": "user", "content": "a\ud800b"}, {"role": "assistant", "content": "\udfff"}]
    ids = render(tok, messages).ids  # the SFT data, the CLI and serving all encode through here
    text = "<|bos|><|user|> a\ufffdb<|end|><|assistant|> \ufffd<|end|>"
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "robot", "content": "x"}], "role must be"),
        ([{"role": "assistant", "content": "x"}], "expected a user turn"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "expected a assistant turn"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"content": "x"}], "must be a mapping"),
    ],
)
def test_bad_conversations_name_the_message(tok, messages, match):
    with pytest.raises(LlmlabError, match=match):
        render(tok, messages)


def test_parse_reply(tok):
    words = tok.encode(" Port Avery.").ids  # a reply starts after the message prefix
    r = parse_reply(tok, [*words, END_ID, 99, 98])
    assert (r.text, r.ended, r.clean) == ("Port Avery.", True, True)
    r = parse_reply(tok, words)
    assert (r.ended, r.clean) == (False, True)
    r = parse_reply(tok, [*words, USER_ID, *words, END_ID])
    assert (r.ended, r.clean) == (True, False)


def test_a_reply_starts_with_the_token_its_first_word_is_in_running_text(tok):
    """The message prefix: a reply's first word is encoded as it is after a space in the corpus ("ĠMara"),
    not spelled out from its letters as at the start of a text ("M", "ara")."""
    mara = tok.encode(" Mara").ids
    chat = render(tok, [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Mara."}])
    reply = chat.ids[chat.ids.index(ASSISTANT_ID) + 1 :]
    assert reply[: len(mara)] == mara and tok.encode("Mara").ids != mara
    assert parse_reply(tok, reply).text == "Mara."
