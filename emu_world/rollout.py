"""The main command: the world-model agent plans in pictures and acts.

    python -m emu_world.rollout env=aloha_fold                     # the shipped checkpoints, 3 seeded episodes
    python -m emu_world.rollout env=aloha_transfer_cube episodes=10 seed=2000
    python -m emu_world.rollout env=aloha_fold agent.planner.decoding=ar           # keyframes token by token
    python -m emu_world.rollout env=aloha_fold agent.planner.steps=4               # DiDA with 4 passes
    python -m emu_world.rollout env=aloha_fold agent.checkpoint=<goal head> agent.planner.checkpoint=<world model>
    python -m emu_world.rollout env=aloha_fold agent=oracle_subgoal                # any agent of evaluate
    python -m emu_world.rollout env=aloha_transfer_cube robot=sim agent=scripted dry_run=false
    python -m emu_world.rollout env=aloha_transfer_cube robot=aloha agent=bc agent.checkpoint=<head>  # dry run

Runs seeded episodes (episode ``i`` resets with ``seed + i``) with a progress bar through the
evaluation harness (:func:`emu_world.evaluate.evaluate`), writes an mp4 per episode (the camera beside
the keyframe the agent pursues, with its subtask text), the imagined keyframes of each episode, one
JSON record per episode and ``summary.json`` under the run's output directory, and prints where they
are and the success rate, then the summary as one JSON line.

Checkpoints: the goal head ``checkpoints/policy_<task>/goal`` and the world model
``agent.planner.checkpoint=auto``: the task's own model ``checkpoints/world_model_<task>`` when it is
there (and DiDA-adapted, for DiDA decoding), else the default ``checkpoints/world_model``. A task
without them is refused with the commands that train them.

With ``robot=<aloha|widowx|sim>`` (``configs/robot/``) the agent drives a robot instead, through the safety
layer (:mod:`emu_world.hardware`): a dry run by default (every command it would send and every
intervention printed, nothing moved), ``dry_run=false`` to move; it ends with the summary as one JSON line
(success rate where the simulator measures it, intervention counts by kind). No videos on this path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.errors import reports_user_errors
from emu_world.evaluate import evaluate

SCALE = 2  # video frames are drawn at twice the camera's size


def caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` written in a bar under it."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w, h + 18), "black")
    canvas.paste(Image.fromarray(image), (0, 0))
    ImageDraw.Draw(canvas).text((4, h + 3), text, fill="white")
    return np.asarray(canvas)


def side_by_side(camera: str):
    """A video view: the camera, and the keyframe the agent pursues with its subtask text (a blank
    panel for agents without subgoals), each at twice the size."""

    def view(obs: dict, agent: Any) -> np.ndarray:
        real = np.asarray(obs["pixels"][camera]).repeat(SCALE, 0).repeat(SCALE, 1)
        goal, text = None, ""
        if hasattr(agent, "goal_frame"):
            goal, text = agent.goal_frame(), agent.goal_text or ""
        panel = goal.repeat(SCALE, 0).repeat(SCALE, 1) if goal is not None else np.zeros_like(real)
        index = getattr(agent, "subtask_index", None)
        label = f"subgoal {index}: {text}" if text else (f"subtask {index}" if index is not None else "")
        return np.concatenate([caption(real, "camera"), caption(panel, label)], axis=1)

    return view


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="rollout")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    env_cfg = to_dataclass(EnvConfig, cfg.env)
    agent_cfg = to_dataclass(AgentConfig, cfg.agent)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("robot") is not None:
        from emu_world.hardware import run_on_robot

        summary = run_on_robot(env_cfg, agent_cfg, OmegaConf.to_container(cfg.robot, resolve=True), int(cfg.episodes),
                               int(cfg.seed), bool(cfg.dry_run), output_dir)
        print(json.dumps(summary, default=str), flush=True)
        return
    summary = evaluate(env_cfg, agent_cfg, int(cfg.episodes), int(cfg.seed), output_dir, video=bool(cfg.video),
                       video_episodes=int(cfg.episodes), progress=bool(cfg.progress),
                       view=side_by_side(env_cfg.cameras[0]))
    rate = summary["success_rate"]
    videos = f"videos in {output_dir / 'videos'}, " if cfg.video else ""
    success = f"success {rate:.0%} (95% interval {summary['success_ci95']})" if rate is not None else "no success measure"
    print(f"{env_cfg.name} / {agent_cfg.name}: {success} over {summary['episodes']} episodes; {videos}records in "
          f"{output_dir}", flush=True)
    print(json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
