"""Closed-loop evaluation of an agent on a simulated task.

    python -m emu_world.evaluate env=aloha_fold agent=scripted episodes=50 seed=0 [video=true]

Runs seeded episodes (episode ``i`` resets with ``seed + i``) with a progress bar, writes one
JSON record per episode to ``episodes.jsonl`` and the summary to ``summary.json`` under the
run's output directory (plus mp4s of the first ``video_episodes`` episodes when
``video=true``), and ends by printing the summary as one JSON line:
``env, agent, episodes, seed, success_rate, success_ci95 (Wilson), steps_per_second, ...``.

An episode succeeds if ``info["is_success"]`` is true at any step (LeRobot's convention).
``steps_per_second`` counts the whole loop (agent + env, rendering included);
``env_steps_per_second`` counts time inside ``env.step`` only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.metrics import wilson_interval
from emu_world.video import write_mp4


class Agent(Protocol):
    """What the harness drives: scripted experts now, learned policies later."""

    def reset(self, obs: dict, info: dict) -> None: ...

    def act(self, obs: dict, info: dict) -> Any: ...


@dataclass
class EpisodeResult:
    episode: int
    seed: int
    success: bool
    steps: int
    max_subtask_progress: int
    num_subtasks: int
    seconds: float
    env_seconds: float
    collided_steps: int = 0  # steps the env refused as a collision (info["collided"], exploration)
    annotations: list[dict] = field(default_factory=list)  # the agent's subtasks, if it reports them
    video: str | None = None


def make_agent(agent_cfg: AgentConfig, env_cfg: EnvConfig, env) -> Agent:
    if agent_cfg.name == "scripted":
        import envs

        return envs.make_expert(env_cfg.name, env)
    raise ValueError(f"unknown agent {agent_cfg.name!r}")


class StepCallback(Protocol):
    def __call__(self, obs: dict, action: Any, next_obs: dict, reward: float, terminated: bool,
                 truncated: bool, info: dict, subtask_index: int | None) -> None: ...


def run_episode(env, agent: Agent, seed: int, episode: int = 0, record_camera: str | None = None,
                on_step: StepCallback | None = None) -> tuple[EpisodeResult, list[np.ndarray]]:
    """One closed-loop episode until termination or truncation (the env's TimeLimit).

    ``on_step`` sees every transition (the observation the action was chosen from, the action
    as the actuators received it after the env's limits, the next observation, ...): the
    dataset recorder hooks in here.
    """
    from envs import AnnotationTracker

    start = time.perf_counter()
    obs, info = env.reset(seed=seed)
    agent.reset(obs, info)
    tracker = AnnotationTracker(env.unwrapped.subtasks) if hasattr(agent, "subtask_index") else None
    frames = [obs["pixels"][record_camera]] if record_camera else []
    success, progress, steps, env_seconds = bool(info["is_success"]), int(info["subtask_progress"]), 0, 0.0
    collided = 0
    while True:
        action = agent.act(obs, info)
        t0 = time.perf_counter()
        next_obs, reward, terminated, truncated, info = env.step(action)
        env_seconds += time.perf_counter() - t0
        steps += 1
        subtask = getattr(agent, "subtask_index", None)
        if tracker is not None:
            tracker.record(subtask)
        if on_step is not None:
            on_step(obs, env.unwrapped.last_action, next_obs, float(reward), bool(terminated),
                    bool(truncated), info, subtask)
        obs = next_obs
        if record_camera:
            frames.append(obs["pixels"][record_camera])
        collided += bool(info.get("collided", False))
        success = success or bool(info["is_success"])
        progress = max(progress, int(info["subtask_progress"]))
        if terminated or truncated:
            break
    result = EpisodeResult(
        episode=episode, seed=seed, success=success, steps=steps, max_subtask_progress=progress,
        num_subtasks=int(info["num_subtasks"]), seconds=time.perf_counter() - start,
        env_seconds=env_seconds, collided_steps=collided,
        annotations=[a.to_dict() for a in tracker.annotations()] if tracker else [],
    )
    return result, frames


def evaluate(env_cfg: EnvConfig, agent_cfg: AgentConfig, episodes: int, seed: int, output_dir: Path,
             video: bool = False, video_episodes: int = 2, progress: bool = True) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes; write per-episode records; return the summary."""
    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
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
                result, frames = run_episode(env, agent, seed + i, i, camera if record else None)
                if record:
                    path = write_mp4(output_dir / "videos" / f"episode_{i:03d}.mp4", frames, env_cfg.fps)
                    result.video = str(path)
                results.append(result)
                log.write(json.dumps(asdict(result)) + "\n")
                log.flush()
                bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    finally:
        env.close()

    n_success = sum(r.success for r in results)
    lo, hi = wilson_interval(n_success, len(results))
    has_success = env.unwrapped.has_success
    total_steps = sum(r.steps for r in results)
    summary = {
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
        "steps_per_second": total_steps / sum(r.seconds for r in results),
        "env_steps_per_second": total_steps / sum(r.env_seconds for r in results),
        "image_size": env_cfg.image_size,
        "cameras": list(env_cfg.cameras),
        "output_dir": str(output_dir),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    env_cfg = to_dataclass(EnvConfig, cfg.env)
    agent_cfg = to_dataclass(AgentConfig, cfg.agent)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = evaluate(env_cfg, agent_cfg, int(cfg.episodes), int(cfg.seed), output_dir,
                       video=bool(cfg.video), video_episodes=int(cfg.video_episodes),
                       progress=bool(cfg.progress))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
