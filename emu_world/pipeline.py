"""From nothing to an agent: ``python -m emu_world.pipeline env=aloha_fold``.

    python -m emu_world.pipeline env=aloha_fold                       # reuses the shipped tokenizer
    python -m emu_world.pipeline env=aloha_fold from_scratch=true     # trains the tokenizer too
    python -m emu_world.pipeline env=aloha_fold 'policy.train=[train.steps=3000]'   # a stage's own overrides

Stages, in order, each through the project's own commands (in this process): record the expert's
episodes (``emu_world.record``), train the tokenizer (``from_scratch=true``; else ``tokenizer.checkpoint``),
the world model on the task's dataset, its DiDA adaptation, the goal head (``stage=policy``), then
evaluate the world-model agent with them (``emu_world.evaluate``). A stage whose output exists and is
valid is skipped (a dataset with enough episodes; an export with its manifest and weights); a stage
whose run directory holds a checkpoint resumes it exactly (``resume=true``); a dataset with fewer
episodes than asked gets the missing ones appended. So an interrupted pipeline continues where it
stopped when run again. Everything goes under ``out`` (default ``outputs/pipeline/<task>``), the
dataset under ``record.root``. Ends with one JSON line: each stage's status and seconds, the total
wall time and the agent's success rate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from emu_world.config import (
    CONFIG_DIR,
    AgentConfig,
    EnvConfig,
    resolve_path,
    to_dataclass,
)
from emu_world.errors import UserError, reports_user_errors
from emu_world.models.tokenizer import load_tokenizer


@dataclass
class StageReport:
    name: str
    status: str  # ran | resumed | skipped
    seconds: float
    output: str

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "status": self.status, "seconds": round(self.seconds, 1), "output": self.output}


def has_files(path: Path, *names: str) -> bool:
    return all((path / n).is_file() for n in names)


def record_stage(cfg: DictConfig, env_cfg: EnvConfig) -> StageReport:
    """Record ``record.episodes`` expert episodes into ``record.root`` (or append the missing ones)."""
    from emu_world.data.robot_dataset import RobotDataset
    from emu_world.record import record

    root, want = Path(str(cfg.record.root)), int(cfg.record.episodes)
    t0 = time.perf_counter()
    have, next_seed = 0, int(cfg.record.seed)
    if root.exists() and any(root.iterdir()):
        ds = RobotDataset(root, check_videos=False)  # a folder that is not a dataset: its error
        have = ds.num_episodes
        if have >= want:
            return StageReport("record", "skipped", 0.0, str(root))
        seeds = [e.get("seed") for e in ds.provenance.get("episodes", []) if e.get("seed") is not None]
        next_seed = max(seeds) + 1 if seeds else next_seed + have  # failed seeds were skipped: never repeat one
    record(env_cfg, AgentConfig("scripted"), root, f"emu_world/{env_cfg.name}", want - have,
           next_seed, keep_failures=bool(cfg.record.keep_failures),
           mode="append" if have else "create", progress=bool(cfg.progress),
           after_success=round(float(cfg.record.after_success_seconds) * env_cfg.fps))
    return StageReport("record", "resumed" if have else "ran", time.perf_counter() - t0, str(root))


def train_stage(name: str, stage: str, out: Path, export: Path, done: Callable[[Path], bool],
                overrides: list[str]) -> StageReport:
    """``python -m emu_world.train stage=<stage> ...`` in this process, skipped when ``export`` is done,
    resumed when its run directory holds a checkpoint; its manifest records that command."""
    from emu_world.provenance import recorded_command
    from emu_world.train import run_stage
    from emu_world.train.checkpoint import find_checkpoint

    if done(export):
        return StageReport(name, "skipped", 0.0, str(export))
    run_dir = out / "runs" / name
    resuming = find_checkpoint(run_dir) is not None
    t0 = time.perf_counter()
    args = [f"stage={stage}", f"run_dir={run_dir}", *(["resume=true"] if resuming else []), *overrides]
    with recorded_command(args):
        result = run_stage(compose(config_name="train", overrides=args))
    if result.export_dir is None or not done(export):
        raise RuntimeError(f"pipeline stage {name} ended without its export at {export}")
    return StageReport(name, "resumed" if resuming else "ran", time.perf_counter() - t0, str(export))


def stages(cfg: DictConfig, env_cfg: EnvConfig, out: Path) -> list[StageReport]:
    data = f"dataset.root={cfg.record.root}"
    reports = [record_stage(cfg, env_cfg)]
    tokenizer = out / "tokenizer" if cfg.from_scratch else resolve_path(str(cfg.tokenizer.checkpoint))
    if cfg.from_scratch:
        reports.append(train_stage("tokenizer", "tokenizer", out, tokenizer,
                                   lambda p: has_files(p, "manifest.json", "model.safetensors"),
                                   [data, f"export.dir={tokenizer}", *cfg.tokenizer.train]))
    tok_identity = load_tokenizer(tokenizer).code_identity()  # trained above, or the given one

    def export_done(path: Path) -> bool:
        """An export that exists is done if it read the pipeline's tokenizer's codes; else refused."""
        if not has_files(path, "manifest.json", "model.safetensors"):
            return False
        recorded = json.loads((path / "manifest.json").read_text())["tokenizer"]
        if recorded.get("code_identity") not in (None, tok_identity):
            raise UserError(f"{path} was trained on the codes of another tokenizer ({recorded.get('path')}) than "
                            f"this pipeline's ({tokenizer}): give another out=<folder> or delete {out}")
        return True

    ar, adapted = out / "world_model", out / "world_model_dida"
    reports.append(train_stage("world_model", "world_model", out, ar, export_done,
                               [data, f"world_model.tokenizer={tokenizer}", f"world_model.export_dir={ar}",
                                *cfg.world_model.train]))
    reports.append(train_stage("dida", "dida", out, adapted, export_done,
                               [data, f"init={ar}", f"dida.export_dir={adapted}", *cfg.dida.train]))
    policy = out / "policy_goal"
    reports.append(train_stage("policy", "policy", out, policy,
                               lambda p: has_files(p, "manifest.json", "model.safetensors", "config.json"),
                               [data, f"policy_data.export_dir={policy}", f"policy_data.tokenizer={tokenizer}",
                                *cfg.policy.train]))
    return reports


def evaluate_stage(cfg: DictConfig, env_cfg: EnvConfig, out: Path) -> tuple[StageReport, dict[str, Any]]:
    from emu_world.evaluate import evaluate

    tokenizer = out / "tokenizer" if cfg.from_scratch else resolve_path(str(cfg.tokenizer.checkpoint))
    agent = AgentConfig("world_model", checkpoint=str(out / "policy_goal"),
                        planner={"checkpoint": str(out / "world_model_dida"), "tokenizer": str(tokenizer),
                                 "decoding": "dida"})
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # as python -m emu_world.evaluate: the simulator takes the other core
    summary = evaluate(env_cfg, agent, int(cfg.evaluate.episodes), int(cfg.evaluate.seed), out / "evaluate",
                       video=bool(cfg.evaluate.video), progress=bool(cfg.progress))
    return StageReport("evaluate", "ran", time.perf_counter() - t0, str(out / "evaluate")), summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="pipeline")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    env_cfg = to_dataclass(EnvConfig, cfg.env)
    if int(cfg.record.episodes) < 3:
        raise UserError(f"record.episodes={cfg.record.episodes}: the stages hold episodes out; record at least 3")
    out = Path(str(cfg.out))
    t0 = time.perf_counter()
    reports = stages(cfg, env_cfg, out)
    report, summary = evaluate_stage(cfg, env_cfg, out)
    reports.append(report)
    result = {"env": env_cfg.name, "from_scratch": bool(cfg.from_scratch), "out": str(out),
              "wall_seconds": round(time.perf_counter() - t0, 1), "stages": [r.as_dict() for r in reports],
              "success_rate": summary["success_rate"], "success_ci95": summary["success_ci95"],
              "real_time_factor": summary["real_time_factor"]}
    (Path(HydraConfig.get().runtime.output_dir) / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
