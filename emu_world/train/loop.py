"""The one training loop every stage runs (``python -m emu_world.train stage=<stage>``).

A stage (:class:`Stage`: tokenizer, world_model, dida, policy) supplies its data, models and
optimizers, one optimisation step, its held-out evaluation, its checkpoint state and its export;
:func:`train` owns everything else, identically for every stage:

- the distributed setup (:mod:`emu_world.train.distributed`: one process, or ``torchrun`` ranks
  with gloo on CPU / NCCL on GPUs, replicated or FSDP2-sharded weights);
- the run directory: a fresh run, or ``resume=true`` from its checkpoint (the stage refuses a
  checkpoint it cannot continue; other differing settings are named in a warning);
  ``overwrite=true`` to start over;
- the schedule (:func:`cosine_lr`: linear warm-up, cosine decay to ``min_lr_ratio * lr``, set on
  every optimizer), logging (:class:`MetricLogger`: ``metrics.jsonl`` plus a short stdout line
  every ``train.log_every`` steps), evaluation every ``train.eval_every`` steps and at the end,
  atomic checkpoints every ``train.save_every`` steps and at the end
  (:mod:`emu_world.train.checkpoint`: weights, optimizer moments, RNG state, the stage's state), and
  ``train.stop_after`` (checkpoint and return early; ``resume=true`` continues exactly);
- the result (:class:`TrainResult`: the CLI prints its one-line JSON summary).

Exact resume: the data order is a pure function of (seed, step) (:func:`batch_indices`), the RNG
state is checkpointed, and a resumed run drops the log records written after its checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from emu_world.errors import UserError
from emu_world.models.weights import autocast
from emu_world.train.checkpoint import (
    LoadedCheckpoint,
    checkpoint_to_resume,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from emu_world.train.distributed import DistInfo, init_distributed, teardown_distributed

# settings that may change between a checkpoint and its resumed run without a warning
RESUME_IGNORED = {"resume", "overwrite", "train.stop_after", "train.log_every", "train.eval_every",
                  "train.save_every", "export.dir", "world_model.export_dir", "dida.export_dir", "policy_data.export_dir",
                  "world_model.export_dtype", "dida.export_dtype", "world_model.eval_batches", "dida.eval_batches",
                  "policy_data.eval_batches"}


@dataclass
class LoopConfig:
    """``train:`` section: stage-independent loop settings."""

    steps: int = 3000
    batch_size: int = 32  # global batch (split over torchrun ranks)
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    threads: int = 2  # torch threads in total (divided among ranks)
    log_every: int = 25
    eval_every: int = 500
    save_every: int = 200
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this process
    precision: str = "float32"  # float32 | bfloat16: autocast of the training forward passes
    device: str = "cpu"  # cpu | cuda (under torchrun: the GPU LOCAL_RANK, NCCL)
    parallel: str = "ddp"  # ddp: replicated weights, averaged gradients | fsdp: FSDP2 sharded weights and state

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"train.device must be cpu or cuda, got {self.device!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise UserError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise UserError(f"train.precision must be float32 or bfloat16, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"train.steps and train.batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.threads < 1:
            raise UserError(f"train.threads must be >= 1, got {self.threads}")
        if self.log_every < 1 or self.save_every < 1 or self.eval_every < 0:
            raise UserError(f"train.log_every and train.save_every must be >= 1 and train.eval_every >= 0 (0: only at "
                            f"the end), got {self.log_every}, {self.save_every} and {self.eval_every}")

    def autocast(self) -> torch.autocast:
        """The training forward passes' context (:func:`autocast` in ``precision`` on ``device``)."""
        return autocast(self.precision, self.device)

    def stop_requested(self, step: int, start_step: int) -> bool:
        """``stop_after`` steps ran in this process before the end: checkpoint and return early."""
        return self.stop_after is not None and step - start_step >= self.stop_after and step < self.steps


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine down to ``min_lr_ratio * base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` training items in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Indices of the global batch at ``step``: consecutive slices of per-epoch permutations
    (a batch never straddles two epochs; the tail of each epoch is dropped)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise UserError(f"batch_size {batch_size} exceeds the {n} training items; lower train.batch_size")
    epoch, k = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[k * batch_size: (k + 1) * batch_size]


@dataclass
class TrainResult:
    """What a training stage returns; ``summary()`` is the one-line JSON the CLI prints."""

    stage: str
    run_dir: Path
    step: int
    history: list[dict[str, float]]  # one record per step run in this process: step, lr, losses
    final_metrics: dict[str, Any] | None  # held-out evaluation at the end (None when stopped early)
    export_dir: Path | None
    train_seconds: float

    def summary(self) -> dict[str, Any]:
        return {"stage": self.stage, "run_dir": str(self.run_dir), "step": self.step,
                "train_seconds": round(self.train_seconds, 1),
                "export_dir": str(self.export_dir) if self.export_dir else None, **(self.final_metrics or {})}


class MetricLogger:
    """Appends JSON records to ``run_dir/metrics.jsonl`` (main rank only) and prints a short line."""

    def __init__(self, run_dir: Path, enabled: bool = True, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and truncate_after_step is not None and self.path.exists():
            # a resumed run drops records written after its checkpoint (they will be redone)
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
            print(" ".join(parts), flush=True)


def config_diffs(saved: dict[str, Any], current: dict[str, Any], ignored: set[str] = RESUME_IGNORED) -> list[str]:
    """Settings that differ between a checkpoint's config and this run's (ignoring loop bookkeeping)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b and prefix not in ignored:
            diffs.append(f"{prefix}: checkpoint {b!r} vs now {a!r}")

    walk(current, saved, "")
    return diffs


# ----------------------------------------------------------------------------- the stage contract


class Stage:
    """What a training stage hands the loop. Subclasses set ``name``, ``loop`` and ``resolved`` in
    their constructor (config parsing, no process group yet) and implement the methods below; the
    loop calls them in this order: :meth:`prepare`, :meth:`check_resume` (resuming only),
    :meth:`build`, :meth:`restore` (resuming only), :meth:`begin` (fresh runs only), then
    :meth:`train_step` / :meth:`evaluate` / :meth:`checkpoint_state` while training, and
    :meth:`export` at the end."""

    name: str
    loop: LoopConfig
    resolved: dict[str, Any]  # the composed config, as checkpoints and manifests record it
    models: dict[str, nn.Module]  # checkpointed modules by file name
    optimizers: dict[str, torch.optim.Optimizer]  # by name; the loop sets their learning rate
    sharded: nn.Module | None = None  # the FSDP2 root holding ``models`` (None: replicated or one process)
    info: DistInfo
    log: Callable[..., None] = print

    def prepare(self, info: DistInfo) -> None:
        """Checks that need the ranks, and what :meth:`check_resume` compares (e.g. a tokenizer). By default:
        the global batch splits evenly over the ranks."""
        if self.loop.batch_size % info.world_size:
            raise UserError(f"train.batch_size={self.loop.batch_size} must be divisible by the {info.world_size} "
                            "torchrun ranks")

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        """Refuse the checkpoint at ``path`` if this run cannot continue it (``meta``: its ``state.json``)."""

    def build(self, resuming: bool) -> None:
        """Data, models, optimizers (and ``sharded``); a fresh run initialises its weights here."""
        raise NotImplementedError

    def restore(self, loaded: LoadedCheckpoint) -> None:
        """Stage state beyond weights and optimizers (``loaded.state``, ``loaded.extra_tensors``)."""

    def begin(self) -> dict[str, Any] | None:
        """A fresh run's evaluation before the first step (logged at step 0), or None; on the ranks that
        evaluate (see :meth:`evaluate`)."""
        return None

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (0-based ``step``; the learning rate is set); returns its logs."""
        raise NotImplementedError

    def log_extras(self) -> dict[str, Any]:
        """Values added to the records logged every ``train.log_every`` steps."""
        return {}

    def evaluate(self) -> dict[str, Any] | None:
        """Held-out metrics (None: nothing held out). Runs on the main rank only, except under FSDP
        (``sharded`` set) where every rank runs it: no collective here unless the stage is sharded."""
        return None

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON state saved with every checkpoint (beside ``train_seconds``)."""
        return {}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved with every checkpoint (restored as ``loaded.extra_tensors``)."""
        return {}

    def export(self, final: dict[str, Any] | None, train_seconds: float) -> tuple[Path | None, dict[str, Any] | None]:
        """Write the stage's product (every rank calls it; collectives allowed; the main rank writes);
        returns the export folder and the metrics for the summary."""
        raise NotImplementedError


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config with interpolations resolved, as checkpoints and manifests record it."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return resolved


# ----------------------------------------------------------------------------- the loop


def train(stage: Stage, cfg: DictConfig) -> TrainResult:
    """Run ``stage`` as the composed config says (``run_dir``, ``resume``, ``overwrite``, ``train.*``)."""
    info = init_distributed(stage.loop.threads, stage.loop.device)
    try:
        stage.info = info
        stage.log = print if info.is_main else (lambda *a, **k: None)
        return _train(stage, Path(cfg.run_dir), bool(cfg.resume), bool(cfg.overwrite))
    finally:
        teardown_distributed()


def _open_run(stage: Stage, run_dir: Path, resume: bool, overwrite: bool) -> tuple[int, float, bool]:
    """Prepare and build the stage, restoring the checkpoint to resume; returns (step, train_seconds,
    resumed)."""
    stage.prepare(stage.info)
    ckpt = checkpoint_to_resume(run_dir, resume, overwrite)
    if ckpt is not None:
        meta = read_checkpoint_meta(ckpt)
        stage.check_resume(meta, ckpt)
        diffs = config_diffs(meta["config"], stage.resolved)
        if diffs:
            stage.log("warning: resuming with settings that differ from the checkpoint (the loss curve will "
                      "differ): " + "; ".join(diffs))
    stage.build(resuming=ckpt is not None)
    if ckpt is None:
        return 0, 0.0, False
    loaded = load_checkpoint(ckpt, stage.models, stage.optimizers, stage.sharded)
    stage.restore(loaded)
    stage.log(f"resumed from {ckpt} at step {loaded.step}")
    return loaded.step, float(loaded.state.get("train_seconds", 0.0)), True


def _train(stage: Stage, run_dir: Path, resume: bool, overwrite: bool) -> TrainResult:
    loop, info = stage.loop, stage.info
    step, train_seconds, resumed = _open_run(stage, run_dir, resume, overwrite)
    logger = MetricLogger(run_dir, info.is_main, truncate_after_step=step if resumed else None)
    if info.is_main and not resumed:
        logger.path.unlink(missing_ok=True)
    evaluating = info.is_main or stage.sharded is not None  # sharded forwards need every rank
    if not resumed and evaluating and (before := stage.begin()) is not None:
        logger.log({"step": 0, "eval": before})

    def save() -> None:
        save_checkpoint(run_dir, stage.models, stage.optimizers, step,
                        {"train_seconds": train_seconds, **stage.checkpoint_state()}, stage.resolved,
                        extra_tensors=stage.checkpoint_tensors(), sharded=stage.sharded, write=info.is_main)

    history: list[dict[str, Any]] = []
    start_step, t_last, last_logged = step, time.perf_counter(), step
    while step < loop.steps:
        t0 = time.perf_counter()
        lr = cosine_lr(step, loop.steps, loop.lr, loop.warmup_steps, loop.min_lr_ratio)
        for opt in stage.optimizers.values():
            set_lr(opt, lr)
        record = {"step": step + 1, "lr": lr, **stage.train_step(step)}
        step += 1
        train_seconds += time.perf_counter() - t0
        history.append(record)
        if step % loop.log_every == 0 or step == loop.steps:
            record.update(stage.log_extras())
            record["sec_per_step"] = (time.perf_counter() - t_last) / (step - last_logged)
            record["train_seconds"] = train_seconds
            t_last, last_logged = time.perf_counter(), step
            logger.log({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
        if loop.eval_every > 0 and step % loop.eval_every == 0 and step < loop.steps and evaluating:
            if (metrics := stage.evaluate()) is not None:
                logger.log({"step": step, "eval": metrics})
        stopping = loop.stop_requested(step, start_step)
        if step % loop.save_every == 0 or step == loop.steps or stopping:
            save()
        if stopping:
            stage.log(f"stopping after {loop.stop_after} steps at step {step} (train.stop_after); "
                      "resume=true continues")
            return TrainResult(stage.name, run_dir, step, history, None, None, train_seconds)

    final = (stage.evaluate() or {}) if evaluating else None
    if info.is_main:
        logger.log({"step": step, "eval": final, "train_seconds": round(train_seconds, 1)})
    export_dir, final = stage.export(final, train_seconds)
    return TrainResult(stage.name, run_dir, step, history, final, export_dir, train_seconds)
