"""Recording, loading and validating LeRobot v3.0 datasets (emu_world.data, emu_world.record)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import envs
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.data.recorder import DatasetRecorder, features_for_env
from emu_world.data.robot_dataset import DatasetError, RobotDataset, subtasks_from_indices, validate_dataset
from emu_world.record import record

TASK = "aloha_transfer_cube"
STEPS = 40


def configs(*overrides: str) -> tuple[EnvConfig, AgentConfig]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="record", overrides=[f"env={TASK}", f"env.max_episode_steps={STEPS}",
                                                       "env.image_size=64", *overrides])
    return to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent)


def raw_frames(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replay the expert without recording: the simulator's own frames and the sent actions."""
    env_cfg, _ = configs()
    env = env_cfg.make()
    expert = envs.make_expert(TASK, env)
    obs, info = env.reset(seed=seed)
    expert.reset(obs, info)
    frames, actions = [], []
    for _ in range(STEPS):
        frames.append(obs["pixels"]["top"])
        obs, _, term, trunc, info = env.step(expert.act(obs, info))
        actions.append(env.unwrapped.last_action)
        if term or trunc:
            break
    env.close()
    return np.stack(frames), np.stack(actions)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "transfer"
    env_cfg, agent_cfg = configs()
    # short episodes do not finish the task: keep them, flagged as failures
    summary = record(env_cfg, agent_cfg, root, "test/transfer", episodes=2, seed=10, keep_failures=True,
                     progress=False)
    assert summary["episodes_kept"] == 2 and summary["failed_seeds"] == [10, 11]
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_recorded_dataset_loads_with_ours_and_matches_the_simulator(recorded):
    ds = RobotDataset(recorded, cameras=["top"], action_dim=14, state_dim=14)
    assert ds.num_episodes == 2 and ds.num_frames == 2 * STEPS and ds.fps == 50
    ep = ds.episode(1)
    frames = ep.frames["observation.images.top"]
    assert frames.shape == (STEPS, 64, 64, 3) and frames.dtype == np.uint8
    raw, actions = raw_frames(seed=11)
    np.testing.assert_allclose(ep.actions, actions.astype(np.float32), atol=1e-6)
    mse = ((frames.astype(np.float64) - raw.astype(np.float64)) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 50.0  # crf 0 / yuv444p: lossless up to RGB -> YUV rounding
    assert np.abs(frames.astype(np.int64) - raw.astype(np.int64)).max() <= 3
    assert ep.task == envs.task_spec(TASK).env_cls().task
    assert ds.has_annotations and ep.subtask_index.shape == (STEPS,)
    assert ep.subtasks[0].start_frame == 0 and ep.subtasks[-1].end_frame == STEPS - 1
    prov = ds.provenance
    assert [e["seed"] for e in prov["episodes"]] == [10, 11]
    assert [e["success"] for e in prov["episodes"]] == [False, False]


def test_lerobot_reads_it_too_with_subtask_text_and_windows(recorded):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("test/transfer", root=recorded, video_backend="pyav",
                        delta_timestamps={"action": [0.0, 0.02, 0.04]})
    item = ds[STEPS - 1]  # last frame of episode 0: the future actions are padding
    assert item["action"].shape == (3, 14)
    assert item["action_is_pad"].tolist() == [False, True, True]
    assert item["subtask"] in envs.task_spec(TASK).env_cls().subtasks
    assert item["observation.images.top"].shape == (3, 64, 64)


def test_create_refuses_existing_and_append_adds(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    env_cfg, agent_cfg = configs()
    before = sorted(p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file())
    with pytest.raises(DatasetError, match="append=true"):
        record(env_cfg, agent_cfg, root, "test/transfer", episodes=1, seed=0, progress=False)
    assert sorted(p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()) == before
    record(env_cfg, agent_cfg, root, "test/transfer", episodes=1, seed=20, keep_failures=True,
           mode="append", progress=False)
    ds = RobotDataset(root)
    assert ds.num_episodes == 3
    assert [e["seed"] for e in ds.provenance["episodes"]] == [10, 11, 20]
    assert ds.episode(2).frames["observation.images.top"].shape[0] == STEPS


def test_append_refuses_mismatched_features(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    env_cfg, agent_cfg = configs("env.image_size=32")
    with pytest.raises(DatasetError, match="features differ"):
        record(env_cfg, agent_cfg, root, "test/transfer", episodes=1, seed=0, mode="append", progress=False)
    assert RobotDataset(root).num_episodes == 2


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    env_cfg, _ = configs()
    env = env_cfg.make()
    try:
        with pytest.raises(DatasetError, match="not a LeRobot dataset"):
            DatasetRecorder(precious, "x/y", 50, features_for_env(env, annotated=False), mode="overwrite")
    finally:
        env.close()
    assert (precious / "notes.txt").read_text() == "keep me"


def test_missing_root_and_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*emu_world.record"):
        validate_dataset(tmp_path / "nope")
    (tmp_path / "inner" / "meta").mkdir(parents=True)
    (tmp_path / "inner" / "meta" / "info.json").write_text("{}")
    with pytest.raises(DatasetError, match="not a LeRobot dataset.*inner"):
        validate_dataset(tmp_path)


def test_v21_dataset_points_to_the_converter(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="convert_dataset_v21_to_v30"):
        validate_dataset(root)


def test_truncated_parquet_says_not_finalized(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    data = next((root / "data").glob("*/*.parquet"))
    data.write_bytes(data.read_bytes()[:-200])  # what a missing finalize() leaves: no footer
    with pytest.raises(DatasetError, match="not finalized") as err:
        validate_dataset(root)
    assert str(data) in str(err.value)


def test_unfinalized_recording_is_detected(tmp_path):
    """A real lerobot recording whose finalize() never ran."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    feats = {"observation.images.cam": {"dtype": "video", "shape": (32, 32, 3), "names": ["height", "width", "channels"]},
             "action": {"dtype": "float32", "shape": (2,), "names": ["a", "b"]}}
    ds = LeRobotDataset.create("t/unfinalized", fps=10, features=feats, root=tmp_path / "u", vcodec="h264",
                               streaming_encoding=True)
    for ep in range(2):
        for i in range(5):
            ds.add_frame({"observation.images.cam": np.full((32, 32, 3), i * 20, np.uint8),
                          "action": np.zeros(2, np.float32), "task": "t"})
        ds.save_episode()
    with pytest.raises(DatasetError, match="not finalized"):
        validate_dataset(tmp_path / "u")
    ds.finalize()
    validate_dataset(tmp_path / "u")


def test_missing_and_undecodable_videos(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    video = next((root / "videos").rglob("*.mp4"))
    video.write_bytes(b"\x00" * 1000)
    with pytest.raises(DatasetError, match="cannot be decoded"):
        validate_dataset(root)
    video.unlink()
    with pytest.raises(DatasetError, match="missing"):
        validate_dataset(root)


def test_feature_mismatches_name_the_fix(recorded):
    with pytest.raises(DatasetError, match=r"action has shape \(14,\).*expects \(7,\)"):
        validate_dataset(recorded, action_dim=7)
    with pytest.raises(DatasetError, match="no camera 'observation.images.wrist'.*observation.images.top"):
        validate_dataset(recorded, cameras=["wrist"])
    with pytest.raises(DatasetError, match="observation.state"):
        validate_dataset(recorded, state_dim=6)


def test_foreign_dataset_without_annotations(tmp_path):
    """A v3.0 dataset this project did not record: other camera and state names, no subtasks."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    feats = {
        "observation.images.wrist_cam": {"dtype": "video", "shape": (48, 40, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
    }
    ds = LeRobotDataset.create("someone/else", fps=15, features=feats, root=tmp_path / "foreign", vcodec="h264",
                               streaming_encoding=True)
    rng = np.random.default_rng(0)
    for length in (7, 9):
        for i in range(length):
            img = np.zeros((48, 40, 3), np.uint8)
            img[:, : 4 * (i + 1)] = 200
            ds.add_frame({"observation.images.wrist_cam": img,
                          "observation.state": rng.normal(size=6).astype(np.float32),
                          "action": rng.normal(size=6).astype(np.float32), "task": "wave"})
        ds.save_episode()
    ds.finalize()
    ours = RobotDataset(tmp_path / "foreign")
    assert ours.camera_keys == ["observation.images.wrist_cam"] and not ours.has_annotations
    ep = ours.episode(1)
    frames = ep.frames["observation.images.wrist_cam"]
    assert frames.shape == (9, 48, 40, 3) and ep.task == "wave" and ep.subtasks == []
    assert ep.states.shape == (9, 6) and ep.subtask_index is None
    assert frames[0, :, :4].mean() > 150 and frames[0, :, 8:].mean() < 50  # the bar grows per frame


def test_subtasks_from_indices_keyframes():
    subs = subtasks_from_indices(np.array([0, 0, 1, 1, 1, 2]), ["a", "b", "c"])
    assert [(s.text, s.start_frame, s.end_frame, s.keyframe) for s in subs] == [
        ("a", 0, 1, 2), ("b", 2, 4, 5), ("c", 5, 5, 5)]
    # a recording that went on after success: the last keyframe is the frame the task was done from
    subs = subtasks_from_indices(np.array([0, 0, 1, 1, 1, 1, 1]), ["a", "b"], done_frame=3)
    assert [(s.start_frame, s.end_frame, s.keyframe) for s in subs] == [(0, 1, 2), (2, 6, 3)]


def test_recorder_refuses_nan_actions(tmp_path):
    env_cfg, _ = configs()
    env = env_cfg.make()
    try:
        obs, _ = env.reset(seed=0)
        rec = DatasetRecorder(tmp_path / "nan", "t/nan", 50, features_for_env(env, annotated=False))
        with pytest.raises(DatasetError, match="non-finite"):
            rec.add_frame(obs, np.full(14, np.nan), task="t")
        rec.finalize()
    finally:
        env.close()


def test_verify_replays_the_recording(recorded):
    from emu_world.data.verify import verify

    report = verify(recorded, episodes=1)
    assert report["actions_exact"] and report["checked"][0]["replayed_length"] == STEPS
    assert report["mean_psnr"] > 35.0 and report["lerobot_vs_ours_frame0_psnr"] > 40.0
    assert "mean_codes_equal" not in report  # codes only with a tokenizer


def test_verify_compares_the_codes_of_decoded_and_raw_frames(recorded, tmp_path):
    """--tokenizer: codes of every stride-th decoded frame against the raw render's, and how many change."""
    import torch

    from emu_world.data.verify import verify
    from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer

    torch.manual_seed(0)
    VisionTokenizer(TokenizerConfig(image_size=64, channels=[16, 32], encoder_blocks=[1, 1], decoder_blocks=[1, 1],
                                    code_dim=8, codebook_size=64)).save(tmp_path / "tok")
    report = verify(recorded, episodes=1, tokenizer=tmp_path / "tok", stride=2)
    codes = report["checked"][0]["codes"]["top"]
    assert 0.0 <= codes["codes_equal"] <= 1.0 and report["mean_codes_equal"] == codes["codes_equal"]
    assert report["mean_codes_changed_raw"] == codes["codes_changed_raw"] and report["stride"] == 2
    with pytest.raises(ValueError, match="stride must be >= 1"):
        verify(recorded, episodes=1, tokenizer=tmp_path / "tok", stride=0)
