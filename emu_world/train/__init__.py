"""Training: ``python -m emu_world.train stage=<stage> ...`` (:mod:`emu_world.train.__main__`).

One loop (:mod:`emu_world.train.loop`) runs every stage; each stage is one module that supplies its
data, model, step, evaluation, checkpoint state and export (:class:`~emu_world.train.loop.Stage`):
:mod:`~emu_world.train.tokenizer`, :mod:`~emu_world.train.world_model`, :mod:`~emu_world.train.dida`,
:mod:`~emu_world.train.policy`.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from emu_world.errors import UserError

# stage name -> "module:Stage class"
STAGES = {
    "tokenizer": "emu_world.train.tokenizer:TokenizerStage",
    "world_model": "emu_world.train.world_model:WorldModelStage",
    "dida": "emu_world.train.dida:DidaStage",
    "policy": "emu_world.train.policy:PolicyStage",
}


def run_stage(cfg: DictConfig):
    """Build the stage ``cfg.stage`` names from the composed ``configs/train.yaml`` and train it;
    returns its :class:`~emu_world.train.loop.TrainResult`."""
    from emu_world.train.loop import train

    stage = str(cfg.stage)
    if stage not in STAGES:
        raise UserError(f"unknown stage={stage!r}; available stages: {sorted(STAGES)}")
    module, cls = STAGES[stage].split(":")
    return train(getattr(importlib.import_module(module), cls)(cfg), cfg)
