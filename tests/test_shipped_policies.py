"""The shipped policy heads (checkpoints/policy_<task>/{goal,bc}): they load, say how they were made, take
the action size of their task, and stay small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from emu_world.config import CONFIG_DIR, REPO_ROOT
from policies.goal_head import GoalHeadPolicy

FOLDERS = sorted((REPO_ROOT / "checkpoints").glob("policy_*/*/manifest.json"))


def test_policy_checkpoints_together_stay_under_20_mb():
    total = sum(f.stat().st_size for m in FOLDERS for f in m.parent.iterdir())
    assert total < 20 * 2**20


@pytest.mark.parametrize("manifest", FOLDERS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_a_shipped_head_loads_and_acts_for_its_task(manifest: Path):
    folder, task = manifest.parent, manifest.parent.parent.name.removeprefix("policy_")
    record = json.loads(manifest.read_text())
    assert record["command"].startswith("python -m emu_world.train stage=policy") and record["code_version"]
    assert record["data"]["env"] == task and record["metrics"]
    head = GoalHeadPolicy.load(folder)
    assert head.config.uses_goal == (folder.name == "goal")
    env = OmegaConf.load(CONFIG_DIR / "env" / f"{task}.yaml")
    size = int(env.image_size)
    batch = {"observation.image": torch.zeros(1, 3, size, size), "observation.state": torch.zeros(1, head.config.state_dim)}
    if head.config.uses_goal:
        batch["observation.goal"] = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        chunk = head.predict_action_chunk(batch)
    assert chunk.shape[-1] == head.config.action_dim and torch.isfinite(chunk).all()
