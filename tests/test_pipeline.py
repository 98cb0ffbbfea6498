"""``python -m emu_world.pipeline`` end to end on tiny settings: every stage runs once, a second run
skips them all (their outputs are valid), and the agent is evaluated with what they produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TASK = "widowx_pick_place"


def run(tmp_path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "emu_world.pipeline", f"env={TASK}", "env.image_size=32", "env.max_episode_steps=16",
           "from_scratch=true", f"out={tmp_path / 'out'}", f"record.root={tmp_path / 'data'}", "record.episodes=3",
           "progress=false", "record.keep_failures=true", "tokenizer.train=['experiment=tiny']", "world_model.train=['experiment=tiny_world_model']",
           "dida.train=['experiment=tiny_dida']", "policy.train=['experiment=tiny_policy']", "evaluate.episodes=1",
           "evaluate.video=false", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pipeline_runs_every_stage_then_skips_what_is_done(tmp_path):
    first = run(tmp_path)
    names = [s["stage"] for s in first["stages"]]
    assert names == ["record", "tokenizer", "world_model", "dida", "policy", "evaluate"]
    assert all(s["status"] == "ran" for s in first["stages"])
    assert first["success_rate"] is not None and first["wall_seconds"] > 0
    second = run(tmp_path)
    assert [s["status"] for s in second["stages"]] == ["skipped"] * 5 + ["ran"]
