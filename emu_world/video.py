"""Writing episode videos (H.264 mp4 through PyAV, whose wheel bundles FFmpeg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import av
import numpy as np


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: float, crf: int = 18) -> Path:
    """Encode (H, W, 3) uint8 frames to ``path``; odd sizes are padded to even for yuv420p."""
    if len(frames) == 0:
        raise ValueError(f"no frames to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, int(round(fps))))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
                raise ValueError(f"frame has shape {frame.shape} {frame.dtype}; expected {(h, w, 3)} uint8")
            if (H, W) != (h, w):
                frame = np.pad(frame, ((0, H - h), (0, W - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)  # atomic: a crash never leaves a truncated file under the final name
    return path
