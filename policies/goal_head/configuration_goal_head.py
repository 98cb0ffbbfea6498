"""Configuration of the goal-conditioned policy head (:mod:`policies.goal_head.modeling_goal_head`).

``configs/train.yaml``'s ``policy:`` section; the same dataclass is saved in the checkpoint's
``config.json`` beside the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

GOALS = ("keyframe", "none")


@dataclass
class GoalHeadConfig:
    """The current camera frame, the subgoal keyframe (the frame that ends the current subtask) and the
    proprioception in; an action chunk out (ACT-style), plus the probability that the frame has reached
    the keyframe (the agent advances its subgoal on it). ``goal: none`` is the behaviour-cloning
    baseline: the same network without the keyframe."""

    goal: str = "keyframe"  # keyframe | none (behaviour cloning)
    # what the data fixes (null: taken from the training dataset by :meth:`resolved`)
    camera: str | None = None  # the observed camera (short name); null: the dataset's first
    image_size: int | None = None  # frames are (image_size, image_size, 3)
    action_dim: int | None = None
    state_dim: int | None = None
    fps: float | None = None  # control rate of the robot the head drives
    channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64])  # conv widths
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])  # ... and strides (first kernel 5, then 3)
    keypoints: int = 32  # spatial-softmax keypoints of the last feature map
    hidden: int = 256  # MLP width
    chunk_size: int | None = None  # actions predicted per query; null: 0.4 s of control steps (20 at 50 Hz)
    n_action_steps: int | None = None  # actions executed from each chunk before the next query; null: chunk_size
    temporal_ensemble_coeff: float | None = None  # ACT's exponential weight m: query every step, average chunks
    reached_margin: int | None = None  # a frame this many steps or fewer before its keyframe has reached it
    #                                    (the reached head's target); null: 0.06 s, at least one step (3 steps at
    #                                    50 Hz, 1 at 5 Hz; 0 at 5 Hz measured worse on widowx: 57/100 against 68/100)
    reached_weight: float = 0.1  # weight of the reached head's binary cross-entropy next to the action L1

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ValueError(f"policy.goal must be one of {GOALS}, got {self.goal!r}")
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError(f"policy.channels and policy.strides must be lists of one length, got "
                             f"{self.channels} and {self.strides}")
        sizes = [v for v in (self.chunk_size, self.n_action_steps, self.keypoints, self.hidden, self.image_size,
                             self.action_dim, self.state_dim) if v is not None]
        if min(sizes) < 1:
            raise ValueError("policy.chunk_size, n_action_steps, keypoints, hidden, image_size, action_dim and "
                             "state_dim must be >= 1")
        if self.chunk_size is not None and self.n_action_steps is not None and self.n_action_steps > self.chunk_size:
            raise ValueError(f"policy.n_action_steps={self.n_action_steps} exceeds policy.chunk_size="
                             f"{self.chunk_size}: a chunk cannot be executed past its end")
        if self.temporal_ensemble_coeff is not None and self.temporal_ensemble_coeff < 0:
            raise ValueError(f"policy.temporal_ensemble_coeff must be >= 0 or null, got {self.temporal_ensemble_coeff}")
        if (self.reached_margin is not None and self.reached_margin < 0) or self.reached_weight < 0:
            raise ValueError("policy.reached_margin and policy.reached_weight must be >= 0")

    def resolved(self, camera: str, image_size: int, action_dim: int, state_dim: int, fps: float) -> "GoalHeadConfig":
        """This config with what it leaves open taken from the data: camera, sizes, rate, and the
        rate-dependent defaults (chunk, executed steps, reached margin)."""
        fps = float(self.fps if self.fps is not None else fps)
        chunk = self.chunk_size if self.chunk_size is not None else max(1, round(0.4 * fps))
        return replace(self, camera=self.camera or camera,
                       image_size=self.image_size if self.image_size is not None else image_size,
                       action_dim=self.action_dim if self.action_dim is not None else action_dim,
                       state_dim=self.state_dim if self.state_dim is not None else state_dim, fps=fps,
                       chunk_size=chunk, n_action_steps=self.n_action_steps if self.n_action_steps is not None else chunk,
                       reached_margin=self.reached_margin if self.reached_margin is not None else max(1, round(0.06 * fps)))

    @property
    def is_resolved(self) -> bool:
        return None not in (self.camera, self.image_size, self.action_dim, self.state_dim, self.fps, self.chunk_size,
                            self.n_action_steps, self.reached_margin)

    @property
    def uses_goal(self) -> bool:
        return self.goal != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GoalHeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GoalHeadConfig: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**data)
