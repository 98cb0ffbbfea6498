"""Training samples of a policy head: (frame t, keyframe of the subtask that contains t, state t,
actions t .. t+chunk-1), from every frame of a task's recorded episodes.

    episodes = PolicyEpisodes.load("datasets/aloha_fold", camera="top", episodes=range(48))
    batch = episodes.batch(indices, rng, SampleConfig(chunk_size=20, keyframe_jitter=5))

The keyframe of a subtask is the first frame of the next subtask, or for the last subtask the frame the
task was done from (:func:`~emu_world.data.robot_dataset.subtasks_from_indices`); the frames recorded
after success (letting go, retreating) pursue that keyframe, already reached. Augmentations, so that a
head tolerates imperfect subgoals (an imagined keyframe is neither the exact frame nor the exact time):
the keyframe moves by a uniform ``[-keyframe_jitter, keyframe_jitter]`` frames (never before frame t,
unless it already was, nor past the episode's end), is replaced with probability ``roundtrip_prob`` by its tokenizer round
trip (decode(encode(frame)): what a keyframe imagined as codes looks like), and both images shift by
the same random ``[-shift, shift]`` pixels (edge padding, then a crop). Chunks that run past the
episode's end repeat its last action: the recorded episodes end at success (the env terminates), so
holding the last command is what comes next; the aloha_fold expert opens its grippers only in the
episode's last steps (the release that completes the fold), and with those steps masked (``pad:
mask``, ACT's rule, which marks them ``action_is_pad``) a head never learnt to let go (0/6 folds). ``reached`` is 1 when the
keyframe is at most ``reached_margin`` steps ahead of frame t.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from emu_world.data.frames import decode_episode_frames
from emu_world.data.robot_dataset import IMAGE_PREFIX, RobotDataset
from emu_world.errors import UserError


@dataclass
class SampleConfig:
    """How samples are cut and augmented (the training stage's ``policy_data:`` section fills it)."""

    chunk_size: int = 20
    goal: bool = True  # False: behaviour cloning, no keyframe
    keyframe_jitter: int = 5  # frames
    roundtrip_prob: float = 0.0  # probability of the tokenizer round trip of the keyframe
    shift: int = 4  # pixels
    reached_margin: int = 3  # steps
    past_prob: float = 0.0  # probability of a "reached a moment ago" sample (goal heads)
    past_window: int = 20  # ... the goal is up to this many steps before the frame
    pad: str = "repeat"  # chunk steps past the episode's end: repeat (the last action, trained) | mask (not trained)
    imagined_prob: float = 0.0  # probability that the goal is a keyframe the world model imagined (cached)

    def __post_init__(self) -> None:
        if self.pad not in ("repeat", "mask"):
            raise ValueError(f"policy_data.pad must be repeat or mask, got {self.pad!r}")


@dataclass
class PolicyEpisodes:
    """Every frame of some episodes of one dataset, in memory, indexed globally (N frames)."""

    root: Path
    camera: str  # the full feature key, observation.images.<camera>
    episodes: list[int]
    frames: np.ndarray  # (N, H, W, 3) uint8
    states: np.ndarray  # (N, S) float32
    actions: np.ndarray  # (N, A) float32
    episode_end: np.ndarray  # (N,) int64: global index one past the last frame of the frame's episode
    keyframe: np.ndarray  # (N,) int64: global index of the keyframe of the frame's subtask (-1: not annotated)
    subtask: np.ndarray  # (N,) int64: the frame's subtask index (-1: not annotated)
    roundtrip: dict[int, np.ndarray] | None = None  # global index -> (H, W, 3) uint8 tokenizer round trip
    imagined: dict[int, np.ndarray] | None = None  # global index of a frame -> the keyframe imagined from it

    @property
    def annotated(self) -> bool:
        return bool((self.keyframe >= 0).all())

    def __len__(self) -> int:
        return len(self.frames)

    @classmethod
    def load(cls, root: str | Path, camera: str | None, episodes: Sequence[int]) -> "PolicyEpisodes":
        """Decode every frame of ``episodes`` (the dataset's first camera when ``camera`` is None)."""
        ds = RobotDataset(root, check_videos=False)
        key = ds.camera_keys[0] if camera is None else (camera if camera.startswith(IMAGE_PREFIX)
                                                         else IMAGE_PREFIX + camera)
        if key not in ds.camera_keys:
            raise UserError(f"{root} has no camera {key!r}; it has {ds.camera_keys}: set policy.camera to one of them")
        episodes = [int(e) for e in episodes]
        frames = decode_episode_frames(ds, key, episodes, 1)
        states, actions, ends, keyframes, subtasks = [], [], [], [], []
        offset = 0
        for e, f in zip(episodes, frames):
            ep = ds.episode(e, decode=False)
            if ep.states is None:
                raise UserError(f"{root} has no observation.state; a policy head reads the robot's state")
            T = ep.length
            if len(f) != T:
                raise UserError(f"{root}: episode {e} has {len(f)} frames but {T} actions; the dataset is damaged")
            states.append(ep.states)
            actions.append(ep.actions)
            ends.append(np.full(T, offset + T, dtype=np.int64))
            kf, st = np.full(T, -1, dtype=np.int64), np.full(T, -1, dtype=np.int64)
            for s in ep.subtasks:
                kf[s.start_frame:s.end_frame + 1] = offset + s.keyframe
                st[s.start_frame:s.end_frame + 1] = s.index
            keyframes.append(kf)
            subtasks.append(st)
            offset += T
        return cls(Path(root), key, episodes, np.concatenate(frames), np.concatenate(states).astype(np.float32),
                   np.concatenate(actions).astype(np.float32), np.concatenate(ends), np.concatenate(keyframes),
                   np.concatenate(subtasks))

    def require_annotations(self) -> None:
        if not self.annotated:
            missing = int((self.keyframe < 0).sum())
            raise UserError(
                f"{self.root} has no subtask annotations for {missing} of {len(self)} frames, and a goal head "
                "learns from the keyframes that end subtasks. Record the task with the project's recorder "
                "(`python -m emu_world.record env=<task> dataset.root=...`, which annotates subtasks), or train "
                "the goal-free head with policy.goal=none")

    def stats(self) -> dict[str, np.ndarray]:
        """Mean and standard deviation of states and actions (the head's normalisation)."""
        return {"state_mean": self.states.mean(0), "state_std": self.states.std(0),
                "action_mean": self.actions.mean(0), "action_std": self.actions.std(0)}

    def episode_start(self, i: np.ndarray) -> np.ndarray:
        """Global index of the first frame of each frame's episode."""
        ends = np.unique(self.episode_end)  # (E,) sorted
        starts = np.concatenate([[0], ends[:-1]])
        return starts[np.searchsorted(ends, self.episode_end[i])]

    def keyframe_neighbourhood(self, jitter: int) -> np.ndarray:
        """Global indices a jittered keyframe can land on (for the round-trip cache)."""
        kf = np.unique(self.keyframe[self.keyframe >= 0])
        near = (kf[:, None] + np.arange(-jitter, jitter + 1)[None, :]).reshape(-1)
        return np.unique(near[(near >= 0) & (near < len(self))])

    def goal_indices(self, i: np.ndarray, rng: np.random.Generator, cfg: SampleConfig) -> tuple[np.ndarray, np.ndarray]:
        """The (jittered) keyframe index of each frame in ``i`` (never before it unless its keyframe already is,
        as after the task was done; never past its episode), and which samples instead show a goal reached a
        moment ago (a frame up to ``past_window`` steps before)."""
        k = self.keyframe[i] + rng.integers(-cfg.keyframe_jitter, cfg.keyframe_jitter + 1, size=len(i))
        k = np.clip(k, np.minimum(i, self.keyframe[i]), self.episode_end[i] - 1)
        past = rng.random(len(i)) < cfg.past_prob
        back = np.maximum(i - rng.integers(0, cfg.past_window + 1, size=len(i)), self.episode_start(i))
        return np.where(past, back, k), past

    def imagined_sources(self) -> np.ndarray:
        return np.fromiter(sorted(self.imagined or {}), dtype=np.int64)

    def use_imagined(self, i: np.ndarray, k: np.ndarray, goals: np.ndarray, pick: np.ndarray) -> np.ndarray:
        """Replace the goals of the ``pick``ed samples, in place, by the keyframe the world model imagined
        from the latest cached frame at or before theirs in the same subtask; their reached label then
        follows the true keyframe (returned: the keyframe indices of the labels)."""
        sources = self.imagined_sources()
        k = k.copy()
        for j in np.flatnonzero(pick):
            at = np.searchsorted(sources, i[j], side="right") - 1
            if at < 0 or self.keyframe[sources[at]] != self.keyframe[i[j]] or self.subtask[sources[at]] != self.subtask[i[j]]:
                continue  # no imagination of this subtask from before this frame
            goals[j] = self.imagined[int(sources[at])]
            k[j] = self.keyframe[i[j]]
        return k

    def goal_frames(self, k: np.ndarray, rng: np.random.Generator, cfg: SampleConfig) -> np.ndarray:
        goals = self.frames[k].copy()  # (B, H, W, 3)
        if self.roundtrip and cfg.roundtrip_prob > 0:
            for j in np.flatnonzero(rng.random(len(k)) < cfg.roundtrip_prob):
                if int(k[j]) in self.roundtrip:
                    goals[j] = self.roundtrip[int(k[j])]
        return goals

    def batch(self, i: np.ndarray, rng: np.random.Generator, cfg: SampleConfig,
              augment: bool = True) -> dict[str, torch.Tensor]:
        """Samples at global frame indices ``i`` (B,), drawn with ``rng`` (pure function of its seed)."""
        i = np.asarray(i, dtype=np.int64)
        steps = i[:, None] + np.arange(cfg.chunk_size)[None, :]  # (B, C)
        pad = steps >= self.episode_end[i][:, None]
        steps = np.minimum(steps, self.episode_end[i][:, None] - 1)
        images = [self.frames[i]]
        out: dict[str, Any] = {"observation.state": torch.from_numpy(self.states[i]),
                               "action": torch.from_numpy(self.actions[steps]),
                               "action_is_pad": torch.from_numpy(pad if cfg.pad == "mask" else np.zeros_like(pad))}
        if cfg.goal:
            k, past = self.goal_indices(i, rng, cfg) if augment else (self.keyframe[i], np.zeros(len(i), bool))
            goals = self.goal_frames(k, rng, cfg) if augment else self.frames[k]
            if augment and self.imagined and cfg.imagined_prob > 0:
                k = self.use_imagined(i, k, goals, (rng.random(len(i)) < cfg.imagined_prob) & ~past)
            images.append(goals)
            out["reached"] = torch.from_numpy(((k - i) <= cfg.reached_margin).astype(np.float32))
            out["action_is_pad"] = out["action_is_pad"] | torch.from_numpy(past[:, None])  # a reached goal: no actions
        shifted = random_shift([torch.from_numpy(x) for x in images], cfg.shift if augment else 0, rng)
        out["observation.image"] = shifted[0]
        if cfg.goal:
            out["observation.goal"] = shifted[1]
        return out


def random_shift(images: list[torch.Tensor], shift: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """(B, H, W, 3) uint8 batches -> (B, 3, H, W) float in [0, 1], all moved by the same per-sample
    random offset in ``[-shift, shift]`` pixels (edge padding, then a crop)."""
    x = torch.cat([im.permute(0, 3, 1, 2).float() / 255.0 for im in images], dim=1)  # (B, 3n, H, W)
    if shift > 0:
        B, _, H, W = x.shape
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        dy, dx = rng.integers(0, 2 * shift + 1, size=B), rng.integers(0, 2 * shift + 1, size=B)
        x = torch.stack([padded[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])
    return list(x.split(3, dim=1))


def dataset_subtask_steps(ds) -> list[int]:
    """Median steps of each subtask index over a dataset's annotated episodes."""
    lengths: dict[int, list[int]] = {}
    for e in range(ds.num_episodes):
        for s in ds.episode(e, decode=False).subtasks:
            lengths.setdefault(s.index, []).append(s.end_frame - s.start_frame + 1)
    return [int(np.median(lengths[k])) for k in sorted(lengths)]
