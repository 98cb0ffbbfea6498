"""Benchmark ``world_model``: action-conditioned frame prediction on fresh simulator episodes.

    python -m emu_world.bench world_model                                # checkpoints/world_model
    python -m emu_world.bench world_model checkpoint=outputs/train/world_model/world_model
    python -m emu_world.bench world_model tasks=[aloha_fold] episodes=2 starts=4 horizons=[1,4,16]
    python -m emu_world.bench world_model vision.temperature=1.0 vision.top_k=64   # sampled, not greedy
    python -m emu_world.bench world_model decoding=dida dida.steps=4 picture=true  # parallel decoding; strip.png

What is measured. For every task (an env whose dataset the model was trained on; default: all of
them) the scripted expert plays ``episodes`` episodes (episode ``i`` resets with ``seed + i``; the
datasets start at seed 0, so the default ``seed=1000`` gives unseen episodes) at the task's
frame rate; frames are kept every ``frame_stride`` env steps of the task's embodiment (the
export's ``data.frame_stride``: aloha 10, widowx 1, explore 1) from the camera the model was
trained on (the first of the dataset's cameras). From ``starts`` start frames ``j`` per episode,
the prompt is ``"<tag>: <task>"``, the last ``context_frames`` true frames (tokenizer codes) and
the action span after each of them (the true actions, binned with the dataset's binner from the
export, chosen as in training: the last action of each of the ``actions_per_frame`` sub-intervals)
or, for exploration, the command text of the interval. The model generates frame ``j+1`` with the
decoder ``decoding`` names (:func:`emu_world.models.dida.frame_predictor`: ``ar``, token by token with
:class:`~emu_world.models.generate.Generator`, or ``dida``, ``dida.steps`` parallel refinement passes;
grammar-forced structure, greedy by default); the
rollout then continues on its own predicted frames with the true actions: at every step the
prompt holds the last ``context_frames`` frames (true ones while the window still reaches them,
predicted ones after), up to ``max(horizons)`` frames ahead.

Metrics at each horizon ``h``: PSNR / SSIM of the decoded prediction of frame ``j+h`` against the
simulator's frame, and token accuracy (the fraction of its codes equal to the tokenizer's codes of
the true frame), also split into the codes that stayed the same since frame ``j`` (``static``) and
those that changed (``changed``). Diagnostic of the 1-step prediction (``teacher_forced_1``): the
same split of the model's argmax codes of frame ``j+1`` when every position reads the true codes
before it (one forward pass, as in training); the gap to the generated frame's accuracy is what
the model's own errors cost once they feed the rest of the frame. Two references on the same
frames: ``copy_last`` (the true frame ``j``, the last one observed, raw pixels, against frame
``j+h``) and the ``ceiling`` (the tokenizer's own reconstruction of frame ``j+h``: what a perfect
code prediction would score). Plus seconds per
generated frame, and training throughput: ``throughput.steps`` forward+backward+AdamW steps (after
one warm-up) of a copy of the model on ``data.rows`` packed rows of ``data.max_len`` tokens built
from the recorded episodes exactly like training samples; tokens/s counts non-padding tokens. Peak
RSS is the process's (``resource.getrusage``, recording and rollouts included); ``train_state_mb``
is weights + gradients + AdamW moments. ``picture=true`` writes ``strip.png`` into the output dir: per
task, the first rollout's context frame and predicted frames above the same context frame and the true
frames. :mod:`emu_world.bench.dida` reuses the recording, rollouts and metrics to compare decoders.

JSON keys. The headline keys (``psnr_<h>``, ``ssim_<h>``, ``token_acc_<h>``, ``copy_last_psnr_<h>``,
``copy_last_ssim_<h>``, ``copy_last_token_acc_<h>`` (the codes that did not change: what copying
scores on ``token_acc``), ``static_token_acc_<h>``, ``changed_token_acc_<h>``,
``teacher_forced_{token,static_token,changed_token}_acc_1``, ``ceiling_psnr``, ``psnr_gain_<h>``: the mean
per-rollout PSNR gain over copy-last, and ``psnr_gain_ci95_<h>``: the half-width of its 95% interval) are those of
``headline_task`` (aloha_fold by default, the issue's target: 1-step PSNR >= copy-last + 3 dB, still above copy-last at 16 steps), or of the first
measured task when it is not measured (``headline_task`` in the JSON says which). ``mean_psnr_<h>``
and ``mean_copy_last_psnr_<h>`` average over tasks; ``per_task`` holds every task's table.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from emu_world.bench.common import (
    BenchSetup,
    bench_output_dir,
    open_bench,
    rollout_strip,
    score_rollouts,
    training_samples,
)
from emu_world.media import save_grid
from emu_world.models.dida import FramePredictor
from emu_world.models.generate import Generator
from emu_world.models.layout import Sample, SequenceLayout
from emu_world.models.weights import autocast
from emu_world.models.world_model import WorldModel, document_mask
from emu_world.rollouts import (
    Episode,
    LoadedExport,
    TaskSpec,
    encode_episodes,
    record_episodes,
)


def measure_task(predict: FramePredictor | Generator, tokenizer, ex: LoadedExport, spec: TaskSpec, episodes: list[Episode],
                 cfg: DictConfig) -> tuple[dict[str, Any], list[Sample]]:
    """Per-horizon metrics of one task, and its episodes as training samples (for the throughput)."""
    encoded = encode_episodes(tokenizer, ex.layout, spec, episodes)
    result, _ = score_rollouts(predict, tokenizer, ex, spec, encoded, cfg)
    return result, training_samples(ex, spec, encoded)


# ----------------------------------------------------------------------------- training throughput


def training_throughput(model: WorldModel, layout: SequenceLayout, samples: list[Sample], max_len: int,
                        rows: int, steps: int, precision: str = "float32",
                        block_mask: bool = False) -> dict[str, float]:
    """Tokens/s of forward+backward+AdamW on a copy of ``model`` over ``rows`` packed rows of ``max_len``
    (one untimed warm-up step first), forward passes in ``precision`` (float32 | bfloat16 autocast, as
    ``train.precision``). ``block_mask``: the same steps also through the 4-D block-diagonal causal
    mask instead of one attention call per document (the sdpa path before packed attention),
    alternating step by step with the packed ones; ``packed_attention_speedup`` is their ratio."""
    packed = layout.pack(samples, max_len)
    while packed.tokens.shape[0] < rows:  # too few samples to fill the rows: repeat them
        samples = samples + samples
        packed = layout.pack(samples, max_len)
    inputs = {k: torch.as_tensor(getattr(packed, k)[:rows])
              for k in ("tokens", "weights", "roles", "doc_ids", "position_ids")}
    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(precision):
            loss, _ = train_model(**batch)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    kinds = {"packed": inputs}
    if block_mask:  # the same rows, documents kept apart by the L x L mask instead
        kinds["block_mask"] = {**{k: v for k, v in inputs.items() if k != "doc_ids"},
                               "attention_mask": document_mask(inputs["doc_ids"]),
                               "hints": train_model.hints_for(inputs["tokens"], inputs["doc_ids"])}
    seconds = dict.fromkeys(kinds, 0.0)
    for batch in kinds.values():
        step(batch)  # warm-up
    for _ in range(steps):
        for kind, batch in kinds.items():
            seconds[kind] += step(batch)
    tokens = int((packed.doc_ids[:rows] >= 0).sum())
    state_bytes = sum(p.numel() * p.element_size() for p in train_model.parameters()) * 4  # weights, grads, 2 moments
    out = {"train_tokens_per_second": round(tokens * steps / seconds["packed"], 1),
           "train_sec_per_step": round(seconds["packed"] / steps, 3),
           "train_rows": rows, "train_max_len": max_len, "train_tokens_per_step": tokens, "train_precision": precision,
           "train_state_mb": round(state_bytes / 2**20, 2)}
    if block_mask:
        out["train_tokens_per_second_block_mask"] = round(tokens * steps / seconds["block_mask"], 1)
        out["packed_attention_speedup"] = round(seconds["block_mask"] / seconds["packed"], 3)
    return out


# ----------------------------------------------------------------------------- the benchmark


def bench_world_model(cfg: DictConfig) -> dict[str, Any]:
    setup = open_bench(cfg)
    tokenizer, ex = setup.tokenizer, setup.export
    d = cfg.get("dida") or {}
    decoding = ex.export.decoding(str(cfg.get("decoding", "ar")), setup.vision, cfg.get("cfg_scale"),
                                  **{k: d.get(k) for k in ("steps", "update", "start", "start_time")})
    if decoding.decoding == "dida" and not ex.export.dida_adapted:
        print(f"warning: {setup.checkpoint} was not DiDA-adapted, so decoding=dida measures a sampler it was never "
              "trained for; adapt it first (python -m emu_world.train stage=dida init=<export>) or use decoding=ar")
    per_task, samples, strips = {}, [], []
    for name in setup.tasks:
        spec = ex.tasks[name]
        t0 = time.perf_counter()
        episodes = record_episodes(spec, int(tokenizer.image_size), int(cfg.seed), int(cfg.episodes),
                                   cfg.max_episode_steps)
        t1 = time.perf_counter()
        predict = ex.export.frame_predictor(ex.model, ex.layout, decoding, tokenizer, spec.action_dim)
        encoded = encode_episodes(tokenizer, ex.layout, spec, episodes)
        per_task[name], rollouts = score_rollouts(predict, tokenizer, ex, spec, encoded, cfg)
        samples += training_samples(ex, spec, encoded)
        strips += [(f"{name} {label}", frames) for label, frames in rollout_strip(encoded, rollouts[0])]
        print(f"{name}: recorded {per_task[name]['frames']} frames in {t1 - t0:.1f}s, "
              f"{per_task[name]['rollouts']} rollouts in {time.perf_counter() - t1:.1f}s", file=sys.stderr, flush=True)
    data_cfg = ex.manifest["config"]["data"]
    precision = cfg.throughput.get("precision") or ex.manifest["config"].get("train", {}).get("precision", "float32")
    speed = training_throughput(ex.model, ex.layout, samples, int(data_cfg["max_len"]), int(data_cfg["rows"]),
                                int(cfg.throughput.steps), str(precision), bool(cfg.throughput.get("block_mask", False))
                                ) if int(cfg.throughput.steps) > 0 else {}
    frame_decoding = "ar" if decoding.decoding == "ar" else \
        f"dida K={decoding.dida.steps} ({decoding.dida.update}, start={decoding.dida.start})"
    summary = summarize(cfg, setup, per_task, speed, frame_decoding)
    if cfg.get("picture"):
        columns = ["context"] + [f"+{h}" for h in range(1, max(setup.horizons) + 1)]
        summary["picture"] = str(save_grid(bench_output_dir(cfg) / "strip.png", strips, columns))
    print_table(summary)
    return summary


def summarize(cfg: DictConfig, setup: BenchSetup, per_task: dict[str, Any], speed: dict[str, Any],
              frame_decoding: str) -> dict[str, Any]:
    """The JSON summary: the headline task's keys per horizon, means over tasks, speed and settings."""
    horizons, vision, ex = setup.horizons, setup.vision, setup.export
    head = str(cfg.headline_task) if str(cfg.headline_task) in per_task else setup.tasks[0]
    rows = per_task[head]["horizons"]
    return {
        "benchmark": "world_model", "checkpoint": str(setup.checkpoint), "tokenizer": setup.tokenizer.identity(),
        "headline_task": head,
        **{f"{key}_{h}": rows[str(h)][src] for h in horizons
           for key, src in (("psnr", "psnr"), ("ssim", "ssim"), ("token_acc", "token_acc"),
                            ("copy_last_psnr", "copy_psnr"), ("copy_last_ssim", "copy_ssim"),
                            ("copy_last_token_acc", "copy_token_acc"), ("static_token_acc", "static_token_acc"),
                            ("changed_token_acc", "changed_token_acc"), ("psnr_gain", "gain"),
                            ("psnr_gain_ci95", "gain_ci95"))},
        **{f"teacher_forced_{key}_1": value for key, value in per_task[head]["teacher_forced_1"].items()},
        "ceiling_psnr": round(float(np.mean([rows[str(h)]["ceiling_psnr"] for h in horizons])), 4),
        **{f"mean_{key}_{h}": round(float(np.mean([t["horizons"][str(h)][src] for t in per_task.values()])), 4)
           for h in horizons for key, src in (("psnr", "psnr"), ("copy_last_psnr", "copy_psnr"))},
        "sec_per_frame": round(float(np.mean([t["sec_per_frame"] for t in per_task.values()])), 3),
        **speed,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "parameters": ex.model.num_parameters(), "threads": torch.get_num_threads(),
        "decoding": "greedy" if vision.temperature == 0 else f"temperature {vision.temperature}, top-k {vision.top_k}",
        "frame_decoding": frame_decoding,
        "context_frames": int(cfg.context_frames), "horizons": horizons, "seed": int(cfg.seed),
        "episodes": int(cfg.episodes), "starts": int(cfg.starts), "per_task": per_task,
    }


def print_table(summary: dict[str, Any]) -> None:
    lines = ["| task | h | PSNR dB | copy-last dB | gain dB (95% interval) | ceiling dB | SSIM | copy-last SSIM | token acc "
             "| copy-last token acc | rollouts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in summary["per_task"].items():
        for h, r in t["horizons"].items():
            ci = f" ± {r['gain_ci95']:.2f}" if r.get("gain_ci95") is not None else ""
            lines.append(f"| {name} | {h} | {r['psnr']:.2f} | {r['copy_psnr']:.2f} | {r['gain']:+.2f}{ci} | {r['ceiling_psnr']:.2f} | "
                         f"{r['ssim']:.4f} | {r['copy_ssim']:.4f} | {r['token_acc']:.3f} | {r['copy_token_acc']:.3f} | "
                         f"{t['rollouts']} |")
    lines.append(f"headline keys (psnr_<h>, copy_last_psnr_<h>, ceiling_psnr): {summary['headline_task']}; "
                 f"mean_* average over tasks. Decoding {summary['frame_decoding']}, {summary['decoding']}, "
                 f"{summary['context_frames']} context "
                 f"frame(s), {summary['sec_per_frame']:.2f} s per generated frame ({summary['threads']} threads); "
                 f"peak RSS {summary['peak_rss_mb']:.0f} MB.")
    if "train_tokens_per_second" in summary:
        lines.append(f"training: {summary['train_tokens_per_second']:.0f} tokens/s ({summary['train_rows']} rows x "
                     f"{summary['train_max_len']}, {summary['train_precision']}, "
                     f"{summary['train_sec_per_step']:.2f} s/step), train state "
                     f"(weights, gradients, AdamW moments) {summary['train_state_mb']:.1f} MB")
    if "packed_attention_speedup" in summary:
        lines.append(f"the same steps through the 4-D block mask: {summary['train_tokens_per_second_block_mask']:.0f} "
                     f"tokens/s; packed attention {summary['packed_attention_speedup']:.2f}x")
    print("\n".join(lines), flush=True)
