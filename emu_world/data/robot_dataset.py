"""Reading robot episodes from local LeRobot v3.0 datasets, with validation first.

All training in emu-world reads this one format, the one the field already uses. A dataset
is the folder holding ``meta/info.json`` (``dataset.root``); it is opened offline only: the
folder is validated before lerobot sees it, so lerobot's hub fallback is never attempted.

Features read (any names work; these are what ``emu_world.record`` writes):

- ``observation.images.<camera>``: video (or image) frames, (H, W, 3) uint8,
- ``observation.state``: (S,) float32 proprioception (optional),
- ``action``: (A,) float32,
- ``subtask_index`` (optional, int64 per frame) with ``meta/subtasks.parquet`` mapping
  subtask text to index: lerobot's own subtask convention, so ``LeRobotDataset`` items carry a
  ``subtask`` string too. A subtask's keyframe is the first frame of the next subtask, or the
  episode's last frame for the last one. Datasets without annotations load fine (dynamics only).

:func:`validate_dataset` turns every way a folder can be unusable (missing, not LeRobot, v2.1,
not finalized, missing or undecodable videos, features that do not match the env/model) into a
:class:`DatasetError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

# Never let huggingface_hub reach for the network from here (read at its import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from emu_world.errors import UserError  # noqa: E402

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
SUBTASK_KEY = "subtask_index"
SUBTASKS_PATH = "meta/subtasks.parquet"
SUCCESS_KEY = "next.success"
INFO_PATH = "meta/info.json"
PROVENANCE_PATH = "meta/emu_world.json"  # how emu-world recorded it: env, seeds, successes
CONVERTER = "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30"


class DatasetError(UserError):
    """A dataset folder that cannot be used as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class Subtask:
    """One annotated subtask of an episode, in frame indices (inclusive)."""

    index: int  # into the dataset's subtask vocabulary (meta/subtasks.parquet)
    text: str
    start_frame: int
    end_frame: int
    keyframe: int  # frame that shows the subtask done: first frame of the next one, or the last


@dataclass
class Episode:
    """One whole episode, decoded. T frames; frame t is the observation before action t."""

    index: int
    task: str
    frames: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    actions: np.ndarray  # (T, A) float32
    states: np.ndarray | None  # (T, S) float32, None if the dataset has no state
    subtask_index: np.ndarray | None  # (T,) int64, None if not annotated
    subtasks: list[Subtask] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def _read_info(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / INFO_PATH).read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{root / INFO_PATH} is not valid JSON ({e}); the dataset metadata is corrupt: "
                           "re-record it or restore meta/info.json from a copy") from e


def _check_parquet(path: Path, root: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a missing footer
        raise DatasetError(
            f"{path} cannot be read as parquet ({e}). The recording was most likely not finalized "
            "(LeRobotDataset.finalize() was never called, e.g. the recorder was killed), which leaves "
            f"parquet files without their footer. Re-record it (python -m emu_world.record ... "
            f"dataset.root={root} overwrite=true) or restore the file from a copy."
        ) from e


def _probe_video(path: Path) -> float:
    """Decode the first frame; return the stream duration in seconds."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            next(container.decode(stream))
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return float(container.duration or 0) / 1e6
    except (av.error.FFmpegError, StopIteration, IndexError, OSError) as e:
        raise DatasetError(
            f"video {path} cannot be decoded ({type(e).__name__}: {e}); re-record the dataset or "
            "restore the file (it may be truncated)"
        ) from e


def validate_dataset(
    root: str | Path,
    action_dim: int | None = None,
    state_dim: int | None = None,
    cameras: Sequence[str] | None = None,
    check_videos: bool = True,
) -> dict[str, Any]:
    """Check that ``root`` is a usable, finalized LeRobot v3.0 dataset; return its info.json.

    ``action_dim``, ``state_dim`` and ``cameras`` (short names like ``top`` or full keys) are the
    expectations of the env or model that will consume it.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(
            f"dataset root {root} does not exist. Record one with `python -m emu_world.record "
            f"env=<task> dataset.root={root}`, or point dataset.root at the folder that holds meta/info.json."
        )
    if not (root / INFO_PATH).is_file():
        nested = sorted(p.parent.parent for p in root.glob("*/meta/info.json"))
        hint = f" Did you mean one of {[str(p) for p in nested]}?" if nested else ""
        raise DatasetError(
            f"{root} is not a LeRobot dataset: {root / INFO_PATH} is missing. dataset.root must be the "
            f"dataset folder itself (the one holding meta/ and data/).{hint}"
        )
    info = _read_info(root)
    version = str(info.get("codebase_version", "unknown"))
    if version.startswith("v2"):
        raise DatasetError(
            f"{root} is a LeRobot {version} dataset; emu-world reads v3.0. Convert it with lerobot's "
            f"converter: `{CONVERTER} --repo-id=<any/name> --root={root} --push-to-hub=false`."
        )
    if not version.startswith("v3"):
        raise DatasetError(f"{root}: unsupported LeRobot codebase_version {version!r} (expected v3.0)")

    _check_files(root, info)
    features = info.get("features", {})
    image_keys = _check_features(root, features, action_dim, state_dim, cameras)
    if check_videos:
        video_keys = [k for k in image_keys if features[k]["dtype"] == "video"]
        if video_keys:
            _check_videos(root, info, video_keys)
    return info


def _check_files(root: Path, info: dict[str, Any]) -> None:
    """The data and episode parquet files are there, readable (finalized) and hold the frames info.json counts."""
    data_files = sorted((root / "data").glob("*/*.parquet"))
    episode_files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not data_files:
        raise DatasetError(f"{root} has no data/*/*.parquet: the dataset holds no episodes; re-record it")
    if not episode_files:
        # lerobot buffers episode metadata and writes it in finalize()
        raise DatasetError(
            f"{root} has frames but no meta/episodes/*/*.parquet: the recording was not finalized "
            "(LeRobotDataset.finalize() was never called, e.g. the recorder was killed). Re-record it "
            f"(python -m emu_world.record ... dataset.root={root} overwrite=true)."
        )
    n_rows = sum(_check_parquet(p, root) for p in data_files)
    for p in episode_files:
        _check_parquet(p, root)
    if (root / "meta" / "tasks.parquet").exists():
        _check_parquet(root / "meta" / "tasks.parquet", root)
    if n_rows != info.get("total_frames"):
        raise DatasetError(
            f"{root}: data files hold {n_rows} frames but meta/info.json says {info.get('total_frames')}; "
            "the dataset was modified or only partly written. Re-record it or restore it from a copy."
        )



def _check_features(root: Path, features: dict[str, Any], action_dim: int | None, state_dim: int | None,
                    cameras: Sequence[str] | None) -> list[str]:
    """Cameras, action and state are what the consumer expects; returns the image feature keys."""
    image_keys = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
    if not image_keys:
        raise DatasetError(f"{root} has no image or video feature; emu-world needs at least one camera")
    if cameras:
        for cam in cameras:
            key = cam if cam.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + cam
            if key not in features:
                raise DatasetError(
                    f"{root} has no camera {key!r}; it has {image_keys}. Choose cameras from those "
                    "(e.g. env.cameras=[...] or dataset.cameras=[...])."
                )
    if ACTION_KEY not in features:
        raise DatasetError(f"{root} has no 'action' feature; features are {sorted(features)}")
    if action_dim is not None and tuple(features[ACTION_KEY]["shape"]) != (action_dim,):
        raise DatasetError(
            f"{root}: action has shape {tuple(features[ACTION_KEY]['shape'])} but the env/model expects "
            f"({action_dim},). Use a dataset recorded for this robot, or set the model's action_dim to match."
        )
    if state_dim is not None:
        if STATE_KEY not in features:
            raise DatasetError(f"{root} has no {STATE_KEY!r}; the config expects a ({state_dim},) state")
        if tuple(features[STATE_KEY]["shape"]) != (state_dim,):
            raise DatasetError(
                f"{root}: {STATE_KEY} has shape {tuple(features[STATE_KEY]['shape'])} but the config expects "
                f"({state_dim},)."
            )
    return image_keys


def _check_videos(root: Path, info: dict, video_keys: list[str]) -> None:
    import pandas as pd

    episodes = pd.concat([pd.read_parquet(p) for p in sorted((root / "meta" / "episodes").glob("*/*.parquet"))])
    for key in video_keys:
        files = episodes[[f"videos/{key}/chunk_index", f"videos/{key}/file_index"]].drop_duplicates()
        for chunk, file in files.itertuples(index=False):
            path = root / info["video_path"].format(video_key=key, chunk_index=int(chunk), file_index=int(file))
            if not path.is_file():
                raise DatasetError(
                    f"video file {path} is missing (camera {key!r}). Copy the whole dataset folder "
                    "including videos/, or re-record it."
                )
            duration = _probe_video(path)
            mask = (episodes[f"videos/{key}/chunk_index"] == chunk) & (episodes[f"videos/{key}/file_index"] == file)
            needed = float(episodes.loc[mask, f"videos/{key}/to_timestamp"].max())
            if duration and duration + 1.0 / info["fps"] < needed - 1e-3:
                raise DatasetError(
                    f"video {path} lasts {duration:.2f}s but episodes need {needed:.2f}s: it is truncated; "
                    "re-record the dataset or restore the file"
                )


def load_subtask_vocab(root: Path) -> list[str] | None:
    """Subtask texts by index from ``meta/subtasks.parquet`` (None when absent)."""
    path = Path(root) / SUBTASKS_PATH
    if not path.exists():
        return None
    import pandas as pd

    df = pd.read_parquet(path)
    if "subtask_index" not in df.columns:
        raise DatasetError(f"{path} has no 'subtask_index' column; expected lerobot's subtasks table")
    vocab = [""] * len(df)
    for text, idx in zip(df.index, df["subtask_index"]):
        if not 0 <= int(idx) < len(df):
            raise DatasetError(f"{path}: subtask_index {idx} out of range 0..{len(df) - 1}")
        vocab[int(idx)] = str(text)
    return vocab


def subtasks_from_indices(indices: np.ndarray, vocab: Sequence[str], done_frame: int | None = None) -> list[Subtask]:
    """Contiguous runs of a per-frame subtask index -> :class:`Subtask` records with keyframes.

    A subtask's keyframe is the first frame of the next one. The last subtask's is the frame the task
    was done from (``done_frame``: the first frame whose step succeeded) when the episode goes on after
    success (the expert lets go and retreats), else the episode's last frame: either way the frame where
    the task is done, as the world model and the oracle see it."""
    out: list[Subtask] = []
    n = len(indices)
    last = n - 1 if done_frame is None else int(done_frame)
    start = 0
    for t in range(1, n + 1):
        if t == n or indices[t] != indices[start]:
            idx = int(indices[start])
            out.append(Subtask(idx, vocab[idx], start, t - 1, keyframe=t if t < n else last))
            start = t
    return out


def first_success(table: Any, n: int) -> int | None:
    """The first frame whose step succeeded (``next.success``) when frames follow it (a recording that went on
    after success), else None."""
    if SUCCESS_KEY not in table.column_names:
        return None
    done = np.flatnonzero(np.asarray(table[SUCCESS_KEY], dtype=bool).reshape(-1))
    return int(done[0]) if len(done) and done[0] < n - 1 else None


class RobotDataset:
    """A local LeRobot v3.0 dataset, validated, exposed as whole episodes and training windows.

    ``RobotDataset(root)`` works on any v3.0 dataset with an image feature; camera, state and
    action keys are discovered from its features. ``cameras`` restricts/validates cameras.
    """

    def __init__(
        self,
        root: str | Path,
        cameras: Sequence[str] | None = None,
        action_dim: int | None = None,
        state_dim: int | None = None,
        video_backend: str = "pyav",
        check_videos: bool = True,
    ):
        self.root = Path(root)
        self.info = validate_dataset(self.root, action_dim=action_dim, state_dim=state_dim,
                                     cameras=cameras, check_videos=check_videos)
        self.video_backend = video_backend
        features = self.info["features"]
        all_cams = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
        if cameras:
            self.camera_keys = [c if c.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + c for c in cameras]
        else:
            self.camera_keys = all_cams
        self.state_key = STATE_KEY if STATE_KEY in features else None
        self.subtask_vocab = load_subtask_vocab(self.root) if SUBTASK_KEY in features else None

    # -- metadata ------------------------------------------------------------------------------
    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def num_episodes(self) -> int:
        return int(self.info["total_episodes"])

    @property
    def num_frames(self) -> int:
        return int(self.info["total_frames"])

    @property
    def features(self) -> dict[str, Any]:
        return self.info["features"]

    @property
    def action_dim(self) -> int:
        return int(self.features[ACTION_KEY]["shape"][0])

    @property
    def has_annotations(self) -> bool:
        return self.subtask_vocab is not None

    @cached_property
    def lerobot(self):
        """lerobot's own ``LeRobotDataset`` over the validated folder (frames as float tensors)."""
        return self.windows(None)

    def windows(self, delta_timestamps: dict[str, list[float]] | None):
        """A ``LeRobotDataset`` yielding windows around each frame, e.g.
        ``{"observation.images.top": [-0.1, 0.0], "action": [0.0, 0.02, ...]}`` (seconds);
        out-of-episode positions are padded and flagged by ``<key>_is_pad``."""
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        return LeRobotDataset(f"local/{self.root.name}", root=self.root, delta_timestamps=delta_timestamps,
                              video_backend=self.video_backend)

    @cached_property
    def _episodes_meta(self):
        return self.lerobot.meta.episodes

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """emu-world's recording record (env, seeds, successes), empty for foreign datasets."""
        path = self.root / PROVENANCE_PATH
        return json.loads(path.read_text()) if path.exists() else {}

    # -- episodes ------------------------------------------------------------------------------
    def episode(self, index: int, cameras: Sequence[str] | None = None, decode: bool = True) -> Episode:
        """Episode ``index`` in full: decoded frames (uint8), actions, states, annotations."""
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range: {self.root} has {self.num_episodes} episodes")
        ds = self.lerobot
        meta = self._episodes_meta[index]
        lo, hi = int(meta["dataset_from_index"]), int(meta["dataset_to_index"])
        table = ds.hf_dataset.with_format(None).select(range(lo, hi))
        n = hi - lo
        # lerobot stores (1,)-shaped features as scalars: always return (T, A) / (T, S)
        actions = np.asarray(table[ACTION_KEY], dtype=np.float32).reshape(n, -1)
        states = np.asarray(table[self.state_key], dtype=np.float32).reshape(n, -1) if self.state_key else None
        sub_idx = None
        subtasks: list[Subtask] = []
        if self.subtask_vocab is not None:
            sub_idx = np.asarray(table[SUBTASK_KEY], dtype=np.int64).reshape(-1)
            subtasks = subtasks_from_indices(sub_idx, self.subtask_vocab, first_success(table, n))
        task_index = int(np.asarray(table["task_index"])[0])
        task = str(ds.meta.tasks.index[task_index])
        frames: dict[str, np.ndarray] = {}
        if decode:
            for key in cameras or self.camera_keys:
                key = key if key.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + key
                frames[key] = self._decode(key, meta, hi - lo)
        return Episode(index, task, frames, actions, states, sub_idx, subtasks)

    def _decode(self, key: str, meta: dict, length: int) -> np.ndarray:
        """All frames of one episode for one camera: (T, H, W, 3) uint8."""
        if self.features[key]["dtype"] == "image":
            ds = self.lerobot
            lo = int(meta["dataset_from_index"])
            imgs = [np.asarray(ds.hf_dataset.with_format(None)[lo + t][key]) for t in range(length)]
            return np.stack(imgs).astype(np.uint8)
        from lerobot.datasets.video_utils import decode_video_frames

        path = self.root / self.info["video_path"].format(
            video_key=key, chunk_index=int(meta[f"videos/{key}/chunk_index"]),
            file_index=int(meta[f"videos/{key}/file_index"]),
        )
        start = float(meta[f"videos/{key}/from_timestamp"])
        timestamps = [start + t / self.fps for t in range(length)]
        frames = decode_video_frames(path, timestamps, tolerance_s=1e-4, backend=self.video_backend)
        # (T, 3, H, W) float in [0, 1] -> (T, H, W, 3) uint8
        return (frames.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
