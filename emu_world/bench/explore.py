"""Benchmark ``explore``: the world model as a playable room, against the simulator.

    python -m emu_world.bench explore                       # the shipped default (checkpoint=auto), 2 walks
    python -m emu_world.bench explore checkpoint=<export> walks=4 starts=2 seed=2000 threads=1
    python -m emu_world.bench explore steps=4 context_frames=2 ar_frames=0

What is measured. ``walks`` walks of the room's scripted explorer (``envs/explore_room.py``:
``ExploreRoomExplorer``; walk ``i`` resets with ``seed + i``, the export's camera and the tokenizer's
frame size) are recorded and cut into ``starts`` rollouts each, ``commands`` commands long (the
first starts at the walk's first frame, where the explorer looks around the room; later ones walk).
Each rollout is imagined the way ``python -m emu_world.explore`` plays: the world-model environment
(:class:`~emu_world.rollouts.WorldModelEnv`) is reset from the true frame (encoded by the tokenizer),
then stepped with one command text per frame and every frame decoded to pixels
(:func:`~emu_world.bench.common.imagine_timed`), each step fed the model's own earlier frames, DiDA at
the export's K (``steps=`` to change it), greedy.

- Speed: ``fps`` is imagined frames per wall second of that loop, encode + model + decode
  (``sec_per_frame`` split into ``model_sec_per_frame`` and ``decode_sec_per_frame``); ``ar_fps`` the
  same loop token by token over the first ``ar_frames`` commands of the first rollout (AR costs about
  a second per 256-token frame; one untimed warm-up frame goes first for both).
- Quality: ``psnr_<h>`` of the imagined frame against the simulator's after ``h`` commands (each of
  ``horizons``), beside ``copy_first_psnr_<h>`` (the start frame, copied), ``ceiling_psnr_<h>`` (the
  tokenizer's reconstruction of the true frame) and ``gain_<h>`` (PSNR minus copy-first, the mean of
  per-rollout differences with its 95% interval ``gain_ci95_<h>``).
- Controllability (Genie, arXiv 2402.15391, delta-PSNR): ``delta_psnr_<h>`` = PSNR with the true
  commands minus PSNR with the same commands shuffled (a seeded permutation of the rollout's
  commands, same sampling seed), per rollout, averaged (``delta_psnr_ci95_<h>``). Near 0: the frames do
  not follow the commands. A rollout whose commands are all alike cannot be shuffled: the
  explorer's first rollout is mostly turns, so its delta is a lower bound.

JSON (one line at the end): the keys above, ``command_share`` (how often each command occurs in the
rollouts), ``rollouts``, ``checkpoint``, ``decoding`` and ``picture``: the first rollout's true,
imagined and shuffled-command frames at a few horizons (in the run's output directory).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from emu_world.bench.common import (
    TimedImagination,
    bench_output_dir,
    gain_over_copy,
    imagine_timed,
)
from emu_world.errors import UserError
from emu_world.image_metrics import psnr_per_frame
from emu_world.media import save_grid
from emu_world.rollouts import (
    EncodedEpisode,
    LoadedExport,
    TaskSpec,
    WorldModelEnv,
    encode_episodes,
    load_for_task,
    record_episodes,
    start_frames,
)


def check_config(cfg: DictConfig) -> tuple[list[int], int, int]:
    """Horizons (sorted), rollout length and context frames, with the fix for a wrong value."""
    horizons = sorted({int(h) for h in cfg.horizons})
    H, C = int(cfg.commands), int(cfg.context_frames)
    if not horizons or horizons[0] < 1 or horizons[-1] > H:
        raise UserError(f"horizons={list(cfg.horizons)} must lie in 1..commands ({H}); raise commands or "
                        "drop the longer horizons")
    if min(C, int(cfg.walks), int(cfg.starts)) < 1 or int(cfg.ar_frames) < 0:
        raise UserError("context_frames, walks and starts must be >= 1 and ar_frames >= 0")
    return horizons, H, C


def rollout_starts(e: EncodedEpisode, C: int, H: int, starts: int) -> list[int]:
    return start_frames(len(e.codes), C, H, starts)


def imagine_rollout(world: WorldModelEnv, e: EncodedEpisode, j: int, C: int, conds: list[Any],
                    seed: int) -> TimedImagination:
    """From true frame ``j`` (with ``C - 1`` before it), one frame per condition of ``conds``."""
    return imagine_timed(world, e.episode.frames[j - C + 1:j + 1], e.conds[j - C + 1:j], conds, seed)


def shuffled(conds: list[Any], rng: np.random.Generator) -> list[Any]:
    return [conds[i] for i in rng.permutation(len(conds))]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(psnr_per_frame(a[None], b[None])[0])


def score_walks(world: WorldModelEnv, encoded: list[EncodedEpisode], horizons: list[int], H: int, C: int,
                cfg: DictConfig) -> tuple[dict[str, Any], list[tuple[str, list[np.ndarray]]]]:
    """Every rollout with the true and the shuffled commands: per-horizon lists and the timing totals;
    and the picture rows of the first rollout."""
    keys = ("psnr", "copy_first_psnr", "shuffled_psnr", "ceiling_psnr")
    acc: dict[str, Any] = {h: {k: [] for k in keys} for h in horizons}
    acc.update(frames=0, seconds=0.0, model=0.0, other=0.0, commands=Counter())
    rng = np.random.default_rng(int(cfg.seed))
    picture: list[tuple[str, list[np.ndarray]]] = []
    for e in encoded:
        for j in rollout_starts(e, C, H, int(cfg.starts)):
            conds = e.conds[j:j + H]
            seed = int(cfg.seed) + j
            true = imagine_rollout(world, e, j, C, conds, seed)
            other = imagine_rollout(world, e, j, C, shuffled(conds, rng), seed)
            acc["frames"] += H
            acc["seconds"] += true.seconds
            acc["model"] += true.model_seconds
            acc["other"] += true.other_seconds
            acc["commands"].update(conds)
            frames = e.episode.frames
            for h in horizons:
                acc[h]["psnr"].append(psnr(true.frames[h - 1], frames[j + h]))
                acc[h]["copy_first_psnr"].append(psnr(frames[j], frames[j + h]))
                acc[h]["shuffled_psnr"].append(psnr(other.frames[h - 1], frames[j + h]))
                acc[h]["ceiling_psnr"].append(psnr(e.recon[j + h], frames[j + h]))
            if not picture:
                picture = picture_rows(frames[j + 1:j + 1 + H], true.frames, other.frames, horizons)
    if not acc["frames"]:
        raise UserError(f"no walk is long enough for {C} context frame(s) and {H} commands; lower commands")
    return acc, picture


def picture_rows(true: np.ndarray, imagined: np.ndarray, other: np.ndarray,
                 horizons: list[int]) -> list[tuple[str, list[np.ndarray]]]:
    cols = sorted({h for h in (1, 2, 4, 8, 16, 32, 64) if h <= len(true)} | set(horizons))
    return [("simulator", [true[h - 1] for h in cols]), ("imagined", [imagined[h - 1] for h in cols]),
            ("shuffled commands", [other[h - 1] for h in cols])]


def time_decoder(world: WorldModelEnv, e: EncodedEpisode, C: int, frames: int, seed: int) -> dict[str, Any]:
    """Seconds per imagined frame of the interactive loop over the first ``frames`` commands of ``e``,
    after one untimed warm-up frame."""
    j = C - 1
    imagine_rollout(world, e, j, C, e.conds[j:j + 1], seed)  # warm-up: first-call overheads stay out
    if frames <= 0:
        return {"fps": None, "sec_per_frame": None}
    t = imagine_rollout(world, e, j, C, e.conds[j:j + frames], seed)
    return {"fps": round(frames / t.seconds, 3), "sec_per_frame": round(t.seconds / frames, 4)}


def horizon_rows(acc: dict[str, Any], horizons: list[int]) -> dict[str, Any]:
    """``psnr_<h>``, ``copy_first_psnr_<h>``, ``shuffled_psnr_<h>``, ``ceiling_psnr_<h>``, ``gain_<h>``,
    ``delta_psnr_<h>`` (with 95% intervals)."""
    out: dict[str, Any] = {}
    for h in horizons:
        a = acc[h]
        out.update({f"{k}_{h}": round(float(np.mean(v)), 3) for k, v in a.items()})
        g = gain_over_copy(a["psnr"], a["copy_first_psnr"])
        d = gain_over_copy(a["psnr"], a["shuffled_psnr"])
        out.update({f"gain_{h}": g["gain"], f"gain_ci95_{h}": g["gain_ci95"],
                    f"delta_psnr_{h}": d["gain"], f"delta_psnr_ci95_{h}": d["gain_ci95"]})
    return out


def open_world(cfg: DictConfig) -> tuple[Any, LoadedExport, TaskSpec]:
    """Threads, then the tokenizer, export and the exploration task of the config."""
    torch.set_num_threads(int(cfg.threads))
    tok, ex, spec = load_for_task(str(cfg.checkpoint), cfg.get("tokenizer"), str(cfg.task), "dida")
    if spec.commands is None:
        raise UserError(f"task={cfg.task} is driven by actions, not commands: bench explore needs an "
                        "exploration task (task=explore_room)")
    return tok, ex, spec


def bench_explore(cfg: DictConfig) -> dict[str, Any]:
    horizons, H, C = check_config(cfg)
    tok, ex, spec = open_world(cfg)
    t0 = time.perf_counter()
    steps = C - 1 + int(cfg.starts) * H + 1  # frames per walk: the starts' rollouts do not overlap
    walks = record_episodes(spec, int(tok.image_size), int(cfg.seed), int(cfg.walks), steps)
    encoded = encode_episodes(tok, ex.layout, spec, walks)
    print(f"recorded {len(walks)} walks of {steps} frames in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
    text = walks[0].text
    dida = WorldModelEnv(ex.layout, spec, ex.predictor(spec, "dida", tok, steps=cfg.get("steps")), text, C, tok)
    time_decoder(dida, encoded[0], C, 0, int(cfg.seed))  # warm-up only
    acc, picture = score_walks(dida, encoded, horizons, H, C, cfg)
    print(f"scored {acc['frames']} frames x 2 (true, shuffled commands) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
    ar = WorldModelEnv(ex.layout, spec, ex.predictor(spec, "ar", tok), text, C, tok)
    ar_speed = time_decoder(ar, encoded[0], C, int(cfg.ar_frames), int(cfg.seed))
    n = acc["frames"]
    fps = n / acc["seconds"]
    summary: dict[str, Any] = {
        "benchmark": "explore", "checkpoint": str(ex.path), "task": spec.task,
        "decoding": dida.predict.name, "dida_adapted": ex.export.dida_adapted,
        "fps": round(fps, 3), "sec_per_frame": round(1.0 / fps, 4),
        "model_sec_per_frame": round(acc["model"] / n, 4), "decode_sec_per_frame": round(acc["other"] / n, 4),
        "ar_fps": ar_speed["fps"], "ar_sec_per_frame": ar_speed["sec_per_frame"],
        "dida_speedup_vs_ar": round(ar_speed["sec_per_frame"] * fps, 2) if ar_speed["fps"] else None,
        **horizon_rows(acc, horizons),
        "rollouts": len(acc[horizons[0]]["psnr"]), "walks": int(cfg.walks), "commands": H,
        "horizons": horizons, "context_frames": C, "seed": int(cfg.seed), "threads": torch.get_num_threads(),
        "frame_size": int(tok.image_size), "tokens_per_frame": len(ex.layout.code_offsets),
        "command_share": {k: round(v / n, 3) for k, v in acc["commands"].most_common()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if cfg.get("picture"):
        cols = [f"+{h}" for h in sorted({h for h in (1, 2, 4, 8, 16, 32, 64) if h <= H} | set(horizons))]
        summary["picture"] = str(save_grid(bench_output_dir(cfg) / "explore_frames.png", picture, cols))
    print_table(summary, horizons)
    return summary


def print_table(s: dict[str, Any], horizons: list[int]) -> None:
    head = ["commands", "PSNR", "copy first", "shuffled", "delta-PSNR", "gain over copy", "ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for h in horizons:
        lines.append(f"| {h} | {s[f'psnr_{h}']:.2f} | {s[f'copy_first_psnr_{h}']:.2f} | {s[f'shuffled_psnr_{h}']:.2f}"
                     f" | {s[f'delta_psnr_{h}']:+.2f} | {s[f'gain_{h}']:+.2f} | {s[f'ceiling_psnr_{h}']:.2f} |")
    ar = f"{s['ar_fps']} frames/s token by token" if s["ar_fps"] else "AR not timed"
    lines.append(f"{s['checkpoint']} ({s['decoding']}): {s['fps']} frames/s interactive (encode + model + decode), "
                 f"{ar}; {s['rollouts']} rollouts of {s['commands']} commands, {s['threads']} threads")
    print("\n".join(lines), flush=True)
