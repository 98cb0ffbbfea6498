"""Token-by-token generation with a KV cache, steered by the layout's grammar.

    gen = Generator(model, layout, GenerationConfig(vision=Sampling(1.0, 64), cfg_scale=3.0), action_dim=14)
    frame = gen.generate_frame(prefix, seed=0)        # FrameResult: codes (h, w), result
    acts = gen.generate_actions(prefix, seed=0)       # ActionResult: bins (k, A), result
    out = gen.generate(prefix, max_new_tokens=500)    # until EOS or the budget

At every step the layout's :class:`~emu_world.models.layout.StreamState` says what may come next. A
single allowed id (BOS, the image meta ``"h*w"``, SOT, EOL, EOV, EOA after a full span, SOV
after a maximal text) is appended without sampling; otherwise the logits are masked to the
allowed ids and sampled with the temperature/top-k of the modality (vision codes, action bins,
text and the remaining structure choices). Forced tokens are not fed one by one: they wait in
the context and go through the model together with the next token that needs logits, so a run
such as ``EOV BOA`` or ``SOV meta SOT`` costs one forward pass. The prompt is prefilled once.

Classifier-free guidance (optional, image tokens only): a second context holds the prompt with
its conditioning removed (:func:`unconditional_prefix`: task/scene text, subtasks, commands and
action bins dropped; images and structure kept) in its own KV cache and receives every
generated token; at vision-code steps the logits are ``uncond + scale * (cond - uncond)``. It is
only fed when vision logits are needed, so it costs one forward pass per vision code.

References and departures: Emu3/Emu3.5 sample images token by token with top-k and CFG on the
image tokens; the structure tokens are fixed by the layout here rather than left to the model.
Guidance only helps a model trained with conditioning dropped in the same way
(``data.cond_dropout``: :meth:`~emu_world.models.layout.SequenceLayout.drop_conditioning`, the same rule);
with scale 1 it equals no guidance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from emu_world.models.layout import (
    Allowed,
    LayoutError,
    Parsed,
    SampleKind,
    SequenceLayout,
    StreamState,
)
from emu_world.models.world_model import WorldModel

MODALITIES = ("vision", "text", "action")


@dataclass
class Sampling:
    """How one modality is sampled: ``temperature=0`` is greedy; ``top_k=0`` keeps every allowed id."""

    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"sampling temperature must be >= 0 (0: greedy), got {self.temperature}")
        if int(self.top_k) < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0: no cut), got {self.top_k}")


@dataclass
class GenerationConfig:
    """Per-modality sampling and optional classifier-free guidance on image tokens."""

    vision: Sampling = field(default_factory=lambda: Sampling(1.0, 0))
    text: Sampling = field(default_factory=lambda: Sampling(1.0, 0))  # also structure choices (EOS, BOA, SOV)
    action: Sampling = field(default_factory=lambda: Sampling(1.0, 0))
    cfg_scale: float | None = None  # None: no guidance; s: uncond + s * (cond - uncond) on vision codes

    def __post_init__(self) -> None:
        if self.cfg_scale is not None and not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 or None (no guidance), got {self.cfg_scale}")


@dataclass
class GenerationResult:
    """One generated stream."""

    tokens: np.ndarray  # (N,) int64: prefix + new tokens
    new_tokens: np.ndarray  # (n,) int64
    parsed: Parsed | None  # the whole stream read back; None if it stopped inside an element (budget)
    stop: str  # "eos", "target" (requested images/action spans done) or "budget"
    sampled: dict[str, int]  # tokens chosen by the model, per modality (vision, text, action)
    forced: int  # tokens fixed by the grammar, appended without sampling
    forward_passes: int  # model calls, both contexts, prefill included
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_tokens) / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class FrameResult:
    codes: np.ndarray  # (h, w) int64 codes of the generated image
    result: GenerationResult


@dataclass
class ActionResult:
    bins: np.ndarray  # (k, A) int64 bins of the generated action span (decode with ActionBinner)
    result: GenerationResult


def unconditional_prefix(layout: SequenceLayout, prefix: Sequence[int], action_dim: int | None = None) -> list[int]:
    """The prefix without its conditioning: text outside images (task/scene, subtasks,
    commands) and action bins are dropped; BOS, the kind tag, images and the other structure
    tokens stay. The context for classifier-free guidance."""
    tokens = np.asarray(prefix, dtype=np.int64).reshape(-1)
    return tokens[~layout.conditioning_mask(tokens, action_dim)].tolist()


class _Context:
    """A KV cache plus the tokens not yet fed to the model; ``logits()`` feeds them in one pass."""

    def __init__(self, model: WorldModel, tokens: Sequence[int], device: torch.device):
        self.model = model
        self.cache = model.new_cache()
        self.pending = list(tokens)
        self.fed: list[int] = []  # tokens already in the cache (the stream, for previous-frame hints)
        self.sots: list[int] = []  # positions of the SOTs in the stream
        self.device = device
        self.passes = 0

    def push(self, token: int) -> None:
        self.pending.append(token)

    def logits(self) -> torch.Tensor:
        """(V,) logits for the token after everything pushed so far."""
        if not self.pending:
            raise RuntimeError("generation context: no new token since the last forward pass")
        n = len(self.pending)
        hints = None
        if self.model.hint_embed is not None:
            sot = self.model.layout_sot
            new_sots = [len(self.fed) + i for i, t in enumerate(self.pending) if t == sot]
            self.sots += new_sots
            # the hints of the new positions depend only on the image they precede, the one before
            # it and the action span between them: recompute them on the tail from the SOT before
            # those (not the whole stream)
            m = len(new_sots) + 2
            start = self.sots[-m] if len(self.sots) >= m else 0
            tail = torch.tensor([self.fed[start:] + self.pending], dtype=torch.long, device=self.device)
            hints = self.model.hints_for(tail)[:, -n:]  # (1, n[, C])
        ids = torch.tensor([self.pending], dtype=torch.long, device=self.device)  # (1, n)
        self.fed += self.pending
        self.pending = []
        self.passes += 1
        return self.model.extend(ids, self.cache, hints)[0]  # (V,)


class Generator:
    """Grammar-steered sampling from a :class:`WorldModel` (one stream at a time)."""

    def __init__(self, model: WorldModel, layout: SequenceLayout, config: GenerationConfig | None = None,
                 action_dim: int | None = None):
        if model.vocab_size != layout.vocab_size:
            raise ValueError(f"Generator: model vocabulary {model.vocab_size} != layout vocabulary {layout.vocab_size}")
        self.model = model
        self.layout = layout
        self.config = config or GenerationConfig()
        self.action_dim = action_dim  # bins per action step; None: learnt from the prefix's first span
        self._no_eos: dict[str, Allowed] = {}

    def _modality(self, allowed: Allowed) -> str:
        if allowed.name == "vision":
            return "vision"
        if allowed.name.startswith("bins"):
            return "action"
        return "text"

    def _without_eos(self, allowed: Allowed) -> Allowed:
        eos = self.layout.eos
        if eos not in allowed:
            return allowed
        if allowed.name not in self._no_eos:
            ranges = [r for r in allowed.ranges if r != (eos, eos + 1)]
            self._no_eos[allowed.name] = Allowed(f"{allowed.name} without EOS", ranges, self.layout.vocab_size)
        return self._no_eos[allowed.name]

    @staticmethod
    def _sample(logits: torch.Tensor, allowed: Allowed, s: Sampling, gen: torch.Generator) -> int:
        masked = logits.float().masked_fill(~allowed.mask.to(logits.device), float("-inf"))  # (V,)
        if s.temperature == 0:
            return int(masked.argmax())
        n_allowed = sum(b - a for a, b in allowed.ranges)
        if 0 < s.top_k < n_allowed:
            kth = masked.topk(s.top_k).values[-1]
            masked = masked.masked_fill(masked < kth, float("-inf"))
        probs = torch.softmax(masked / s.temperature, dim=-1).cpu()  # (V,)
        return int(torch.multinomial(probs, 1, generator=gen))

    @torch.no_grad()
    def generate(self, prefix: Sequence[int], max_new_tokens: int | None = None, images: int = 0,
                 action_spans: int = 0, seed: int = 0, uncond_prefix: Sequence[int] | None = None,
                 stop_at_image: bool = False) -> GenerationResult:
        """Continue ``prefix`` until EOS, ``max_new_tokens`` (None: the model's position budget),
        or until ``images`` new images and ``action_spans`` new action spans are complete (EOS is
        not allowed before). ``stop_at_image``: stop when the model starts an image (SOV) after
        generating something, without it (stop ``"image"``): text-only generation, e.g. a plan's
        next subtask. ``seed`` fixes the sampling. With ``config.cfg_scale`` set, vision codes are
        guided by ``uncond_prefix`` (default :func:`unconditional_prefix`)."""
        L = self.layout
        prefix = [int(t) for t in np.asarray(prefix).reshape(-1).tolist()]
        st = L.state_after(prefix, self.action_dim)  # validates the prefix
        if st.done:
            raise LayoutError("Generator: the prefix already ends with EOS")
        if action_spans and st.kind is not None and st.kind != SampleKind.DYNAMICS:
            raise ValueError(f"Generator: a {st.kind.value} stream has no action spans; only dynamics streams do")
        budget = self.model.config.max_position_embeddings - len(prefix)
        if max_new_tokens is not None:
            budget = min(budget, int(max_new_tokens))
        if budget < 1:
            raise ValueError(f"Generator: no room to generate (prefix {len(prefix)} tokens, budget {budget})")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._decode(st, prefix, budget, images, action_spans, seed, uncond_prefix, stop_at_image)
        finally:
            self.model.train(was_training)

    def _decode(self, st: StreamState, prefix: list[int], budget: int, images: int, action_spans: int, seed: int,
                uncond_prefix: Sequence[int] | None, stop_at_image: bool = False) -> GenerationResult:
        """The decoding loop of :meth:`generate` (arguments checked there); advances ``st``."""
        L, model, cfg = self.layout, self.model, self.config
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(int(seed))
        start = time.perf_counter()

        cond = _Context(model, prefix, device)
        uncond = None
        if cfg.cfg_scale is not None:
            u = unconditional_prefix(L, prefix, self.action_dim) if uncond_prefix is None else list(uncond_prefix)
            uncond = _Context(model, u, device)
        images0, spans0 = st.images, st.spans
        sampled = dict.fromkeys(MODALITIES, 0)
        forced = 0
        new: list[int] = []
        while True:
            reached = st.images - images0 >= images and st.spans - spans0 >= action_spans
            if (images or action_spans) and reached:
                stop = "target"
                break
            if len(new) >= budget:
                stop = "budget"
                break
            allowed = st.allowed()
            if not reached:
                allowed = self._without_eos(allowed)
            if allowed.forced is not None:
                token = allowed.forced
                forced += 1
            else:
                modality = self._modality(allowed)
                logits = cond.logits()  # (V,)
                if uncond is not None and modality == "vision":
                    base = uncond.logits()  # (V,)
                    logits = base + cfg.cfg_scale * (logits - base)
                token = self._sample(logits, allowed, getattr(cfg, modality), gen)
                sampled[modality] += 1
            if stop_at_image and token == L.sov and new:
                stop = "image"
                break
            st.advance(token)
            new.append(token)
            cond.push(token)
            if uncond is not None:
                uncond.push(token)
            if st.done:
                stop = "eos"
                break
        seconds = time.perf_counter() - start
        passes = cond.passes + (uncond.passes if uncond is not None else 0)
        tokens = np.asarray(prefix + new, dtype=np.int64)
        try:
            parsed = L.parse(tokens, complete=False, action_dim=self.action_dim)
        except LayoutError:  # stopped by the budget inside an image, action span or empty text
            parsed = None
        return GenerationResult(tokens, np.asarray(new, dtype=np.int64), parsed, stop, sampled, forced, passes,
                                seconds)

    def generate_frame(self, prefix: Sequence[int], **kwargs) -> FrameResult:
        """The next image after ``prefix`` (and whatever the grammar puts before it: actions in a
        dynamics stream, a subtask or command in a plan or exploration stream)."""
        result = self.generate(prefix, images=1, **kwargs)
        if result.stop != "target":
            raise RuntimeError(f"generate_frame: stopped by the token budget after {len(result.new_tokens)} "
                               "tokens before the image was complete; raise max_new_tokens")
        return FrameResult(result.parsed.frames[-1], result)

    def generate_actions(self, prefix: Sequence[int], **kwargs) -> ActionResult:
        """The next action span after ``prefix`` (a dynamics stream; an image first if one is due)."""
        result = self.generate(prefix, action_spans=1, **kwargs)
        if result.stop != "target":
            raise RuntimeError(f"generate_actions: stopped by the token budget after {len(result.new_tokens)} "
                               "tokens before the action span was complete; raise max_new_tokens")
        return ActionResult(result.parsed.action_bins[-1], result)
