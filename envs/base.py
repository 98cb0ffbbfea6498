"""Shared machinery for emu-world's MuJoCo tasks.

Every task is a :class:`TaskEnv` (a ``gymnasium.Env``) plus a :class:`ScriptedExpert`
written against that env's public methods. This module holds what they share:

- the fast offscreen renderer (shadows, reflections and multisampling off; one
  ``mujoco.Renderer`` reused for every named camera),
- the action contract: wrong shapes and non-finite values raise :class:`ActionError`;
  finite values are clipped to the action space (actuator / joint limits) and, where a task
  declares one, to a maximum change of joint target per control step,
- the observation contract shared with gym-aloha / LeRobot:
  ``{"pixels": {camera: (H, W, 3) uint8}, "agent_pos": (D,) float32}``,
- the ``info`` contract: ``is_success`` (bool), ``subtask_progress`` (int, stages completed
  according to the simulator's geometry), ``num_subtasks`` and ``task`` (instruction text),
- subtask annotations: the expert reports which subtask each action belongs to and
  :class:`AnnotationTracker` turns that into ``(text, start_step, end_step)`` records; the
  keyframe of a subtask is the observation after its last step.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from envs.gl import RenderError, gl_failure_message

ImageSize = tuple[int, int]


class ActionError(ValueError):
    """An action the env refuses to send to its actuators (wrong shape, NaN or inf)."""


def as_image_size(size: int | Sequence[int]) -> ImageSize:
    """Normalise ``128`` or ``(128, 160)`` to ``(height, width)`` and validate it."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = [int(v) for v in size]
        if len(vals) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
        h, w = vals
    if h < 8 or w < 8 or h > 4096 or w > 4096:
        raise ValueError(f"image_size {(h, w)} is out of range: use 8..4096 pixels per side")
    return h, w


class FastRenderer:
    """One offscreen ``mujoco.Renderer`` reused for every camera, tuned for speed.

    Shadows and reflections are switched off after every ``update_scene`` (MuJoCo re-enables
    scene flags from the model on each update) and offscreen multisampling is disabled, which
    takes the ALOHA scene from ~10 to ~100 frames/s at 128x128 on a CPU (llvmpipe).
    """

    def __init__(self, model: mujoco.MjModel, image_size: ImageSize):
        self.height, self.width = image_size
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), self.width)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), self.height)
        try:
            self._renderer = mujoco.Renderer(model, height=self.height, width=self.width)
        except Exception as e:  # mujoco.FatalError, or PyOpenGL's errors from inside mujoco's GL context
            raise RenderError(gl_failure_message(str(e))) from None
        self._option = mujoco.MjvOption()

    def render(self, data: mujoco.MjData, camera: str | int | mujoco.MjvCamera) -> np.ndarray:
        self._renderer.update_scene(data, camera=camera, scene_option=self._option)
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
        return self._renderer.render().copy()  # (H, W, 3) uint8

    def close(self) -> None:
        self._renderer.close()


def solve_ik(
    model: mujoco.MjModel,
    data: mujoco.MjData,
    body: int,
    offset: np.ndarray,
    qpos_adr: np.ndarray,
    dof_adr: np.ndarray,
    joint_range: np.ndarray,
    q_init: np.ndarray,
    pos: np.ndarray,
    rot: np.ndarray | None = None,
    iters: int = 60,
    tol: float = 1e-4,
    rot_weight: float = 0.3,
    damping: float = 1e-3,
) -> tuple[np.ndarray, float]:
    """Damped-least-squares inverse kinematics for a point fixed on ``body``.

    ``data`` is a scratch ``MjData`` (its qpos is overwritten at ``qpos_adr``; keep the sim's
    own data out of it). The point is ``offset`` in the body frame; the target is ``pos`` and,
    optionally, the body orientation ``rot`` (3x3). Joints are clamped to ``joint_range``
    (n, 2) every iteration. Returns ``(q, position_error_m)``.
    """
    q = np.asarray(q_init, dtype=np.float64).copy()
    lo, hi = joint_range[:, 0], joint_range[:, 1]
    jacp = np.zeros((3, model.nv))
    jacr = np.zeros((3, model.nv))
    quat = np.zeros(4)
    vel = np.zeros(3)
    err_pos = np.inf
    for _ in range(iters):
        data.qpos[qpos_adr] = q
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        cur_rot = data.xmat[body].reshape(3, 3)
        point = data.xpos[body] + cur_rot @ offset
        e = pos - point
        err_pos = float(np.linalg.norm(e))
        mujoco.mj_jac(model, data, jacp, jacr, point, body)
        J = jacp[:, dof_adr]
        if rot is not None:
            # orientation error as a rotation vector: log(R_target R_current^T)
            mujoco.mju_mat2Quat(quat, (rot @ cur_rot.T).reshape(-1))
            mujoco.mju_quat2Vel(vel, quat, 1.0)
            if err_pos < tol and np.linalg.norm(vel) < 10 * tol:
                break
            e = np.concatenate([e, rot_weight * vel])
            J = np.vstack([J, rot_weight * jacr[:, dof_adr]])
        elif err_pos < tol:
            break
        dq = J.T @ np.linalg.solve(J @ J.T + damping * np.eye(J.shape[0]), e)
        q = np.clip(q + dq, lo, hi)
    return q, err_pos


@dataclass(frozen=True)
class SubtaskAnnotation:
    """One subtask of an episode: its text and the env steps it spans (inclusive).

    ``end_step`` is the index of the last action of the subtask; the keyframe that ends it is
    the observation returned by that step (frame index ``end_step + 1`` when frame 0 is the
    reset observation).
    """

    index: int
    text: str
    start_step: int
    end_step: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "start_step": self.start_step,
                "end_step": self.end_step}


class AnnotationTracker:
    """Turns the expert's per-step subtask index into :class:`SubtaskAnnotation` records. ``may_go_back``:
    the index may decrease (an agent whose planner goes back to an earlier subtask; a new record each time)."""

    def __init__(self, subtasks: Sequence[str], may_go_back: bool = False):
        self.subtasks = tuple(subtasks)
        self.may_go_back = may_go_back
        self.per_step: list[int] = []

    def record(self, subtask_index: int) -> None:
        if not 0 <= subtask_index < len(self.subtasks):
            raise ValueError(f"subtask index {subtask_index} outside 0..{len(self.subtasks) - 1}")
        if not self.may_go_back and self.per_step and subtask_index < self.per_step[-1]:
            raise ValueError("subtask indices must not decrease within an episode")
        self.per_step.append(int(subtask_index))

    def annotations(self) -> list[SubtaskAnnotation]:
        out: list[SubtaskAnnotation] = []
        for step, idx in enumerate(self.per_step):
            if out and out[-1].index == idx:
                last = out[-1]
                out[-1] = SubtaskAnnotation(idx, last.text, last.start_step, step)
            else:
                out.append(SubtaskAnnotation(idx, self.subtasks[idx], step, step))
        return out


class TaskEnv(gym.Env, abc.ABC):
    """Base class of every emu-world MuJoCo task.

    Subclasses set the class attributes below, build ``self.model``/``self.data`` in
    ``__init__`` *before* calling :meth:`_setup`, and implement ``_apply_action``,
    ``_randomize``, ``_state``, ``_evaluate`` (success, progress) and optionally
    ``_render_camera`` (for cameras that are not fixed model cameras).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 50}

    task: ClassVar[str]  # the instruction text given to agents
    subtasks: ClassVar[tuple[str, ...]]  # the expert's subtask texts, in order
    camera_names: ClassVar[tuple[str, ...]]  # cameras this env can render
    default_cameras: ClassVar[tuple[str, ...]]  # cameras observed unless told otherwise
    control_hz: ClassVar[float]
    action_names: ClassVar[tuple[str, ...]]  # one name per action dimension
    state_names: ClassVar[tuple[str, ...]]  # one name per agent_pos dimension
    # False for open-ended tasks (exploration): every episode that runs to its end is kept
    has_success: ClassVar[bool] = True
    # largest allowed change of a joint target per control step (radians or metres),
    # per action dimension; None disables the step-size limit
    max_action_step: ClassVar[np.ndarray | None] = None

    def __init__(
        self,
        render_mode: str | None = "rgb_array",
        cameras: Sequence[str] | None = None,
        image_size: int | Sequence[int] = 128,
        observe_pixels: bool = True,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r} is not supported: use 'rgb_array' or None")
        self.render_mode = render_mode
        self.cameras = tuple(cameras) if cameras else tuple(self.default_cameras)
        unknown = [c for c in self.cameras if c not in self.camera_names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown camera(s) {unknown}; available: {list(self.camera_names)}"
            )
        self.image_size = as_image_size(image_size)
        self.observe_pixels = observe_pixels
        self._renderer: FastRenderer | None = None
        self._last_target: np.ndarray | None = None
        self._step_count = 0
        self.action_clipped = False
        self.last_action: np.ndarray | None = None

    # -- construction helpers ---------------------------------------------------------------
    def _setup(self, action_low: np.ndarray, action_high: np.ndarray) -> None:
        """Declare the spaces once the model exists."""
        n = len(self.action_names)
        if action_low.shape != (n,) or action_high.shape != (n,):
            raise AssertionError("action bounds must match action_names")
        self.action_space = spaces.Box(action_low.astype(np.float32), action_high.astype(np.float32),
                                       dtype=np.float32)
        h, w = self.image_size
        obs: dict[str, spaces.Space] = {
            "agent_pos": spaces.Box(-np.inf, np.inf, (len(self.state_names),), dtype=np.float32)
        }
        if self.observe_pixels:
            obs["pixels"] = spaces.Dict(
                {c: spaces.Box(0, 255, (h, w, 3), dtype=np.uint8) for c in self.cameras}
            )
        self.observation_space = spaces.Dict(obs)

    @property
    def renderer(self) -> FastRenderer:
        if self._renderer is None:
            self._renderer = FastRenderer(self.model, self.image_size)
        return self._renderer

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._step_count = 0
        self._randomize(self.np_random, options or {})
        self._last_target = None
        obs = self._observation()
        return obs, self._info()

    def step(self, action):
        target = self.validate_action(action)
        self._apply_action(target)
        self._last_target = target
        self.last_action = target  # what the actuators were sent (after limits)
        self._step_count += 1
        obs = self._observation()
        info = self._info()
        reward = float(info["subtask_progress"])
        terminated = bool(info["is_success"])
        return obs, reward, terminated, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        return self.render_camera(self.cameras[0])

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- public helpers -----------------------------------------------------------------------
    def validate_action(self, action) -> np.ndarray:
        """Check shape and finiteness, then clip to the limits. Returns float64 targets."""
        a = np.asarray(action, dtype=np.float64)
        expected = self.action_space.shape
        if a.shape != expected:
            raise ActionError(
                f"{type(self).__name__}: action has shape {a.shape}, expected {expected} "
                f"({', '.join(self.action_names)}). Reshape the policy output to {expected}."
            )
        bad = ~np.isfinite(a)
        if bad.any():
            names = [self.action_names[i] for i in np.flatnonzero(bad)]
            raise ActionError(
                f"{type(self).__name__}: action has non-finite values (NaN/inf) in {names}; "
                "nothing was sent to the actuators. Check the policy output or its normalisation stats."
            )
        clipped = np.clip(a, self.action_space.low, self.action_space.high)
        if self.max_action_step is not None:
            ref = self._last_target if self._last_target is not None else self._current_targets()
            if ref is not None:
                step = np.asarray(self.max_action_step, dtype=np.float64)
                clipped = np.clip(clipped, ref - step, ref + step)
        self.action_clipped = bool(np.any(np.abs(clipped - a) > 1e-9))
        return clipped

    def render_camera(self, camera: str) -> np.ndarray:
        """Render one named camera at ``image_size``: (H, W, 3) uint8."""
        if camera not in self.camera_names:
            raise ValueError(f"unknown camera {camera!r}; available: {list(self.camera_names)}")
        return self._render_camera(camera)

    @property
    def step_count(self) -> int:
        return self._step_count

    @property
    def dt(self) -> float:
        return 1.0 / self.control_hz

    # -- internals ----------------------------------------------------------------------------
    def _render_camera(self, camera: str) -> np.ndarray:
        return self.renderer.render(self.data, camera)

    def _observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = {"agent_pos": self._state().astype(np.float32)}
        if self.observe_pixels:
            obs["pixels"] = {c: self._render_camera(c) for c in self.cameras}
        return obs

    def _info(self) -> dict[str, Any]:
        success, progress = self._evaluate()
        return {
            "is_success": bool(success),
            "subtask_progress": int(progress),
            "num_subtasks": len(self.subtasks),
            "task": self.task,
            "action_clipped": self.action_clipped,
        }

    def _current_targets(self) -> np.ndarray | None:
        """Targets equivalent to 'hold still', used as the reference of the step-size limit."""
        return None

    @abc.abstractmethod
    def _randomize(self, rng: np.random.Generator, options: dict) -> None:
        """Reset ``self.data`` and sample the episode's initial state."""

    @abc.abstractmethod
    def _apply_action(self, action: np.ndarray) -> None:
        """Send validated, clipped targets to the actuators and advance one control step."""

    @abc.abstractmethod
    def _state(self) -> np.ndarray:
        """Proprioception, in the same convention as the action where the task allows."""

    @abc.abstractmethod
    def _evaluate(self) -> tuple[bool, int]:
        """(success, number of task stages completed), from the simulator's state."""


class ScriptedExpert(abc.ABC):
    """A scripted demonstrator for one task, using only the env's public methods.

    ``reset`` is called with the first observation; ``act`` returns the next action and
    updates ``subtask_index`` (the subtask that action belongs to; never decreases).
    """

    def __init__(self, env: TaskEnv):
        self.env = env
        self.subtask_index = 0

    @property
    def subtasks(self) -> tuple[str, ...]:
        return self.env.subtasks

    @abc.abstractmethod
    def reset(self, obs: dict, info: dict) -> None: ...

    @abc.abstractmethod
    def act(self, obs: dict, info: dict) -> np.ndarray: ...
