"""Agents: what acts in a task, built from ``configs/agent/<name>.yaml`` by :func:`make_agent`.

- ``scripted``: the task's scripted expert (``envs``).
- ``bc``: the goal-free policy head (:class:`PolicyAgent`).
- ``oracle_subgoal``: the goal head shown the true keyframes (:class:`OracleSubgoalAgent`): the
  scripted expert's frames at its subtask ends for the same seed, from a twin env, computed before the
  episode. The upper bound of what a perfect planner would give.
- ``act``: LeRobot's ACT, trained by ``lerobot-train`` on the same dataset (:mod:`policies.act`).

Every agent has ``reset(obs, info)`` (``info["seed"]`` is the episode's seed) and ``act(obs, info)``.
Subgoal agents (:class:`SubgoalAgent`) keep the index of the subtask they pursue
(``subtask_index``, recorded as the episode's annotations) and advance it when the goal head says
the frame has reached the keyframe (its reached probability over ``reached_threshold`` at a fresh
query; the head then re-queries with the next keyframe), or when the subtask took
``subtask_budget`` times the expert's steps for it. Advancing on the env's ``subtask_progress``
instead stops short: it rises 9-26 steps after the expert's subtask changes on aloha_fold.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emu_world.config import AgentConfig, EnvConfig, resolve_path
from emu_world.episodes import Agent, run_episode
from emu_world.errors import MissingInputError, UserError
from policies.goal_head import GoalHeadPolicy
from policies.goal_head.modeling_goal_head import frames_to_input, read_policy_meta


def load_policy(agent_cfg: AgentConfig, env_cfg: EnvConfig, want_goal: bool) -> GoalHeadPolicy:
    """The goal head (``want_goal``) or the goal-free head at ``agent.checkpoint``, checked against the env;
    the agent's execution overrides applied."""
    path = resolve_path(str(agent_cfg.checkpoint))
    try:
        meta = read_policy_meta(path)
    except FileNotFoundError:
        kind = "goal head" if want_goal else "goal-free head"
        goal = "" if want_goal else " policy.goal=none"
        raise MissingInputError(
            f"agent={agent_cfg.name} on env={env_cfg.name}: no {kind} at {agent_cfg.checkpoint}. Train it: "
            f"`python -m emu_world.record env={env_cfg.name} episodes=100 seed=0 dataset.root=datasets/{env_cfg.name}`, "
            f"then `python -m emu_world.train stage=policy dataset.root=datasets/{env_cfg.name}{goal} "
            f"policy_data.export_dir={agent_cfg.checkpoint}` (or pass agent.checkpoint=<folder>)") from None
    except ValueError as e:  # a folder of another kind
        raise UserError(f"agent={agent_cfg.name}: agent.checkpoint={agent_cfg.checkpoint}: {e}") from None
    head = meta["config"]
    if (head["goal"] != "none") != want_goal:
        kind, fix = ("a goal head", "policy.goal=keyframe") if want_goal else ("a goal-free head", "policy.goal=none")
        raise UserError(f"agent={agent_cfg.name} needs {kind}, but {path} holds a policy with goal={head['goal']!r}; "
                        f"train one with `python -m emu_world.train stage=policy dataset.root=datasets/{env_cfg.name} "
                        f"{fix}` or point agent.checkpoint at it")
    if head["action_dim"] != env_cfg.action_dim or head["state_dim"] != env_cfg.state_dim:
        raise UserError(f"{path} drives a robot with {head['action_dim']}-D actions and {head['state_dim']}-D state, but "
                        f"env={env_cfg.name} has {env_cfg.action_dim}-D and {env_cfg.state_dim}-D: use a checkpoint "
                        f"trained on {env_cfg.name} (agent.checkpoint=checkpoints/policy_{env_cfg.name}/...)")
    if head["camera"] not in env_cfg.cameras or head["image_size"] != env_cfg.image_size:
        raise UserError(f"{path} reads the {head['camera']!r} camera at {head['image_size']}px, but the env renders "
                        f"{list(env_cfg.cameras)} at {env_cfg.image_size}px: set env.cameras / env.image_size to match")
    policy = GoalHeadPolicy.load(path)
    overrides = {k: getattr(agent_cfg, k) for k in ("n_action_steps", "temporal_ensemble_coeff")
                 if getattr(agent_cfg, k) is not None}
    if overrides:
        try:
            policy.config = replace(policy.config, **overrides)
        except ValueError as e:
            raise UserError(f"agent={agent_cfg.name}: {e}") from None
        policy.reset()
    return policy


class PolicyAgent:
    """A policy head acting from the observed camera and the robot's state (no goal: behaviour cloning)."""

    def __init__(self, policy: GoalHeadPolicy):
        self.policy = policy.eval()
        self.camera = policy.config.camera

    def observation(self, obs: dict) -> dict[str, torch.Tensor]:
        return {"observation.image": frames_to_input(np.asarray(obs["pixels"][self.camera])[None]),
                "observation.state": torch.as_tensor(np.asarray(obs["agent_pos"], dtype=np.float32))[None]}

    def reset(self, obs: dict, info: dict) -> None:
        self.policy.reset()

    def act(self, obs: dict, info: dict) -> np.ndarray:
        return self.policy.select_action(self.observation(obs))[0].numpy()


class SubgoalAgent(PolicyAgent):
    """The goal head pursuing a sequence of keyframes, one per subtask (see the module docstring).
    Subclasses supply the keyframes (:meth:`keyframe`) and the step budget of each subtask."""

    def __init__(self, policy: GoalHeadPolicy, reached_threshold: float = 0.5):
        super().__init__(policy)
        self.reached_threshold = reached_threshold
        self.subtask_index = 0
        self.steps_in_subtask = 0
        self.advances: list[dict[str, Any]] = []  # when and why the subgoal moved on, per episode

    @property
    def num_subtasks(self) -> int:
        raise NotImplementedError

    def keyframe(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 keyframe of subtask ``index``."""
        raise NotImplementedError

    def budget(self, index: int) -> int | None:
        """Steps after which subtask ``index`` is given up and the next one pursued (None: no budget)."""
        return None

    def reset(self, obs: dict, info: dict) -> None:
        super().reset(obs, info)
        self.subtask_index, self.steps_in_subtask, self.advances = 0, 0, []

    def _query(self, obs: dict) -> tuple[np.ndarray, bool]:
        batch = self.observation(obs)
        batch["observation.goal"] = frames_to_input(self.keyframe(self.subtask_index)[None])
        before = self.policy.queries
        action = self.policy.select_action(batch)[0].numpy()
        fresh = self.policy.queries != before
        reached = fresh and float(self.policy.last_reached[0]) > self.reached_threshold
        return action, reached

    def advance(self, step_reason: str) -> None:
        self.advances.append({"subtask": self.subtask_index, "after_steps": self.steps_in_subtask, "why": step_reason})
        self.subtask_index += 1
        self.steps_in_subtask = 0
        self.policy.reset()  # the queued actions pursued the old keyframe

    def before_query(self, obs: dict) -> None:
        """Hook before the head is queried (the oracle gives a subtask up when its budget ran out)."""
        budget = self.budget(self.subtask_index)
        if self.subtask_index < self.num_subtasks - 1 and budget is not None and self.steps_in_subtask >= budget:
            self.advance("budget")

    def on_reached(self, obs: dict) -> None:
        """The head says the frame reached the keyframe: pursue the next subtask."""
        self.advance("reached")

    def act(self, obs: dict, info: dict) -> np.ndarray:
        self.before_query(obs)
        action, reached = self._query(obs)
        if reached and self.subtask_index < self.num_subtasks - 1:
            self.on_reached(obs)
            action, _ = self._query(obs)
        self.steps_in_subtask += 1
        return action

    def report(self) -> dict[str, Any]:
        """What the episode's records say about the agent's subgoals."""
        return {"advances": list(self.advances)}

    def goal_frame(self) -> np.ndarray | None:
        """The keyframe pursued now (for videos)."""
        return self.keyframe(self.subtask_index) if self.num_subtasks else None

    goal_text: str | None = None


class OracleSubgoalAgent(SubgoalAgent):
    """The goal head shown the scripted expert's keyframes for the episode's seed (a twin env runs the
    expert first; the keyframe of subtask k is the expert's first frame of subtask k + 1, the last
    subtask's is its last frame, as in the recorded datasets)."""

    def __init__(self, policy: GoalHeadPolicy, env_cfg: EnvConfig, reached_threshold: float = 0.5,
                 subtask_budget: float = 2.0):
        super().__init__(policy, reached_threshold)
        self.env_cfg, self.subtask_budget = env_cfg, subtask_budget
        self._twin = None
        self.keyframes: list[np.ndarray] = []
        self.expert_steps: list[int] = []

    @property
    def num_subtasks(self) -> int:
        return len(self.keyframes)

    def keyframe(self, index: int) -> np.ndarray:
        return self.keyframes[index]

    @property
    def goal_text(self) -> str | None:
        import envs

        subtasks = envs.task_spec(self.env_cfg.name).env_cls().subtasks
        return subtasks[self.subtask_index] if self.subtask_index < len(subtasks) else None

    def budget(self, index: int) -> int | None:
        return int(np.ceil(self.subtask_budget * self.expert_steps[index])) + 1

    def reset(self, obs: dict, info: dict) -> None:
        super().reset(obs, info)
        if "seed" not in info:
            raise ValueError("oracle_subgoal needs the episode's seed in the reset info (emu_world.episodes.run_episode)")
        self.keyframes, self.expert_steps = expert_keyframes(self._twin_env(), self.env_cfg.name, int(info["seed"]),
                                                             self.camera)

    def _twin_env(self):
        if self._twin is None:
            self._twin = self.env_cfg.make()
        return self._twin

    def close(self) -> None:
        if self._twin is not None:
            self._twin.close()
            self._twin = None


class WorldModelAgent(SubgoalAgent):
    """The product: the planner imagines the subtask and its keyframe with the world model
    (:mod:`emu_world.planner`), the goal head reaches it. Plans are made when the episode starts, when
    the head says the keyframe is reached (the next subtask), when the subtask's step budget ran out
    (the next subtask), and, with ``replan=chunk``, before every new chunk (the same subtask, imagined
    again from the current frame). Planning time counts in the agent's time."""

    may_go_back = True  # the planner's back votes may return to an earlier subtask

    def __init__(self, policy: GoalHeadPolicy, planner: Any, subtask_steps: list[int], replan: str = "reached",
                 reached_threshold: float = 0.5, subtask_budget: float = 2.0):
        super().__init__(policy, reached_threshold)
        if replan not in REPLANS:
            raise UserError(f"agent.replan must be one of {REPLANS}, got {replan!r}")
        self.planner, self.replan, self.subtask_budget = planner, replan, subtask_budget
        self.subtask_steps = subtask_steps
        self.plan = None
        self.planner_seconds = 0.0

    @property
    def num_subtasks(self) -> int:
        return len(self.planner.subtasks)

    def keyframe(self, index: int) -> np.ndarray:
        return self.plan.keyframe

    def goal_frame(self) -> np.ndarray | None:
        return self.plan.keyframe if self.plan is not None else None

    @property
    def goal_text(self) -> str | None:
        return self.plan.text if self.plan is not None else None

    def budget(self, index: int) -> int | None:
        steps = self.subtask_steps[index] if index < len(self.subtask_steps) else max(self.subtask_steps)
        return int(np.ceil(self.subtask_budget * steps)) + 1

    def reset(self, obs: dict, info: dict) -> None:
        super().reset(obs, info)
        self.planner.reset()
        self.plan, self.planner_seconds = None, 0.0

    def _plan(self, obs: dict, reached: bool = False, budget: bool = False) -> None:
        self.plan = self.planner.plan(np.asarray(obs["pixels"][self.camera]), reached=reached, budget=budget)
        self.planner_seconds += self.plan.seconds
        if self.plan.subtask_index != self.subtask_index:
            self.advances.append({"subtask": self.subtask_index, "after_steps": self.steps_in_subtask,
                                  "why": self.plan.reason})
            self.subtask_index, self.steps_in_subtask = self.plan.subtask_index, 0
            self.policy.reset()  # the queued actions pursued the old keyframe

    def before_query(self, obs: dict) -> None:
        if self.plan is None:
            self._plan(obs)
            return
        budget = self.budget(self.subtask_index)
        if budget is not None and self.steps_in_subtask >= budget:
            self._plan(obs, budget=True)  # the next subtask; on the last, a fresh keyframe (and a vote to go back)
            self.steps_in_subtask = 0
        elif self.replan == "chunk" and self.policy.needs_query():
            self._plan(obs)

    def on_reached(self, obs: dict) -> None:
        self._plan(obs, reached=True)

    def report(self) -> dict[str, Any]:
        return {"advances": list(self.advances), "plans": self.planner.summary(), "planner": self.planner.describe(),
                "planner_seconds": round(self.planner_seconds, 4), "replans": len(self.planner.history)}

    def images(self) -> list[tuple[str, np.ndarray]]:
        """The keyframes imagined in the episode, labelled (for the evaluation's pictures)."""
        return [(f"{i}: {p.reason} -> {p.subtask_index}", p.keyframe) for i, p in enumerate(self.planner.history)]

    def picture_rows(self, last_frame: np.ndarray | None = None) -> tuple[list[str], list[tuple[str, list[np.ndarray]]]]:
        """The episode as a strip: the camera frame each plan was made from (the previous keyframe's result)
        above the keyframe imagined from it, and ``last_frame`` (how the episode ended) in a last column."""
        labels, imagined = (list(x) for x in zip(*self.images())) if self.planner.history else ([], [])
        camera = [p.frame for p in self.planner.history]
        if last_frame is not None:
            labels.append("end")
            camera.append(np.asarray(last_frame))
        return labels, [("camera, when planned", camera), ("imagined keyframe", imagined)]


REPLANS = ("reached", "chunk")


def subtask_steps(policy_path: Path) -> list[int]:
    """Median expert steps per subtask of the goal head's training data (its manifest's record, else its
    dataset's annotations): the world-model agent's step budgets."""
    import json

    from emu_world.data.policy_samples import dataset_subtask_steps
    from emu_world.data.robot_dataset import RobotDataset

    manifest = json.loads((policy_path / "manifest.json").read_text()) if (policy_path / "manifest.json").is_file() \
        else {}
    if manifest.get("data", {}).get("subtask_steps"):
        return [int(x) for x in manifest["data"]["subtask_steps"]]
    root = resolve_path(manifest.get("data", {}).get("root", ""))
    if not manifest or not (root / "meta" / "info.json").is_file():
        raise UserError(f"{policy_path} does not say how long its task's subtasks take (manifest.json with data.root); "
                        "re-export it with `python -m emu_world.train stage=policy`")
    return dataset_subtask_steps(RobotDataset(root, check_videos=False))


def expert_run(env, task: str, seed: int, camera: str) -> tuple[np.ndarray, np.ndarray]:
    """Run the scripted expert of ``task`` on ``env`` with ``seed``: the observed frames (T, H, W, 3) and the
    expert's subtask index at each step (T,)."""
    import envs

    expert = envs.make_expert(task, env)
    frames: list[np.ndarray] = []
    subtasks: list[int] = []

    def on_step(obs, action, next_obs, reward, terminated, truncated, info, subtask):
        frames.append(np.asarray(obs["pixels"][camera]))
        subtasks.append(int(subtask))

    run_episode(env, expert, seed, on_step=on_step)
    return np.stack(frames), np.asarray(subtasks, dtype=np.int64)


def subtask_keyframes(labels: np.ndarray) -> list[int]:
    """The keyframe step of each subtask of an expert run that ended at success: the first step of the next
    subtask, the last step for the last subtask (the recorded datasets' rule,
    :func:`~emu_world.data.robot_dataset.subtasks_from_indices`)."""
    from emu_world.data.robot_dataset import subtasks_from_indices

    names = [str(k) for k in range(int(labels.max()) + 1)]
    return [s.keyframe for s in subtasks_from_indices(labels, names)]


def expert_keyframes(env, task: str, seed: int, camera: str) -> tuple[list[np.ndarray], list[int]]:
    """The keyframe of each of the expert's subtasks for ``seed`` and the steps each took (the run ends at
    success, so the last keyframe is the frame the task was done from)."""
    frames, labels = expert_run(env, task, seed, camera)
    keyframes = [frames[t] for t in subtask_keyframes(labels)]
    return keyframes, [int((labels == k).sum()) for k in range(len(keyframes))]


def make_agent(agent_cfg: AgentConfig, env_cfg: EnvConfig, env) -> Agent:
    """The agent ``agent_cfg`` names, for ``env``."""
    if agent_cfg.name == "scripted":
        import envs

        return envs.make_expert(env_cfg.name, env)
    if agent_cfg.name == "bc":
        return PolicyAgent(load_policy(agent_cfg, env_cfg, want_goal=False))
    if agent_cfg.name == "oracle_subgoal":
        return OracleSubgoalAgent(load_policy(agent_cfg, env_cfg, want_goal=True), env_cfg,
                                  agent_cfg.reached_threshold, agent_cfg.subtask_budget)
    if agent_cfg.name == "world_model":
        from omegaconf import OmegaConf

        from emu_world.config import to_dataclass
        from emu_world.planner import Planner, PlannerConfig

        policy = load_policy(agent_cfg, env_cfg, want_goal=True)
        planner = Planner(to_dataclass(PlannerConfig, OmegaConf.create(dict(agent_cfg.planner))), env_cfg.name)
        return WorldModelAgent(policy, planner, subtask_steps(resolve_path(str(agent_cfg.checkpoint))),
                               agent_cfg.replan, agent_cfg.reached_threshold, agent_cfg.subtask_budget)
    if agent_cfg.name == "act":
        from policies.act import LeRobotACTAgent

        return LeRobotACTAgent.load(Path(resolve_path(str(agent_cfg.checkpoint))), env_cfg, agent_cfg.n_action_steps,
                                    agent_cfg.temporal_ensemble_coeff)
    raise UserError(f"unknown agent {agent_cfg.name!r}")
