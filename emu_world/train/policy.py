"""Training stage ``policy``: a goal-conditioned policy head (or the goal-free baseline) on one task's dataset.

    python -m emu_world.train stage=policy dataset.root=datasets/aloha_fold                  # goal head
    python -m emu_world.train stage=policy dataset.root=datasets/aloha_fold policy.goal=none # behaviour cloning
    python -m emu_world.train stage=policy ... resume=true          # continue exactly after an interruption
    torchrun --nproc_per_node=2 -m emu_world.train stage=policy dataset.root=datasets/aloha_fold

Data (:mod:`emu_world.data.policy_samples`): every frame of the dataset's episodes but the last
``dataset.eval_episodes`` (held out), each with the keyframe of its subtask, its state and the next
``policy.chunk_size`` actions. A goal head needs subtask annotations (the project's recorder writes
them). Augmentations (``policy_data:``): keyframe jitter in time, the tokenizer round trip of the
keyframe (``policy_data.tokenizer``: decode(encode(frame)), what an imagined keyframe looks like; the
round trips of the frames near keyframes are computed once at start), and a random shift of both
images. The batch of step ``s`` and its augmentations are a pure function of (seed, s), so resuming
restores them (their random draws are seeded by (seed, step, rank)).

Loop: the shared loop (:mod:`emu_world.train.loop`); the step is AdamW on the head's loss (L1 on the
normalised chunk + the reached head's BCE), gradients averaged over torchrun ranks. Evaluation: the
held-out episodes' L1 (normalised actions, no augmentation, the true keyframes) and reached accuracy.
Export (``<run_dir>/policy`` or ``policy_data.export_dir``): the policy folder (``model.safetensors``
with the normalisation stats, ``config.json``) and ``manifest.json`` (command, code version, dataset and
the seeds of its episodes, tokenizer of the round trip, metrics, training time).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from emu_world.config import to_dataclass
from emu_world.data.frames import FrameDataConfig, resolve_roots
from emu_world.data.policy_samples import (
    PolicyEpisodes,
    SampleConfig,
    dataset_subtask_steps,
)
from emu_world.data.robot_dataset import RobotDataset
from emu_world.errors import UserError
from emu_world.models.tokenizer import load_tokenizer
from emu_world.provenance import code_version, command_line
from emu_world.train.distributed import all_reduce_mean, average_gradients
from emu_world.train.loop import LoopConfig, Stage, batch_indices, resolved_config
from policies.goal_head import GoalHeadConfig, GoalHeadPolicy

HEAD_KEYS = ("goal", "camera", "channels", "strides", "keypoints", "hidden", "chunk_size")  # fixed by the weights


@dataclass
class PolicyDataConfig:
    """``policy_data:`` section: sampling, augmentation and export of the policy stage."""

    keyframe_jitter: int | None = None  # frames; null: 0.1 s of control steps rounded (5 at 50 Hz, 0 at 5 Hz)
    roundtrip_prob: float = 0.25  # probability that the keyframe is its tokenizer round trip (0: never)
    tokenizer: str = "checkpoints/tokenizer"  # the round trip's tokenizer (recorded in the manifest)
    shift: int = 4  # random shift of both images, pixels
    past_prob: float = 0.2  # goal heads: samples whose goal was reached up to one chunk ago (reached head only)
    pad: str = "repeat"  # chunk steps past an episode's end: repeat its last action (trained) | mask (ACT's rule)
    imagined_prob: float = 0.0  # goal heads: the goal is a keyframe the world model imagined (cached before training)
    imagined_world_model: str = "auto"  # ... by this export (auto: the task's, rollouts.task_checkpoint)
    imagined_decoding: str = "auto"  # ... decoded as the agent's planner will: auto | dida | ar
    imagined_every: float = 0.4  # ... from every frame this many seconds apart (and each subtask's first)
    eval_batches: int = 4  # held-out batches of train.batch_size frames per evaluation
    export_dir: str | None = None  # null: <run_dir>/policy

    def __post_init__(self) -> None:
        if not 0.0 <= self.imagined_prob <= 1.0 or self.imagined_every <= 0:
            raise ValueError(f"policy_data.imagined_prob must be in [0, 1] and imagined_every > 0 s, got "
                             f"{self.imagined_prob} and {self.imagined_every}")
        from emu_world.planner import DECODINGS

        if self.imagined_decoding not in DECODINGS:
            raise ValueError(f"policy_data.imagined_decoding must be one of {DECODINGS}, got {self.imagined_decoding!r}")
        if not 0.0 <= self.roundtrip_prob <= 1.0 or not 0.0 <= self.past_prob < 1.0:
            raise ValueError(f"policy_data.roundtrip_prob must be in [0, 1] and policy_data.past_prob in [0, 1), got "
                             f"{self.roundtrip_prob} and {self.past_prob}")
        if (self.keyframe_jitter is not None and self.keyframe_jitter < 0) or self.shift < 0:
            raise ValueError("policy_data.keyframe_jitter and policy_data.shift must be >= 0")
        if self.eval_batches < 1:
            raise ValueError(f"policy_data.eval_batches must be >= 1, got {self.eval_batches}")


def one_dataset(roots: FrameDataConfig) -> Path:
    """The one dataset folder a policy trains on."""
    found = resolve_roots(roots.roots)
    if len(found) != 1:
        raise UserError(f"dataset.root names {len(found)} datasets ({[str(p) for p in found]}); a policy head "
                        "trains on one task's dataset: give its folder, e.g. dataset.root=datasets/aloha_fold")
    return found[0]


def roundtrip_frames(episodes: PolicyEpisodes, indices: np.ndarray, tokenizer_path: str, log=print) -> dict:
    """{global index: decode(encode(frame))} for ``indices`` (the frames a jittered keyframe can be)."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path)
    if int(tokenizer.image_size) != episodes.frames.shape[1]:
        raise UserError(f"policy_data.tokenizer={tokenizer_path} reads {tokenizer.image_size}px frames, the dataset "
                        f"has {episodes.frames.shape[1]}px: give a tokenizer for these frames or "
                        "policy_data.roundtrip_prob=0")
    out = {}
    for a in range(0, len(indices), 256):
        part = indices[a:a + 256]
        decoded = tokenizer.decode(tokenizer.encode(episodes.frames[part])).numpy()  # (n, H, W, 3) uint8
        out.update({int(i): f for i, f in zip(part, decoded)})
    log(f"tokenizer round trip of {len(indices)} frames near keyframes in {time.perf_counter() - t0:.1f}s")
    return out


def imagine_keyframes(episodes: PolicyEpisodes, root: Path, cfg: PolicyDataConfig, fps: float,
                      log=print) -> dict[str, str]:
    """Fill ``episodes.imagined``: from every frame ``imagined_every`` seconds apart (and the first frame of
    each subtask), the keyframe of its subtask imagined by the world model (the planner's prompt and decoding);
    returns the export's path and decoding (recorded in the manifest)."""
    from emu_world.planner import Planner, PlannerConfig

    ds = RobotDataset(root, check_videos=False)
    task = ds.provenance.get("env")
    if not task or ds.subtask_vocab is None:
        raise UserError(f"{root} does not say which task recorded it (meta/emu_world.json env) or has no subtask "
                        "texts: imagined keyframes need both; set policy_data.imagined_prob=0")
    planner = Planner(PlannerConfig(checkpoint=cfg.imagined_world_model, decoding=cfg.imagined_decoding), str(task))
    step = max(1, round(cfg.imagined_every * fps))
    first = np.r_[True, (episodes.subtask[1:] != episodes.subtask[:-1]) | (episodes.keyframe[1:] != episodes.keyframe[:-1])]
    sources = np.flatnonzero(first | (np.arange(len(episodes)) % step == 0))
    t0 = time.perf_counter()
    codes = planner.tokenizer.encode(episodes.frames[sources]).numpy()
    imagined = {}
    for n, (src, c) in enumerate(zip(sources, codes)):
        text = ds.subtask_vocab[int(episodes.subtask[src])]
        imagined[int(src)] = planner.imagine(c, text, seed=int(src))
    decoded = planner.tokenizer.decode(np.stack(list(imagined.values()))).numpy()
    episodes.imagined = dict(zip(imagined, decoded))
    log(f"{len(sources)} keyframes imagined by {planner.ex.path} in {time.perf_counter() - t0:.1f}s")
    return {"world_model": str(planner.ex.path), "decoding": planner.config.decoding}


class PolicyStage(Stage):
    """``stage=policy``: see the module docstring."""

    name = "policy"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.head = to_dataclass(GoalHeadConfig, cfg.policy)
        self.data_cfg = to_dataclass(PolicyDataConfig, cfg.policy_data)
        self.frames_cfg = to_dataclass(FrameDataConfig, cfg.dataset)
        self.loop = to_dataclass(LoopConfig, cfg.train)
        if (self.loop.device, self.loop.parallel) != ("cpu", "ddp"):
            raise UserError(f"train.device={self.loop.device} train.parallel={self.loop.parallel}: a policy head "
                            "trains on CPU, replicated over torchrun ranks (drop those overrides)")
        self.root = one_dataset(self.frames_cfg)
        self.seed = int(cfg.seed)
        self.resolved = resolved_config(cfg)

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        saved = meta["config"].get("policy", {})
        diff = [k for k in HEAD_KEYS if saved.get(k) != self.resolved["policy"].get(k)]
        if diff:
            raise UserError(f"{path} holds a policy head with other {diff} ({[saved.get(k) for k in diff]}); resume "
                            "with its settings or start a new run_dir")

    def build(self, resuming: bool) -> None:
        ds = RobotDataset(self.root, check_videos=False)
        n, held = ds.num_episodes, self.frames_cfg.eval_episodes
        if n <= held:
            raise UserError(f"{self.root} has {n} episodes; holding out dataset.eval_episodes={held} leaves none to "
                            "train on. Record more episodes or lower dataset.eval_episodes.")
        t0 = time.perf_counter()
        self.train_eps = PolicyEpisodes.load(self.root, self.head.camera, range(n - held))
        self.heldout = PolicyEpisodes.load(self.root, self.head.camera, range(n - held, n))
        if self.head.uses_goal:
            self.train_eps.require_annotations()
            self.heldout.require_annotations()
        self.head = self.head.resolved(self.train_eps.camera.removeprefix("observation.images."),
                                       self.train_eps.frames.shape[1], self.train_eps.actions.shape[1],
                                       self.train_eps.states.shape[1], float(ds.fps))
        jitter = self.data_cfg.keyframe_jitter
        self.samples = SampleConfig(
            chunk_size=self.head.chunk_size, goal=self.head.uses_goal,
            keyframe_jitter=jitter if jitter is not None else round(0.1 * self.head.fps),
            roundtrip_prob=self.data_cfg.roundtrip_prob, shift=self.data_cfg.shift,
            reached_margin=self.head.reached_margin, past_prob=self.data_cfg.past_prob,
            past_window=self.head.n_action_steps, pad=self.data_cfg.pad,  # a goal reached up to one executed chunk ago
            imagined_prob=self.data_cfg.imagined_prob)
        self.log(f"data {self.root}: {len(self.train_eps)} training frames ({n - held} episodes), "
                 f"{len(self.heldout)} held out ({held}), decoded in {time.perf_counter() - t0:.1f}s")
        if self.head.uses_goal and self.samples.roundtrip_prob > 0:
            near = self.train_eps.keyframe_neighbourhood(self.samples.keyframe_jitter)
            self.train_eps.roundtrip = roundtrip_frames(self.train_eps, near, self.data_cfg.tokenizer, self.log)
        if self.head.uses_goal and self.samples.imagined_prob > 0:
            self.imagined_by = imagine_keyframes(self.train_eps, self.root, self.data_cfg, self.head.fps, self.log)
        torch.manual_seed(self.seed)
        self.model = GoalHeadPolicy(self.head, self.train_eps.stats())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.loop.lr, betas=tuple(self.loop.betas),
                                     weight_decay=self.loop.weight_decay)
        self.models, self.optimizers = {"policy": self.model}, {"policy": self.opt}
        self.log(f"policy head ({self.head.goal}): {self.model.num_parameters():,} parameters, chunk "
                 f"{self.head.chunk_size} at {self.head.fps:g} Hz")

    def train_step(self, step: int) -> dict[str, float]:
        info, loop = self.info, self.loop
        idx = batch_indices(step, loop.batch_size, len(self.train_eps), self.seed)[info.rank:: info.world_size]
        batch = self.train_eps.batch(idx, np.random.default_rng([self.seed, step, info.rank]), self.samples)
        self.model.train()
        with loop.autocast():
            loss, logs = self.model(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model, info)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), loop.grad_clip) if loop.grad_clip > 0 else None
        self.opt.step()
        keys = sorted(logs)
        mean = all_reduce_mean(torch.tensor([logs[k] for k in keys], dtype=torch.float64), info)
        out = {k: float(v) for k, v in zip(keys, mean)}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out L1 of the normalised actions and reached accuracy: evenly spaced frames, the true
        keyframes, no augmentation."""
        self.model.eval()
        count = min(len(self.heldout), self.data_cfg.eval_batches * self.loop.batch_size)
        picks = np.linspace(0, len(self.heldout) - 1, count).round().astype(np.int64)
        sums: dict[str, float] = {}
        for part in np.array_split(picks, max(1, count // self.loop.batch_size)):
            _, logs = self.model(self.heldout.batch(part, np.random.default_rng(0), self.samples, augment=False))
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(part)
        return {f"heldout_{k}": round(v / count, 5) for k, v in sums.items()}

    def export(self, final: dict[str, Any] | None, train_seconds: float) -> tuple[Path | None, dict[str, Any] | None]:
        if not self.info.is_main:
            return None, final
        out = Path(self.data_cfg.export_dir) if self.data_cfg.export_dir else Path(self.cfg.run_dir) / "policy"
        self.model.save(out)
        manifest = self.manifest(final or {}, train_seconds)
        tmp = out / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        tmp.replace(out / "manifest.json")
        print(f"exported policy head ({self.head.goal}) to {out} (held-out {final})", flush=True)
        return out, final

    def manifest(self, metrics: dict[str, Any], train_seconds: float) -> dict[str, Any]:
        provenance = RobotDataset(self.root, check_videos=False).provenance
        seeds = [e.get("seed") for e in provenance.get("episodes", [])]
        tokenizer = None
        if self.train_eps.roundtrip:
            tok = load_tokenizer(self.data_cfg.tokenizer)
            tokenizer = {"path": self.data_cfg.tokenizer, "identity": tok.identity(),
                         "code_identity": tok.code_identity()}
        return {
            "command": command_line("emu_world.train"), "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stage": "policy", "policy": "goal_head",
            "head": asdict(self.head), "config": self.resolved,
            "data": {"root": str(self.root), "env": provenance.get("env"), "episodes": len(seeds),
                     "train_episodes": self.train_eps.episodes, "heldout_episodes": self.heldout.episodes,
                     "episode_seeds": seeds, "train_frames": len(self.train_eps),
                     "subtask_steps": dataset_subtask_steps(RobotDataset(self.root, check_videos=False))
                     if self.train_eps.annotated else None,
                     "sampling": asdict(replace(self.samples))},
            "tokenizer": tokenizer, "imagined_by": getattr(self, "imagined_by", None),
            "metrics": metrics, "train_seconds": round(train_seconds, 1),
            "world_size": self.info.world_size, "torch_threads_per_rank": torch.get_num_threads(),
            "parameters": self.model.num_parameters(),
            "note": "metrics: held-out episodes (the last dataset.eval_episodes), true keyframes, no augmentation; "
                    "success rates come from `python -m emu_world.evaluate agent=oracle_subgoal|bc`",
        }
