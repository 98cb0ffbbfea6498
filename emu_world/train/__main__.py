"""Training entry point for every stage: ``python -m emu_world.train stage=<stage> ...``.

    python -m emu_world.train stage=tokenizer dataset.root=datasets
    python -m emu_world.train stage=tokenizer dataset.root=datasets experiment=tiny
    torchrun --nproc_per_node=2 -m emu_world.train stage=tokenizer dataset.root=datasets
    python -m emu_world.train stage=tokenizer ... resume=true
    python -m emu_world.train stage=world_model dataset.root=datasets [init=<export to fine-tune>]
    python -m emu_world.train stage=dida init=checkpoints/world_model dataset.root=datasets

Composes ``configs/train.yaml`` and trains the stage it names (:func:`emu_world.train.run_stage`).
Checkpoints and ``metrics.jsonl`` go to ``run_dir``; the run ends by printing a one-line JSON
summary (on rank 0 under torchrun).
"""

from __future__ import annotations

import json
import os

import hydra
from omegaconf import DictConfig

from emu_world.config import CONFIG_DIR
from emu_world.errors import reports_user_errors
from emu_world.train import run_stage


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    result = run_stage(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per run, also under torchrun
        print(json.dumps(result.summary(), default=str), flush=True)


if __name__ == "__main__":
    main()
