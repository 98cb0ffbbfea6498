"""Closed-loop evaluation of an agent on a simulated task.

    python -m emu_world.evaluate env=aloha_fold agent=scripted episodes=50 seed=0 [video=true]

Runs seeded episodes (episode ``i`` resets with ``seed + i``) with a progress bar, writes one
JSON record per episode to ``episodes.jsonl`` and the summary to ``summary.json`` under the
run's output directory (plus mp4s of the first ``video_episodes`` episodes when
``video=true``), and ends by printing the summary as one JSON line:
``env, agent, episodes, seed, success_rate, success_ci95 (Wilson), real_time_factor, ...``.

    python -m emu_world.evaluate env=aloha_fold agent=oracle_subgoal episodes=100 seed=1000
    python -m emu_world.evaluate env=aloha_fold agent=bc agent.checkpoint=outputs/train/bc/policy

An episode succeeds if ``info["is_success"]`` is true at any step (LeRobot's convention);
``mean_steps_to_success`` averages the first such step over successful episodes.
``steps_per_second`` counts the step loop (agent + env, rendering included; the reset, e.g. an
oracle's twin episode, excluded); ``real_time_factor`` is simulated seconds (steps / control rate)
per wall second of that loop (>= 1: faster than the robot's clock); ``agent_seconds_per_step`` is
the time inside the agent; ``env_steps_per_second`` counts time inside ``env.step`` only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from emu_world.agents import make_agent
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.episodes import EpisodeResult, run_episode
from emu_world.errors import UserError, reports_user_errors
from emu_world.media import save_grid, write_mp4
from emu_world.metrics import wilson_interval


def evaluate(env_cfg: EnvConfig, agent_cfg: AgentConfig, episodes: int, seed: int, output_dir: Path,
             video: bool = False, video_episodes: int = 2, progress: bool = True,
             view: Callable[[dict, Any], np.ndarray] | None = None) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes; write per-episode records; return the summary. ``view(obs, agent)``
    draws each video frame (default: the env's first camera)."""
    if episodes <= 0:
        raise UserError(f"episodes must be positive, got {episodes}")
    output_dir.mkdir(parents=True, exist_ok=True)
    env = env_cfg.make()
    agent = make_agent(agent_cfg, env_cfg, env)
    camera = env_cfg.cameras[0]
    results: list[EpisodeResult] = []
    try:
        with open(output_dir / "episodes.jsonl", "w") as log:
            bar = tqdm(range(episodes), desc=f"{env_cfg.name}/{agent_cfg.name}", disable=not progress)
            for i in bar:
                record = video and i < video_episodes
                frames: list[np.ndarray] = []
                last: list[np.ndarray] = []  # the episode's last camera frame

                def hook(obs, action, next_obs, *rest):
                    frames.append(view(next_obs, agent))
                    last[:] = [np.asarray(next_obs["pixels"][camera])]

                result, camera_frames = run_episode(env, agent, seed + i, i, camera if record and view is None else None,
                                                    on_step=hook if record and view is not None else None)
                frames = camera_frames or frames
                if record:
                    path = write_mp4(output_dir / "videos" / f"episode_{i:03d}.mp4", frames, env_cfg.fps)
                    result.video = str(path)
                    if hasattr(agent, "picture_rows") and agent.images():  # what a planner imagined
                        labels, rows = agent.picture_rows(last[0] if last else (camera_frames or [None])[-1])
                        save_grid(output_dir / "videos" / f"episode_{i:03d}_keyframes.png", rows, labels)
                results.append(result)
                log.write(json.dumps(asdict(result)) + "\n")
                log.flush()
                bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    finally:
        env.close()
        if hasattr(agent, "close"):
            agent.close()
    summary = summarize(env_cfg, agent_cfg, results, seed, env.unwrapped.has_success, output_dir)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(env_cfg: EnvConfig, agent_cfg: AgentConfig, results: list[EpisodeResult], seed: int,
              has_success: bool, output_dir: Path) -> dict[str, Any]:
    """Success with its Wilson interval, speed (real-time factor: simulated seconds per wall second of
    the step loop; the agent's seconds per control step) and mean steps to success."""
    n_success = sum(r.success for r in results)
    lo, hi = wilson_interval(n_success, len(results))
    total_steps = sum(r.steps for r in results)
    to_success = [r.success_step for r in results if r.success_step is not None]
    return {
        "env": env_cfg.name,
        "agent": agent_cfg.name,
        "episodes": len(results),
        "seed": seed,
        # open-ended tasks (exploration) have no success: reported as null, not as 0
        "success_rate": n_success / len(results) if has_success else None,
        "success_ci95": [round(lo, 4), round(hi, 4)] if has_success else None,
        "mean_subtask_progress": float(np.mean([r.max_subtask_progress for r in results])),
        "mean_steps": total_steps / len(results),
        "collided_steps": sum(r.collided_steps for r in results),
        "mean_steps_to_success": float(np.mean(to_success)) if to_success else None,
        "steps_per_second": total_steps / sum(r.seconds for r in results),
        "env_steps_per_second": total_steps / sum(r.env_seconds for r in results),
        "real_time_factor": total_steps / env_cfg.fps / sum(r.seconds for r in results),
        "agent_seconds_per_step": sum(r.agent_seconds for r in results) / total_steps,
        "reset_seconds": sum(r.reset_seconds for r in results) / len(results),
        **planner_split(results),
        "image_size": env_cfg.image_size,
        "cameras": list(env_cfg.cameras),
        "checkpoint": agent_cfg.checkpoint,
        "output_dir": str(output_dir),
    }


def planner_split(results: list[EpisodeResult]) -> dict[str, Any]:
    """For agents that plan (world_model): the planner's share of the agent's time and the plans per episode."""
    if not any("planner_seconds" in r.agent for r in results):
        return {}
    planner = sum(r.agent.get("planner_seconds", 0.0) for r in results)
    agent = sum(r.agent_seconds for r in results)
    return {"planner_seconds_per_step": planner / sum(r.steps for r in results),
            "policy_seconds_per_step": (agent - planner) / sum(r.steps for r in results),
            "planner_share_of_agent_time": planner / agent if agent > 0 else None,
            "mean_plans_per_episode": float(np.mean([r.agent.get("replans", 0) for r in results]))}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    env_cfg = to_dataclass(EnvConfig, cfg.env)
    agent_cfg = to_dataclass(AgentConfig, cfg.agent)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = evaluate(env_cfg, agent_cfg, int(cfg.episodes), int(cfg.seed), output_dir,
                       video=bool(cfg.video), video_episodes=int(cfg.video_episodes),
                       progress=bool(cfg.progress))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
