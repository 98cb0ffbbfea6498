"""What the rollout benchmarks share (``world_model``, ``dida``, ``explore``): opening an export from a
benchmark config, scoring imagined rollouts against the simulator, timing interactive imagination
(:func:`imagine_timed`: encode, model, decode, as a player sees it), and where a benchmark writes its files.

Scoring (:func:`score_rollouts`): from ``starts`` start frames ``j`` per recorded episode, the
world-model environment (:mod:`emu_world.rollouts`) imagines frames ``j+1 .. j+max(horizons)`` from
the true context and the true actions (or commands), each step reading its own earlier predictions.
At each horizon ``h``: PSNR / SSIM of the decoded prediction against the simulator's frame, token
accuracy against the tokenizer's codes of the true frame (split into the codes that stayed since
frame ``j`` and those that changed), the same for copying frame ``j`` (``copy_last``), the tokenizer
ceiling, and the mean per-rollout PSNR gain over copy-last with its 95% interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from emu_world.config import resolve_path
from emu_world.errors import UserError
from emu_world.image_metrics import psnr_per_frame, ssim_per_frame
from emu_world.models.dida import FramePredictor
from emu_world.models.generate import Generator, Sampling
from emu_world.models.layout import Sample
from emu_world.models.tokenizer import load_tokenizer
from emu_world.rollouts import (
    EncodedEpisode,
    LoadedExport,
    Rollout,
    TaskSpec,
    WorldModelEnv,
    build_sample,
    load_export,
    rollout,
    start_frames,
)


def bench_output_dir(cfg: DictConfig) -> Path:
    """Where a benchmark writes its files: the folder of ``output=`` when given, else the hydra run dir."""
    if cfg.get("output"):
        return Path(str(cfg.output)).parent
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main
        raise UserError("this benchmark writes pictures: run it through `python -m emu_world.bench` or give "
                         "output=<file.json> (pictures go beside it)") from None


def frame_scores(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PSNR and SSIM of uint8 batches."""
    return psnr_per_frame(a, b).numpy(), ssim_per_frame(a, b).numpy()


def training_samples(ex: LoadedExport, spec: TaskSpec, encoded: list[EncodedEpisode]) -> list[Sample]:
    """The episodes cut into training samples of ``data.frames_per_window`` frames (throughput)."""
    per = int(ex.manifest["config"]["data"]["frames_per_window"])
    samples = []
    for e in encoded:
        for a in range(0, len(e.codes) - 1, per - 1):
            b = min(a + per, len(e.codes))
            samples.append(build_sample(ex.layout, spec, e.episode.text, e.codes[a:b], e.conds[a:b - 1], end=True))
    return samples


def score_rollouts(predict: FramePredictor | Generator, tokenizer, ex: LoadedExport, spec: TaskSpec,
                   encoded: list[EncodedEpisode], cfg: DictConfig) -> tuple[dict[str, Any], list[Rollout]]:
    """Per-horizon metrics of one task's rollouts (``cfg``: horizons, context_frames, starts, seed),
    and the rollouts themselves (for pictures)."""
    horizons = sorted({int(h) for h in cfg.horizons})
    H, C = max(horizons), int(cfg.context_frames)
    acc = {h: {k: [] for k in ("psnr", "ssim", "token_acc", "copy_psnr", "copy_ssim", "copy_token_acc",
                               "ceiling_psnr", "static_token_acc", "changed_token_acc")}
           for h in horizons}
    forced = {k: [] for k in ("token_acc", "static_token_acc", "changed_token_acc")}
    seconds, generated, rollouts = 0.0, 0, []
    for i, e in enumerate(encoded):
        ep = e.episode
        for j in start_frames(len(ep.frames), C, H, int(cfg.starts)):
            pred, sec = rollout(predict, ex.layout, spec, ep, e.codes, e.conds, j, C, H, int(cfg.seed) + j)
            seconds, generated = seconds + sec, generated + H
            pred_frames = tokenizer.decode(pred).numpy()  # (H, H, W, 3)
            rollouts.append(Rollout(i, j, pred, pred_frames))
            for h in horizons:
                true = ep.frames[j + h][None]
                p, s = frame_scores(pred_frames[h - 1][None], true)
                cp, cs = frame_scores(ep.frames[j][None], true)
                acc[h]["psnr"].append(p[0])
                acc[h]["ssim"].append(s[0])
                acc[h]["copy_psnr"].append(cp[0])
                acc[h]["copy_ssim"].append(cs[0])
                acc[h]["copy_token_acc"].append(float((e.codes[j] == e.codes[j + h]).mean()))  # codes that stayed
                acc[h]["ceiling_psnr"].append(frame_scores(e.recon[j + h][None], true)[0][0])
                split_accuracy(acc[h], pred[h - 1], e.codes[j + h], e.codes[j])
            split_accuracy(forced, teacher_forced_codes(ex, spec, e, j, C), e.codes[j + 1], e.codes[j])
    if not generated:
        raise UserError(f"{spec.task}: no episode is long enough for {C} context frame(s) and {H} frames ahead "
                         f"(every {spec.stride} env steps); lower horizons or context_frames")

    def means(values: dict[str, list[float]]) -> dict[str, float | None]:
        return {k: round(float(np.mean(v)), 4) if v else None for k, v in values.items()}

    rows = {}
    for h in horizons:
        rows[str(h)] = means(acc[h])
        rows[str(h)].update(gain_over_copy(acc[h]["psnr"], acc[h]["copy_psnr"]))
    return {"rollouts": len(acc[H]["psnr"]), "frames": int(sum(len(e.episode.frames) for e in encoded)),
            "stride": spec.stride, "camera": spec.camera, "sec_per_frame": round(seconds / generated, 4),
            "horizons": rows, "teacher_forced_1": means(forced)}, rollouts


def gain_over_copy(psnr: list[float], copy_psnr: list[float]) -> dict[str, float | None]:
    """Mean PSNR gain over copy-last across rollouts and the half-width of its 95% interval
    (normal approximation, 1.96 standard errors of the per-rollout gains; rollouts of one episode
    share its scene, so the interval is optimistic when there are few episodes). None when under 2."""
    d = np.asarray(psnr, dtype=np.float64) - np.asarray(copy_psnr, dtype=np.float64)
    if len(d) < 2:
        return {"gain": round(float(d.mean()), 4) if len(d) else None, "gain_ci95": None}
    return {"gain": round(float(d.mean()), 4), "gain_ci95": round(float(1.96 * d.std(ddof=1) / np.sqrt(len(d))), 4)}


def split_accuracy(acc: dict[str, list[float]], pred: np.ndarray, true: np.ndarray, last: np.ndarray) -> None:
    """Append the token accuracy of ``pred`` (h, w) against ``true``, overall and split into the codes
    that stayed the same since the last observed frame ``last`` and those that changed (a split with
    no code in this frame adds nothing)."""
    hit, static = pred == true, last == true
    acc["token_acc"].append(float(hit.mean()))
    if static.any():
        acc["static_token_acc"].append(float(hit[static].mean()))
    if (~static).any():
        acc["changed_token_acc"].append(float(hit[~static].mean()))


@torch.no_grad()
def teacher_forced_codes(ex: LoadedExport, spec: TaskSpec, e: EncodedEpisode, j: int, context: int) -> np.ndarray:
    """(h, w) the model's argmax codes of frame j+1 read with the true codes of frame j+1 before each
    position (one forward pass, as in training): what it knows when its own errors do not feed it."""
    sample = build_sample(ex.layout, spec, e.episode.text, e.codes[j - context + 1:j + 2],
                          e.conds[j - context + 1:j + 1], end=False)
    a, b = sample.image_spans[-1]  # the codes of frame j+1, EOLs included
    logits = ex.model.logits(torch.as_tensor(sample.tokens)[None])[0]  # (N, V)
    vision = ex.layout.vision
    positions = np.arange(a, b)[(sample.tokens[a:b] >= vision.start) & (sample.tokens[a:b] < vision.stop)]
    best = logits[torch.as_tensor(positions) - 1, vision.start:vision.stop].argmax(-1)  # position p from p - 1
    return best.numpy().reshape(e.codes.shape[1:])


def rollout_strip(encoded: list[EncodedEpisode], r: Rollout) -> list[tuple[str, list[np.ndarray]]]:
    """Picture rows of one rollout: the context frame then the predicted frames; the context frame
    then the true frames."""
    ep = encoded[r.episode].episode
    H = len(r.codes)
    context = ep.frames[r.start]
    return [("predicted", [context, *r.frames]), ("true", [context, *ep.frames[r.start + 1:r.start + 1 + H]])]


@dataclass
class BenchSetup:
    """What every rollout benchmark (world_model, dida) opens from its config."""

    checkpoint: Path
    tokenizer: Any
    export: LoadedExport
    tasks: list[str]  # the tasks to measure, the headline first
    horizons: list[int]  # sorted
    vision: Sampling


def open_bench(cfg: DictConfig) -> BenchSetup:
    """Threads, the export and its tokenizer (code identity checked), the tasks, horizons and vision sampling
    of a rollout benchmark's config, with clear errors."""
    torch.set_num_threads(int(cfg.threads))
    checkpoint = resolve_path(cfg.checkpoint)
    tokenizer = load_tokenizer(resolve_path(cfg.tokenizer))
    ex = load_export(checkpoint, tokenizer)
    names = [str(t) for t in cfg.tasks] if cfg.tasks else list(ex.tasks)
    missing = [t for t in names if t not in ex.tasks]
    if missing or not names:
        raise UserError(f"the world model {checkpoint} was not trained on {missing or 'any simulator task'}; "
                         f"its simulator tasks: {sorted(ex.tasks)}; pass tasks=[...]")
    horizons = sorted({int(h) for h in cfg.horizons})
    if horizons[0] < 1 or int(cfg.context_frames) < 1 or int(cfg.starts) < 1:
        raise UserError("horizons, context_frames and starts must be >= 1")
    return BenchSetup(checkpoint, tokenizer, ex, names, horizons,
                      Sampling(float(cfg.vision.temperature), int(cfg.vision.top_k)))


@dataclass
class TimedImagination:
    """Frames imagined step by step as a player gets them, and where the time went."""

    frames: np.ndarray  # (H, H_img, W_img, 3) uint8 decoded imagined frames
    encode_seconds: float  # the tokenizer encoding the true context frames (once, at reset)
    model_seconds: float  # the frame predictor (prompt prefill and decoding)
    other_seconds: float  # per step: the tokenizer decode and building the prompt

    @property
    def seconds(self) -> float:
        return self.encode_seconds + self.model_seconds + self.other_seconds


def imagine_timed(world: WorldModelEnv, frames: np.ndarray, context_conds: list[Any], conds: list[Any],
                  seed: int) -> TimedImagination:
    """Reset ``world`` (which holds a tokenizer) from the true ``frames`` (n, H, W, 3) with the
    ``context_conds`` between them, then imagine one frame per condition of ``conds`` (step ``i`` seeded
    ``seed + i``, as :func:`~emu_world.rollouts.rollout`), each decoded to pixels: the interactive loop of
    ``python -m emu_world.explore``, timed by part."""
    t0 = time.perf_counter()
    world.reset(frames=frames, conds=context_conds)
    encode = time.perf_counter() - t0
    out, model, wall = [], 0.0, 0.0
    for i, cond in enumerate(conds):
        t0 = time.perf_counter()
        step = world.step(cond, seed=seed + i)
        wall += time.perf_counter() - t0
        model += step.seconds
        out.append(step.frame)
    return TimedImagination(np.stack(out), encode, model, wall - model)
