"""Typed params: one pydantic model per `params.yaml` section.

Every stage validates the whole `params.yaml` before it writes anything, so a typo anywhere is reported
once, with every problem listed, each naming its key:

    error: params.yaml has 2 problems:
      pretrain.lr: must be > 0, got -1
      pretrain.model.n_head: must divide model.d_model (128), got 3

`dvc.yaml` declares under each stage's `params:` the sections (or single keys) it reads. `recording_reads`
records which keys a run really reads; the end-to-end test runs `dvc repro` with `LLMLAB_PARAMS_TRACE`
set and checks every stage's reads against its declaration.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmlab.errors import ParamsError

# Fields that several sections declare, each with its own default: the type, range and meaning once.
DatasetId = Annotated[
    str, Field(description="Dataset id on the Hub, or a local dataset folder `load_dataset` accepts.")
]
DatasetConfig = Annotated[str | None, Field(description="Dataset configuration name, if it has several.")]
Streaming = Annotated[bool, Field(description="Stream the split instead of downloading it whole first.")]
Globs = Annotated[
    list[str],
    Field(
        description="Glob patterns, relative to the repository root (put the files under data/raw/, "
        "which the stage depends on)."
    ),
]
LearningRate = Annotated[float, Field(gt=0, le=1, description="Peak learning rate of AdamW.")]
WarmupSteps = Annotated[int, Field(ge=0, description="Linear warm-up steps before the cosine decay.")]
ValEvery = Annotated[int, Field(ge=1, description="Run validation every this many optimizer steps.")]
CkptEvery = Annotated[
    int, Field(ge=1, description="Write the resumable checkpoint every this many optimizer steps.")
]


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------------------- corpus


class SyntheticCorpus(Section):
    """The synthetic world: fictional people with facts, written about in varied documents."""

    n_sft_people: int = Field(200, ge=1)
    """People that SFT will ask questions about (they appear in the corpus)."""
    n_heldout_people: int = Field(50, ge=0)
    """People that only the corpus mentions; SFT never asks about them (tests knowledge extraction)."""
    n_unknown_people: int = Field(150, ge=0)
    """People that appear nowhere in the corpus (for hallucination tests). Half are SFT's "I don't know"
    demonstrations, half the rl and eval pools': the suite's invented-answer rate is a rate over these
    people more than over its prompts (answers cluster by person), so there are many of them."""
    docs_per_person: int = Field(100, ge=1)
    """Biographical documents written about each known person, each with its own phrasings and order."""
    n_stories: int = Field(3000, ge=0)
    """Short everyday stories mixing several known people."""
    n_context: int = Field(12000, ge=0)
    """Context documents: people made up for one document, their facts stated and then asked about in the
    same document, so that only reading the context predicts the answer (it teaches copying)."""
    n_recap: int = Field(0, ge=0)
    """Notes about made-up people read out twice, word for word (`world.recap_documents`): copying values
    trained as densely as copying names."""
    n_arithmetic: int = Field(3000, ge=0)
    """Multi-digit additions written out step by step, with carries."""
    max_digits: int = Field(4, ge=1, le=9)
    """Largest number of digits of an addend in the arithmetic documents."""


class HFCorpus(Section):
    """A Hugging Face dataset read with `datasets.load_dataset`."""

    name: DatasetId = "roneneldan/TinyStories"
    config: DatasetConfig = None
    split: str = "train"
    """Split to read; the validation split is carved out of it by `corpus.val_fraction`."""
    text_column: str = "text"
    """Column that holds the document text."""
    max_documents: int | None = Field(100_000, ge=1)
    """Stop after this many documents (null: read the whole split)."""
    streaming: Streaming = True


class LocalCorpus(Section):
    """Files on disk: .txt (one document per file), .jsonl / .parquet (one per row), or a `save_to_disk` folder."""

    paths: Globs = ["data/raw/*.txt"]
    text_column: str = "text"
    """Column (jsonl / parquet / saved dataset) that holds the document text."""


class CorpusConfig(Section):
    source: Literal["synthetic", "hf", "local"] = "synthetic"
    """Where the documents come from."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Share of documents held out as the validation split."""
    synthetic: SyntheticCorpus = SyntheticCorpus()
    hf: HFCorpus = HFCorpus()
    local: LocalCorpus = LocalCorpus()


# -------------------------------------------------------------------------------------- tokenizer


class TokenizerConfig(Section):
    vocab_size: int = Field(2048, ge=300, le=2**20)
    """Final vocabulary size, special tokens included (256 byte tokens are always in it)."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur at least this often to be merged."""
    max_digits_per_token: int = Field(1, ge=1, le=3)
    """Pre-tokenisation splits numbers into groups of at most this many digits (GPT-4 uses 3). 1, the
    default, gives one token per digit, which is what digit-by-digit arithmetic wants."""
    shard_tokens: int = Field(100_000_000, ge=1000)
    """Tokens per token file (shard) of a split: 100M is 200 MB at a vocabulary of up to 65,536. Pretraining
    memory-maps the shards, so their size bounds no memory; it keeps single files a manageable size."""


# --------------------------------------------------------------------------------------- pretrain


class ModelConfig(Section):
    """Shape of the decoder-only transformer (Llama-shaped). The vocabulary size comes from the tokenizer."""

    d_model: int = Field(128, ge=8)
    """Width of the residual stream."""
    n_layer: int = Field(4, ge=1)
    """Number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide d_model, and d_model / n_head must be even (rotary)."""
    context_length: int = Field(128, ge=8, le=131_072)
    """Longest sequence the model is trained on and can attend over."""
    ffn_hidden: int | None = Field(None, ge=8)
    """Width of the SwiGLU feed-forward; null derives Llama's 8/3 · d_model rounded up to a multiple of 32."""
    rope_theta: float = Field(10_000.0, gt=0)
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = Field(1e-5, gt=0, lt=1)
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    canon_kernel: int = Field(4, ge=0, le=16)
    """Each block mixes every token's attention input with the `canon_kernel - 1` tokens before it (a causal
    depthwise convolution, "Canon layers", Allen-Zhu 2025), so that attention can match a later mention on
    several earlier tokens at once: with it the base model learns to read values from its context within
    the default budget (docs/knowledge.md). 0: none, a plain Llama block. Not a Llama layer: `llmlab export`
    writes such a model with its own `transformers` class (`llmlab.model.hf_canon`, loaded with
    `trust_remote_code=True`, no KV cache)."""
    canon_places: str = Field("AB", pattern=r"^[ABCD]{1,4}$")
    """Where the Canon layers sit, any of the letters ABCD once each (Allen-Zhu 2025's names): A before attention,
    B on the queries, keys and values after their projection (each with weights of its own, so a key can carry
    the token before it while its query carries its own; with A the default, under which the base model reads
    values back on every seed measured: docs/knowledge.md), C before the feed-forward, D on its gate and up
    projections; `llmlab export` writes each place into its `transformers` class (`llmlab.model.hf_canon`)."""

    @field_validator("canon_places")
    @classmethod
    def _each_place_once(cls, places: str) -> str:
        if len(set(places)) < len(places):
            raise ValueError(f"each of A, B, C, D at most once, got {places!r}")
        return "".join(sorted(places))

    @field_validator("n_head")
    @classmethod
    def _heads_divide_width(cls, n_head: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is None:
            return n_head
        if d_model % n_head:
            raise ValueError(f"must divide model.d_model ({d_model}), got {n_head}")
        if (d_model // n_head) % 2:
            raise ValueError(
                f"must leave an even head size for rotary embeddings; d_model/n_head = {d_model // n_head}"
            )
        return n_head


class Hardware(Section):
    """Where a training stage runs: what Lightning's Trainer (or Fabric, for PPO) is given."""

    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    """Lightning precision. bf16-mixed is for GPUs: on the 2-core CPU it was 0.79–0.97× as fast as fp32
    (docs/benchmarks.md, "Pretraining speed options")."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    """Devices per node (an int, or 'auto' for all visible)."""
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"
    num_nodes: int = Field(1, ge=1)


class TrainLoop(Hardware):
    """What every training stage shares: optimiser, schedule, hardware, and how often to log and save."""

    batch_size: int = Field(8, ge=1)
    """Sequences per device per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step (global batch = batch_size · grad_accum · devices · nodes)."""
    lr: LearningRate = 6e-3
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine schedule decays to lr · min_lr_ratio."""
    warmup_steps: WarmupSteps = 100
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay, applied to matrices only (not to norms). 0 by default: the synthetic world is
    memorised facts, and decay pulls them back out of the weights."""
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables clipping)."""
    compile: bool = False
    """Wrap the model in torch.compile. On the 2-core CPU pretraining ran 1.01–1.29× as fast after 15–30 s
    of compiling (docs/benchmarks.md): off by default there, on in the GPU recipe."""
    val_every: ValEvery = 250
    val_batches: int = Field(16, ge=1)
    """Batches of the validation split per process per validation run (a fixed set, the same every time)."""
    ckpt_every: CkptEvery = 250
    log_every: int = Field(10, ge=1)
    """Log train metrics every this many optimizer steps."""


class PretrainConfig(TrainLoop):
    model: ModelConfig = ModelConfig()
    max_steps: int | None = Field(3000, ge=1)
    """Optimizer steps to train for. Exactly one of max_steps and max_tokens is set."""
    max_tokens: int | None = Field(None, ge=1, validate_default=True)
    """Token budget instead of a step budget: steps = max_tokens / tokens per optimizer step."""
    window_start: Literal["anywhere", "document"] = "anywhere"
    """Where a training window starts: at any token, or at a document's <|bos|> (every document read from its
    beginning, as a chat prompt is). "document" stored more (fact recall 99.4 % against 96.7 %) but the SFT
    model built on it answered fewer questions (held-out people 66 % against 78 %), one run each:
    docs/knowledge.md."""
    recall_people: int | None = Field(None, ge=1)
    """Fact recall is measured on this many corpus people (null: all of them)."""
    recall_probe_people: int = Field(40, ge=0)
    """Fact recall is also measured at every validation on this many people (0: never), for the curve."""
    copy_probes: int = Field(200, ge=0)
    """Context documents with never-seen names on which copy accuracy is measured (each gives two names and
    two values to copy: world.copy_probes), at every validation and at the end (0: never)."""
    sample_tokens: int = Field(48, ge=1)
    """New tokens per logged sample."""

    # Checks across fields are field validators on the later field (not model validators, which pydantic
    # skips once any field of the section has failed): so every problem is reported in the same run.
    @field_validator("max_tokens")
    @classmethod
    def _one_budget(cls, max_tokens: int | None, info: ValidationInfo) -> int | None:
        if "max_steps" in info.data and (info.data["max_steps"] is None) == (max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens (the other null)")
        return max_tokens


# -------------------------------------------------------------------------------------------- sft


class HFChat(Section):
    """A Hugging Face chat dataset: one conversation per row, a list of {role, content} messages."""

    name: DatasetId = "HuggingFaceTB/smoltalk"
    config: DatasetConfig = "everyday-conversations"
    split: str = "train"
    """Split to read; 5 % of its conversations are held out for the validation loss."""
    messages_column: str = "messages"
    """Column that holds the list of messages."""
    max_examples: int | None = Field(20_000, ge=2)
    """Stop after this many conversations (null: read the whole split)."""
    streaming: Streaming = True


class LocalChat(Section):
    """Chat files on disk: .jsonl / .json / .parquet with a messages column, or a `save_to_disk` folder."""

    paths: Globs = ["data/raw/chat/*.jsonl"]
    messages_column: str = "messages"
    """Column (field) that holds the list of {role, content} messages."""


class SFTData(Section):
    """The chat demonstrations: synthetic (src/llmlab/data/chat_data.py: how many, each task kind's share) or
    conversations from a Hugging Face dataset or local files."""

    source: Literal["synthetic", "hf", "local"] = "synthetic"
    """Where the conversations come from. hf and local need no synthetic world, but then no rater grades the replies."""
    hf: HFChat = HFChat()
    local: LocalChat = LocalChat()
    n_examples: int = Field(6000, ge=2)
    """Demonstrations to generate (5 % of them are held out for the validation loss)."""
    share_fact: float = Field(0.5, ge=0)
    """Questions about one attribute of an SFT person."""
    share_about: float = Field(0.1, ge=0)
    """"Tell me about X": a short summary of the person's facts."""
    share_arithmetic: float = Field(0.3, ge=0)
    """Additions, answered step by step or (the control) with the bare result."""
    share_unknown: float = Field(0.06, ge=0)
    """Questions about unknown people answered "I don't know" — few on purpose: RLHF has to raise the rest
    (SFT still invents on 43–54 % of the suite's questions about unknown people on 3 seeds; docs/results.md)."""
    dont_know: Literal["first", "at_value"] = "at_value"
    """Where those replies say so: where the value would stand ("X lives in, sorry, I don't know who X is."),
    the point at which a small model can tell whom it knows, or at once ("I don't know who X is.", `first`,
    the default before ab8d45d: the model cannot tell there, docs/results.md)."""
    share_harmful: float = Field(0.03, ge=0)
    """Harmful requests answered with a refusal — small on purpose."""
    share_context: float = Field(0.15, ge=0)
    """Conversations that state facts about made-up people (or correct an SFT person's) and ask about one,
    in the same turn or turns later: only reading the conversation answers them."""
    replay_share: float = Field(0.5, ge=0, lt=1)
    """Share of the training items that are pretraining documents (loss on every token) instead of
    conversations: replay against forgetting what pretraining stored."""
    cot_share: float = Field(0.7, ge=0, le=1)
    """Of the additions, the share answered step by step (chain of thought)."""
    imperfect_share: float = Field(0.05, ge=0, le=1)
    """Demonstrations that are curt or state a wrong fact, as real SFT data has."""
    polite_share: float = Field(0.3, ge=0, le=1)
    """Good answers that open politely ("Sure! ..."); RLHF can raise this."""
    max_digits: int = Field(4, ge=1, le=9)
    """Largest number of digits of an addend."""


class SFTConfig(TrainLoop):
    data: SFTData = SFTData()
    batch_size: int = Field(16, ge=1)
    """Conversations per device per forward pass."""
    max_steps: int = Field(1500, ge=1)
    """Optimizer steps to fine-tune for."""
    pack: bool = True
    """Pack each batch's conversations side by side into fewer rows (llmlab.training.sft.collate_packed): the same
    loss and gradient with about half the tokens to compute on the default data. false: one padded row each."""
    lr: LearningRate = 1e-3
    warmup_steps: WarmupSteps = 30
    val_every: ValEvery = 500
    val_batches: int = Field(8, ge=1)
    """Batches of held-out demonstrations per process per validation run during training (the stage's
    reported val_loss reads them all)."""
    ckpt_every: CkptEvery = 500
    eval_prompts: int = Field(300, ge=1)
    """Prompts of the evaluation pool answered greedily after training, for the metrics."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reply generated at evaluation; a reply without <|end|> by then counts as not ended."""


# ---------------------------------------------------------------------------------------- preferences


class PairColumns(Section):
    """Where a preference row keeps its parts. Two layouts public sets use are read:

    - prompt + chosen/rejected, as strings or as message lists ending in the assistant's reply
      (HuggingFaceH4/ultrafeedback_binarized: prompt str, chosen/rejected lists of messages);
    - prompt_column null: chosen/rejected are whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..." that
      share everything but the last reply (Anthropic/hh-rlhf).
    """

    prompt_column: str | None = "prompt"
    """Column of the prompt (null: the prompt is read from the chosen/rejected transcripts)."""
    chosen_column: str = "chosen"
    """Column of the preferred reply (a string or a list of messages)."""
    rejected_column: str = "rejected"
    """Column of the other reply."""


class HFPreferences(PairColumns):
    """A Hugging Face preference dataset."""

    name: DatasetId = "HuggingFaceH4/ultrafeedback_binarized"
    config: DatasetConfig = None
    split: str = "train_prefs"
    """Split to read; preferences.val_fraction of its pairs are held out to validate the reward model."""
    max_pairs: int | None = Field(20_000, ge=2)
    """Stop after this many rows (null: read the whole split)."""
    streaming: Streaming = True


class LocalPreferences(PairColumns):
    """Preference files on disk: .jsonl / .json / .parquet, or a `save_to_disk` folder."""

    paths: Globs = ["data/raw/preferences/*.jsonl"]


DEFAULT_MIX = {"fact": 0.65, "about": 0.1, "arithmetic": 0.05, "unknown": 0.1, "harmful": 0.1}
"""The task kinds of the rl prompt pool, as shares (SFT's own tasks have theirs in sft.data). A tenth are
questions about unknown people, where two replies differ in substance ("I don't know" or an invented fact);
additions, whose pairs differ almost only in style, get 5 %. With 50 unknown people a quarter was needed
(with a tenth and a fifth additions PPO lowered invented answers on none of 3 seeds); with 150 a tenth
keeps the reward model and PPO's gain on every seed where a quarter lost them (docs/results.md, "150
unknown people")."""


def _check_shares(mix: dict) -> dict:
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"shares must be >= 0 with a positive sum, got {mix}")
    return mix


PromptMix = Annotated[
    dict[Literal["fact", "about", "arithmetic", "unknown", "harmful"], float], AfterValidator(_check_shares)
]


class PreferencesConfig(Section):
    source: Literal["synthetic", "hf", "local"] = "synthetic"
    """synthetic: the SFT model's replies compared by the rater. hf / local: pairs people labelled (no gold rater)."""
    hf: HFPreferences = HFPreferences()
    local: LocalPreferences = LocalPreferences()
    n_prompts: int = Field(1600, ge=2)
    """Prompts of the rl pool (never seen in SFT) for which the SFT model samples replies."""
    prompt_mix: PromptMix = dict(DEFAULT_MIX)
    """Share of each task kind among those prompts (`DEFAULT_MIX`)."""
    samples_per_prompt: int = Field(6, ge=2)
    """Replies sampled per prompt; every two with different gold scores make a pair. Measured at the same
    9,600 replies: 1,600 × 6 gave the reward model 85.9 % gold accuracy, 2,400 × 4 84.4 %, 3,200 × 3 83.9 %
    (and 1,200 × 4, half the replies, 83.4 %)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the SFT model: diversity between the replies to compare."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reply; one that has not ended by then is scored as cut off."""
    label_temperature: float = Field(0.25, ge=0)
    """Bradley–Terry noise of the simulated rater: P(a ≻ b) = σ((score_a − score_b) / τ); 0 = noise-free.
    0.25 flips about 16 % of the labels (0.5: about 25 %)."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of prompts whose pairs are held out to validate the reward model."""
    batch_size: int = Field(256, ge=1)
    """Prompts generated together (KV-cached, batched; a row leaves the batch when its reply ends)."""
    max_digits: int = Field(4, ge=1, le=9)
    """Largest number of digits of an addend in the arithmetic prompts."""
    labeller: Literal["rater", "constitution"] = "rater"
    """Who orders each pair. rater: the simulated human rater (one judgment per pair). constitution: the SFT
    model itself, taught by the critique stage to compare two replies under the principles of
    data/constitution.txt (Constitutional AI's feedback model); the rater's scores are kept for evaluation
    only. Measured in docs/results.md, "Constitutional AI"."""

    @field_validator("labeller")
    @classmethod
    def _constitution_needs_the_rater(cls, labeller: str, info: ValidationInfo) -> str:
        if labeller == "constitution" and info.data.get("source", "synthetic") != "synthetic":
            raise ValueError(
                "constitution needs preferences.source synthetic: the critique stage is taught by the "
                "synthetic world's rater, which real data does not have"
            )
        return labeller


# ---------------------------------------------------------------------------------------- critique


class CritiqueConfig(TrainLoop):
    """Constitutional AI's feedback model (src/llmlab/training/constitution.py): a copy of the SFT model taught,
    from `demonstrations` rater judgments on the SFT pool, to say which of two replies follows a principle
    better and what each reply does. Runs only with `preferences.labeller: constitution`."""

    demonstrations: int = Field(2000, ge=2)
    """Comparisons the rater grades to teach the model (each one judgment: the rater judgments this path costs)."""
    n_prompts: int = Field(600, ge=2)
    """SFT-pool prompts whose replies make the demonstrations (and, 10 % of them, the held-out comparisons)."""
    samples_per_prompt: int = Field(4, ge=2)
    """Replies sampled per prompt: every two that differ make a comparison."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the SFT model's replies to those prompts."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reply sampled."""
    critique_share: float = Field(1.0, ge=0, le=1)
    """Share of the demonstrations whose comparison critique is taught, as a conversation of its own, to the
    copy `critiques_taught_to` names (0: none, and the critiques in reports/critique/ are untaught)."""
    critiques_taught_to: Literal["reviser", "critic"] = "reviser"
    """Which copy learns the comparison critiques ("What does each reply do?"): the reviser, which also says
    what one reply does wrong and rewrites it, so that the feedback model learns verdicts alone; or the
    feedback model beside its verdicts (the default until 2026-12-06: its labels agreed with the rubric on
    70.1 / 68.0 / 65.9 % of the rl pairs, seeds 1 / 2 / 1337, against 71.2 / 67.9 / 72.9 % from verdicts
    alone; docs/results.md). Without a reviser (`revision_steps` 0) the feedback model learns them."""
    revision_share: float = Field(1.0, ge=0, le=1)
    """Share of the demonstrations that also teach a second copy of the SFT model, the reviser, to revise: what
    the reply the verdict passed over does wrong, then the chosen reply as its rewrite (pairs the rubric
    scores equal, or whose rewrite does not fit the context, teach none). 0: no reviser."""
    revision_steps: int = Field(300, ge=0)
    """Optimizer steps of the reviser (0: none)."""
    revisions_measured: int = Field(240, ge=0)
    """Held-out replies the taught model revises, scored by the rater (reports/critique/revisions.md)."""
    own_answer: bool = False
    """The model answers each question itself (greedy) before it compares two replies to it, and sees that
    answer beside them (reference-guided judging, Zheng et al. 2023), so that a wrong value against a right
    one is a mismatch to read rather than a fact to recall. At this size it lowered the labels' agreement
    with the rubric (seeds 1 and 2: 70.1 -> 66.8 %, 68.0 -> 64.3 %; docs/results.md, "Constitutional AI")."""
    principles_per_pair: int = Field(1, ge=1)
    """Principles a pair is judged by when labelling (each drawn at random, both orders of the replies each):
    the label is the mean of the verdicts' log-odds."""
    batch_size: int = Field(32, ge=1)
    """Conversations (verdicts and critiques) per device per step."""
    max_steps: int = Field(600, ge=1)
    """Optimizer steps (600 × 32: about five passes over the 4,000 conversations of 2,000 demonstrations)."""
    lr: LearningRate = 3e-4
    warmup_steps: WarmupSteps = 20
    val_every: ValEvery = 200
    val_batches: int = Field(8, ge=1)
    """Batches of held-out comparisons per process per validation run during training (the reported
    val_loss reads them all)."""
    ckpt_every: CkptEvery = 200
    critiques_shown: int = Field(40, ge=0)
    """Held-out comparisons whose critique the model writes for the readable report (reports/critique/)."""


# ---------------------------------------------------------------------------------------- reward


class RewardConfig(TrainLoop):
    batch_size: int = Field(16, ge=1)
    """Preference pairs per device per step (each pair is two sequences)."""
    max_steps: int = Field(300, ge=1)
    """Optimizer steps."""
    group_by_length: bool = True
    """Batch pairs of similar length together (llmlab.training.trainer.Epochs), so that little of a batch is padding:
    on the default pairs 10 % instead of 56 %."""
    lr: LearningRate = 3e-3
    """Peak learning rate of AdamW (measured on the pairs of 2,400 prompts × 4, 300 steps: 3e-3 gave 84–86 %
    gold accuracy, 2e-3 83 %, 4e-3 84 %; 600 steps at 1e-3 83 %: longer training overfits)."""
    warmup_steps: WarmupSteps = 20
    val_every: ValEvery = 100
    val_batches: int = Field(10, ge=1)
    """Batches of held-out pairs per process per validation run during training (the metrics at the end
    read every held-out pair)."""
    ckpt_every: CkptEvery = 100
    margin: float = Field(0.0, ge=0)
    """Bradley–Terry margin: the loss wants r(chosen) − r(rejected) > margin."""
    strength_margin: float = Field(1.0, ge=0)
    """Llama 2's margin from the preference's strength: a further strength_margin × s / 3 for a pair the rater
    rated s (0 negligibly better … 3 significantly better; `preferences.rated_strength`). Pairs without a
    rating (a judge's, real data) have s = 0. 1.0 (Llama 2's "small" margin) lowered PPO's invented answers
    on three seeds of three against 0, at a point of gold agreement; 3.0 was not robust (docs/results.md)."""
    centring: float = Field(0.01, ge=0)
    """Weight of the reward-centring term (r_c + r_r)², which keeps rewards near 0 (0 disables it)."""
    lm_coef: float = Field(0.3, ge=0)
    """Weight of a language-modelling loss on the chosen replies, through the backbone's own LM head
    (GRM, Yang et al. 2024), so that the hidden states stay a language model's while the head learns to
    compare. 0 disables it. Alone it gave 80.9 % gold agreement against 79.2 % (one seed, within the spread
    between runs); with `likelihood` it balances "I don't know" for unknown people against the true fact for
    known ones (docs/results.md)."""
    soft_labels: bool = True
    """Pairs a judge labelled (`preferences.labeller: constitution`) are learned with the judge's probability
    that the chosen reply is better as the target (`llmlab.training.reward.judged_probability`; Bai et al.
    2022), not as certain; the rater's pairs and real data stay hard labels, so only the Constitutional AI
    path changes. Against hard labels, PPO from the model's labels gained more on the suite and invented
    fewer answers on three seeds of three, at a lower KL (docs/results.md, Constitutional AI)."""
    likelihood: bool = True
    """The reward also reads how likely the SFT model (a frozen copy inside the reward model) finds the reply:
    the sum and the minimum of its tokens' log-probabilities, with learned weights
    (llmlab.training.reward.reply_likelihood). A head on the last hidden state cannot see which token of a
    reply the model did not expect; an invented fact has one. With `lm_coef` 0.3 it raised gold agreement
    from 79.2 % to 83.2 % and from 79.1 % to 82.7 % on two seeds' pairs (docs/results.md)."""


# ---------------------------------------------------------------------------------------- dpo


class DPOConfig(TrainLoop):
    """Direct Preference Optimization (src/llmlab/training/dpo.py): the SFT model trained on the preference pairs
    directly, against a frozen copy of itself, with no reward model and no sampling. Compared with SFT
    exactly as PPO is (ppo.eval_prompts held-out prompts, ppo's evaluation settings), so the two line up."""

    batch_size: int = Field(16, ge=1)
    """Preference pairs per device per step (each pair is two sequences)."""
    max_steps: int = Field(300, ge=1)
    """Optimizer steps (300 × 16 pairs: about one pass over the default pairs)."""
    lr: LearningRate = 1e-4
    warmup_steps: WarmupSteps = 20
    val_every: ValEvery = 100
    val_batches: int = Field(10, ge=1)
    """Batches of held-out pairs per process per validation run."""
    ckpt_every: CkptEvery = 100
    beta: float = Field(0.3, gt=0)
    """β: the implicit reward is β · (log π(y|x) − log π_ref(y|x)); a smaller β lets the policy move further
    from the SFT model. 0.3, PPO's KL coefficient: on the pairs and SFT model of an earlier default run, β 0.1
    went to KL 4.5 nats per reply for a gold gain of +0.08 ± 0.14, β 0.3 to KL 1.6 for +0.29 ± 0.11 (one run
    each, docs/results.md)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO: the probability that a pair's label is wrong (0: plain DPO)."""


# ---------------------------------------------------------------------------------------- ppo


class PPOConfig(Hardware):
    """RLHF with PPO (src/llmlab/training/ppo.py): the SFT policy optimised against the reward model, with a KL
    penalty to the SFT model. Names follow TRL's PPOConfig where one exists."""

    iterations: int = Field(40, ge=1)
    """Rounds of (sample a batch of replies, score them, several epochs of PPO updates on them)."""
    rollout_batch_size: int = Field(64, ge=1)
    """Replies sampled per iteration, over all processes: rollout_batch_size / samples_per_prompt prompts."""
    samples_per_prompt: int = Field(1, ge=1)
    """Replies sampled to each prompt of a rollout (side by side in one batch). 1 for `advantage: gae`
    (InstructGPT); 2 or more for `rloo`, whose baseline is the other replies to the same prompt."""
    advantage: Literal["gae", "rloo"] = "gae"
    """How a reply's tokens are credited. gae: per token, GAE against a value model initialised from the
    reward model (InstructGPT). rloo: one advantage per reply, its KL-penalised reward minus the mean of
    the other samples_per_prompt − 1 replies to the same prompt (REINFORCE leave-one-out, Ahmadian et al.
    2024, as TRL's RLOOTrainer); no value model is trained. Either way PPO's clipped loss updates the policy."""
    minibatch_size: int = Field(16, ge=1, validate_default=True)
    """Replies per PPO update, per process; the rollout batch is split into minibatches of this size."""
    ppo_epochs: int = Field(2, ge=1)
    """Passes over each rollout batch (InstructGPT and TRL use 4; 2 here, at half the update time)."""
    lr: float = Field(1e-4, gt=0, le=1)
    """Learning rate of AdamW for policy and value model, constant."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on matrices."""
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    """Clip each model's gradient norm to this value (0 disables clipping)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts; log-probabilities are taken at the same temperature."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reply in a rollout; one without <|end|> by then gets missing_eos_penalty."""
    kl_coef: float = Field(0.3, ge=0)
    """β: per-token reward −β·(log π − log π_ref); with kl_target, its initial value (and, with a ceiling,
    its floor). Measured on the default chain of models (docs/benchmarks.md): β = 0.2 reached KL 2.9 nats and
    declined 73 % of answerable fact questions, gold gain +0.26; β = 0.3 KL 1.2, 42 %, gold gain +0.34."""
    kl_target: float | None = Field(1.0, gt=0)
    """KL per reply (nats) the adaptive controller (Ziegler et al. 2019) steers by; null = a fixed β."""
    kl_target_mode: Literal["track", "ceiling"] = "ceiling"
    """ceiling: kl_target is a budget, β rises while the KL is above it and falls back, never below kl_coef,
    while it is below (a policy within the budget trains as with a fixed β); track: β moves both ways
    towards kl_target. The budget keeps PPO from running away from a weak reward model (docs/results.md,
    "A KL budget for PPO")."""
    kl_horizon: int = Field(256, ge=1)
    """Replies over which the adaptive controller moves β by at most ±20 %."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """λ of GAE."""
    cliprange: float = Field(0.2, gt=0)
    """ε of the clipped policy objective: ratios outside [1 − ε, 1 + ε] get no gradient."""
    cliprange_value: float = Field(0.2, gt=0)
    """How far a value prediction may move from its rollout value before its loss is clipped."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss in the summed loss."""
    missing_eos_penalty: float = Field(1.0, ge=0)
    """Subtracted from the reward model's score of a reply that ran to max_new_tokens without <|end|>."""
    n_prompts: int = Field(4000, ge=1)
    """Distinct prompts of the rl pool to draw rollouts from (in a fresh seeded order every pass)."""
    seed: int | None = Field(None, ge=0, lt=2**32)
    """The seed of PPO's own randomness (its rl prompts, their order, the rollouts' samples, the value head's
    start); null: the run's `seed`. The held-out prompts that compare PPO with SFT keep the run's seed, so
    `dvc exp run ppo -S ppo.seed=N` on a finished run measures how far PPO alone moves the figures while the
    SFT and reward models stay fixed (docs/results.md, "PPO's own spread")."""
    prompt_mix: PromptMix = dict(DEFAULT_MIX)
    """Share of each task kind among the rl prompts (the evaluation suite has its own, `evaluate.prompt_mix`)."""
    max_digits: int = Field(4, ge=1, le=9)
    """Largest number of digits of an addend in the arithmetic prompts."""
    eval_prompts: int = Field(500, ge=1)
    """Prompts of the evaluation pool answered greedily by the SFT and the PPO model after training."""
    eval_max_new_tokens: int = Field(96, ge=1)
    """Longest reply at evaluation."""
    ckpt_every: int = Field(10, ge=1)
    """Write the resumable checkpoint every this many iterations."""

    @field_validator("minibatch_size")
    @classmethod
    def _minibatches_fit(cls, minibatch_size: int, info: ValidationInfo) -> int:
        rollout = info.data.get("rollout_batch_size")
        if rollout is not None and rollout % minibatch_size:
            raise ValueError(
                f"rollout_batch_size ({rollout}) must be a multiple of minibatch_size ({minibatch_size})"
            )
        return minibatch_size

    @field_validator("samples_per_prompt")
    @classmethod
    def _groups_fit(cls, k: int, info: ValidationInfo) -> int:
        rollout = info.data.get("rollout_batch_size")
        if rollout is not None and rollout % k:
            raise ValueError(
                f"must divide rollout_batch_size ({rollout}): every prompt gets all its replies in one rollout"
            )
        return k

    @field_validator("advantage")
    @classmethod
    def _rloo_has_groups(cls, advantage: str, info: ValidationInfo) -> str:
        if advantage == "rloo" and info.data.get("samples_per_prompt", 2) < 2:
            raise ValueError(
                "rloo needs samples_per_prompt ≥ 2 (each reply's baseline is the other replies to its "
                "prompt); set ppo.samples_per_prompt too, e.g. 4"
            )
        return advantage


class EvaluateConfig(Section):
    """The evaluate stage (pipeline/evaluate.py): one held-out suite on the base, SFT and PPO models, and
    the measurements behind each section of reports/report.md."""

    n_prompts: int = Field(1000, ge=10)
    """Prompts of the evaluation pool (never used to train SFT, the reward model or PPO) that all three
    models answer with the same sampling settings."""
    prompt_mix: PromptMix = {"fact": 0.43, "about": 0.1, "arithmetic": 0.17, "unknown": 0.2, "harmful": 0.1}
    """Share of each task kind among the suite's prompts. More people who exist nowhere than in training
    (20 % against 10 %), so that the invented-answer rate of each model rests on about 180 prompts, not 100."""
    temperature: float = Field(0.0, ge=0, le=5)
    """Sampling temperature of the shared suite; 0 = greedy, the same reply every run."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reply in the suite (the base model, which never learned to stop, always runs this long)."""
    recall_people: int | None = Field(None, ge=1)
    """Known people whose facts are probed by statement completion (null: all of them)."""
    perplexity_windows: int = Field(64, ge=1)
    """Windows of held-out pretraining text (context_length tokens each) for the perplexity of each model."""
    temperatures: list[float] = [0.0, 0.5, 1.0, 1.5, 2.0]
    """Temperatures of the sampling section (PPO model)."""
    temperature_prompts: int = Field(200, ge=1)
    """Evaluation prompts answered at each temperature..."""
    temperature_samples: int = Field(4, ge=2)
    """...this many times each (once at temperature 0), for the diversity of the replies."""
    cot_per_digit: int = Field(100, ge=1)
    """Additions per digit count, asked both step by step and for the bare result."""
    cot_max_digits: int = Field(4, ge=1, le=9)
    """Additions of 1 to this many digits per addend."""
    cot_max_new_tokens: int = Field(120, ge=1)
    """Room for the written-out working (generation also stops at the model's context length)."""
    context_pairs: int = Field(300, ge=1)
    """Facts about never-seen people told in one call and asked in the next, with and without the transcript."""
    position_facts: int = Field(6, ge=3)
    """Facts stated in one prompt when measuring retrieval by the asked fact's position (first, middle, last)."""
    position_trials: int = Field(300, ge=1)
    """Prompts per model for the position measurement (spread evenly over the positions)."""
    distractor_counts: list[int] = [0, 2, 4, 6, 8]
    """Sentences about other people between a fact and its question, for the long-prompt measurement."""
    distractor_trials: int = Field(100, ge=1)
    """Prompts per model and distractor count."""
    attention_lengths: list[int] = [64, 128, 256, 512, 1024, 2048]
    """Sequence lengths at which the cost of attention is timed (a random model of the same shape)."""
    kv_cache_new_tokens: list[int] = [64, 256]
    """Generated tokens at which cached and uncached generation are timed."""
    attention_sentence: str | None = None
    """The sentence whose attention maps are drawn (null: a fact sentence of the world's first person)."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    """Where the models run; auto = a GPU when there is one."""

    @model_validator(mode="after")
    def _lists(self) -> EvaluateConfig:
        if not self.temperatures or any(t < 0 or t > 5 for t in self.temperatures):
            raise ValueError(
                f"temperatures must be a non-empty list of values in [0, 5], got {self.temperatures}"
            )
        if len(self.attention_lengths) < 3 or any(n < 8 for n in self.attention_lengths):
            raise ValueError(
                f"attention_lengths needs at least 3 lengths >= 8 (to fit an exponent), got {self.attention_lengths}"
            )
        if not self.kv_cache_new_tokens or any(n < 1 for n in self.kv_cache_new_tokens):
            raise ValueError(f"kv_cache_new_tokens must be positive numbers, got {self.kv_cache_new_tokens}")
        return self


# ------------------------------------------------------------------------------------------- root


class Params(Section):
    """The whole `params.yaml`."""

    seed: int = Field(1337, ge=0, lt=2**32)
    """Seed for every random choice: the world, the data order, the weights, sampling."""
    corpus: CorpusConfig = CorpusConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    preferences: PreferencesConfig = PreferencesConfig()
    critique: CritiqueConfig = CritiqueConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `path`; raise ParamsError listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: file not found (run from the repository root, or pass --params)"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return validate_params(raw if raw is not None else {}, source=str(path))


def validate_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    found = _across_sections(raw)
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        found = _merge_union_branches([_describe(err) for err in e.errors()]) + found
    if found:
        raise ParamsError(f"{source} has {len(found)} problem(s):", found)
    return params


# Every reply length the stages generate: each must leave room for a prompt in the model's context.
GENERATION_LENGTHS = (
    "pretrain.sample_tokens",
    "sft.max_new_tokens",
    "preferences.max_new_tokens",
    "critique.max_new_tokens",
    "ppo.max_new_tokens",
    "ppo.eval_max_new_tokens",
    "evaluate.max_new_tokens",
    "evaluate.cot_max_new_tokens",
)


def _across_sections(raw: dict) -> list[str]:
    """Checks that involve two sections (each section's own checks are its validators). They read the raw
    values (defaults where absent), so that they are reported together with any other problem; a value of
    a wrong type is left to the schema's message."""
    ctx = _raw_value(raw, "pretrain.model.context_length")
    if not _is_int(ctx):
        return []
    found = []
    for key in GENERATION_LENGTHS:
        value = _raw_value(raw, key)
        if _is_int(value) and value >= ctx:
            found.append(
                f"{key}: must be below pretrain.model.context_length ({ctx}), which must also hold "
                f"the prompt, got {value}"
            )
    return found


def _raw_value(raw: Any, key: str) -> Any:
    """`raw`'s value at the dotted `key`, or the schema's default when `raw` does not set it."""
    model: Any = Params
    for part in key.split("."):
        field = model.model_fields[part]
        raw = raw.get(part, field.default) if isinstance(raw, dict) else field.default
        model = field.annotation
    return raw.model_dump() if isinstance(raw, BaseModel) else raw


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# pydantic tags the error of each member of a union with the member's type: `devices.int`,
# `devices.literal['auto']`. These are not keys of params.yaml.
_UNION_BRANCH = re.compile(r"^(int|float|str|bool|none|[a-z-]+\[.*\])$")


def _merge_union_branches(lines: list[str]) -> list[str]:
    """`k: must be a valid integer, got x` + `k: must be one of 'auto', got x` -> one line for k."""
    merged: dict[str, list[str]] = {}
    for line in lines:
        key, _, what = line.partition(": ")
        merged.setdefault(key, []).append(what)
    out = []
    for key, whats in merged.items():
        if (
            len(whats) > 1
            and len({w.rsplit(", got ", 1)[-1] for w in whats}) == 1
            and all(", got " in w for w in whats)
        ):
            got = whats[0].rsplit(", got ", 1)[1]
            alternatives = [w.rsplit(", got ", 1)[0].removeprefix("must be ") for w in whats]
            whats = ["must be " + " or ".join(alternatives) + f", got {got}"]
        out += [f"{key}: {w}" for w in whats]
    return out


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as `key.path: what is allowed, got X`."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and _UNION_BRANCH.match(p))]
    if loc[-1:] == ["[key]"]:  # a mapping's key is wrong: `ppo.prompt_mix.nope.[key]` -> `ppo.prompt_mix`
        loc = loc[:-2]
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    bounds = {
        "greater_than": "> {gt}",
        "greater_than_equal": ">= {ge}",
        "less_than": "< {lt}",
        "less_than_equal": "<= {le}",
    }
    if kind in bounds:
        # pydantic hands float bounds as floats (0.0): show them as written in the schema (0).
        ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
        what = "must be " + bounds[kind].format(**ctx)
    elif kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against params.yaml's documented keys)"
    elif kind == "missing":
        return f"{key}: required"
    elif kind == "literal_error":
        what = f"must be one of {ctx.get('expected')}"
    elif kind == "value_error":
        what = str(ctx.get("error", err["msg"]))
        # A model-level check (no single key) already reads as a sentence.
        return f"{key}: {what}"
    else:  # type errors and the rest: pydantic's own words ("Input should be a valid integer")
        what = err["msg"].replace("Input should be", "must be")
    return f"{key}: {what}, got {got!r}"


# ---------------------------------------------------------------------------- which keys a stage reads


@contextmanager
def recording_reads(params: Params) -> Iterator[set[str]]:
    """Record the dotted keys of `params` read while the block runs.

        with recording_reads(params) as reads:
            params.pretrain.lr; params.sft.model_dump()
        reads == {"pretrain.lr", "sft"}

    A read of a value records its key; a pydantic method on a section (`model_dump`, `model_copy`, ...)
    records the whole section, which is what it reads. Taking a section object itself records nothing:
    only what is read from it counts. Reads from a *copy* of a section are not seen (none is made today).
    Subtle: it works by swapping `Section.__getattribute__` for the block, so it is for one thread and one
    Params at a time, which is what a stage process is.
    """
    paths: dict[int, list[str]] = {}

    def walk(section: BaseModel, path: str) -> None:
        paths.setdefault(id(section), []).append(path)
        for name in type(section).model_fields:
            value = section.__dict__[name]
            if isinstance(value, BaseModel):
                walk(value, f"{path}.{name}" if path else name)

    walk(params, "")
    reads: set[str] = set()
    read_attribute = Section.__getattribute__

    def recording(self: Section, name: str) -> Any:
        value = read_attribute(self, name)
        where = paths.get(id(self))
        if where is None or name.startswith("_"):
            return value
        if name in type(self).model_fields:
            if not isinstance(value, BaseModel):
                reads.update(f"{path}.{name}" if path else name for path in where)
        elif name.startswith("model_"):
            reads.update(path or "*" for path in where)
        return value

    Section.__getattribute__ = recording  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        del Section.__getattribute__
