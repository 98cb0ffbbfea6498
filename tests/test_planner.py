"""The planner (subtask memory, text-only generation, keyframes by AR or DiDA) and the world-model agent,
on a tiny untrained export of a tiny tokenizer: the mechanics, not the quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu_world.agents import WorldModelAgent, subtask_steps
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.errors import UserError
from emu_world.evaluate import evaluate
from emu_world.models.generate import GenerationConfig, Generator, Sampling
from emu_world.planner import Planner, PlannerConfig, nearest_subtask
from policies.goal_head import GoalHeadPolicy

torch.set_num_threads(1)
TASK = "widowx_pick_place"


@pytest.fixture(scope="module")
def export(tiny_export) -> dict[str, Path]:
    """A tiny untrained tokenizer and DiDA export for widowx_pick_place, and a tiny goal head (conftest)."""
    return tiny_export


def planner(export, **kw) -> Planner:
    return Planner(PlannerConfig(checkpoint=str(export["world_model"]), tokenizer=str(export["tokenizer"]), **kw), TASK)


def frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_text_generation_can_stop_where_the_image_would_start(export):
    p = planner(export, decoding="ar")
    codes = p.tokenizer.encode(frame()[None]).numpy()[0]
    prompt = p.ex.layout.plan(p.prompt, codes, [], [], end=False).tokens
    gen = Generator(p.ex.model, p.ex.layout, GenerationConfig(text=Sampling(0.0)))
    out = gen.generate(prompt, max_new_tokens=64, stop_at_image=True)
    assert out.stop in ("image", "budget", "eos")
    assert p.ex.layout.sov not in out.new_tokens.tolist()  # stopped before any image began


def test_the_subtask_index_moves_on_when_reached_and_goes_back_only_on_repeated_evidence(export, monkeypatch):
    p = planner(export, decoding="ar", back_votes=2, begin="said")
    subtasks = p.subtasks
    said = iter([subtasks[1], subtasks[2], subtasks[0], subtasks[2], subtasks[0], subtasks[0], "gibberish"])
    monkeypatch.setattr(p, "say", lambda codes: next(said))
    p.reset()
    first = p.plan(frame(0))
    assert (first.subtask_index, first.reason) == (1, "first")  # where the model says the episode stands
    assert first.keyframe.shape == (32, 32, 3) and first.keyframe_codes.shape == (4, 4)
    assert p.plan(frame(1)).subtask_index == 1  # it names a later subtask: evidence, not a decision
    assert p.plan(frame(2), reached=True).subtask_index == 2  # reached: the next one
    assert p.plan(frame(3)).subtask_index == 2  # one vote for an earlier subtask is not enough
    back = [p.plan(frame(4)), p.plan(frame(5))]  # ... the vote was broken, then two in a row
    assert [b.subtask_index for b in back] == [2, 0] and back[1].reason == "back"
    assert p.plan(frame(6)).subtask_index == 0  # an unknown text changes nothing
    assert [s["reason"] for s in p.summary()][:3] == ["first", "replan", "reached"]


def test_the_first_plan_pursues_the_first_subtask_unless_told_to_trust_the_model(export, monkeypatch):
    p = planner(export, decoding="ar")
    monkeypatch.setattr(p, "say", lambda codes: p.subtasks[-1])  # a model that names the last subtask at the start
    assert (p.plan(frame(0)).subtask_index, p.plan(frame(1)).subtask_index) == (0, 0)
    with pytest.raises(ValueError, match="planner.begin"):
        PlannerConfig(begin="middle")


def test_keyframes_by_dida_are_seeded_and_the_known_text_mode_skips_generation(export):
    p = planner(export, decoding="dida", text="known")
    a, b = p.plan(frame(), seed=3), p.plan(frame(), seed=3)
    assert a.said is None and a.text == p.subtasks[0]
    np.testing.assert_array_equal(a.keyframe_codes, b.keyframe_codes)
    with pytest.raises(UserError, match="was not trained on aloha_fold"):
        Planner(PlannerConfig(checkpoint=str(export["world_model"]), tokenizer=str(export["tokenizer"])), "aloha_fold")


def test_nearest_subtask():
    names = ("grasp the cube", "lift it", "put it in the bowl")
    assert nearest_subtask("lift it", names) == 1 and nearest_subtask("lift itt", names) == 1
    assert nearest_subtask("fold the cloth", names) is None


def agent_configs(export, *overrides: str) -> tuple[EnvConfig, AgentConfig]:
    """The world-model agent on the tiny export, on 32-pixel frames, with ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"env={TASK}", "env.image_size=32", "agent=world_model", f"agent.checkpoint={export['goal']}",
            f"agent.planner.checkpoint={export['world_model']}", f"agent.planner.tokenizer={export['tokenizer']}",
            *overrides])
    return to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent)


def test_the_world_model_agent_plans_and_acts_through_evaluate(export, tmp_path):
    env_cfg, agent_cfg = agent_configs(export, "env.max_episode_steps=6", "agent.replan=chunk", "agent.subtask_budget=0.5")
    summary = evaluate(env_cfg, agent_cfg, episodes=1, seed=2, output_dir=tmp_path, video=True, progress=False)
    record = json.loads((tmp_path / "episodes.jsonl").read_text())
    plans = record["agent"]["plans"]
    assert record["steps"] == 6 and len(plans) >= 3  # a plan per chunk (2 steps at 5 Hz), budgets of 2-3 steps
    assert summary["mean_plans_per_episode"] == len(plans) and 0 < summary["planner_share_of_agent_time"] <= 1
    from PIL import Image

    strip = Image.open(tmp_path / "videos" / "episode_000_keyframes.png")  # camera when planned above imagined
    assert strip.size == (150 + (len(plans) + 1) * (32 + 4), 20 + 2 * (32 + 4))  # + the episode's last frame
    assert subtask_steps(export["goal"]) == [3, 2, 4]
    with pytest.raises(UserError, match="agent.replan"):
        WorldModelAgent(GoalHeadPolicy.load(export["goal"]), None, [3], replan="always")


def test_the_agent_replans_when_the_last_subtasks_budget_runs_out(export, tmp_path):
    """It used to wait on the last subtask's keyframe for the rest of the episode."""
    env_cfg, agent_cfg = agent_configs(export, "env.max_episode_steps=24", "agent.subtask_budget=0.5",
                                       "agent.reached_threshold=0.999")
    evaluate(env_cfg, agent_cfg, episodes=1, seed=2, output_dir=tmp_path, progress=False)
    plans = json.loads((tmp_path / "episodes.jsonl").read_text())["agent"]["plans"]
    assert [p["subtask"] for p in plans[:4]] == [0, 1, 2, 3]  # budgets only (never reached)
    assert len(plans) > 5 and {p["reason"] for p in plans[4:]} <= {"replan", "back"}


def test_auto_decoding_is_dida_for_an_adapted_export_and_token_by_token_otherwise(export, tmp_path):
    """planner.decoding=auto (the agent's default): the shipped aloha_fold model was never DiDA-adapted."""
    assert planner(export, decoding="auto").config.decoding == "dida"
    plain = tmp_path / "ar_only"
    shutil.copytree(export["world_model"], plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest.pop("dida")
    (plain / "manifest.json").write_text(json.dumps(manifest))
    p = Planner(PlannerConfig(checkpoint=str(plain), tokenizer=str(export["tokenizer"]), decoding="auto"), TASK)
    assert (p.config.decoding, p.describe()["decoding"]) == ("ar", "ar")
    with pytest.raises(ValueError, match="planner.decoding must be one of"):
        PlannerConfig(decoding="fast")
