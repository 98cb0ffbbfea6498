"""The goal-conditioned policy head: current frame + subgoal keyframe + proprioception -> action chunk.

    policy = GoalHeadPolicy(GoalHeadConfig(goal="keyframe"), stats)     # stats: state/action mean and std
    loss, logs = policy(batch)                                          # training: L1 on chunks + reached BCE
    policy.reset()
    action = policy.select_action(batch)                                # (B, A), one control step
    chunk = policy.predict_action_chunk(batch)                          # (B, chunk_size, A)
    policy.save("checkpoints/policy_aloha_fold/goal"); GoalHeadPolicy.load(...)

Batch keys (LeRobot's names where they exist): ``observation.image`` (B, 3, H, W) float in [0, 1],
``observation.goal`` (B, 3, H, W) the keyframe (goal heads only), ``observation.state`` (B, S);
for training also ``action`` (B, chunk, A), ``action_is_pad`` (B, chunk) and ``reached`` (B,).

Network (a few hundred thousand parameters): the current frame and the keyframe are stacked as six
channels (early fusion: the convolutions see where the two differ), four strided convolutions with
GroupNorm, then spatial-softmax keypoints (Levine et al. 2016; diffusion_policy) and a global average
pool; the normalised state joins them in an MLP; two linear heads give the normalised action chunk and
the logit that the frame has reached the keyframe (the agent's cue to advance its subgoal). Loss: L1
on the normalised actions of the chunk (padded steps past the episode end masked, as in ACT) plus
``reached_weight`` x the BCE of the reached head.

Execution (:meth:`select_action`): ``n_action_steps`` actions of each chunk, then a new query (ACT's
chunking); or, with ``temporal_ensemble_coeff`` set, a query every step and the overlapping chunks'
actions for the current step averaged with weights ``exp(-m * i)``, the oldest chunk first (ACT's
temporal ensembling).

References and departures: ACT (Zhao et al. 2023): chunking, L1, temporal ensembling; no CVAE and no
transformer here (one deterministic MLP head; the scripted demonstrations are unimodal). SuSIE / UniPi:
a low-level policy conditioned on a subgoal image.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from policies.goal_head.configuration_goal_head import GoalHeadConfig

FORMAT_NAME = "emu_world.policy.goal_head"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MIN_STD = 1e-2  # normalisation never divides by less (constant joints, unused grippers)


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) features -> (B, 2K) expected image coordinates of K learnt keypoint maps."""

    def __init__(self, channels: int, keypoints: int):
        super().__init__()
        self.project = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.project(x)  # (B, K, H, W)
        B, K, H, W = maps.shape
        attn = F.softmax(maps.flatten(2) / self.log_temperature.exp(), dim=-1)  # (B, K, H*W)
        ys = torch.linspace(-1.0, 1.0, H, device=x.device)
        xs = torch.linspace(-1.0, 1.0, W, device=x.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
        ex = (attn * grid_x.reshape(1, 1, -1)).sum(-1)  # (B, K)
        ey = (attn * grid_y.reshape(1, 1, -1)).sum(-1)
        return torch.cat([ex, ey], dim=1)  # (B, 2K)


def conv_encoder(in_channels: int, channels: list[int], strides: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (c, s) in enumerate(zip(channels, strides)):
        k = 5 if i == 0 else 3
        layers += [nn.Conv2d(in_channels, c, k, s, k // 2), nn.GroupNorm(min(8, c), c), nn.SiLU()]
        in_channels = c
    return nn.Sequential(*layers)


class TemporalEnsembler:
    """ACT's online temporal ensembling: the action for the current step is the weighted mean of what
    every earlier chunk still covering it predicted, weight ``exp(-m * i)`` for the i-th oldest."""

    def __init__(self, coeff: float, chunk_size: int):
        self.weights = torch.exp(-coeff * torch.arange(chunk_size, dtype=torch.float64))  # (C,)
        self.cum = torch.cumsum(self.weights, 0)  # (C,)
        self.reset()

    def reset(self) -> None:
        self.mean: torch.Tensor | None = None  # (B, n, A) running weighted means for the next n steps
        self.count: torch.Tensor | None = None  # (n,) chunks averaged into each

    def update(self, chunk: torch.Tensor) -> torch.Tensor:
        """Fold in a new chunk (B, C, A) predicted at this step; return this step's action (B, A)."""
        chunk = chunk.double()
        if self.mean is None:
            self.mean, self.count = chunk.clone(), torch.ones(chunk.shape[1], dtype=torch.long)
        else:
            n = self.mean.shape[1]  # C - 1 steps still covered by earlier chunks
            c = self.count  # (n,)
            self.mean = (self.mean * self.cum[c - 1][None, :, None] + chunk[:, :n] * self.weights[c][None, :, None]) \
                / self.cum[c][None, :, None]
            self.mean = torch.cat([self.mean, chunk[:, n:]], dim=1)
            self.count = torch.cat([c + 1, torch.ones(chunk.shape[1] - n, dtype=torch.long)])
        action, self.mean, self.count = self.mean[:, 0], self.mean[:, 1:], self.count[1:]
        return action.float()


class GoalHeadPolicy(nn.Module):
    """See the module docstring. ``stats``: ``{"state_mean", "state_std", "action_mean", "action_std"}``
    (numpy or tensors) from the training data; loaded checkpoints carry them as buffers."""

    name = "goal_head"

    def __init__(self, config: GoalHeadConfig, stats: dict[str, Any] | None = None):
        super().__init__()
        if not config.is_resolved:
            raise ValueError("GoalHeadPolicy needs a resolved config (GoalHeadConfig.resolved(...) fills camera, "
                             f"sizes, rate and chunk from the data); got {config}")
        self.config = c = config
        S, A = c.state_dim, c.action_dim
        for key, size in (("state_mean", S), ("state_std", S), ("action_mean", A), ("action_std", A)):
            value = torch.as_tensor(np.asarray(stats[key]), dtype=torch.float32) if stats is not None else \
                (torch.ones(size) if key.endswith("std") else torch.zeros(size))
            if value.shape != (size,):
                raise ValueError(f"stats[{key!r}] has shape {tuple(value.shape)}, expected ({size},)")
            self.register_buffer(key, value.clamp_min(MIN_STD) if key.endswith("std") else value)
        self.encoder = conv_encoder(6 if c.uses_goal else 3, list(c.channels), list(c.strides))
        self.keypoints = SpatialSoftmax(c.channels[-1], c.keypoints)
        self.state_proj = nn.Sequential(nn.Linear(S, 64), nn.SiLU())
        width = 2 * c.keypoints + c.channels[-1] + 64
        self.trunk = nn.Sequential(nn.Linear(width, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden), nn.SiLU())
        self.action_head = nn.Linear(c.hidden, c.chunk_size * A)
        self.reached_head = nn.Linear(c.hidden, 1) if c.uses_goal else None
        self.reset()

    # ------------------------------------------------------------------------- the network

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _trunk(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = batch["observation.image"] * 2.0 - 1.0  # (B, 3, H, W) in [-1, 1]
        if self.config.uses_goal:
            image = torch.cat([image, batch["observation.goal"] * 2.0 - 1.0], dim=1)  # (B, 6, H, W)
        fmap = self.encoder(image)  # (B, C, h, w)
        state = (batch["observation.state"] - self.state_mean) / self.state_std  # (B, S)
        feats = torch.cat([self.keypoints(fmap), fmap.mean(dim=(2, 3)), self.state_proj(state)], dim=1)
        return self.trunk(feats)  # (B, hidden)

    def _heads(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self._trunk(batch)
        chunk = self.action_head(h).view(-1, self.config.chunk_size, self.config.action_dim)  # normalised
        reached = self.reached_head(h).squeeze(-1) if self.reached_head is not None else None  # (B,) logits
        return chunk, reached

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss: masked L1 of the normalised chunk, plus the reached head's weighted BCE."""
        chunk, reached = self._heads(batch)
        target = (batch["action"] - self.action_mean) / self.action_std  # (B, C, A)
        valid = (~batch["action_is_pad"]).unsqueeze(-1).to(chunk.dtype)  # (B, C, 1)
        l1 = ((chunk - target).abs() * valid).sum() / (valid.sum() * self.config.action_dim).clamp_min(1.0)
        logs = {"l1": float(l1.detach())}
        loss = l1
        if reached is not None:
            bce = F.binary_cross_entropy_with_logits(reached, batch["reached"].to(reached.dtype))
            loss = loss + self.config.reached_weight * bce
            hit = ((reached > 0) == (batch["reached"] > 0.5)).float().mean()
            logs.update(reached_bce=float(bce.detach()), reached_acc=float(hit))
        logs["loss"] = float(loss.detach())
        return loss, logs

    # ------------------------------------------------------------------------- acting

    def reset(self) -> None:
        """Forget the queued actions (call at every episode start)."""
        self._queue: deque[torch.Tensor] = deque()
        self._ensembler = TemporalEnsembler(self.config.temporal_ensemble_coeff, self.config.chunk_size) \
            if self.config.temporal_ensemble_coeff is not None else None
        self.last_reached: torch.Tensor | None = None  # (B,) probability from the latest query
        self.queries = 0

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, chunk_size, A) actions in the robot's units; also sets :attr:`last_reached`."""
        chunk, reached = self._heads(batch)
        self.queries += 1
        self.last_reached = torch.sigmoid(reached) if reached is not None else None
        return chunk * self.action_std + self.action_mean

    def needs_query(self) -> bool:
        """Whether the next :meth:`select_action` runs the network (a new chunk, or every step when ensembling)."""
        return self._ensembler is not None or not self._queue

    @torch.no_grad()
    def select_action(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, A): the next action (a new query when the chunk's executed steps ran out, or every step
        with temporal ensembling)."""
        if self._ensembler is not None:
            return self._ensembler.update(self.predict_action_chunk(batch))
        if not self._queue:
            chunk = self.predict_action_chunk(batch)  # (B, C, A)
            self._queue.extend(chunk[:, :self.config.n_action_steps].transpose(0, 1))
        return self._queue.popleft()

    # ------------------------------------------------------------------------- checkpoint

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """``model.safetensors`` (weights and normalisation stats) + ``config.json``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS_FILE))
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "policy": self.name,
                "config": self.config.to_dict(), "parameters": self.num_parameters(), **(extra or {})}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "GoalHeadPolicy":
        path = Path(directory)
        meta = read_policy_meta(path)
        policy = cls(GoalHeadConfig.from_dict(meta["config"]))
        state = load_file(str(path / WEIGHTS_FILE))
        missing, unexpected = sorted(set(policy.state_dict()) - set(state)), sorted(set(state) - set(policy.state_dict()))
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILE} does not fit its config.json (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}); the folder is damaged: re-export it")
        policy.load_state_dict(state)
        return policy.eval()


def read_policy_meta(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a policy folder, checked to be this head's format."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a policy folder ({CONFIG_FILE} and {WEIGHTS_FILE} are needed). Train one with "
            "`python -m emu_world.train stage=policy dataset.root=datasets/<task>`")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{file} is not a goal-head policy (format {meta.get('format')!r}, expected {FORMAT_NAME!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def frames_to_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 frames -> (B, 3, H, W) float in [0, 1] (the batch's image keys)."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 255.0
