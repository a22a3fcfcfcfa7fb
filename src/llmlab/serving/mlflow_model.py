"""The trained models as MLflow models: log them, register them, serve them over HTTP.

An MLflow model is a folder with an `MLmodel` file that says how to load and call it. Ours holds

    MLmodel                   flavor python_function, the signature (inputs, outputs, params)
    mlflow_model.py           this file: MLflow runs it to get the model object ("models from code")
    code/llmlab/              the llmlab package as it was when the model was logged
    artifacts/model/          config.json + model.safetensors, as `save_model` wrote them
    artifacts/tokenizer.json
    requirements.txt          pinned to the versions of the logging environment

so it is served anywhere MLflow runs, with no checkout of this repository:

    mlflow models serve -m models:/llmlab-chat@champion --env-manager local -p 5001
    curl localhost:5001/invocations -H 'Content-Type: application/json' -d \\
        '{"dataframe_records": [{"prompt": "Where does Mara Quill live?"}], "params": {"max_tokens": 32}}'
    -> {"predictions": [{"completion": "Mara Quill lives in Port Avery.", "ended": true, ...}]}

No pickle anywhere: MLflow 3 refuses to unpickle a cloudpickled `PythonModel` unless told to
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION), and recommends "models from code" instead: the model is logged as a
Python file that calls `mlflow.models.set_model(...)`, and loading it runs that file. The weights travel as
safetensors and are read by `load_model`, as everywhere else in llmlab.

A request is a table with one row per completion: a `prompt` column (one user message) or a `messages`
column (a whole conversation, [{"role": "user", "content": ...}, ...], ending with a user turn). Params,
per request: `temperature` (0 = greedy, the default), `top_p`, `max_tokens`, `seed` (for sampling), `raw`
(continue the prompt as plain text, no chat template: what the base model was trained on). Limits reject a
request with a clear message, which the server answers with HTTP 400: at most `MAX_ROWS` rows,
`MAX_PROMPT_CHARS` characters a row, `max_tokens` up to the model's context length. A prompt too long
for the context is fitted as `llmlab chat` fits it (`llmlab.serving.inference.fit_prompt`): still in the chat
template, it forgets the oldest turns (a system message goes with the first), then cuts the start of a
message too long on its own; a raw prompt keeps <|bos|> and its last tokens. The row says `truncated: true`.
"""

from __future__ import annotations

import math
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from llmlab.data.chat_template import check_messages, parse_reply
from llmlab.data.tokenizer import BOS_ID, END_ID, load_tokenizer
from llmlab.errors import LlmlabError
from llmlab.model.generate import generate
from llmlab.model.transformer import load_model
from llmlab.serving.inference import fit_prompt, fit_raw

MAX_ROWS = 64
"""Completions per request: a batch is generated in one pass, and its memory grows with the rows."""
MAX_PROMPT_CHARS = 20_000
"""Characters per row (a prompt, or all the contents of a conversation): far beyond any context, but bounded."""
DEFAULT_MAX_TOKENS = 64
REGISTERED_NAME = "llmlab-chat"
CHAMPION = "champion"
"""The alias of the version to serve: `models:/llmlab-chat@champion`."""

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt", required=False),
            ColSpec(
                Array(Object([Property("role", "string"), Property("content", "string")])),
                "messages",
                required=False,
            ),
        ]
    ),
    outputs=Schema(
        [
            ColSpec("string", "completion"),
            ColSpec(
                "boolean", "ended"
            ),  # the reply closed its turn (chat: <|end|>; raw: <|bos|>, a new document)
            ColSpec("boolean", "truncated"),  # the prompt lost its oldest turns or tokens to fit the context
            ColSpec("long", "prompt_tokens"),  # tokens the model saw (after truncation)
            ColSpec("long", "completion_tokens"),  # tokens generated, the closing one included
        ]
    ),
    params=ParamSchema(
        [
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("max_tokens", "long", DEFAULT_MAX_TOKENS),
            ParamSpec("seed", "long", None),
            ParamSpec("raw", "boolean", False),
        ]
    ),
)


def invalid(message: str) -> MlflowException:
    """A bad request: the scoring server answers HTTP 400 with this message. (Any other exception in predict
    is a 400 too, but one that says only "unexpected error", with a stack trace.)"""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ChatModel(mlflow.pyfunc.PythonModel):
    """An llmlab model and its tokenizer behind MLflow's `predict`: one completion per input row."""

    def load_context(self, context) -> None:
        self.model = load_model(context.artifacts["model"])
        self.tok = load_tokenizer(context.artifacts["tokenizer"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        rows = _records(model_input)
        if len(rows) > MAX_ROWS:
            raise invalid(f"{len(rows)} rows in one request; at most {MAX_ROWS} (split the request)")
        p = self._params(params or {})
        budget = _prompt_budget(self.model.config.context_length, p["max_tokens"])
        prompts, truncated, problems = [], [], []
        for i, row in enumerate(rows):
            try:
                ids, was_cut = self._prompt(row, p["raw"], budget)
            except (LlmlabError, ValueError) as e:
                problems.append(f"row {i}: {e}")
                continue
            prompts.append(ids)
            truncated.append(was_cut)
        if problems:
            raise invalid(
                "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
            )

        stop = BOS_ID if p["raw"] else END_ID  # raw: the base model starts a new document with <|bos|>
        generator = torch.Generator().manual_seed(p["seed"]) if p["seed"] is not None else None
        outs = generate(
            self.model,
            prompts,
            p["max_tokens"],
            temperature=p["temperature"],
            top_p=p["top_p"],
            stop_ids=[stop],
            generator=generator,
        )
        completions, ended = [], []
        for out in outs:
            if p["raw"]:
                ended.append(stop in out)
                completions.append(self.tok.decode(out[: len(out) - ended[-1]], skip_special_tokens=False))
            else:
                reply = parse_reply(self.tok, out)
                completions.append(reply.text)
                ended.append(reply.ended)
        return pd.DataFrame(
            {
                "completion": completions,
                "ended": ended,
                "truncated": truncated,
                "prompt_tokens": [len(x) for x in prompts],
                "completion_tokens": [len(x) for x in outs],
            },
            columns=SIGNATURE.outputs.input_names(),
        )

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Request params with their defaults, checked; every problem named in one error."""
        defaults = {spec.name: spec.default for spec in SIGNATURE.params.params}
        unknown = sorted(set(params) - set(defaults))
        p = defaults | dict(params)
        ctx = self.model.config.context_length
        problems = [f"unknown param {k!r} (known: {', '.join(defaults)})" for k in unknown]
        if not (isinstance(p["max_tokens"], int) and 1 <= p["max_tokens"] <= ctx):
            problems.append(
                f"max_tokens must be 1 to {ctx} (the model's context length), got {p['max_tokens']!r}"
            )
        if not (isinstance(p["temperature"], int | float) and 0 <= p["temperature"] < math.inf):
            problems.append(f"temperature must be >= 0 (0 = greedy), got {p['temperature']!r}")
        if not (isinstance(p["top_p"], int | float) and 0 < p["top_p"] <= 1):
            problems.append(f"top_p must be in (0, 1], got {p['top_p']!r}")
        if p["seed"] is not None and not isinstance(p["seed"], int):
            problems.append(f"seed must be an integer, got {p['seed']!r}")
        if problems:
            raise invalid("; ".join(problems))
        p["raw"] = bool(p["raw"])
        return p

    def _prompt(self, row: dict[str, Any], raw: bool, budget: int) -> tuple[list[int], bool]:
        """Token ids of one row in at most `budget` tokens, and whether anything was cut to fit: the chat
        template up to `<|assistant|>`, or <|bos|> + the text when raw."""
        prompt, messages = _present(row.get("prompt")), _present(row.get("messages"))
        if (prompt is None) == (messages is None):
            raise ValueError("give either a 'prompt' or a 'messages' value, not both and not neither")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            _check_length(len(prompt))
            if raw:
                ids, cut = fit_raw(self.tok, prompt, budget)
                return ids, cut > 0
            messages = [{"role": "user", "content": prompt}]
        else:
            if raw:
                raise ValueError(
                    "raw continues a plain-text 'prompt'; a 'messages' conversation needs the chat template"
                )
            messages = check_messages(list(messages))  # raises naming the message at fault
            if not messages or messages[-1]["role"] != "user":
                raise ValueError(
                    "messages must end with a user turn (the model writes the assistant's reply to it)"
                )
            _check_length(sum(len(m["content"]) for m in messages))
        fitted = fit_prompt(self.tok, messages[:-1], messages[-1]["content"], budget)
        return fitted.ids, fitted.truncated


def _records(model_input) -> list[dict[str, Any]]:
    """Rows as dicts. MLflow hands `predict` a DataFrame (it converts a list of dicts by the signature)."""
    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(list(model_input))
    if not {"prompt", "messages"} & set(df.columns):
        # MLflow drops the columns the signature does not know: {"inputs": ["Hi"]} arrives with none left
        raise invalid(
            "the input needs a 'prompt' column (a user message) or a 'messages' column (a conversation)"
        )
    return df.to_dict("records")


def _present(value):
    """None for a missing cell: None, NaN or pd.NA (pandas' fillers for a row without that column)."""
    return None if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else value


def _prompt_budget(context_length: int, max_tokens: int) -> int:
    """Prompt tokens kept: enough to leave room for `max_tokens` of reply, but never fewer than half the
    context (a longer reply stops at the context's end, `ended` false). Unlike `Sampling.prompt_budget`,
    which refuses a reply that leaves less than a minimal prompt, a request may ask for up to the context.

    >>> _prompt_budget(128, 32), _prompt_budget(128, 100), _prompt_budget(128, 128)
    (96, 64, 64)
    """
    return max(context_length - max_tokens, context_length // 2)


def _check_length(n_chars: int) -> None:
    if n_chars > MAX_PROMPT_CHARS:
        raise ValueError(f"{n_chars} characters; at most {MAX_PROMPT_CHARS} a row")


# ------------------------------------------------------------------------------------- log and register


def pip_requirements() -> list[str]:
    """What the served model imports, pinned to this environment. Given explicitly: MLflow's inference
    would load the model and trace its imports, seconds per log. (torch's "+cpu" local tag is dropped:
    PyPI has no such version.)"""
    packages = ("mlflow", "torch", "tokenizers", "safetensors", "numpy", "pandas", "pydantic", "pyyaml")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_chat_model(
    model_dir: str | Path, tokenizer_path: str | Path, name: str, run_id: str | None = None
) -> str:
    """Log `model_dir` (config.json + model.safetensors) and its tokenizer as an MLflow model named `name`,
    in the run `run_id` (default: the active run, if any) of the current tracking URI. Returns its URI
    (`models:/m-...`). Checks first that the two load and fit together: a broken model fails here, not at serving.
    """
    import llmlab

    model = load_model(model_dir)
    vocab = load_tokenizer(tokenizer_path).get_vocab_size()
    if model.config.vocab_size != vocab:
        raise LlmlabError(
            f"{model_dir} has a vocabulary of {model.config.vocab_size} tokens, {tokenizer_path} of {vocab}: "
            "the model was trained with another tokenizer"
        )
    # The logged model belongs to the run's experiment; left to itself MLflow would put it in the current
    # (default) experiment, whose artifacts land in ./mlruns of whatever the working directory is.
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id if run_id else None
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=experiment_id)
    info = mlflow.models.Model.log(
        artifact_path=None,  # deprecated in MLflow 3 in favour of `name`, but still a required argument
        name=name,
        model_id=logged.model_id,
        run_id=run_id,  # Model.log takes the run directly: no fluent run to start (and end) around it
        flavor=mlflow.pyfunc,
        python_model=Path(__file__),  # models from code: this file, run at load time, sets the model
        code_paths=[str(Path(llmlab.__file__).parent)],  # the served model imports llmlab from here
        artifacts={"model": str(model_dir), "tokenizer": str(tokenizer_path)},
        signature=SIGNATURE,
        # MLflow answers this example with the logged model at once (a failure is only a warning in its log),
        # and shows it as the request to send (serving_input_example.json)
        input_example=(pd.DataFrame({"prompt": ["Where does Mara Quill live?"]}), {"max_tokens": 4}),
        pip_requirements=pip_requirements(),
        metadata={"context_length": model.config.context_length, "vocab_size": vocab},
    )
    return info.model_uri


def register(model_uri: str, name: str = REGISTERED_NAME, alias: str = CHAMPION) -> int:
    """Add `model_uri` to the registry as a new version of `name` (created on first use), and move `alias`
    to it. Returns the version number: `models:/{name}/{version}`, or `models:/{name}@{alias}` for the latest."""
    mv = mlflow.register_model(model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return int(mv.version)


# Models from code: `log_chat_model` logs this file as the model's code, and MLflow runs it (under a module
# name of its own) whenever the model is loaded; this line hands MLflow the model object. Imported as
# `llmlab.serving.mlflow_model`, the file only defines things.
if __name__ != "llmlab.serving.mlflow_model":
    mlflow.models.set_model(ChatModel())
