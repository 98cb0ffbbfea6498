"""Training stage ``tokenizer``: the IBQ vision tokenizer on frames of local LeRobot datasets.

    python -m emu_world.train stage=tokenizer dataset.root=datasets [tokenizer=default] [experiment=tiny]
    torchrun --nproc_per_node=2 -m emu_world.train stage=tokenizer dataset.root=datasets
    python -m emu_world.train stage=tokenizer ... resume=true     # continue exactly after an interruption
    python -m emu_world.train stage=tokenizer init=checkpoints/tokenizer tokenizer_loss.freeze_codes=true \
        'tokenizer.decoder_upsample=[32]' ...                      # a new decoder for the same codes

Data: ``dataset.root`` is one dataset folder, a folder of dataset folders (``datasets``), or a
list of either; every camera (or ``dataset.cameras``) of every dataset is used. The last
``dataset.eval_episodes`` episodes of each dataset are held out for evaluation. Each dataset
and camera contributes about ``dataset.frames_per_dataset`` training frames (every k-th frame
of its training episodes), so short-episode tasks are not drowned by long ones; all of them
are decoded once into memory (uint8).

Loop (explicit, one function per piece): ``train_step`` (reconstruction L1 + L2 + image-gradient
loss, IBQ commitment / quantisation / entropy terms, optional code consistency under pixel noise
(``tokenizer_loss.consistency``), optional hinge adversarial term after
``tokenizer_loss.adversarial_start``), ``restart_dead_codes`` (codes whose running usage falls
below a fraction of the mean are moved onto random encoder outputs, until
``restart_until`` of training), ``evaluate`` (held-out PSNR, code usage, code stability),
``save_checkpoint`` (atomic, exact resume) and ``export`` (the tokenizer folder plus ``manifest.json``).

``init=<tokenizer folder>`` starts from a trained tokenizer: every tensor whose name and shape fit
is copied (a finer decoder keeps the coarse levels and learns the new ones). With
``tokenizer_loss.freeze_codes=true`` its encoder and codebook stay fixed, so the codes of every
frame stay exactly those of ``init`` (same ``code_identity``) and the world models trained on them
read the new tokenizer unchanged; only the decoder trains, on the reconstruction terms.

``train.precision=bfloat16`` runs the encoder's and decoder's forward passes under bfloat16 autocast
(about 1.3x the steps per second on this project's AVX512-BF16 CPUs: ``python -m emu_world.bench
tokenizer`` times both side by side); the quantiser, the losses, the weights and the optimizer stay
float32, and evaluation and the export are the usual float32 model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from emu_world.config import to_dataclass
from emu_world.data.frames import FrameDataConfig, FrameSet, load_frame_sets
from emu_world.errors import UserError
from emu_world.image_metrics import code_stability, code_usage, nudge, psnr
from emu_world.models.tokenizer import (
    DECODER_ONLY_FIELDS,
    TokenizerConfig,
    VisionTokenizer,
    check_config_match,
    frames_to_tensor,
    read_tokenizer_meta,
)
from emu_world.models.weights import check_export_dtype
from emu_world.provenance import code_version, command_line
from emu_world.train.checkpoint import LoadedCheckpoint
from emu_world.train.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    average_gradients,
    broadcast_,
)
from emu_world.train.loop import LoopConfig, Stage, batch_indices, resolved_config


@dataclass
class TokenizerLossConfig:
    """``tokenizer_loss:`` section: loss weights and codebook maintenance."""

    l1: float = 1.0
    l2: float = 1.0
    gradient: float = 0.5  # L1 between image gradients (finite differences): sharp edges, no pretrained net
    hard: float = 0.0  # squared error of each frame's worst pixels: small objects (a 3-pixel cube) are not averaged away
    hard_fraction: float = 0.02  # ... the fraction of pixels counted as "worst"
    commit: float = 0.25
    quant: float = 1.0
    entropy: float = 0.05
    consistency: float = 0.0  # CE of the code logits of x + pixel noise against x's codes (stable codes); 0: off
    consistency_noise: int = 2  # ... the noise: every value moved by a uniform integer in [-n, n] grey levels
    adversarial: float = 0.0  # hinge GAN weight; 0 disables the discriminator
    adversarial_start: int = 2000
    freeze_codes: bool = False  # True (needs init=<tokenizer>): encoder and codebook fixed, only the decoder trains
    restart_every: int = 50  # dead-code restart period (steps); 0 disables
    restart_until: float = 0.8  # ... up to this fraction of train.steps
    restart_threshold: float = 0.03  # dead: running usage below this fraction of the mean usage
    usage_decay: float = 0.95  # EMA decay of per-code usage counts

    def __post_init__(self) -> None:
        if self.consistency < 0 or self.consistency_noise < 1:
            raise ValueError(f"tokenizer_loss.consistency must be >= 0 and tokenizer_loss.consistency_noise >= 1 grey "
                             f"level, got {self.consistency} and {self.consistency_noise}")


@dataclass
class ExportConfig:
    """``export:`` section: where the finished tokenizer is written (``null``: ``<run_dir>/tokenizer``)."""

    dir: str | None = None
    dtype: str = "float16"

    def __post_init__(self) -> None:
        check_export_dtype(self.dtype, "export.dtype")


# ----------------------------------------------------------------------------- model pieces


class PatchDiscriminator(nn.Module):
    """A small PatchGAN critic (hinge loss) for the optional adversarial term."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.GroupNorm(8, 4 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, H/8, W/8) logits


def hard_pixel_loss(pred: torch.Tensor, target: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean squared error over the ``fraction`` of pixels of each (B, C, H, W) image with the largest error."""
    err = (pred - target).pow(2).sum(1).flatten(1)  # (B, H*W)
    k = max(1, int(round(fraction * err.shape[1])))
    return err.topk(k, dim=1).values.mean()


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of two (B, C, H, W) images."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(pred) - dx(target)).abs().mean() + (dy(pred) - dy(target)).abs().mean()


@dataclass
class StepResult:
    logs: dict[str, float]
    counts: torch.Tensor  # (K,) code counts of the global batch
    z: torch.Tensor  # (B, D, h, w) latents of this rank's batch (for restarts)


def consistency_loss(model: VisionTokenizer, x: torch.Tensor, codes: torch.Tensor, noise: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy of the code logits of ``x`` + pixel noise (every value moved by a uniform
    integer in [-noise, noise] grey levels, clipped) against the codes ``x`` itself got (a fixed
    target): codes that do not flip under the least significant bits of a camera or a video round
    trip (``code_stability`` in ``bench tokenizer``), which the world model then need not predict."""
    delta = torch.randint(-noise, noise + 1, x.shape, generator=generator).to(x.dtype) * (2.0 / 255.0)
    logits = model.quantizer.logits(model.encode_latents((x + delta).clamp(-1.0, 1.0)))  # (N, K)
    return F.cross_entropy(logits, codes.detach().reshape(-1))


def reconstruct(model: VisionTokenizer, x: torch.Tensor, loss_cfg: TokenizerLossConfig, loop: LoopConfig):
    """``model``'s reconstruction of ``x`` (B, 3, H, W) for a training step: (recon, latents z, code
    counts, the quantiser output or None with frozen codes)."""
    if loss_cfg.freeze_codes:  # the codes are fixed: encode without gradient, decode the looked-up codes
        with torch.no_grad():
            z = model.encode_latents(x)  # (B, D, h, w), float32 as in ``encode``
            codes = model.quantizer.nearest(z)  # (B, h, w)
            z_q = model.quantizer.lookup(codes)  # the exact decoder input of ``decode``
        with loop.autocast():
            rec = model.decoder(z_q).float()
        return rec, z, torch.bincount(codes.reshape(-1), minlength=model.codebook_size).to(torch.float32), None
    with loop.autocast():  # bfloat16: encoder and decoder convolutions; the quantiser stays float32
        out = model(x)
    return out.recon.float(), out.z.float(), out.quant.counts, out.quant


def discriminator_step(disc: PatchDiscriminator, opt_d: torch.optim.Optimizer, x: torch.Tensor, rec: torch.Tensor,
                       loop: LoopConfig, info: DistInfo) -> torch.Tensor:
    """One hinge-loss step of the critic on real ``x`` and reconstructed ``rec``; returns its loss."""
    opt_d.zero_grad(set_to_none=True)
    with loop.autocast():
        d_real, d_fake = disc(x).float(), disc(rec.detach()).float()
    d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    d_loss.backward()
    average_gradients(disc, info)
    opt_d.step()
    return d_loss


def train_step(model: VisionTokenizer, opt: torch.optim.Optimizer, x: torch.Tensor, step: int,
               loss_cfg: TokenizerLossConfig, loop: LoopConfig, info: DistInfo,
               disc: PatchDiscriminator | None = None, opt_d: torch.optim.Optimizer | None = None,
               seed: int = 0) -> StepResult:
    """One optimisation step on this rank's share ``x`` (B, 3, H, W) of the global batch (random
    draws: a pure function of ``seed``, ``step`` and the rank)."""
    model.train()
    rec, z, counts, q = reconstruct(model, x, loss_cfg, loop)
    terms = {
        "l1": (rec - x).abs().mean(),
        "l2": (rec - x).pow(2).mean(),
        "gradient": gradient_loss(rec, x),
        "hard": hard_pixel_loss(rec, x, loss_cfg.hard_fraction) if loss_cfg.hard > 0 else torch.zeros(()),
    }
    if q is not None:
        terms.update(commit=q.commit_loss, quant=q.quant_loss, entropy=q.entropy_loss)
    if loss_cfg.consistency > 0 and q is not None:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + info.rank)
        with loop.autocast():
            terms["consistency"] = consistency_loss(model, x, q.codes, loss_cfg.consistency_noise, g)
    loss = sum(getattr(loss_cfg, k) * v for k, v in terms.items())
    if loss_cfg.hard <= 0:
        del terms["hard"]
    adversarial = disc is not None and step >= loss_cfg.adversarial_start
    if adversarial:
        with loop.autocast():
            terms["g_adv"] = -disc(rec).float().mean()
        loss = loss + loss_cfg.adversarial * terms["g_adv"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model, info)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip) if loop.grad_clip > 0 else torch.tensor(0.0)
    opt.step()
    if adversarial:
        assert opt_d is not None
        terms["d_loss"] = discriminator_step(disc, opt_d, x, rec, loop, info)
    logs = {k: v.detach() for k, v in terms.items()}
    logs["loss"] = loss.detach()
    stacked = all_reduce_mean(torch.stack([logs[k].float() for k in sorted(logs)]), info)
    logs_f = {k: float(v) for k, v in zip(sorted(logs), stacked)}
    logs_f["grad_norm"] = float(grad_norm)
    counts = all_reduce_sum(counts.clone(), info)
    p = counts / counts.sum()
    logs_f["batch_perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return StepResult(logs_f, counts, z.detach())


def init_codebook(model: VisionTokenizer, x: torch.Tensor, seed: int, info: DistInfo) -> None:
    """Set the codebook to random encoder outputs of a batch (chosen on rank 0, broadcast)."""
    with torch.no_grad():
        z = model.encode_latents(x)  # (B, D, h, w)
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, D)
        K = model.codebook_size
        g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        pick = torch.randperm(len(zf), generator=g)[:K] if len(zf) >= K else torch.randint(len(zf), (K,), generator=g)
        noise = 0.05 * torch.randn(K, zf.shape[1], generator=g)
        model.quantizer.codebook.copy_(zf[pick] + noise)
        broadcast_(model.quantizer.codebook.data, info)


def restart_dead_codes(model: VisionTokenizer, opt: torch.optim.Optimizer, usage: torch.Tensor, z: torch.Tensor,
                       step: int, seed: int, loss_cfg: TokenizerLossConfig, info: DistInfo) -> int:
    """Move codes whose running usage is below ``restart_threshold`` x mean onto latents of this
    batch, drawn with probability proportional to their quantisation error (so the new codes go
    where the codebook serves the data worst); chosen on rank 0 and broadcast. Their Adam moments
    are reset and their running usage set to the mean (a grace period)."""
    mean = usage.mean()
    dead = usage < loss_cfg.restart_threshold * mean
    n = int(dead.sum())
    if n == 0:
        return 0
    cb = model.quantizer.codebook
    with torch.no_grad():
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, D), unit vectors
        error = (1.0 - (zf @ model.quantizer.normalized_codebook().T).max(dim=1).values).clamp_min(1e-6)  # (N,)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.multinomial(error, n, replacement=True, generator=g)
        cb[dead] = zf[pick] + 0.01 * torch.randn(n, zf.shape[1], generator=g)
        broadcast_(cb.data, info)
        state = opt.state.get(cb, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0.0
    usage[dead] = mean
    return n


@torch.no_grad()
def evaluate(model: VisionTokenizer, sets: list[FrameSet], batch_size: int = 64) -> dict[str, Any]:
    """Held-out PSNR per (dataset, camera) and overall; code usage and code stability (the fraction
    of codes kept when every pixel value moves by -1, 0 or +1 grey level) over all held-out frames."""
    model.eval()
    all_codes, all_nudged, per_set = [], [], {}
    for i, fs in enumerate(sets):
        codes = model.encode(fs.held_out, batch_size)
        recon = model.decode(codes, batch_size)
        per_set[fs.name] = round(psnr(fs.held_out, recon), 3)
        all_codes.append(codes)
        all_nudged.append(model.encode(nudge(fs.held_out, i), batch_size))
    usage = code_usage(torch.cat(all_codes), model.codebook_size)
    return {"psnr": round(float(np.mean(list(per_set.values()))), 3), "psnr_per_set": per_set,
            "code_usage": round(usage["code_usage"], 4), "perplexity": round(usage["perplexity"], 1),
            "code_stability": round(code_stability(torch.cat(all_codes), torch.cat(all_nudged)), 4)}


# ----------------------------------------------------------------------------- the stage


@dataclass
class Parts:
    tokenizer: TokenizerConfig
    data: FrameDataConfig
    loop: LoopConfig
    loss: TokenizerLossConfig
    export: ExportConfig
    init: Path | None = None  # a trained tokenizer folder to start from


def parse_config(cfg: DictConfig) -> Parts:
    parts = Parts(to_dataclass(TokenizerConfig, cfg.tokenizer), to_dataclass(FrameDataConfig, cfg.dataset),
                  to_dataclass(LoopConfig, cfg.train), to_dataclass(TokenizerLossConfig, cfg.tokenizer_loss),
                  to_dataclass(ExportConfig, cfg.export), Path(cfg.init) if cfg.get("init") else None)
    if parts.init is not None:
        check_init(parts.init, parts.tokenizer, parts.loss.freeze_codes)
    elif parts.loss.freeze_codes:
        raise UserError("tokenizer_loss.freeze_codes=true keeps the codes of a trained tokenizer: name it with "
                        "init=<tokenizer folder> (e.g. init=checkpoints/tokenizer)")
    loop = parts.loop
    if (loop.device, loop.parallel) != ("cpu", "ddp"):
        raise UserError(f"train.device={loop.device} train.parallel={loop.parallel}: cuda and fsdp are for "
                        "stage=world_model and stage=dida; the tokenizer trains on CPU, replicated over torchrun "
                        "ranks (drop those overrides)")
    return parts


def check_init(path: Path, config: TokenizerConfig, freeze_codes: bool) -> None:
    """Refuse ``init=path`` unless it is a tokenizer folder and, with ``freeze_codes``, its config equals
    ``config`` in everything the encoder and codebook use (only ``DECODER_ONLY_FIELDS`` may differ)."""
    saved = TokenizerConfig.from_dict(read_tokenizer_meta(path)["config"])
    if freeze_codes:
        a, b = config.to_dict(), saved.to_dict()
        diff = sorted(k for k in a if k not in DECODER_ONLY_FIELDS and a[k] != b[k])
        if diff:
            listed = ", ".join(f"{k}: config {a[k]!r} vs init {b[k]!r}" for k in diff)
            raise UserError(
                f"tokenizer_loss.freeze_codes=true keeps the encoder and codebook of init={path}, so the tokenizer "
                f"config may differ from it only in {list(DECODER_ONLY_FIELDS)}; it differs in {listed}. Drop those "
                "overrides (or train the whole tokenizer without freeze_codes)"
            )


def warm_start(model: VisionTokenizer, path: Path, log=print) -> VisionTokenizer:
    """Copy every tensor of the tokenizer at ``path`` whose name and shape fit ``model``; returns it."""
    init = VisionTokenizer.load(path)
    own, theirs = model.state_dict(), init.state_dict()
    fits = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict({**own, **fits})
    fresh = sorted(k for k in own if k not in fits)
    log(f"init {path} ({init.identity()}): {len(fits)} of {len(own)} tensors copied"
        + (f"; new: {', '.join(fresh[:8])}{' ...' if len(fresh) > 8 else ''}" if fresh else ""))
    return init


def to_input(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    return frames_to_tensor(frames, image_size).contiguous(memory_format=torch.channels_last)


class TokenizerStage(Stage):
    """``stage=tokenizer``: frames of the datasets in memory, the IBQ tokenizer (and the optional
    critic), dead-code restarts, held-out PSNR / usage / stability, the tokenizer folder as export."""

    name = "tokenizer"

    def __init__(self, cfg: DictConfig):
        self.parts = parse_config(cfg)
        self.loop, self.seed = self.parts.loop, int(cfg.seed)
        self.resolved = resolved_config(cfg)

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another tokenizer architecture."""
        check_config_match(TokenizerConfig.from_dict(self.resolved["tokenizer"]),
                           TokenizerConfig.from_dict(meta["config"]["tokenizer"]), str(path))

    def build(self, resuming: bool) -> None:
        parts, loop, info = self.parts, self.loop, self.info
        torch.manual_seed(self.seed)
        t_data = time.perf_counter()
        self.sets = load_frame_sets(parts.data, parts.tokenizer.image_size, log=self.log)
        self.train_frames = torch.from_numpy(np.concatenate([fs.train for fs in self.sets]))  # (N, H, W, 3) uint8
        self.data_seconds = time.perf_counter() - t_data
        self.log(f"data: {len(self.train_frames)} training frames from {len(self.sets)} (dataset, camera) pairs in "
                 f"{self.data_seconds:.1f}s")
        self.model = model = VisionTokenizer(parts.tokenizer).to(memory_format=torch.channels_last)
        init = warm_start(model, parts.init, self.log) if parts.init is not None and not resuming else None
        if parts.loss.freeze_codes:
            for p in [*model.encoder.parameters(), *model.quantizer.parameters()]:
                p.requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=loop.lr,
                                     betas=tuple(loop.betas), weight_decay=loop.weight_decay, foreach=True)
        self.disc = PatchDiscriminator() if parts.loss.adversarial > 0 else None
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=loop.lr, betas=(0.5, 0.9)) \
            if self.disc is not None else None
        self.models = {"model": model, **({"discriminator": self.disc} if self.disc is not None else {})}
        self.optimizers = {"model": self.opt, **({"discriminator": self.opt_d} if self.opt_d is not None else {})}
        self.usage = torch.zeros(parts.tokenizer.codebook_size)
        if not resuming and (init is None or model.quantizer.codebook.shape != init.quantizer.codebook.shape):
            first = batch_indices(0, loop.batch_size, len(self.train_frames), self.seed)[info.rank:: info.world_size]
            init_codebook(model, to_input(self.train_frames[first], parts.tokenizer.image_size), self.seed, info)

    def restore(self, loaded: LoadedCheckpoint) -> None:
        self.usage = loaded.extra_tensors["usage"].clone()

    def train_step(self, step: int) -> dict[str, float]:
        parts, loop, info, loss_cfg = self.parts, self.loop, self.info, self.parts.loss
        idx = batch_indices(step, loop.batch_size, len(self.train_frames), self.seed)[info.rank:: info.world_size]
        x = to_input(self.train_frames[idx], parts.tokenizer.image_size)
        result = train_step(self.model, self.opt, x, step, loss_cfg, loop, info, self.disc, self.opt_d, self.seed)
        self.usage.mul_(loss_cfg.usage_decay).add_(result.counts, alpha=1 - loss_cfg.usage_decay)
        restarted = 0
        if loss_cfg.restart_every > 0 and not loss_cfg.freeze_codes and (step + 1) % loss_cfg.restart_every == 0 \
                and step + 1 <= int(loss_cfg.restart_until * loop.steps):
            restarted = restart_dead_codes(self.model, self.opt, self.usage, result.z, step, self.seed, loss_cfg, info)
        return {**result.logs, "restarted": restarted}

    def log_extras(self) -> dict[str, Any]:
        usage = self.usage
        return {"running_usage": float((usage > self.parts.loss.restart_threshold * usage.mean()).float().mean())}

    def evaluate(self) -> dict[str, Any]:
        return evaluate(self.model, self.sets)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"usage": self.usage}

    def export(self, final: dict[str, Any] | None, train_seconds: float) -> tuple[Path | None, dict[str, Any] | None]:
        if not self.info.is_main:
            return None, final
        assert final is not None
        out = Path(self.parts.export.dir) if self.parts.export.dir else Path(self.resolved["run_dir"]) / "tokenizer"
        export_dir = export(self.model, self.parts, self.sets, self.resolved, final, train_seconds, self.data_seconds,
                            self.info, out)
        return export_dir, json.loads((export_dir / "manifest.json").read_text())["metrics"]


def export(model: VisionTokenizer, parts: Parts, sets: list[FrameSet], resolved: dict[str, Any],
           metrics_fp32: dict[str, Any], train_seconds: float, data_seconds: float, info: DistInfo,
           out: Path) -> Path:
    """Write the tokenizer folder (weights in ``export.dtype``) and its ``manifest.json``."""
    dtype = getattr(torch, parts.export.dtype)
    model.save(out, dtype=dtype)
    shipped = VisionTokenizer.load(out)
    metrics = evaluate(shipped, sets)  # of the file as stored (fp16 rounding included)
    manifest = {
        "command": command_line("emu_world.train"),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "identity": shipped.identity(),
        "code_identity": shipped.code_identity(),
        "tokens_per_frame": shipped.tokens_per_frame,
        "grid": list(shipped.grid),
        "config": resolved,
        "data": [fs.describe() for fs in sets],
        "metrics": metrics,
        "metrics_fp32": metrics_fp32,
        "train_seconds": round(train_seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "world_size": info.world_size,
        "torch_threads_per_rank": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "note": "metrics: held-out frames of the training datasets (last dataset.eval_episodes episodes); "
                "see `python -m emu_world.bench tokenizer` for frames freshly recorded from the simulator",
    }
    if parts.init is not None:
        started = VisionTokenizer.load(parts.init)
        manifest["init"] = {"path": str(parts.init), "identity": started.identity(),
                            "code_identity": started.code_identity(), "codes_kept": parts.loss.freeze_codes}
        if parts.loss.freeze_codes and started.code_identity() != manifest["code_identity"]:
            raise RuntimeError(f"freeze_codes=true but the codes changed: {started.code_identity()} -> "
                               f"{manifest['code_identity']} (a bug: the encoder or codebook was updated)")
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / "manifest.json")
    print(f"exported tokenizer {manifest['identity']} to {out} (held-out PSNR {metrics['psnr']} dB, "
          f"code usage {metrics['code_usage']:.3f})", flush=True)
    return out

