"""World-model training data: cached code grids + actions + text -> packed rows of the three kinds.

    data = to_dataclass(DataConfig, cfg.data)                        # configs/data/<name>.yaml
    layout = SequenceLayout.from_config(layout_cfg, tok.codebook_size, tok.grid)
    train = MixtureDataset(data, layout, tok.identity(), split="train")
    loader = DataLoader(train, batch_size=None, num_workers=2)      # yields Batch, already packed
    for batch in loader:
        loss, logs = model(**model.packed_inputs(batch.packed))
    heldout = MixtureDataset(data, layout, tok.identity(), split="heldout", num_batches=8)
    metrics = HeldoutMetrics(); metrics.update(model.logits(...), batch); metrics.result()
    train.binners                                                   # save them beside the checkpoint

Sources. Every dataset is a local LeRobot v3.0 folder (:class:`RobotDataset`) whose frames were
encoded once by ``python -m emu_world.data.tokenize <root>`` into its token cache
(:func:`~emu_world.data.tokenize.token_cache_dir`; ``token_cache`` in the config moves it). A
dataset yields two kinds of samples:

- its *motion* kind: ``dynamics`` (frames and the binned actions between them) for a robot, or
  ``exploration`` (frames and the command texts between them) when the env recorded in its
  provenance has a ``commands`` tuple (``envs.explore_room.ExploreRoomEnv.commands``; the dataset
  stores the command index as a float action of shape (1,));
- ``plan`` (Emu3.5's embodied format) when it has subtask annotations: the frame o_t at a random
  step inside subtask i, then the texts of subtasks i, i+1, ... (at most ``max_plan_subtasks``),
  each followed by its keyframe (the first frame of the next subtask; the last frame for the last).

Mixture. A draw picks a dataset by ``weight`` (normalised over datasets), then a kind among the
dataset's kinds by ``kind_weights`` (normalised over the kinds it has), then an episode of the
split uniformly, a camera uniformly, and a position uniformly. ``MixtureDataset.probabilities``
lists the resulting (dataset, kind) shares. A positive ``plan`` weight with an unannotated dataset
is a warning, and that dataset's draws all go to its motion kind; a dataset left with no kind of
positive weight is an error.

Frame rates. Dynamics and exploration windows hold ``frames_per_window`` frames taken every
``frame_stride[tag]`` env steps and never cross the episode end (a short episode gives a shorter
window, at least 2 frames). The layout's ``actions_per_frame`` k is the number of actions in each
span; the span between frames t and t+s holds the actions at steps ``t + (j+1)*s/k - 1`` for
j < k, i.e. the last action of each of k equal sub-intervals, so ``s`` must be a multiple of k.
Shipped defaults (k=1): ALOHA 50 Hz, stride 10 -> 5 Hz frames, one 14-D joint target per frame
(absolute targets: the last one is where the arms head at the next frame); WidowX 5 Hz, stride 1
-> every 7-D EE-delta action is kept (deltas must not be subsampled: keep ``s == k`` for them);
explore 10 Hz, stride 1 -> one command per frame, as the interactive explorer plays (a larger
stride joins the commands of an interval with ", ").

Actions of several robots in one model. Each dataset has its own :class:`ActionBinner`, fitted on
its lerobot statistics (q01/q99 per dimension, ``layout.action_range``), because dimensions and
ranges differ (ALOHA 14, WidowX 7). The bin tokens are one shared vocabulary range; a span holds
``k * A`` bins, and the layout's grammar learns the span length from the first span of a stream,
so every sample (one stream) holds one robot's actions only. Which robot it is, is said in text:
every prompt starts with the dataset's embodiment tag (``"aloha: fold the cloth ..."``, the tag
being ``robot_type`` from meta/info.json unless configured), so one model serves all robots; at
generation time the caller passes the robot's ``action_dim`` and decodes with its binner. The
shipped byte-level BPE encodes any tag (an unknown word falls back to byte tokens, e.g. "widowx:"
costs a few more tokens until the BPE file is rebuilt).

Splits. The last ``ceil(heldout_fraction * N)`` episodes of each dataset are held out (at least one
when the fraction is positive); training draws never touch them.

Determinism and workers. Batch ``b`` of a split is a pure function of ``(seed, split, b)``: it
is filled by drawing samples from ``numpy.random.default_rng((seed, split, b))`` and packing them
first-fit into ``rows`` rows of ``max_len`` tokens (``SequenceLayout.pack``, which never splits an
image or an action span) until ``FILL_PATIENCE`` draws in a row do not fit. So the stream of
batches is the same for any number of DataLoader workers or ranks, which take interleaved batch
indices; the token stores reopen lazily in each worker.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from emu_world.data.robot_dataset import Episode, RobotDataset, Subtask
from emu_world.data.token_store import TokenStore
from emu_world.data.tokenize import open_token_store, token_cache_dir
from emu_world.errors import UserError
from emu_world.models.layout import (
    ActionBinner,
    LayoutError,
    Packed,
    Role,
    Sample,
    SampleKind,
    SequenceLayout,
)

KINDS = tuple(SampleKind)  # dynamics, plan, exploration; index = kind id in Batch.token_kinds()
SPLITS = ("train", "heldout")
FILL_PATIENCE = 4  # consecutive draws that do not fit before a batch is closed


@dataclass
class DatasetSpec:
    """One dataset of the mixture (an entry of ``data.datasets``; a plain string is its root)."""

    root: str
    weight: float = 1.0  # share of draws, normalised over datasets
    tag: str | None = None  # embodiment tag prefixed to every prompt; None: meta/info.json robot_type
    cameras: list[str] | None = None  # cameras to draw from (short names or keys); None: all

    def __post_init__(self) -> None:
        self.root = str(self.root)
        if not math.isfinite(float(self.weight)) or self.weight < 0:
            raise ValueError(f"data.datasets: weight of {self.root} must be a finite number >= 0, got {self.weight}")
        if self.tag is not None and not str(self.tag).strip():
            raise ValueError(f"data.datasets: tag of {self.root} must be non-empty text or null")


@dataclass
class DataConfig:
    """``configs/data/<name>.yaml``: which datasets, which kinds, how samples are cut and packed."""

    datasets: list[Any] = field(default_factory=list)  # DatasetSpec, a dict of its fields, or a root path
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {"dynamics": 1.0, "plan": 0.5, "exploration": 1.0})
    frame_stride: dict[str, int] = field(
        default_factory=lambda: {"aloha": 10, "widowx": 1, "explore": 1})  # env steps between frames, per tag
    frames_per_window: int = 6  # frames of a dynamics / exploration sample
    max_plan_subtasks: int = 5  # subtask + keyframe pairs after o_t in a plan sample
    max_len: int = 2048  # tokens per packed row
    rows: int = 4  # packed rows per batch
    heldout_fraction: float = 0.1  # last fraction of each dataset's episodes held out
    seed: int = 0
    token_cache: str | None = None  # null: <root>/tokens; else <token_cache>/<name>-<hash>
    cond_dropout: float = 0.0  # training draws whose conditioning is dropped (classifier-free guidance)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("data.datasets is empty: list at least one dataset root "
                             "(e.g. data.datasets=[datasets/aloha_fold])")
        specs = []
        for entry in self.datasets:
            if isinstance(entry, DatasetSpec):
                specs.append(entry)
            elif isinstance(entry, (str, Path)):
                specs.append(DatasetSpec(str(entry)))
            elif isinstance(entry, dict):
                unknown = sorted(set(entry) - set(DatasetSpec.__dataclass_fields__))
                if unknown:
                    raise ValueError(f"data.datasets entry {entry}: unknown key(s) {unknown}; valid: "
                                     f"{sorted(DatasetSpec.__dataclass_fields__)}")
                specs.append(DatasetSpec(**entry))
            else:
                raise ValueError(f"data.datasets entries must be a root path or a mapping, got {entry!r}")
        self.datasets = specs
        roots = [str(Path(s.root).resolve()) for s in specs]
        if len(set(roots)) != len(roots):
            raise ValueError(f"data.datasets lists a dataset twice: {[s.root for s in specs]}")
        if sum(s.weight for s in specs) <= 0:
            raise ValueError("data.datasets: all dataset weights are 0")
        names = {k.value for k in KINDS}
        unknown = sorted(set(self.kind_weights) - names)
        if unknown:
            raise ValueError(f"data.kind_weights: unknown kind(s) {unknown}; kinds are {sorted(names)}")
        self.kind_weights = {k: float(self.kind_weights.get(k, 0.0)) for k in sorted(names)}
        weights = self.kind_weights.values()
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
            raise ValueError(f"data.kind_weights must be finite, >= 0 and not all 0, got {self.kind_weights}")
        self.frame_stride = {str(k): int(v) for k, v in self.frame_stride.items()}
        bad = {k: v for k, v in self.frame_stride.items() if v < 1}
        if bad:
            raise ValueError(f"data.frame_stride must be >= 1 env steps, got {bad}")
        if self.frames_per_window < 2:
            raise ValueError(f"data.frames_per_window must be >= 2 (a frame and the next), "
                             f"got {self.frames_per_window}")
        if self.max_plan_subtasks < 1:
            raise ValueError(f"data.max_plan_subtasks must be >= 1, got {self.max_plan_subtasks}")
        if self.max_len < 1 or self.rows < 1:
            raise ValueError(f"data.max_len and data.rows must be >= 1, got {self.max_len} and {self.rows}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"data.cond_dropout must be in [0, 1), got {self.cond_dropout}")


# ----------------------------------------------------------------------------- typed records


@dataclass
class EpisodeTokens:
    """One episode as the world model reads it: codes from the token store, not pixels."""

    dataset: str  # source name
    index: int  # episode index in the dataset
    task: str  # instruction, without the tag
    embodiment: str  # tag, e.g. "aloha"
    actions: np.ndarray  # (T, A) float32
    subtasks: list[Subtask]  # empty when unannotated
    store: TokenStore
    cameras: tuple[str, ...]  # full keys, e.g. "observation.images.top"

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    @property
    def prompt(self) -> str:
        """The task text the model sees: ``"<tag>: <task>"`` (:meth:`SequenceLayout.task_prompt`)."""
        return SequenceLayout.task_prompt(self.embodiment, self.task)

    def codes(self, camera: str, frames: np.ndarray | None = None) -> np.ndarray:
        """(n, h, w) int64 codes of ``frames`` (all T frames when None) for one camera."""
        return self.store.read(self.index, camera, frames)


@dataclass
class DrawnSample:
    """A sample and where it came from (for tests, logs and per-source metrics)."""

    sample: Sample
    dataset: str
    episode: int
    camera: str
    frames: np.ndarray  # (F,) int64 episode frame index of each image of the sample, in order
    steps: np.ndarray  # (S,) int64 env steps whose actions the sample holds (binned or as commands)

    @property
    def kind(self) -> SampleKind:
        return self.sample.kind


@dataclass
class Batch:
    """Samples packed into ``rows`` rows of ``max_len``; the world model reads ``packed``."""

    packed: Packed  # (R, L) arrays; documents[:, 3] indexes ``samples``
    samples: list[DrawnSample]

    @property
    def kinds(self) -> list[SampleKind]:
        return [s.kind for s in self.samples]

    def token_kinds(self) -> np.ndarray:
        """(R, L) int64 index into :data:`KINDS` of each token's sample; -1 on padding."""
        out = np.full(self.packed.tokens.shape, -1, dtype=np.int64)
        for row, start, length, si, _ in self.packed.documents:
            out[row, start:start + length] = KINDS.index(self.samples[si].kind)
        return out

    def next_frame_mask(self) -> np.ndarray:
        """(R, L) bool: vision codes of every image except the first of each sample (the given
        observation), i.e. the frames the model must predict from context."""
        p = self.packed
        mask = p.roles == Role.VISION
        for row, start, length, _, offset in p.documents:
            if offset != 0:
                continue  # a later piece of a cut sample: its images are all predicted ones
            spans = p.image_spans  # (F, 3): row, start, end
            inside = (spans[:, 0] == row) & (spans[:, 1] >= start) & (spans[:, 2] <= start + length)
            if inside.any():
                r, a, b = spans[np.flatnonzero(inside)[np.argmin(spans[inside, 1])]]  # the document's first image
                mask[r, a:b] = False
        return mask


# ----------------------------------------------------------------------------- sample builders


def window_frames(length: int, start: int, n_frames: int, stride: int) -> np.ndarray:
    """(n,) frame indices ``start, start+stride, ...`` that fit in an episode of ``length``."""
    n = min(n_frames, (length - 1 - start) // stride + 1)
    if start < 0 or n < 2:
        raise ValueError(f"a window of 2+ frames every {stride} steps does not fit from step {start} in {length} steps")
    return start + stride * np.arange(n, dtype=np.int64)


def span_steps(frames: np.ndarray, stride: int, k: int) -> np.ndarray:
    """((n-1)*k,) action steps between consecutive frames: the last step of each of k equal
    sub-intervals of every frame interval."""
    if stride % k:
        raise ValueError(f"frame stride {stride} must be a multiple of actions_per_frame k={k}")
    r = stride // k
    return (frames[:-1, None] + (np.arange(k)[None, :] + 1) * r - 1).reshape(-1)  # (n-1, k) -> ((n-1)*k,)


def dynamics_sample(layout: SequenceLayout, ep: EpisodeTokens, camera: str, frames: np.ndarray, stride: int,
                    binner: ActionBinner) -> DrawnSample:
    """``BOS DYN "<tag>: task" f0 a.. f1 a.. ... f_{n-1} EOS`` for the given frame indices."""
    steps = span_steps(frames, stride, layout.config.actions_per_frame)  # ((n-1)*k,)
    bins = binner.encode(ep.actions[steps])  # ((n-1)*k, A)
    sample = layout.dynamics(ep.prompt, ep.codes(camera, frames), bins)
    return DrawnSample(sample, ep.dataset, ep.index, camera, frames, steps)


def plan_sample(layout: SequenceLayout, ep: EpisodeTokens, camera: str, t: int, subtask: int,
                max_subtasks: int) -> DrawnSample:
    """``BOS PLAN "<tag>: task" o_t subtask_i keyframe_i subtask_{i+1} keyframe_{i+1} ... EOS``."""
    if not ep.subtasks[subtask].start_frame <= t <= ep.subtasks[subtask].end_frame:
        raise ValueError(f"step {t} is not inside subtask {subtask} of episode {ep.index}")
    todo = ep.subtasks[subtask:subtask + max_subtasks]
    keys = np.asarray([s.keyframe for s in todo], dtype=np.int64)  # (m,)
    frames = np.concatenate([[t], keys]).astype(np.int64)  # (1 + m,)
    codes = ep.codes(camera, frames)  # (1 + m, h, w)
    sample = layout.plan(ep.prompt, codes[0], [s.text for s in todo], codes[1:])
    return DrawnSample(sample, ep.dataset, ep.index, camera, frames, np.zeros(0, dtype=np.int64))


def exploration_sample(layout: SequenceLayout, ep: EpisodeTokens, camera: str, frames: np.ndarray,
                       commands: Sequence[str]) -> DrawnSample:
    """``BOS EXPLORE "<tag>: scene" f0 "command" f1 ... EOS``; the text between two frames is the
    command of every step in between (joined with ", " when the stride is above 1)."""
    steps = np.arange(frames[0], frames[-1], dtype=np.int64)  # every step from f0 to the last frame
    index = np.rint(ep.actions[:, 0]).astype(np.int64)  # (T,) command index per step
    texts = [", ".join(commands[c] for c in index[a:b]) for a, b in zip(frames[:-1], frames[1:])]
    sample = layout.exploration(ep.prompt, ep.codes(camera, frames), texts)
    return DrawnSample(sample, ep.dataset, ep.index, camera, frames, steps)


# ----------------------------------------------------------------------------- one dataset


def _env_commands(provenance: dict[str, Any]) -> tuple[str, ...] | None:
    """The command names of the env that recorded the dataset, if it is command-driven."""
    name = provenance.get("env")
    if not name:
        return None
    import envs  # local: importing envs registers gymnasium ids

    try:
        env_cls = envs.task_spec(name).env_cls()
    except KeyError:
        return None  # recorded by an env this checkout does not have: treat as a robot
    commands = getattr(env_cls, "commands", None)
    return tuple(commands) if commands else None


class DatasetSource:
    """One dataset prepared for drawing: its episodes' metadata, binner, kinds and split.

    Opening reads the lerobot metadata and checks that the token cache holds every (episode,
    camera) with the right length for ``tokenizer_id``; codes are read lazily per draw.
    """

    def __init__(self, spec: DatasetSpec, name: str, config: DataConfig, layout: SequenceLayout, tokenizer_id: str):
        self.spec, self.name, self.layout = spec, name, layout
        self.frames_per_window = config.frames_per_window
        self.max_plan_subtasks = config.max_plan_subtasks
        ds = RobotDataset(spec.root, cameras=spec.cameras, check_videos=False)
        self.root = ds.root
        self.fps = ds.fps
        self.cameras = tuple(ds.camera_keys)
        tag = spec.tag or ds.info.get("robot_type")
        if not tag:
            raise UserError(f"{ds.root}: meta/info.json has no robot_type; give the dataset an embodiment tag "
                             f"(data.datasets=[{{root: {spec.root}, tag: <robot>}}])")
        self.embodiment = str(tag)
        if self.embodiment not in config.frame_stride:
            raise UserError(f"{ds.root}: no data.frame_stride for embodiment {self.embodiment!r} ({self.fps:g} Hz); "
                             f"add it, e.g. data.frame_stride.{self.embodiment}=<env steps between frames>")
        self.frame_stride = config.frame_stride[self.embodiment]
        self.commands = _env_commands(ds.provenance)
        motion = SampleKind.EXPLORATION if self.commands else SampleKind.DYNAMICS
        k = layout.config.actions_per_frame
        if motion == SampleKind.DYNAMICS and self.frame_stride % k:
            raise UserError(f"{ds.root}: data.frame_stride.{self.embodiment}={self.frame_stride} is not a multiple of "
                             f"layout.actions_per_frame={k}; each action span holds k actions per frame step")
        self.kind_probs = self._kind_probs(motion, ds.has_annotations, config.kind_weights)
        robot = motion == SampleKind.DYNAMICS
        self.binner = layout.binner_from_stats(ds.lerobot.meta.stats["action"]) if robot else None

        store = open_token_store(ds.root, tokenizer_id, config.token_cache, grid=layout.grid)
        episodes = [ds.episode(i, decode=False) for i in range(ds.num_episodes)]
        self._check_cache(store, episodes, config.token_cache)
        if self.commands:
            self._check_commands(episodes)
        self.episodes = [EpisodeTokens(name, e.index, e.task, self.embodiment, e.actions, e.subtasks, store,
                                       self.cameras) for e in episodes]
        texts = {e.prompt for e in self.episodes} | {s.text for e in self.episodes for s in e.subtasks}
        for text in texts | set(self.commands or ()):
            layout.encode_text(text)  # LayoutError now for a text longer than layout.max_text_tokens
        self.split_episodes = self._split(config.heldout_fraction)
        self._eligible = {(split, kind): [e for e in eps if self._usable(e, kind)]
                          for split, eps in self.split_episodes.items() for kind in self.kind_probs}
        for (split, kind), eps in self._eligible.items():
            if self.split_episodes[split] and not eps:
                raise UserError(f"{self.root}: no {split} episode is long enough for a {kind.value} sample "
                                 f"(2 frames {self.frame_stride} steps apart)")

    def _kind_probs(self, motion: SampleKind, annotated: bool,
                    kind_weights: dict[str, float]) -> dict[SampleKind, float]:
        """This dataset's kinds (its motion kind, plus plan when annotated) and their shares."""
        weights = {motion: kind_weights[motion.value]}
        if annotated:
            weights[SampleKind.PLAN] = kind_weights[SampleKind.PLAN.value]
        elif kind_weights[SampleKind.PLAN.value] > 0:
            warnings.warn(f"dataset {self.name} ({self.root}) has no subtask annotations: no plan samples; its "
                          f"draws all go to {motion.value}", UserWarning, stacklevel=4)
        weights = {kind: w for kind, w in weights.items() if w > 0}
        if not weights:
            raise UserError(f"dataset {self.name} ({self.root}) yields nothing: data.kind_weights gives 0 to "
                             f"{motion.value}{' and plan' if annotated else ''}")
        total = sum(weights.values())
        return {kind: w / total for kind, w in weights.items()}

    def _check_cache(self, store: TokenStore, episodes: list[Episode], token_cache: str | None) -> None:
        missing = [(e.index, cam) for e in episodes for cam in self.cameras if not store.has(e.index, cam, e.length)]
        if missing:
            cache = f" --cache-root {token_cache}" if token_cache else ""
            raise UserError(
                f"{self.root}: the token cache {token_cache_dir(self.root, token_cache) / store.tokenizer_id} lacks "
                f"{len(missing)} of {len(episodes) * len(self.cameras)} (episode, camera) entries (first "
                f"{missing[:3]}); run `python -m emu_world.data.tokenize {self.spec.root} --tokenizer <the tokenizer "
                f"folder>{cache}`"
            )

    def _check_commands(self, episodes: list[Episode]) -> None:
        assert self.commands is not None
        for e in episodes:
            index = np.rint(e.actions[:, 0])
            if e.actions.shape[1] != 1 or index.min() < 0 or index.max() >= len(self.commands):
                raise UserError(f"{self.root}: episode {e.index} actions are not command indices "
                                 f"0..{len(self.commands) - 1} of shape (T, 1)")

    def _split(self, heldout_fraction: float) -> dict[str, list[EpisodeTokens]]:
        """The last ``ceil(fraction * N)`` episodes are held out (none when the fraction is 0)."""
        n = len(self.episodes)
        held = math.ceil(heldout_fraction * n) if heldout_fraction > 0 else 0
        if n - held < 1:
            raise UserError(f"{self.root}: {n} episode(s) cannot be split with heldout_fraction="
                             f"{heldout_fraction}: record more episodes or set data.heldout_fraction=0")
        return {"train": self.episodes[:n - held], "heldout": self.episodes[n - held:]}

    def _usable(self, ep: EpisodeTokens, kind: SampleKind) -> bool:
        return bool(ep.subtasks) if kind == SampleKind.PLAN else ep.length > self.frame_stride

    def draw(self, kind: SampleKind, split: str, rng: np.random.Generator) -> DrawnSample:
        """One random sample of ``kind`` from the ``split`` episodes."""
        eps = self._eligible[(split, kind)]
        ep = eps[int(rng.integers(len(eps)))]
        camera = self.cameras[int(rng.integers(len(self.cameras)))]
        if kind == SampleKind.PLAN:
            i = int(rng.integers(len(ep.subtasks)))
            s = ep.subtasks[i]
            last = max(s.start_frame, min(s.end_frame, s.keyframe - 1))  # o_t before the keyframe when possible
            t = int(rng.integers(s.start_frame, last + 1))
            return plan_sample(self.layout, ep, camera, t, i, self.max_plan_subtasks)
        span = (self.frames_per_window - 1) * self.frame_stride
        start = int(rng.integers(max(ep.length - span, 1)))  # full windows when they fit, else from 0
        start = min(start, ep.length - 1 - self.frame_stride)
        frames = window_frames(ep.length, start, self.frames_per_window, self.frame_stride)
        if kind == SampleKind.EXPLORATION:
            assert self.commands is not None
            return exploration_sample(self.layout, ep, camera, frames, self.commands)
        assert self.binner is not None
        return dynamics_sample(self.layout, ep, camera, frames, self.frame_stride, self.binner)


# ----------------------------------------------------------------------------- the mixture


def collate(layout: SequenceLayout, samples: Sequence[DrawnSample], max_len: int, rows: int) -> Batch:
    """Pack samples first-fit into exactly ``rows`` rows of ``max_len`` (PAD rows appended);
    images and action spans are never split. Raises ``LayoutError`` if they need more rows."""
    packed = layout.pack([s.sample for s in samples], max_len)
    R = packed.tokens.shape[0]
    if R > rows:
        raise LayoutError(f"collate: the samples need {R} rows of {max_len} tokens, more than rows={rows}; "
                          "raise data.rows or data.max_len, or pass fewer samples")
    if R < rows:
        def pad(a: np.ndarray, value: int | float) -> np.ndarray:
            return np.concatenate([a, np.full((rows - R, a.shape[1]), value, dtype=a.dtype)])

        packed = Packed(pad(packed.tokens, layout.pad), pad(packed.weights, 0.0), pad(packed.roles, int(Role.PAD)),
                        pad(packed.doc_ids, -1), pad(packed.position_ids, 0), packed.documents, packed.image_spans)
    return Batch(packed, list(samples))


class MixtureDataset(torch.utils.data.IterableDataset):
    """Packed batches drawn from several datasets and the three kinds (see the module doc).

    ``num_batches=None`` iterates forever (training); a number gives that many batches per rank
    (held-out evaluation: the same batches every time). ``rank``/``world_size`` shard batch
    indices across torchrun ranks; DataLoader workers shard further.
    """

    def __init__(self, config: DataConfig, layout: SequenceLayout, tokenizer_id: str, split: str = "train",
                 num_batches: int | None = None, start: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if config.max_len < layout.image_block_len + 8:
            raise UserError(f"data.max_len={config.max_len} cannot hold an image block ({layout.image_block_len} "
                             "tokens) with its prompt; raise data.max_len")
        self.config, self.layout, self.split = config, layout, split
        self.num_batches, self.start, self.rank, self.world_size = num_batches, start, rank, world_size
        names = [Path(s.root).resolve().name for s in config.datasets]
        names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.sources = [DatasetSource(spec, name, config, layout, tokenizer_id)
                        for spec, name in zip(config.datasets, names)]
        total = sum(s.spec.weight for s in self.sources)
        self._dataset_p = np.asarray([s.spec.weight / total for s in self.sources])  # (D,)
        if split == "heldout" and not any(s.split_episodes["heldout"] for s in self.sources):
            raise UserError("split='heldout' but no dataset holds episodes out (data.heldout_fraction=0)")

    @property
    def probabilities(self) -> dict[tuple[str, SampleKind], float]:
        """Share of draws of each (dataset, kind)."""
        return {(s.name, kind): float(p * q) for s, p in zip(self.sources, self._dataset_p)
                for kind, q in s.kind_probs.items()}

    @property
    def binners(self) -> dict[str, ActionBinner]:
        """The action binner of each robot dataset, by source name (save them with the model)."""
        return {s.name: s.binner for s in self.sources if s.binner is not None}

    def draw(self, rng: np.random.Generator) -> DrawnSample:
        """One sample from the mixture of this split."""
        p = self._dataset_p
        if self.split == "heldout":  # datasets without held-out episodes drop out of the eval mixture
            p = p * np.asarray([bool(s.split_episodes["heldout"]) for s in self.sources])
            p = p / p.sum()
        source = self.sources[int(rng.choice(len(self.sources), p=p))]
        kinds = list(source.kind_probs)
        kind = kinds[int(rng.choice(len(kinds), p=list(source.kind_probs.values())))]
        drawn = source.draw(kind, self.split, rng)
        if self.split == "train" and self.config.cond_dropout > 0 and rng.random() < self.config.cond_dropout:
            drawn = replace(drawn, sample=self.layout.drop_conditioning(drawn.sample))  # for guidance
        return drawn

    def batch(self, index: int) -> Batch:
        """Batch ``index`` of this split: a pure function of (seed, split, index)."""
        rng = np.random.default_rng((self.config.seed, SPLITS.index(self.split), int(index)))
        c = self.config
        taken: list[DrawnSample] = []
        misses = 0
        while misses < FILL_PATIENCE:
            s = self.draw(rng)
            if self.layout.pack([d.sample for d in [*taken, s]], c.max_len).tokens.shape[0] <= c.rows:
                taken.append(s)
                misses = 0
            elif not taken:
                raise LayoutError(f"a {s.kind.value} sample of {len(s.sample)} tokens needs more than "
                                  f"data.rows={c.rows} rows of data.max_len={c.max_len}; raise one of them")
            else:
                misses += 1
        return collate(self.layout, taken, c.max_len, c.rows)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = count(self.start + self.rank, self.world_size)
        for j, b in enumerate(indices):
            if self.num_batches is not None and j >= self.num_batches:
                return
            if j % workers == worker:
                yield self.batch(b)


# ----------------------------------------------------------------------------- held-out metrics


class HeldoutMetrics:
    """Per-kind loss and next-frame token accuracy, accumulated over held-out batches.

    ``update(logits, batch)`` takes the model's (R, L, V) logits for ``batch.packed.tokens``
    (e.g. ``model.logits(tokens, doc_ids)``); the loss is the layout-weighted next-token CE (the
    training loss), the accuracy is teacher-forced argmax accuracy on the vision codes of every
    predicted image (:meth:`Batch.next_frame_mask`).
    """

    def __init__(self) -> None:
        self.loss_sum = np.zeros(len(KINDS))  # sum of w * ce per kind
        self.weight_sum = np.zeros(len(KINDS))
        self.correct = np.zeros(len(KINDS))
        self.total = np.zeros(len(KINDS))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, batch: Batch) -> None:
        p = batch.packed
        tokens = torch.as_tensor(p.tokens)  # (R, L)
        logits = logits.detach().float().cpu()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        ce = ce.view(tokens.shape[0], -1)  # (R, L-1)
        w = torch.as_tensor(p.weights)[:, 1:]  # (R, L-1)
        correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]  # (R, L-1)
        kinds = torch.as_tensor(batch.token_kinds())[:, 1:]  # (R, L-1)
        predicted = torch.as_tensor(batch.next_frame_mask())[:, 1:] & (w > 0)  # (R, L-1)
        for i in range(len(KINDS)):
            sel = kinds == i
            self.loss_sum[i] += float((ce * w)[sel].sum())
            self.weight_sum[i] += float(w[sel].sum())
            self.correct[i] += float(correct[sel & predicted].sum())
            self.total[i] += float((sel & predicted).sum())

    def result(self) -> dict[str, float]:
        """``loss/<kind>``, ``frame_acc/<kind>`` for the kinds seen, and the overall ``loss``, ``frame_acc``."""
        out: dict[str, float] = {}
        for i, kind in enumerate(KINDS):
            if self.weight_sum[i] > 0:
                out[f"loss/{kind.value}"] = self.loss_sum[i] / self.weight_sum[i]
            if self.total[i] > 0:
                out[f"frame_acc/{kind.value}"] = self.correct[i] / self.total[i]
        if self.weight_sum.sum() > 0:
            out["loss"] = float(self.loss_sum.sum() / self.weight_sum.sum())
        if self.total.sum() > 0:
            out["frame_acc"] = float(self.correct.sum() / self.total.sum())
        return out
