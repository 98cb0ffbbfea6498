"""Test-wide settings: offline, deterministic, headless."""

import os
import signal
import subprocess

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import envs  # noqa: E402,F401  (sets MUJOCO_GL before anything imports mujoco)


@pytest.fixture
def run_group():
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` for commands that start children
    (torchrun and its rank workers): the command runs in its own process group, and the whole group is
    killed when ``timeout`` expires (a plain timeout kills the launcher and leaves the workers running)."""

    def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run


def tiny_world_model_export(tmp):
    """An untrained tiny tokenizer (32x32 frames, 4x4 codes), a world-model folder laid out as
    ``train stage=dida`` exports it for widowx_pick_place, and a tiny goal head for that robot."""
    import json
    from dataclasses import asdict

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from emu_world.config import CONFIG_DIR, to_dataclass
    from emu_world.models.layout import ActionBinner, LayoutConfig, SequenceLayout
    from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer
    from emu_world.models.world_model import WorldModel, WorldModelConfig
    from policies.goal_head import GoalHeadConfig, GoalHeadPolicy

    TASK = "widowx_pick_place"
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["tokenizer=tiny", "layout=tiny"])
    tok = VisionTokenizer(to_dataclass(TokenizerConfig, cfg.tokenizer))
    tok.save(tmp / "tokenizer")
    layout_cfg = to_dataclass(LayoutConfig, cfg.layout)
    layout = SequenceLayout.from_config(layout_cfg, tok.codebook_size, tuple(tok.grid))
    out = tmp / "world_model"
    WorldModel(WorldModelConfig.preset("tiny"), layout).save(out)
    (out / "binners").mkdir()
    ActionBinner(-np.ones(7), np.ones(7), layout_cfg.action_bins).save(out / "binners" / f"{TASK}.json")
    manifest = {
        "tokenizer": {"path": str(tmp / "tokenizer"), "identity": tok.identity()},
        "config": {"layout": asdict(layout_cfg), "data": {"frame_stride": {"widowx": 1}}},
        "data": [{"name": TASK, "embodiment": "widowx", "cameras": ["observation.images.front"],
                  "binner": f"binners/{TASK}.json"}],
        "dida": {"sampler": {"steps": 2, "update": "renoise", "start": "previous", "start_time": 0.5}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    head = GoalHeadConfig(channels=[8], strides=[4], keypoints=2, hidden=8).resolved("front", 32, 7, 7, 5.0)
    GoalHeadPolicy(head).save(tmp / "goal")
    (tmp / "goal" / "manifest.json").write_text(json.dumps({"data": {"subtask_steps": [3, 2, 4]}}))
    return {"tokenizer": tmp / "tokenizer", "world_model": out, "goal": tmp / "goal"}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """:func:`tiny_world_model_export` once per session."""
    return tiny_world_model_export(tmp_path_factory.mktemp("tiny_export"))
