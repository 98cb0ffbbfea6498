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
decoder ``decoding`` names (:func:`emu_world.dida.frame_predictor`: ``ar``, token by token with
:class:`~emu_world.generate.Generator`, or ``dida``, ``dida.steps`` parallel refinement passes;
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
frames. :mod:`emu_world.bench_dida` reuses the recording, rollouts and metrics to compare decoders.

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
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emu_world.config import CONFIG_DIR, EnvConfig, to_dataclass
from emu_world.data.sequences import span_steps
from emu_world.dida import (
    ARFramePredictor, FrameDecodingConfig, FramePredictor, SamplerConfig, export_noise_path, export_sampler_config,
    frame_predictor,
)
from emu_world.generate import Generator, Sampling
from emu_world.image_metrics import psnr_per_frame, ssim_per_frame
from emu_world.layout import ActionBinner, LayoutConfig, Sample, SequenceLayout
from emu_world.training import autocast
from emu_world.tokenizer import check_same_codes
from emu_world.world_model import WorldModel, document_mask

TRAIN_COMMAND = ("python -m emu_world.train stage=world_model dataset.root=datasets "
                 "world_model.export_dir=checkpoints/world_model")


# ----------------------------------------------------------------------------- the export


@dataclass
class TaskSpec:
    """How the model saw one task's dataset in training."""

    task: str  # env / dataset name
    tag: str  # embodiment tag, the prompt's prefix
    camera: str  # short camera name, e.g. "top"
    stride: int  # env steps between frames
    binner: ActionBinner | None  # None: an exploration (command) dataset
    commands: tuple[str, ...] | None

    @property
    def action_dim(self) -> int | None:
        """Bins per action step (the generators' ``action_dim``); None for commands."""
        return self.binner.action_dim if self.binner is not None else None


@dataclass
class Export:
    path: Path
    manifest: dict[str, Any]
    layout: SequenceLayout
    model: WorldModel
    tasks: dict[str, TaskSpec]  # every simulator task of the training data


def load_export(checkpoint: Path, tokenizer) -> Export:
    """The world-model folder written by ``train stage=world_model``: model, layout, binners, strides;
    refuses a tokenizer other than the one it was trained on."""
    import envs

    manifest_path = checkpoint / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} holds no world model export (manifest.json is missing). Train one with `{TRAIN_COMMAND}` "
            "or point the benchmark at an export with checkpoint=<folder>"
        )
    manifest = json.loads(manifest_path.read_text())
    check_same_codes(manifest["tokenizer"], tokenizer, f"the world model {checkpoint}",
                     "pass the tokenizer it was trained with (tokenizer=<folder>)")
    config = manifest["config"]
    layout_cfg = to_dataclass(LayoutConfig, OmegaConf.create(config["layout"]))
    layout = SequenceLayout.from_config(layout_cfg, tokenizer.codebook_size, tuple(tokenizer.grid))
    model = WorldModel.load(checkpoint, layout)
    strides = config["data"]["frame_stride"]
    tasks = {}
    for entry in manifest["data"]:
        name = str(entry["name"])
        if not (CONFIG_DIR / "env" / f"{name}.yaml").is_file():
            continue  # a dataset this checkout cannot simulate
        commands = getattr(envs.task_spec(name).env_cls(), "commands", None)
        binner = ActionBinner.load(checkpoint / entry["binner"]) if entry.get("binner") else None
        tasks[name] = TaskSpec(name, str(entry["embodiment"]),
                               str(entry["cameras"][0]).removeprefix("observation.images."),
                               int(strides[entry["embodiment"]]), binner, tuple(commands) if commands else None)
    return Export(checkpoint, manifest, layout, model, tasks)


# ----------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    task: str
    text: str  # the instruction (without the tag)
    seed: int
    frames: np.ndarray  # (n, H, W, 3) uint8: every stride-th observation
    actions: np.ndarray  # (T, A) float32: every env step's action as the actuators received it


def record_episodes(spec: TaskSpec, image_size: int, seed: int, episodes: int,
                    max_episode_steps: int | None) -> list[Episode]:
    """The scripted expert's episodes ``seed..seed+episodes-1``: observation before every action, and the action."""
    import envs
    from emu_world.evaluate import run_episode

    env_cfg = to_dataclass(EnvConfig, OmegaConf.load(CONFIG_DIR / "env" / f"{spec.task}.yaml"))
    env_cfg.image_size = image_size
    if max_episode_steps:
        env_cfg.max_episode_steps = int(max_episode_steps)
    env = env_cfg.make()
    expert = envs.make_expert(spec.task, env)
    out = []
    try:
        for i in range(episodes):
            frames: list[np.ndarray] = []
            actions: list[np.ndarray] = []

            def on_step(obs, action, next_obs, reward, terminated, truncated, info, subtask):
                frames.append(np.asarray(obs["pixels"][spec.camera]))
                actions.append(np.asarray(action, dtype=np.float32).reshape(-1))

            run_episode(env, expert, seed + i, i, on_step=on_step)
            out.append(Episode(spec.task, str(env.unwrapped.task), seed + i, np.stack(frames[::spec.stride]),
                               np.stack(actions)))
    finally:
        env.close()
    return out


def interval_conditions(layout: SequenceLayout, spec: TaskSpec, ep: Episode) -> list[Any]:
    """What sits between frame i and frame i+1 (i < n-1): (k, A) action bins, or the command text."""
    n, s = len(ep.frames), spec.stride
    if spec.commands is not None:
        index = np.rint(ep.actions[:, 0]).astype(np.int64)
        return [", ".join(spec.commands[c] for c in index[i * s:(i + 1) * s]) for i in range(n - 1)]
    assert spec.binner is not None
    k = layout.config.actions_per_frame
    steps = span_steps(s * np.arange(n, dtype=np.int64), s, k).reshape(n - 1, k)
    return [spec.binner.encode(ep.actions[st]) for st in steps]


def build_sample(layout: SequenceLayout, spec: TaskSpec, text: str, codes: np.ndarray, conds: list[Any],
                 end: bool) -> Sample:
    """A dynamics (or exploration) sample of ``codes`` (n, h, w) and the conditions after them."""
    prompt = f"{spec.tag}: {text}"
    if spec.commands is not None:
        return layout.exploration(prompt, codes, conds, end=end)
    bins = np.concatenate(conds) if conds else np.zeros((0, spec.binner.action_dim), dtype=np.int64)
    return layout.dynamics(prompt, codes, bins, end=end)


def start_frames(n: int, context: int, horizon: int, starts: int) -> list[int]:
    """Up to ``starts`` evenly spaced start frames j with ``context`` frames up to j and ``horizon`` after."""
    lo, hi = context - 1, n - 1 - horizon
    if hi < lo:
        return []
    return sorted({int(round(x)) for x in np.linspace(lo, hi, starts)})


# ----------------------------------------------------------------------------- rollouts


def as_frame_predictor(predict: FramePredictor | Generator) -> FramePredictor:
    """A frame predictor (:func:`emu_world.dida.frame_predictor`: AR or DiDA); a bare
    :class:`~emu_world.generate.Generator` is token-by-token decoding."""
    return ARFramePredictor(predict) if isinstance(predict, Generator) else predict


def rollout(predict: FramePredictor | Generator, layout: SequenceLayout, spec: TaskSpec, ep: Episode,
            codes: np.ndarray, conds: list[Any], j: int, context: int, horizon: int,
            seed: int) -> tuple[np.ndarray, float]:
    """Predicted codes (horizon, h, w) of frames j+1..j+horizon from the true frames up to j and the
    true conditions, each step fed the model's own earlier predictions; and the generation seconds."""
    predict = as_frame_predictor(predict)
    window = list(codes[j - context + 1:j + 1])
    preds, seconds = [], 0.0
    for step in range(horizon):
        t = j + step  # the last frame in the window is frame t
        sample = build_sample(layout, spec, ep.text, np.stack(window), conds[t - len(window) + 1:t + 1], end=False)
        out = predict(sample.tokens, seed=seed + step)
        preds.append(out.codes)
        seconds += out.seconds
        window = (window + [out.codes])[-context:]
    return np.stack(preds), seconds


def frame_scores(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PSNR and SSIM of uint8 batches."""
    return psnr_per_frame(a, b).numpy(), ssim_per_frame(a, b).numpy()


@dataclass
class EncodedEpisode:
    """An episode with its tokenizer codes, their reconstruction and the conditions between frames."""

    episode: Episode
    codes: np.ndarray  # (n, h, w)
    recon: np.ndarray  # (n, H, W, 3) uint8: tokenizer.decode(codes), the ceiling
    conds: list[Any]  # (n-1) action bins (k, A) or command texts


@dataclass
class Rollout:
    """One imagined rollout: from true frame ``j`` of ``episode``, ``len(codes)`` frames ahead."""

    episode: int  # index into the encoded episodes
    start: int  # j
    codes: np.ndarray  # (H, h, w) predicted codes
    frames: np.ndarray  # (H, H_img, W_img, 3) uint8 decoded predictions


def encode_episodes(tokenizer, layout: SequenceLayout, spec: TaskSpec, episodes: list[Episode]) -> list[EncodedEpisode]:
    out = []
    for ep in episodes:
        codes = tokenizer.encode(ep.frames).numpy()  # (n, h, w)
        out.append(EncodedEpisode(ep, codes, tokenizer.decode(codes).numpy(), interval_conditions(layout, spec, ep)))
    return out


def training_samples(ex: Export, spec: TaskSpec, encoded: list[EncodedEpisode]) -> list[Sample]:
    """The episodes cut into training samples of ``data.frames_per_window`` frames (throughput)."""
    per = int(ex.manifest["config"]["data"]["frames_per_window"])
    samples = []
    for e in encoded:
        for a in range(0, len(e.codes) - 1, per - 1):
            b = min(a + per, len(e.codes))
            samples.append(build_sample(ex.layout, spec, e.episode.text, e.codes[a:b], e.conds[a:b - 1], end=True))
    return samples


def score_rollouts(predict: FramePredictor | Generator, tokenizer, ex: Export, spec: TaskSpec,
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
        raise ValueError(f"{spec.task}: no episode is long enough for {C} context frame(s) and {H} frames ahead "
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
def teacher_forced_codes(ex: Export, spec: TaskSpec, e: EncodedEpisode, j: int, context: int) -> np.ndarray:
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


def measure_task(predict: FramePredictor | Generator, tokenizer, ex: Export, spec: TaskSpec, episodes: list[Episode],
                 cfg: DictConfig) -> tuple[dict[str, Any], list[Sample]]:
    """Per-horizon metrics of one task, and its episodes as training samples (for the throughput)."""
    encoded = encode_episodes(tokenizer, ex.layout, spec, episodes)
    result, _ = score_rollouts(predict, tokenizer, ex, spec, encoded, cfg)
    return result, training_samples(ex, spec, encoded)


def rollout_strip(encoded: list[EncodedEpisode], r: Rollout) -> list[tuple[str, list[np.ndarray]]]:
    """Picture rows of one rollout: the context frame then the predicted frames; the context frame
    then the true frames."""
    ep = encoded[r.episode].episode
    H = len(r.codes)
    context = ep.frames[r.start]
    return [("predicted", [context, *r.frames]), ("true", [context, *ep.frames[r.start + 1:r.start + 1 + H]])]


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


@dataclass
class BenchSetup:
    """What every rollout benchmark (world_model, dida) opens from its config."""

    checkpoint: Path
    tokenizer: Any
    export: Export
    tasks: list[str]  # the tasks to measure, the headline first
    horizons: list[int]  # sorted
    vision: Sampling


def open_bench(cfg: DictConfig) -> BenchSetup:
    """Threads, the export and its tokenizer (code identity checked), the tasks, horizons and vision sampling
    of a rollout benchmark's config, with clear errors."""
    from emu_world.bench import resolve_path
    from emu_world.tokenizer import load_tokenizer

    torch.set_num_threads(int(cfg.threads))
    checkpoint = resolve_path(cfg.checkpoint)
    tokenizer = load_tokenizer(resolve_path(cfg.tokenizer))
    ex = load_export(checkpoint, tokenizer)
    names = [str(t) for t in cfg.tasks] if cfg.tasks else list(ex.tasks)
    missing = [t for t in names if t not in ex.tasks]
    if missing or not names:
        raise ValueError(f"the world model {checkpoint} was not trained on {missing or 'any simulator task'}; "
                         f"its simulator tasks: {sorted(ex.tasks)}; pass tasks=[...]")
    horizons = sorted({int(h) for h in cfg.horizons})
    if horizons[0] < 1 or int(cfg.context_frames) < 1 or int(cfg.starts) < 1:
        raise ValueError("horizons, context_frames and starts must be >= 1")
    return BenchSetup(checkpoint, tokenizer, ex, names, horizons,
                      Sampling(float(cfg.vision.temperature), int(cfg.vision.top_k)))


def bench_world_model(cfg: DictConfig) -> dict[str, Any]:
    from emu_world.bench import bench_output_dir, save_grid

    setup = open_bench(cfg)
    checkpoint, tokenizer, ex, names = setup.checkpoint, setup.tokenizer, setup.export, setup.tasks
    horizons, vision = setup.horizons, setup.vision
    decoding = frame_decoding_config(cfg, ex.manifest, vision)
    noise = export_noise_path(ex.manifest, ex.layout, tokenizer) if decoding.decoding == "dida" else None
    if decoding.decoding == "dida" and not ex.manifest.get("dida"):
        print(f"warning: {checkpoint} was not DiDA-adapted, so decoding=dida measures a sampler it was never "
              "trained for; adapt it first (python -m emu_world.train stage=dida init=<export>) or use decoding=ar")
    per_task, samples, strips = {}, [], []
    for name in names:
        spec = ex.tasks[name]
        t0 = time.perf_counter()
        episodes = record_episodes(spec, int(tokenizer.image_size), int(cfg.seed), int(cfg.episodes),
                                   cfg.max_episode_steps)
        t1 = time.perf_counter()
        predict = frame_predictor(ex.model, ex.layout, decoding, spec.action_dim, noise)
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
    head = str(cfg.headline_task) if str(cfg.headline_task) in per_task else names[0]
    rows = per_task[head]["horizons"]
    summary: dict[str, Any] = {
        "benchmark": "world_model", "checkpoint": str(checkpoint), "tokenizer": tokenizer.identity(),
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
        "frame_decoding": "ar" if decoding.decoding == "ar" else
        f"dida K={decoding.dida.steps} ({decoding.dida.update}, start={decoding.dida.start})",
        "context_frames": int(cfg.context_frames), "horizons": horizons, "seed": int(cfg.seed),
        "episodes": int(cfg.episodes), "starts": int(cfg.starts), "per_task": per_task,
    }
    if cfg.get("picture"):
        columns = ["context"] + [f"+{h}" for h in range(1, max(horizons) + 1)]
        summary["picture"] = str(save_grid(bench_output_dir(cfg) / "strip.png", strips, columns))
    print_table(summary)
    return summary


def frame_decoding_config(cfg: DictConfig, manifest: dict[str, Any], vision: Sampling) -> FrameDecodingConfig:
    """``decoding`` (ar | dida) and ``dida.steps`` / ``update`` / ``start`` / ``start_time`` (null: the
    export's defaults)."""
    defaults = export_sampler_config(manifest)
    dida = cfg.get("dida") or {}
    steps = dida.get("steps") if dida.get("steps") is not None else defaults.steps
    update = dida.get("update") if dida.get("update") is not None else defaults.update
    start = dida.get("start") if dida.get("start") is not None else defaults.start
    start_time = dida.get("start_time") if dida.get("start_time") is not None else defaults.start_time
    return FrameDecodingConfig(str(cfg.get("decoding", "ar")), vision, cfg.get("cfg_scale"),
                               SamplerConfig(int(steps), str(update), str(start), float(start_time)))


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
