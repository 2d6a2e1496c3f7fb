"""Spatially tiled Wan VAE decode: overlapping tiles, each streamed through all latent frames with its own
causal state (`vae.init_state` / `vae.decode_step`), blended with linear ramps. Approximate (a tile
changes the context of every conv near a seam and of the global attention); see docs/vae.md."""
from __future__ import annotations

import logging

import torch

from ..core.log import log_once
from ..core.progress import Progress

logger = logging.getLogger(__name__)


def check_tile(tile) -> tuple[int, int]:
    size, overlap = int(tile[0]), int(tile[1])
    if size < 2 or overlap < 0 or overlap * 2 > size:
        raise ValueError(f"tile (size {size}, overlap {overlap}) in latent pixels: need size >= 2 and "
                         f"0 <= overlap <= size/2")
    return size, overlap


def tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Tile start offsets covering [0, n): stride size-overlap, the last tile aligned to the end."""
    if size >= n:
        return [0]
    stride = size - overlap
    starts = list(range(0, n - size, stride)) + [n - size]
    return sorted(set(starts))


def ramp(n: int, overlap: int, ramp_start: bool, ramp_end: bool, device) -> torch.Tensor:
    """Blend weights over n pixels: linear 0->1 over `overlap` pixels at each interior edge."""
    wgt = torch.ones(n, device=device, dtype=torch.float32)
    if overlap > 0:
        up = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if ramp_start:
            wgt[:overlap] = up
        if ramp_end:
            wgt[n - overlap:] = up.flip(0)
    return wgt


def decode_tiled(vae, z: torch.Tensor, tile: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """Decode z (model dtype and device) into `out` tile by tile (tile-major, so only one tile's caches
    are alive), blending overlaps linearly."""
    b, _, t, h, w = z.shape
    r = vae.cfg.spatial_ratio
    size, overlap = tile
    ys, xs = tile_starts(h, size, overlap), tile_starts(w, size, overlap)
    log_once(logger, ("wan_vae_tiled", h, w, size, overlap),
             "Wan VAE decode: tiled, %d x %d tiles of %d latent px with overlap %d (latent %dx%d)",
             len(ys), len(xs), size, overlap, h, w)
    out.zero_()
    wsum = torch.zeros(1, 1, 1, h * r, w * r, device=out.device, dtype=torch.float32)
    with Progress(total=len(ys) * len(xs) * t, desc="Wan VAE tiled decode") as bar:
        for y0 in ys:
            for x0 in xs:
                th, tw = min(size, h - y0), min(size, w - x0)
                wy = ramp(th * r, overlap * r, y0 > 0, y0 + th < h, out.device)
                wx = ramp(tw * r, overlap * r, x0 > 0, x0 + tw < w, out.device)
                wt = wy[:, None] * wx[None, :]  # (th*r, tw*r)
                wsum[..., y0 * r:(y0 + th) * r, x0 * r:(x0 + tw) * r] += wt
                wt = wt.to(out.dtype)
                st, n = vae.init_state(), 0
                for i in range(t):
                    for frame in vae.decode_step(z[:, :, i, y0:y0 + th, x0:x0 + tw], st, last=i == t - 1):
                        out[:, :, n, y0 * r:(y0 + th) * r, x0 * r:(x0 + tw) * r] += frame * wt
                        n += 1
                    bar.update(1)
    out /= wsum.to(out.dtype)
    return out
