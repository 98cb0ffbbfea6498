"""The world model as an environment, and the simulator episodes it is measured on.

    ex = load_export("checkpoints/world_model", tokenizer)          # model, layout, tasks it was trained on
    spec = ex.tasks["aloha_fold"]                                   # tag, camera, frame stride, action binner
    predict = ex.export.frame_predictor(ex.model, ex.layout, ex.export.decoding("dida"), tokenizer,
                                        spec.action_dim)
    env = WorldModelEnv(ex.layout, spec, predict, "fold the cloth in half", context_frames=2, tokenizer=tokenizer)
    env.reset(frames)                       # the last observed frames (or their codes), oldest first
    out = env.step(action_bins)             # (k, A) action bins, or a command text: the imagined next frame
    out.codes, out.frame                    # (h, w) codes and, with a tokenizer, the decoded uint8 image

:class:`WorldModelEnv` keeps a bounded window of ``context_frames`` frames and the conditions
between them (the oldest dropped first) and rebuilds the prompt from them at every step, so the
token stream is always a valid sample of the layout; decoding is AR or DiDA (the frame predictor);
every step is seeded. Benchmarks (``bench world_model``, ``bench dida``) roll it out along recorded
expert episodes (:func:`rollout`); the planner and the exploration demo step it with their own
conditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from emu_world.config import CONFIG_DIR, EnvConfig, resolve_path, to_dataclass
from emu_world.data.sequences import span_steps
from emu_world.errors import UserError
from emu_world.models.dida import ARFramePredictor, FramePrediction, FramePredictor
from emu_world.models.export import WorldModelExport
from emu_world.models.generate import Generator, Sampling
from emu_world.models.layout import ActionBinner, Sample, SequenceLayout
from emu_world.models.tokenizer import ImageTokenizer, load_tokenizer
from emu_world.models.world_model import WorldModel


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
class LoadedExport:
    """A world-model export loaded for imagining: the model, its layout, and the simulator tasks of its
    training data (how it saw each one)."""

    export: WorldModelExport
    layout: SequenceLayout
    model: WorldModel
    tasks: dict[str, TaskSpec]  # every simulator task of the training data

    @property
    def path(self) -> Path:
        return self.export.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.export.manifest

    def spec(self, task: str) -> TaskSpec:
        """How the model saw ``task``; a task outside its training data is refused with the ones it knows."""
        if task not in self.tasks:
            raise UserError(f"the world model {self.path} was not trained on {task}; its simulator tasks: "
                            f"{sorted(self.tasks)}; pass checkpoint=<an export trained on {task}>")
        return self.tasks[task]

    def predictor(self, spec: TaskSpec, decoding: str = "dida", tokenizer: ImageTokenizer | None = None,
                  steps: int | None = None, vision: Sampling | None = None, start: str | None = None) -> FramePredictor:
        """The next-frame decoder of ``spec``'s stream: token by token (``ar``) or DiDA at ``steps`` passes
        from ``start`` (None: the export's recorded K and start), greedy unless ``vision`` says otherwise."""
        sampler = {"steps": steps, "start": start} if decoding == "dida" else {}
        config = self.export.decoding(decoding, vision, **sampler)
        return self.export.frame_predictor(self.model, self.layout, config, tokenizer, spec.action_dim)


def task_specs(export: WorldModelExport) -> dict[str, TaskSpec]:
    """How the export saw each simulator task of its training data (datasets this checkout cannot
    simulate are left out)."""
    import envs

    strides = export.config["data"]["frame_stride"]
    tasks = {}
    for entry in export.data_entries():
        name = simulated_task(entry)
        if name is None:
            continue  # a dataset this checkout cannot simulate
        commands = getattr(envs.task_spec(name).env_cls(), "commands", None)
        tasks[name] = TaskSpec(name, str(entry["embodiment"]),
                               str(entry["cameras"][0]).removeprefix("observation.images."),
                               int(strides[entry["embodiment"]]), export.binner(str(entry["name"])),
                               tuple(commands) if commands else None)
    return tasks


def task_checkpoint(task: str, decoding: str = "dida") -> str:
    """The world model a task's commands use by default (``checkpoint=auto``): the task's own export
    ``checkpoints/world_model_<task>`` when it is there and can decode this way (DiDA needs an adapted
    export), else the default ``checkpoints/world_model`` (trained on every task)."""
    own = f"checkpoints/world_model_{task}"
    there = (resolve_path(own) / "manifest.json").is_file()
    if there and (decoding != "dida" or WorldModelExport.read(own).dida_adapted):
        return own
    return "checkpoints/world_model"


def simulated_task(entry: dict[str, Any]) -> str | None:
    """The simulator task of a training-data entry: its dataset name when that is a task, else the env
    its recording names (``meta/emu_world.json``), else None."""
    import json

    name = str(entry["name"])
    if (CONFIG_DIR / "env" / f"{name}.yaml").is_file():
        return name
    provenance = Path(str(entry.get("root", ""))) / "meta" / "emu_world.json"
    if entry.get("root") and provenance.is_file():
        env = json.loads(provenance.read_text()).get("env")
        if env and (CONFIG_DIR / "env" / f"{env}.yaml").is_file():
            return str(env)
    return None


def load_export(checkpoint: str | Path, tokenizer: ImageTokenizer) -> LoadedExport:
    """The world-model folder written by ``train stage=world_model|dida``: model, layout, binners, strides;
    refuses a tokenizer other than the one it was trained on."""
    export = WorldModelExport.read(checkpoint)
    export.check_tokenizer(tokenizer)
    layout = export.layout(tokenizer)
    return LoadedExport(export, layout, export.load_model(layout), task_specs(export))


def load_for_task(checkpoint: str, tokenizer: str | None, task: str,
                  decoding: str = "dida") -> tuple[ImageTokenizer, LoadedExport, TaskSpec]:
    """The tokenizer, export and task spec a command on one task opens: ``checkpoint="auto"`` is
    :func:`task_checkpoint`, ``tokenizer=None`` the one the export records."""
    folder = task_checkpoint(task, decoding) if checkpoint == "auto" else checkpoint
    path = resolve_path(tokenizer) if tokenizer else WorldModelExport.read(folder).tokenizer_path
    tok = load_tokenizer(path)
    ex = load_export(folder, tok)
    return tok, ex, ex.spec(task)


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
    from emu_world.episodes import run_episode

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
    prompt = layout.task_prompt(spec.tag, text)
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


def as_frame_predictor(predict: FramePredictor | Generator) -> FramePredictor:
    """A frame predictor (:func:`emu_world.models.dida.frame_predictor`: AR or DiDA); a bare
    :class:`~emu_world.models.generate.Generator` is token-by-token decoding."""
    return ARFramePredictor(predict) if isinstance(predict, Generator) else predict


def rollout(predict: FramePredictor | Generator, layout: SequenceLayout, spec: TaskSpec, ep: Episode,
            codes: np.ndarray, conds: list[Any], j: int, context: int, horizon: int,
            seed: int) -> tuple[np.ndarray, float]:
    """Predicted codes (horizon, h, w) of frames j+1..j+horizon from the true frames up to j and the
    true conditions, each step fed the model's own earlier predictions; and the generation seconds."""
    env = WorldModelEnv(layout, spec, predict, ep.text, context)
    env.reset(codes=codes[j - context + 1:j + 1], conds=conds[j - context + 1:j])
    preds, seconds = [], 0.0
    for step in range(horizon):
        out = env.step(conds[j + step], seed=seed + step)
        preds.append(out.codes)
        seconds += out.seconds
    return np.stack(preds), seconds


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


@dataclass
class ImaginedFrame:
    """One step of the world-model environment."""

    codes: np.ndarray  # (h, w) the imagined frame's codes
    frame: np.ndarray | None  # (H, W, 3) uint8, decoded when the environment has a tokenizer
    seconds: float  # decoding time (prompt prefill included, tokenizer decode excluded)
    forward_passes: int


class WorldModelEnv:
    """The world model as an environment: ``reset(frames) -> None``, ``step(condition) -> ImaginedFrame``.

    ``condition`` is what happens after the last frame: (actions_per_frame, A) action bins for a robot
    task, or a command text for exploration (``spec.commands``). The window holds the last
    ``context_frames`` frames (true ones from :meth:`reset`, then imagined ones) and the condition after
    each of them but the last; the oldest frame and its condition go first."""

    def __init__(self, layout: SequenceLayout, spec: TaskSpec, predict: FramePredictor | Generator, text: str,
                 context_frames: int = 1, tokenizer: ImageTokenizer | None = None):
        if context_frames < 1:
            raise ValueError(f"context_frames must be >= 1, got {context_frames}")
        self.layout, self.spec, self.text = layout, spec, text
        self.predict = as_frame_predictor(predict)
        self.context, self.tokenizer = int(context_frames), tokenizer
        self.codes: list[np.ndarray] = []  # (h, w) each, oldest first
        self.conds: list[Any] = []  # the condition after each frame but the last

    def reset(self, frames: np.ndarray | None = None, codes: np.ndarray | None = None,
              conds: list[Any] | None = None) -> None:
        """Start from observed ``frames`` (n, H, W, 3) uint8 (encoded with the tokenizer) or their ``codes``
        (n, h, w), oldest first, with the ``conds`` between them (n - 1 of them); the window keeps the
        last ``context_frames``."""
        if codes is None:
            if frames is None or self.tokenizer is None:
                raise ValueError("reset needs codes, or frames and a tokenizer")
            codes = self.tokenizer.encode(np.asarray(frames)).numpy()
        codes, conds = np.asarray(codes), list(conds or [])
        if len(codes) < 1 or len(conds) != len(codes) - 1:
            raise ValueError(f"reset: {len(codes)} frames need {len(codes) - 1} conditions between them, "
                             f"got {len(conds)}")
        self.codes = list(codes[-self.context:])
        self.conds = self._last_conds(conds)

    def _last_conds(self, conds: list[Any]) -> list[Any]:
        """The conditions after the window's frames but the last (one fewer than the frames)."""
        return conds[len(conds) - (len(self.codes) - 1):]

    def prompt(self, condition: Any) -> Sample:
        """The sample the model continues: the window's frames, the conditions between them and ``condition``."""
        return build_sample(self.layout, self.spec, self.text, np.stack(self.codes), [*self.conds, condition], end=False)

    def check_condition(self, condition: Any) -> None:
        """Refuse a command text the model never saw (exploration): each of its ", "-joined parts must be
        one of ``spec.commands``, so a typo fails here rather than prompting the model with unseen text."""
        if self.spec.commands is None:
            return
        parts = condition.split(", ") if isinstance(condition, str) else [condition]
        unknown = [p for p in parts if p not in self.spec.commands]
        if unknown:
            raise ValueError(f"{self.spec.task}: unknown command(s) {unknown}; the commands are "
                             f"{list(self.spec.commands)}")

    @property
    def window(self) -> int:
        """Frames in the context window now (at most ``context_frames``)."""
        return len(self.codes)

    def step(self, condition: Any, seed: int = 0) -> ImaginedFrame:
        """Imagine the frame after ``condition``; it joins the window (the oldest frame leaves when full)."""
        if not self.codes:
            raise RuntimeError("WorldModelEnv.step before reset")
        self.check_condition(condition)
        out: FramePrediction = self.predict(self.prompt(condition).tokens, seed=seed)
        self.codes = (self.codes + [out.codes])[-self.context:]
        self.conds = self._last_conds([*self.conds, condition])
        frame = self.tokenizer.decode(out.codes[None]).numpy()[0] if self.tokenizer is not None else None
        return ImaginedFrame(out.codes, frame, out.seconds, out.forward_passes)
