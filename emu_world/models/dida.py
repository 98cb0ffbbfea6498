"""DiDA (discrete diffusion adaptation): decode a whole image in K parallel refinement steps with
the same decoder that was trained token by token.

    noise = NoisePath(NoiseConfig("uniform", "linear"), layout.codebook_size)
    db = build_dida_batch(layout, batch.packed, noise, images_per_row=2, seed=(0, index), hints=True)
    loss, logs = dida_loss(model, db, weight=1.0)           # AR loss on clean tokens + weight x noisy-copy CE
    sampler = DidaSampler(model, layout, noise, SamplerConfig(steps=2), vision=Sampling(0.0), action_dim=14)
    frame = sampler.sample(prefix, seed=0)                   # DidaFrame: codes (h, w), forward_passes = 1 + K
    predict = frame_predictor(model, layout, FrameDecodingConfig(decoding="dida"), action_dim=14, noise=noise)
    predict(prefix, seed=0).codes                            # the same call for "ar" (token-by-token Generator)

Training sequence (:func:`build_dida_batch`). A packed batch (R, L) keeps its clean tokens; for
``images_per_row`` of each row's images (chosen by a generator seeded with the batch index, so
resuming restores them) a noisy block of ``n = b - a`` tokens is appended, where ``[a, b)`` are
the image's code tokens incl. EOLs (SOT at ``a - 1``, EOV at ``b``). Block position ``j`` stands
for clean position ``a - 1 + j``::

    input     SOT        ~x[a]      ~x[a+1]   ...  ~x[b-2]        (~: noised codes, EOLs kept)
    position  p(a-1)     p(a)       p(a+1)    ...  p(b-2)         (the clean positions' ids)
    hint      h(a-1)     h(a)       h(a+1)    ...  h(b-2)         (previous-frame hints, as AR)
    label     x[a]       x[a+1]     x[a+2]    ...  x[b-1]         (shifted: AR's alignment)

Labels that are EOLs are ignored (structure, fixed by the layout at sampling time). Noise: a time
``t ~ U(0, 1)`` per image (0: pure noise, 1: clean), and every code is kept with probability
``kappa(t)`` (the schedule) and otherwise replaced by a uniformly random code (URSA's mixture
path); or, with ``noise.path=metric``, drawn from ``softmax(-beta(t) * d(e_x, e_j))`` over the
codebook, ``beta = c * (kappa / (1 - kappa)) ** alpha`` (URSA's metric-induced path: a noisy code
is near the clean one in the tokenizer's codebook, uniform at ``kappa = 0``).

Attention (:func:`dida_attention_mask`, a dense (R, 1, T, T) additive mask, T = L + M*n):
clean tokens see the usual packed document-causal mask and never a noisy token; a noisy block
sees the clean tokens of its own document before its SOT (``< a - 1``; its own first element is
the SOT) and every position of its own block, in both directions; nothing else. A flex-attention
block mask is not built: the CPU default is sdpa with the dense mask.

Sampler (:class:`DidaSampler`). The layout's grammar places the image (SOV, the meta text and SOT
are forced after the prompt); the prompt through the meta text is prefilled into a KV cache
once; then K passes of :meth:`~emu_world.models.world_model.WorldModel.refine_block` over the n-token
block ``[SOT, x_a .. x_{b-2}]`` (positions ``p(a-1) .. p(b-2)``, full attention to the cache,
bidirectional inside, the cache cropped back after each pass). EOLs are fixed by the layout;
codes start uniformly random (seeded) at ``t_0 = 0``, or with ``sampler.start=previous`` from the
previous image's codes (the frame hints) noised on the training path to ``t_0 = start_time``
(SDEdit's warm start: in a video most of the next frame is the last one), the K steps then
spanning ``t_0 .. 1``. Update rules (``sampler.update``):

- ``renoise`` (default; the uniform-path analogue of DDIM's x0-prediction): at step k of K the
  block is at time ``t_k = t_0 + (1 - t_0) k / K``; the model's ``p(x0 | x_t)``, restricted to the vision codes,
  is sampled (temperature / top-k; temperature 0: argmax) for every code, then re-noised to
  ``t_{k+1}`` with the training path (each code kept with ``kappa(t_{k+1})``, otherwise a random
  code, or the metric draw); the last step returns the prediction itself.
- ``confidence`` (MaskGIT-style, for comparison): predictions are drawn the same way; the most
  confident not-yet-fixed ones (probability of the drawn code) are fixed until
  ``ceil(hw * (1 - cos(pi/2 * (k+1)/K)))`` codes are (MaskGIT's cosine schedule); every free code
  is replaced by a uniformly random one (the model has no [MASK] token; random codes are the
  noise it was trained on); the last step fixes all.

Image-only classifier-free guidance (``cfg_scale``): a second cache holds the unconditional
prompt (:func:`~emu_world.models.generate.unconditional_prefix`), each step runs the block through
both, and the vision logits are ``uncond + s * (cond - uncond)``. Forward passes: 1 prefill + K
(doubled with guidance). Everything is seeded by one ``torch.Generator``: same seed, same frame.

References and departures:

- Emu3.5 (arXiv 2510.26583) DiDA: a noisy copy of every image attends to the clean prefix and
  bidirectionally within itself; a brief adaptation of the AR model; ~20x faster images. Its code
  is unreleased; here noisy copies go to ``images_per_row`` images per row (not all), and the AR
  loss on the clean tokens stays in the objective so token-by-token decoding keeps working.
- URSA (baaivision/URSA): uniform and metric-induced discrete paths over the codebook, no [MASK]
  token, shifted labels. Departure: our sampler predicts x0 and re-noises on the same path
  instead of integrating URSA's kinetic-optimal velocity; time is not given to the model (it
  reads the noise level from the block).
- MaskGIT (Chang et al. 2022): confidence-ordered parallel decoding with a cosine schedule; here
  "masked" positions hold random codes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from emu_world.models.generate import (
    GenerationConfig,
    Generator,
    Sampling,
    unconditional_prefix,
)
from emu_world.models.layout import HINT_CODE, LayoutError, Packed, SequenceLayout
from emu_world.models.world_model import WorldModel, document_mask, next_token_loss

NOISE_PATHS = ("uniform", "metric")
SCHEDULES = ("linear", "cosine")
UPDATES = ("renoise", "confidence")
STARTS = ("noise", "previous")
DECODINGS = ("ar", "dida")
IGNORE = -100  # label of an appended position that is not trained (EOL labels, empty slots)


# ----------------------------------------------------------------------------- configs


@dataclass
class NoiseConfig:
    """The discrete noise path (``dida.noise``): what training corrupts with and what the sampler
    re-noises with; a DiDA export records it in its manifest."""

    path: str = "uniform"  # uniform: random codes; metric: codes near the clean one in the codebook
    schedule: str = "linear"  # kappa(t), the keep probability at time t: linear t, cosine 1 - cos(pi t / 2)
    metric_c: float = 3.0  # metric path: beta(t) = c * (kappa / (1 - kappa)) ** alpha (URSA's defaults)
    metric_alpha: float = 0.9

    def __post_init__(self) -> None:
        if self.path not in NOISE_PATHS:
            raise ValueError(f"dida.noise.path must be one of {NOISE_PATHS}, got {self.path!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"dida.noise.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.metric_c > 0 or not self.metric_alpha > 0:
            raise ValueError(f"dida.noise.metric_c and metric_alpha must be > 0, got {self.metric_c}, "
                             f"{self.metric_alpha}")


@dataclass
class SamplerConfig:
    """The DiDA sampler's knobs (``dida.sampler`` in training, recorded as the export's default)."""

    steps: int = 2  # K refinement passes (1..64); configs/train.yaml dida.sampler says why 2
    update: str = "renoise"  # renoise (x0-prediction, re-noised on the training path) | confidence (MaskGIT)
    # previous: from the previous image's codes (read from the model's frame hints) noised on the
    # training path to t = start_time, the K steps then running from there to 1. An image without
    # a previous one, a model without frame hints and the confidence rule (which re-draws every
    # undecided code at random) start from noise. noise: codes start uniformly random at t = 0.
    start: str = "previous"
    start_time: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= int(self.steps) <= 64:
            raise ValueError(f"dida sampler steps must be in 1..64, got {self.steps}")
        if self.update not in UPDATES:
            raise ValueError(f"dida sampler update must be one of {UPDATES}, got {self.update!r}")
        if self.start not in STARTS:
            raise ValueError(f"dida sampler start must be one of {STARTS}, got {self.start!r}")
        if not 0.0 <= float(self.start_time) < 1.0:
            raise ValueError(f"dida sampler start_time must be in [0, 1), got {self.start_time}")
        self.steps = int(self.steps)
        self.start_time = float(self.start_time)


@dataclass
class FrameDecodingConfig:
    """How a user of the world model (imagination rollouts, planner, explorer) decodes a frame."""

    decoding: str = "ar"  # ar: token by token (KV cache); dida: K parallel refinement steps
    vision: Sampling = field(default_factory=lambda: Sampling(0.0, 0))  # temperature 0: greedy / argmax
    cfg_scale: float | None = None  # image-only classifier-free guidance (None: off)
    dida: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if isinstance(self.vision, dict):
            self.vision = Sampling(**self.vision)
        if isinstance(self.dida, dict):
            self.dida = SamplerConfig(**self.dida)
        if self.cfg_scale is not None and not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 or null (no guidance), got {self.cfg_scale}")


# ----------------------------------------------------------------------------- the noise path


def codebook_distances(codebook: torch.Tensor) -> torch.Tensor:
    """(K, D) code vectors -> (K, K) squared Euclidean distances of their unit-normalised forms."""
    e = F.normalize(codebook.detach().float(), dim=-1)  # (K, D)
    return (2.0 - 2.0 * e @ e.T).clamp_min(0.0)  # (K, K)


def tokenizer_codebook(tokenizer: Any) -> torch.Tensor:
    """The (K, D) code vectors of an IBQ :class:`~emu_world.models.tokenizer.VisionTokenizer` (metric noise)."""
    quantizer = getattr(tokenizer, "quantizer", None)
    if quantizer is None or not hasattr(quantizer, "normalized_codebook"):
        raise ValueError(f"dida.noise.path=metric needs the code vectors of the vision tokenizer; "
                         f"{type(tokenizer).__name__} exposes none. Use dida.noise.path=uniform")
    return quantizer.normalized_codebook().detach()


class NoisePath:
    """``q(x_t | x_0)`` per code, at time ``t`` in [0, 1] (0: pure noise, 1: clean).

    ``codebook`` (K, D) is needed by the metric path only (:func:`tokenizer_codebook`).
    """

    def __init__(self, config: NoiseConfig, codebook_size: int, codebook: torch.Tensor | None = None):
        self.config = config
        self.codebook_size = int(codebook_size)
        self.distances: torch.Tensor | None = None  # (K, K), metric path
        if config.path == "metric":
            if codebook is None:
                raise ValueError("dida.noise.path=metric needs the tokenizer's codebook (tokenizer_codebook(tok))")
            if codebook.shape[0] != self.codebook_size:
                raise ValueError(f"codebook has {codebook.shape[0]} codes, the layout {self.codebook_size}")
            self.distances = codebook_distances(codebook)

    def keep(self, t: torch.Tensor | float) -> torch.Tensor:
        """kappa(t): probability that a code is still the clean one at time ``t`` (uniform path)."""
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0.0, 1.0)
        if self.config.schedule == "linear":
            return t
        return 1.0 - torch.cos(0.5 * math.pi * t)

    def sample(self, clean: torch.Tensor, t: torch.Tensor | float, gen: torch.Generator) -> torch.Tensor:
        """(N,) clean codes in [0, K) and (N,) or scalar times -> (N,) noisy codes (CPU generator)."""
        clean = clean.reshape(-1).cpu()
        kappa = self.keep(t).expand(clean.shape)  # (N,)
        if self.distances is None:  # uniform: keep with kappa, else any code (the clean one included)
            kept = torch.rand(clean.shape, generator=gen) < kappa
            random = torch.randint(0, self.codebook_size, clean.shape, generator=gen)
            return torch.where(kept, clean, random)
        k = kappa.clamp(max=1.0 - 1e-6)
        beta = self.config.metric_c * (k / (1.0 - k)) ** self.config.metric_alpha  # (N,)
        probs = torch.softmax(-beta[:, None] * self.distances[clean], dim=-1)  # (N, K)
        drawn = torch.multinomial(probs, 1, generator=gen)[:, 0]
        return torch.where(kappa >= 1.0, clean, drawn)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU torch generator whose seed is a pure function of the integers ``key``."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- training sequences


@dataclass
class DidaBatch:
    """A packed batch with noisy image blocks appended (T = L + M * n). Tensors on one device."""

    tokens: torch.Tensor  # (R, T) int64: clean row (L) then M noisy blocks of n; PAD in empty slots
    weights: torch.Tensor  # (R, L) float: the layout's AR loss weights of the clean part
    roles: torch.Tensor  # (R, L) int8: roles of the clean part (per-role logs)
    position_ids: torch.Tensor  # (R, T) int64
    hints: torch.Tensor | None  # (R, T[, C]) int64 previous-frame hints (-1: none); None: the model takes none
    attention_mask: torch.Tensor  # (R, 1, T, T) additive (0 allowed, dtype min blocked)
    labels: torch.Tensor  # (R, M * n) int64 target of each appended position; IGNORE where none
    blocks: torch.Tensor  # (R, M, 2) int64: clean [a, b) of the image behind each slot; -1 for an empty slot
    times: torch.Tensor  # (R, M) float: the time of each block's noise (nan for an empty slot)
    clean_len: int  # L
    block_len: int  # n

    @property
    def noisy_codes(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> "DidaBatch":
        """The same batch with its tensors on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def dida_attention_mask(doc_ids: torch.Tensor, starts: torch.Tensor, block_len: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, L) document ids + (R, M) clean start ``a`` of each slot's image (-1: empty slot) ->
    (R, 1, T, T) additive mask, T = L + M * n.

    Allowed (0): clean query i, clean key j: same document and j <= i (padding, doc -1, is its own
    causal block). Noisy query in slot m of image (a, doc d): clean keys j < a - 1 of document d,
    and every position of slot m. Everything else is the dtype's minimum. An empty slot sees only
    itself (no row is fully masked, so sdpa returns no NaN).
    """
    R, L = doc_ids.shape
    M = starts.shape[1]
    n = int(block_len)
    T = L + M * n
    device = doc_ids.device
    allowed = torch.zeros(R, T, T, dtype=torch.bool, device=device)
    allowed[:, :L, :L] = document_mask(doc_ids)[:, 0] == 0  # (R, L, L) packed document-causal
    slot = torch.arange(M * n, device=device) // n  # (M*n,) slot of each appended position
    q_start = starts[:, slot]  # (R, M*n): a of the query's image, -1 for empty slots
    q_doc = torch.gather(doc_ids, 1, q_start.clamp(min=0))  # (R, M*n)
    q_doc = torch.where(q_start >= 0, q_doc, torch.full_like(q_doc, -2))  # -2 matches no key
    keys = torch.arange(L, device=device)  # (L,)
    prefix = (doc_ids[:, None, :] == q_doc[:, :, None]) & (keys[None, None, :] < (q_start - 1)[:, :, None])
    allowed[:, L:, :L] = prefix  # (R, M*n, L)
    allowed[:, L:, L:] = (slot[:, None] == slot[None, :])[None]  # (1, M*n, M*n) bidirectional per slot
    mask = torch.zeros(R, 1, T, T, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def choose_images(image_spans: np.ndarray, rows: int, per_row: int, rng: np.random.Generator) -> np.ndarray:
    """(R, M, 2) clean [a, b) of up to M images per row drawn without replacement by ``rng`` (in
    row order), -1 where a row has fewer images."""
    out = np.full((rows, per_row, 2), -1, dtype=np.int64)
    for r in range(rows):
        mine = image_spans[image_spans[:, 0] == r, 1:]  # (F_r, 2)
        if len(mine) == 0:
            continue
        pick = np.sort(rng.choice(len(mine), size=min(per_row, len(mine)), replace=False))
        out[r, :len(pick)] = mine[pick]
    return out


def build_dida_batch(layout: SequenceLayout, packed: Packed, noise: NoisePath, images_per_row: int,
                     seed: Sequence[int], hints: bool, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, action_slots: int = 0) -> DidaBatch:
    """Append noisy copies of ``images_per_row`` images of every row (module docstring).

    ``seed`` (e.g. ``(dida.seed, batch index)``) fixes which images, their times and their noise,
    so a batch is a pure function of it. ``hints``: compute previous-frame hints (models with
    ``frame_hints``; ``action_slots``: their ``action_hints``): the block's are the clean positions'
    ``a - 1 .. b - 2``.
    """
    if images_per_row < 1:
        raise ValueError(f"dida.images_per_row must be >= 1, got {images_per_row}")
    tokens = torch.as_tensor(packed.tokens)  # (R, L)
    doc_ids = torch.as_tensor(packed.doc_ids)  # (R, L)
    positions = torch.as_tensor(packed.position_ids)  # (R, L)
    R, L = tokens.shape
    n, M = layout.image_span_len, int(images_per_row)
    rng = np.random.default_rng([int(s) for s in seed])
    gen = seeded_generator(*seed, 1)
    blocks = torch.as_tensor(choose_images(packed.image_spans, R, M, rng))  # (R, M, 2)
    filled = blocks[..., 0] >= 0  # (R, M)
    clean_hints = layout.frame_hints(tokens, doc_ids, action_slots) if hints else None  # (R, L[, C])

    offsets = torch.arange(n)  # (n,) block position j stands for clean position a - 1 + j
    src = (blocks[..., :1].clamp(min=1) - 1 + offsets).clamp(max=L - 1)  # (R, M, n) clean index a-1+j
    rows = torch.arange(R)[:, None, None]
    block_in = tokens[rows, src].clone()  # (R, M, n): SOT, x[a] .. x[b-2]
    labels = tokens[rows, (src + 1).clamp(max=L - 1)].clone()  # (R, M, n): x[a] .. x[b-1]
    block_pos = positions[rows, src]  # (R, M, n)

    is_code = (block_in >= layout.vision.start) & (block_in < layout.vision.stop)  # EOLs and SOT stay
    is_code[..., 0] = False
    times = torch.rand(R, M, generator=gen)  # (R, M) t ~ U(0, 1) per image
    t_tok = times[:, :, None].expand(R, M, n)[is_code]  # (N,)
    block_in[is_code] = noise.sample(block_in[is_code] - layout.vision.start, t_tok, gen) + layout.vision.start
    labels = torch.where((labels >= layout.vision.start) & (labels < layout.vision.stop), labels,
                         torch.full_like(labels, IGNORE))
    empty = ~filled[:, :, None].expand(R, M, n)
    block_in[empty] = layout.pad
    labels[empty] = IGNORE
    block_pos = torch.where(empty, offsets.expand(R, M, n), block_pos)

    all_hints = None
    if clean_hints is not None:
        block_hints = clean_hints[rows, src]  # (R, M, n[, C])
        block_hints = block_hints.masked_fill(empty.reshape(empty.shape + (1,) * (block_hints.dim() - 3)), -1)
        all_hints = torch.cat([clean_hints, block_hints.reshape((R, M * n) + block_hints.shape[3:])], 1).to(device)
    mask = dida_attention_mask(doc_ids, torch.where(filled, blocks[..., 0], -1), n, dtype)
    return DidaBatch(
        tokens=torch.cat([tokens, block_in.reshape(R, M * n)], 1).to(device),
        weights=torch.as_tensor(packed.weights).to(device),
        roles=torch.as_tensor(packed.roles).to(device),
        position_ids=torch.cat([positions, block_pos.reshape(R, M * n)], 1).to(device),
        hints=all_hints, attention_mask=mask.to(device), labels=labels.reshape(R, M * n).to(device),
        blocks=blocks.to(device), times=torch.where(filled, times, torch.nan).to(device), clean_len=L, block_len=n,
    )


def noisy_copy_scores(logits: torch.Tensor, labels: torch.Tensor,
                      layout: SequenceLayout) -> tuple[torch.Tensor, int, int]:
    """(R, M*n, V) logits of the appended positions and their labels -> (mean CE over the vision
    labels (a graph tensor), correct argmax-over-codes predictions, number of labels)."""
    sel = labels != IGNORE  # (R, M*n)
    count = int(sel.sum())
    if count == 0:
        return logits.sum() * 0.0, 0, 0
    chosen = logits[sel].float()  # (N, V)
    ce = F.cross_entropy(chosen, labels[sel])
    vision = chosen[:, layout.vision.start:layout.vision.stop]  # (N, K)
    correct = int((vision.argmax(-1) + layout.vision.start == labels[sel]).sum())
    return ce, correct, count


def dida_loss(model: WorldModel, batch: DidaBatch, weight: float,
              layout: SequenceLayout) -> tuple[torch.Tensor, dict[str, float]]:
    """AR loss on the clean tokens (layout weights, :func:`~emu_world.models.world_model.next_token_loss`)
    + ``weight`` x mean CE of the noisy blocks' vision labels, from one forward pass over the row.

    Logs: ``loss`` (the total), ``ar/loss``, ``ce/<role>`` of the clean part, ``tokens``,
    ``dida/ce``, ``dida/acc`` (argmax over the codes) and ``dida/codes`` (labels counted).
    """
    logits = model.logits(batch.tokens, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                          hints=batch.hints)  # (R, T, V)
    L = batch.clean_len
    ar, logs = next_token_loss(logits[:, :L], batch.tokens[:, :L], batch.weights, batch.roles)
    ce, correct, count = noisy_copy_scores(logits[:, L:], batch.labels, layout)
    loss = ar + float(weight) * ce
    logs = {**logs, "ar/loss": logs["loss"], "loss": float(loss.detach()), "dida/codes": float(count)}
    if count:
        logs["dida/ce"] = float(ce.detach())
        logs["dida/acc"] = correct / count
    return loss, logs


# ----------------------------------------------------------------------------- sampling


@dataclass
class DidaFrame:
    """One image decoded by :class:`DidaSampler`."""

    codes: np.ndarray  # (h, w) int64 codes
    tokens: np.ndarray  # (N,) int64: prompt + SOV meta SOT codes-with-EOLs EOV (a valid stream)
    forward_passes: int  # model calls: prefill(s) + K refinement passes (x2 with guidance)
    steps: int  # K
    seconds: float


def sample_codes(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) code logits -> (N,) codes drawn with temperature / top-k (argmax at temperature 0) and
    (N,) the probability of each drawn code under the (temperature-scaled, top-k cut) distribution."""
    logits = logits.float().cpu()
    if s.temperature == 0:
        probs = torch.softmax(logits, dim=-1)  # (N, K)
        codes = logits.argmax(-1)
    else:
        if 0 < s.top_k < logits.shape[-1]:
            kth = logits.topk(int(s.top_k), dim=-1).values[:, -1:]  # (N, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / s.temperature, dim=-1)  # (N, K)
        codes = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return codes, probs.gather(1, codes[:, None])[:, 0]


def image_head(layout: SequenceLayout, prefix: Sequence[int], action_dim: int | None = None) -> list[int]:
    """``prefix`` + the forced ``SOV meta`` that start the next image (the grammar decides).

    Raises :class:`LayoutError` where no image may start (e.g. right after an image of a
    dynamics stream, where an action span must come first).
    """
    prefix = [int(t) for t in np.asarray(prefix).reshape(-1).tolist()]
    st = layout.state_after(prefix, action_dim)  # validates the prefix
    allowed = st.allowed()
    if st.done or layout.sov not in allowed:
        raise LayoutError(
            f"DiDA decodes an image where one may start, but after this prompt the grammar expects "
            f"{allowed.name} ({st.where()}); end the prompt after an action span (dynamics) or after a text "
            "segment (plan, exploration)"
        )
    head = prefix + [layout.sov]
    st.advance(layout.sov)
    while st.allowed().forced is not None and st.allowed().forced != layout.sot:
        token = st.allowed().forced
        head.append(token)
        st.advance(token)
    if st.allowed().forced != layout.sot:
        raise LayoutError(f"DiDA: expected SOT after the image meta text, the grammar says {st.allowed().name}")
    return head


class _BlockContext:
    """A prefilled KV cache and the previous-frame hints of the image block after it."""

    def __init__(self, model: WorldModel, layout: SequenceLayout, head: list[int], device: torch.device):
        n = layout.image_span_len
        self.model, self.length = model, len(head)
        if self.length + n > model.config.max_position_embeddings:
            raise ValueError(f"DiDA: a prompt of {self.length} tokens + an image block of {n} exceeds "
                             f"model.max_position_embeddings={model.config.max_position_embeddings}")
        self.cache = model.new_cache()
        stream = head + [layout.sot] + [layout.eol] * n  # codes do not matter for the hints of this image
        hints = model.hints_for(torch.tensor([stream], device=device)) if model.hint_embed is not None else None
        self.block_hints = hints[:, self.length:self.length + n] if hints is not None else None  # (1, n)
        model.extend(torch.tensor([head], device=device), self.cache,
                     hints[:, :self.length] if hints is not None else None)

    def logits(self, block: torch.Tensor) -> torch.Tensor:
        """(1, n) block -> (1, n, V) logits; the cache keeps only the prompt."""
        return self.model.refine_block(block, self.cache, self.block_hints)

    def previous_codes(self, logit_of_code: torch.Tensor) -> torch.Tensor | None:
        """(hw,) the previous image's code at each cell (from the hints), or None when the model
        takes no hints or this image has no previous one."""
        if self.block_hints is None:
            return None
        hints = self.block_hints[0, logit_of_code]  # (hw[, C])
        prev = (hints[:, HINT_CODE] if hints.dim() == 2 else hints).cpu()
        return prev if bool((prev >= 0).all()) else None


class DidaSampler:
    """Parallel decoding of the next image (module docstring: update rules, guidance, passes)."""

    def __init__(self, model: WorldModel, layout: SequenceLayout, noise: NoisePath, config: SamplerConfig | None = None,
                 vision: Sampling | None = None, cfg_scale: float | None = None, action_dim: int | None = None):
        if model.vocab_size != layout.vocab_size:
            raise ValueError(f"DidaSampler: model vocabulary {model.vocab_size} != layout vocabulary "
                             f"{layout.vocab_size}")
        if noise.codebook_size != layout.codebook_size:
            raise ValueError(f"DidaSampler: noise path over {noise.codebook_size} codes, layout has "
                             f"{layout.codebook_size}")
        self.model, self.layout, self.noise = model, layout, noise
        self.config = config or SamplerConfig()
        self.vision = vision or Sampling(0.0, 0)
        self.cfg_scale = cfg_scale
        self.action_dim = action_dim
        n = layout.image_span_len
        self.block_of_code = torch.as_tensor(layout.code_offsets + 1)  # (hw,) block position holding code i
        self.logit_of_code = torch.as_tensor(layout.code_offsets)  # (hw,) block position predicting code i
        template = torch.full((n,), layout.eol, dtype=torch.long)  # (n,) SOT, then codes / EOLs
        template[0] = layout.sot
        self.template = template

    @torch.no_grad()
    def sample(self, prefix: Sequence[int], seed: int = 0, steps: int | None = None,
               uncond_prefix: Sequence[int] | None = None) -> DidaFrame:
        """The next image after ``prefix`` in ``steps`` (default ``config.steps``) refinement passes."""
        K = int(steps) if steps is not None else self.config.steps
        replace(self.config, steps=K)  # range check
        was_training = self.model.training
        self.model.eval()
        try:
            return self._sample(prefix, int(seed), K, uncond_prefix)
        finally:
            self.model.train(was_training)

    def _block(self, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(hw,) codes -> (1, n) block ids ``[SOT, x_a .. x_{b-2}]`` with the layout's EOLs."""
        block = self.template.clone()
        block[self.block_of_code] = codes + self.layout.vision.start
        return block[None].to(device)

    def _sample(self, prefix: Sequence[int], seed: int, K: int, uncond_prefix: Sequence[int] | None) -> DidaFrame:
        L, model = self.layout, self.model
        device = next(model.parameters()).device
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        head = image_head(L, prefix, self.action_dim)
        contexts = [_BlockContext(model, L, head, device)]
        if self.cfg_scale is not None:
            # the conditioning-free prompt is no grammatical stream (no prompt text): not validated, the
            # same image header appended
            u = unconditional_prefix(L, prefix, self.action_dim) if uncond_prefix is None else list(uncond_prefix)
            contexts.append(_BlockContext(model, L, [int(t) for t in u] + head[len(head) - 1 - len(L.meta_ids):],
                                          device))
        passes = len(contexts)
        hw, Kc = len(L.code_offsets), L.codebook_size
        codes = torch.randint(0, Kc, (hw,), generator=gen)  # t_0 = 0: pure noise
        t0 = 0.0
        if self.config.start == "previous" and self.config.update == "renoise":
            prev = contexts[0].previous_codes(self.logit_of_code)  # None: no hints or no previous image
            if prev is not None:  # SDEdit-like: the previous image, noised to t0, is the starting block
                t0 = self.config.start_time
                codes = self.noise.sample(prev, t0, gen)
        fixed = torch.zeros(hw, dtype=torch.bool)  # confidence rule: codes decided for good
        for k in range(K):
            block = self._block(codes, device)
            out = [c.logits(block)[0, self.logit_of_code, L.vision.start:L.vision.stop] for c in contexts]  # (hw, Kc)
            passes += len(contexts)
            logits = out[0] if len(out) == 1 else out[1] + self.cfg_scale * (out[0] - out[1])
            pred, conf = sample_codes(logits, self.vision, gen)  # (hw,), (hw,)
            if k == K - 1:
                codes = torch.where(fixed, codes, pred)
            elif self.config.update == "renoise":
                codes = self.noise.sample(pred, t0 + (1.0 - t0) * (k + 1) / K, gen)  # back to time t_{k+1}
            else:
                target = math.ceil(hw * (1.0 - math.cos(0.5 * math.pi * (k + 1) / K)))
                free = (~fixed).nonzero()[:, 0]  # (f,)
                take = free[conf[free].argsort(descending=True, stable=True)[:max(0, target - int(fixed.sum()))]]
                codes = torch.where(fixed, codes, pred)  # fixed codes keep their value
                fixed[take] = True
                codes = torch.where(fixed, codes, torch.randint(0, Kc, (hw,), generator=gen))
        grid = codes.reshape(L.grid).numpy().astype(np.int64)
        body = np.full((L.grid[0], L.grid[1] + 1), L.eol, dtype=np.int64)  # (h, w+1)
        body[:, :-1] = grid + L.vision.start
        tokens = np.concatenate([np.asarray(head, dtype=np.int64), [L.sot], body.reshape(-1), [L.eov]])
        return DidaFrame(grid, tokens, passes, K, time.perf_counter() - start)


# ----------------------------------------------------------------------------- choosing AR or DiDA


@dataclass
class FramePrediction:
    """The next frame, whichever decoder produced it."""

    codes: np.ndarray  # (h, w) int64
    tokens: np.ndarray  # (N,) int64: the prompt continued through the image's EOV
    seconds: float
    forward_passes: int


class FramePredictor(Protocol):
    """``predict(prefix, seed) -> FramePrediction``: the next image after a prompt."""

    def __call__(self, prefix: Sequence[int], seed: int = 0) -> FramePrediction: ...


class ARFramePredictor:
    """Token-by-token decoding (:class:`~emu_world.models.generate.Generator`, KV cache)."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.name = "ar"

    def __call__(self, prefix: Sequence[int], seed: int = 0) -> FramePrediction:
        out = self.generator.generate_frame(prefix, seed=seed)
        r = out.result
        return FramePrediction(out.codes, r.tokens, r.seconds, r.forward_passes)


class DidaFramePredictor:
    """K parallel refinement passes (:class:`DidaSampler`)."""

    def __init__(self, sampler: DidaSampler):
        self.sampler = sampler
        c = sampler.config
        self.name = f"dida K={c.steps} ({c.update}, start={c.start})"

    def __call__(self, prefix: Sequence[int], seed: int = 0) -> FramePrediction:
        out = self.sampler.sample(prefix, seed=seed)
        return FramePrediction(out.codes, out.tokens, out.seconds, out.forward_passes)


def frame_predictor(model: WorldModel, layout: SequenceLayout, config: FrameDecodingConfig,
                    action_dim: int | None = None,
                    noise: NoisePath | None = None) -> ARFramePredictor | DidaFramePredictor:
    """The frame decoder ``config.decoding`` names; ``noise`` is the model's path (DiDA only;
    :meth:`~emu_world.models.export.WorldModelExport.noise_path` reads it from an export)."""
    if config.decoding == "ar":
        gen = Generator(model, layout, GenerationConfig(vision=config.vision, cfg_scale=config.cfg_scale),
                        action_dim=action_dim)
        return ARFramePredictor(gen)
    if noise is None:
        raise ValueError("decoding=dida needs the model's noise path (WorldModelExport.noise_path(layout, tokenizer))")
    return DidaFramePredictor(DidaSampler(model, layout, noise, config.dida, config.vision, config.cfg_scale,
                                          action_dim))
