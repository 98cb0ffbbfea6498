"""Stage-independent training pieces: distributed setup, LR schedule, checkpoints, logging.

Every stage (``emu_world.train_<stage>``) writes its own explicit loop from these parts:

- :func:`init_distributed` / :func:`teardown_distributed`: single process, or ``torchrun``
  (``RANK``/``WORLD_SIZE`` in the environment) with gloo on CPU or NCCL on GPUs
  (``train.device=cuda``: one GPU per rank, ``LOCAL_RANK``); each rank gets
  ``threads // world_size`` torch threads (at least one).
- :func:`place_model`: the model on the stage's device, and under ``train.parallel=fsdp`` sharded
  over the ranks with FSDP2 (``fully_shard`` per block, then the root); checkpoints and exports
  gather full state dicts (:func:`save_checkpoint` / :func:`load_checkpoint` take the sharded root),
  so a checkpoint written under FSDP resumes without it and the other way round.
- :func:`cosine_lr`: linear warm-up then cosine decay to ``min_lr_ratio * lr``.
- :func:`save_checkpoint` / :func:`load_checkpoint`: a folder of safetensors (model weights,
  optimizer moments, RNG state) plus JSON (step, optimizer hyper-parameters, stage state,
  config), written to a temporary folder and renamed into place, so an interruption leaves
  the previous checkpoint intact. Nothing is pickled.
- :func:`epoch_permutation`: the data order is a pure function of (seed, epoch), so resuming
  at a step restores the exact batches.
- :class:`MetricLogger`: one JSON line per record in ``metrics.jsonl`` plus a short stdout line.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"


# ----------------------------------------------------------------------------- configs shared by stages


@dataclass
class FrameDataConfig:
    """``dataset:`` section of ``configs/train.yaml``."""

    root: Any = "datasets"  # a dataset folder, a folder of datasets, or a list of them
    cameras: list[str] | None = None  # None: every camera of every dataset
    frames_per_dataset: int = 6000  # training frames taken from each (dataset, camera)
    eval_episodes: int = 2  # the last N episodes of each dataset are held out
    eval_frames: int = 256  # held-out frames per (dataset, camera) used by `evaluate`

    def __post_init__(self) -> None:
        if self.frames_per_dataset < 1 or self.eval_episodes < 1 or self.eval_frames < 1:
            raise ValueError("dataset.frames_per_dataset, eval_episodes and eval_frames must be positive")

    @property
    def roots(self) -> list[Path]:
        items = self.root if isinstance(self.root, (list, tuple)) else [self.root]
        if not items:
            raise ValueError("dataset.root is empty; give a dataset folder or a folder of datasets")
        return [Path(str(r)) for r in items]


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
            raise ValueError(f"train.device must be cpu or cuda, got {self.device!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"train.precision must be float32 or bfloat16, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"train.steps and train.batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.threads < 1:
            raise ValueError(f"train.threads must be >= 1, got {self.threads}")

    def autocast(self) -> torch.autocast:
        """The training forward passes' context (:func:`autocast` in ``precision`` on ``device``)."""
        return autocast(self.precision, self.device)

    def stop_requested(self, step: int, start_step: int) -> bool:
        """``stop_after`` steps ran in this process before the end: checkpoint and return early."""
        return self.stop_after is not None and step - start_step >= self.stop_after and step < self.steps


def resolve_roots(roots: list[Path]) -> list[Path]:
    """Expand folders of datasets into dataset folders (those holding ``meta/info.json``)."""
    out: list[Path] = []
    for root in roots:
        if (root / "meta" / "info.json").is_file():
            out.append(root)
            continue
        found = sorted(p.parent.parent for p in root.glob("*/meta/info.json"))
        if not found:
            raise FileNotFoundError(
                f"dataset.root {root} is neither a LeRobot dataset (no meta/info.json) nor a folder of datasets. "
                "Record one with `python -m emu_world.record env=<task> dataset.root=datasets/<task>`."
            )
        out.extend(found)
    return out



EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def check_export_dtype(dtype: str, key: str, allowed: tuple[str, ...] = EXPORT_DTYPES) -> None:
    """Exports store weights in one of ``allowed`` (``key``: the setting, for the message)."""
    if dtype not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {dtype!r}")


def autocast(precision: str, device: str = "cpu") -> torch.autocast:
    """Forward passes in ``precision``: bfloat16 autocast (matmuls and attention in bfloat16; weights,
    gradients, optimizer state and the loss stay float32), or plain float32."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(threads: int = 2, device: str = "cpu") -> DistInfo:
    """Join the ``torchrun`` process group if launched by it (gloo on CPU; NCCL with ``device="cuda"``,
    each rank on the GPU ``LOCAL_RANK``); set torch threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but this torch sees no GPU (torch.cuda.is_available() is False); "
                               "use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"torchrun rank {rank} wants GPU {local_rank} but {torch.cuda.device_count()} are "
                               "visible; lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    info = DistInfo(rank, world, local_rank, where)
    torch.set_num_threads(max(1, int(threads) // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return info


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _collective(t: torch.Tensor, info: DistInfo, op) -> torch.Tensor:
    """Run ``op`` on ``t`` in place on the backend's device (NCCL needs GPU tensors; gloo takes CPU ones)."""
    if not info.enabled:
        return t
    x = t.to(info.device)
    op(x)
    if x is not t:
        t.copy_(x)
    return t


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    _collective(t, info, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))
    if info.enabled:
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _collective(t, info, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))


def broadcast_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _collective(t, info, lambda x: dist.broadcast(x, src=0))


def place_model(model: torch.nn.Module, blocks: list[torch.nn.Module], loop: LoopConfig, info: DistInfo,
                methods: tuple[str, ...] = ()) -> torch.nn.Module | None:
    """Move ``model`` to the rank's device; under ``train.parallel=fsdp`` with several ranks shard it with
    FSDP2: each of ``blocks`` (e.g. the transformer layers) is its own all-gather unit, the root holds
    the rest (embeddings, tied head, norms); ``methods`` are entry points besides ``forward`` that
    gather the root's weights too (e.g. ``logits``). Returns the sharded root (pass it to the checkpoint
    and export helpers), or None when the weights are replicated (gradients: :func:`average_gradients`)."""
    model.to(info.device)
    if loop.parallel != "fsdp" or not info.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in methods:
        register_fsdp_forward_method(model, method)
    return model


def average_gradients(model: torch.nn.Module, info: DistInfo, sharded: bool = False) -> None:
    """Average gradients over ranks (one flat all-reduce): plain data parallelism without DDP hooks,
    which keeps the training step identical in one process and under torchrun. ``sharded``: FSDP
    already reduce-scattered (averaged) them in the backward pass; nothing to do."""
    if not info.enabled or sharded:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


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
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training items; lower train.batch_size")
    epoch, k = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[k * batch_size: (k + 1) * batch_size]


# ----------------------------------------------------------------------------- checkpoints


def optimizer_tensors(sd: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (``torch.optim`` form) into safetensors-ready tensors and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The ``torch.optim`` state dict :func:`optimizer_tensors` split (inverse)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        pid, key = name[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


@functools.cache
def _full_options():
    """Whole (unsharded) tensors, gathered to rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _prefix(root: torch.nn.Module, module: torch.nn.Module) -> str:
    name = next(n for n, m in root.named_modules() if m is module)
    return name + "." if name else ""


def _param_fqns(root: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its numbering (``torch.optim`` state dict order); a
    shared parameter (a tied head) goes by its first name, as in the distributed state dict API."""
    names = {id(p): n for n, p in root.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def gather_states(root: torch.nn.Module, models: dict[str, torch.nn.Module],
                  optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Full (unsharded, CPU) state dicts of the FSDP-sharded ``root``'s submodules ``models`` and of
    ``optimizers`` in ``torch.optim`` form (parameter numbers, as an unsharded optimizer writes them).
    A collective: every rank calls it; rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    full = get_model_state_dict(root, options=_full_options())
    model_states = {}
    for name, module in models.items():
        prefix = _prefix(root, module)
        model_states[name] = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    optim_states = {}
    for name, opt in optimizers.items():
        osd = get_optimizer_state_dict(root, opt, options=_full_options())
        if not osd:  # cpu_offload gathers to rank 0 only
            optim_states[name] = {}
            continue
        number = {fqn: i for i, fqn in enumerate(_param_fqns(root, opt))}
        optim_states[name] = {
            "state": {number[fqn]: st for fqn, st in osd["state"].items()},
            "param_groups": [{**g, "params": [number[p] for p in g["params"]]} for g in osd["param_groups"]],
        }
    return model_states, optim_states


def scatter_states(root: torch.nn.Module, models: dict[str, torch.nn.Module], model_states: dict[str, dict],
                   optimizers: dict[str, torch.optim.Optimizer], optim_states: dict[str, dict]) -> None:
    """Load full state dicts (as :func:`gather_states` returns them; every rank holds them) into the
    FSDP-sharded ``root``: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    full = {_prefix(root, module) + k: v for name, module in models.items() for k, v in model_states[name].items()}
    set_model_state_dict(root, full, options=_full_options())
    for name, opt in optimizers.items():
        fqns = _param_fqns(root, opt)
        plain = optim_states[name]
        set_optimizer_state_dict(root, opt, {
            "state": {fqns[int(i)]: st for i, st in plain["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in plain["param_groups"]],
        }, options=_full_options())


def save_checkpoint(run_dir: Path, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    step: int, state: dict[str, Any], config: dict[str, Any],
                    extra_tensors: dict[str, torch.Tensor] | None = None, sharded: torch.nn.Module | None = None,
                    write: bool = True) -> Path | None:
    """Write ``run_dir/checkpoint/`` atomically: ``<name>.safetensors`` per model, ``optim.safetensors``
    (optimizer moments, RNG state, ``extra_tensors``) and ``state.json``.

    ``sharded``: the FSDP root holding ``models`` (:func:`place_model`); every rank must call then (the
    full states are gathered) and only the one with ``write`` writes. The files are the same as an
    unsharded run's."""
    if sharded is not None:
        model_states, optim_states = gather_states(sharded, models, optimizers)
    else:
        model_states = {name: model.state_dict() for name, model in models.items()} if write else {}
        optim_states = {name: opt.state_dict() for name, opt in optimizers.items()} if write else {}
    if not write:
        return None
    final = Path(run_dir) / CHECKPOINT_DIR
    tmp = Path(run_dir) / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for name, sd in model_states.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    optim_meta: dict[str, Any] = {}
    for name, sd in optim_states.items():
        t, m = optimizer_tensors(sd, f"optim.{name}")
        tensors.update(t)
        optim_meta[name] = m
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous()
    save_file(tensors, str(tmp / "optim.safetensors"))
    meta = {"step": int(step), "state": state, "optimizers": optim_meta, "config": config,
            "models": sorted(models), "saved_at": time.time()}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    old = Path(run_dir) / f".{CHECKPOINT_DIR}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)  # a crash right here leaves .checkpoint.old-*: find_checkpoint uses it
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoint`` or, after a crash between two renames, the newest ``.checkpoint.old-*``."""
    final = Path(run_dir) / CHECKPOINT_DIR
    if (final / "state.json").is_file():
        return final
    olds = sorted(Path(run_dir).glob(f".{CHECKPOINT_DIR}.old-*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if (p / "state.json").is_file()]
    return olds[-1] if olds else None


def checkpoint_to_resume(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run; refuses to silently reuse or
    ignore a run dir (an existing checkpoint needs resume=true or overwrite=true)."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is not None and not resume and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint (step {read_checkpoint_meta(ckpt)['step']}). Pass resume=true "
            "to continue it, overwrite=true to start over there, or choose another run_dir=..."
        )
    if not resume:
        return None
    if ckpt is None:
        raise FileNotFoundError(f"resume=true but {run_dir} holds no checkpoint; drop resume=true to start a new run")
    return ckpt


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


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]
    config: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor]


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(path: Path, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    sharded: torch.nn.Module | None = None) -> LoadedCheckpoint:
    """Restore models, optimizers and the torch RNG from a folder written by :func:`save_checkpoint`.
    ``sharded``: the FSDP root holding ``models``; every rank reads the files and keeps its shards."""
    from emu_world.tokenizer import check_state_fits, load_state_checked

    path = Path(path)
    meta = read_checkpoint_meta(path)
    model_states = {}
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise ValueError(f"checkpoint {path} has no {file.name}; it was written by a run with other models "
                             f"({meta.get('models')}). Start a fresh run_dir.")
        model_states[name] = load_file(str(file))
        if sharded is None:
            load_state_checked(model, model_states[name], str(file))
        else:
            check_state_fits(model, model_states[name], str(file))
    tensors = load_file(str(path / "optim.safetensors"))
    optim_states = {}
    for name, opt in optimizers.items():
        if name not in meta["optimizers"]:
            raise ValueError(f"checkpoint {path} has no optimizer {name!r} (has {sorted(meta['optimizers'])}); "
                             "it was written with other training settings. Start a fresh run_dir.")
        optim_states[name] = optimizer_state(tensors, meta["optimizers"][name], f"optim.{name}")
        if sharded is None:
            opt.load_state_dict(optim_states[name])
    if sharded is not None:
        scatter_states(sharded, models, model_states, optimizers, optim_states)
    torch.set_rng_state(tensors["rng.torch"])
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return LoadedCheckpoint(path, int(meta["step"]), meta["state"], meta["config"], extra)


# ----------------------------------------------------------------------------- logging and provenance


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


def code_version() -> str:
    """``git describe``-style version of the repository: short hash, plus ``-dirty`` with local edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(module: str) -> str:
    launcher = "torchrun --nproc_per_node=" + os.environ["WORLD_SIZE"] + " -m " if "WORLD_SIZE" in os.environ \
        else "python -m "
    return launcher + " ".join([module, *sys.argv[1:]])
