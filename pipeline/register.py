"""Stage `register`: the four trained models as MLflow models, the PPO and DPO models in the Model Registry.

Inputs: models/pretrain (stage `pretrain`), models/sft (stage `sft`), models/ppo (stage `ppo`), models/dpo
(stage `dpo`), the tokenizer.
Outputs: four MLflow models logged to this stage's run (named base, sft, ppo, dpo: weights, tokenizer,
config and code packed in, see `llmlab.serving.mlflow_model`); a new version of the registered model `--name` (default
llmlab-chat) made from the PPO model, and one of `<name>-dpo` made from the DPO model beside it, each with
the alias `champion` moved to it; reports/register.json with
the model URIs, the version and the time taken (a report, not a metrics file: ids and seconds differ on
every run, and metrics/*.json stay byte-identical between runs). Serve the champion with

    mlflow models serve -m models:/llmlab-chat@champion --env-manager local -p 5001
"""

from __future__ import annotations

import logging
import os
import time

import mlflow
import requests
from mlflow.exceptions import MlflowException

from llmlab.data.tokenizer import load_tokenizer
from llmlab.errors import LlmlabError
from llmlab.io import write_json
from llmlab.model.transformer import load_model
from llmlab.params import Params
from llmlab.serving.mlflow_model import CHAMPION, REGISTERED_NAME, log_chat_model, register
from llmlab.stage import run_stage
from llmlab.tracking import StageRun

log = logging.getLogger("llmlab.register")


def add_arguments(p):
    p.add_argument("--base", required=True, help="pretrained model folder (from the pretrain stage)")
    p.add_argument("--sft", required=True, help="chat model folder (from the sft stage)")
    p.add_argument(
        "--ppo", required=True, help="RLHF model folder (from the ppo stage): registered as --name"
    )
    p.add_argument(
        "--dpo", required=True, help="DPO model folder (from the dpo stage): registered as <name>-dpo"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--out", required=True, help="JSON file for the model URIs, version and timings")
    p.add_argument(
        "--name", default=REGISTERED_NAME, help=f"registered model name (default: {REGISTERED_NAME})"
    )


def main(args, params: Params) -> None:  # reads no params section
    models = {
        "base": (args.base, "pretrain"),
        "sft": (args.sft, "sft"),
        "ppo": (args.ppo, "ppo"),
        "dpo": (args.dpo, "dpo"),
    }
    for (
        folder,
        stage,
    ) in models.values():  # a missing model names the stage that writes it, before any run starts
        load_model(folder, stage=stage)
    load_tokenizer(args.tokenizer)

    with StageRun("register", tags={"registered_model": args.name}) as run:
        t0 = time.perf_counter()
        mlflow.set_tracking_uri(
            run.uri
        )  # log_model and the registry use MLflow's global URI: the stage's store
        uris, seconds = {}, {}
        try:  # registering is this stage's whole job: a tracking failure here fails it, in one line
            for name, (folder, _) in models.items():
                t = time.perf_counter()
                uris[name] = log_chat_model(folder, args.tokenizer, name, run_id=run.run_id)
                seconds[f"log_{name}"] = time.perf_counter() - t
            t = time.perf_counter()
            version = register(uris["ppo"], args.name, CHAMPION)
            dpo_version = register(uris["dpo"], f"{args.name}-dpo", CHAMPION)
        except (MlflowException, requests.RequestException, OSError) as e:
            raise LlmlabError(
                f"MLflow at {run.uri} failed while logging and registering the models: "
                f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            ) from None
        seconds["register"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        write_json(
            args.out,
            {
                "models": uris,
                "registered_model": args.name,
                "version": version,
                "dpo_registered_model": f"{args.name}-dpo",
                "dpo_version": dpo_version,
                "alias": CHAMPION,
                "seconds": seconds,
            },
        )
        run.log_metrics({"version": version, **{f"seconds/{k}": v for k, v in seconds.items()}})
        run.log_artifact(args.out)
    log.info(
        "logged base, sft, ppo, dpo and registered ppo and dpo in %.1f s: models:/%s@%s is version %d, "
        "models:/%s-dpo@%s version %d",
        seconds["total"],
        args.name,
        CHAMPION,
        version,
        args.name,
        CHAMPION,
        dpo_version,
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
    )  # one bar per logged file otherwise
    run_stage("register", main, add_arguments)
