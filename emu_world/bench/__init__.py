"""Benchmarks: ``python -m emu_world.bench <name> [hydra overrides]`` (:mod:`emu_world.bench.__main__`).

One leaf module per benchmark, each composing ``configs/bench/<name>.yaml``, printing a table and
ending with one JSON line; speed targets live here, never in unit tests. Nothing imports a
benchmark module: :func:`run_benchmark` loads the one named.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# name -> "module:function(cfg) -> summary", with a one-line description for --help
BENCHMARKS = {
    "tokenizer": ("emu_world.bench.tokenizer:bench_tokenizer",
                  "vision tokenizer: reconstruction quality, code usage and stability, encode/decode speed"),
    "world_model": ("emu_world.bench.world_model:bench_world_model",
                    "action-conditioned frame prediction against the simulator, training throughput"),
    "dida": ("emu_world.bench.dida:bench_dida",
             "DiDA K-step parallel decoding against token-by-token AR: speed and quality"),
    "planner": ("emu_world.bench.planner:bench_planner",
                "the planner along expert trajectories: subtask text accuracy, imagined keyframes vs the true ones"),
    "explore": ("emu_world.bench.explore:bench_explore",
                "playable exploration: interactive frames/s, PSNR vs the simulator, controllability (delta-PSNR)"),
}


def run_benchmark(name: str, cfg: DictConfig) -> dict[str, Any]:
    """Run the benchmark ``name`` on its composed config; write its summary (``output=`` or the run dir)."""
    module, function = BENCHMARKS[name][0].split(":")
    summary = getattr(importlib.import_module(module), function)(cfg)
    if cfg.get("output"):
        Path(str(cfg.output)).parent.mkdir(parents=True, exist_ok=True)
        Path(str(cfg.output)).write_text(json.dumps(summary, indent=2) + "\n")
    else:
        try:
            out = Path(HydraConfig.get().runtime.output_dir) / "summary.json"
            out.write_text(json.dumps(summary, indent=2) + "\n")
        except ValueError:  # not under @hydra.main
            pass
    return summary
