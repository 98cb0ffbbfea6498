"""Fill a dataset's token cache: every (episode, camera) encoded once by the vision tokenizer.

    python -m emu_world.data.tokenize datasets/aloha_fold [--tokenizer checkpoints/tokenizer]
                                      [--cache-root DIR] [--cameras top] [--resize]

    result = tokenize_dataset("datasets/aloha_fold", load_tokenizer("checkpoints/tokenizer"))
    store = open_token_store("datasets/aloha_fold", tokenizer.identity())   # what training reads

World-model training reads code grids, never pixels: decoding video and running the encoder
for every draw would cost far more than the transformer step on a CPU. This module decodes each
episode once, encodes its frames in batches under ``torch.inference_mode`` with a few torch
threads, and writes ``(T, h, w)`` codes into a :class:`~emu_world.data.token_store.TokenStore`
keyed by ``tokenizer.identity()``; a different tokenizer (other weights or config) therefore
writes to a different directory and never reads stale codes.

Where the cache lives (:func:`token_cache_dir`): ``<dataset_root>/tokens`` by default; with a
cache root, ``<cache_root>/<dataset folder name>-<8 hex digits of the absolute root>`` (so two
datasets with the same folder name never share a cache, and read-only datasets can be cached
elsewhere).

Re-runs are incremental: an entry already present with the episode's length is skipped without
decoding its video. Frames whose size differs from the tokenizer's ``image_size`` are refused
with the fix named, unless ``resize=True`` (``--resize``): then they are resized to the
tokenizer's square size with antialiased bilinear interpolation (non-square frames are
stretched), and the entry's ``source`` attributes record that they were.

The CLI prints one JSON line: dataset, tokenizer_id, cache, episodes, encoded, skipped, frames
(encoded), seconds, frames_per_s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from emu_world.data.robot_dataset import IMAGE_PREFIX, RobotDataset
from emu_world.data.token_store import TokenStore
from emu_world.errors import UserError, reports_user_errors
from emu_world.models.tokenizer import ImageTokenizer, load_tokenizer

CACHE_DIR_NAME = "tokens"  # <dataset_root>/tokens when no cache root is given


@dataclass
class TokenizeResult:
    """What one :func:`tokenize_dataset` call did (the CLI's JSON line)."""

    dataset: str
    tokenizer_id: str
    cache: str  # the TokenStore root (its tokenizer directory is cache/<tokenizer_id>)
    episodes: int  # episodes in the dataset
    encoded: int  # (episode, camera) entries written by this call
    skipped: int  # entries already present with the right length
    frames: int  # frames encoded by this call
    seconds: float  # wall time of the whole call (video decoding included)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3), "frames_per_s": round(self.frames_per_s, 1)}


def token_cache_dir(dataset_root: str | Path, cache_root: str | Path | None = None) -> Path:
    """The token cache of one dataset: ``<root>/tokens`` or ``<cache_root>/<name>-<hash8>``."""
    root = Path(dataset_root)
    if cache_root is None:
        return root / CACHE_DIR_NAME
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return Path(cache_root) / f"{root.resolve().name}-{digest}"


def open_token_store(dataset_root: str | Path, tokenizer_id: str, cache_root: str | Path | None = None,
                     grid: tuple[int, int] | None = None) -> TokenStore:
    """The :class:`TokenStore` holding ``tokenizer_id``'s codes for this dataset (lazily opened);
    ``grid`` (h, w), if given, must match the grid the store records."""
    return TokenStore(token_cache_dir(dataset_root, cache_root), tokenizer_id, grid=grid)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8, antialiased bilinear."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T, size, size, 3)


def _check_image_size(ds: RobotDataset, cameras: Sequence[str], image_size: int, resize: bool) -> None:
    for key in cameras:
        H, W = (int(s) for s in ds.features[key]["shape"][:2])
        if (H, W) != (image_size, image_size) and not resize:
            raise UserError(
                f"{ds.root}: camera {key!r} has {H}x{W} frames but the tokenizer reads "
                f"{image_size}x{image_size}. Use a tokenizer trained at {H}x{W}, record the dataset at "
                f"{image_size}x{image_size} (env.image_size={image_size}), or pass --resize "
                "(resize=True) to resize frames before encoding"
            )


def tokenize_dataset(
    dataset: str | Path | RobotDataset,
    tokenizer: ImageTokenizer,
    cache_root: str | Path | None = None,
    cameras: Sequence[str] | None = None,
    batch_size: int = 64,
    threads: int = 2,
    resize: bool = False,
) -> TokenizeResult:
    """Encode every episode and camera of ``dataset`` into its token cache; skip complete entries.

    ``cameras``: short names or full keys (None: every camera). ``threads``: torch threads while
    encoding (restored afterwards). Raises ``ValueError`` before any decoding when frame sizes
    do not match the tokenizer and ``resize`` is False.
    """
    if batch_size < 1 or threads < 1:
        raise UserError(f"batch_size and threads must be >= 1, got {batch_size} and {threads}")
    start = time.perf_counter()
    ds = dataset if isinstance(dataset, RobotDataset) else RobotDataset(dataset, cameras=cameras)
    keys = [c if c.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + c for c in cameras] if cameras else ds.camera_keys
    _check_image_size(ds, keys, int(tokenizer.image_size), resize)
    tokenizer_id = tokenizer.identity()
    store = open_token_store(ds.root, tokenizer_id, cache_root, grid=tuple(tokenizer.grid))
    lengths = [int(ds.lerobot.meta.episodes[i]["length"]) for i in range(ds.num_episodes)]

    encoded = skipped = frames_done = 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        for index, length in enumerate(lengths):
            todo = [key for key in keys if not store.has(index, key, length)]
            skipped += len(keys) - len(todo)
            if not todo:
                continue
            episode = ds.episode(index, cameras=todo)
            for key in todo:
                frames = episode.frames[key]  # (T, H, W, 3) uint8
                if frames.shape[0] != length:
                    raise UserError(
                        f"{ds.root}: episode {index} camera {key!r} decodes to {frames.shape[0]} frames but the "
                        f"metadata says {length}; the video is damaged, re-record the dataset"
                    )
                resized = tuple(frames.shape[1:3]) != (tokenizer.image_size, tokenizer.image_size)
                if resized:
                    frames = resize_frames(frames, int(tokenizer.image_size))
                with torch.inference_mode():
                    codes = tokenizer.encode(frames, batch_size=batch_size).cpu().numpy()  # (T, h, w)
                store.write(index, key, codes, source={"dataset": str(ds.root.resolve()), "episode_length": length,
                                                       "resized": resized})
                encoded += 1
                frames_done += length
    finally:
        torch.set_num_threads(previous_threads)
    return TokenizeResult(dataset=str(ds.root), tokenizer_id=tokenizer_id, cache=str(store.root),
                          episodes=ds.num_episodes, encoded=encoded, skipped=skipped, frames=frames_done,
                          seconds=time.perf_counter() - start)


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> TokenizeResult:
    parser = argparse.ArgumentParser(prog="python -m emu_world.data.tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_root", help="a LeRobot v3.0 dataset folder (holding meta/info.json)")
    parser.add_argument("--tokenizer", default="checkpoints/tokenizer", help="tokenizer folder (default: %(default)s)")
    parser.add_argument("--cache-root", default=None,
                        help="write codes under DIR/<dataset>-<hash> instead of <dataset_root>/tokens")
    parser.add_argument("--cameras", nargs="+", default=None, help="cameras to encode (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per encoder call (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--resize", action="store_true",
                        help="resize frames to the tokenizer's image size instead of refusing a mismatch")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    result = tokenize_dataset(args.dataset_root, tokenizer, cache_root=args.cache_root, cameras=args.cameras,
                              batch_size=args.batch_size, threads=args.threads, resize=args.resize)
    print(json.dumps(result.summary()))
    return result


if __name__ == "__main__":
    main()
