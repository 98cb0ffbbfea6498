"""emu-world's MuJoCo task suite.

Importing this package registers every task with gymnasium under the ``emu_world/``
namespace; :data:`TASKS` is the registry that the CLIs and the tests walk::

    import gymnasium as gym
    import envs
    env = gym.make("emu_world/AlohaFold-v0", image_size=128)
    expert = envs.make_expert("aloha_fold", env)

Adding a task is one module here (env + scripted expert) plus one entry below and one
``configs/env/<name>.yaml``.
"""

from __future__ import annotations

# MuJoCo picks its GL backend at import time, and gymnasium may import it: set it first, and check
# that it can work here (envs.gl names the package or setting that fixes it).
from envs.gl import RenderError, check_gl_backend, gl_failure_message, select_backend

select_backend()
check_gl_backend()
try:
    import mujoco  # noqa: E402,F401
except Exception as e:  # PyOpenGL's errors from inside mujoco's GL context module
    raise RenderError(gl_failure_message(f"{type(e).__name__}: {e}")) from None

import importlib  # noqa: E402
from dataclasses import dataclass

import gymnasium as gym  # noqa: E402

from envs.base import (  # noqa: E402
    ActionError,
    AnnotationTracker,
    ScriptedExpert,
    SubtaskAnnotation,
    TaskEnv,
)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's env and expert live and how long its episodes are."""

    name: str  # short name used by configs: env=<name>
    gym_id: str  # registered gymnasium id
    module: str  # module holding the env and expert classes
    env_class: str
    expert_class: str
    max_episode_steps: int

    def env_cls(self) -> type[TaskEnv]:
        return getattr(importlib.import_module(self.module), self.env_class)

    def expert_cls(self) -> type[ScriptedExpert]:
        return getattr(importlib.import_module(self.module), self.expert_class)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("aloha_fold", "emu_world/AlohaFold-v0", "envs.aloha_fold",
                 "AlohaFoldEnv", "AlohaFoldExpert", 600),
        TaskSpec("aloha_transfer_cube", "emu_world/AlohaTransferCube-v0", "envs.aloha_transfer_cube",
                 "AlohaTransferCubeEnv", "AlohaTransferCubeExpert", 400),
        TaskSpec("aloha_insertion", "emu_world/AlohaInsertion-v0", "envs.aloha_insertion",
                 "AlohaInsertionEnv", "AlohaInsertionExpert", 400),
        TaskSpec("widowx_pick_place", "emu_world/WidowXPickPlace-v0", "envs.widowx_pick_place",
                 "WidowXPickPlaceEnv", "WidowXPickPlaceExpert", 120),
        TaskSpec("explore_room", "emu_world/ExploreRoom-v0", "envs.explore_room",
                 "ExploreRoomEnv", "ExploreRoomExplorer", 200),
    )
}


def _register() -> None:
    for spec in TASKS.values():
        if spec.gym_id not in gym.registry:
            gym.register(
                id=spec.gym_id,
                entry_point=f"{spec.module}:{spec.env_class}",
                max_episode_steps=spec.max_episode_steps,
            )


_register()


def task_spec(name: str) -> TaskSpec:
    """Look a task up by short name (``aloha_fold``) or gym id; unknown names list the choices."""
    if name in TASKS:
        return TASKS[name]
    for spec in TASKS.values():
        if spec.gym_id == name:
            return spec
    raise KeyError(f"unknown task {name!r}; available: {sorted(TASKS)}")


def make(name: str, **kwargs) -> gym.Env:
    """``gym.make`` by short name or gym id (kwargs go to the env: image_size, cameras, ...)."""
    return gym.make(task_spec(name).gym_id, **kwargs)


def make_expert(name: str, env: gym.Env) -> ScriptedExpert:
    """The scripted expert of a task, bound to the (unwrapped) env it will drive."""
    return task_spec(name).expert_cls()(env.unwrapped)


__all__ = [
    "TASKS", "TaskSpec", "task_spec", "make", "make_expert", "TaskEnv", "ScriptedExpert",
    "ActionError", "AnnotationTracker", "SubtaskAnnotation",
]
