"""Frames of local LeRobot datasets: which dataset folders ``dataset.root`` names, their episode
table, and fast sequential decoding of chosen frames (the tokenizer's training data and benchmarks).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emu_world.errors import MissingInputError, UserError


@dataclass
class FrameDataConfig:
    """``dataset:`` section of ``configs/train.yaml``."""

    root: Any = "datasets"  # a dataset folder, a folder of datasets, or a list of them
    cameras: list[str] | None = None  # None: every camera of every dataset
    frames_per_dataset: int = 6000  # training frames taken from each (dataset, camera)
    eval_episodes: int = 2  # the last N episodes of each dataset are held out
    eval_frames: int = 256  # held-out frames per (dataset, camera) used by `evaluate`

    def __post_init__(self) -> None:
        if self.frames_per_dataset < 1 or self.eval_episodes < 1 or self.eval_frames < 1:
            raise UserError("dataset.frames_per_dataset, eval_episodes and eval_frames must be positive")

    @property
    def roots(self) -> list[Path]:
        items = self.root if isinstance(self.root, (list, tuple)) else [self.root]
        if not items:
            raise UserError("dataset.root is empty; give a dataset folder or a folder of datasets")
        return [Path(str(r)) for r in items]


def resolve_roots(roots: list[Path]) -> list[Path]:
    """Expand folders of datasets into dataset folders (those holding ``meta/info.json``)."""
    out: list[Path] = []
    for root in roots:
        if (root / "meta" / "info.json").is_file():
            out.append(root)
            continue
        found = sorted(p.parent.parent for p in root.glob("*/meta/info.json"))
        if not found:
            raise MissingInputError(
                f"dataset.root {root} is neither a LeRobot dataset (no meta/info.json) nor a folder of datasets. "
                "Record one with `python -m emu_world.record env=<task> dataset.root=datasets/<task>`."
            )
        out.extend(found)
    return out


@dataclass
class FrameSet:
    """Frames of one (dataset, camera): training frames and held-out frames, uint8 (N, H, W, 3)."""

    root: str
    camera: str
    env: str
    train: np.ndarray
    held_out: np.ndarray
    train_episodes: int
    held_out_episodes: list[int]
    stride: int

    @property
    def name(self) -> str:
        short = self.camera.removeprefix("observation.images.")
        return f"{self.env or Path(self.root).name}/{short}"

    def describe(self) -> dict[str, Any]:
        return {"root": self.root, "camera": self.camera, "env": self.env, "train_episodes": self.train_episodes,
                "held_out_episodes": self.held_out_episodes, "train_frames": int(len(self.train)),
                "held_out_frames": int(len(self.held_out)), "frame_stride": self.stride}


def episode_table(root: Path) -> list[dict[str, Any]]:
    """Rows of ``meta/episodes/*/*.parquet`` by episode index (read with pandas: no lerobot import)."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(p) for p in sorted(Path(root).glob("meta/episodes/*/*.parquet"))])
    rows = df.sort_values("episode_index").to_dict("records")
    if [int(r["episode_index"]) for r in rows] != list(range(len(rows))):
        raise UserError(f"{root}: meta/episodes does not list episodes 0..{len(rows) - 1}; the dataset is damaged")
    return rows


def decode_episode_frames(ds, key: str, episodes: list[int], stride: int) -> list[np.ndarray]:
    """Frames ``0, stride, 2*stride, ...`` of each episode for camera ``key``: uint8 (T_i, H, W, 3).

    Decodes each video file once, sequentially (thousands of frames/s with PyAV), instead of
    seeking per episode; it reads the same frames as ``RobotDataset.episode``.
    """
    import av

    if ds.features[key]["dtype"] != "video":
        return [ds.episode(e, cameras=[key]).frames[key][::stride] for e in episodes]
    meta = episode_table(ds.root)
    info, fps = ds.info, ds.fps
    wanted: dict[tuple[int, int], dict[int, tuple[int, int]]] = {}  # file -> frame index in file -> (episode, slot)
    lengths: dict[int, int] = {}
    for e in episodes:
        m = meta[e]
        length = int(m["dataset_to_index"]) - int(m["dataset_from_index"])
        first = int(round(float(m[f"videos/{key}/from_timestamp"]) * fps))
        picks = list(range(0, length, stride))
        lengths[e] = len(picks)
        file = (int(m[f"videos/{key}/chunk_index"]), int(m[f"videos/{key}/file_index"]))
        for slot, t in enumerate(picks):
            wanted.setdefault(file, {})[first + t] = (e, slot)
    out: dict[int, list[np.ndarray | None]] = {e: [None] * lengths[e] for e in episodes}
    for (chunk, file_index), picks in wanted.items():
        path = ds.root / info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file_index)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                idx = int(round(float(frame.pts * stream.time_base) * fps))
                if idx in picks:
                    e, slot = picks[idx]
                    out[e][slot] = frame.to_ndarray(format="rgb24")
    result = []
    for e in episodes:
        missing = sum(f is None for f in out[e])
        if missing:
            raise UserError(f"{ds.root}: {missing} frames of episode {e} ({key}) are missing from the video; "
                             "the dataset is damaged: re-record it")
        result.append(np.stack(out[e]))  # (T_e, H, W, 3)
    return result


def load_frame_sets(cfg: FrameDataConfig, image_size: int, log=print) -> list[FrameSet]:
    """Decode training and held-out frames of every (dataset, camera)."""
    from emu_world.data.robot_dataset import RobotDataset

    sets: list[FrameSet] = []
    for root in resolve_roots(cfg.roots):
        ds = RobotDataset(root, cameras=cfg.cameras, check_videos=False)
        n = ds.num_episodes
        if n <= cfg.eval_episodes:
            raise UserError(
                f"{root} has {n} episodes; holding out dataset.eval_episodes={cfg.eval_episodes} leaves none to "
                "train on. Record more episodes or lower dataset.eval_episodes."
            )
        train_eps, held_eps = list(range(n - cfg.eval_episodes)), list(range(n - cfg.eval_episodes, n))
        meta = episode_table(root)
        train_len = sum(int(meta[e]["dataset_to_index"]) - int(meta[e]["dataset_from_index"]) for e in train_eps)
        stride = max(1, math.ceil(train_len / cfg.frames_per_dataset))
        env = str(ds.provenance.get("env", ""))
        for key in ds.camera_keys:
            shape = tuple(ds.features[key]["shape"])
            hw = shape[:2] if shape[-1] == 3 else shape[1:]
            if tuple(hw) != (image_size, image_size):
                raise UserError(
                    f"{root} camera {key} has {hw[0]}x{hw[1]} frames but tokenizer.image_size={image_size}; "
                    f"set tokenizer.image_size={hw[0]} (and a matching stem) or record at {image_size}x{image_size}"
                )
            t0 = time.perf_counter()
            train = np.concatenate(decode_episode_frames(ds, key, train_eps, stride))
            held = np.concatenate(decode_episode_frames(ds, key, held_eps, 1))
            pick = np.linspace(0, len(held) - 1, min(cfg.eval_frames, len(held))).round().astype(int)
            fs = FrameSet(str(root), key, env, train, held[pick], len(train_eps), held_eps, stride)
            log(f"data {fs.name}: {len(train)} training frames (stride {stride}, {len(train_eps)} episodes), "
                f"{len(pick)} held-out frames from episodes {held_eps}, decoded in {time.perf_counter() - t0:.1f}s")
            sets.append(fs)
    return sets
