"""Training checkpoints: a folder of safetensors (model weights, optimizer moments, RNG state) plus
JSON (step, optimizer hyper-parameters, stage state, config), written to a temporary folder and
renamed into place, so an interruption leaves the previous checkpoint intact. Nothing is pickled.
Under FSDP the full (unsharded) states are gathered to rank 0 and scattered back on load, so the
files are the same as an unsharded run's.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from emu_world.errors import ExistingOutputError, MissingInputError, UserError
from emu_world.models.weights import check_state_fits, load_state_checked

CHECKPOINT_DIR = "checkpoint"


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
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

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
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

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
        raise ExistingOutputError(
            f"{run_dir} already holds a checkpoint (step {read_checkpoint_meta(ckpt)['step']}). Pass resume=true "
            "to continue it, overwrite=true to start over there, or choose another run_dir=..."
        )
    if not resume:
        return None
    if ckpt is None:
        raise MissingInputError(f"resume=true but {run_dir} holds no checkpoint; drop resume=true to start a new run")
    return ckpt


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
    path = Path(path)
    meta = read_checkpoint_meta(path)
    model_states = {}
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise UserError(f"checkpoint {path} has no {file.name}; it was written by a run with other models "
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
            raise UserError(f"checkpoint {path} has no optimizer {name!r} (has {sorted(meta['optimizers'])}); "
                             "it was written with other training settings. Start a fresh run_dir.")
        optim_states[name] = optimizer_state(tensors, meta["optimizers"][name], f"optim.{name}")
        if sharded is None:
            opt.load_state_dict(optim_states[name])
    if sharded is not None:
        scatter_states(sharded, models, model_states, optimizers, optim_states)
    torch.set_rng_state(tensors["rng.torch"])
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return LoadedCheckpoint(path, int(meta["step"]), meta["state"], meta["config"], extra)
