"""aloha_transfer_cube: gym-aloha's initial-state distribution and reward table, and the scripted
expert handing the cube over within the episode budget."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs import AnnotationTracker
from envs.aloha import START_ARM_JOINTS, START_GRIPPER
from envs.aloha_transfer_cube import (
    CUBE_GEOM, CUBE_POS_HIGH, CUBE_POS_LOW, LEFT_FINGER_GEOM, RIGHT_FINGER_GEOM, TABLE_GEOM,
)

TASK = "aloha_transfer_cube"


@pytest.fixture(scope="module")
def env():
    e = envs.make(TASK, observe_pixels=False)
    yield e
    e.close()


def test_reset_samples_gym_aloha_ranges_deterministically(env):
    u = env.unwrapped
    cubes = []
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        cube, rot = u.cube_pose()
        assert np.all(cube >= CUBE_POS_LOW - 1e-9) and np.all(cube <= CUBE_POS_HIGH + 1e-9)
        np.testing.assert_allclose(rot, np.eye(3), atol=1e-9)
        np.testing.assert_allclose(obs["agent_pos"], np.tile(np.r_[START_ARM_JOINTS, START_GRIPPER], 2),
                                   atol=1e-6)
        cubes.append(cube)
    env.reset(seed=7)
    np.testing.assert_array_equal(u.cube_pose()[0], cubes[7])
    assert len({tuple(c) for c in cubes}) == 20  # every seed gives its own cube position


def pair(a: str, b: str) -> set[tuple[str, str]]:
    return {(a, b), (b, a)}


@pytest.mark.parametrize("contacts, reward", [
    (set(), 0),
    (pair(CUBE_GEOM, TABLE_GEOM), 0),
    (pair(CUBE_GEOM, RIGHT_FINGER_GEOM) | pair(CUBE_GEOM, TABLE_GEOM), 1),
    (pair(CUBE_GEOM, RIGHT_FINGER_GEOM), 2),
    (pair(CUBE_GEOM, LEFT_FINGER_GEOM) | pair(CUBE_GEOM, TABLE_GEOM), 3),
    (pair(CUBE_GEOM, LEFT_FINGER_GEOM) | pair(CUBE_GEOM, RIGHT_FINGER_GEOM), 4),
    (pair(CUBE_GEOM, LEFT_FINGER_GEOM), 4),
])
def test_reward_table_matches_gym_aloha(env, monkeypatch, contacts, reward):
    u = env.unwrapped
    env.reset(seed=0)
    monkeypatch.setattr(u, "contact_pairs", lambda: contacts)
    assert u._evaluate() == (reward == 4, reward)


def test_cube_resting_on_table_scores_zero(env):
    obs, _ = env.reset(seed=3)
    hold = obs["agent_pos"]  # arms keep still at the start pose
    for _ in range(10):  # let the cube drop onto the table
        _, reward, terminated, _, info = env.step(hold)
    assert (reward, terminated, info["is_success"]) == (0.0, False, False)
    assert env.unwrapped.cube_pose()[0][2] == pytest.approx(0.02, abs=2e-3)


def test_expert_hands_the_cube_over(env):
    obs, info = env.reset(seed=11)
    expert = envs.make_expert(TASK, env)
    expert.reset(obs, info)
    tracker = AnnotationTracker(env.unwrapped.subtasks)
    rewards = []
    for _ in range(envs.task_spec(TASK).max_episode_steps):
        action = expert.act(obs, info)
        tracker.record(expert.subtask_index)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    assert info["is_success"] and terminated
    # the stages are reached in gym-aloha's order: right touch, lift, left grasp in the air
    first = [rewards.index(r) for r in (1.0, 2.0, 4.0)]
    assert first == sorted(first)
    assert [a.index for a in tracker.annotations()] == [0, 1, 2, 3]
    left, _ = env.unwrapped.ee_pose("left")
    assert np.linalg.norm(left - env.unwrapped.cube_pose()[0]) < 0.03  # the left tool is at the cube


def test_expert_lifts_the_cube_with_the_right_arm(env):
    obs, info = env.reset(seed=4)
    expert = envs.make_expert(TASK, env)
    expert.reset(obs, info)
    for _ in range(expert.T_LIFTED + 1):
        obs, reward, *_, info = env.step(expert.act(obs, info))
    assert expert.subtask_index == 1
    assert reward == 2.0  # held by the right finger, off the table
    assert env.unwrapped.cube_pose()[0][2] > 0.08
