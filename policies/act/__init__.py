"""LeRobot's ACT as an agent of the evaluation harness: the baseline our heads are measured against.

ACT is trained by LeRobot itself, on the same local dataset the heads train on (not by this
project's code), e.g. for aloha_fold::

    lerobot-train --dataset.repo_id=local/aloha_fold --dataset.root=datasets/aloha_fold \\
        --policy.type=act --policy.device=cpu --policy.push_to_hub=false \\
        --policy.pretrained_backbone_weights=null --dataset.video_backend=pyav --num_workers=0 \\
        --eval_freq=0 --output_dir=outputs/act/aloha_fold --steps=... --batch_size=...

and loaded here from its ``checkpoints/<step>/pretrained_model`` folder (``checkpoints/last`` links the
newest) with LeRobot's own pre/post-processors (normalisation, device), exactly as ``lerobot-eval``
runs it: the env's observation in LeRobot's keys (``observation.images.<camera>`` float in [0, 1],
``observation.state``) -> preprocessor -> ``ACTPolicy.select_action`` (its chunk queue, or temporal
ensembling) -> postprocessor -> the action. ``n_action_steps`` / ``temporal_ensemble_coeff``
override the trained config's execution (the same chunk execution as our heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from emu_world.config import EnvConfig
from emu_world.errors import MissingInputError, UserError


def set_execution(policy: Any, n_action_steps: int | None, temporal_ensemble_coeff: float | None) -> None:
    """Run the chunks as asked: temporal ensembling with ``temporal_ensemble_coeff`` (one query per step),
    or ``n_action_steps`` of each chunk; None keeps what the checkpoint was trained with."""
    from lerobot.policies.act.modeling_act import ACTTemporalEnsembler

    c = policy.config
    if temporal_ensemble_coeff is not None:
        c.temporal_ensemble_coeff, c.n_action_steps = float(temporal_ensemble_coeff), 1
        policy.temporal_ensembler = ACTTemporalEnsembler(c.temporal_ensemble_coeff, c.chunk_size)
    elif n_action_steps is not None:
        if not 1 <= int(n_action_steps) <= c.chunk_size:
            raise UserError(f"agent.n_action_steps={n_action_steps} must be in 1..{c.chunk_size} (the ACT's chunk)")
        c.temporal_ensemble_coeff, c.n_action_steps = None, int(n_action_steps)
    policy.reset()


class LeRobotACTAgent:
    """An ``ACTPolicy`` with its processors, driving one of our envs."""

    def __init__(self, policy: Any, preprocessor: Any, postprocessor: Any, cameras: list[str]):
        self.policy, self.preprocessor, self.postprocessor = policy.eval(), preprocessor, postprocessor
        self.cameras = cameras

    @classmethod
    def load(cls, path: Path, env_cfg: EnvConfig, n_action_steps: int | None = None,
             temporal_ensemble_coeff: float | None = None) -> "LeRobotACTAgent":
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise MissingInputError(
                f"{path} is not a LeRobot pretrained_model folder (config.json and model.safetensors are needed). "
                f"Train ACT with lerobot-train on datasets/{env_cfg.name} (README: the ACT commands) and give "
                "agent.checkpoint=<output_dir>/checkpoints/last/pretrained_model")
        from lerobot.policies.act.modeling_act import ACTPolicy
        from lerobot.policies.factory import make_pre_post_processors

        policy = ACTPolicy.from_pretrained(str(path))
        policy.config.device = "cpu"
        set_execution(policy, n_action_steps, temporal_ensemble_coeff)
        action = policy.config.output_features.get("action")
        if action is not None and tuple(action.shape) != (env_cfg.action_dim,):
            raise UserError(f"{path} drives {tuple(action.shape)} actions but env={env_cfg.name} takes "
                            f"({env_cfg.action_dim},): use an ACT trained on datasets/{env_cfg.name}")
        cameras = [k.removeprefix("observation.images.") for k in policy.config.image_features]
        missing = [c for c in cameras if c not in env_cfg.cameras]
        if missing:
            raise UserError(f"{path} reads cameras {cameras}; env.cameras={list(env_cfg.cameras)} lacks {missing}")
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path),
                                             preprocessor_overrides={"device_processor": {"device": "cpu"}})
        return cls(policy, pre, post, cameras)

    def reset(self, obs: dict, info: dict) -> None:
        self.policy.reset()

    @torch.no_grad()
    def act(self, obs: dict, info: dict) -> np.ndarray:
        batch = {f"observation.images.{c}": torch.from_numpy(np.asarray(obs["pixels"][c])).permute(2, 0, 1)[None]
                 .float() / 255.0 for c in self.cameras}
        batch["observation.state"] = torch.as_tensor(np.asarray(obs["agent_pos"], dtype=np.float32))[None]
        action = self.postprocessor(self.policy.select_action(self.preprocessor(batch)))
        return np.asarray(action, dtype=np.float32).reshape(-1)
