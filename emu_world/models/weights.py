"""Weights and precision: the dtypes an export may store, bfloat16 autocast, and loading a state
dict only when it fits the model (names and shapes), with a message naming the mismatch.

Shared by the models (their ``save``/``load``/``decode``) and by training (checkpoints, exports).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.nn as nn

from emu_world.errors import UserError

EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def check_export_dtype(dtype: str, key: str, allowed: tuple[str, ...] = EXPORT_DTYPES) -> None:
    """Exports store weights in one of ``allowed`` (``key``: the setting, for the message)."""
    if dtype not in allowed:
        raise UserError(f"{key} must be one of {', '.join(allowed)}, got {dtype!r}")


def autocast(precision: str, device: str = "cpu") -> torch.autocast:
    """Forward passes in ``precision``: bfloat16 autocast (matmuls and attention in bfloat16; weights,
    gradients, optimizer state and the loss stay float32), or plain float32."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Refuse ``state`` unless it has exactly the model's keys and shapes (global shapes for sharded
    weights); returns the model's own state dict."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise UserError(
            f"weights in {where} do not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {bad[:5]}); the checkpoint was written for another config"
        )
    return own


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = check_state_fits(model, state, where)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing any previous ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
