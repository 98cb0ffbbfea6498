"""The hardware path: an agent drives a robot (real or simulated) through the safety layer.

    agent --(action)--> robot.plan_action --(SafetyLayer.filter)--> robot.write --> actuators
      ^                                                                                 |
      +---------------- env-style observation <-- robot.get_observation <---------------+

:func:`run_on_robot` is what ``python -m emu_world.rollout robot=<aloha|widowx|sim>`` runs: it builds the
robot from its ``configs/robot/<robot>.yaml`` (as composed, saved to the run's ``robot.yaml``), the agent
of :func:`emu_world.agents.make_agent`, and runs seeded episodes of :func:`run_robot_episode` at the
robot's control rate. The agent runs on its own thread (:class:`AgentWorker`) so the control loop keeps
its deadline: when the agent has no action by the deadline (one control period by default) the robot
holds position (the safety layer's watchdog), and after ``safety.estop_after_missed`` misses in a row the
emergency stop trips. The emergency stop (a key, Ctrl-C, SIGTERM; :class:`EmergencyStop`) holds position
and disconnects. A dry run (the default) computes and prints every command and intervention and sends
nothing. Agents see the tasks' observation ``{"pixels": {camera: HxWx3 uint8}, "agent_pos": float32}``,
camera images centre-cropped and resized to ``env.image_size``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from emu_world.agents import make_agent
from emu_world.config import AgentConfig, EnvConfig
from emu_world.episodes import Agent, EpisodeResult
from emu_world.errors import UserError
from emu_world.metrics import wilson_interval
from emu_world.safety import EmergencyStop, monotonic

ROBOTS = ("aloha", "widowx", "sim")


# -- the agent's thread -------------------------------------------------------------------------------
@dataclass
class Job:
    """One call of the agent on its thread; ``observed_at`` is when its observation was taken."""

    fn: Callable
    args: tuple
    observed_at: float
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0  # the call's own duration

    def wait(self, timeout: float) -> bool:
        return self.done.wait(max(0.0, timeout))

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class AgentWorker:
    """Runs the agent's calls (reset, act) one at a time on one daemon thread, so a slow or frozen agent
    never blocks the control loop (and a frozen one does not keep the process alive)."""

    def __init__(self):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="agent", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, observed_at: float = 0.0) -> Job:
        job = Job(fn, args, observed_at)
        self._jobs.put(job)
        return job

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                job.value = job.fn(*job.args)
            except BaseException as e:  # handed to the control loop, which decides
                job.error = e
            finally:
                job.seconds = time.perf_counter() - start
                job.done.set()

    def close(self) -> None:
        self._jobs.put(None)


# -- observations ---------------------------------------------------------------------------------------
def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` x ``size`` (RGB uint8), as the agents were trained."""
    import cv2

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image, dtype=np.uint8)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top: top + s, left: left + s]
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA).astype(np.uint8)


def env_observation(robot, obs: dict[str, Any], cameras: list[str], image_size: int) -> dict[str, Any]:
    """The tasks' observation from a robot's LeRobot observation."""
    return {"pixels": {c: square_image(np.asarray(obs[c]), image_size) for c in cameras},
            "agent_pos": np.array([obs[n] for n in robot.state_names], dtype=np.float32)}


# -- one episode --------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What every episode of a robot run shares."""

    robot: Any  # lerobot_robot_emu_world.base.SafeRobot
    agent: Agent
    worker: AgentWorker
    estop: EmergencyStop
    cameras: list[str]
    image_size: int
    task: str  # the instruction text (hardware has no task info of its own)
    dry_run: bool = True
    clock: Callable[[], float] = monotonic
    sleep: Callable[[float], None] = time.sleep
    echo: Callable[[str], None] = print  # dry-run lines
    log: Any = None  # a text file: one JSON line per intervention


@dataclass
class EpisodeStats:
    """The robot's side of an episode."""

    commands_sent: int = 0
    commands_planned: int = 0
    holds: int = 0
    missed_deadlines: int = 0
    overruns: int = 0  # ticks whose work took longer than the control period
    interventions: dict[str, int] = field(default_factory=dict)
    emergency_stop: str | None = None


class EpisodeRunner:
    """One episode on the robot: reset, then control ticks until the step budget, the simulator's end
    of episode, or the emergency stop."""

    def __init__(self, ctx: RunContext, seed: int, episode: int, max_steps: int):
        self.ctx, self.seed, self.episode, self.max_steps = ctx, seed, episode, max_steps
        self.stats = EpisodeStats()
        self.job: Job | None = None
        self.missed_in_a_row = 0
        self.success_step: int | None = None
        self.progress, self.robot_seconds, self.agent_seconds = 0, 0.0, 0.0

    def run(self) -> tuple[EpisodeResult, EpisodeStats]:
        ctx, robot = self.ctx, self.ctx.robot
        before = dict(robot.safety.counts)
        start = ctx.clock()
        robot.reset_episode(self.seed)
        obs = robot.get_observation()
        info = {**self._info(), "seed": self.seed}
        reset = ctx.worker.submit(ctx.agent.reset, self._observation(obs), info)
        while not reset.wait(0.05) and not ctx.estop.tripped:
            pass
        if reset.done.is_set():
            reset.result()
        loop_start, steps = ctx.clock(), 0
        while steps < self.max_steps and not robot.episode_over and not ctx.estop.tripped:
            self._tick(steps)
            steps += 1
        self.stats.interventions = {k: v - before.get(k, 0) for k, v in robot.safety.counts.items()
                                    if v - before.get(k, 0)}
        self.stats.emergency_stop = ctx.estop.reason
        info = robot.task_info() or {}
        result = EpisodeResult(
            episode=self.episode, seed=self.seed, success=self.success_step is not None, steps=steps,
            max_subtask_progress=self.progress, num_subtasks=int(info.get("num_subtasks", 0)),
            seconds=ctx.clock() - loop_start, env_seconds=self.robot_seconds, agent_seconds=self.agent_seconds,
            reset_seconds=loop_start - start, success_step=self.success_step,
            agent=ctx.agent.report() if hasattr(ctx.agent, "report") else {})
        return result, self.stats

    def _info(self) -> dict[str, Any]:
        return self.ctx.robot.task_info() or {"task": self.ctx.task}

    def _observation(self, obs: dict[str, Any]) -> dict[str, Any]:
        return env_observation(self.ctx.robot, obs, self.ctx.cameras, self.ctx.image_size)

    def _tick(self, step: int) -> None:
        """Observe, get the agent's action by the deadline (else hold), filter, send (or print), pace."""
        ctx, robot = self.ctx, self.ctx.robot
        start = ctx.clock()
        obs = robot.get_observation()
        io = ctx.clock() - start
        if self.job is None:
            self.job = ctx.worker.submit(ctx.agent.act, self._observation(obs), self._info(),
                                         observed_at=robot.observed_at)
        if self.job.wait(self.job.observed_at + robot.safety.deadline - ctx.clock()):
            job, self.job = self.job, None
            self.agent_seconds += job.seconds
            planned = robot.plan_action(job.result(), observed_at=job.observed_at)
        else:
            planned = robot.plan_hold()
        self._watch(planned)
        t = ctx.clock()
        self._emit(step, planned)
        self.robot_seconds += io + ctx.clock() - t
        info = robot.task_info()
        if info is not None and not ctx.dry_run:
            self.progress = max(self.progress, int(info.get("subtask_progress", 0)))
            if self.success_step is None and info.get("is_success"):
                self.success_step = step + 1
        if robot.realtime:
            remaining = start + 1.0 / robot.fps - ctx.clock()
            if remaining > 0:
                ctx.sleep(remaining)
            else:
                self.stats.overruns += 1

    def _watch(self, planned) -> None:
        """Count missed deadlines (the watchdog's holds); too many in a row trip the emergency stop."""
        robot = self.ctx.robot
        if any(i.kind == "watchdog" for i in planned.interventions):
            self.stats.missed_deadlines += 1
            self.missed_in_a_row += 1
        else:
            self.missed_in_a_row = 0
        limit = robot.safety.config.estop_after_missed
        if limit and self.missed_in_a_row >= limit:
            self.ctx.estop.trip(f"the agent missed {limit} deadlines in a row")

    def _emit(self, step: int, planned) -> None:
        """Send the safe command (or, in a dry run, print it); log its interventions."""
        ctx = self.ctx
        held = any(i.kind in ("watchdog", "estop", "non_finite", "rate") for i in planned.interventions)
        self.stats.holds += held
        for i in planned.interventions:
            if ctx.log is not None:
                ctx.log.write(json.dumps({"episode": self.episode, "step": step, **i.to_dict()}) + "\n")
        if ctx.dry_run:
            self.stats.commands_planned += 1
            what = "hold" if held else "send"
            values = np.array2string(planned.action, precision=3, separator=", ", max_line_width=400)
            notes = "; ".join(f"{i.kind}: {i.detail}" for i in planned.interventions)
            ctx.echo(f"dry run: episode {self.episode} step {step}: would {what} {values}"
                     + (f" | {notes}" if notes else ""))
            return
        ctx.robot.write(planned.command)
        self.stats.commands_sent += 1


# -- the run ------------------------------------------------------------------------------------------
def make_robot(settings: dict[str, Any], env_cfg: EnvConfig, output_dir: Path):
    """The robot ``settings`` (a composed ``configs/robot/<robot>.yaml``) describe, for the task ``env_cfg``.
    The settings are saved to ``<output_dir>/robot.yaml`` (the run's record) and read back from there."""
    import envs
    from lerobot_robot_emu_world import (
        EmuAloha,
        EmuAlohaConfig,
        EmuSim,
        EmuSimConfig,
        EmuWidowX,
        EmuWidowXConfig,
    )

    kind = settings.get("type")
    if kind not in ROBOTS:
        raise UserError(f"robot config: type must be one of {list(ROBOTS)}, got {kind!r} (configs/robot/<robot>.yaml)")
    path = output_dir / "robot.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    try:
        if kind == "sim":
            robot = EmuSim(EmuSimConfig(task=env_cfg.name, camera_names=list(env_cfg.cameras),
                                        image_size=int(env_cfg.image_size),
                                        max_episode_steps=int(env_cfg.max_episode_steps), config_file=str(path)))
        elif kind == "aloha":
            robot = EmuAloha(EmuAlohaConfig(config_file=str(path)))
        else:
            robot = EmuWidowX(EmuWidowXConfig(config_file=str(path)))
    except (ValueError, TypeError) as e:
        raise UserError(f"robot={kind}: {e}; fix configs/robot/{kind}.yaml or the robot.* override") from e
    env_cls = envs.task_spec(env_cfg.name).env_cls()
    if tuple(robot.action_names) != tuple(env_cls.action_names):
        raise UserError(f"robot={kind} takes {len(robot.action_names)}-D actions ({', '.join(robot.action_names)}), "
                        f"env={env_cfg.name} has {len(env_cls.action_names)}-D ones: pick a task of this robot "
                        f"({'aloha_*' if kind == 'aloha' else 'widowx_*'}) or the robot of the task")
    if abs(robot.fps - env_cfg.fps) > 1e-6:
        raise UserError(f"robot={kind} runs at {robot.fps} Hz but env={env_cfg.name} at {env_cfg.fps} Hz: set robot.fps")
    missing = [c for c in env_cfg.cameras if c not in robot.camera_names]
    if missing:
        raise UserError(f"env.cameras {missing} are not among robot={kind}'s cameras {list(robot.camera_names)}: "
                        f"set env.cameras=[...] or add them under robot.cameras")
    return robot


def make_robot_agent(robot, agent_cfg: AgentConfig, env_cfg: EnvConfig) -> Agent:
    """The agent for the robot: any of :func:`make_agent`; the scripted experts read the simulator's
    object poses, so they drive robot=sim only."""
    sim_env = getattr(robot, "env", None)
    if agent_cfg.name == "scripted" and sim_env is None:
        raise UserError("agent=scripted reads the simulator's object poses and runs on robot=sim only; on hardware "
                        "use a trained agent (agent=bc, act, oracle_subgoal or world_model with agent.checkpoint=...)")
    return make_agent(agent_cfg, env_cfg, sim_env)


def run_on_robot(env_cfg: EnvConfig, agent_cfg: AgentConfig, settings: dict[str, Any], episodes: int, seed: int,
                 dry_run: bool, output_dir: Path, echo: Callable[[str], None] = print,
                 clock: Callable[[], float] = monotonic, sleep: Callable[[float], None] = time.sleep,
                 agent_factory: Callable[[Any], Agent] | None = None) -> dict[str, Any]:
    """Seeded episodes (episode ``i`` resets with ``seed + i``) of the agent on the robot; writes
    ``episodes.jsonl``, ``interventions.jsonl`` and ``summary.json`` under ``output_dir``; returns the summary.
    ``agent_factory(robot)`` builds the agent instead of ``agent_cfg`` (an agent that is not in
    :func:`make_agent`); ``clock`` and ``sleep`` are the run's time source (tests inject theirs)."""
    if episodes <= 0:
        raise UserError(f"episodes must be positive, got {episodes}")
    output_dir.mkdir(parents=True, exist_ok=True)
    robot = make_robot(settings, env_cfg, output_dir)
    robot.clock = clock
    robot.connect(calibrate=False)
    worker, agent, results = AgentWorker(), None, []
    try:
        agent = agent_factory(robot) if agent_factory is not None else make_robot_agent(robot, agent_cfg, env_cfg)
        import envs

        task = envs.task_spec(env_cfg.name).env_cls().task
        with EmergencyStop(key=robot.safety.config.estop_key) as estop, \
                open(output_dir / "episodes.jsonl", "w") as episodes_log, \
                open(output_dir / "interventions.jsonl", "w") as interventions_log:
            ctx = RunContext(robot, agent, worker, estop, list(env_cfg.cameras), int(env_cfg.image_size), task,
                             dry_run, clock, sleep, echo, interventions_log)
            for i in range(episodes):
                result, stats = EpisodeRunner(ctx, seed + i, i, int(env_cfg.max_episode_steps)).run()
                results.append((result, stats))
                episodes_log.write(json.dumps({**asdict(result), "robot": asdict(stats)}) + "\n")
                episodes_log.flush()
                if estop.tripped:
                    break
            if estop.tripped:
                robot.emergency_stop(estop.reason, hold=not dry_run)
    except BaseException as e:
        robot.emergency_stop(f"{type(e).__name__} during the run", hold=not dry_run)
        raise
    finally:
        worker.close()
        if robot.is_connected:
            robot.disconnect()
        if agent is not None and hasattr(agent, "close"):
            agent.close()
    summary = summarize_robot_run(env_cfg, agent_cfg, settings["type"], dry_run, seed, results, robot, output_dir)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize_robot_run(env_cfg: EnvConfig, agent_cfg: AgentConfig, kind: str, dry_run: bool, seed: int,
                        results: list[tuple[EpisodeResult, EpisodeStats]], robot, output_dir: Path) -> dict[str, Any]:
    """Success where it is measured (the simulator, not in a dry run), commands, holds, deadlines, and the
    safety layer's intervention counts by kind."""
    measured = kind == "sim" and not dry_run and bool(results)
    n_success = sum(r.success for r, _ in results)
    lo, hi = wilson_interval(n_success, len(results)) if measured else (None, None)
    stats = [s for _, s in results]
    steps = sum(r.steps for r, _ in results)
    return {
        "env": env_cfg.name, "agent": agent_cfg.name, "robot": kind, "dry_run": dry_run,
        "episodes": len(results), "seed": seed,
        "success_rate": n_success / len(results) if measured else None,
        "success_ci95": [round(lo, 4), round(hi, 4)] if measured else None,
        "mean_steps": steps / len(results) if results else 0.0,
        "commands_sent": robot.commands_sent,  # every write, the emergency stop's hold included
        "commands_planned": sum(s.commands_planned for s in stats),
        "holds": sum(s.holds for s in stats),
        "missed_deadlines": sum(s.missed_deadlines for s in stats),
        "overruns": sum(s.overruns for s in stats),
        **robot.safety.report(),
        "agent_seconds_per_step": sum(r.agent_seconds for r, _ in results) / steps if steps else None,
        "output_dir": str(output_dir),
    }
