"""``python -m emu_world.explore`` and ``bench explore`` on a tiny untrained export of a tiny tokenizer
(32x32 frames, 4x4 codes) trained (nominally) on explore_room: the window loop driven by injected
pygame key events (SDL's dummy video driver), headless videos and PSNR, the bounded context window,
unknown keys, the no-display message, and the benchmark's keys. The mechanics, not the quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emu_world.bench import run_benchmark
from emu_world.bench.common import imagine_timed
from emu_world.config import CONFIG_DIR, REPO_ROOT, EnvConfig, to_dataclass
from emu_world.errors import UserError
from emu_world.explore import (
    ExploreConfig,
    PygameKeys,
    WindowView,
    check_keymap,
    explore,
    import_pygame,
    open_session,
    parse_keys,
    run_loop,
)
from emu_world.models.layout import LayoutConfig, SequenceLayout
from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer
from emu_world.models.world_model import WorldModel, WorldModelConfig
from emu_world.rollouts import WorldModelEnv, load_for_task, task_checkpoint

torch.set_num_threads(1)
TASK = "explore_room"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, Path]:
    """An untrained tiny tokenizer and a DiDA-adapted world-model folder (as ``train stage=dida`` writes
    it) whose training data is one explore_room dataset."""
    tmp = tmp_path_factory.mktemp("explore")
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["tokenizer=tiny", "layout=tiny"])
    tok = VisionTokenizer(to_dataclass(TokenizerConfig, cfg.tokenizer))
    tok.save(tmp / "tokenizer")
    layout_cfg = to_dataclass(LayoutConfig, cfg.layout)
    layout = SequenceLayout.from_config(layout_cfg, tok.codebook_size, tuple(tok.grid))
    out = tmp / "world_model"
    WorldModel(WorldModelConfig.preset("tiny"), layout).save(out)
    manifest = {
        "tokenizer": {"path": str(tmp / "tokenizer"), "identity": tok.identity()},
        "config": {"layout": asdict(layout_cfg), "data": {"frame_stride": {"explore": 1}, "frames_per_window": 3}},
        "data": [{"name": TASK, "embodiment": "explore", "cameras": ["observation.images.ego"], "binner": None}],
        "dida": {"sampler": {"steps": 2, "update": "renoise", "start": "previous", "start_time": 0.5}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return {"tokenizer": tmp / "tokenizer", "world_model": out}


def configs(export, *overrides: str) -> tuple[ExploreConfig, EnvConfig]:
    """The command's composed config, split as ``main`` splits it (tokenizer: the export's own)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="explore", overrides=[f"checkpoint={export['world_model']}", "threads=1",
                                                        *overrides])
    rest = OmegaConf.create({k: v for k, v in cfg.items() if k != "env"})
    return to_dataclass(ExploreConfig, rest), to_dataclass(EnvConfig, cfg.env)


@pytest.fixture
def dummy_video(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")


def test_the_window_asks_sdl_for_egl_beside_mujocos_egl(monkeypatch):
    monkeypatch.delenv("SDL_VIDEO_X11_FORCE_EGL", raising=False)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    import_pygame()  # SDL's X11 GLX beside MuJoCo's EGL: an X error on the next render (under Xvfb)
    assert os.environ["SDL_VIDEO_X11_FORCE_EGL"] == "1"


def test_the_window_loop_runs_on_injected_key_events(export, dummy_video, tmp_path):
    cfg, env_cfg = configs(export, "show_truth=true", f"screenshot={tmp_path / 'shot.png'}", "scale=2")
    session, info = open_session(cfg, env_cfg)
    assert info["frame_size"] == 32 and info["tokens_per_frame"] == 16  # from the export's tokenizer
    pygame = import_pygame()
    view = WindowView(pygame, session, cfg, ["tiny"])
    try:
        for key in (pygame.K_w, pygame.K_LEFT, pygame.K_x, pygame.K_UP, pygame.K_q, pygame.K_s):
            pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key, mod=0, unicode="", scancode=0))
        with pytest.warns(UserWarning, match="key 'x' is not in the key map"):
            run_loop(session, PygameKeys(pygame, ["w"]), view)
    finally:
        view.close()
        session.sim.close()
    assert [r.command for r in session.records] == ["forward", "turn left", "look up"]  # q quit before s
    assert session.skipped == ["x"]
    assert all(np.isfinite(r.psnr) for r in session.records)  # show_truth steps the simulator too
    from PIL import Image

    shot = Image.open(tmp_path / "shot.png")  # two 64-px panels and the key map side panel
    assert shot.size[0] > 2 * 64 + WindowView.SIDE and shot.size[1] >= 64
    assert np.asarray(shot).std() > 0


def test_scripted_keys_play_into_the_window_until_quit(export, dummy_video, tmp_path):
    cfg, env_cfg = configs(export, "keys=wlq", f"screenshot={tmp_path / 'shot.png'}")
    assert explore(cfg, env_cfg, tmp_path) is None
    assert (tmp_path / "shot.png").is_file()


def test_headless_writes_a_video_of_the_right_length_and_per_step_psnr(export, tmp_path):
    cfg, env_cfg = configs(export, "headless=true", "keys='ww<left>x r<space>'", "seed=3")
    with pytest.warns(UserWarning, match="'x'"):
        summary = explore(cfg, env_cfg, tmp_path / "a")
    assert summary["commands"] == ["forward", "forward", "turn left", "stay"]
    assert summary["skipped_keys"] == ["x"] and summary["resets"] == 1
    assert summary["video_frames"] == 1 + 4 + 1  # the start frame, one per command, the new room's frame
    with av.open(summary["video"]) as container:
        assert sum(1 for _ in container.decode(video=0)) == summary["video_frames"]
    assert len(summary["psnr"]) == len(summary["copy_first_psnr"]) == 4
    # psnr_1: the first command after each (re)start, averaged (steps 1 and 4)
    assert summary["psnr_1"] == pytest.approx(np.mean([summary["psnr"][0], summary["psnr"][3]]), abs=0.01)
    assert summary["copy_first_psnr_1"] is not None and summary["psnr_8"] is None
    assert summary["fps"] > 0 and json.loads((tmp_path / "a" / "summary.json").read_text())["psnr"] == summary["psnr"]
    with pytest.warns(UserWarning):
        again = explore(cfg, env_cfg, tmp_path / "b")
    assert again["psnr"] == summary["psnr"]  # seeded: the same run again


def test_context_window_drops_the_oldest_frames_and_keeps_the_stream_valid(export):
    tok, ex, spec = load_for_task(str(export["world_model"]), None, TASK, "dida")
    world = WorldModelEnv(ex.layout, spec, ex.predictor(spec, "dida", tok), "explore the room", 2, tok)
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    world.reset(frames=frames, conds=["forward", "turn left"])
    assert world.window == 2 and world.conds == ["turn left"]
    lengths = []
    for i, command in enumerate(["forward", "look up", "strafe left, stay", "back"]):
        tokens = world.prompt(command).tokens
        parsed = ex.layout.parse(tokens, complete=False)  # raises on an invalid stream
        assert len(parsed.frames) == 2 and parsed.texts == [*world.conds, command]
        np.testing.assert_array_equal(parsed.frames, np.stack(world.codes))  # the window, oldest first
        lengths.append(len(tokens))
        world.step(command, seed=i)
        assert world.window == 2
    assert world.conds == ["back"]  # the condition between the window's two frames: the last command
    assert max(lengths) - min(lengths) <= 8  # bounded: only the command texts differ in length
    with pytest.raises(ValueError, match="unknown command"):
        world.step("fly", seed=0)
    timed = imagine_timed(world, frames[:2], ["forward"], ["forward", "back"], seed=0)
    assert timed.frames.shape == (2, 32, 32, 3) and timed.seconds > 0
    np.testing.assert_array_equal(imagine_timed(world, frames[:2], ["forward"], ["forward", "back"], 0).frames,
                                  timed.frames)


def test_keys_parse_and_bad_settings_are_refused_with_the_fix(export):
    assert parse_keys("w<Left> x.\nA") == ["w", "left", "x", ".", "a"]
    with pytest.raises(UserError, match="not closed"):
        parse_keys("w<left")
    with pytest.raises(UserError, match="keys="):
        configs(export, "headless=true")
    with pytest.raises(UserError, match="no key for"):
        check_keymap({"w": "forward", "r": "reset", "q": "quit"}, ("stay", "forward"))
    with pytest.raises(UserError, match="name no action"):
        check_keymap({"w": "fly"}, ("forward",))
    cfg, env_cfg = configs(export, "headless=true", "keys_file=/nonexistent/walk.txt")
    with pytest.raises(UserError, match="keys_file"):
        explore(cfg, env_cfg, Path("/tmp"))


def test_without_a_display_the_window_names_the_headless_mode(export):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    proc = subprocess.run([sys.executable, "-m", "emu_world.explore", "env=explore_room",
                           f"checkpoint={export['world_model']}", "hydra.run.dir=/tmp/explore_no_display"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "no display" in proc.stderr and "headless=true" in proc.stderr and "Xvfb" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_task_checkpoint_prefers_the_tasks_own_model_when_it_can_decode_that_way():
    own = (REPO_ROOT / "checkpoints" / "world_model_explore_room" / "manifest.json").is_file()
    assert task_checkpoint(TASK, "ar") == ("checkpoints/world_model_explore_room" if own else "checkpoints/world_model")
    if (REPO_ROOT / "checkpoints" / "world_model_aloha_fold" / "manifest.json").is_file():
        assert task_checkpoint("aloha_fold", "ar") == "checkpoints/world_model_aloha_fold"
        assert task_checkpoint("aloha_fold", "dida") == "checkpoints/world_model"  # never DiDA-adapted


def test_bench_explore_reports_speed_quality_and_controllability(export, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        cfg = compose(config_name="explore", overrides=[
            f"checkpoint={export['world_model']}", "walks=1", "starts=2", "commands=4", "horizons=[1,4]",
            "ar_frames=1", "threads=1", f"output={tmp_path / 'bench.json'}"])
    s = run_benchmark("explore", cfg)
    for key in ("fps", "ar_fps", "psnr_1", "psnr_4", "copy_first_psnr_4", "shuffled_psnr_4", "delta_psnr_4",
                "ceiling_psnr_4", "gain_4", "delta_psnr_ci95_4"):
        assert np.isfinite(s[key]), key
    assert s["rollouts"] == 2 and s["commands"] == 4
    assert s["delta_psnr_4"] == pytest.approx(s["psnr_4"] - s["shuffled_psnr_4"], abs=2e-3)
    assert s["gain_4"] == pytest.approx(s["psnr_4"] - s["copy_first_psnr_4"], abs=2e-3)
    assert sum(s["command_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert Path(s["picture"]).is_file() and json.loads((tmp_path / "bench.json").read_text())["fps"] == s["fps"]
    bad = OmegaConf.merge(cfg, {"horizons": [1, 8]})
    with pytest.raises(UserError, match="horizons"):
        run_benchmark("explore", bad)
