"""Task-specific checks of ``widowx_pick_place``: kinematics, delta actions, success, expert."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

import envs
from envs.widowx_pick_place import (
    MIN_SEPARATION, WidowXPickPlaceEnv, mat_to_rpy, nearest_grasp_yaw, rpy_to_mat,
)

HOLD_OPEN = np.array([0, 0, 0, 0, 0, 0, 1.0], dtype=np.float32)  # zero delta, gripper open


@pytest.fixture(scope="module")
def env():
    e = WidowXPickPlaceEnv(observe_pixels=False)
    yield e
    e.close()


def test_zero_pose_matches_urdf_link_offsets(env):
    """All joints at zero: gripper_link sits at the sum of the wx250s URDF offsets."""
    d = mujoco.MjData(env.model)
    mujoco.mj_kinematics(env.model, d)
    x = 0.04975 + 0.175 + 0.075 + 0.065  # elbow offset + forearm + wrist + gripper (m)
    z = 0.072 + 0.03865 + 0.25  # shoulder height + upper arm (m)
    np.testing.assert_allclose(d.xpos[env.model.body("wx250s/gripper_link").id], [x, 0, z], atol=1e-9)
    lo, hi = env.model.jnt_range[env.model.joint("shoulder").id]
    assert (lo, hi) == pytest.approx((-1.88496, 1.98968))


def test_rpy_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rpy = rng.uniform([-1.2, -1.2, -3.1], [1.2, 1.2, 3.1])
        np.testing.assert_allclose(mat_to_rpy(rpy_to_mat(rpy)), rpy, atol=1e-9)


def test_reset_home_pose_and_layout(env):
    for seed in range(10):
        obs, info = env.reset(seed=seed)
        # home: TCP 16 cm above the table, pointing down (rpy ~ 0), gripper open
        np.testing.assert_allclose(obs["agent_pos"], [0.22, 0, 0.16, 0, 0, 0, 1], atol=2e-3)
        block, _ = env.block_pose()
        bowl, _ = env.bowl_pose()
        assert np.linalg.norm(block[:2] - bowl[:2]) >= MIN_SEPARATION
        assert block[2] == pytest.approx(env.block_half)
        assert not info["is_success"] and info["subtask_progress"] == 0


def test_zero_delta_holds_and_deltas_move_the_tcp(env):
    env.reset(seed=0)
    start = env.ee_target()[0]
    for _ in range(3):
        obs, *_ = env.step(HOLD_OPEN)
    np.testing.assert_allclose(env.ee_target()[0], start, atol=1e-5)
    np.testing.assert_allclose(obs["agent_pos"][:3], start, atol=2e-3)

    step = np.array([0.03, -0.02, -0.01, 0, 0, 0.2, 1.0], dtype=np.float32)
    obs, *_ = env.step(step)
    pos, rot = env.ee_target()
    np.testing.assert_allclose(pos, start + step[:3], atol=1e-4)
    assert mat_to_rpy(rot)[2] == pytest.approx(0.2, abs=1e-3)
    for _ in range(2):  # let the servos settle on the new target
        obs, *_ = env.step(HOLD_OPEN)
    np.testing.assert_allclose(obs["agent_pos"][:3], pos, atol=2e-3)
    assert obs["agent_pos"][5] == pytest.approx(0.2, abs=0.01)


def test_large_deltas_are_clipped_and_the_workspace_bounds_the_target(env):
    env.reset(seed=0)
    start = env.ee_target()[0]
    _, _, _, _, info = env.step(np.array([1.0, 0, 0, 0, 0, 0, 1]))
    assert info["action_clipped"]
    assert env.ee_target()[0][0] - start[0] == pytest.approx(0.05, abs=1e-4)
    for _ in range(12):
        env.step(np.array([0, 0, 0.05, 0, 0, 0, 1]))
    assert env.ee_target()[0][2] <= env.workspace_high[2] + 1e-4
    ctrl = env.data.ctrl[:6]
    rng = env.model.jnt_range[[env.model.joint(j).id for j in
                               ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")]]
    assert np.all(ctrl >= rng[:, 0]) and np.all(ctrl <= rng[:, 1])


def test_gripper_action_closes_and_opens(env):
    env.reset(seed=0)
    for _ in range(2):
        obs, *_ = env.step(np.zeros(7, dtype=np.float32))  # gripper 0 = closed
    assert obs["agent_pos"][6] < 0.05
    for _ in range(2):
        obs, *_ = env.step(HOLD_OPEN)
    assert obs["agent_pos"][6] > 0.95


def _place_block(env, xyz):
    q = env.model.jnt_qposadr[env.model.joint("block").id]
    env.data.qpos[q:q + 7] = [*xyz, 1, 0, 0, 0]
    env.data.qvel[env.model.jnt_dofadr[env.model.joint("block").id]:][:6] = 0
    mujoco.mj_forward(env.model, env.data)


def test_success_only_when_block_rests_inside_the_bowl(env):
    opts = {"block_xy": [0.25, 0.15], "bowl_xy": [0.32, -0.12], "block_yaw": 0.0}
    env.reset(seed=0, options=opts)
    bowl, _ = env.bowl_pose()
    _place_block(env, [bowl[0] + 0.02, bowl[1], env.bowl_floor + env.block_half])
    _, _, terminated, _, info = env.step(HOLD_OPEN)
    assert info["is_success"] and terminated and info["subtask_progress"] == 4

    env.reset(seed=0, options=opts)  # beside the bowl, on the table
    _place_block(env, [bowl[0] + 0.12, bowl[1], env.block_half])
    _, _, terminated, _, info = env.step(HOLD_OPEN)
    assert not info["is_success"] and not terminated and info["subtask_progress"] == 0

    env.reset(seed=0, options=opts)  # falling into the bowl from 30 cm: over it, not in it yet
    _place_block(env, [bowl[0], bowl[1], 0.3])
    _, _, _, _, info = env.step(HOLD_OPEN)
    assert not info["is_success"] and info["subtask_progress"] == 3


def test_nearest_grasp_yaw_is_a_face_normal_close_to_the_current_yaw():
    for block_yaw in (-2.5, -0.3, 0.0, 0.7, 3.0):
        rot = rpy_to_mat([0, 0, block_yaw])
        yaw = nearest_grasp_yaw(rot, 0.1)
        assert abs(yaw - 0.1) <= np.pi / 4 + 1e-9
        k = (yaw - block_yaw) / (np.pi / 2)
        assert k == pytest.approx(round(k), abs=1e-9)


def test_expert_solves_two_seeds_with_ordered_annotations(env):
    expert = envs.make_expert("widowx_pick_place", env)
    limit = envs.task_spec("widowx_pick_place").max_episode_steps
    for seed in (0, 1):
        obs, info = env.reset(seed=seed)
        expert.reset(obs, info)
        tracker = envs.AnnotationTracker(env.subtasks)
        held_seen = False
        for _ in range(limit):
            obs, _, terminated, _, info = env.step(expert.act(obs, info))
            tracker.record(expert.subtask_index)
            held_seen |= info["subtask_progress"] >= 2
            if terminated:
                break
        assert info["is_success"] and held_seen
        assert [a.index for a in tracker.annotations()] == [0, 1, 2, 3]


def test_same_seed_same_expert_rollout():
    runs = []
    for _ in range(2):
        e = WidowXPickPlaceEnv(observe_pixels=False)
        expert = envs.make_expert("widowx_pick_place", e)
        obs, info = e.reset(seed=5)
        expert.reset(obs, info)
        states = []
        for _ in range(12):
            obs, *_, info = e.step(expert.act(obs, info))
            states.append(obs["agent_pos"])
        runs.append(np.stack(states))
        e.close()
    np.testing.assert_array_equal(runs[0], runs[1])


def test_missing_robot_xml_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="robot_xml"):
        WidowXPickPlaceEnv(observe_pixels=False, robot_xml=tmp_path / "nope.xml")
