"""What a user can fix ends every CLI cleanly: the message and its fix on stderr, exit status 2, no
traceback; a real bug keeps its traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.errors import USER_ERROR_EXIT, UserError, reports_user_errors
from emu_world.record import record

TASK = "widowx_pick_place"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """Two short 32x32 widowx episodes."""
    root = tmp_path_factory.mktemp("cli") / TASK
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="record", overrides=[f"env={TASK}", "env.image_size=32", "env.max_episode_steps=12"])
    record(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), root, "test/cli", episodes=2,
           seed=0, keep_failures=True, progress=False)
    return root


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    @reports_user_errors
    def fixable():
        raise UserError("episodes must be positive; pass episodes=N")

    @reports_user_errors
    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(SystemExit) as stop:
        fixable()
    assert stop.value.code == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: episodes must be positive; pass episodes=N\n"
    with pytest.raises(ZeroDivisionError):
        bug()


def test_bad_settings_and_missing_or_foreign_folders_end_cleanly(tmp_path):
    assert_clean_error(cli("emu_world.evaluate", "env=widowx_pick_place", "episodes=0"), "episodes must be positive")
    train = ("emu_world.train", "stage=tokenizer", "experiment=tiny", f"run_dir={tmp_path / 'run'}")
    assert_clean_error(cli(*train, f"dataset.root={tmp_path / 'nowhere'}"), "emu_world.record")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a dataset")
    assert_clean_error(cli(*train, f"dataset.root={tmp_path / 'plain'}"), "neither a LeRobot dataset")
    assert_clean_error(cli("emu_world.data.tokenize", str(tmp_path / "plain")), "not a LeRobot dataset")


def test_damaged_datasets_end_cleanly(recorded, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(recorded, truncated)
    data = next((truncated / "data").rglob("*.parquet"))
    data.write_bytes(data.read_bytes()[:-100])  # the footer is gone
    assert_clean_error(cli("emu_world.train", "stage=tokenizer", "experiment=tiny", f"dataset.root={truncated}",
                           f"run_dir={tmp_path / 'run'}"), "not finalized")
    no_videos = tmp_path / "no_videos"
    shutil.copytree(recorded, no_videos)
    for video in (no_videos / "videos").rglob("*.mp4"):
        video.unlink()
    assert_clean_error(cli("emu_world.data.tokenize", str(no_videos)), "video")


def test_bad_agent_and_loop_settings_end_cleanly(tmp_path):
    evaluate = ("emu_world.evaluate", "env=widowx_pick_place", "episodes=1")
    assert_clean_error(cli(*evaluate, "agent=bc", "agent.checkpoint=checkpoints/tokenizer"), "agent.checkpoint")
    assert_clean_error(cli(*evaluate, "agent=bc", f"agent.checkpoint={tmp_path}"), "Train it")
    assert_clean_error(cli(*evaluate, "agent=bc", "agent.checkpoint=x", "agent.n_action_steps=0"), "n_action_steps")
    assert_clean_error(cli("emu_world.train", "stage=tokenizer", "train.save_every=0", f"run_dir={tmp_path / 'r'}"),
                       "save_every")


def test_bench_help_lists_the_benchmarks_and_a_headless_glfw_names_the_fix():
    proc = cli("emu_world.bench", "--help")
    assert proc.returncode == 0 and all(name in proc.stdout for name in ("tokenizer", "world_model", "dida"))
    headless = {"MUJOCO_GL": "glfw", "DISPLAY": "", "WAYLAND_DISPLAY": ""}
    assert_clean_error(cli("emu_world.evaluate", "env=widowx_pick_place", "episodes=1", env=headless),
                       "no display", "MUJOCO_GL=osmesa")
