"""Benchmark ``tokenizer``: ``python -m emu_world.bench tokenizer [hydra overrides]``.

    python -m emu_world.bench tokenizer                       # shipped tokenizer, fresh simulator episodes
    python -m emu_world.bench tokenizer seed=2000 episodes=2 tasks=[aloha_fold]
    python -m emu_world.bench tokenizer checkpoint=outputs/train/tokenizer/tokenizer
    python -m emu_world.bench tokenizer dataset.root=datasets  # held-out episodes of recorded datasets

Held-out PSNR and SSIM per task (frames recorded from the simulator with the scripted experts,
episode ``i`` of a task reset with ``seed + i``; the training datasets are recorded from seed 0 on,
so the default ``seed=1000`` gives unseen episodes), code usage (the fraction of the K codes used
over all measured frames) and perplexity, code stability (the fraction of codes unchanged when every
pixel value moves by -1, 0 or +1 grey level, :func:`nudge`: what a world model reading raw frames and
trained on video-decoded ones sees), where the error lies (PSNR over the *detail* code cells, those
whose pixels vary by ``detail_std`` grey levels or more, and over the flat rest, and the detail
cells' share of the error: :func:`detail_split`), tokens per frame, and encode / decode / round-trip
frames per second at ``threads`` torch threads (``decode_precision=bfloat16``: decoded under bfloat16
autocast, quality and speed, with the float32 decode timed beside it), and seconds per training step
in float32 and in bfloat16 autocast (``train.precision``), timed side by side (:func:`time_training`;
``train.steps=0`` skips it). Writes a picture of originals beside reconstructions per task
(``picture=``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emu_world.bench.common import bench_output_dir
from emu_world.config import CONFIG_DIR, EnvConfig, resolve_path, to_dataclass
from emu_world.data.frames import decode_episode_frames, resolve_roots
from emu_world.image_metrics import (
    code_stability,
    code_usage,
    detail_split,
    nudge,
    psnr_per_frame,
    ssim_per_frame,
)
from emu_world.media import save_picture
from emu_world.models.tokenizer import VisionTokenizer, load_tokenizer


@dataclass
class TaskFrames:
    task: str  # env name (or dataset folder name)
    camera: str
    frames: np.ndarray  # (N, H, W, 3) uint8
    source: str  # "sim seeds 1000..1000" or a dataset path


def record_task_frames(task: str, image_size: int, seed: int, episodes: int, frame_stride: int) -> list[TaskFrames]:
    """Run the task's scripted expert for ``episodes`` episodes (seeds ``seed..``) and keep every
    camera's frames (every ``frame_stride``-th)."""
    import envs
    from emu_world.episodes import run_episode

    env_cfg = to_dataclass(EnvConfig, OmegaConf.load(CONFIG_DIR / "env" / f"{task}.yaml"))
    env_cfg.image_size = image_size
    env = env_cfg.make()
    expert = envs.make_expert(task, env)
    per_cam: dict[str, list[np.ndarray]] = {c: [] for c in env_cfg.cameras}
    try:
        for i in range(episodes):
            counter = {"t": 0}

            def on_step(obs, action, next_obs, reward, terminated, truncated, info, subtask):
                if counter["t"] % frame_stride == 0:
                    for cam in per_cam:
                        per_cam[cam].append(np.asarray(obs["pixels"][cam]))
                counter["t"] += 1

            run_episode(env, expert, seed + i, i, on_step=on_step)
    finally:
        env.close()
    src = f"simulator, scripted expert, seeds {seed}..{seed + episodes - 1}"
    return [TaskFrames(task, cam, np.stack(f), src) for cam, f in per_cam.items()]


def dataset_task_frames(roots: Any, held_out: int, frame_stride: int, image_size: int) -> list[TaskFrames]:
    """The last ``held_out`` episodes of each dataset (the ones training holds out), every camera."""
    from emu_world.data.robot_dataset import RobotDataset

    items = roots if isinstance(roots, (list, tuple)) else [roots]
    out = []
    for root in resolve_roots([Path(str(r)) for r in items]):
        ds = RobotDataset(root, check_videos=False)
        eps = list(range(max(0, ds.num_episodes - held_out), ds.num_episodes))
        name = str(ds.provenance.get("env") or root.name)
        for key in ds.camera_keys:
            frames = np.concatenate(decode_episode_frames(ds, key, eps, frame_stride))
            if frames.shape[1] != image_size:
                raise ValueError(f"{root} {key}: frames are {frames.shape[1]}px, the tokenizer reads {image_size}px")
            out.append(TaskFrames(name, key.removeprefix("observation.images."), frames, f"{root} episodes {eps}"))
    return out


def time_tokenizer(tok, frames: np.ndarray, batch_size: int, precision: str = "float32") -> dict[str, float]:
    """Encode and decode frames/s on ``frames`` (one warm-up batch first), decoding in ``precision``.
    With bfloat16 the float32 decode is timed right after on the same codes (``decode_speedup``)."""
    tok.decode(tok.encode(frames[:batch_size], batch_size), batch_size, precision)
    t0 = time.perf_counter()
    codes = tok.encode(frames, batch_size)
    t1 = time.perf_counter()
    tok.decode(codes, batch_size, precision)
    t2 = time.perf_counter()
    n = len(frames)
    out = {"encode_fps": n / (t1 - t0), "decode_fps": n / (t2 - t1), "frames_per_second": n / (t2 - t0)}
    if precision != "float32":
        tok.decode(codes[:batch_size], batch_size)  # warm-up of the float32 kernels
        t3 = time.perf_counter()
        tok.decode(codes, batch_size)
        out["decode_fps_float32"] = n / (time.perf_counter() - t3)
        out["decode_speedup"] = out["decode_fps"] / out["decode_fps_float32"]
    return out


def time_training(tok, frames: np.ndarray, cfg: DictConfig) -> dict[str, Any]:
    """Seconds per training step of ``tok``'s architecture in each of ``cfg.precisions``, measured side
    by side: one model copy and optimizer per precision, their steps interleaved (after one warm-up
    step each) so that both see the same machine; the batch and the loss terms are the training stage's
    (``configs/train.yaml``'s ``tokenizer_loss`` with ``cfg.loss`` overrides)."""
    import copy

    from emu_world.train.distributed import DistInfo
    from emu_world.train.loop import LoopConfig
    from emu_world.train.tokenizer import TokenizerLossConfig, to_input, train_step

    composed = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "train.yaml").tokenizer_loss, cfg.loss)
    loss_cfg = to_dataclass(TokenizerLossConfig, composed)
    precisions = [str(p) for p in cfg.precisions]
    rng = np.random.default_rng(0)
    runs = {}
    for precision in precisions:
        model = copy.deepcopy(tok)  # loaded in channels_last, as training builds it
        runs[precision] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
                           LoopConfig(precision=precision), [])
    bs, info = int(cfg.batch_size), DistInfo()
    for step in range(int(cfg.steps) + 1):
        x = to_input(torch.from_numpy(frames[rng.choice(len(frames), bs)]), tok.image_size)
        for precision, (model, opt, loop, times) in runs.items():
            t0 = time.perf_counter()
            train_step(model, opt, x, step, loss_cfg, loop, info)
            if step:  # step 0 warms up
                times.append(time.perf_counter() - t0)
    sec = {p: float(np.median(r[3])) for p, r in runs.items()}
    out: dict[str, Any] = {"train_sec_per_step": {p: round(v, 6) for p, v in sec.items()},
                           "train_batch_size": bs, "train_steps_timed": int(cfg.steps)}
    if len(precisions) > 1:
        out["train_speedup"] = round(sec[precisions[0]] / sec[precisions[1]], 3)
    return out


def frames_to_measure(cfg: DictConfig, image_size: int) -> list[TaskFrames]:
    """Held-out episodes of ``dataset.root``, or fresh expert episodes of ``tasks`` from the simulator."""
    if cfg.dataset.root:
        return dataset_task_frames(cfg.dataset.root, int(cfg.dataset.held_out), int(cfg.frame_stride), image_size)
    sets: list[TaskFrames] = []
    for task in cfg.tasks:
        t0 = time.perf_counter()
        sets += record_task_frames(str(task), image_size, int(cfg.seed), int(cfg.episodes), int(cfg.frame_stride))
        print(f"recorded {task}: {sum(len(s.frames) for s in sets if s.task == task)} frames "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return sets


def quality_row(tok, s: TaskFrames, cfg: DictConfig) -> tuple[dict[str, Any], torch.Tensor, np.ndarray]:
    """One (task, camera)'s quality: PSNR, SSIM, code usage, stability and the detail split; its codes
    and reconstructions."""
    bs, precision = int(cfg.batch_size), str(cfg.decode_precision)
    cell = int(tok.image_size) // int(tok.grid[0])  # pixels per code cell (the downsampling factor)
    codes = tok.encode(s.frames, bs)
    recon = tok.decode(codes, bs, precision).numpy()
    use = code_usage(codes, tok.codebook_size)
    nudged = tok.encode(nudge(s.frames, int(cfg.seed)), bs)
    row = {
        "frames": int(len(s.frames)),
        "psnr": round(float(psnr_per_frame(s.frames, recon).mean()), 3),
        "ssim": round(float(torch.cat([ssim_per_frame(s.frames[i:i + 64], recon[i:i + 64])
                                       for i in range(0, len(s.frames), 64)]).mean()), 4),
        "code_usage": round(use["code_usage"], 4),
        "perplexity": round(use["perplexity"], 1),
        "code_stability": round(code_stability(codes, nudged), 4),
        **{k: round(v, 3 if k.endswith("psnr") else 4)
           for k, v in detail_split(s.frames, recon, cell, float(cfg.detail_std)).items()},
        "source": s.source,
    }
    return row, codes, recon


def bench_tokenizer(cfg: DictConfig) -> dict[str, Any]:
    torch.set_num_threads(int(cfg.threads))
    ckpt = resolve_path(cfg.checkpoint)
    tok = load_tokenizer(ckpt, image_size=int(cfg.image_size))
    sets = frames_to_measure(cfg, int(tok.image_size))
    bs, precision = int(cfg.batch_size), str(cfg.decode_precision)
    rows, all_codes, pictures = {}, [], []
    for s in sets:
        rows[f"{s.task}/{s.camera}"], codes, recon = quality_row(tok, s, cfg)
        all_codes.append(codes)
        pick = np.linspace(0, len(s.frames) - 1, int(cfg.picture_frames)).round().astype(int)
        pictures.append((f"{s.task}\n{s.camera}", s.frames[pick], recon[pick]))
    pool = np.concatenate([s.frames for s in sets])
    speed_n = min(len(pool), int(cfg.speed_frames))
    speed_pick = np.random.default_rng(0).choice(len(pool), speed_n, replace=False)
    speed = time_tokenizer(tok, pool[speed_pick], bs, precision)
    ours = isinstance(tok, VisionTokenizer)  # an Emu3 tokenizer is measured, not trained here
    training = time_training(tok, pool, cfg.train) if int(cfg.train.steps) > 0 and ours else {}
    usage = code_usage(torch.cat(all_codes), tok.codebook_size)
    mean = lambda key, digits: round(float(np.mean([r[key] for r in rows.values()])), digits)  # noqa: E731 (over tasks)
    summary = {
        "benchmark": "tokenizer", "checkpoint": str(ckpt), "identity": tok.identity(),
        "psnr": mean("psnr", 3), "ssim": mean("ssim", 4),
        "code_usage": round(usage["code_usage"], 4), "perplexity": round(usage["perplexity"], 1),  # all frames
        "code_stability": mean("code_stability", 4), "detail_psnr": mean("detail_psnr", 3),
        "detail_std": float(cfg.detail_std), "tokens_per_frame": int(tok.grid[0] * tok.grid[1]),
        "codebook_size": int(tok.codebook_size), "image_size": int(tok.image_size),
        **{k: round(v, 1 if k.endswith("fps") or k == "frames_per_second" else 3) for k, v in speed.items()},
        "decode_precision": precision, **training, "speed_frames": speed_n, "batch_size": bs,
        "threads": torch.get_num_threads(), "frames": int(len(pool)),
        "seed": int(cfg.seed) if not cfg.dataset.root else None,
        "episodes": int(cfg.episodes) if not cfg.dataset.root else int(cfg.dataset.held_out),
        "per_task": rows,
    }
    if cfg.picture:
        where = bench_output_dir(cfg) / "tokenizer_recon.png" if cfg.picture is True else Path(str(cfg.picture))
        summary["picture"] = str(save_picture(where, pictures))
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    lines = ["| task/camera | frames | PSNR dB | SSIM | code usage | perplexity | code stability | "
             "detail cells | detail PSNR dB | flat PSNR dB | error in detail |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["per_task"].items():
        lines.append(f"| {name} | {r['frames']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['code_usage']:.3f} | "
                     f"{r['perplexity']:.0f} | {r['code_stability']:.3f} | {r['detail_fraction']:.2f} | "
                     f"{r['detail_psnr']:.2f} | {r['flat_psnr']:.2f} | {r['detail_error_share']:.2f} |")
    lines.append(f"| **all** | {summary['frames']} | {summary['psnr']:.2f} | {summary['ssim']:.4f} | "
                 f"{summary['code_usage']:.3f} | {summary['perplexity']:.0f} | {summary['code_stability']:.3f} | "
                 f"| {summary['detail_psnr']:.2f} | | |")
    lines.append(f"detail cells: code cells whose original pixels vary by >= {summary['detail_std']:g} grey levels "
                 "(standard deviation); the **all** row's PSNRs are means over tasks")
    lines.append(f"tokens/frame {summary['tokens_per_frame']}, K {summary['codebook_size']}; "
                 f"encode {summary['encode_fps']:.0f} frames/s, decode {summary['decode_fps']:.0f} frames/s, "
                 f"encode+decode {summary['frames_per_second']:.0f} frames/s ({summary['threads']} threads, "
                 f"batch {summary['batch_size']}, decoding in {summary['decode_precision']})")
    if "decode_speedup" in summary:
        lines.append(f"float32 decode on the same codes: {summary['decode_fps_float32']:.0f} frames/s "
                     f"({summary['decode_speedup']:.2f}x)")
    if "train_sec_per_step" in summary:
        timed = ", ".join(f"{p} {v:.3f} s" for p, v in summary["train_sec_per_step"].items())
        ratio = f" ({summary['train_speedup']:.2f}x)" if "train_speedup" in summary else ""
        lines.append(f"training step (batch {summary['train_batch_size']}, median of {summary['train_steps_timed']}, "
                     f"side by side): {timed}{ratio}")
    print("\n".join(lines), flush=True)
