"""Writing what the project shows: episode videos (H.264 mp4 through PyAV, whose wheel bundles FFmpeg)
and labelled pictures of frames (PIL)."""

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


def save_picture(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> Path:
    """One row per task: originals (left of each pair) beside their reconstructions (right)."""
    from PIL import Image, ImageDraw

    n = max(len(o) for _, o, _ in rows)
    H, W = rows[0][1].shape[1:3]
    label_w, gap = 150, 6
    canvas = Image.new("RGB", (label_w + n * (2 * W + gap), len(rows) * (H + gap) + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for j in range(n):
        draw.text((label_w + j * (2 * W + gap) + 4, 4), "original | reconstruction", fill="black")
    for i, (name, orig, rec) in enumerate(rows):
        y = 20 + i * (H + gap)
        draw.text((4, y + H // 2 - 6), name, fill="black")
        for j in range(len(orig)):
            x = label_w + j * (2 * W + gap)
            canvas.paste(Image.fromarray(orig[j]), (x, y))
            canvas.paste(Image.fromarray(rec[j]), (x + W, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_grid(path: Path, rows: list[tuple[str, list[np.ndarray]]], columns: list[str] | None = None) -> Path:
    """A labelled grid of uint8 frames: one row per ``(label, frames)`` (rows may differ in length),
    an optional title over each column."""
    from PIL import Image, ImageDraw

    if not rows or not any(len(f) for _, f in rows):
        raise ValueError("save_grid: no frames to draw")
    H, W = next(f for _, f in rows if len(f))[0].shape[:2]
    n = max(len(f) for _, f in rows)
    label_w, gap, top = 150, 4, 20
    canvas = Image.new("RGB", (label_w + n * (W + gap), top + len(rows) * (H + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(columns or []):
        draw.text((label_w + j * (W + gap) + 2, 4), str(title), fill="black")
    for i, (label, frames) in enumerate(rows):
        y = top + i * (H + gap)
        draw.text((4, y + H // 2 - 6), label, fill="black")
        for j, frame in enumerate(frames):
            canvas.paste(Image.fromarray(np.asarray(frame, dtype=np.uint8)), (label_w + j * (W + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
