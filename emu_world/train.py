"""Training entry point for every stage: ``python -m emu_world.train stage=<stage> ...``.

    python -m emu_world.train stage=tokenizer dataset.root=datasets
    python -m emu_world.train stage=tokenizer dataset.root=datasets experiment=tiny
    torchrun --nproc_per_node=2 -m emu_world.train stage=tokenizer dataset.root=datasets
    python -m emu_world.train stage=tokenizer ... resume=true
    python -m emu_world.train stage=dida init=checkpoints/world_model dataset.root=datasets

Composes ``configs/train.yaml`` and hands it to the stage's module, which owns its explicit
loop (``emu_world.train_<stage>.run(cfg)``); stage-independent pieces live in
:mod:`emu_world.training`. Checkpoints and ``metrics.jsonl`` go to ``run_dir``; the run ends
by printing a one-line JSON summary.
"""

from __future__ import annotations

import importlib
import json
import os

import hydra
from omegaconf import DictConfig

from emu_world.config import CONFIG_DIR

# stage name -> module with run(cfg) -> result with .summary(); later stages add policy
STAGES = {
    "tokenizer": "emu_world.train_tokenizer",
    "world_model": "emu_world.train_world_model",
    "dida": "emu_world.train_dida",
}


def run_stage(cfg: DictConfig):
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise ValueError(f"unknown stage={stage!r}; available stages: {sorted(STAGES)}")
    return importlib.import_module(STAGES[stage]).run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    result = run_stage(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per run, also under torchrun
        print(json.dumps(result.summary(), default=str), flush=True)


if __name__ == "__main__":
    main()
