r"""Byte-level BPE: train it, save and load it, turn the corpus into flat token files, and measure it.

A tokenizer maps text to a list of integer ids and back. Ours is the GPT-2/GPT-4 recipe:

1. **Bytes first.** Text is UTF-8 encoded, so every string is a sequence of the 256 possible bytes, and
   all 256 are in the vocabulary. Any string can be encoded (no "unknown token"), and decoding gives the
   exact string back: `decode(encode(s)) == s` for all of Unicode (tests/test_tokenizer.py checks it).
2. **Split before merging (pre-tokenisation).** A regex (`split_pattern`) cuts text into chunks — words
   with their leading space, runs of digits, punctuation, whitespace — and BPE never merges across a
   chunk boundary, so no token spans "dog." or "the 1".
3. **Byte pair encoding.** Start from single bytes; count every adjacent pair in the training text; merge
   the most frequent pair into a new token; repeat until the vocabulary has `vocab_size` entries. Encoding
   replays the merges in the order they were learned:

       "aaabdaaabac"  merge aa -> Z:  "ZabdZabac"
                      merge ab -> Y:  "ZYdZYac"
                      merge ZY -> X:  "XdXac"       (each merge is one new token id)

   Our ids: 0..4 special tokens, 5..260 the 256 bytes, then one id per merge in the order learned.

4. **Special tokens** (`SPECIAL_TOKENS`) have the first ids (pad = 0). They are never produced by merges:
   the literal text "<|end|>" is matched before pre-tokenisation and becomes the single id 4.

Deviations from GPT-4's tokenizer (cl100k_base), all on purpose:

- Numbers split into groups of at most `max_digits_per_token` digits, 1 by default (GPT-4: 3). With one
  token per digit, as Llama 1 and 2 do, "1234 + 5678" lines the digits of both numbers up with tokens,
  so the model can learn column-wise addition with carries; with 3-digit groups "1234" is "123" "4" but
  "12345" is "123" "45": the same digit lands in differently-shaped tokens depending on the number's
  length, and the columns of a sum no longer line up. It costs more tokens per number (`tokenizer_report` measures how many).
- The regex drops tiktoken's `{1,3}+` and `\s++$`, which mean something else in `tokenizers`' regex
  engine (see `split_pattern`).
- No normalizer (no NFC, no lowercasing): any normalisation would break exact round trips.

Training, encoding and decoding are done by Hugging Face `tokenizers` (Rust); this module configures it
and checks it. minbpe (github.com/karpathy/minbpe) implements the same algorithm in ~100 lines of Python.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import atomic_path, read_json, write_json
from llmlab.params import TokenizerConfig

if TYPE_CHECKING:  # transformers takes seconds to import; only `hf_tokenizer` needs it
    from transformers import PreTrainedTokenizerFast

STAGE = "tokenizer"
"""The DVC stage that writes tokenizer.json, the token files and their meta.json."""

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>")
"""Added before any byte or merge, so their ids are 0..4 in this order."""
PAD, BOS, USER, ASSISTANT, END = SPECIAL_TOKENS
PAD_ID, BOS_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))

TOKEN_META_FILE = "meta.json"


# ----------------------------------------------------------------------------------- the split regex


def split_pattern(max_digits_per_token: int = 1) -> str:
    r"""GPT-4's (cl100k_base) pre-tokenisation regex, with numbers cut into groups of at most K digits.

    Each alternative, tried left to right at the current position, takes one chunk:

        '(?i:[sdmt]|ll|ve|re)         contractions: "'s" "'T" "'ll" (case-insensitive)
        [^\r\n\p{L}\p{N}]?+\p{L}+     a word, with at most one leading non-letter: " world" "(Hello"
        \p{N}{1,K}                    up to K digits (any script's digits: "٣" too)
         ?[^\s\p{L}\p{N}]++[\r\n]*    punctuation/symbols, optional leading space: "!" " {" ".\n"
        \s*[\r\n]                     whitespace ending in a line break: "\n" "  \n\n"
        \s+(?!\S)                     whitespace not followed by text (it leaves the last space for
                                      the next word: "a   b" -> "a" "  " " b")
        \s+                           any other whitespace

    With K=3: "Hello world's 12345 API!" -> "Hello" " world" "'s" " " "123" "45" " API" "!"
    (the space before a number is its own chunk: digits never carry a leading space).

    subtle: this is minbpe's `GPT4_SPLIT_PATTERN` rather than tiktoken's current spelling, because
    `tokenizers` compiles regexes with Oniguruma in Ruby syntax, where `{1,3}+` is *not* possessive but
    "one or more repetitions of {1,3}": tiktoken's `\p{N}{1,3}+` there matches "12345" whole. And `$` in
    Ruby syntax means end of *line*, so tiktoken's `\s++$` is dropped (`\s+(?!\S)` covers the end of the
    text). The `?+` and `++` kept here are possessive in Oniguruma too, and only save backtracking.
    tests/test_tokenizer.py checks the split against the Python `regex` module (what minbpe uses).
    """
    if not 1 <= max_digits_per_token <= 9:
        raise LlmlabError(f"max_digits_per_token must be in 1..9, got {max_digits_per_token}")
    return (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,"""
        + str(max_digits_per_token)
        + r"""}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    )


def _pre_tokenizer(max_digits_per_token: int) -> pre_tokenizers.PreTokenizer:
    """Split with the regex, then map each chunk's UTF-8 bytes to printable stand-in characters.

    The byte-level step is GPT-2's trick: BPE in `tokenizers` works on strings, so each of the 256 bytes
    is shown as one visible character (space -> "Ġ", newline -> "Ċ", ASCII letters as themselves):

        "Hello world" -> "Hello" " world" -> "Hello" "Ġworld"
        "é" (bytes c3 a9) -> "Ã©"

    `use_regex=False` because the split is already done (ByteLevel's own regex is GPT-2's, which keeps
    digit runs whole); `add_prefix_space=False` because a prefix space would come back on decoding.
    """
    split = pre_tokenizers.Split(
        Regex(split_pattern(max_digits_per_token)), behavior="isolated", invert=False
    )
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# ------------------------------------------------------------------------------------------ training


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, batch_size: int = 1000) -> Tokenizer:
    """Learn a byte-level BPE vocabulary of `cfg.vocab_size` tokens (special tokens included) from `texts`.

    `texts` is streamed in batches; it can be a generator over a corpus larger than memory. The result is
    deterministic: the same texts and config give the same tokenizer.json bytes.

    The vocabulary can come out smaller than `cfg.vocab_size` when the text runs out of pairs occurring at
    least `cfg.min_frequency` times; `tok.get_vocab_size()` is the real size (the model must use it).
    """
    tok = Tokenizer(models.BPE())  # no unk_token: with all 256 bytes in the vocabulary nothing is unknown
    tok.pre_tokenizer = _pre_tokenizer(cfg.max_digits_per_token)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # subtle: without this only the bytes seen in training get a token, and encoding text with an
        # unseen byte (an emoji the corpus never had) would silently drop it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def pieces() -> Iterator[list[str]]:
        # subtle: training does not cut special tokens out of the text the way encoding does, so a corpus
        # with "<|end|>" written in it would learn merges like "<|" "end" "|>" that encoding never uses.
        # Cutting the text at each special token gives the trainer exactly what encoding will see.
        for batch in _batches(texts, batch_size):
            yield [piece for text in batch for piece in _SPECIAL_RE.split(text) if piece]

    tok.train_from_iterator(pieces(), trainer=trainer)
    _check_special_tokens(tok, "the trained tokenizer")
    return tok


_SPECIAL_RE = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """[a, b, c, d, e], size=2 -> [a, b], [c, d], [e] (lazily: one batch in memory at a time)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


# ----------------------------------------------------------------------------------- save and load


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as a `tokenizers` JSON file (readable by `transformers` too), atomically."""
    with atomic_path(path) as tmp:
        tok.save(str(tmp), pretty=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json written by `save_tokenizer`, and check that its special tokens are ours."""
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(path, STAGE)
    try:
        tok = Tokenizer.from_file(str(path))
    # `tokenizers` raises a bare Exception for every parse error (bad JSON, unknown model type, ...).
    except Exception as e:
        raise LlmlabError(
            f"{path} is not a tokenizer file ({e}); re-create it with `dvc repro {STAGE}`"
        ) from None
    _check_special_tokens(tok, path)
    return tok


def _check_special_tokens(tok: Tokenizer, source: str | Path) -> None:
    """Every id that other stages hard-code (pad = 0, bos = 1, ...) must mean what they think it means."""
    added = tok.get_added_tokens_decoder()
    problems = [
        f"{token!r} should be special token id {i}, found id {tok.token_to_id(token)}"
        for i, token in enumerate(SPECIAL_TOKENS)
        if tok.token_to_id(token) != i or not added.get(i) or not added[i].special
    ]
    if problems:
        raise LlmlabError(
            f"{source} does not have llmlab's special tokens; re-create it with `dvc repro {STAGE}`", problems
        )


def hf_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer at `path` as a `transformers` tokenizer, with bos/eos/pad set, for exporting the model.

    eos is "<|end|>" (the end of an assistant turn, where generation should stop). Decoding does not "clean
    up tokenization spaces" (that would turn "a ." into "a." and break round trips).
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=load_tokenizer(path),
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def count_tokens(text: str, tokenizer_path: str | Path) -> int:
    """Tokens in `text` (no bos added; a special token written in the text counts as one)."""
    return len(load_tokenizer(tokenizer_path).encode(text, add_special_tokens=False).ids)


# --------------------------------------------------------------------------------------- token files


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: 2048 -> uint16, 65536 -> uint16, 65537 -> uint32.

    Always little-endian ("<u2"), so a token file written on one machine reads the same on any other.
    """
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def tokenize_to_shards(
    tok: Tokenizer,
    texts: Iterable[str],
    directory: str | Path,
    split: str,
    shard_tokens: int,
    batch_size: int = 1024,
) -> tuple[list[str], int]:
    """Encode `texts` into flat files of raw ids, each document preceded by <|bos|>; return (file names, tokens).

        ["Hi", "Yo!"] -> [bos, "H", "i"] + [bos, "Y", "o", "!"] -> [1, 44, 77, 1, 61, 83, 5] as <u2 bytes

    The ids go into `directory`/<split>-00000.bin, <split>-00001.bin, …: every shard but the last holds
    exactly `shard_tokens` ids, and a document may run on from one shard into the next. Pretraining reads
    them through `open_split` as one long array and cuts windows from it anywhere, so bos is the only
    thing that marks where one document ends and the next begins.

    Documents are encoded a batch at a time (`encode_batch` runs in parallel threads) and appended to the
    current shard: memory holds one batch, not the corpus. The caller makes `directory` a temporary
    folder that replaces the real one once complete (`io.atomic_path(..., is_dir=True)`).
    """
    dtype = token_dtype(tok.get_vocab_size())
    directory = Path(directory)
    names: list[str] = []
    n_tokens, room, f = 0, 0, None
    try:
        for batch in _batches(texts, batch_size):
            flat: list[int] = []
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                flat.append(BOS_ID)
                flat.extend(enc.ids)
            ids = np.asarray(flat, dtype=dtype)
            n_tokens += len(ids)
            while len(ids):
                if not room:
                    if f:
                        f.close()
                    names.append(f"{split}-{len(names):05d}.bin")
                    f, room = open(directory / names[-1], "wb"), shard_tokens
                ids[:room].tofile(f)
                ids, room = ids[room:], max(0, room - len(ids))
    finally:
        if f:
            f.close()
    return names, n_tokens


def load_tokens(path: str | Path, dtype: str | np.dtype) -> np.memmap:
    """Map one token file written by `tokenize_to_shards` into memory, read-only (the OS pages it in on demand)."""
    path = Path(path)
    # subtle: np.dtype("uint16") is the machine's byte order; the files are little-endian whatever the machine.
    dtype = np.dtype(dtype).newbyteorder("<")
    if not path.exists():
        raise MissingArtifactError(path, STAGE)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise LlmlabError(
            f"{path} has {size} bytes, not a whole number of {dtype.name} tokens ({dtype.itemsize} bytes each): "
            f"it is truncated or was written with another dtype; re-create it with `dvc repro {STAGE}`"
        )
    if size == 0:  # np.memmap cannot map an empty file
        raise LlmlabError(f"{path} is empty: the corpus split it was made from has no documents")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenShards:
    """A split's shards as one read-only array of ids: `len()` and slices, reading only the pages a slice
    touches. A slice across a shard boundary is joined from both.

    >>> s = TokenShards([np.arange(3), np.arange(3, 5), np.arange(5, 9)])
    >>> len(s), s[1:7].tolist(), s[4:5].tolist(), s[8:20].tolist()
    (9, [1, 2, 3, 4, 5, 6], [4], [8])
    """

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.ends = np.cumsum([len(a) for a in shards])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token shards are read in contiguous slices")
        parts = []
        i = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            offset = int(self.ends[i]) - len(self.shards[i])
            take = min(stop, int(self.ends[i])) - start
            parts.append(self.shards[i][start - offset : start - offset + take])
            start, i = start + take, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint16)

    def positions_of(self, token_id: int) -> np.ndarray:
        """Every position holding `token_id`, ascending, read one shard at a time.

        >>> TokenShards([np.array([1, 5, 1]), np.array([7, 1])]).positions_of(1).tolist()
        [0, 2, 4]
        """
        offsets = self.ends - [len(a) for a in self.shards]
        found = [
            np.flatnonzero(np.asarray(a) == token_id) + int(o)
            for a, o in zip(self.shards, offsets, strict=True)
        ]
        return np.concatenate(found) if found else np.zeros(0, np.int64)


def open_split(directory: str | Path, split: str, meta: TokenMeta | None = None) -> TokenShards:
    """The token shards of `split` listed in `directory`/meta.json, memory-mapped, checked against its count."""
    meta = meta or read_token_meta(directory)
    if split not in meta["shards"]:
        raise LlmlabError(
            f"{Path(directory) / TOKEN_META_FILE} lists no {split!r} split; re-create it with `dvc repro {STAGE}`"
        )
    tokens = TokenShards(
        [load_tokens(Path(directory) / name, meta["dtype"]) for name in meta["shards"][split]]
    )
    if len(tokens) != meta["splits"][split]:
        raise LlmlabError(
            f"{directory}: the {split} shards hold {len(tokens):,} tokens, but meta.json says "
            f"{meta['splits'][split]:,}; a shard is missing or damaged: re-create them with `dvc repro {STAGE}`"
        )
    return tokens


class TokenMeta(TypedDict):
    """meta.json next to the token files: what a reader needs to interpret them."""

    dtype: str  # "uint16" or "uint32", little-endian
    vocab_size: int  # the tokenizer's real vocabulary size: the model's embedding rows
    bos_id: int
    pad_id: int
    end_id: int
    splits: dict[str, int]  # split name ("train", "validation") -> tokens in its shards
    shards: dict[str, list[str]]  # split name -> its shard files, in order


def write_token_meta(
    directory: str | Path, tok: Tokenizer, splits: Mapping[str, int], shards: Mapping[str, list[str]]
) -> TokenMeta:
    """Write `directory`/meta.json for token shards made with `tok`: `splits` maps split name -> token
    count, `shards` split name -> shard file names."""
    vocab_size = tok.get_vocab_size()
    meta = TokenMeta(
        dtype=token_dtype(vocab_size).name,
        vocab_size=vocab_size,
        bos_id=BOS_ID,
        pad_id=PAD_ID,
        end_id=END_ID,
        splits=dict(splits),
        shards={k: list(v) for k, v in shards.items()},
    )
    write_json(Path(directory) / TOKEN_META_FILE, meta)
    return meta


def read_token_meta(directory: str | Path) -> TokenMeta:
    """Read and check `directory`/meta.json."""
    path = Path(directory) / TOKEN_META_FILE
    meta = read_json(path, stage=STAGE)
    expected = TokenMeta.__annotations__.keys()
    if not isinstance(meta, dict) or meta.keys() != expected:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise LlmlabError(
            f"{path} should have the keys {sorted(expected)}, got {got}; re-create it with `dvc repro {STAGE}`"
        )
    if meta["dtype"] not in ("uint16", "uint32"):
        raise LlmlabError(f"{path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    return TokenMeta(**meta)


# ------------------------------------------------------------------------------------------- report

EXAMPLE_WORDS = ("unbelievable", " unbelievable", "API", "Schwarzenegger", "12345")
"""Shown split into tokens in the report: a common word, the same mid-sentence, an acronym, a rare name, a number."""

_WORD_RE = re.compile(r"[^\W\d_]+")  # a run of letters, in any script


def tokenizer_report(tok: Tokenizer, validation_texts: list[str], seed: int = 0) -> dict[str, Any]:
    """How well the tokenizer compresses held-out text, and how it cuts numbers and words. JSON-able.

    - `chars_per_token`: characters / tokens over the validation texts (no bos). English BPE with a big
      vocabulary gets ~4; a 2k vocabulary fewer. `chars_per_1000_tokens` and `words_per_1000_tokens` say how
      much text fits in a 1,000-token context (words = whitespace-separated pieces).
    - `tokens_per_number/{d}_digits`: mean tokens for 200 random d-digit numbers written alone ("12345");
      `tokens_per_number_spaced` the same with a leading space (" 12345"), as numbers appear mid-sentence.
      With max_digits_per_token=1 the first is exactly d, the second d + 1 (the space is a chunk of its own).
    - `tokens_per_word`: mean tokens per word (encoded with a leading space, as mid-sentence) for the 50
      most frequent words of the validation text ("common") and for its 50 least frequent ("rare", seen
      at most `rare_max_count` times; in a large synthetic corpus no word may occur only once): BPE gives
      frequent words one token and spells rare ones out in pieces.
    - `examples`: `EXAMPLE_WORDS` split into tokens, each token decoded on its own.
    """
    encodings = tok.encode_batch(validation_texts, add_special_tokens=False)
    n_tokens = sum(len(e.ids) for e in encodings)
    if n_tokens == 0:
        raise LlmlabError("tokenizer_report needs non-empty validation text (the validation split is empty)")
    n_chars = sum(map(len, validation_texts))
    n_words = sum(len(t.split()) for t in validation_texts)

    def mean_tokens(texts: list[str]) -> float | None:
        return (
            sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)) / len(texts)
            if texts
            else None
        )

    rng = random.Random(seed)
    numbers = {
        d: [str(rng.randrange(10 ** (d - 1) if d > 1 else 0, 10**d)) for _ in range(200)] for d in range(1, 9)
    }

    words = Counter(w for t in validation_texts for w in _WORD_RE.findall(t))
    common = [w for w, _ in words.most_common(50)]
    rare = sorted(words, key=lambda w: (words[w], w))[:50]

    examples = []
    for word in EXAMPLE_WORDS:
        ids = tok.encode(word, add_special_tokens=False).ids
        examples.append(
            {
                "word": word,
                "tokens": [tok.decode([i], skip_special_tokens=False) for i in ids],
                "n_tokens": len(ids),
            }
        )

    return {
        "vocab_size": tok.get_vocab_size(),
        "validation": {
            "documents": len(validation_texts),
            "characters": n_chars,
            "words": n_words,
            "tokens": n_tokens,
        },
        "chars_per_token": n_chars / n_tokens,
        "words_per_token": n_words / n_tokens,
        "chars_per_1000_tokens": 1000 * n_chars / n_tokens,
        "words_per_1000_tokens": 1000 * n_words / n_tokens,
        "tokens_per_number": {f"{d}_digits": mean_tokens(ns) for d, ns in numbers.items()},
        "tokens_per_number_spaced": {
            f"{d}_digits": mean_tokens([" " + n for n in ns]) for d, ns in numbers.items()
        },
        "tokens_per_word": {
            "common": mean_tokens([" " + w for w in common]),
            "rare": mean_tokens([" " + w for w in rare]),
            "n_common": len(common),
            "n_rare": len(rare),
            "rare_max_count": max((words[w] for w in rare), default=0),
        },
        "examples": examples,
    }


def flat_metrics(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a report as flat MLflow metrics; nested keys are joined by "/", lists and None skipped.

    {"chars_per_token": 3.1, "tokens_per_number": {"3_digits": 3.0}, "examples": [...]}
    -> {"chars_per_token": 3.1, "tokens_per_number/3_digits": 3.0}
    """
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
