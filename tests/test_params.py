"""Params: typed validation with every problem named, and dvc.yaml kept in step with the schema."""

import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from llmlab.errors import ParamsError
from llmlab.params import Params, load_params, validate_params
from llmlab.stage import run_stage
from tests.conftest import ROOT, SMOKE_PARAMS, stage_env

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def problems(raw) -> list[str]:
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    return e.value.details


@pytest.mark.parametrize("path", [ROOT / "params.yaml", SMOKE_PARAMS], ids=["default", "smoke"])
def test_shipped_params_files_are_valid(path):
    load_params(path)


def test_params_yaml_spells_out_every_default_key():
    """params.yaml is the documentation users edit: every key of the schema appears in it."""

    def keys(model: type[BaseModel], prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def present(key):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert [k for k in keys(Params) if not present(k)] == []


def test_params_yaml_values_are_the_schema_defaults():
    """Every default lives in two places (params.yaml, what users edit, and params.py, what a missing key
    gets): they must agree value by value, or a key deleted from params.yaml would silently change a run."""
    shipped = load_params(ROOT / "params.yaml").model_dump()
    defaults = Params().model_dump()

    def diff(a, b, prefix=""):
        if isinstance(a, dict):
            return [d for k in a for d in diff(a[k], b[k], f"{prefix}{k}.")]
        return [] if a == b else [f"{prefix[:-1]}: params.yaml {a!r}, params.py {b!r}"]

    assert diff(shipped, defaults) == []


def test_the_model_shapes_defaults_are_the_params_defaults():
    """GPTConfig's defaults (what tests and `GPTConfig(vocab_size=...)` get) are the model section's."""
    import dataclasses

    from llmlab.model.transformer import GPTConfig

    assert GPTConfig(vocab_size=2048) == GPTConfig.from_params(Params().pretrain.model, 2048)
    assert {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"} == set(
        Params().pretrain.model.model_dump()
    )


def test_every_field_has_a_description():
    def walk(model: type[BaseModel], prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
            elif not field.description and name not in (
                "beta1",
                "beta2",
                "accelerator",
                "strategy",
                "num_nodes",
            ):
                yield f"{prefix}{name}"

    assert list(walk(Params)) == []


def test_all_problems_are_reported_at_once_each_naming_its_key():
    found = problems(
        {
            "pretrain": {
                "lr": -1,
                "batch_size": "eight",
                "precision": "64",
                "typo_key": 1,
                "model": {"n_head": 3},
            },
            "corpus": {"val_fraction": 0.9},
        }
    )
    assert "pretrain.lr: must be > 0, got -1" in found
    assert any(p.startswith("pretrain.batch_size: ") and "'eight'" in p for p in found)
    assert any(p.startswith("pretrain.precision: must be one of") for p in found)
    assert any(p.startswith("pretrain.typo_key: unknown key") for p in found)
    assert "pretrain.model.n_head: must divide model.d_model (128), got 3" in found
    assert any(p.startswith("corpus.val_fraction: must be < 0.5") for p in found)
    assert len(found) == 6


def test_consistency_checks():
    assert any("max_steps" in p for p in problems({"pretrain": {"max_steps": 10, "max_tokens": 1000}}))
    assert any("max_steps" in p for p in problems({"pretrain": {"max_steps": None}}))
    assert any("even head size" in p for p in problems({"pretrain": {"model": {"d_model": 12, "n_head": 4}}}))
    places = lambda value: problems({"pretrain": {"model": {"canon_places": value}}})  # noqa: E731
    assert any(
        p.startswith("pretrain.model.canon_places: each of A, B, C, D at most once") for p in places("AA")
    )
    assert any(p.startswith("pretrain.model.canon_places: String should match") for p in places("AE"))
    assert (
        Params.model_validate({"pretrain": {"model": {"canon_places": "BA"}}}).pretrain.model.canon_places
        == "AB"
    )
    batches = problems({"ppo": {"rollout_batch_size": 10, "minibatch_size": 4}})
    assert "ppo.minibatch_size: rollout_batch_size (10) must be a multiple of minibatch_size (4)" in batches
    dpo = problems({"dpo": {"beta": 0, "label_smoothing": 0.5}})
    assert any(p.startswith("dpo.beta: must be > 0") for p in dpo)
    assert any(p.startswith("dpo.label_smoothing: must be < 0.5") for p in dpo)


def test_yaml_errors_are_params_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(bad)


# Leaf keys and a value of a wrong type for each: hypothesis picks combinations.
WRONG = st.one_of(
    st.text(max_size=5).filter(lambda s: not s.strip().lstrip("-").replace(".", "").isdigit()),
    st.lists(st.integers(), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
)
LEAVES = [
    "seed",
    "pretrain.lr",
    "pretrain.batch_size",
    "pretrain.model.d_model",
    "tokenizer.vocab_size",
    "corpus.val_fraction",
    "corpus.synthetic.n_sft_people",
]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(LEAVES), WRONG, min_size=1, max_size=4))
def test_wrong_types_are_named(overrides):
    raw: dict = {}
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    found = problems(raw)
    for key in overrides:
        assert any(p.startswith(key + ":") for p in found), (key, found)


# ------------------------------------------------------------------------------------------ dvc.yaml


def test_invalid_params_exit_2_without_traceback_and_write_nothing(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("corpus:\n  val_fraction: 2\n  sourse: synthetic\npretrain:\n  lr: -1\n")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipeline" / "corpus.py"),
            "--params",
            str(bad),
            "--out",
            str(out),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        cwd=tmp_path,
        env=stage_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "corpus.val_fraction: must be < 0.5, got 2" in r.stderr
    assert "corpus.sourse: unknown key" in r.stderr
    assert "pretrain.lr: must be > 0, got -1" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_unreachable_tracking_server_fails_fast_before_writing(tmp_path):
    import time

    env = stage_env(tmp_path)
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # discard port: nothing listens
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipeline" / "corpus.py"),
            "--params",
            str(SMOKE_PARAMS),
            "--out",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "http://127.0.0.1:9" in r.stderr and "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------- random bad params through a stage's entry point


def leaves(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf key of the schema ('pretrain.model.d_model') and its field."""
    out = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= leaves(field.annotation, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = field
    return out


LEAF_FIELDS = leaves()
SECTIONS = [""] + sorted({k.rsplit(".", 1)[0] + "." for k in LEAF_FIELDS if "." in k})


def out_of_range(field: FieldInfo) -> list:
    """Values just outside each bound the field declares."""
    values = []
    for bound in field.metadata:
        for attr, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            limit = getattr(bound, attr, None)
            if limit is not None:
                values.append(limit + step if isinstance(limit, int) or step == 0 else limit + step * 0.5)
    return values


RANGED = {k: out_of_range(f) for k, f in LEAF_FIELDS.items() if out_of_range(f)}

# (values to set, the key the message must name, keys whose values the check reads)
INCONSISTENT = [
    ({"pretrain.model.d_model": 96, "pretrain.model.n_head": 5}, "pretrain.model.n_head", ()),
    (
        {"ppo.rollout_batch_size": 10, "ppo.minibatch_size": 4},
        "ppo.minibatch_size: rollout_batch_size (10) must be a multiple",
        (),
    ),
    (
        {"ppo.rollout_batch_size": 8, "ppo.samples_per_prompt": 3},
        "ppo.samples_per_prompt: must divide rollout_batch_size (8)",
        (),
    ),
    (
        {"ppo.advantage": "rloo", "ppo.samples_per_prompt": 1},
        "ppo.advantage: rloo needs samples_per_prompt",
        (),
    ),
    (
        {"pretrain.max_tokens": 1000},
        "pretrain.max_tokens: set exactly one of max_steps and max_tokens",
        ("pretrain.max_steps",),
    ),
    (
        {"ppo.max_new_tokens": 64},
        "ppo.max_new_tokens: must be below pretrain.model.context_length (64)",
        ("pretrain.model.context_length",),
    ),
    (
        {"pretrain.model.context_length": 32},
        "sft.max_new_tokens: must be below pretrain.model.context_length (32)",
        ("sft.max_new_tokens",),
    ),
]


@st.composite
def mutation(draw):
    """One wrong thing: (values to set, text the error must contain, keys it touches)."""
    kind = draw(st.sampled_from(["type", "unknown", "range", "inconsistent"]))
    if kind == "type":
        key = draw(st.sampled_from(sorted(LEAF_FIELDS)))
        return (
            {key: {"not": ["a", "value"]}},
            f"  {key}",
            {key},
        )  # `key: …`, or `key.<part>: …` inside a mapping
    if kind == "unknown":
        name = draw(st.from_regex(r"[a-z][a-z_]{2,10}", fullmatch=True))
        key = draw(st.sampled_from(SECTIONS)) + "zz_" + name
        return {key: 1}, f"{key}: unknown key", {key}
    if kind == "range":
        key = draw(st.sampled_from(sorted(RANGED)))
        return {key: draw(st.sampled_from(RANGED[key]))}, f"{key}: must be", {key}
    values, named, reads = draw(st.sampled_from(INCONSISTENT))
    return values, named, set(values) | set(reads)


def nested(flat: dict) -> dict:
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    for key, value in flat.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


@settings(max_examples=150, deadline=None)
@given(st.lists(mutation(), min_size=1, max_size=3))
def test_random_bad_params_exit_2_naming_each_key_and_write_nothing(mutations):
    touched = [keys for _, _, keys in mutations]
    assume(all(not (a & b) for i, a in enumerate(touched) for b in touched[i + 1 :]))  # independent mistakes
    ran = []
    with tempfile.TemporaryDirectory() as d:
        params = Path(d) / "params.yaml"
        params.write_text(
            yaml.safe_dump(nested({k: v for values, _, _ in mutations for k, v in values.items()}))
        )
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            run_stage(
                "pretrain", lambda args, p: ran.append(p), lambda parser: None, ["--params", str(params)]
            )
        assert sorted(p.name for p in Path(d).iterdir()) == ["params.yaml"]
    said = err.getvalue()
    assert exit_.value.code == 2 and not ran, said
    assert said.startswith("error [pretrain]: ") and "Traceback" not in said
    for _, named, _ in mutations:
        assert named in said, (named, said)
