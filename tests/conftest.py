"""Test-wide settings: offline, deterministic, headless."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import envs  # noqa: E402,F401  (sets MUJOCO_GL before anything imports mujoco)
