"""The vocabulary and the interleaved sequence layout, declared once.

Every other piece (data pipeline, world model, generation, DiDA, planner, explorer) asks this
module which id is what, how a sample is written, what a generated stream means, and what may
come next::

    layout = SequenceLayout.from_config(LayoutConfig(), codebook_size=1024, grid=(16, 16))
    binner = layout.binner_from_stats(dataset_stats["action"])      # per-dimension ranges
    s = layout.dynamics(task, frames, binner.encode(actions))      # Sample: tokens (N,), weights (N,), ...
    p = layout.parse(s.tokens)                                     # Parsed: prompt, texts, frames, action bins
    rows = layout.pack([s, ...], max_len=4096)                     # Packed: (R, L) + document boundaries
    st = layout.state_after(prefix); st.allowed().mask; st.advance(tok)   # O(1) grammar for generation

Vocabulary: contiguous id ranges, in this order (sizes for the shipped BPE, K=1024, 256 bins)::

    text     [0, T)              T = 456    the text tokenizer's ids unchanged (BPE or Qwen)
    special  [T, T+13)           13         BOS EOS PAD SOV SOT EOV EOL EOF BOA EOA DYN PLAN EXPLORE
    vision   [T+13, T+13+K)      1024       code c of the image tokenizer is id vision.start + c
    action   [.., .. + bins)     256        bin b (shared by all dimensions) is id action.start + b
    padding  up to a multiple of pad_vocab_to (64): 1749 used -> vocab_size 1792; never emitted

Sequences (``meta`` is the code-grid size as plain text, ``"{h}*{w}"``, BPE-tokenised)::

    image     SOV meta SOT (c_r0 ... c_r(w-1) EOL) x h EOV
    action    BOA a_t[0..A) a_{t+1}[0..A) ... EOA            (actions_per_frame=k steps, k*A bins)
    dynamics  BOS DYN task image action image action ... [image] EOS
    plan      BOS PLAN task image(o_t) subtask_1 image(keyframe_1) subtask_2 image(keyframe_2) ... EOS
    explore   BOS EXPLORE scene image(f0) command_1 image(f1) command_2 ... EOS

Loss weights: ``weights[i]`` weighs the cross-entropy of predicting token ``i`` from tokens
``< i`` (training uses ``weights[1:]`` against ``logits[:-1]``). They come from each token's
:class:`Role`: vision codes 0.5 (Emu3), text/actions/structure 1.0, the prompt (kind tag and
task/scene text) 0 unless ``train_prompt``, PAD 0, and the first token of every document 0 (it
has nothing to be predicted from).

References and departures:

- Emu3 (arXiv 2409.18869): one vocabulary of text, specials and vision codes; images as
  ``SOV meta SOT rows-with-EOL EOV``; vision-token loss weight 0.5. Departure: every frame is
  its own image block (actions or text sit between frames), so ``EOF`` is reserved in the
  vocabulary but never written; a stream holding it is rejected.
- Emu3.5 (arXiv 2510.26583): the embodied "subtask text + keyframe" and exploration
  "directive + frame" interleavings. Departure: a sample-kind tag after BOS (DYN/PLAN/EXPLORE)
  tells the model and the grammar which interleaving follows, so what comes after an image
  (actions or text) is never ambiguous.
- Action tokens as in WorldVLA / UniVLA-style discretisation: per-dimension range from dataset
  statistics (lerobot's q01/q99 by default), clipped, uniform bins shared by all dimensions,
  decoded at bin centres.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from emu_world.models.text_tokenizer import TextTokenizer, load_text_tokenizer

BINNER_FORMAT = "emu_world.action_binner"
BINNER_VERSION = 1
# Order fixes the ids: special id = text vocab size + index. The three kind tags stay last and
# contiguous (the grammar allows "any kind tag" as one range).
SPECIAL_TOKENS = ("BOS", "EOS", "PAD", "SOV", "SOT", "EOV", "EOL", "EOF", "BOA", "EOA", "DYN", "PLAN", "EXPLORE")
ACTION_RANGES = ("quantile", "minmax")
# channels of SequenceLayout.frame_hints(..., action_slots > 0): previous code, grid cell, action bins
HINT_CODE, HINT_CELL, HINT_ACTIONS = 0, 1, 2


@dataclass
class LayoutConfig:
    """``configs/layout/<name>.yaml``: the knobs of the vocabulary and of the training sequences.

    The codebook size K and the code grid are not here: they come from the vision tokenizer
    (:meth:`SequenceLayout.from_config` takes them), so they are stated once.
    """

    text_tokenizer: str | None = None  # null: shipped BPE; a tokenizer.json or a local HF folder (Qwen)
    action_bins: int = 256  # bins per action dimension (one shared set of bin tokens)
    action_range: str = "quantile"  # per-dimension range: "quantile" (q01..q99) or "minmax"
    actions_per_frame: int = 1  # k: action steps in each action span (frames subsampled by k)
    max_text_tokens: int = 64  # longest text segment (prompt, subtask, command); generation forces SOV after it
    text_weight: float = 1.0  # subtask / command text
    vision_weight: float = 0.5  # vision codes (Emu3)
    action_weight: float = 1.0  # action bins
    structure_weight: float = 1.0  # specials and image meta text (SOV, meta, SOT, EOL, EOV, BOA, EOA, EOS)
    train_prompt: bool = False  # train on the kind tag and task/scene text (weight text_weight) or not (0)
    pad_vocab_to: int = 64  # round the vocabulary size up to a multiple of this (1: no padding)

    def __post_init__(self) -> None:
        if self.action_range not in ACTION_RANGES:
            raise ValueError(f"layout.action_range must be one of {ACTION_RANGES}, got {self.action_range!r}")
        for name in ("action_bins", "actions_per_frame", "max_text_tokens", "pad_vocab_to"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"layout.{name} must be >= 1, got {getattr(self, name)}")
        if self.action_bins < 2:
            raise ValueError(f"layout.action_bins must be >= 2, got {self.action_bins}")
        for name in ("text_weight", "vision_weight", "action_weight", "structure_weight"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"layout.{name} must be a finite weight >= 0, got {value}")
        if self.text_weight + self.vision_weight + self.action_weight + self.structure_weight == 0:
            raise ValueError("layout: all loss weights are 0; nothing would be trained")


# ----------------------------------------------------------------------------- actions


@dataclass
class ActionBinner:
    """Per-dimension uniform binning of continuous actions into ``num_bins`` bins.

    ``encode`` clips each dimension to ``[low, high]`` and cuts it into equal bins; ``decode``
    returns bin centres, so the round-trip error of an in-range action is at most half a bin.
    A dimension with ``low == high`` (a constant) decodes to that constant.
    """

    low: np.ndarray  # (A,) float64
    high: np.ndarray  # (A,) float64
    num_bins: int = 256

    def __post_init__(self) -> None:
        self.low = np.asarray(self.low, dtype=np.float64).reshape(-1)
        self.high = np.asarray(self.high, dtype=np.float64).reshape(-1)
        if self.low.shape != self.high.shape or self.low.size == 0:
            raise ValueError(
                f"ActionBinner: low {self.low.shape} and high {self.high.shape} must be equal, non-empty (A,)"
            )
        if not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise ValueError("ActionBinner: low/high must be finite; check the dataset statistics for NaN or inf")
        if (self.high < self.low).any():
            bad = np.flatnonzero(self.high < self.low).tolist()
            raise ValueError(f"ActionBinner: high < low in dimension(s) {bad}")
        if int(self.num_bins) < 2:
            raise ValueError(f"ActionBinner: num_bins must be >= 2, got {self.num_bins}")
        self.num_bins = int(self.num_bins)

    @property
    def action_dim(self) -> int:
        return int(self.low.size)

    @classmethod
    def fit(cls, actions: np.ndarray, num_bins: int = 256, quantile: float = 0.01) -> "ActionBinner":
        """Ranges from data: the ``quantile``/``1 - quantile`` percentiles per dimension (0: min/max)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"ActionBinner.fit: actions must be (N, A) with N > 0, got {actions.shape}")
        if not 0 <= quantile < 0.5:
            raise ValueError(f"ActionBinner.fit: quantile must be in [0, 0.5), got {quantile}")
        low, high = np.quantile(actions, [quantile, 1.0 - quantile], axis=0)  # (A,) each
        return cls(low, high, num_bins)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], num_bins: int = 256, method: str = "quantile") -> "ActionBinner":
        """Ranges from lerobot's per-feature statistics (``meta/stats.json``'s ``"action"`` entry):
        ``q01``/``q99`` for ``method="quantile"``, ``min``/``max`` for ``"minmax"``."""
        keys = {"quantile": ("q01", "q99"), "minmax": ("min", "max")}.get(method)
        if keys is None:
            raise ValueError(f"ActionBinner.from_stats: method must be one of {ACTION_RANGES}, got {method!r}")
        missing = [k for k in keys if k not in stats]
        if missing:
            raise ValueError(
                f"ActionBinner.from_stats: statistics lack {missing} (have {sorted(stats)}); "
                "use method='minmax' or recompute the dataset statistics with lerobot >= 0.4"
            )
        return cls(np.asarray(stats[keys[0]]), np.asarray(stats[keys[1]]), num_bins)

    def _check_dim(self, array: np.ndarray, what: str) -> None:
        if array.ndim == 0 or array.shape[-1] != self.action_dim:
            raise ValueError(
                f"ActionBinner.{what}: last axis must have {self.action_dim} dimensions, got {array.shape}"
            )

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """(..., A) float -> (..., A) int64 bins in [0, num_bins)."""
        actions = np.asarray(actions, dtype=np.float64)
        self._check_dim(actions, "encode")
        if not np.isfinite(actions).all():
            raise ValueError("ActionBinner.encode: actions contain NaN or inf")
        width = self.high - self.low  # (A,)
        unit = np.divide(actions - self.low, width, out=np.full(actions.shape, 0.5), where=width > 0)
        return np.clip(np.floor(unit * self.num_bins), 0, self.num_bins - 1).astype(np.int64)

    def decode(self, bins: np.ndarray) -> np.ndarray:
        """(..., A) int bins -> (..., A) float32 actions at bin centres."""
        bins = np.asarray(bins)
        self._check_dim(bins, "decode")
        if bins.size and (bins.min() < 0 or bins.max() >= self.num_bins):
            raise ValueError(
                f"ActionBinner.decode: bins must lie in [0, {self.num_bins}), got {bins.min()}..{bins.max()}"
            )
        centres = (bins.astype(np.float64) + 0.5) / self.num_bins
        return (self.low + centres * (self.high - self.low)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        data = {"format": BINNER_FORMAT, "format_version": BINNER_VERSION, "num_bins": self.num_bins,
                "low": self.low.tolist(), "high": self.high.tolist()}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ActionBinner":
        data = json.loads(Path(path).read_text())
        if data.get("format") != BINNER_FORMAT or data.get("format_version") != BINNER_VERSION:
            raise ValueError(
                f"{path} is not an action binner file (format {data.get('format')!r} version "
                f"{data.get('format_version')!r}; expected {BINNER_FORMAT!r} version {BINNER_VERSION})"
            )
        return cls(np.asarray(data["low"]), np.asarray(data["high"]), int(data["num_bins"]))


# ----------------------------------------------------------------------------- typed results


class LayoutError(ValueError):
    """A token stream or sample that does not follow the layout; the message says where and why."""


class SampleKind(str, Enum):
    DYNAMICS = "dynamics"  # frames and the actions between them
    PLAN = "plan"  # observation, then subtask text + keyframe pairs
    EXPLORATION = "exploration"  # frames and the text commands between them


KIND_TAGS = {SampleKind.DYNAMICS: "DYN", SampleKind.PLAN: "PLAN", SampleKind.EXPLORATION: "EXPLORE"}


class Role(IntEnum):
    """What a token is, for loss weights (and for modality embeddings/heads later)."""

    PAD = 0
    STRUCTURE = 1  # specials except BOS/PAD/kind tag, and the image meta text
    PROMPT = 2  # BOS, the kind tag, the task/scene text
    TEXT = 3  # subtask / command text
    VISION = 4  # vision codes
    ACTION = 5  # action bins


@dataclass
class TokenRange:
    """Half-open id range ``[start, stop)``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, token: int) -> bool:
        return self.start <= token < self.stop


@dataclass
class Sample:
    """One training document. Spans are ``[start, end)`` token indices into ``tokens``."""

    kind: SampleKind
    tokens: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float32, weights[i] weighs predicting tokens[i]
    roles: np.ndarray  # (N,) int8 Role
    image_spans: np.ndarray  # (F, 2) int64: code tokens of each image incl. EOLs (SOT+1 .. EOV)
    action_spans: np.ndarray  # (S, 2) int64: bin tokens of each action span (BOA+1 .. EOA)
    text_spans: np.ndarray  # (X, 2) int64: text segments, the prompt first

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Parsed:
    """A token stream read back. Order is fixed by the kind: dynamics alternates frames[i],
    action_bins[i]; plan and exploration alternate frames[i], texts[i] (frames[0] is the
    observation, texts[i] leads to frames[i + 1])."""

    kind: SampleKind
    prompt: str  # task (dynamics, plan) or scene (exploration) text
    texts: list[str]  # subtasks (plan) or commands (exploration)
    frames: np.ndarray  # (F, h, w) int64 codes in [0, K)
    action_bins: np.ndarray  # (S, k, A) int64 bins; (0, k, 0) when there are none
    complete: bool  # the stream ended with EOS

    def actions(self, binner: ActionBinner) -> np.ndarray:
        """All action steps in order, decoded at bin centres: (S * k, A) float32."""
        s, k, a = self.action_bins.shape
        return binner.decode(self.action_bins.reshape(s * k, a))


@dataclass
class Packed:
    """Samples packed into R fixed-length rows. A document is one sample or one piece of a long
    sample (cut only between image blocks and action spans); attention and position ids restart
    with every document."""

    tokens: np.ndarray  # (R, L) int64, PAD after the last document of a row
    weights: np.ndarray  # (R, L) float32; 0 on PAD and on the first token of every document
    roles: np.ndarray  # (R, L) int8 Role
    doc_ids: np.ndarray  # (R, L) int64 index into ``documents``; -1 on padding
    position_ids: np.ndarray  # (R, L) int64, 0 at every document start
    documents: np.ndarray  # (D, 5) int64: row, start, length, sample index, offset inside the sample
    image_spans: np.ndarray  # (F, 3) int64: row, start, end of each image's code tokens incl. EOLs


# ----------------------------------------------------------------------------- grammar


class Allowed:
    """The set of ids that may come next: ``ranges`` of ids and the matching ``mask`` (V,) bool
    for ``logits.masked_fill(~mask, -inf)``; ``forced`` is the id when exactly one is allowed."""

    __slots__ = ("name", "ranges", "mask", "forced")

    def __init__(self, name: str, ranges: Sequence[tuple[int, int]], vocab_size: int):
        self.name = name
        self.ranges = tuple((int(a), int(b)) for a, b in ranges)
        self.mask = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
        for a, b in self.ranges:
            self.mask[a:b] = True
        only = self.ranges[0] if len(self.ranges) == 1 else None
        self.forced = only[0] if only is not None and only[1] - only[0] == 1 else None

    def __contains__(self, token: int) -> bool:
        return any(a <= token < b for a, b in self.ranges)

    def __repr__(self) -> str:
        return f"Allowed({self.name}, {self.ranges})"


class _Phase(IntEnum):
    BOS = 0
    KIND = 1
    PROMPT = 2  # inside the task/scene text
    META = 3  # inside the "h*w" meta text
    SOT = 4
    CODE = 5  # expecting a vision code
    EOL = 6
    EOV = 7
    AFTER_IMAGE = 8
    BINS = 9  # inside an action span
    AFTER_ACTION = 10
    SEGMENT = 11  # inside a subtask / command text
    DONE = 12  # after EOS: only PAD


class StreamState:
    """Where a stream stands in the grammar; ``allowed()`` and ``advance(token)`` are O(1).

    ``action_dim`` fixes the bins per action step; when None it is learnt from the first
    complete action span (all spans of a stream have the same length).
    """

    __slots__ = ("layout", "kind", "phase", "position", "text_len", "meta_i", "row", "col",
                 "span_len", "span_size", "images", "spans")

    def __init__(self, layout: "SequenceLayout", action_dim: int | None = None):
        self.layout = layout
        self.kind: SampleKind | None = None
        self.phase = _Phase.BOS
        self.position = 0  # tokens consumed
        self.text_len = 0
        self.meta_i = 0
        self.row = self.col = 0
        self.span_len = 0
        self.span_size = None if action_dim is None else action_dim * layout.config.actions_per_frame
        self.images = 0  # completed images
        self.spans = 0  # completed action spans

    @property
    def done(self) -> bool:
        return self.phase == _Phase.DONE

    @property
    def in_image(self) -> bool:
        """Between SOV and EOV (meta, SOT, codes, EOLs): the block DiDA decodes in parallel."""
        return self.phase in (_Phase.META, _Phase.SOT, _Phase.CODE, _Phase.EOL, _Phase.EOV)

    def allowed(self) -> Allowed:
        a = self.layout._allowed
        p = self.phase
        if p == _Phase.CODE:
            return a["vision"]
        if p == _Phase.EOL:
            return a["EOL"]
        if p == _Phase.BINS:
            k = self.layout.config.actions_per_frame
            if self.span_size is not None:
                return a["bins"] if self.span_len < self.span_size else a["EOA"]
            return a["bins|EOA"] if self.span_len > 0 and self.span_len % k == 0 else a["bins"]
        if p in (_Phase.PROMPT, _Phase.SEGMENT):
            if self.text_len == 0:
                return a["text"]
            return a["text|SOV"] if self.text_len < self.layout.config.max_text_tokens else a["SOV"]
        if p == _Phase.META:
            return self.layout._allowed_meta[self.meta_i]
        if p == _Phase.AFTER_IMAGE:
            return a["BOA|EOS"] if self.kind == SampleKind.DYNAMICS else a["text|EOS"]
        return a[_FIXED[p]]

    def advance(self, token: int) -> None:
        """Consume one token; raise :class:`LayoutError` if the grammar does not allow it here."""
        token = int(token)
        allowed = self.allowed()
        if token not in allowed:
            raise LayoutError(
                f"token {self.position}: expected {allowed.name}, got {self.layout.token_name(token)} "
                f"({self.where()})"
            )
        L = self.layout
        p = self.phase
        self.position += 1
        if p == _Phase.CODE:
            self.col += 1
            if self.col == L.grid[1]:
                self.phase = _Phase.EOL
        elif p == _Phase.EOL:
            self.row, self.col = self.row + 1, 0
            self.phase = _Phase.EOV if self.row == L.grid[0] else _Phase.CODE
        elif p == _Phase.BINS:
            if token == L.eoa:
                self.span_size, self.spans, self.phase = self.span_len, self.spans + 1, _Phase.AFTER_ACTION
            else:
                self.span_len += 1
        elif p in (_Phase.PROMPT, _Phase.SEGMENT):
            if token == L.sov:
                self._start_image()
            else:
                self.text_len += 1
        elif p == _Phase.META:
            self.meta_i += 1
            if self.meta_i == len(L.meta_ids):
                self.phase = _Phase.SOT
        elif p == _Phase.SOT:
            self.phase, self.row, self.col = _Phase.CODE, 0, 0
        elif p == _Phase.EOV:
            self.images += 1
            self.phase = _Phase.AFTER_IMAGE
        elif p == _Phase.AFTER_IMAGE or p == _Phase.AFTER_ACTION:
            if token == L.eos:
                self.phase = _Phase.DONE
            elif token == L.boa:
                self.phase, self.span_len = _Phase.BINS, 0
            elif token == L.sov:
                self._start_image()
            else:  # first token of a subtask / command
                self.phase, self.text_len = _Phase.SEGMENT, 1
        elif p == _Phase.BOS:
            self.phase = _Phase.KIND
        elif p == _Phase.KIND:
            self.kind = L.kind_of_tag[token]
            self.phase, self.text_len = _Phase.PROMPT, 0
        # _Phase.DONE: PAD, nothing changes

    def _start_image(self) -> None:
        self.phase, self.meta_i = _Phase.META, 0

    def where(self) -> str:
        """Human description of the current place, for error messages."""
        h, w = self.layout.grid
        p = self.phase
        if p in (_Phase.CODE, _Phase.EOL):
            return f"image {self.images + 1}, row {self.row + 1} of {h}, after {self.col} of {w} codes"
        if p in (_Phase.META, _Phase.SOT):
            return f"header of image {self.images + 1}, meta must be {self.layout.meta_text!r}"
        if p == _Phase.EOV:
            return f"image {self.images + 1} has all {h} rows"
        if p == _Phase.BINS:
            size = "unknown length" if self.span_size is None else f"spans have {self.span_size}"
            return f"action span {self.spans + 1}, after {self.span_len} bins, {size}"
        if p == _Phase.PROMPT:
            return f"prompt text, {self.text_len} tokens so far (at most {self.layout.config.max_text_tokens})"
        if p == _Phase.SEGMENT:
            return f"text after image {self.images}, {self.text_len} tokens so far"
        if p == _Phase.AFTER_IMAGE:
            return f"after image {self.images} of a {self.kind.value} stream"
        if p == _Phase.AFTER_ACTION:
            return f"after action span {self.spans}"
        if p == _Phase.DONE:
            return "after EOS only PAD may follow"
        if p == _Phase.KIND:
            return "after BOS a sample-kind tag (DYN, PLAN, EXPLORE) must follow"
        return "stream start"


# phases whose allowed set does not depend on counters
_FIXED = {_Phase.BOS: "BOS", _Phase.KIND: "kind", _Phase.SOT: "SOT", _Phase.EOV: "EOV",
          _Phase.AFTER_ACTION: "SOV|EOS", _Phase.DONE: "PAD"}


# ----------------------------------------------------------------------------- the layout


class SequenceLayout:
    """The one vocabulary and the grammar of every sequence (see the module docstring)."""

    def __init__(self, config: LayoutConfig, text: TextTokenizer, codebook_size: int, grid: tuple[int, int]):
        h, w = (int(g) for g in grid)
        if h < 1 or w < 1:
            raise ValueError(f"SequenceLayout: grid must be positive (h, w), got {grid}")
        if int(codebook_size) < 2:
            raise ValueError(f"SequenceLayout: codebook_size must be >= 2, got {codebook_size}")
        self.config = config
        self.text_tokenizer = text
        self.codebook_size = int(codebook_size)
        self.grid = (h, w)

        t = text.vocab_size
        self.text = TokenRange(0, t)
        self.specials = TokenRange(t, t + len(SPECIAL_TOKENS))
        self.vision = TokenRange(self.specials.stop, self.specials.stop + self.codebook_size)
        self.action = TokenRange(self.vision.stop, self.vision.stop + config.action_bins)
        m = config.pad_vocab_to
        self.vocab_size = -(-self.action.stop // m) * m  # V, used ids + padding

        self.special = {name: self.specials.start + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos, self.eos, self.pad = self.special["BOS"], self.special["EOS"], self.special["PAD"]
        self.sov, self.sot, self.eov, self.eol = (self.special[n] for n in ("SOV", "SOT", "EOV", "EOL"))
        self.boa, self.eoa = self.special["BOA"], self.special["EOA"]
        self.kind_tag = {kind: self.special[name] for kind, name in KIND_TAGS.items()}
        self.kind_of_tag = {tag: kind for kind, tag in self.kind_tag.items()}

        self.meta_text = f"{h}*{w}"
        self.meta_ids = np.asarray(text.encode(self.meta_text), dtype=np.int64)
        if self.meta_ids.size == 0:
            raise ValueError(f"the text tokenizer encodes the image meta {self.meta_text!r} to nothing")
        self.image_span_len = h * (w + 1)  # code tokens incl. EOLs of one image
        self.image_block_len = len(self.meta_ids) + 3 + self.image_span_len  # SOV meta SOT ... EOV
        # (h*w,) offsets of the codes inside an image span (the rest are EOLs)
        self.code_offsets = (np.arange(h)[:, None] * (w + 1) + np.arange(w)[None, :]).reshape(-1)

        c = config
        prompt_weight = c.text_weight if c.train_prompt else 0.0
        self.role_weights = np.zeros(len(Role), dtype=np.float32)  # (roles,)
        self.role_weights[Role.STRUCTURE] = c.structure_weight
        self.role_weights[Role.PROMPT] = prompt_weight
        self.role_weights[Role.TEXT] = c.text_weight
        self.role_weights[Role.VISION] = c.vision_weight
        self.role_weights[Role.ACTION] = c.action_weight
        self._text_cache: dict[str, np.ndarray] = {}
        self._build_allowed()

    @classmethod
    def from_config(cls, config: LayoutConfig, codebook_size: int, grid: tuple[int, int]) -> "SequenceLayout":
        """Load the configured text tokenizer; K and the grid come from the vision tokenizer."""
        return cls(config, load_text_tokenizer(config.text_tokenizer), codebook_size, grid)

    def _build_allowed(self) -> None:
        V, T = self.vocab_size, self.text

        def one(token: int) -> tuple[int, int]:
            return token, token + 1

        tags = sorted(self.kind_tag.values())
        sets = {
            "BOS": [one(self.bos)], "SOT": [one(self.sot)], "EOV": [one(self.eov)], "EOL": [one(self.eol)],
            "EOA": [one(self.eoa)], "SOV": [one(self.sov)], "PAD": [one(self.pad)],
            "kind": [(tags[0], tags[-1] + 1)],
            "text": [(T.start, T.stop)],
            "text|SOV": [(T.start, T.stop), one(self.sov)],
            "text|EOS": [(T.start, T.stop), one(self.eos)],
            "vision": [(self.vision.start, self.vision.stop)],
            "bins": [(self.action.start, self.action.stop)],
            "bins|EOA": [(self.action.start, self.action.stop), one(self.eoa)],
            "BOA|EOS": [one(self.boa), one(self.eos)],
            "SOV|EOS": [one(self.sov), one(self.eos)],
        }
        self._allowed = {name: Allowed(name, ranges, V) for name, ranges in sets.items()}
        self._allowed_meta = [Allowed(f"meta token {i} of {self.meta_text!r}", [one(int(t))], V)
                              for i, t in enumerate(self.meta_ids)]

    # -- ids ------------------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """What a checkpoint must agree on (JSON-able)."""
        c = self.config
        return {
            "text_tokenizer": self.text_tokenizer.identity, "text_size": len(self.text),
            "specials": list(SPECIAL_TOKENS), "codebook_size": self.codebook_size, "grid": list(self.grid),
            "action_bins": c.action_bins, "actions_per_frame": c.actions_per_frame, "vocab_size": self.vocab_size,
        }

    def token_name(self, token: int) -> str:
        token = int(token)
        if not 0 <= token < self.vocab_size:
            return f"id {token} (outside the vocabulary 0..{self.vocab_size - 1})"
        if token in self.text:
            return f"text token {self.text_tokenizer.decode([token])!r}"
        if token in self.specials:
            return f"[{SPECIAL_TOKENS[token - self.specials.start]}]"
        if token in self.vision:
            return f"vision code {token - self.vision.start}"
        if token in self.action:
            return f"action bin {token - self.action.start}"
        return f"unused id {token} (vocabulary padding)"

    @staticmethod
    def task_prompt(tag: str, text: str) -> str:
        """The prompt text of a sample: the embodiment tag, then the task (or scene) text."""
        return f"{tag}: {text}"

    def encode_text(self, text: str) -> np.ndarray:
        """(n,) int64 text ids of one segment; checks it is non-empty and not too long."""
        ids = self._text_cache.get(text)
        if ids is None:
            ids = np.asarray(self.text_tokenizer.encode(text), dtype=np.int64)
            if ids.size == 0:
                raise LayoutError(f"text {text!r} encodes to no tokens; text segments must be non-empty")
            if ids.size > self.config.max_text_tokens:
                raise LayoutError(
                    f"text {text!r} is {ids.size} tokens; layout.max_text_tokens={self.config.max_text_tokens}"
                )
            self._text_cache[text] = ids
        return ids

    def image_tokens(self, codes: np.ndarray) -> np.ndarray:
        """(h, w) codes -> (image_block_len,) ids ``SOV meta SOT (row EOL) * h EOV``."""
        codes = self._check_codes(np.asarray(codes)[None], "image")[0]
        h, w = self.grid
        body = np.full((h, w + 1), self.eol, dtype=np.int64)  # (h, w+1): codes then EOL per row
        body[:, :w] = codes + self.vision.start
        return np.concatenate([[self.sov], self.meta_ids, [self.sot], body.reshape(-1), [self.eov]])

    def _check_codes(self, frames: np.ndarray, what: str) -> np.ndarray:
        if frames.ndim != 3 or tuple(frames.shape[1:]) != self.grid:
            raise LayoutError(f"{what}: code grids must be (n, {self.grid[0]}, {self.grid[1]}), got {frames.shape}")
        if not np.issubdtype(frames.dtype, np.integer):
            raise LayoutError(f"{what}: codes must be integers, got {frames.dtype}")
        if frames.size and (frames.min() < 0 or frames.max() >= self.codebook_size):
            raise LayoutError(
                f"{what}: codes must lie in [0, {self.codebook_size}), got {frames.min()}..{frames.max()}"
            )
        return frames.astype(np.int64)

    def binner_from_stats(self, stats: Mapping[str, Any]) -> ActionBinner:
        """An :class:`ActionBinner` with this layout's bin count and range rule, from lerobot stats."""
        return ActionBinner.from_stats(stats, self.config.action_bins, self.config.action_range)

    # -- builders -------------------------------------------------------------------------------
    def dynamics(self, task: str, frames: np.ndarray, action_bins: np.ndarray, end: bool = True) -> Sample:
        """``BOS DYN task image(f0) BOA a.. EOA image(f1) ... EOS``.

        frames: (n, h, w) codes; action_bins: (m, A) bins (``binner.encode(actions)``) with
        ``m = n*k`` (an action span after every frame) or ``(n-1)*k`` (the stream ends with a
        frame); span i holds steps ``i*k .. i*k+k-1``. ``end=False`` leaves EOS off (a
        generation prompt; then ``m = n*k`` asks for the next frame).
        """
        frames = self._check_codes(np.asarray(frames), "dynamics frames")
        bins = np.asarray(action_bins)
        k, n = self.config.actions_per_frame, len(frames)
        if bins.ndim != 2 or bins.shape[1] < 1 or bins.shape[0] not in (n * k, (n - 1) * k) or n == 0:
            raise LayoutError(
                f"dynamics: action_bins must be (m, A) with m = n*k or (n-1)*k for n={n} frames and "
                f"k=actions_per_frame={k}, got {bins.shape}"
            )
        in_range = bins.size == 0 or (bins.min() >= 0 and bins.max() < len(self.action))
        if not np.issubdtype(bins.dtype, np.integer) or not in_range:
            raise LayoutError(
                f"dynamics: action bins must be integers in [0, {len(self.action)}); encode actions "
                "with ActionBinner.encode"
            )
        spans = bins.reshape(-1, k * bins.shape[1]).astype(np.int64)  # (n or n-1, k*A)
        b = _Builder(self, SampleKind.DYNAMICS, task)
        for i, frame in enumerate(frames):
            b.image(frame)
            if i < len(spans):
                b.actions(spans[i])
        return b.finish(end)

    def plan(self, task: str, observation: np.ndarray, subtasks: Sequence[str], keyframes: np.ndarray,
             end: bool = True) -> Sample:
        """``BOS PLAN task image(o_t) subtask_1 image(keyframe_1) ... EOS``.

        observation: (h, w); keyframes: (n, h, w) with ``len(subtasks) == n``, or ``n + 1``
        with ``end=False`` (a prompt asking for the keyframe of the last subtask).
        """
        frames = self._check_codes(np.asarray(observation)[None], "plan observation")
        keys = np.asarray(keyframes)
        if keys.size == 0:  # e.g. [] for a prompt with only the observation
            keys = np.zeros((0, *self.grid), dtype=np.int64)
        keys = self._check_codes(keys, "plan keyframes")
        return self._text_and_frames(SampleKind.PLAN, task, np.concatenate([frames, keys]), subtasks, end)

    def exploration(self, scene: str, frames: np.ndarray, commands: Sequence[str], end: bool = True) -> Sample:
        """``BOS EXPLORE scene image(f0) command_1 image(f1) ... EOS``.

        frames: (n+1, h, w) with ``len(commands) == n``, or ``n + 1`` with ``end=False`` (a
        prompt asking for the frame after the last command).
        """
        frames = self._check_codes(np.asarray(frames), "exploration frames")
        return self._text_and_frames(SampleKind.EXPLORATION, scene, frames, commands, end)

    def _text_and_frames(self, kind: SampleKind, prompt: str, frames: np.ndarray, texts: Sequence[str],
                         end: bool) -> Sample:
        n = len(frames)
        ok = {n - 1} if end else {n - 1, n}
        if n == 0 or len(texts) not in ok:
            raise LayoutError(
                f"{kind.value}: {n} images need {n - 1} text segments"
                + ("" if end else f" (or {n} with end=False)") + f", got {len(texts)}"
            )
        b = _Builder(self, kind, prompt)
        b.image(frames[0])
        for i, text in enumerate(texts):
            b.text(text, Role.TEXT)
            if i + 1 < n:
                b.image(frames[i + 1])
        return b.finish(end)

    # -- parsing and generation -----------------------------------------------------------------
    def state(self, action_dim: int | None = None) -> StreamState:
        """A fresh grammar state (expects BOS)."""
        return StreamState(self, action_dim)

    def state_after(self, prefix: Sequence[int], action_dim: int | None = None) -> StreamState:
        """The grammar state after a prefix (validated); then call ``allowed()``/``advance()`` per step."""
        st = StreamState(self, action_dim)
        for token in np.asarray(prefix).reshape(-1).tolist():
            st.advance(token)
        return st

    def parse(self, tokens: Sequence[int], complete: bool = True, action_dim: int | None = None) -> Parsed:
        """Read a stream back into text, code grids and action bins, validating it fully.

        ``complete=True`` requires the final EOS (trailing PADs are fine); ``complete=False``
        accepts a stream that stops between elements (after an image, an action span or inside
        a text segment), e.g. a generation prompt. Malformed streams raise :class:`LayoutError`.
        """
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise LayoutError(f"token stream must hold integers, got {tokens.dtype}")
        st = StreamState(self, action_dim)
        h, w = self.grid
        texts: list[list[int]] = []
        frames: list[np.ndarray] = []
        spans: list[list[int]] = []
        current: list[int] = []  # codes of the image being read
        for token in tokens.tolist():
            phase = st.phase
            st.advance(token)
            if phase in (_Phase.PROMPT, _Phase.SEGMENT, _Phase.AFTER_IMAGE) and token in self.text:
                if phase == _Phase.AFTER_IMAGE or (phase == _Phase.PROMPT and st.text_len == 1):
                    texts.append([])  # a new text segment starts
                texts[-1].append(token)
            elif phase == _Phase.CODE:
                current.append(token - self.vision.start)
            elif phase == _Phase.EOV:
                frames.append(np.asarray(current, dtype=np.int64).reshape(h, w))
                current = []
            elif phase == _Phase.BINS and token != self.eoa:
                spans[-1].append(token - self.action.start)
            elif token == self.boa:
                spans.append([])
        if st.phase == _Phase.BOS:
            raise LayoutError("empty token stream: expected BOS")
        if st.phase in (_Phase.KIND, _Phase.META, _Phase.SOT, _Phase.CODE, _Phase.EOL, _Phase.EOV, _Phase.BINS) or (
            st.phase == _Phase.PROMPT and st.text_len == 0
        ):
            raise LayoutError(f"stream ends inside an unterminated element ({st.where()}) after {len(tokens)} tokens")
        if complete and not st.done:
            raise LayoutError(f"stream ends without EOS ({len(tokens)} tokens; {st.where()}); "
                              "parse(..., complete=False) reads unfinished streams")
        k = self.config.actions_per_frame
        if spans:
            action_bins = np.asarray(spans, dtype=np.int64).reshape(len(spans), k, -1)  # (S, k, A)
        else:
            action_bins = np.zeros((0, k, 0), dtype=np.int64)
        decoded = [self.text_tokenizer.decode(t) for t in texts]
        return Parsed(
            kind=st.kind, prompt=decoded[0], texts=decoded[1:],
            frames=np.stack(frames) if frames else np.zeros((0, h, w), dtype=np.int64),
            action_bins=action_bins, complete=st.done,
        )

    # -- packing --------------------------------------------------------------------------------
    def pack(self, samples: Sequence[Sample], max_len: int) -> Packed:
        """Pack samples into rows of ``max_len`` tokens, first fit, in order (deterministic).

        A sample longer than ``max_len`` is cut into pieces at points outside image blocks and
        action spans; each piece is a document of its own. Raises :class:`LayoutError` if one
        image block alone is longer than ``max_len``.
        """
        if max_len < 1:
            raise ValueError(f"pack: max_len must be >= 1, got {max_len}")
        pieces: list[tuple[int, int, int]] = []  # (sample index, start, stop)
        for si, s in enumerate(samples):
            for start, stop in self._cut(s, max_len):
                pieces.append((si, start, stop))
        used: list[int] = []  # tokens used in each row
        placed: list[tuple[int, int]] = []  # (row, start) of each piece
        for si, start, stop in pieces:
            n = stop - start
            row = next((r for r, u in enumerate(used) if u + n <= max_len), None)
            if row is None:
                row = len(used)
                used.append(0)
            placed.append((row, used[row]))
            used[row] += n
        R = max(len(used), 1)
        tokens = np.full((R, max_len), self.pad, dtype=np.int64)
        weights = np.zeros((R, max_len), dtype=np.float32)
        roles = np.full((R, max_len), Role.PAD, dtype=np.int8)
        doc_ids = np.full((R, max_len), -1, dtype=np.int64)
        position_ids = np.zeros((R, max_len), dtype=np.int64)
        documents = np.zeros((len(pieces), 5), dtype=np.int64)
        images: list[tuple[int, int, int]] = []
        for d, ((si, start, stop), (row, at)) in enumerate(zip(pieces, placed)):
            s, n = samples[si], stop - start
            tokens[row, at:at + n] = s.tokens[start:stop]
            weights[row, at:at + n] = s.weights[start:stop]
            weights[row, at] = 0.0  # a document's first token has nothing before it
            roles[row, at:at + n] = s.roles[start:stop]
            doc_ids[row, at:at + n] = d
            position_ids[row, at:at + n] = np.arange(n)
            documents[d] = (row, at, n, si, start)
            for a, b in s.image_spans:
                if start <= a and b <= stop:
                    images.append((row, at + a - start, at + b - start))
        image_spans = np.asarray(images, dtype=np.int64).reshape(-1, 3)
        return Packed(tokens, weights, roles, doc_ids, position_ids, documents, image_spans)

    def conditioning_mask(self, tokens: Sequence[int], action_dim: int | None = None) -> np.ndarray:
        """(N,) bool: the conditioning of a stream, what classifier-free guidance leaves out: text
        outside images (task/scene prompt, subtasks, commands) and action bins. BOS, the kind tag,
        images (their meta text included) and the other structure tokens are not conditioning."""
        st = self.state(action_dim)
        out = []
        for token in np.asarray(tokens).reshape(-1).tolist():
            out.append((token in self.text and not st.in_image) or token in self.action)
            st.advance(token)
        return np.asarray(out, dtype=bool)

    def drop_conditioning(self, sample: Sample) -> Sample:
        """The sample without its conditioning (:meth:`conditioning_mask`): the unconditional
        stream classifier-free guidance compares with, as a training sample (``data.cond_dropout``).
        Weights and roles follow their tokens; action spans become empty (BOA EOA), text spans go."""
        keep = ~self.conditioning_mask(sample.tokens)
        new = np.cumsum(keep) - 1  # (N,) new index of every kept token
        images = np.stack([new[sample.image_spans[:, 0]], new[sample.image_spans[:, 1]]], axis=1) \
            if len(sample.image_spans) else sample.image_spans
        ends = new[sample.action_spans[:, 1]] if len(sample.action_spans) else np.zeros(0, dtype=np.int64)
        return Sample(sample.kind, sample.tokens[keep], sample.weights[keep], sample.roles[keep],
                      images.astype(np.int64).reshape(-1, 2), np.stack([ends, ends], axis=1).astype(np.int64),
                      np.zeros((0, 2), dtype=np.int64))

    def frame_hints(self, tokens: "torch.Tensor", doc_ids: "torch.Tensor | None" = None,
                    action_slots: int = 0) -> "torch.Tensor":
        """(B, L) ids -> (B, L) previous-frame hints: ``hints[b, i]`` is the code (0..K-1) that the
        previous image of the same document holds at the grid cell of token ``i + 1``, when token
        ``i + 1`` is (or, mid-generation, will be) a vision code of an image that has a previous
        image; -1 everywhere else.

        ``action_slots > 0``: (B, L, 2 + action_slots) channels (:data:`HINT_CODE`, :data:`HINT_CELL`,
        :data:`HINT_ACTIONS` onwards): the previous code as above; the grid cell (0..h*w-1, row-major)
        of token ``i + 1`` when it is a code of any image; and the action bins (0..bins-1) of the
        action span between the previous image (or the document start) and this image, left-aligned,
        -1 past the span's end or where there is none. A span longer than ``action_slots`` is an error.

        A hint is what position ``i`` predicts from, so it is indexed like the inputs. It is a
        pure function of the ids up to ``i`` (an image's cells are fixed once its SOT is known),
        so it is the same in training, in token-by-token decoding and in DiDA's noisy copies.
        Images are found by their SOT; a piece of a long sample cut by :meth:`pack` starts a new
        document, whose first image has no hints.
        """
        import torch

        B, L = tokens.shape
        slots = int(action_slots)
        hints = torch.full((B, L, HINT_ACTIONS + slots) if slots else (B, L), -1, dtype=torch.long,
                           device=tokens.device)
        code = hints[..., HINT_CODE] if slots else hints  # a view: (B, L)
        offsets = torch.as_tensor(self.code_offsets + 1, device=tokens.device)  # (h*w,) code positions after SOT
        cells = torch.arange(len(self.code_offsets), device=tokens.device)  # (h*w,)
        rows, cols = (tokens == self.sot).nonzero(as_tuple=True)  # SOTs in row-major order
        rows_l, cols_l = rows.tolist(), cols.tolist()
        boas = (tokens == self.boa).nonzero().tolist() if slots else []  # [(row, col)] in row-major order
        for k in range(len(rows_l)):
            b, p = rows_l[k], cols_l[k]
            doc = int(doc_ids[b, p]) if doc_ids is not None else 0
            q = cols_l[k - 1] if k > 0 and rows_l[k - 1] == b else -1  # the previous SOT of this row
            if q >= 0 and doc_ids is not None and int(doc_ids[b, q]) != doc:
                q = -1  # it belongs to another document
            target = p + offsets - 1  # the positions that predict this image's codes
            if q >= 0:
                source = q + offsets  # (h*w,) codes of the previous image (complete: this SOT follows it)
                keep = (target < L) & (source < L)
                prev = tokens[b, source[keep]] - self.vision.start
                code[b, target[keep]] = torch.where((prev >= 0) & (prev < self.codebook_size), prev, -1)
            if not slots:
                continue
            inside = target < L
            hints[b, target[inside], HINT_CELL] = cells[inside]
            span = [c for r, c in boas if r == b and q < c < p
                    and (doc_ids is None or int(doc_ids[b, c]) == doc)]
            if span:
                bins = self._span_bins(tokens[b], span[-1] + 1, p, slots)  # (n,)
                hints[b, target[inside], HINT_ACTIONS:HINT_ACTIONS + len(bins)] = bins
        return hints

    def _span_bins(self, row: "torch.Tensor", start: int, end: int, slots: int) -> "torch.Tensor":
        """The action bins of the span that starts at ``start`` (after its BOA) in ``row``, before ``end``."""
        stop = start
        while stop < end and self.action.start <= int(row[stop]) < self.action.stop:
            stop += 1
        if stop - start > slots:
            raise ValueError(
                f"an action span of {stop - start} bins does not fit model.action_hints={slots}; "
                "raise model.action_hints to the longest span (actions_per_frame x action dim)")
        return row[start:stop] - self.action.start

    def _cut(self, s: Sample, max_len: int) -> list[tuple[int, int]]:
        """[start, stop) pieces of one sample, each <= max_len, cut only at safe points."""
        n = len(s)
        if n <= max_len:
            return [(0, n)]
        safe = np.ones(n + 1, dtype=bool)  # safe[p]: a piece may start at token p
        header = len(self.meta_ids) + 2  # SOV meta SOT before the codes
        for a, b in s.image_spans:
            safe[a - header + 1:b + 1] = False  # after SOV up to EOV (b is the EOV index)
        for a, b in s.action_spans:
            safe[a:b + 1] = False  # after BOA up to EOA (b is the EOA index)
        safe[n] = True
        out, start = [], 0
        while start < n:
            ok = np.flatnonzero(safe[start + 1:start + max_len + 1])
            if ok.size == 0:
                raise LayoutError(
                    f"pack: max_len={max_len} cannot hold the element at token {start} of a {s.kind.value} "
                    f"sample (an image block is {self.image_block_len} tokens); raise max_len"
                )
            stop = start + 1 + int(ok[-1])
            out.append((start, stop))
            start = stop
        return out


class _Builder:
    """Accumulates the parts of one sample with their roles and spans."""

    def __init__(self, layout: SequenceLayout, kind: SampleKind, prompt: str):
        self.layout = layout
        self.kind = kind
        self.parts: list[np.ndarray] = []
        self.roles: list[np.ndarray] = []
        self.n = 0
        self.images: list[tuple[int, int]] = []
        self.action_spans: list[tuple[int, int]] = []
        self.texts: list[tuple[int, int]] = []
        self.add(np.asarray([layout.bos, layout.kind_tag[kind]]), Role.PROMPT)
        self.text(prompt, Role.PROMPT)

    def add(self, ids: np.ndarray, role: Role | np.ndarray) -> int:
        start = self.n
        self.parts.append(np.asarray(ids, dtype=np.int64))
        self.roles.append(np.broadcast_to(np.asarray(role, dtype=np.int8), ids.shape))
        self.n += len(ids)
        return start

    def text(self, text: str, role: Role) -> None:
        ids = self.layout.encode_text(text)
        start = self.add(ids, role)
        self.texts.append((start, start + len(ids)))

    def image(self, codes: np.ndarray) -> None:
        L = self.layout
        ids = L.image_tokens(codes)
        roles = np.full(ids.shape, Role.STRUCTURE, dtype=np.int8)
        first = len(L.meta_ids) + 2  # first code token inside the block
        roles[first + L.code_offsets] = Role.VISION
        start = self.add(ids, roles) + first
        self.images.append((start, start + L.image_span_len))

    def actions(self, bins: np.ndarray) -> None:
        L = self.layout
        start = self.add(np.asarray([L.boa]), Role.STRUCTURE) + 1
        self.add(bins + L.action.start, Role.ACTION)
        self.add(np.asarray([L.eoa]), Role.STRUCTURE)
        self.action_spans.append((start, start + len(bins)))

    def finish(self, end: bool) -> Sample:
        if end:
            self.add(np.asarray([self.layout.eos]), Role.STRUCTURE)
        tokens = np.concatenate(self.parts)  # (N,)
        roles = np.concatenate(self.roles).astype(np.int8)  # (N,)
        weights = self.layout.role_weights[roles]  # (N,)
        weights[0] = 0.0  # BOS is never a target

        def spans(x: list[tuple[int, int]]) -> np.ndarray:
            return np.asarray(x, dtype=np.int64).reshape(-1, 2)

        return Sample(self.kind, tokens, weights, roles,
                      spans(self.images), spans(self.action_spans), spans(self.texts))
