"""IBQ vision tokenizer: frames <-> grids of discrete codes.

    tok = VisionTokenizer.load("checkpoints/tokenizer")
    codes = tok.encode(frames)        # (B, H, W, 3) uint8 -> (B, h, w) int64, h = H / f
    frames = tok.decode(codes)        # (B, h, w) int64 -> (B, H, W, 3) uint8

Every frame the world model reads or imagines passes through here: reconstruction quality caps
subgoal quality, and ``tokens_per_frame`` sets the cost of every decoding step.

References and departures:

- Emu3.5 (arXiv 2510.26583) uses an IBQ tokenizer (Shi et al., "Taming Scalable Visual
  Tokenizer via Index Backpropagation Quantization", arXiv 2412.02692) with f=16. IBQ picks the
  code by argmax of code similarity but passes the gradient through the softmax over *all*
  codes (straight-through one-hot: ``onehot - sg(softmax) + softmax``), so every code receives
  gradient and the codebook does not collapse. We keep that, plus its commitment, "double"
  quantisation and entropy terms.
- Departure for CPU speed (see shared/FACTS.md): a taming-style encoder with full-resolution
  blocks runs at ~15 frames/s on 2 cores at 128x128, so the encoder starts with a patchify stem
  (a ``stem_stride`` x ``stem_stride`` stride conv) and runs residual blocks only at low
  resolution; the decoder mirrors it and ends in a pixel-shuffle head. No attention blocks.
- Codes are compared by cosine similarity (l2-normalised codes and latents, fixed logit scale),
  which keeps the softmax well conditioned; training code initialises the codebook from encoder
  outputs and restarts dead codes (:mod:`emu_world.train.tokenizer`).
- Losses here are the quantiser's raw terms; the training stage weights them together with the
  reconstruction terms (L1, L2, image-gradient, optional adversarial).

Files: ``model.safetensors`` (weights, fp16 or fp32) + ``config.json`` (``TokenizerConfig`` and
the identity string). :func:`load_tokenizer` also opens a real Emu3 vision tokenizer from a local
folder (see :class:`Emu3VisionTokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from emu_world.errors import MissingInputError, UserError
from emu_world.models.weights import (
    autocast,
    check_export_dtype,
    load_state_checked,
    replace_dir,
)

FORMAT_NAME = "emu_world.vision_tokenizer"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TokenizerConfig:
    """Architecture of the IBQ tokenizer (``configs/tokenizer/<name>.yaml``).

    Downsampling ``f = stem_stride * 2 ** (len(channels) - 1)``: the stem patchifies by
    ``stem_stride``, each further level halves the resolution. The code grid is
    ``image_size / f`` on each side.
    """

    image_size: int = 128
    stem_stride: int = 4
    channels: list[int] = field(default_factory=lambda: [32, 96, 192])  # widths, highest resolution first
    encoder_blocks: list[int] = field(default_factory=lambda: [0, 1, 1])  # residual blocks per level (same order)
    decoder_blocks: list[int] = field(default_factory=lambda: [1, 1, 2])  # ... in the decoder (needs the capacity)
    norm: str = "group"  # "group" (GroupNorm) or "none"
    norm_groups: int = 8
    code_dim: int = 32  # dimension of a code vector
    codebook_size: int = 1024  # K
    logit_scale: float = 10.0  # softmax temperature over cosine similarities (IBQ logits)
    # True: the encoder is patch-local (1x1 residual blocks, per-position channel norm), so a code
    # depends only on its own f x f pixel patch: static regions keep identical codes when anything
    # else in the frame moves, which is what the world model has to predict. False: 3x3 blocks with
    # GroupNorm (image-wide statistics), the taming-style encoder.
    local_encoder: bool = False
    # Widths of decoder-only levels above the stem resolution, each doubling it with one 3x3
    # residual block (the head's pixel shuffle shrinks by 2 per level; stem_stride must allow it).
    # [32] at f8/128 px: a 64x64 level, so thin structures (gripper fingers, cloth edges) are drawn
    # from 2x2 instead of 4x4 pixel cells. Codes and the encoder are unaffected.
    decoder_upsample: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if not self.channels:
            raise ValueError("tokenizer.channels must list at least one width")
        if self.stem_stride < 1:
            raise ValueError(f"tokenizer.stem_stride must be >= 1, got {self.stem_stride}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"tokenizer.image_size={self.image_size} is not divisible by the downsampling factor "
                f"f={self.downsample} (stem_stride {self.stem_stride} x 2^{len(self.channels) - 1}); "
                "change image_size, stem_stride or the number of channel levels"
            )
        if self.norm not in ("group", "none"):
            raise ValueError(f"tokenizer.norm must be 'group' or 'none', got {self.norm!r}")
        if self.norm == "group" and any(c % self.norm_groups for c in self.channels):
            raise ValueError(
                f"tokenizer.channels {self.channels} must all be divisible by norm_groups={self.norm_groups}"
            )
        if self.codebook_size < 2:
            raise ValueError(f"tokenizer.codebook_size must be >= 2, got {self.codebook_size}")
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(self, name)
            blocks = [int(blocks)] * len(self.channels) if isinstance(blocks, int) else [int(b) for b in blocks]
            if len(blocks) != len(self.channels) or min(blocks) < 0:
                raise ValueError(
                    f"tokenizer.{name}={blocks} must give a block count >= 0 for each of the "
                    f"{len(self.channels)} levels in tokenizer.channels={self.channels}"
                )
            setattr(self, name, blocks)
        if self.code_dim < 1:
            raise ValueError(f"tokenizer.code_dim must be >= 1, got {self.code_dim}")
        self.decoder_upsample = [int(c) for c in self.decoder_upsample]
        factor = 2 ** len(self.decoder_upsample)
        if self.stem_stride % factor:
            raise ValueError(
                f"tokenizer.decoder_upsample={self.decoder_upsample} doubles the decoder's resolution "
                f"{len(self.decoder_upsample)} time(s), which needs stem_stride divisible by {factor} "
                f"(got {self.stem_stride}); list fewer levels"
            )
        if self.norm == "group" and any(c % self.norm_groups for c in self.decoder_upsample):
            raise ValueError(
                f"tokenizer.decoder_upsample {self.decoder_upsample} must all be divisible by norm_groups={self.norm_groups}"
            )

    @property
    def downsample(self) -> int:
        return self.stem_stride * 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.grid
        return h * w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"TokenizerConfig: unknown key(s) {extra}; valid keys: {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------- typed outputs


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, h, w) quantised latents (straight-through)
    codes: torch.Tensor  # (B, h, w) int64
    commit_loss: torch.Tensor  # ||z - sg(z_q)||^2: pulls the encoder to its codes
    quant_loss: torch.Tensor  # ||sg(z) - z_q||^2: pulls the codes (all of them, via the softmax) to z
    entropy_loss: torch.Tensor  # mean per-token entropy - entropy of the batch-mean distribution
    counts: torch.Tensor  # (K,) how often each code was picked in this batch (float)


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # (B, 3, H, W) in [-1, 1] (not clamped)
    z: torch.Tensor  # (B, D, h, w) encoder output, l2-normalised over D
    quant: QuantizerOutput

    @property
    def codes(self) -> torch.Tensor:
        return self.quant.codes


# ----------------------------------------------------------------------------- modules


def _norm(cfg: TokenizerConfig, channels: int) -> nn.Module:
    return nn.GroupNorm(cfg.norm_groups, channels) if cfg.norm == "group" else nn.Identity()


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each position: (B, C, H, W), no statistics across positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _encoder_norm(cfg: TokenizerConfig, channels: int) -> nn.Module:
    return ChannelNorm(channels) if cfg.local_encoder else _norm(cfg, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))).

    ``local=True``: 1x1 convolutions and per-position norms (no mixing across positions).
    """

    def __init__(self, cfg: TokenizerConfig, channels: int, local: bool = False):
        super().__init__()
        k = 1 if local else 3
        norm = (lambda c: ChannelNorm(c)) if local else (lambda c: _norm(cfg, c))
        self.norm1 = norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, k, padding=k // 2)
        self.norm2 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, D, H/f, W/f)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch = cfg.channels
        self.stem = nn.Conv2d(3, ch[0], cfg.stem_stride, stride=cfg.stem_stride)  # patchify
        levels: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks: list[nn.Module] = [
                ResBlock(cfg, c, local=cfg.local_encoder) for _ in range(cfg.encoder_blocks[i])
            ]
            if i < len(ch) - 1:
                blocks.append(nn.Conv2d(c, ch[i + 1], 2, stride=2))  # halve the resolution (patch-local)
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = _encoder_norm(cfg, ch[-1])
        self.proj = nn.Conv2d(ch[-1], cfg.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.levels(self.stem(x))  # (B, C_last, h, w)
        return self.proj(F.silu(self.norm_out(h)))  # (B, D, h, w)


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, 3, H, W), mirroring the encoder; pixel-shuffle upsampling."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch = list(reversed(cfg.channels))  # lowest resolution first
        n_blocks = list(reversed(cfg.decoder_blocks))
        self.proj = nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1)
        levels: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks: list[nn.Module] = [ResBlock(cfg, c) for _ in range(n_blocks[i])]
            if i < len(ch) - 1:
                blocks += [nn.Conv2d(c, 4 * ch[i + 1], 1), nn.PixelShuffle(2)]  # double the resolution
            levels.append(nn.Sequential(*blocks))
        width = ch[-1]
        for c in cfg.decoder_upsample:  # decoder-only levels above the stem resolution
            levels.append(nn.Sequential(nn.Conv2d(width, 4 * c, 1), nn.PixelShuffle(2), ResBlock(cfg, c)))
            width = c
        self.levels = nn.Sequential(*levels)
        self.norm_out = _norm(cfg, width)
        p = cfg.stem_stride // 2 ** len(cfg.decoder_upsample)
        self.head = nn.Conv2d(width, 3 * p * p, 3, padding=1)
        self.unpatchify = nn.PixelShuffle(p)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        h = self.levels(self.proj(z_q))  # (B, C_first, H/p, W/p)
        return self.unpatchify(self.head(F.silu(self.norm_out(h))))  # (B, 3, H, W)


class _SoftAssignment(torch.autograd.Function):
    """The (N, K) softmax part of IBQ in one function with a hand-written backward.

    Forward: ``p = softmax(logits)``; returns ``p @ codebook`` (N, D), the mean per-token entropy
    ``-sum_k p log p`` and the entropy of the batch-mean distribution ``m = mean_n p``. The backward
    folds all three into one softmax backward, where autograd's graph of the same expressions makes
    several more elementwise (N, K) passes; at K=1024 such passes, not the matmuls, were most of the
    quantiser's time on CPU (the shipped recipe's step: 0.279 -> 0.247 s, README). The gradient
    reaches ``logits`` only (``codebook`` here is the detached one, as in IBQ)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, codebook: torch.Tensor):  # type: ignore[override]
        n = logits.shape[0]
        logp = logits.log_softmax(dim=-1)  # (N, K)
        p = logp.exp()
        token_entropy = -torch.dot(p.view(-1), logp.view(-1)) / n
        mean_prob = p.mean(0)  # (K,)
        batch_entropy = -(mean_prob * torch.log(mean_prob + 1e-10)).sum()
        ctx.save_for_backward(p, logp, mean_prob, codebook)
        return p @ codebook, token_entropy, batch_entropy

    @staticmethod
    def backward(ctx, g_soft: torch.Tensor, g_token: torch.Tensor, g_batch: torch.Tensor):  # type: ignore[override]
        p, logp, mean_prob, codebook = ctx.saved_tensors
        n = p.shape[0]
        # dLoss/dp, up to a per-row constant (which the softmax's backward removes):
        u = g_soft @ codebook.T  # (N, K): through p @ codebook
        u.add_(logp, alpha=-float(g_token) / n)  # token entropy: dH/dp = -(log p + 1)
        u.add_((-float(g_batch) / n) * (torch.log(mean_prob + 1e-10) + mean_prob / (mean_prob + 1e-10)))
        # softmax backward in place: p * (u - sum_k p u)
        u.sub_(torch.bmm(p.unsqueeze(1), u.unsqueeze(2)).view(n, 1)).mul_(p)
        return u, None


class IBQuantizer(nn.Module):
    """Index-backpropagation quantiser over a cosine-normalised codebook of K codes.

    It computes in float32 also inside a bfloat16 autocast region (``train.precision=bfloat16``):
    codes picked from bfloat16 similarities would flip between training and ``encode``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.logit_scale = float(cfg.logit_scale)
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim) / math.sqrt(cfg.code_dim))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)  # (K, D)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 -> (B, D, h, w) code vectors."""
        return F.embedding(codes, self.normalized_codebook()).permute(0, 3, 1, 2)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) normalised latents -> (B, h, w) codes (argmax cosine similarity)."""
        B, D, h, w = z.shape
        sims = z.permute(0, 2, 3, 1).reshape(-1, D) @ self.normalized_codebook().T  # (B*h*w, K)
        return sims.argmax(dim=-1).view(B, h, w)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) normalised latents -> (B*h*w, K) code logits (scaled cosine similarities)."""
        with torch.autocast(z.device.type, enabled=False):
            return self._logits(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), self.normalized_codebook())

    def _logits(self, zf: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return (self.logit_scale * zf) @ codebook.T  # scaled on the (N, D) side: one (N, K) pass fewer

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            return self._forward(z.float())

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, h, w = z.shape
        K = self.codebook.shape[0]
        zf = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*h*w
        codebook = self.normalized_codebook()  # (K, D)
        logits = self._logits(zf, codebook)  # (N, K)
        codes = logits.argmax(dim=-1)  # (N,)
        # IBQ: zq = (one_hot - sg(soft) + soft) @ codebook has the value codebook[codes] and sends the
        # gradient through the softmax to every code. Written without the (N, K) one-hot and index
        # tensors (same values and gradients; the lookup carries the codebook's direct gradient):
        via_soft, token_entropy, batch_entropy = _SoftAssignment.apply(logits, codebook.detach())
        zq = codebook[codes] + (via_soft - via_soft.detach())  # (N, D)
        commit = F.mse_loss(zf, zq.detach())
        quant = F.mse_loss(zq, zf.detach())
        counts = torch.bincount(codes, minlength=K).to(torch.float32)
        # straight-through to the encoder as well: z + (zq - z) has value zq, gradient to z and codes
        z_q = zq.view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return QuantizerOutput(z_q, codes.view(B, h, w), commit, quant, token_entropy - batch_entropy, counts)


# ----------------------------------------------------------------------------- the tokenizer


class ImageTokenizer(Protocol):
    """What the rest of emu-world asks of a vision tokenizer (ours or a real Emu3 one)."""

    codebook_size: int
    image_size: int
    grid: tuple[int, int]

    def encode(self, frames: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor: ...

    def decode(self, codes: np.ndarray | torch.Tensor, batch_size: int = 64, precision: str = "float32") -> torch.Tensor: ...

    def identity(self) -> str: ...

    def code_identity(self) -> str: ...


DECODE_PRECISIONS = ("float32", "bfloat16")


def check_decode_precision(precision: str) -> None:
    check_export_dtype(precision, "decode precision", DECODE_PRECISIONS)


def frames_to_tensor(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], with a clear error for anything else."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (B, H, W, 3) in 0..255, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must have shape (B, H, W, 3), got {tuple(x.shape)}")
    if tuple(x.shape[1:3]) != (image_size, image_size):
        raise ValueError(
            f"frames are {x.shape[1]}x{x.shape[2]} but the tokenizer reads {image_size}x{image_size}; "
            f"record/resize frames to {image_size}x{image_size} or use a tokenizer trained at that size"
        )
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W)


def tensor_to_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (rounded, clamped)."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class VisionTokenizer(nn.Module):
    """IBQ tokenizer: ``encode`` frames to code grids, ``decode`` code grids to frames."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = IBQuantizer(config)
        self.decoder = Decoder(config)

    # -- shape facts -----------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def tokens_per_frame(self) -> int:
        return self.config.tokens_per_frame

    # -- training path ---------------------------------------------------------------------
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D, h, w), l2-normalised over D."""
        return F.normalize(self.encoder(x), dim=1)

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """(B, 3, H, W) in [-1, 1] -> reconstruction, latents and the quantiser's terms."""
        z = self.encode_latents(x)  # (B, D, h, w)
        quant = self.quantizer(z)
        return TokenizerOutput(self.decoder(quant.z_q), z, quant)

    # -- inference path --------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(B, H, W, 3) uint8 frames -> (B, h, w) int64 codes."""
        x = frames_to_tensor(frames, self.image_size)
        out = [self.quantizer.nearest(self.encode_latents(chunk.contiguous(memory_format=torch.channels_last)))
               for chunk in x.split(batch_size)]
        return torch.cat(out) if out else torch.zeros((0, *self.grid), dtype=torch.int64)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor, batch_size: int = 64, precision: str = "float32") -> torch.Tensor:
        """(B, h, w) integer codes -> (B, H, W, 3) uint8 frames.

        ``precision="bfloat16"`` runs the decoder's convolutions under bfloat16 autocast: on CPUs with
        native bfloat16 (AVX512-BF16, AMX) about 1.7x the frames per second for the same frames up to
        rounding (``python -m emu_world.bench tokenizer decode_precision=bfloat16`` measures both);
        without native bfloat16 it is emulated and may be slower. Encoding always runs in float32:
        codes must not flip."""
        check_decode_precision(precision)
        c = torch.as_tensor(codes)
        if c.ndim != 3 or tuple(c.shape[1:]) != self.grid:
            raise ValueError(f"codes must have shape (B, {self.grid[0]}, {self.grid[1]}), got {tuple(c.shape)}")
        if c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {c.dtype}")
        c = c.long()
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in 0..{self.codebook_size - 1}, got range {int(c.min())}..{int(c.max())}; "
                "were they produced by another tokenizer?"
            )
        with autocast(precision):
            out = [tensor_to_frames(self.decoder(self.quantizer.lookup(chunk)).float()) for chunk in c.split(batch_size)]
        H = self.image_size
        return torch.cat(out) if out else torch.zeros((0, H, H, 3), dtype=torch.uint8)

    # -- files -----------------------------------------------------------------------------
    def identity(self) -> str:
        """A stable id of config + weights, usable as a token-store key (``ibq-f16-k1024-<hash>``)."""
        return state_identity(self.config, self.state_dict())

    def code_identity(self) -> str:
        """The id of what maps frames to codes (encoder, codebook and the config fields they use):
        equal for two tokenizers that share an encoder and codebook but differ in their decoders, so
        a world model trained on one tokenizer's codes reads the other's (``ibq-f8-k1024-codes-<hash>``)."""
        return code_state_identity(self.config, self.state_dict())

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into the folder ``path`` (replaced whole, atomically).

        With ``dtype=torch.float16`` the weights are stored rounded; the identity written to
        ``config.json`` is the one the loaded model reports (of the rounded weights).
        """
        path = Path(path)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        stored = {k: v.float() for k, v in tensors.items()}
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "identity": state_identity(self.config, stored),
                "code_identity": code_state_identity(self.config, stored), "dtype": str(dtype).removeprefix("torch."),
                "tokens_per_frame": self.tokens_per_frame, "grid": list(self.grid)}
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, config: TokenizerConfig | None = None) -> "VisionTokenizer":
        """Load a folder written by :meth:`save`. ``config``, if given, must match the saved one."""
        path = Path(path)
        meta = read_tokenizer_meta(path)
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{path / CONFIG_FILE} is not an emu_world vision tokenizer (format {meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: tokenizer format version {meta.get('format_version')} != {FORMAT_VERSION}")
        saved = TokenizerConfig.from_dict(meta["config"])
        if config is not None:
            check_config_match(config, saved, str(path))
        model = cls(saved)
        state = load_file(str(path / WEIGHTS_FILE))
        load_state_checked(model, state, str(path / WEIGHTS_FILE))
        return model.to(memory_format=torch.channels_last).eval()  # oneDNN's fast layout on CPU


# Config fields added after tokenizers were shipped: left out of the identity while at their
# default, so adding an option never changes the id (and token caches) of existing checkpoints.
_IDENTITY_OPTIONAL = {"decoder_upsample": []}


def state_identity(config: TokenizerConfig, state: dict[str, torch.Tensor]) -> str:
    described = {k: v for k, v in config.to_dict().items() if _IDENTITY_OPTIONAL.get(k, object()) != v}
    return f"ibq-f{config.downsample}-k{config.codebook_size}-{_digest(described, state)}"


# What a decoder alone reads: fields and weights left out of the code identity.
DECODER_ONLY_FIELDS = ("decoder_blocks", "decoder_upsample")


def code_state_identity(config: TokenizerConfig, state: dict[str, torch.Tensor]) -> str:
    described = {k: v for k, v in config.to_dict().items() if k not in DECODER_ONLY_FIELDS}
    encoding = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    return f"ibq-f{config.downsample}-k{config.codebook_size}-codes-{_digest(described, encoding)}"


def _digest(described: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """16 hex digits of sha256 over the config fields ``described`` and the tensors of ``state`` by name."""
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_codes(recorded: dict[str, Any], tokenizer: "ImageTokenizer", trained: str, fix: str) -> None:
    """Refuse ``tokenizer`` unless it produces the codes that ``trained`` (a world model) was trained on.

    ``recorded`` is the ``tokenizer`` entry of its manifest: the code identity where it has one (then
    a tokenizer with another decoder for the same codes is accepted), else the full identity."""
    if "code_identity" in recorded:
        want, have = recorded["code_identity"], tokenizer.code_identity()
    else:
        want, have = recorded["identity"], tokenizer.identity()
    if want != have:
        raise UserError(
            f"{trained} was trained on codes of tokenizer {recorded['identity']} ({recorded.get('path')}), but the "
            f"tokenizer given is {tokenizer.identity()} (codes {tokenizer.code_identity()}), which maps frames to other "
            f"codes; {fix}"
        )


def read_tokenizer_meta(path: Path) -> dict[str, Any]:
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise MissingInputError(
            f"{path} is not a tokenizer folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}. Train one with "
            "`python -m emu_world.train stage=tokenizer dataset.root=...` or pass the folder that holds them."
        )
    return json.loads((path / CONFIG_FILE).read_text())


def check_config_match(expected: TokenizerConfig, saved: TokenizerConfig, where: str) -> None:
    """Raise a ValueError naming every field where ``saved`` (a checkpoint) differs from ``expected``."""
    a, b = expected.to_dict(), saved.to_dict()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}
    if diff:
        listed = ", ".join(f"{k}: config {v[0]!r} vs checkpoint {v[1]!r}" for k, v in sorted(diff.items()))
        raise UserError(
            f"checkpoint {where} was trained with a different tokenizer config ({listed}). Use the matching "
            "config (e.g. tokenizer=<the yaml it was trained with> or these overrides), or start a fresh run "
            "in another run_dir."
        )


# ----------------------------------------------------------------------------- a real Emu3 tokenizer


class Emu3VisionTokenizer:
    """A real Emu3 vision tokenizer (SBER-MoVQGAN-style, f=8, K=32768) from a local folder.

    The folder must hold a transformers ``Emu3VQVAE`` checkpoint: ``config.json`` with
    ``"model_type": "emu3_vqgan"`` and its safetensors weights (for example the ``vqmodel``
    sub-model of a ``BAAI/Emu3-*-hf`` checkpoint saved with ``save_pretrained``). Nothing is
    downloaded. It is far too slow for CPU training loops (a full-resolution taming-style
    network with attention); it is here to compare reconstruction quality and to run the
    same pipeline with real weights on bigger machines.

    Emu3.5's own IBQ tokenizer (f=16, 131072 codes) is not loadable: its weights ship as a
    taming/Lightning checkpoint of an architecture that transformers does not implement, and
    loading it would mean unpickling it; this project loads no pickles.
    """

    def __init__(self, path: str | Path, image_size: int = 128):
        from transformers import Emu3VQVAE

        self.path = Path(path)
        self.model = Emu3VQVAE.from_pretrained(str(self.path), local_files_only=True).eval()
        self.factor = int(self.model.vision_spatial_factor)
        if image_size % self.factor:
            raise ValueError(f"image_size {image_size} must be divisible by the Emu3 spatial factor {self.factor}")
        self.image_size = image_size
        self.codebook_size = int(self.model.config.codebook_size)
        self.grid = (image_size // self.factor, image_size // self.factor)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        x = frames_to_tensor(frames, self.image_size)
        out = []
        for chunk in x.split(batch_size):
            sizes = torch.tensor([[self.image_size, self.image_size]] * len(chunk))
            out.append(torch.stack(self.model.encode(chunk, sizes)).long())
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor, batch_size: int = 16, precision: str = "float32") -> torch.Tensor:
        check_decode_precision(precision)
        c = torch.as_tensor(codes).long()
        with autocast(precision):
            return torch.cat([tensor_to_frames(self.model.decode(chunk).float()) for chunk in c.split(batch_size)])

    def identity(self) -> str:
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
        return f"emu3-f{self.factor}-k{self.codebook_size}-{digest.hexdigest()[:16]}"

    def code_identity(self) -> str:
        return self.identity()


def load_tokenizer(path: str | Path, image_size: int = 128) -> ImageTokenizer:
    """Open a tokenizer folder: ours (``emu_world.vision_tokenizer``) or a local Emu3 VQ-VAE."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise MissingInputError(
            f"no {CONFIG_FILE} in {path}: pass a folder written by `python -m emu_world.train stage=tokenizer` "
            "(model.safetensors + config.json) or a local Emu3 VQ-VAE folder (config.json model_type emu3_vqgan)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") == FORMAT_NAME:
        return VisionTokenizer.load(path)
    if meta.get("model_type") == "emu3_vqgan":
        return Emu3VisionTokenizer(path, image_size=image_size)
    raise UserError(
        f"{cfg_path} describes neither an emu_world tokenizer (format {FORMAT_NAME!r}) nor an Emu3 VQ-VAE "
        f"(model_type 'emu3_vqgan'); got format={meta.get('format')!r}, model_type={meta.get('model_type')!r}"
    )
