"""What every training stage shares: the Lightning module of the next-token loss, the trainer and its
callbacks (checkpoints, throughput, curves, probes, the non-finite guard), the optimiser (AdamW, warm-up
then cosine decay), data loaders and the seeded order of fine-tuning items (`Epochs`).

Pretraining and SFT train `CausalLMModule`; the reward stage and PPO take the optimiser and the loop parts.
`model/transformer.py` stays framework-free: this module is the Lightning glue (logging, checkpoints, DDP).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from llmlab.device import uses_cuda
from llmlab.errors import LlmlabError
from llmlab.io import write_text
from llmlab.model.transformer import GPT, GPTConfig
from llmlab.params import PretrainConfig
from llmlab.tracking import is_global_zero
from llmlab.training.checkpoints import AtomicCheckpointIO, fingerprint, kept_checkpoint, resume_path
from llmlab.training.mfu import matmul_peak_flops


@dataclass(frozen=True)
class Budget:
    """How much training a params section asks for, in the units each consumer needs.

    >>> Budget.from_params(PretrainConfig(batch_size=8, grad_accum=2, max_steps=100), world_size=2)
    Budget(world_size=2, context_length=128, items_per_step=32, total_steps=100)
    """

    world_size: int  # processes: devices × nodes
    context_length: int
    items_per_step: int  # windows per optimizer step, all processes together
    total_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.items_per_step * self.context_length

    @property
    def n_items(self) -> int:
        """Windows in the whole run (TokenWindows' length)."""
        return self.total_steps * self.items_per_step

    @classmethod
    def from_params(cls, cfg: PretrainConfig, world_size: int) -> Budget:
        T = cfg.model.context_length
        items = items_per_step(cfg, world_size)
        total = cfg.max_steps or math.ceil(cfg.max_tokens / (items * T))
        return cls(world_size=world_size, context_length=T, items_per_step=items, total_steps=total)


def items_per_step(cfg, processes: int | None = None) -> int:
    """Items (windows, conversations, pairs) in one optimizer step, all processes together:
    batch_size · grad_accum · processes (default: `world_size(cfg)`)."""
    return cfg.batch_size * cfg.grad_accum * (world_size(cfg) if processes is None else processes)


def world_size(cfg) -> int:
    """Processes the Trainer will start: devices per node × nodes ('auto' devices: all visible GPUs, or 1).
    `cfg` is any training section (params.TrainLoop)."""
    if cfg.devices == "auto":
        return (torch.cuda.device_count() if uses_cuda(cfg.accelerator) else 1) * cfg.num_nodes
    return cfg.devices * cfg.num_nodes


def loader(
    dataset: Dataset, batch_size: int, trainer: L.Trainer, collate_fn=None
) -> torch.utils.data.DataLoader:
    """In order, each process taking every world_size-th item: with batch b per process, optimizer step k
    of a W-process run sees items [k·b·W, (k+1)·b·W), exactly those of a 1-process run with batch b·W."""
    sampler = None
    if trainer.world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=collate_fn
    )


def validation_batches(dataset: Dataset, cfg: PretrainConfig, trainer: L.Trainer) -> Dataset:
    """The first `cfg.val_batches` batches per process of a validation set: what each validation during
    training reads, the same items every time. A stage's final figures read the whole set."""
    return Subset(dataset, range(min(len(dataset), cfg.val_batches * cfg.batch_size * trainer.world_size)))


def lr_at(step: int, cfg: PretrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr: linear warm-up to 1, then cosine decay to min_lr_ratio at total_steps.

    >>> cfg = PretrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    >>> lr_at(4, cfg, 110), lr_at(10, cfg, 110), lr_at(110, cfg, 110)
    (0.5, 1.0, 0.1)
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
    fused: bool = True,
):
    """AdamW with decay on matrices only: norms' gains (1-d) are not pulled towards zero. `fused`: the one-op
    kernel, where the device has it (CUDA and, since torch 2.4, CPU); else the multi-tensor (foreach) one."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused and device_type in ("cuda", "cpu"))


def fused_adamw_clips(precision: str, grad_clip: float | None, trainer: str = "lightning") -> bool:
    """Whether Lightning lets a fused AdamW have its gradients clipped at this precision. A fused optimizer
    unscales fp16 gradients inside its step, so Lightning refuses to clip them first: the Trainer at both
    mixed precisions, even bf16's, which has no scaler (Lightning-AI/pytorch-lightning#21435), Fabric at
    16-mixed only. Where it refuses, the stages take the foreach AdamW (the same update, one kernel per op).

    >>> fused_adamw_clips("32-true", 1.0), fused_adamw_clips("bf16-mixed", 1.0), fused_adamw_clips("bf16-mixed", 0.0)
    (True, False, True)
    >>> fused_adamw_clips("bf16-mixed", 1.0, trainer="fabric"), fused_adamw_clips("16-mixed", 1.0, trainer="fabric")
    (True, False)
    """
    refused = ("16-mixed", "bf16-mixed") if trainer == "lightning" else ("16-mixed",)
    return not (grad_clip and precision in refused)


def adamw_with_schedule(model: torch.nn.Module, cfg, total_steps: int, device_type: str) -> dict:
    """What every training stage's `configure_optimizers` returns: AdamW, warm-up + cosine per step."""
    fused = fused_adamw_clips(cfg.precision, cfg.grad_clip)
    opt = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type, fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg, total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def resume_offset(resume, items_per_step: int) -> int:
    """The first training item of a run resumed from checkpoint `resume` (0 for a fresh run)."""
    if resume is None:
        return 0
    return int(torch.load(resume, map_location="cpu", weights_only=True)["global_step"]) * items_per_step


class CausalLMModule(L.LightningModule):
    """The transformer under Lightning: mean next-token cross-entropy over the targets that are not -100.

    Pretraining gives every target; SFT masks all but the assistant's tokens (sft.collate). Same module.
    A batch is (x, y) or, packed (sft.collate_packed), (x, y, positions, attn_mask).
    """

    def __init__(self, model_config: GPTConfig, cfg: PretrainConfig, total_steps: int):
        super().__init__()
        self.save_hyperparameters(
            {"model_config": asdict(model_config), "train": cfg.model_dump(), "total_steps": total_steps}
        )
        self.cfg, self.total_steps = cfg, total_steps
        self.model = GPT(model_config)
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model

    def training_step(self, batch, batch_idx):
        _, loss = self.forward_model(*batch)  # x (B, T), y (B, T)[, positions, attn_mask]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        _, loss = self.forward_model(*batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, self.cfg, self.total_steps, self.device.type)


def build_trainer(
    cfg: PretrainConfig, ckpt_dir, logger, callbacks: list[L.Callback], total_steps: int
) -> L.Trainer:
    """The Trainer of the pretrain stage (also used by benchmarks/, so that they measure the same thing).
    `logger` False: nothing is logged (the critique stage's second model)."""

    checkpointing = checkpoint_after_validation(
        cfg.val_every,
        dirpath=ckpt_dir,
        every_n_train_steps=cfg.ckpt_every,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
    return L.Trainer(
        max_steps=total_steps,
        max_epochs=1,  # one pass over TokenWindows is exactly the step budget
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.grad_clip or None,
        val_check_interval=cfg.val_every * cfg.grad_accum,  # counted in batches, not optimizer steps
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every,
        logger=logger,
        callbacks=[
            checkpointing,
            *([LearningRateMonitor(logging_interval="step")] if logger else []),  # it needs a logger
            RichProgressBar(refresh_rate=cfg.log_every),
            StopOnNonFiniteLoss(ckpt_dir, cfg.ckpt_every),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],
        deterministic=True,
        # Lightning's own DistributedSampler shuffles training data; TokenWindows items are random already,
        # and unshuffled shards keep a DDP step's global batch identical to a single process's.
        use_distributed_sampler=False,
        enable_model_summary=False,
        default_root_dir=ckpt_dir,
    )


def checkpoint_after_validation(val_every: int, **kwargs):
    """Lightning's ModelCheckpoint, except that at a step which also validates, the save waits for the end
    of that validation.

    Lightning saves at the end of the training batch and validates after it. A run killed during that
    validation resumed from a checkpoint that had the step done, and the step's validation point (the
    val-loss curve, the fact-recall probe) was never made: the kill test under `dvc repro` found the
    curves of a resumed run one point short. Deferred, the checkpoint holds the point, and a run killed
    during validation resumes from the step before and validates again.
    """

    class CheckpointAfterValidation(ModelCheckpoint):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step > 0 and step % self._every_n_train_steps == 0 and step % val_every == 0:
                self._defer_save_until_validation = True  # Lightning's own deferral: on_validation_end saves
                return
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    return CheckpointAfterValidation(**kwargs)


class StopOnNonFiniteLoss(L.Callback):
    """Stop at the first step whose loss is NaN or infinite, before its backward pass reaches the weights.

    Without it one NaN flows through the optimizer into every weight and training runs on to the end
    producing NaN. Raised before the backward pass (and before this step's checkpoint, which
    ModelCheckpoint, the last callback, would write), so the checkpoints on disk are all from good steps.
    """

    def __init__(self, ckpt_dir, ckpt_every: int):
        self.ckpt_dir, self.ckpt_every = Path(ckpt_dir), ckpt_every

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if torch.isfinite(loss).all():
            return
        step = trainer.global_step + 1
        kept = kept_checkpoint(self.ckpt_dir, step, self.ckpt_every)
        raise LlmlabError(
            f"the training loss became {loss.item()} at step {step}; training stopped before that step changed the "
            f"weights, and {kept}. Lower the learning rate or raise warmup_steps (a re-run with other params starts "
            "over; with the same params it resumes from that checkpoint)"
        )


class Throughput(L.Callback):
    """Tokens per second of training (validation time excluded) and model FLOPs utilisation.

    MFU = FLOPs per token × tokens/s ÷ peak FLOP/s, the peak measured on this machine (see mfu.py).
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, every: int):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.every = every
        self._peak_of: tuple | None = None  # (device type, dtype) the peak was measured for (for_run)
        self.train_time = 0.0
        self.steps = 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        now = time.perf_counter()
        self.train_time += now - self._t0
        self.steps += 1
        self._t0 = now
        if self.steps % self.every == 0:
            pl_module.log_dict(
                {"perf/tokens_per_s": self.tokens_per_second(), "perf/mfu": self.mfu()},
                on_step=True,
                on_epoch=False,
            )

    def on_validation_start(self, trainer, pl_module):
        if self._t0 is not None:
            self.train_time += time.perf_counter() - self._t0
            self._t0 = None

    def on_validation_end(self, trainer, pl_module):
        self._t0 = None

    @classmethod
    def for_run(cls, cfg: PretrainConfig, tokens_per_step: int, flops_per_token: float) -> Throughput:
        """Timed against the matmul peak measured on this machine for the run's device and precision."""
        device_type = "cuda" if uses_cuda(cfg.accelerator) else "cpu"
        dtype = torch.bfloat16 if "bf16" in cfg.precision else torch.float32
        meter = cls(tokens_per_step, flops_per_token, matmul_peak_flops(device_type, dtype), cfg.log_every)
        meter._peak_of = (device_type, dtype)
        return meter

    def speed(self) -> dict[str, float]:
        """Tokens/s, MFU, the peak and the training seconds. The peak is measured once more first: a
        neighbour busy at start-up would deflate it (and inflate MFU), so the better of the two counts."""
        if self._peak_of:
            self.peak = max(self.peak, matmul_peak_flops(*self._peak_of))
        return {
            "tokens_per_s": self.tokens_per_second(),
            "mfu": self.mfu(),
            "matmul_peak_gflops": self.peak / 1e9,
            "train_seconds": self.train_time,
        }

    def tokens_per_second(self) -> float:
        return self.steps * self.tokens_per_step / self.train_time if self.train_time > 0 else 0.0

    def mfu(self) -> float:
        return self.tokens_per_second() * self.flops_per_token / self.peak if self.peak > 0 else 0.0


class CurveRecorder(L.Callback):
    """Keeps (step, value) of the train and validation loss for `dvc plots` (CSV files)."""

    def __init__(self, every: int):
        self.every = every
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and step % self.every == 0:
            self.train.append((step, float(outputs["loss"])))

    def on_validation_epoch_end(self, trainer, pl_module):
        fitting = trainer.state.fn == "fit"  # not the extra trainer.validate() after training
        if fitting and "val/loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    # Saved in the checkpoint, so that a resumed run's curves start at step 0, not at the resume point.
    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.train = [tuple(r) for r in state["train"]]
        self.val = [tuple(r) for r in state["val"]]

    def write(self, folder, probes: Sequence[Probe] = (), declared: Sequence[str] = ()) -> None:
        """The loss curves, and each probe's curve as `<folder>/<probe name>.csv` (columns step, <name>).
        A `declared` curve (one dvc.yaml lists) with no probe, as without a synthetic world, gets its header
        only: an output DVC expects is never missing."""
        curves = [("train_loss", self.train, "loss"), ("val_loss", self.val, "loss")]
        curves += [(p.name, p.points, p.name) for p in probes]
        curves += [(name, [], name) for name in declared if name not in {p.name for p in probes}]
        for name, rows, column in curves:
            write_text(
                Path(folder) / f"{name}.csv", f"step,{column}\n" + "".join(f"{s},{v:.6f}\n" for s, v in rows)
            )


class Probe(L.Callback):
    """A measurement of the model at every validation: the curve of the model learning something.

    `measure(model) -> float` is called on rank 0 with the model in eval mode; the value is logged as
    `val/<name>` and kept for `dvc plots` (and in the checkpoint, like CurveRecorder). Pretraining has two:
    fact recall on a sample of people, and copy accuracy on context documents.
    """

    def __init__(self, name: str, measure: Callable[[GPT], float]):
        self.name, self.measure = name, measure
        self.points: list[tuple[int, float]] = []

    @property
    def state_key(self) -> str:  # two probes in one Trainer: each restores its own points
        return self._generate_state_key(name=self.name)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        value = self.measure(pl_module.model) if trainer.is_global_zero else 0.0
        pl_module.log(f"val/{self.name}", value, rank_zero_only=True)
        if trainer.is_global_zero:
            self.points.append((trainer.global_step, value))

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state["points"]]


class Epochs(Dataset):
    """`base` repeated in a fresh seeded order every epoch, `n_items` long, starting at item `first`.

    Item i is the same on every run (resuming at `first` continues exactly), and, like TokenWindows, the
    length stays `n_items` after a resume because Lightning keeps counting batches from the checkpoint.

    With `lengths` (one per item of `base`) and `batch` (the items of one optimizer step, all processes
    together), each epoch's order is grouped by length, as Hugging Face's `group_by_length` does: the
    shuffled items are cut into megabatches of `megabatch` batches, each megabatch is sorted by length
    and cut into batches, and the batches are shuffled. A batch then holds items of similar length, so
    little of it is padding, while which items meet in a batch, and the order of batches, stay random.
    The reward stage uses it: on the default preference pairs, padding fell from 56 % to 10 % of a batch.
    (SFT packs its batches instead, `collate_packed`: grouping made each batch one kind of task, and SFT
    learned worse, docs/benchmarks.md.)
    """

    def __init__(
        self,
        base: Dataset,
        n_items: int,
        seed: int,
        first: int = 0,
        lengths: Sequence[int] | None = None,
        batch: int = 1,
        megabatch: int = 50,
    ):
        if lengths is not None and len(lengths) != len(base):
            raise ValueError(f"{len(lengths)} lengths for {len(base)} items")
        self.base, self.n_items, self.seed, self.first = base, n_items, seed, first
        self.lengths, self.batch, self.megabatch = lengths, batch, megabatch
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.n_items

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.base), generator=g).tolist()
        if self.lengths is None or self.batch <= 1:
            return order
        # Batches start on step boundaries: the epoch's first `head` items finish the previous epoch's last
        # step, and its short last batch stays last.
        head = -epoch * len(self.base) % self.batch
        size = self.batch * self.megabatch
        batches = []
        for start in range(head, len(order), size):
            group = sorted(order[start : start + size], key=lambda i: self.lengths[i])
            batches += [group[j : j + self.batch] for j in range(0, len(group), self.batch)]
        tail = batches.pop() if batches and len(batches[-1]) < self.batch else []
        shuffled = [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
        return order[:head] + shuffled + tail

    def base_index(self, i: int) -> int:
        """The item of `base` that item i is."""
        epoch, k = divmod(self.first + i, len(self.base))
        if epoch not in self._orders:
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch][k]

    def __getitem__(self, i: int):
        return self.base[self.base_index(i)]


def resume_and_seed(ckpt_dir: str | Path, config: dict, inputs: list, seed: int) -> Path | None:
    """The checkpoint to resume from: `checkpoints.resume_path` for this config and these input files (none
    when either changed since it was written). Then every generator is seeded and deterministic algorithms
    are asked for. Lightning's DDP launcher re-runs the stage script in every other process once rank 0
    calls fit(): by then rank 0 has cleaned stale checkpoints, and the others only read."""
    fp = fingerprint(config, inputs)
    resume = resume_path(ckpt_dir, fp, readonly=not is_global_zero())
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return resume


def quiet_lightning_warnings() -> None:
    """Silence two Lightning warnings that are expected here: a resumed run continues mid-epoch by design
    (`TokenWindows` and `Epochs` resume by themselves; Lightning cannot know and warns), and a deprecation
    inside Lightning's own checkpoint code."""
    warnings.filterwarnings(
        "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
