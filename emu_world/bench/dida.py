"""Benchmark ``dida``: K-step parallel decoding (DiDA) against token-by-token AR, same model, same run.

    python -m emu_world.bench dida                                    # checkpoints/world_model, aloha_fold
    python -m emu_world.bench dida checkpoint=outputs/train/dida/world_model steps=[1,2,4,8,16] default_steps=4
    python -m emu_world.bench dida tasks=[aloha_fold,widowx_pick_place] episodes=2 starts=4 threads=2
    python -m emu_world.bench dida update=confidence                  # MaskGIT-ordered variant
    python -m emu_world.bench dida start=previous start_time=0.5      # warm start from the previous frame

What is measured. Held-out episodes are recorded from the simulator exactly as
:mod:`emu_world.bench.world_model` does (scripted expert, episode ``i`` reset with ``seed + i``,
the export's camera and frame stride), encoded once, and every decoder runs the same imagined
rollouts on them (:func:`~emu_world.bench.world_model.score_rollouts`: from ``starts`` start
frames per episode, true actions, each step fed the decoder's own earlier predictions, up to
``max(horizons)`` frames ahead; default horizons 1 and 8). Decoders: token-by-token AR
(:class:`~emu_world.models.generate.Generator`, KV cache, grammar-forced structure: the fastest AR this
project has) and DiDA at every ``K`` in ``steps`` (:class:`~emu_world.models.dida.DidaSampler`: one
prefill + K block passes), all greedy by default (``vision.temperature=0``; DiDA's initial and
re-noised codes still come from the seed). Per decoder: seconds per generated frame (prompt
prefill included, tokenizer decode excluded; one untimed warm-up frame first), frames per second,
speed-up against AR, forward passes per frame, and per horizon PSNR / SSIM of the decoded frames
against the simulator and token accuracy against the tokenizer's codes of the true frame; the
tokenizer ceiling and copy-last are the same for all decoders.

Threads. ``threads=2`` by default: the issue's target is stated for 2 CPU cores, and both
decoders run at that thread count in one process (they are compared, not measured alone).

JSON (one line at the end). ``speedup_vs_ar`` and ``psnr_gap_db`` (AR PSNR minus DiDA PSNR, dB:
positive when DiDA is worse; at the shortest horizon) at ``default_steps`` (null: the export's
``dida.sampler.steps``, else 2), ``psnr_gap_db_<h>`` per horizon, ``sweep`` (the headline task's
row per decoder: ``ar``, ``K=1``, ...), ``per_task`` (every task's sweep), ``dida_adapted``
(whether the export's manifest records a DiDA adaptation), and ``picture``: one image per run,
for every task and horizon the same imagined frame (first rollout) by AR and by DiDA at each K
beside the true frame.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from emu_world.bench.common import bench_output_dir, open_bench, score_rollouts
from emu_world.media import save_grid
from emu_world.models.dida import FrameDecodingConfig, FramePredictor, SamplerConfig
from emu_world.models.export import WorldModelExport
from emu_world.models.generate import Sampling
from emu_world.provenance import code_version, command_line
from emu_world.rollouts import (
    EncodedEpisode,
    LoadedExport,
    Rollout,
    TaskSpec,
    build_sample,
    encode_episodes,
    record_episodes,
    start_frames,
)


def decoders(cfg: DictConfig, export: WorldModelExport,
             vision: Sampling) -> tuple[dict[str, FrameDecodingConfig], int]:
    """``{"ar": ..., "K=1": ..., ...}`` and the default K (always among them)."""
    defaults = export.sampler_config()
    default_k = int(cfg.default_steps) if cfg.get("default_steps") is not None else defaults.steps
    update = cfg.get("update")  # a key, not DictConfig.update
    update = str(update) if update is not None else defaults.update
    start = str(cfg.get("start") or defaults.start)
    start_time = float(cfg.get("start_time") if cfg.get("start_time") is not None else defaults.start_time)
    ks = sorted({int(k) for k in cfg.steps} | {default_k})
    cfg_scale = cfg.get("cfg_scale")
    out = {"ar": FrameDecodingConfig("ar", vision, cfg_scale)}
    for k in ks:
        out[f"K={k}"] = FrameDecodingConfig("dida", vision, cfg_scale, SamplerConfig(k, update, start, start_time))
    return out, default_k


def warm_up(predict: FramePredictor, ex: LoadedExport, spec: TaskSpec, e: EncodedEpisode, context: int) -> int:
    """One untimed frame (first-call overheads stay out of the timing); returns its forward passes."""
    j = start_frames(len(e.codes), context, 1, 1)[0]
    sample = build_sample(ex.layout, spec, e.episode.text, e.codes[j - context + 1:j + 1],
                          e.conds[j - context + 1:j + 1], end=False)
    return predict(sample.tokens, seed=0).forward_passes


def measure_decoders(ex: LoadedExport, tokenizer, spec: TaskSpec, encoded: list[EncodedEpisode],
                     methods: dict[str, FrameDecodingConfig], cfg: DictConfig) -> tuple[dict[str, dict[str, Any]], dict[str, Rollout]]:
    """Every decoder on the same rollouts of one task: its metrics row and its first rollout."""
    rows, firsts = {}, {}
    horizons = sorted({int(h) for h in cfg.horizons})
    for name, decoding in methods.items():
        predict = ex.export.frame_predictor(ex.model, ex.layout, decoding, tokenizer, spec.action_dim)
        passes = warm_up(predict, ex, spec, encoded[0], int(cfg.context_frames))
        t0 = time.perf_counter()
        result, rollouts = score_rollouts(predict, tokenizer, ex, spec, encoded, cfg)
        sec = float(result["sec_per_frame"])
        row = {"sec_per_frame": round(sec, 4), "frames_per_second": round(1.0 / sec, 2) if sec > 0 else None,
               "forward_passes_per_frame": passes, "rollouts": result["rollouts"]}
        for h in horizons:
            r = result["horizons"][str(h)]
            row.update({f"psnr_{h}": r["psnr"], f"ssim_{h}": r["ssim"], f"token_acc_{h}": r["token_acc"],
                        f"copy_last_psnr_{h}": r["copy_psnr"], f"ceiling_psnr_{h}": r["ceiling_psnr"]})
        rows[name] = row
        firsts[name] = rollouts[0]
        print(f"{spec.task} {name}: {sec:.3f} s/frame, psnr_{horizons[0]} {row[f'psnr_{horizons[0]}']:.2f} dB "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    ar = rows["ar"]["sec_per_frame"]
    for row in rows.values():
        row["speedup_vs_ar"] = round(ar / row["sec_per_frame"], 2) if row["sec_per_frame"] > 0 else None
    return rows, firsts


def picture_rows(task: str, encoded: list[EncodedEpisode], firsts: dict[str, Rollout],
                 horizons: list[int]) -> list[tuple[str, list[np.ndarray]]]:
    """Per horizon h: the true frame j+h, then each decoder's imagined frame j+h (same rollout start)."""
    first = firsts["ar"]
    ep = encoded[first.episode].episode
    rows = []
    for h in horizons:
        frames = [ep.frames[first.start + h]] + [r.frames[h - 1] for r in firsts.values()]
        rows.append((f"{task}\n+{h} from frame {first.start}", frames))
    return rows


def bench_dida(cfg: DictConfig) -> dict[str, Any]:
    setup = open_bench(cfg)
    checkpoint, tokenizer, ex, names = setup.checkpoint, setup.tokenizer, setup.export, setup.tasks
    horizons, vision = setup.horizons, setup.vision
    methods, default_k = decoders(cfg, ex.export, vision)
    per_task, pictures = {}, []
    for name in names:
        spec = ex.tasks[name]
        t0 = time.perf_counter()
        episodes = record_episodes(spec, int(tokenizer.image_size), int(cfg.seed), int(cfg.episodes),
                                   cfg.max_episode_steps)
        print(f"{name}: recorded {sum(len(e.frames) for e in episodes)} frames in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
        encoded = encode_episodes(tokenizer, ex.layout, spec, episodes)
        per_task[name], firsts = measure_decoders(ex, tokenizer, spec, encoded, methods, cfg)
        pictures += picture_rows(name, encoded, firsts, horizons)
    head = names[0]
    sweep = per_task[head]
    d, ar = sweep[f"K={default_k}"], sweep["ar"]
    summary: dict[str, Any] = {
        "benchmark": "dida", "checkpoint": str(checkpoint), "tokenizer": tokenizer.identity(),
        "dida_adapted": ex.export.dida_adapted, "headline_task": head, "default_steps": default_k,
        "update": methods[f"K={default_k}"].dida.update, "start": methods[f"K={default_k}"].dida.start,
        "start_time": methods[f"K={default_k}"].dida.start_time,
        "speedup_vs_ar": d["speedup_vs_ar"],
        "psnr_gap_db": round(ar[f"psnr_{horizons[0]}"] - d[f"psnr_{horizons[0]}"], 4),
        **{f"psnr_gap_db_{h}": round(ar[f"psnr_{h}"] - d[f"psnr_{h}"], 4) for h in horizons},
        "sec_per_frame_ar": ar["sec_per_frame"], "sec_per_frame_dida": d["sec_per_frame"],
        **{f"psnr_{h}_ar": ar[f"psnr_{h}"] for h in horizons},
        **{f"psnr_{h}_dida": d[f"psnr_{h}"] for h in horizons},
        **{f"ceiling_psnr_{h}": ar[f"ceiling_psnr_{h}"] for h in horizons},
        **{f"copy_last_psnr_{h}": ar[f"copy_last_psnr_{h}"] for h in horizons},
        "sweep": sweep, "per_task": per_task,
        "horizons": horizons, "decoding": "greedy" if vision.temperature == 0 else
        f"temperature {vision.temperature}, top-k {vision.top_k}", "cfg_scale": cfg.get("cfg_scale"),
        "threads": torch.get_num_threads(), "seed": int(cfg.seed), "episodes": int(cfg.episodes),
        "starts": int(cfg.starts), "context_frames": int(cfg.context_frames),
        "parameters": ex.model.num_parameters(), "tokens_per_frame": int(len(ex.layout.code_offsets)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if cfg.get("picture"):
        columns = ["true"] + list(methods)
        summary["picture"] = str(save_grid(bench_output_dir(cfg) / "dida_frames.png", pictures, columns))
    print_table(summary)
    if cfg.get("record"):
        record_quality(checkpoint, summary)
    return summary


def record_quality(checkpoint: Path, summary: dict[str, Any]) -> None:
    """Write the headline task's AR and default-K DiDA quality into the export's ``manifest.json``
    (its ``quality`` entry, atomically), with the command and the episodes that measured it."""
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    keep = ("sec_per_frame", "frames_per_second", "speedup_vs_ar", "forward_passes_per_frame")
    hs = summary["horizons"]

    def entry(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: row[k] for k in keep if k in row}
        out.update({f"{m}_{h}": row[f"{m}_{h}"] for h in hs for m in ("psnr", "ssim", "token_acc")})
        return out

    sweep = summary["sweep"]
    manifest["quality"] = {
        "task": summary["headline_task"], "command": command_line("emu_world.bench dida"),
        "code_version": code_version(), "seed": summary["seed"], "episodes": summary["episodes"],
        "starts": summary["starts"], "threads": summary["threads"], "decoding": summary["decoding"],
        "ar": entry(sweep["ar"]), "dida": {"steps": summary["default_steps"], "update": summary["update"],
                                            "start": summary["start"], "start_time": summary["start_time"],
                                            **entry(sweep[f"K={summary['default_steps']}"])},
        **{f"ceiling_psnr_{h}": summary[f"ceiling_psnr_{h}"] for h in hs},
        **{f"copy_last_psnr_{h}": summary[f"copy_last_psnr_{h}"] for h in hs},
    }
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"recorded AR and DiDA quality in {path}", file=sys.stderr, flush=True)


def print_table(summary: dict[str, Any]) -> None:
    hs = summary["horizons"]
    head = ["decoder", "s/frame", "frames/s", "speed-up", "passes"] + \
        [x for h in hs for x in (f"PSNR +{h}", f"SSIM +{h}", f"tok acc +{h}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in summary["sweep"].items():
        cells = [name, f"{r['sec_per_frame']:.3f}", f"{r['frames_per_second']:.1f}", f"{r['speedup_vs_ar']:.1f}x",
                 str(r["forward_passes_per_frame"])]
        cells += [x for h in hs
                  for x in (f"{r[f'psnr_{h}']:.2f}", f"{r[f'ssim_{h}']:.4f}", f"{r[f'token_acc_{h}']:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"{summary['headline_task']}: ceiling " + ", ".join(f"+{h} {summary[f'ceiling_psnr_{h}']:.2f}" for h in hs)
        + " dB; copy-last " + ", ".join(f"+{h} {summary[f'copy_last_psnr_{h}']:.2f}" for h in hs)
        + f" dB. Default K={summary['default_steps']} ({summary['update']}, start={summary['start']}): "
        f"{summary['speedup_vs_ar']}x faster than "
        f"AR, PSNR gap {summary['psnr_gap_db']:+.2f} dB (AR minus DiDA); {summary['decoding']}, "
        f"{summary['threads']} threads, {summary['tokens_per_frame']} tokens/frame"
        + ("" if summary["dida_adapted"] else "; NOTE: this export was not DiDA-adapted (train stage=dida)"))
    print("\n".join(lines), flush=True)
