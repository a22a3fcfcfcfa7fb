"""Stage `ppo`: RLHF. The SFT model is optimised with PPO against the reward model, with a KL penalty to
the SFT model; then the SFT and the PPO model answer the same held-out prompts and the rater grades both.

Inputs: models/sft (stage `sft`), models/reward (stage `reward`), the tokenizer, world.json, and
data/preferences (stage `preferences`). Prompts come from the world's rl pool and are graded by the rater
(gold); without a synthetic world (real corpus and preference data) they are the preference pairs'
prompts, and only the reward model's score and the KL are reported.
Outputs: models/ppo/{model.safetensors,config.json}, metrics/ppo.json, plots/ppo/iterations.csv,
reports/ppo/ (the two models' replies side by side). Resumes from checkpoints/ppo/last.ckpt.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import statistics
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import torch

from llmlab import checkpoints
from llmlab.chat import parse_reply, render, reply
from llmlab.errors import LlmlabError, MissingArtifactError
from llmlab.io import write_json, write_text
from llmlab.model import GPT, load_model, save_model
from llmlab.params import Params
from llmlab.ppo import (
    KLController,
    NonFiniteLoss,
    check_replicas_agree,
    make_sequences,
    ppo_update,
    reply_logprobs,
    reply_scores,
    rollout,
    rollout_metrics,
    update_metrics,
)
from llmlab.pretraining import adamw
from llmlab.rater import Rater
from llmlab.reward import RewardModel, load_reward_model
from llmlab.sft import REPLY_LENGTH_RANK, Epochs, chat_metrics
from llmlab.sft_data import prompt_pool
from llmlab.stage import run_stage
from llmlab.stats import mean_ci, paired_diff_ci, wilson_ci
from llmlab.tasks import Task
from llmlab.tokenizer import END_ID, load_tokenizer
from llmlab.tracking import StageRun, is_global_zero
from llmlab.world import World

log = logging.getLogger("llmlab.ppo")


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT model folder: the policy's start and the reference")
    p.add_argument("--reward", required=True, help="reward model folder (from the reward stage)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--world", required=True, help="world.json (from the corpus stage)")
    p.add_argument("--pairs", required=True, help="preference pairs folder: the prompts when there is no synthetic world")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (DVC persist)")
    p.add_argument("--out", required=True, help="folder for the PPO policy's weights and config")
    p.add_argument("--metrics", required=True, help="metrics JSON file")
    p.add_argument("--plots", required=True, help="folder for the per-iteration CSV")
    p.add_argument("--report", required=True, help="folder for the SFT and PPO replies")


def frozen(fabric: L.Fabric, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is only ever run forward: on the device, in the run's precision, no gradients."""
    model.requires_grad_(False)
    return fabric.to_device(fabric.strategy.precision.convert_module(model)).eval()


def main(args, params: Params) -> None:
    cfg = params.ppo
    tok = load_tokenizer(args.tokenizer)
    world = World.load(args.world)
    sft = load_model(args.model, stage="sft")
    reward_model = load_reward_model(args.reward, stage="reward")
    rater = Rater(world) if world.people else None
    if rater:
        pool: list = prompt_pool(world, "rl", cfg.n_prompts, params.seed, cfg.max_digits, dict(cfg.prompt_mix))
    else:
        log.info("no synthetic world: prompts from the preference pairs, and no gold rater")
        pool = pair_prompts(Path(args.pairs), "train")[: cfg.n_prompts]

    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
                      precision=cfg.precision, plugins=[checkpoints.AtomicCheckpointIO()])
    fabric.launch()
    W, rank = fabric.world_size, fabric.global_rank
    if cfg.rollout_batch_size % (W * cfg.minibatch_size):
        raise LlmlabError(
            f"ppo.rollout_batch_size ({cfg.rollout_batch_size}) must split into {W} processes × whole minibatches "
            f"of ppo.minibatch_size ({cfg.minibatch_size})"
        )
    fabric.seed_everything(params.seed, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)

    policy = GPT(sft.config)
    policy.load_state_dict(sft.state_dict())
    value = RewardModel(reward_model.backbone.config, offset=reward_model.offset)
    value.load_state_dict(reward_model.state_dict())
    betas = (cfg.beta1, cfg.beta2)
    policy_opt = adamw(policy, cfg.lr, cfg.weight_decay, betas, fabric.device.type)
    value_opt = adamw(value, cfg.lr, cfg.weight_decay, betas, fabric.device.type)
    policy, policy_opt = fabric.setup(policy, policy_opt)
    value, value_opt = fabric.setup(value, value_opt)
    ref, reward_model = frozen(fabric, sft), frozen(fabric, reward_model)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    fp = checkpoints.fingerprint(
        {"seed": params.seed, "ppo": cfg.model_dump()},
        [Path(args.model) / "model.safetensors", Path(args.reward) / "model.safetensors", Path(args.reward) / "config.json",
         Path(args.pairs) / "train.parquet", args.tokenizer, args.world],
    )
    resume = checkpoints.resume_path(args.checkpoints, fp, readonly=not is_global_zero())
    state = {"policy": policy, "value": value, "policy_opt": policy_opt, "value_opt": value_opt,
             "iteration": 0, "kl_coef": kl.value, "history": []}
    if resume is not None:
        fabric.load(resume, state, weights_only=True)
        kl.value = state["kl_coef"]
    history: list[dict[str, float]] = state["history"]
    B = cfg.rollout_batch_size
    stream = Epochs(pool, cfg.iterations * B, params.seed)  # prompt j of iteration i is stream[i·B + j]

    with StageRun("ppo", {"seed": params.seed, "ppo": cfg.model_dump()}) as run:
        for it in range(state["iteration"], cfg.iterations):
            tasks = [stream[it * B + j] for j in range(rank, B, W)]
            prompts = [render(tok, context_of(t), add_generation_prompt=True).ids for t in tasks]
            seed_it = params.seed * 1_000_003 + it * 1009 + rank  # the same draws after a resume
            sample_gen = torch.Generator(fabric.device).manual_seed(seed_it)
            shuffle_gen = torch.Generator().manual_seed(seed_it)
            batch = rollout(policy, ref, reward_model, value, prompts, cfg, kl.value, sample_gen, sampler=policy.module)
            try:
                stats = ppo_update(fabric, policy, value, policy_opt, value_opt, batch, cfg, shuffle_gen)
            except NonFiniteLoss as e:
                last, good = Path(args.checkpoints) / checkpoints.LAST, it // cfg.ckpt_every * cfg.ckpt_every
                kept = f"{last} (iteration {good}) is kept" if last.exists() and good else "no checkpoint was written before it"
                raise LlmlabError(f"the PPO loss became non-finite at iteration {it + 1} ({e}); nothing of it was saved, "
                                  f"and {kept}. Lower ppo.lr or raise ppo.kl_coef") from None  # fmt: skip
            metrics = {**rollout_metrics(batch, kl.value), **update_metrics(stats)}
            if rater:
                metrics |= gold_metrics(tok, rater, tasks, batch)
            metrics = mean_over_processes(fabric, metrics)
            metrics["val/num_eos_tokens"] *= W  # a total, like TRL's
            if metrics.get("gold/unknown_prompts"):
                metrics["gold/hallucination_rate"] = metrics["gold/hallucinations"] / metrics["gold/unknown_prompts"]
            metrics["episode"] = float((it + 1) * B)
            kl.update(metrics["objective/kl"], B)
            history.append({"iteration": it + 1, **metrics})
            run.log_metrics(metrics, step=it + 1)
            log.info(
                "iteration %d/%d · score %+.2f · kl %.2f · gold %s · clipfrac %.2f · %d/%d ended",
                it + 1, cfg.iterations, metrics["objective/scores"], metrics["objective/kl"],
                f"{metrics['gold/score']:+.2f}" if rater else "n/a", metrics["policy/clipfrac_avg"],
                metrics["val/num_eos_tokens"], B,
            )
            if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iterations:
                state.update(iteration=it + 1, kl_coef=kl.value)
                fabric.save(Path(args.checkpoints) / checkpoints.LAST, state)
        check_replicas_agree(fabric, {"policy": policy, "value": value})
        if W > 1:
            log.info("the %d processes' policy and value weights agree", W)
        if not fabric.is_global_zero:
            return

        trained = policy.module.eval()
        save_model(trained, args.out)
        if rater:
            eval_prompts: list = prompt_pool(world, "eval", cfg.eval_prompts, params.seed, cfg.max_digits)
        else:
            eval_prompts = pair_prompts(Path(args.pairs), "validation")[: cfg.eval_prompts]
        metrics, rows = evaluate(trained, ref, reward_model, tok, eval_prompts, rater, world, cfg, params.seed, fabric.device)
        metrics |= {"iterations": cfg.iterations, "episodes": cfg.iterations * B, "kl_coef_final": kl.value}
        last = history[-max(1, len(history) // 10) :]  # the last tenth of training
        for key, name in (("objective/kl", "kl"), ("objective/scores", "reward_score"), ("gold/score", "gold_score")):
            if key in last[0]:
                metrics[f"train/{name}_final"] = statistics.fmean(h[key] for h in last)
        write_json(args.metrics, metrics)
        write_text(Path(args.plots) / "iterations.csv", to_csv(history))
        report = Path(args.report)
        write_json(report / "replies.json", rows)
        write_text(report / "replies.md", replies_markdown(rows))
        run.log_metrics(metrics)
        for path in (args.metrics, args.plots, report, Path(args.out) / "config.json"):
            run.log_artifact(path)
        if rater:
            log.info(
                "gold %.2f → %.2f (gain %+.2f ± %.2f, n=%d) · hallucination %.0f%% → %.0f%% · KL to SFT %.2f",
                metrics["sft/gold_score_mean"], metrics["ppo/gold_score_mean"], metrics["gold_gain"], metrics["gold_gain_ci95"],
                metrics["n_prompts"], 100 * metrics.get("sft/hallucination_rate", 0), 100 * metrics.get("ppo/hallucination_rate", 0),
                metrics["kl_to_sft"],
            )
        log.info(
            "reward model score %.2f → %.2f (gain %+.2f ± %.2f, n=%d) · KL to SFT %.2f",
            metrics["sft/reward_score_mean"], metrics["ppo/reward_score_mean"], metrics["reward_gain"], metrics["reward_gain_ci95"],
            metrics["n_prompts"], metrics["kl_to_sft"],
        )


def context_of(prompt) -> list[dict]:
    """The conversation to answer: a Task's single user turn, or a preference pair's context."""
    return [{"role": "user", "content": prompt.prompt}] if isinstance(prompt, Task) else prompt


def pair_prompts(folder: Path, split: str) -> list[list[dict]]:
    """The distinct contexts (conversations before the reply) of the preference pairs of one split."""
    path = folder / f"{split}.parquet"
    if not path.exists():
        raise MissingArtifactError(path, "preferences")
    seen, out = set(), []
    for context in pq.read_table(path, columns=["context"]).column("context").to_pylist():
        if context not in seen:
            seen.add(context)
            out.append(json.loads(context))
    if not out:
        raise LlmlabError(f"{path}: no prompts; raise the number of preference pairs")
    return out


def mean_over_processes(fabric: L.Fabric, metrics: dict[str, float]) -> dict[str, float]:
    keys = list(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=fabric.device)
    return dict(zip(keys, fabric.all_reduce(values, reduce_op="mean").tolist(), strict=True))


def gold_metrics(tok, rater: Rater, tasks, batch) -> dict[str, float]:
    """The rater's score of the rollout's replies: logged next to the reward model's, never optimised."""
    lengths = batch.seqs.lengths.tolist()
    scores = []
    unknown = hallucinated = 0
    for task, row, n in zip(tasks, batch.seqs.response.tolist(), lengths, strict=True):
        r = parse_reply(tok, row[:n])
        s = rater.score(task, r.text, r.ended)
        scores.append(s.total)
        if task.kind == "unknown":
            unknown += 1
            hallucinated += s.hallucinated
    return {"gold/score": statistics.fmean(scores), "gold/unknown_prompts": unknown, "gold/hallucinations": hallucinated}


@torch.no_grad()
def evaluate(policy: GPT, ref: GPT, reward_model, tok, prompts: list, rater: Rater | None, world: World, cfg, seed: int,
             device) -> tuple[dict, list[dict]]:
    """SFT against PPO on held-out prompts: greedy replies scored by the reward model and (with a world)
    graded by the rater, each gain with its paired 95 % interval; and the KL of replies sampled as in training."""
    metrics: dict[str, float] = {"n_prompts": len(prompts)}
    if rater:  # short replies batched together (see sft.answer); the order of the prompts is the report's
        prompts = sorted(prompts, key=lambda t: REPLY_LENGTH_RANK[t.kind])
    contexts = [context_of(t) for t in prompts]
    ids = [render(tok, c, add_generation_prompt=True).ids for c in contexts]
    replies: dict[str, list] = {}
    gold: dict[str, list[float]] = {}
    proxy: dict[str, list[float]] = {}
    for name, model in (("sft", ref), ("ppo", policy)):
        replies[name] = reply(model, tok, contexts, cfg.eval_max_new_tokens)
        seqs = make_sequences(ids, [list(r.tokens) or [END_ID] for r in replies[name]]).to(device)
        proxy[name] = reply_scores(reward_model, seqs, cfg.missing_eos_penalty).tolist()
        metrics[f"{name}/reward_score_mean"] = statistics.fmean(proxy[name])
        if rater:
            scores = [rater.score(t, r.text, r.ended) for t, r in zip(prompts, replies[name], strict=True)]
            gold[name] = [sc.total for sc in scores]
            groups = {p.name: p.group for p in world.people}
            metrics |= {f"{name}/{k}": v for k, v in chat_metrics(prompts, replies[name], rater, groups).items() if k != "n_prompts"}
            unknown = [sc.hallucinated for t, sc in zip(prompts, scores, strict=True) if t.kind == "unknown"]
            if unknown:
                lo, hi = wilson_ci(sum(unknown), len(unknown))
                metrics |= {f"{name}/hallucination_ci_low": lo, f"{name}/hallucination_ci_high": hi}
    metrics["reward_gain"], metrics["reward_gain_ci95"] = paired_diff_ci(proxy["ppo"], proxy["sft"])
    if rater:
        metrics["gold_gain"], metrics["gold_gain_ci95"] = paired_diff_ci(gold["ppo"], gold["sft"])
    # KL(π ‖ π_ref) per reply, estimated on replies sampled from the policy as in training.
    gen = torch.Generator(device).manual_seed(seed)
    sampled = reply(policy, tok, contexts, cfg.max_new_tokens, temperature=cfg.temperature, generator=gen)
    kls = []
    for i in range(0, len(ids), 64):
        seqs = make_sequences(ids[i : i + 64], [list(r.tokens) or [END_ID] for r in sampled[i : i + 64]]).to(device)
        lp, _ = reply_logprobs(policy, seqs, cfg.temperature)
        lp_ref, _ = reply_logprobs(ref, seqs, cfg.temperature)
        kls += ((lp - lp_ref) * seqs.mask).sum(dim=1).tolist()
    metrics["kl_to_sft"], metrics["kl_to_sft_ci95"] = mean_ci(kls)
    rows = []
    for i, t in enumerate(prompts):
        row = {"kind": t.kind if rater else "prompt", "prompt": context_of(t)[-1]["content"], "sft": replies["sft"][i].text,
               "ppo": replies["ppo"][i].text, "reward_sft": proxy["sft"][i], "reward_ppo": proxy["ppo"][i]}
        if rater:
            row |= {"gold_sft": gold["sft"][i], "gold_ppo": gold["ppo"][i]}
        rows.append(row)
    return metrics, rows


def replies_markdown(rows: list[dict], per_kind: int = 6) -> str:
    lines = ["# SFT and PPO on the same held-out prompts (greedy replies)\n"]
    for kind in sorted({r["kind"] for r in rows}):
        lines.append(f"\n## {kind}\n")
        for r in [r for r in rows if r["kind"] == kind][:per_kind]:
            grade = {m: f"reward {r[f'reward_{m}']:+.2f}" + (f", gold {r[f'gold_{m}']:+.2f}" if "gold_sft" in r else "") for m in ("sft", "ppo")}
            lines.append(f"- `{r['prompt']}`\n  - SFT ({grade['sft']}): {r['sft']!r}\n  - PPO ({grade['ppo']}): {r['ppo']!r}")
    return "\n".join(lines) + "\n"


def to_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    fields = list(dict.fromkeys(k for row in history for k in row))  # every key, first-seen order
    writer = csv.DictWriter(out, fieldnames=fields, restval="", lineterminator="\n")  # a rate with no sample: empty
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage("ppo", main, add_arguments)
