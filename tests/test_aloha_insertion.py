"""aloha_insertion: gym-aloha's initial-state distribution and reward table, and the scripted
expert inserting the peg within the episode budget."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs import AnnotationTracker
from envs.aloha_insertion import (
    LEFT_FINGER_GEOM, PEG_GEOM, PEG_HALF_LENGTH, PEG_POS_HIGH, PEG_POS_LOW, PIN_GEOM, PRE_INSERT_GAP,
    RIGHT_FINGER_GEOM, SOCKET_GEOMS, SOCKET_HALF_LENGTH, SOCKET_POS_HIGH, SOCKET_POS_LOW, TABLE_GEOM,
)

TASK = "aloha_insertion"


@pytest.fixture(scope="module")
def env():
    e = envs.make(TASK, observe_pixels=False)
    yield e
    e.close()


def test_reset_samples_gym_aloha_ranges_deterministically(env):
    u = env.unwrapped
    poses = []
    for seed in range(20):
        env.reset(seed=seed)
        peg, socket = u.peg_pose()[0], u.socket_pose()[0]
        assert np.all(peg >= PEG_POS_LOW - 1e-9) and np.all(peg <= PEG_POS_HIGH + 1e-9)
        assert np.all(socket >= SOCKET_POS_LOW - 1e-9) and np.all(socket <= SOCKET_POS_HIGH + 1e-9)
        poses.append(np.r_[peg, socket])
    env.reset(seed=5)
    np.testing.assert_array_equal(np.r_[u.peg_pose()[0], u.socket_pose()[0]], poses[5])
    assert len({tuple(p) for p in poses}) == 20


def pair(a: str, b: str) -> set[tuple[str, str]]:
    return {(a, b), (b, a)}


GRASPED = pair(PEG_GEOM, RIGHT_FINGER_GEOM) | pair(SOCKET_GEOMS[2], LEFT_FINGER_GEOM)


@pytest.mark.parametrize("contacts, reward", [
    (set(), 0),
    (pair(PEG_GEOM, RIGHT_FINGER_GEOM), 0),  # one hand only
    (GRASPED | pair(PEG_GEOM, TABLE_GEOM), 1),
    (GRASPED | pair(SOCKET_GEOMS[0], TABLE_GEOM), 1),
    (GRASPED, 2),
    (GRASPED | pair(PEG_GEOM, SOCKET_GEOMS[3]), 3),
    (pair(PEG_GEOM, SOCKET_GEOMS[1]) | pair(SOCKET_GEOMS[0], TABLE_GEOM), 0),  # touching on the table
    (pair(PEG_GEOM, PIN_GEOM), 4),
    (GRASPED | pair(PEG_GEOM, PIN_GEOM) | pair(PEG_GEOM, SOCKET_GEOMS[0]), 4),
])
def test_reward_table_matches_gym_aloha(env, monkeypatch, contacts, reward):
    u = env.unwrapped
    env.reset(seed=0)
    monkeypatch.setattr(u, "contact_pairs", lambda: contacts)
    assert u._evaluate() == (reward == 4, reward)


def test_objects_resting_on_table_score_zero(env):
    obs, _ = env.reset(seed=2)
    for _ in range(10):
        _, reward, terminated, _, info = env.step(obs["agent_pos"])  # hold still
    assert (reward, terminated) == (0.0, False)
    assert env.unwrapped.peg_pose()[0][2] == pytest.approx(0.01, abs=2e-3)
    assert env.unwrapped.socket_pose()[0][2] == pytest.approx(0.022, abs=2e-3)


def test_expert_inserts_the_peg(env):
    obs, info = env.reset(seed=13)
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
    assert rewards.index(2.0) < rewards.index(4.0)  # both lifted before the insertion
    assert [a.index for a in tracker.annotations()] == [0, 1, 2, 3]
    # the peg lies along the socket's axis
    peg, peg_rot = env.unwrapped.peg_pose()
    socket, socket_rot = env.unwrapped.socket_pose()
    assert abs(peg_rot[:, 0] @ socket_rot[:, 0]) > np.cos(np.radians(5))
    off_axis = socket_rot.T @ (peg - socket)
    assert np.all(np.abs(off_axis[1:]) < 0.008)


def test_correction_puts_the_peg_on_the_socket_axis(env):
    obs, info = env.reset(seed=21)
    expert = envs.make_expert(TASK, env)
    expert.reset(obs, info)
    for _ in range(expert.T_ALIGNED + 1):
        obs, reward, *_, info = env.step(expert.act(obs, info))
    assert expert.subtask_index == 2 and reward == 2.0
    peg, peg_rot = env.unwrapped.peg_pose()
    socket, socket_rot = env.unwrapped.socket_pose()
    axis = socket_rot[:, 0]
    end = peg - PEG_HALF_LENGTH * peg_rot[:, 0] * np.sign(peg_rot[:, 0] @ axis)
    end_in_socket = socket_rot.T @ (end - socket)  # (3,) metres, socket frame
    # the peg end waits PRE_INSERT_GAP outside the mouth, on the axis (8 mm clearance)
    assert end_in_socket[0] == pytest.approx(SOCKET_HALF_LENGTH + PRE_INSERT_GAP, abs=0.005)
    assert np.all(np.abs(end_in_socket[1:]) < 0.003)
