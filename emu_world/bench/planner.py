"""Benchmark ``planner``: the planner along fresh expert trajectories, AR and DiDA keyframes.

    python -m emu_world.bench planner                                  # checkpoints/world_model, aloha_fold
    python -m emu_world.bench planner checkpoint=checkpoints/world_model_aloha_fold decodings=[ar]
    python -m emu_world.bench planner tasks=[aloha_fold,aloha_transfer_cube] episodes=4 frame_stride=5

What is measured. The scripted expert plays ``episodes`` episodes per task (episode ``i`` resets with
``seed + i``; the training data starts at seed 0, so the default ``seed=1000`` is unseen), recording
every frame and its subtask. Every ``frame_stride`` steps along the trajectory:

- text: the subtask the model names from that one frame (``text_accuracy_single``), and the subtask
  the planner pursues when it is fed the trajectory's frames in order and keeps its memory
  (``text_accuracy``: the index moves on when its own reached test, ``reached_codes`` of the frame's
  codes equal to the pursued keyframe's, fires; :mod:`emu_world.planner`);
- keyframe: for each decoder in ``decodings`` (``dida``: K parallel passes, ``ar``: token by token),
  the keyframe imagined for the TRUE subtask from that frame, against the true keyframe (the expert's
  frame at the subtask's end): PSNR / SSIM, beside copying the current frame (``copy_psnr``) and the
  tokenizer's reconstruction of the true keyframe (``ceiling_psnr``), and seconds per keyframe; plus
  seconds per text.

Ends with one JSON line: ``text_accuracy``, ``text_accuracy_single``, ``keyframe_psnr_<decoder>``,
``copy_psnr``, ``ceiling_psnr``, ``psnr_gain_<decoder>`` (over copying), ``sec_per_plan_<decoder>``
(text + keyframe), per task in ``per_task``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from emu_world.agents import expert_run, subtask_keyframes
from emu_world.config import CONFIG_DIR, EnvConfig, to_dataclass
from emu_world.errors import UserError
from emu_world.image_metrics import psnr_per_frame, ssim_per_frame
from emu_world.planner import Planner, PlannerConfig, nearest_subtask


def planners(cfg: DictConfig, task: str) -> dict[str, Planner]:
    """One planner per decoder, on the same export."""
    out = {}
    for decoding in cfg.decodings:
        name, _, k = str(decoding).partition(":")  # dida:<K> sweeps the passes
        settings = {"steps": int(k)} if k else ({"steps": cfg.steps} if cfg.get("steps") is not None else {})
        out[str(decoding)] = Planner(PlannerConfig(checkpoint=str(cfg.checkpoint), tokenizer=cfg.get("tokenizer"),
                                                   decoding=name, reached_codes=cfg.reached_codes,
                                                   start=str(cfg.start), **settings), task)
    return out


def trajectory(task: str, image_size: int, camera: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from omegaconf import OmegaConf

    env_cfg = to_dataclass(EnvConfig, OmegaConf.load(CONFIG_DIR / "env" / f"{task}.yaml"))
    env_cfg.image_size = image_size
    env = env_cfg.make()
    try:
        return expert_run(env, task, seed, camera)
    finally:
        env.close()


def score_episode(plans: dict[str, Planner], frames: np.ndarray, labels: np.ndarray, stride: int,
                  rows: dict[str, list[float]]) -> None:
    """Append one episode's per-frame scores to ``rows``."""
    first = next(iter(plans.values()))
    tok, subtasks = first.tokenizer, first.subtasks
    keyframes = subtask_keyframes(labels)
    true_codes = tok.encode(frames[keyframes]).numpy()
    ceiling = tok.decode(true_codes).numpy()  # (n, H, W, 3)
    memory = next((p for name, p in plans.items() if name.startswith("dida")), first)
    memory.reset()
    for t in range(0, len(frames), stride):
        k = int(labels[t])
        truth = frames[keyframes[k]][None]
        t0 = time.perf_counter()
        codes = tok.encode(frames[t][None]).numpy()[0]
        said = first.say(codes)
        rows["sec_text"].append(time.perf_counter() - t0)
        rows["text_single"].append(float(nearest_subtask(said, subtasks) == k))
        rows["text"].append(float(memory.plan(frames[t]).subtask_index == k))
        rows["copy_psnr"].append(float(psnr_per_frame(frames[t][None], truth)[0]))
        rows["ceiling_psnr"].append(float(psnr_per_frame(ceiling[k][None], truth)[0]))
        for name, p in plans.items():
            t1 = time.perf_counter()
            imagined = tok.decode(p.imagine(codes, subtasks[k], seed=t)[None]).numpy()
            rows[f"sec_keyframe_{name}"].append(time.perf_counter() - t1)
            rows[f"psnr_{name}"].append(float(psnr_per_frame(imagined, truth)[0]))
            rows[f"ssim_{name}"].append(float(ssim_per_frame(imagined, truth)[0]))


def summarize(rows: dict[str, list[float]], decodings: list[str]) -> dict[str, Any]:
    mean = {k: round(float(np.mean(v)), 4) for k, v in rows.items() if v}
    out = {"text_accuracy": mean["text"], "text_accuracy_single": mean["text_single"],
           "copy_psnr": mean["copy_psnr"], "ceiling_psnr": mean["ceiling_psnr"], "frames": len(rows["text"]),
           "sec_per_text": mean["sec_text"]}
    for d in decodings:
        out.update({f"keyframe_psnr_{d}": mean[f"psnr_{d}"], f"keyframe_ssim_{d}": mean[f"ssim_{d}"],
                    f"psnr_gain_{d}": round(mean[f"psnr_{d}"] - mean["copy_psnr"], 4),
                    f"sec_per_keyframe_{d}": mean[f"sec_keyframe_{d}"],
                    f"sec_per_plan_{d}": round(mean[f"sec_keyframe_{d}"] + mean["sec_text"], 4)})
    return out


def bench_planner(cfg: DictConfig) -> dict[str, Any]:
    torch.set_num_threads(int(cfg.threads))
    if int(cfg.frame_stride) < 1 or int(cfg.episodes) < 1:
        raise UserError("frame_stride and episodes must be >= 1")
    decodings = [str(d) for d in cfg.decodings]
    per_task = {}
    for task in cfg.tasks:
        plans = planners(cfg, str(task))
        spec = next(iter(plans.values())).ex.tasks[str(task)]
        rows: dict[str, list[float]] = {}
        for key in ["text", "text_single", "copy_psnr", "ceiling_psnr", "sec_text",
                    *[f"{m}_{d}" for d in decodings for m in ("psnr", "ssim", "sec_keyframe")]]:
            rows[key] = []
        for i in range(int(cfg.episodes)):
            t0 = time.perf_counter()
            frames, labels = trajectory(str(task), int(next(iter(plans.values())).tokenizer.image_size), spec.camera,
                                        int(cfg.seed) + i)
            score_episode(plans, frames, labels, int(cfg.frame_stride), rows)
            print(f"{task} episode {i}: {len(frames)} steps scored in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
        per_task[str(task)] = summarize(rows, decodings)
    head = per_task[str(cfg.tasks[0])]
    summary = {"benchmark": "planner", "checkpoint": str(cfg.checkpoint), "headline_task": str(cfg.tasks[0]),
               **head, "decodings": decodings, "reached_codes": cfg.reached_codes, "seed": int(cfg.seed),
               "episodes": int(cfg.episodes), "frame_stride": int(cfg.frame_stride),
               "threads": torch.get_num_threads(), "per_task": per_task}
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    lines = ["| task | text right (memory) | text right (one frame) | decoder | keyframe PSNR | SSIM | copy-current "
             "PSNR | ceiling | s/plan |", "|---|---|---|---|---|---|---|---|---|"]
    for task, r in summary["per_task"].items():
        for d in summary["decodings"]:
            lines.append(f"| {task} | {r['text_accuracy']:.3f} | {r['text_accuracy_single']:.3f} | {d} | "
                         f"{r[f'keyframe_psnr_{d}']:.2f} | {r[f'keyframe_ssim_{d}']:.4f} | {r['copy_psnr']:.2f} | "
                         f"{r['ceiling_psnr']:.2f} | {r[f'sec_per_plan_{d}']:.3f} |")
    print("\n".join(lines), flush=True)
