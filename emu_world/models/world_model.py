"""The world model: a Qwen3-shaped decoder over the layout's one vocabulary.

    layout = SequenceLayout.from_config(LayoutConfig(), codebook_size=1024, grid=(8, 8))
    model = WorldModel(WorldModelConfig.preset("small"), layout)     # vocab size from the layout
    packed = layout.pack(samples, max_len=1024)
    loss, logs = model(**model.packed_inputs(packed))               # weighted next-token CE
    model.save("checkpoints/world_model"); WorldModel.load("checkpoints/world_model", layout)

Generation (KV cache, grammar-forced structure tokens, per-modality sampling, CFG) lives in
:mod:`emu_world.models.generate`; this module is the network, its loss and its checkpoint format.

References and departures:

- Emu3.5 (arXiv 2510.26583) is a decoder-only transformer initialised from Qwen3: RMSNorm,
  QK-norm, grouped-query attention, SwiGLU MLP, rotary position embeddings, next-token
  prediction over text + vision tokens. We use transformers' ``Qwen3ForCausalLM`` with a small
  config, so the KV cache, SDPA and distributed tooling are the library's. Departure: the
  vocabulary is ours (text | specials | vision codes | action bins, :mod:`emu_world.models.layout`).
- Emu3 (arXiv 2409.18869): vision tokens weigh 0.5 in the loss. The weights come from the layout
  (``weights[i]`` weighs predicting token ``i``); the loss is their weighted mean.
- Packing: several documents share one row; position ids restart at every document and each
  attends only to itself (the same result as running each alone). With ``sdpa`` the decoder runs
  one causal attention call per document (:func:`packed_sdpa_attention`: the work is the sum of
  the documents' squared lengths, not the row's, and no L x L mask is read); ``eager`` and callers
  with their own mask (DiDA) use the block-diagonal causal 4-D additive mask.

Files: ``model.safetensors`` (weights) + ``config.json`` (format tag, :class:`WorldModelConfig`,
the layout ``spec`` the weights were trained for). Never pickles.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import AttentionInterface, Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from emu_world.models.layout import (
    HINT_ACTIONS,
    HINT_CELL,
    HINT_CODE,
    Packed,
    Role,
    SequenceLayout,
)

FORMAT_NAME = "emu_world.world_model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
PACKED_SDPA = "emu_world_packed_sdpa"  # the transformers attention name model.attn_implementation=sdpa builds


@dataclass
class WorldModelConfig:
    """Architecture of the decoder (``configs/model/<name>.yaml``; named presets in :data:`PRESETS`).

    ``vocab_size=None`` takes the vocabulary size from the layout the model is built with (the
    usual case); a fixed value must then agree with the layout. ``head_dim=None`` means
    ``hidden_size // num_heads`` (Qwen3 allows ``num_heads * head_dim != hidden_size``).
    """

    vocab_size: int | None = None  # V; None: the layout's vocab_size
    hidden_size: int = 256  # width of the residual stream
    num_layers: int = 6
    num_heads: int = 8  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA); must divide num_heads
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 768  # SwiGLU hidden width
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096  # longest document (positions restart per document)
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True  # share the input embedding and the output head
    attn_implementation: str = "sdpa"  # "sdpa" (packed rows: one causal call per document) or "eager" (4-D mask)
    initializer_range: float = 0.02
    # Previous-frame hints: the input at position i also carries the code the previous image
    # held at the cell of token i + 1 (SequenceLayout.frame_hints; a (K + 1) x hidden embedding
    # added to the token embedding). Copying what did not move then needs no learnt attention
    # pattern, so a small model spends its training on what moved. Needs the layout.
    frame_hints: bool = False
    # Action hints (> 0, needs frame_hints): the input at every image code position also carries
    # the grid cell it predicts (a learnt h*w x hidden embedding) and the bins of the action span
    # before that image, read as values in [-1, 1] with a presence flag per slot, through a small
    # MLP (2 * action_hints -> hidden -> hidden). Each code then sees the commanded arm state and
    # where it sits in the frame without first gathering both by attention. The value is the most
    # bins one action span holds (actions_per_frame x action dim: 14 for ALOHA at k=1).
    action_hints: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size is not None and int(self.vocab_size) < 2:
            raise ValueError(f"model.vocab_size must be >= 2 or null (from the layout), got {self.vocab_size}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}; "
                "change one of them or set model.head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads} "
                "(grouped-query attention shares each key/value head among num_heads/num_kv_heads queries)"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"model head dimension must be even for rotary embeddings, got {self.resolved_head_dim}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )
        if int(self.action_hints) < 0:
            raise ValueError(f"model.action_hints must be >= 0 (0: off), got {self.action_hints}")
        if self.action_hints and not self.frame_hints:
            raise ValueError("model.action_hints needs model.frame_hints=true (they share the hint channels)")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0 or not self.initializer_range > 0:
            raise ValueError("model.rope_theta, model.rms_norm_eps and model.initializer_range must be > 0")

    @property
    def resolved_head_dim(self) -> int:
        return int(self.head_dim) if self.head_dim is not None else self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "WorldModelConfig":
        """A named preset (``tiny``, ``small``, ``emu3.5``) with optional field overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown world model preset {name!r}; available: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def for_layout(self, layout: SequenceLayout) -> "WorldModelConfig":
        """This config with the vocabulary size of ``layout`` (checked if it was fixed)."""
        if self.vocab_size is not None and self.vocab_size != layout.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} but the layout's vocabulary has {layout.vocab_size} ids; "
                "set model.vocab_size=null to take it from the layout"
            )
        return replace(self, vocab_size=layout.vocab_size)

    def to_hf(self) -> Qwen3Config:
        if self.vocab_size is None:
            raise ValueError("WorldModelConfig.vocab_size is unset: build the model with a layout or set vocab_size")
        return Qwen3Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.resolved_head_dim,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_embeddings,
            initializer_range=self.initializer_range, attention_bias=False, use_sliding_window=False,
            attn_implementation=PACKED_SDPA if self.attn_implementation == "sdpa" else self.attn_implementation,
        )


PRESETS: dict[str, WorldModelConfig] = {
    # tests: ~19k decoder parameters + a V x 32 tied embedding + the hint, cell and action-hint
    # weights (~38k in all with the tests' layout, ~120k with the default one)
    "tiny": WorldModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                             max_position_embeddings=1024, frame_hints=True, action_hints=28),
    # the CPU default (shared/FACTS.md "Compute": 6 layers, width 256, GQA 8/2): ~4.5M decoder
    # parameters + 0.46M tied embedding with the default layout (V=1792) + 0.40M hint, cell and
    # action-hint weights: 5.39M
    "small": WorldModelConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=768,
                              max_position_embeddings=4096, frame_hints=True, action_hints=14),
    # The real Emu3.5 shape, for the meta device only (~34.1B parameters). Emu3.5 is initialised
    # from Qwen3 and its transformer is the Qwen3-32B shape: 64 layers, hidden 5120, 64 query heads
    # of dim 128 (so heads*dim = 8192 != hidden), 8 KV heads, SwiGLU 25600, untied head. Vocabulary
    # 282,926 = Qwen3's 151,854 text ids + 131,072 (2^17) IBQ vision codes, as in public configs of
    # Emu3.5-derived checkpoints. rope_theta and max positions are Qwen3-32B's (an estimate).
    # Departure: those configs list q/k/v biases; Qwen3ForCausalLM has none (0.1M parameters).
    "emu3.5": WorldModelConfig(vocab_size=282_926, hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                               head_dim=128, intermediate_size=25_600, rope_theta=1_000_000.0,
                               max_position_embeddings=40_960, tie_embeddings=False),
}


# ----------------------------------------------------------------------------- masks


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document ids -> (B, L) position ids restarting at 0 at every document start."""
    B, L = doc_ids.shape
    index = torch.arange(L, device=doc_ids.device).expand(B, L)  # (B, L)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, L) start of own doc
    return index - first


def document_mask(doc_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L) document ids -> (B, 1, L, L) additive mask: 0 where query i may attend to key j
    (same document, j <= i), the dtype's minimum elsewhere. Padding (-1) forms its own causal
    block, so no row is fully masked (sdpa would return NaN for it)."""
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()  # (L, L)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    allowed = (same & causal)[:, None]  # (B, 1, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def document_segments(doc_ids: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(B, L) document ids -> per row, the ``(start, end)`` runs of one document id (padding, -1,
    is a run of its own), in order; they tile the row."""
    B, L = doc_ids.shape
    change = torch.ones(B, L, dtype=torch.bool, device=doc_ids.device)
    change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    rows = []
    for b in range(B):
        starts = change[b].nonzero().flatten().tolist() + [L]
        rows.append(tuple(zip(starts[:-1], starts[1:])))
    return tuple(rows)


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          segments: tuple[tuple[tuple[int, int], ...], ...] | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except with ``segments`` (:func:`document_segments` of the
    row's packed documents, passed through the decoder's keyword arguments): then every document
    attends causally within itself, one ``is_causal`` kernel call each, and ``attention_mask`` is
    not read. Same result as the block-diagonal causal mask (``tests/test_world_model.py``) at a
    fraction of the work: a masked call computes all L x L scores of the row, these calls the
    causal half of each document's. query (B, H, L, d), key/value (B, H_kv, L, d) -> (B, L, H, d)."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed_sdpa_attention: segments need queries and keys of the same rows (no KV cache)")
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # GQA: query head h reads key/value head h // groups
    value = value.repeat_interleave(groups, dim=1)
    rows = []
    for b, runs in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                dropout_p=dropout, is_causal=True, scale=scaling) for s, e in runs]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # masks, where the decoder builds one, as for sdpa


# ----------------------------------------------------------------------------- the model


LOGGED_ROLES = {Role.VISION: "vision", Role.TEXT: "text", Role.ACTION: "action", Role.STRUCTURE: "structure"}


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                    roles: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted next-token cross-entropy of (B, L, V) logits for (B, L) tokens.

    ``weights[i]`` weighs predicting ``tokens[i]`` (the layout's convention). Returns ``(loss,
    logs)``: loss = sum(w * ce) / sum(w) over targets 1..L-1; logs hold ``loss``, ``tokens``
    (targets with w > 0) and ``ce/<role>`` (unweighted mean CE of the targets of that role with
    w > 0) for vision, text, action and structure tokens present when ``roles`` is given.
    """
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                         reduction="none").view(tokens.shape[0], -1)  # (B, L-1)
    w = weights[:, 1:].to(ce.dtype)  # (B, L-1)
    total = w.sum()
    if total <= 0:
        raise ValueError("WorldModel: all loss weights are 0 in this batch; nothing to train on")
    loss = (ce * w).sum() / total
    logs: dict[str, float] = {"loss": float(loss.detach()), "tokens": float((w > 0).sum())}
    if roles is not None:
        r = roles[:, 1:]
        ce_d = ce.detach()
        for role, name in LOGGED_ROLES.items():
            sel = (r == role) & (w > 0)
            if sel.any():
                logs[f"ce/{name}"] = float(ce_d[sel].mean())
    return loss, logs


WORLD_MODEL_EXPORT_DTYPES = ("float16", "bfloat16", "float32", "int8")  # world_model/dida.export_dtype
INT8_SCHEME = "per-row symmetric int8 (matrices; a float16 scale per row in '<name>.scale'), float16 vectors"
SCALE_SUFFIX = ".scale"


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU with each shared tensor once (a tied head keeps the
    embedding's name), as safetensors requires."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu()
    return out


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-only int8 of a float state dict: every floating tensor of 2+ dimensions becomes int8
    ``round(w / s)`` with ``s = max|w_row| / 127`` per row (dim 0) stored as ``<name>.scale``
    (float16); 1-D tensors (norms, biases) are stored as float16, integer tensors as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"quantize_int8: the state dict already has a tensor named {name!r}")
        if not t.is_floating_point():
            out[name] = t.contiguous()
        elif t.dim() < 2:
            out[name] = t.to(torch.float16).contiguous()
        else:
            w = t.float().reshape(t.shape[0], -1)
            scale = (w.abs().amax(dim=1) / 127.0).to(torch.float16).float()  # the scale as stored
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = (w / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
            out[name] = q.reshape(t.shape).contiguous()
            out[name + SCALE_SUFFIX] = scale.to(torch.float16).contiguous()
    return out


def dequantize_int8(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict of :func:`quantize_int8`'s output."""
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        if t.dtype == torch.int8:
            if scale is None:
                raise ValueError(f"int8 weights: {name!r} has no {name + SCALE_SUFFIX!r}; the file is not an int8 export")
            out[name] = (t.float().reshape(t.shape[0], -1) * scale.float()[:, None]).reshape(t.shape)
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return out


def load_unique_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a :func:`unique_state`-style dict: keys the file lacks must be tied to one it has."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    storage = {t.untyped_storage().data_ptr() for n, t in own.items() if n in state}
    untied = [n for n in missing if own[n].untyped_storage().data_ptr() not in storage]
    if untied or unexpected:
        raise ValueError(f"{source}: the weights do not match the model (missing {untied}, unexpected {unexpected}); "
                         "was it written for another model config?")


class WorldModel(nn.Module):
    """``Qwen3ForCausalLM`` over the layout's vocabulary, with the layout's loss and packing."""

    def __init__(self, config: WorldModelConfig, layout: SequenceLayout | None = None):
        super().__init__()
        if layout is not None:
            config = config.for_layout(layout)
        self.config = config
        self.layout_spec: dict[str, Any] | None = layout.spec if layout is not None else None
        self.decoder = Qwen3ForCausalLM(config.to_hf())
        self.hint_embed: nn.Embedding | None = None
        self._layout = layout
        if config.frame_hints:
            if layout is None:
                raise ValueError("model.frame_hints=true needs the layout (its codebook size and image grid)")
            # row 0: no hint (zero, never trained); row 1 + c: the previous image held code c
            self.hint_embed = nn.Embedding(layout.codebook_size + 1, config.hidden_size, padding_idx=0)
            nn.init.normal_(self.hint_embed.weight, std=config.initializer_range)
            with torch.no_grad():
                self.hint_embed.weight[0].zero_()
        self.cell_embed: nn.Embedding | None = None
        self.action_mlp: nn.Sequential | None = None
        if config.action_hints:
            h, w = layout.grid
            d, a = config.hidden_size, int(config.action_hints)
            self.cell_embed = nn.Embedding(h * w + 1, d, padding_idx=0)  # row 0: not an image code
            nn.init.normal_(self.cell_embed.weight, std=config.initializer_range)
            with torch.no_grad():
                self.cell_embed.weight[0].zero_()
            self.action_mlp = nn.Sequential(nn.Linear(2 * a, d), nn.SiLU(), nn.Linear(d, d))
            nn.init.zeros_(self.action_mlp[2].weight)  # starts as a constant per image position
            nn.init.zeros_(self.action_mlp[2].bias)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def device(self) -> torch.device:
        """Where the weights are (for FSDP-sharded weights: this rank's shard)."""
        return self.decoder.get_input_embeddings().weight.device

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    # -- forward --------------------------------------------------------------------------------
    @property
    def layout_sot(self) -> int | None:
        """The SOT id of the layout the model was built with (None without one)."""
        return self._layout.sot if self._layout is not None else None

    def hints_for(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Previous-frame hints of a (B, L) token row: (B, L), or (B, L, 2 + action_hints) with action
        hints (:meth:`SequenceLayout.frame_hints`); None when the model takes none."""
        if self.hint_embed is None:
            return None
        return self._layout.frame_hints(tokens, doc_ids, int(self.config.action_hints))

    def _embed(self, tokens: torch.Tensor, hints: torch.Tensor | None) -> torch.Tensor:
        """(B, L) ids (+ hints) -> (B, L, hidden) input embeddings."""
        x = self.decoder.get_input_embeddings()(tokens)
        if self.hint_embed is None:
            return x
        shape = tuple(tokens.shape) + ((HINT_ACTIONS + self.config.action_hints,) if self.config.action_hints else ())
        if hints is None or tuple(hints.shape) != shape:
            raise ValueError(
                "WorldModel: this model takes previous-frame hints (model.frame_hints=true"
                f"{', model.action_hints' if self.config.action_hints else ''}); pass hints of shape {shape} "
                "(WorldModel.hints_for)"
            )
        if self.action_mlp is None:
            return x + self.hint_embed(hints + 1)
        x = x + self.hint_embed(hints[..., HINT_CODE] + 1)
        cell = hints[..., HINT_CELL]  # (B, L) -1: not an image code position
        bins = hints[..., HINT_ACTIONS:]  # (B, L, A) -1: no bin in that slot
        present = (bins >= 0).to(x.dtype)
        values = bins.clamp(min=0).to(x.dtype) / max(self._layout.config.action_bins - 1, 1) * 2 - 1
        feats = torch.cat([values * present, present], dim=-1)  # (B, L, 2A)
        at_code = (cell >= 0).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return x + self.cell_embed(cell + 1) + self.action_mlp(feats) * at_code

    def logits(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               hints: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) next-token logits (no cache).

        ``doc_ids`` (B, L) isolates packed documents (block-diagonal causal mask; position ids
        restart per document unless given). ``attention_mask`` is a ready (B, 1, L, L) additive
        mask (e.g. DiDA's); with neither, attention is plain causal over the row. ``hints``: the
        previous-frame hints of a model with ``frame_hints`` (None: computed from ``tokens``).
        """
        extra: dict[str, Any] = {}
        if doc_ids is not None:
            if attention_mask is not None:
                raise ValueError("WorldModel.logits: pass doc_ids or attention_mask, not both")
            if self.decoder.config._attn_implementation == PACKED_SDPA:
                extra["segments"] = document_segments(doc_ids)  # one causal call per document
            else:
                attention_mask = document_mask(doc_ids, self.decoder.dtype)
            if position_ids is None:
                position_ids = document_positions(doc_ids)
        if hints is None and self.hint_embed is not None:
            hints = self.hints_for(tokens, doc_ids)
        out = self.decoder(inputs_embeds=self._embed(tokens, hints), attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False, **extra)
        return out.logits  # (B, L, V)

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, roles: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                hints: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted next-token cross-entropy (:func:`next_token_loss` of :meth:`logits`).

        tokens (B, L) int64, weights (B, L) float (``weights[i]`` weighs predicting ``tokens[i]``,
        the layout's convention), roles (B, L) :class:`Role` for per-role logs.
        """
        if tokens.shape != weights.shape:
            raise ValueError(f"WorldModel: tokens {tuple(tokens.shape)} and weights {tuple(weights.shape)} differ")
        logits = self.logits(tokens, doc_ids, position_ids, attention_mask, hints)  # (B, L, V)
        return next_token_loss(logits, tokens, weights, roles)

    def packed_inputs(self, packed: Packed, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The keyword arguments of :meth:`forward` for a :class:`~emu_world.models.layout.Packed` batch."""
        return {
            "tokens": torch.as_tensor(packed.tokens, device=device),  # (R, L)
            "weights": torch.as_tensor(packed.weights, device=device),  # (R, L)
            "roles": torch.as_tensor(packed.roles, device=device),  # (R, L)
            "doc_ids": torch.as_tensor(packed.doc_ids, device=device),  # (R, L)
            "position_ids": torch.as_tensor(packed.position_ids, device=device),  # (R, L)
        }

    # -- incremental decoding -------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.decoder.config)

    def extend(self, tokens: torch.Tensor, cache: DynamicCache, hints: torch.Tensor | None = None) -> torch.Tensor:
        """Append (B, n) tokens to a KV cache; returns (B, V) logits after the last of them.
        ``hints`` (B, n): their previous-frame hints (models with ``frame_hints``; computed from
        the whole stream, e.g. ``hints_for(all_tokens)[:, -n:]``)."""
        past = cache.get_seq_length()
        n = tokens.shape[1]
        if past + n > self.config.max_position_embeddings:
            raise ValueError(
                f"WorldModel.extend: {past + n} positions exceed model.max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        positions = torch.arange(past, past + n, device=tokens.device)  # (n,)
        out = self.decoder(inputs_embeds=self._embed(tokens, hints), past_key_values=cache, use_cache=True,
                           position_ids=positions[None].expand(tokens.shape[0], n), cache_position=positions,
                           logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)

    def refine_block(self, tokens: torch.Tensor, cache: DynamicCache, hints: torch.Tensor | None = None) -> torch.Tensor:
        """DiDA's refinement pass: (B, n) block tokens placed right after the P cached positions
        attend to the whole cache and to each other in both directions; returns (B, n, V) logits
        and crops the cache back to P, so the next step sees the same prefix.

        The mask is an all-zeros (B, 1, n, P + n) additive mask (transformers 4.57 Qwen3 takes a
        ready 4-D mask with ``past_key_values`` in its sdpa and eager paths), with explicit
        positions P..P+n-1. Equal to :meth:`logits` over prefix + block with a mask that is
        causal over the prefix and full inside the block (``emu_world.models.dida`` tests check it).
        """
        past = cache.get_seq_length()
        B, n = tokens.shape
        if past + n > self.config.max_position_embeddings:
            raise ValueError(
                f"WorldModel.refine_block: {past + n} positions exceed model.max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        positions = torch.arange(past, past + n, device=tokens.device)  # (n,)
        mask = torch.zeros(B, 1, n, past + n, dtype=self.decoder.dtype, device=tokens.device)  # (B, 1, n, P+n)
        out = self.decoder(inputs_embeds=self._embed(tokens, hints), past_key_values=cache, use_cache=True,
                           attention_mask=mask, position_ids=positions[None].expand(B, n), cache_position=positions)
        cache.crop(past)
        return out.logits  # (B, n, V)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (config and layout spec) into ``directory``.

        ``dtype`` rounds the stored weights (e.g. float16 halves the file); ``torch.int8`` stores every
        matrix as int8 with one float16 scale per row (:func:`quantize_int8`, a quarter of float32)
        and the vectors as float16. :meth:`load` always builds a float32 model from them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": asdict(self.config),
                "layout_spec": self.layout_spec, "dtype": str(dtype).removeprefix("torch.")}
        if dtype == torch.int8:
            meta["quantization"] = INT8_SCHEME
            save_file(quantize_int8(unique_state(self)), str(directory / WEIGHTS_FILE))
        else:
            on_cpu = self.device.type == "cpu"
            stored = self if dtype == torch.float32 and on_cpu else copy.deepcopy(self).to("cpu", dtype)
            save_model(stored, str(directory / WEIGHTS_FILE))  # handles the tied head
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, layout: SequenceLayout, device: torch.device | str = "cpu") -> "WorldModel":
        """Load a checkpoint written by :meth:`save`; rejects one trained for another layout."""
        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} is not a world model checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        saved = meta.get("layout_spec")
        if saved != layout.spec:
            if saved is None:
                detail = "the checkpoint records no layout"
            else:
                keys = sorted(k for k in set(saved) | set(layout.spec) if saved.get(k) != layout.spec.get(k))
                detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs layout {layout.spec.get(k)!r}" for k in keys)
            raise ValueError(
                f"world model checkpoint {directory} was trained for another token layout ({detail}). "
                "Build the layout with the text tokenizer, vision tokenizer (codebook size, grid) and layout "
                "config the checkpoint was trained with, or retrain the world model for this layout."
            )
        model = cls(WorldModelConfig(**meta["config"]), layout)
        if meta.get("dtype") == "int8":
            load_unique_state(model, dequantize_int8(load_file(str(directory / WEIGHTS_FILE))), directory)
        else:
            load_model(model, str(directory / WEIGHTS_FILE))
        return model.to(device)
