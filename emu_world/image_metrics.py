"""Image quality and codebook metrics shared by training, benchmarks and evaluation.

PSNR and SSIM take uint8 frames (B, H, W, 3) and are computed on 0..255 values, per frame, then
averaged over frames (the usual convention for video PSNR). SSIM is the standard Gaussian-window
form (Wang et al. 2004: 11x11 window, sigma 1.5, K1=0.01, K2=0.03), per channel, averaged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_float(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).to(torch.float64)  # (B, 3, H, W)


def psnr_per_frame(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB between two uint8 frame batches (identical frames give 100 dB, a cap)."""
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"frame batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x - y).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(255.0**2 / mse.clamp_min(1e-12)), torch.full_like(mse, 100.0))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(psnr_per_frame(a, b).mean())


def detail_split(originals: np.ndarray | torch.Tensor, recon: np.ndarray | torch.Tensor, patch: int,
                 min_std: float = 8.0) -> dict[str, float]:
    """Where a reconstruction's error lies: the frames are cut into ``patch`` x ``patch`` cells (a
    tokenizer's code cells), a cell is *detail* when the original's pixel values vary (standard
    deviation over the cell's pixels, averaged over channels) by at least ``min_std`` grey levels, and
    the rest is *flat* (a table, a wall, the sky). Pooled over all frames:

    - ``detail_fraction``: the share of cells that are detail;
    - ``detail_psnr`` / ``flat_psnr``: PSNR over the pixels of detail / flat cells (100: no such cell
      or no error);
    - ``detail_error_share``: the share of the squared error that lies in detail cells.

    In simulated robot frames the flat background is easy and the arms, cloth edges and objects are
    the detail; a frame-mean PSNR mixes the two in the proportion the camera happens to show."""
    x, y = _as_float(originals), _as_float(recon)
    if x.shape != y.shape:
        raise ValueError(f"frame batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    B, C, H, W = x.shape
    if patch < 1 or H % patch or W % patch:
        raise ValueError(f"detail_split: patch={patch} must divide the {H}x{W} frames")

    def cells(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, h, w, patch * patch)
        return t.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 1, 2, 4, 3, 5).flatten(-2)

    detail = cells(x).std(dim=-1, unbiased=False).mean(dim=1) >= min_std  # (B, h, w)
    sq = cells((x - y).pow(2)).sum(dim=(1, 4))  # (B, h, w) squared error summed over the cell
    per_cell = C * patch * patch

    def cell_psnr(mask: torch.Tensor) -> float:
        n = int(mask.sum())
        mse = float(sq[mask].sum()) / (n * per_cell) if n else 0.0
        return 100.0 if mse <= 0 else 10 * math.log10(255.0**2 / mse)

    total = float(sq.sum())
    return {"detail_fraction": float(detail.double().mean()), "detail_psnr": cell_psnr(detail),
            "flat_psnr": cell_psnr(~detail),
            "detail_error_share": float(sq[detail].sum()) / total if total > 0 else 0.0}


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size)


def ssim_per_frame(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B,) SSIM between two uint8 frame batches (valid-region Gaussian SSIM, channel mean)."""
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"frame batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    C = x.shape[1]
    w = _gaussian_window().to(x.dtype).expand(C, 1, 11, 11)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=C)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, batch: int = 64) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    vals = [ssim_per_frame(a[i: i + batch], b[i: i + batch]) for i in range(0, len(a), batch)]
    return float(torch.cat(vals).mean())


def nudge(frames: np.ndarray, seed: int) -> np.ndarray:
    """(n, H, W, 3) uint8 frames with every value moved by -1, 0 or +1 grey level (uniform, seeded,
    clipped): the error of a lossless-in-YUV video round trip or of a camera's least significant bit."""
    step = np.random.default_rng(seed).integers(-1, 2, size=frames.shape)
    return np.clip(frames.astype(np.int16) + step, 0, 255).astype(np.uint8)


def code_stability(codes: torch.Tensor, nudged_codes: torch.Tensor) -> float:
    """Fraction of codes a tokenizer keeps when its input frames are :func:`nudge`-d."""
    return float((torch.as_tensor(codes) == torch.as_tensor(nudged_codes)).double().mean())


def code_usage(codes: np.ndarray | torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of the K codes used at least once, and the perplexity of the code histogram."""
    c = torch.as_tensor(codes).reshape(-1).long()
    counts = torch.bincount(c, minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"code_usage": float((counts > 0).double().mean()), "perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum())}
