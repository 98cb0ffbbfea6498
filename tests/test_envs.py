"""Registry-driven checks that every task honours the env contract (envs/base.py).

A new task joins these tests by registering in ``envs.TASKS``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs import ActionError

TASK_NAMES = sorted(envs.TASKS)
SIZE = 64  # small frames keep the suite fast; the default 128 is checked once below


def make(name: str, **kwargs) -> gym.Env:
    kwargs.setdefault("image_size", SIZE)
    return envs.make(name, **kwargs)


def check_obs(env: gym.Env, obs: dict) -> None:
    u = env.unwrapped
    assert set(obs) == {"pixels", "agent_pos"}
    assert obs["agent_pos"].dtype == np.float32
    assert obs["agent_pos"].shape == (len(u.state_names),)
    assert np.isfinite(obs["agent_pos"]).all()
    assert set(obs["pixels"]) == set(u.cameras)
    for img in obs["pixels"].values():
        assert img.dtype == np.uint8 and img.shape == (*u.image_size, 3)
        assert img.std() > 1.0, "camera frame is blank"
    assert env.observation_space.contains(obs)


def check_info(info: dict) -> None:
    assert isinstance(info["is_success"], bool)
    assert isinstance(info["subtask_progress"], int) and info["subtask_progress"] >= 0
    assert info["num_subtasks"] >= 1
    assert isinstance(info["task"], str) and info["task"]


def hold_action(env: gym.Env) -> np.ndarray | int:
    """A 'do nothing' action: the current state for joint targets, zero deltas, 'stay'."""
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return 0
    return np.zeros(space.shape, dtype=np.float32)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_reset_step_render(name):
    env = make(name)
    try:
        obs, info = env.reset(seed=0)
        check_obs(env, obs)
        check_info(info)
        env.action_space.seed(0)
        for action in [hold_action(env), env.action_space.sample(), env.action_space.sample()]:
            obs, reward, terminated, truncated, info = env.step(action)
            check_obs(env, obs)
            check_info(info)
            assert np.isfinite(reward)
            assert isinstance(terminated, bool) and isinstance(truncated, bool)
        frame = env.render()
        assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    finally:
        env.close()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_first_frame(name):
    a, b = make(name), make(name)
    try:
        obs_a, _ = a.reset(seed=7)
        obs_b, _ = b.reset(seed=7)
        cam = a.unwrapped.cameras[0]
        np.testing.assert_array_equal(obs_a["pixels"][cam], obs_b["pixels"][cam])
        np.testing.assert_array_equal(obs_a["agent_pos"], obs_b["agent_pos"])
        obs_c, _ = a.reset(seed=8)
        assert not np.array_equal(obs_a["pixels"][cam], obs_c["pixels"][cam]), "seed does not change the scene"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_bad_actions_raise_clear_errors(name):
    env = make(name, observe_pixels=False)
    try:
        env.reset(seed=0)
        space = env.action_space
        if isinstance(space, gym.spaces.Discrete):
            bad = [np.zeros(3), float("nan"), space.n, -1, 1.5]
        else:
            nan = np.zeros(space.shape)
            nan[0] = np.nan
            inf = np.zeros(space.shape)
            inf[-1] = np.inf
            bad = [np.zeros(space.shape[0] + 1), np.zeros((1, *space.shape)), nan, inf]
        for action in bad:
            with pytest.raises(ActionError) as err:
                env.step(action)
            assert type(env.unwrapped).__name__ in str(err.value)
    finally:
        env.close()


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n != "explore_room"])
def test_out_of_range_actions_are_clipped(name):
    env = make(name, observe_pixels=False)
    try:
        env.reset(seed=0)
        u = env.unwrapped
        space = env.action_space
        for far in (space.high + 10.0, space.low - 10.0):
            target = u.validate_action(far)
            assert np.all(target <= space.high + 1e-6) and np.all(target >= space.low - 1e-6)
            assert u.action_clipped
            obs, *_ , info = env.step(far)
            assert info["action_clipped"]
            assert np.isfinite(obs["agent_pos"]).all()
        # what the actuators last received is within every limit: validating it again changes nothing
        sent = u.last_action.copy()
        np.testing.assert_array_equal(u.validate_action(sent), sent)
        assert not u.action_clipped
    finally:
        env.close()


def test_default_resolution_is_128():
    env = envs.make("aloha_transfer_cube")
    try:
        obs, _ = env.reset(seed=0)
        assert obs["pixels"]["top"].shape == (128, 128, 3)
    finally:
        env.close()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_expert_makes_subtask_progress(name):
    """A short expert segment advances the expert's subtask and the env's progress."""
    env = make(name, observe_pixels=False)
    try:
        expert = envs.make_expert(name, env)
        obs, info = env.reset(seed=1)
        expert.reset(obs, info)
        tracker = envs.AnnotationTracker(env.unwrapped.subtasks)
        best = info["subtask_progress"]
        for _ in range(env.spec.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(expert.act(obs, info))
            tracker.record(expert.subtask_index)
            best = max(best, info["subtask_progress"])
            if (best >= 1 and tracker.per_step[-1] >= 1) or terminated or truncated:
                break
        assert best >= 1, "expert made no task progress"
        annotations = tracker.annotations()
        assert len(annotations) >= 2 and annotations[0].text == env.unwrapped.subtasks[0]
        assert annotations[0].end_step + 1 == annotations[1].start_step
    finally:
        env.close()


def test_annotation_tracker():
    t = envs.AnnotationTracker(["a", "b", "c"])
    for i in [0, 0, 1, 1, 1, 2]:
        t.record(i)
    got = [(a.index, a.text, a.start_step, a.end_step) for a in t.annotations()]
    assert got == [(0, "a", 0, 1), (1, "b", 2, 4), (2, "c", 5, 5)]
    with pytest.raises(ValueError):
        t.record(1)  # decreasing
    with pytest.raises(ValueError):
        t.record(3)  # out of range


def test_unknown_task_lists_choices():
    with pytest.raises(KeyError, match="aloha_fold"):
        envs.task_spec("aloha_fodl")


@pytest.mark.slow
@pytest.mark.parametrize("name", TASK_NAMES)
def test_expert_succeeds(name):
    """Full expert episodes (slow): 5 seeds each, all successful (tasks with a success)."""
    env = make(name, observe_pixels=False)
    if not env.unwrapped.has_success:
        env.close()
        pytest.skip(f"{name} is open-ended: no success condition")
    try:
        expert = envs.make_expert(name, env)
        wins = 0
        for seed in range(100, 105):
            obs, info = env.reset(seed=seed)
            expert.reset(obs, info)
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(expert.act(obs, info))
                done = terminated or truncated
            wins += info["is_success"]
        assert wins == 5
    finally:
        env.close()


def test_annotation_tracker_refuses_going_back_unless_the_agent_may():
    from envs import AnnotationTracker

    strict = AnnotationTracker(("a", "b", "c"))
    strict.record(1)
    with pytest.raises(ValueError, match="must not decrease"):
        strict.record(0)
    loose = AnnotationTracker(("a", "b", "c"), may_go_back=True)
    for i in (0, 2, 2, 1):
        loose.record(i)
    assert [(a.index, a.start_step, a.end_step) for a in loose.annotations()] == [(0, 0, 0), (2, 1, 2), (1, 3, 3)]
