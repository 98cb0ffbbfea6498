"""Typed views of the Hydra configs in ``configs/``, with cross-field checks.

Hydra composes YAML (struct mode, so a typo such as ``env.imagesize=64`` is rejected with the
list of valid keys); these dataclasses then validate the values against the code they
describe, so a wrong shape fails at start-up with a message naming the fix, not deep inside a
rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from emu_world.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_path(path: str | Path) -> Path:
    """A path as given, or relative to the repository root (so shipped defaults such as
    ``checkpoints/tokenizer`` work from any working directory)."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p


@dataclass
class EnvConfig:
    """``configs/env/<name>.yaml``: one simulated task and how it is observed."""

    name: str
    gym_id: str
    fps: float  # control frequency
    action_dim: int
    state_dim: int
    cameras: list[str] = field(default_factory=list)
    image_size: int = 128
    max_episode_steps: int = 400

    def __post_init__(self) -> None:
        import envs  # local: importing envs registers gymnasium ids and sets MUJOCO_GL

        spec = envs.task_spec(self.name)  # KeyError lists the known tasks
        if spec.gym_id != self.gym_id:
            raise ValueError(
                f"env config {self.name!r}: gym_id {self.gym_id!r} does not match the registry "
                f"({spec.gym_id!r}); fix configs/env/{self.name}.yaml"
            )
        if not self.cameras:
            raise ValueError(f"env config {self.name!r}: list at least one camera in env.cameras")
        if not 8 <= int(self.image_size) <= 4096:
            raise ValueError(f"env.image_size={self.image_size} is out of range (8..4096)")
        if self.max_episode_steps <= 0:
            raise ValueError(f"env.max_episode_steps must be positive, got {self.max_episode_steps}")
        env_cls = spec.env_cls()
        unknown = [c for c in self.cameras if c not in env_cls.camera_names]
        if unknown:
            raise ValueError(
                f"env.cameras: {unknown} not available in {self.name}; choose from {list(env_cls.camera_names)}"
            )
        if self.action_dim != len(env_cls.action_names) or self.state_dim != len(env_cls.state_names):
            raise ValueError(
                f"env config {self.name!r}: action_dim/state_dim {self.action_dim}/{self.state_dim} do not "
                f"match the env ({len(env_cls.action_names)}/{len(env_cls.state_names)})"
            )
        if abs(self.fps - env_cls.control_hz) > 1e-6:
            raise ValueError(f"env config {self.name!r}: fps {self.fps} != env control rate {env_cls.control_hz}")

    def make(self, **overrides: Any):
        """Build the gymnasium env this config describes (TimeLimit included)."""
        import envs

        kwargs: dict[str, Any] = {"cameras": list(self.cameras), "image_size": int(self.image_size)}
        kwargs.update(overrides)
        return envs.make(self.name, max_episode_steps=int(self.max_episode_steps), **kwargs)


@dataclass
class AgentConfig:
    """``configs/agent/<name>.yaml``: what acts in the env (:func:`emu_world.agents.make_agent`)."""

    name: str
    checkpoint: str | None = None  # a policy folder (bc, oracle_subgoal) or LeRobot's pretrained_model folder (act)
    n_action_steps: int | None = None  # actions executed per chunk (null: the checkpoint's)
    temporal_ensemble_coeff: float | None = None  # query every step and average chunks (null: the checkpoint's)
    reached_threshold: float = 0.5  # subgoal agents advance when the head's reached probability exceeds this
    subtask_budget: float = 2.0  # ... or when a subtask took this many times the expert's steps for it
    replan: str = "reached"  # world_model: reached (a new keyframe per subtask) | chunk (re-imagined every chunk)
    planner: dict = field(default_factory=dict)  # world_model: emu_world.planner.PlannerConfig settings

    def __post_init__(self) -> None:
        if self.name not in AGENTS:
            raise ValueError(f"unknown agent {self.name!r}; available: {sorted(AGENTS)}")
        if self.name != "scripted" and not self.checkpoint:
            raise ValueError(f"agent={self.name} needs agent.checkpoint=<folder>")
        if not 0.0 < self.reached_threshold < 1.0 or self.subtask_budget <= 0:
            raise ValueError("agent.reached_threshold must be in (0, 1) and agent.subtask_budget > 0")
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ValueError(f"agent.n_action_steps must be >= 1 or null, got {self.n_action_steps}")
        if self.temporal_ensemble_coeff is not None and self.temporal_ensemble_coeff < 0:
            raise ValueError(f"agent.temporal_ensemble_coeff must be >= 0 or null, got {self.temporal_ensemble_coeff}")


# Agents the evaluation harness can build (emu_world/agents.py).
AGENTS = ("scripted", "bc", "oracle_subgoal", "act", "world_model")


def to_dataclass(cls: type, cfg: DictConfig) -> Any:
    """Instantiate a config dataclass from a (sub)config, rejecting unknown keys clearly; a value its
    checks refuse (``__post_init__``) is a :class:`~emu_world.errors.UserError` with their message."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    known = set(cls.__dataclass_fields__)
    extra = sorted(set(data) - known)
    if extra:
        raise UserError(f"{cls.__name__}: unknown key(s) {extra}; valid keys: {sorted(known)}")
    try:
        return cls(**data)
    except UserError:
        raise
    except (ValueError, KeyError) as e:  # the config's own checks: the user's values
        raise UserError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from e
