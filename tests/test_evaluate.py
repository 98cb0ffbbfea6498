"""The evaluation CLI end to end on short episodes, through Hydra's compose API."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.evaluate import evaluate
from emu_world.metrics import wilson_interval


def test_evaluate_writes_results_and_summary(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "env=aloha_transfer_cube", "env.max_episode_steps=30", "env.image_size=64",
        ])
    summary = evaluate(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent),
                       episodes=2, seed=3, output_dir=tmp_path, video=True, video_episodes=1,
                       progress=False)
    for key in ("env", "agent", "episodes", "success_rate", "success_ci95", "steps_per_second", "collided_steps"):
        assert key in summary
    assert summary["episodes"] == 2 and summary["env"] == "aloha_transfer_cube"
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seed"] for r in records] == [3, 4]
    assert all(r["steps"] == 30 for r in records)  # truncated by the configured time limit
    assert records[0]["annotations"][0]["start_step"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["episodes"] == 2
    with av.open(records[0]["video"]) as container:
        n_frames = sum(1 for _ in container.decode(video=0))
    assert n_frames == 31  # reset frame + one per step
    assert records[1]["video"] is None


def test_wilson_interval():
    lo, hi = wilson_interval(50, 50)
    assert hi == pytest.approx(1.0) and 0.92 < lo < 0.94
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0) and 0.27 < hi < 0.29
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert np.isclose(sum(wilson_interval(5, 10)), 1.0)


def test_an_episode_can_go_on_after_success():
    """Recording keeps the expert acting after the task is done (it lets go, retreats); evaluation stops."""
    import envs
    from emu_world.episodes import run_episode

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["env=widowx_pick_place", "env.image_size=32"])
    env = to_dataclass(EnvConfig, cfg.env).make()
    try:
        plain, _ = run_episode(env, envs.make_expert("widowx_pick_place", env), 4)
        longer, _ = run_episode(env, envs.make_expert("widowx_pick_place", env), 4, after_success=3)
    finally:
        env.close()
    assert plain.success and plain.steps == plain.success_step
    assert longer.success_step == plain.success_step and longer.steps == plain.steps + 3
