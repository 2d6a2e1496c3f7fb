"""Spatially tiled Wan VAE decode: overlapping tiles, each streamed through all latent frames with its own
causal state (`vae.init_state` / `vae.decode_step`), blended with linear ramps. Approximate (a tile
changes the context of every conv near a seam and of the global attention); see docs/vae.md.

Also ComfyUI's tiled decode (`decode_tiled_comfy`, the semantics of its VAEDecodeTiled node): tiles in space
AND time, each decoded as a video of its own, blended with ComfyUI's feathered masks."""
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


# ---- ComfyUI's tiled decode (comfy/sd.py VAE.decode_tiled_3d + comfy/utils.py tiled_scale_multidim) ---------


def comfy_tile_params(tile_size: int, overlap: int, temporal_size: int, temporal_overlap: int,
                      spatial_ratio: int = 8, temporal_ratio: int = 4) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """ComfyUI 0.3.64 VAEDecodeTiled's widgets (pixels, frames) -> latent tile (t, h, w) and overlap (t, h, w) for
    a video VAE: overlap capped at tile_size/4 and temporal_overlap halved when over temporal_size/2, then divided
    by the compression (Wan: 8 in space, 4 in time), the temporal tile at least 2 latent frames, its overlap 1 ..
    tile/2 latent frames."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    if temporal_size < temporal_overlap * 2:
        temporal_overlap = temporal_overlap // 2
    tile_t = max(2, temporal_size // temporal_ratio)
    overlap_t = max(1, min(tile_t // 2, temporal_overlap // temporal_ratio))
    tile_xy, overlap_xy = tile_size // spatial_ratio, overlap // spatial_ratio
    return (max(2, tile_t), tile_xy, tile_xy), (max(1, overlap_t), overlap_xy, overlap_xy)


def comfy_positions(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of ComfyUI's tiles along one latent axis of length n (`tiled_scale_multidim`): starts
    0, tile-overlap, ... below n-overlap, each clamped to n-overlap and cut at the end (the last tiles may be
    short and overlap more)."""
    starts = range(0, n - overlap, tile - overlap) if n > tile else [0]
    out = []
    for s in starts:
        pos = max(0, min(n - overlap, s))
        out.append((pos, min(tile, n - pos)))
    return out


def comfy_feather(n: int, feather: int, device) -> torch.Tensor:
    """ComfyUI's blend weights over n output samples of one tile axis: the t-th sample from each end scaled
    by (t+1)/feather for t < feather (both ends, the image border included); all ones when feather >= n."""
    w = torch.ones(n, device=device, dtype=torch.float32)
    if feather >= n:
        return w
    for t in range(feather):
        a = (t + 1) / feather
        w[t] *= a
        w[n - 1 - t] *= a
    return w


def decode_tiled_comfy(vae, z: torch.Tensor, tile: tuple[int, int, int], overlap: tuple[int, int, int]) -> torch.Tensor:
    """ComfyUI's tiled decode of raw latents z [B, C, T, h, w] -> float32 video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1].

    `tile` / `overlap` are (t, h, w) in latent units (`comfy_tile_params` derives them from VAEDecodeTiled's
    widgets). Each batch item is cut into tiles at `comfy_positions` along each axis; a latent that fits one
    tile is decoded whole. Each tile is decoded as a video of its own (its first latent frame decodes to one
    frame, so a tile of l latent frames gives 4l-3 frames placed at frame 4*start), weighted by the product of
    the axes' `comfy_feather` ramps (feather = the overlap's output size: 4*o-3 frames in time, 8*o pixels in
    space), summed, and divided by the summed weights. Not equal to the untiled decode: every tile restarts
    the causal temporal state and sees only its own neighbourhood."""
    b, _, t, h, w = z.shape
    r, tr = vae.cfg.spatial_ratio, vae.cfg.temporal_ratio
    tile, overlap = tuple(int(v) for v in tile), tuple(int(v) for v in overlap)
    if len(tile) != 3 or len(overlap) != 3 or min(tile) < 1 or min(overlap) < 0 or \
            any(o >= n for o, n in zip(overlap, tile)):
        raise ValueError(f"ComfyUI tiled decode: tile {tile} and overlap {overlap} (latent t, h, w) need "
                         f"0 <= overlap < tile on every axis")
    frames = lambda n: max(0, n * tr - (tr - 1))  # noqa: E731 (ComfyUI's upscale_ratio for Wan's time axis)
    dev = vae.device
    out_shape = (b, 3, frames(t), h * r, w * r)
    z = z.to(device=dev, dtype=vae.dtype)
    if t <= tile[0] and h <= tile[1] and w <= tile[2]:
        return vae.decode(z, tiling="off").float()  # one tile: ComfyUI decodes it whole (clamped later alike)
    pos = [comfy_positions(n, k, o) for n, k, o in zip((t, h, w), tile, overlap)]
    feathers = (frames(overlap[0]), overlap[1] * r, overlap[2] * r)
    log_once(logger, ("wan_vae_comfy_tiled", t, h, w, tile, overlap),
             "Wan VAE decode: ComfyUI tiles, %d x %d x %d tiles of %s latent (t, h, w) with overlap %s (latent %s)",
             len(pos[0]), len(pos[1]), len(pos[2]), tile, overlap, (t, h, w))
    video = torch.empty(out_shape, device=dev, dtype=torch.float32)
    with vae.raw_output(), Progress(total=b * len(pos[0]) * len(pos[1]) * len(pos[2]),
                                    desc="Wan VAE tiled decode (ComfyUI tiles)") as bar:
        for i in range(b):
            acc = torch.zeros((1,) + out_shape[1:], device=dev, dtype=torch.float32)
            div = torch.zeros_like(acc)
            for t0, tl in pos[0]:
                for y0, yl in pos[1]:
                    for x0, xl in pos[2]:
                        ps = vae.decode(z[i:i + 1, :, t0:t0 + tl, y0:y0 + yl, x0:x0 + xl], tiling="off").float()
                        n_t, n_h, n_w = ps.shape[2:]
                        mask = comfy_feather(n_t, feathers[0], dev)[:, None, None] \
                            * comfy_feather(n_h, feathers[1], dev)[None, :, None]
                        mask = (mask * comfy_feather(n_w, feathers[2], dev)[None, None, :]).expand_as(ps)
                        sl = (slice(None), slice(None), slice(t0 * tr, t0 * tr + n_t), slice(y0 * r, y0 * r + n_h),
                              slice(x0 * r, x0 * r + n_w))
                        acc[sl] += ps * mask
                        div[sl] += mask
                        bar.update(1)
            video[i:i + 1] = acc / div
    return video
