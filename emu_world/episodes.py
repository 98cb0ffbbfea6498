"""The closed-loop episode: an agent acting in a simulated task until it ends.

Every command that runs episodes goes through :func:`run_episode`: the evaluation harness
(``python -m emu_world.evaluate``), the dataset recorder (``python -m emu_world.record``), the
benchmarks that record fresh expert episodes, and the rollout command. An agent is anything with
``reset(obs, info)`` and ``act(obs, info) -> action`` (:class:`Agent`; the reset ``info`` carries the
episode's ``seed``); :func:`emu_world.agents.make_agent` builds the one a config names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Agent(Protocol):
    """What the harness drives: scripted experts, policy heads, the world-model agent."""

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
    seconds: float  # the step loop (agent + env), reset and on_step hooks (recording, video) excluded
    env_seconds: float  # inside env.step
    agent_seconds: float = 0.0  # inside agent.act
    reset_seconds: float = 0.0  # env.reset + agent.reset (an oracle's twin episode, a planner's setup)
    success_step: int | None = None  # the first step after which the task was done
    collided_steps: int = 0  # steps the env refused as a collision (info["collided"], exploration)
    annotations: list[dict] = field(default_factory=list)  # the agent's subtasks, if it reports them
    agent: dict = field(default_factory=dict)  # the agent's own record of the episode (agent.report())
    video: str | None = None


class StepCallback(Protocol):
    def __call__(self, obs: dict, action: Any, next_obs: dict, reward: float, terminated: bool,
                 truncated: bool, info: dict, subtask_index: int | None) -> None: ...


def run_episode(env, agent: Agent, seed: int, episode: int = 0, record_camera: str | None = None,
                on_step: StepCallback | None = None, after_success: int = 0) -> tuple[EpisodeResult, list[np.ndarray]]:
    """One closed-loop episode until termination or truncation (the env's TimeLimit).

    ``on_step`` sees every transition (the observation the action was chosen from, the action
    as the actuators received it after the env's limits, the next observation, ...): the
    dataset recorder hooks in here. ``after_success``: the agent keeps acting this many steps after
    the task is done (the env's success ends an episode otherwise; a demonstration shows what comes
    after, e.g. letting go of the folded cloth and retreating), within the time limit.
    """
    from envs import AnnotationTracker

    t_reset = time.perf_counter()
    obs, info = env.reset(seed=seed)
    agent.reset(obs, {**info, "seed": seed})
    start = time.perf_counter()
    tracker = AnnotationTracker(env.unwrapped.subtasks, may_go_back=getattr(agent, "may_go_back", False)) \
        if hasattr(agent, "subtask_index") else None
    frames = [obs["pixels"][record_camera]] if record_camera else []
    success, progress, steps, env_seconds = bool(info["is_success"]), int(info["subtask_progress"]), 0, 0.0
    collided, agent_seconds, hook_seconds, success_step = 0, 0.0, 0.0, (0 if success else None)
    while True:
        t0 = time.perf_counter()
        action = agent.act(obs, info)
        t1 = time.perf_counter()
        next_obs, reward, terminated, truncated, info = env.step(action)
        env_seconds += time.perf_counter() - t1
        agent_seconds += t1 - t0
        steps += 1
        subtask = getattr(agent, "subtask_index", None)
        if tracker is not None:
            tracker.record(subtask)
        if on_step is not None:
            t2 = time.perf_counter()
            on_step(obs, env.unwrapped.last_action, next_obs, float(reward), bool(terminated),
                    bool(truncated), info, subtask)
            hook_seconds += time.perf_counter() - t2
        obs = next_obs
        if record_camera:
            frames.append(obs["pixels"][record_camera])
        collided += bool(info.get("collided", False))
        if not success and bool(info["is_success"]):
            success, success_step = True, steps
        progress = max(progress, int(info["subtask_progress"]))
        done_for = steps - success_step if success else -1  # steps since success
        if truncated or (terminated and not (success and done_for < after_success)):
            break
    result = EpisodeResult(
        episode=episode, seed=seed, success=success, steps=steps, max_subtask_progress=progress,
        num_subtasks=int(info["num_subtasks"]), seconds=time.perf_counter() - start - hook_seconds,
        env_seconds=env_seconds, agent_seconds=agent_seconds, reset_seconds=start - t_reset,
        success_step=success_step, collided_steps=collided,
        annotations=[a.to_dict() for a in tracker.annotations()] if tracker else [],
        agent=agent.report() if hasattr(agent, "report") else {},
    )
    return result, frames
