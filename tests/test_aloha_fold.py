"""aloha_fold: cloth placement, the geometric success/progress stages, the grasp rule of the
env's physics, and the scripted expert folding the cloth within the episode budget."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs import AnnotationTracker
from envs.aloha import START_ARM_JOINTS, START_GRIPPER
from envs.aloha_fold import (
    CLOTH_CENTER_RANGE, CLOTH_RADIUS, CLOTH_SIZE, CLOTH_VERTS, CLOTH_YAW_RANGE, LIFT_HEIGHT,
    ON_TABLE_MAX_Z, TABLE_X,
)

TASK = "aloha_fold"
N = CLOTH_VERTS
SPACING = CLOTH_SIZE / (N - 1)


@pytest.fixture(scope="module")
def env():
    e = envs.make(TASK, observe_pixels=False)
    yield e
    e.close()


def edge_lengths(verts: np.ndarray) -> np.ndarray:
    grid = verts.reshape(N, N, 3)  # (ix, iy, xyz)
    return np.concatenate([np.linalg.norm(np.diff(grid, axis=0), axis=-1).ravel(),
                           np.linalg.norm(np.diff(grid, axis=1), axis=-1).ravel()])


def test_reset_lays_cloth_flat_with_seeded_pose(env):
    u = env.unwrapped
    poses = []
    for seed in range(10):
        obs, info = env.reset(seed=seed)
        verts = u.cloth_vertices()
        assert verts.shape == (N * N, 3)
        np.testing.assert_allclose(verts[:, 2], CLOTH_RADIUS, atol=1e-9)
        np.testing.assert_allclose(edge_lengths(verts), SPACING, atol=1e-9)
        c = u.cloth_corners()
        center = np.mean([c[k][:2] for k in c], axis=0)
        assert np.all(center >= CLOTH_CENTER_RANGE[0] - 1e-9) and np.all(center <= CLOTH_CENTER_RANGE[1] + 1e-9)
        near_edge = c["near_right"] - c["near_left"]
        yaw = np.arctan2(near_edge[1], near_edge[0])
        assert abs(yaw) <= CLOTH_YAW_RANGE + 1e-9
        # near is the -y side, left the -x side
        assert c["near_left"][1] < c["far_left"][1] and c["near_right"][1] < c["far_right"][1]
        assert c["near_left"][0] < c["near_right"][0]
        np.testing.assert_allclose(obs["agent_pos"], np.tile(np.r_[START_ARM_JOINTS, START_GRIPPER], 2),
                                   atol=1e-6)
        assert info["subtask_progress"] == 0 and not info["is_success"]
        poses.append(verts)
    env.reset(seed=4)
    np.testing.assert_array_equal(u.cloth_vertices(), poses[4])
    assert len({p.tobytes() for p in poses}) == 10


def flat_cloth(u) -> np.ndarray:
    u.place_cloth(np.array([0.0, 0.5]), 0.0)
    return u.cloth_vertices()


def folded_cloth(flat: np.ndarray, top_z: float = 3 * CLOTH_RADIUS) -> np.ndarray:
    """Near half mirrored onto the far half about the middle row (y = 0.5)."""
    grid = flat.reshape(N, N, 3).copy()
    near = grid[:, : N // 2]
    near[..., 1] = 1.0 - near[..., 1]
    near[..., 2] = top_z
    return grid.reshape(-1, 3)


def test_evaluate_stages_on_constructed_cloth(env, monkeypatch):
    u = env.unwrapped
    env.reset(seed=0)
    flat = flat_cloth(u)
    assert u._evaluate() == (False, 0)

    lifted = flat.reshape(N, N, 3).copy()
    lifted[:, 0, 2] = LIFT_HEIGHT + 0.02  # the whole near edge up
    u.set_cloth_vertices(lifted.reshape(-1, 3))
    assert u._evaluate() == (False, 1)

    u.set_cloth_vertices(folded_cloth(flat))
    assert u._evaluate() == (True, 3)

    # folded but still held, held up in the air, off the table or sunk: not a success
    monkeypatch.setattr(u, "grasped_vertex", lambda arm: 0 if arm == "left" else None)
    assert u._evaluate() == (False, 2)
    monkeypatch.undo()
    u.set_cloth_vertices(folded_cloth(flat, top_z=ON_TABLE_MAX_Z + 0.01))
    assert u._evaluate() == (False, 2)
    shifted = folded_cloth(flat)
    shifted[:, 0] += TABLE_X[1]  # half of it beyond the table's right edge
    u.set_cloth_vertices(shifted)
    assert u._evaluate() == (False, 2)
    sunk = folded_cloth(flat)
    sunk[0, 2] = -0.01
    u.set_cloth_vertices(sunk)
    assert u._evaluate() == (False, 2)

    # near corners short of their partners by more than the tolerance
    short = folded_cloth(flat).reshape(N, N, 3)
    short[:, 0, 1] -= 0.05
    u.set_cloth_vertices(short.reshape(-1, 3))
    assert not u._evaluate()[0]

    with pytest.raises(ValueError, match="shape"):
        u.set_cloth_vertices(np.zeros((N, 3)))


def test_cloth_rests_on_tiled_table(env):
    u = env.unwrapped
    env.reset(seed=1)
    hold = env.unwrapped._state()
    for _ in range(60):
        env.step(hold)
    verts = u.cloth_vertices()
    assert verts[:, 2].min() > 0.0015 and verts[:, 2].max() < 0.004  # neither sinking nor bouncing
    assert np.abs(edge_lengths(verts) / SPACING - 1).max() < 0.01


def test_closing_away_from_cloth_grasps_nothing(env):
    u = env.unwrapped
    env.reset(seed=2)
    action = u._state()
    action[[6, 13]] = 1.0
    for _ in range(15):
        env.step(action)
    action[[6, 13]] = 0.0
    for _ in range(15):
        env.step(action)
    assert u.grasped_vertex("left") is None and u.grasped_vertex("right") is None


def test_expert_grasps_corners_and_lifts_then_release_drops(env):
    u = env.unwrapped
    expert = envs.make_expert(TASK, env)
    obs, info = env.reset(seed=5)
    expert.reset(obs, info)
    for _ in range(expert.subtask_ends[0] + 1):
        obs, _, _, _, info = env.step(expert.act(obs, info))
    assert u.grasped_vertex("left") == u.corner_index["near_left"]
    assert u.grasped_vertex("right") == u.corner_index["near_right"]
    for _ in range(expert.subtask_ends[1] - expert.subtask_ends[0]):
        obs, _, _, _, info = env.step(expert.act(obs, info))
    assert expert.subtask_index == 1 and info["subtask_progress"] == 1
    c = u.cloth_corners()
    assert c["near_left"][2] > LIFT_HEIGHT and c["near_right"][2] > LIFT_HEIGHT
    # opening the grippers is what releases the corners
    action = u._state()
    action[[6, 13]] = 1.0
    env.step(action)
    assert u.grasped_vertex("left") is None and u.grasped_vertex("right") is None


def test_expert_folds_within_budget_and_is_deterministic(env):
    u = env.unwrapped
    expert = envs.make_expert(TASK, env)
    runs = []
    for _ in range(2):
        obs, info = env.reset(seed=11)
        expert.reset(obs, info)
        tracker = AnnotationTracker(u.subtasks)
        progress = []
        for _ in range(envs.task_spec(TASK).max_episode_steps):
            obs, _, terminated, _, info = env.step(expert.act(obs, info))
            tracker.record(expert.subtask_index)
            progress.append(info["subtask_progress"])
            if terminated:
                break
        assert info["is_success"] and progress[-1] == 3
        assert [a.index for a in tracker.annotations()] == list(range(len(u.subtasks)))
        assert set(progress) == {0, 1, 2, 3}
        runs.append((obs["agent_pos"], u.cloth_vertices(), len(progress)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
