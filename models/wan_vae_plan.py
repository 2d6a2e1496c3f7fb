"""Memory planning of a Wan VAE decode, decided before any work: the estimate, the band count, tiles.

`estimate_decode_bytes` counts the live tensor bytes of a decode from the config (caches, working set,
output); `plan_decode` compares it with what the device can still give and picks exact row bands first,
then tiles (`tiling="auto"`) or refuses (`tiling="off"`). The planners reach the model only through
`vae.estimate_decode_bytes`, `vae.cfg.spatial_ratio`, `vae.device`, `vae.dtype` and the row-band hooks
(`wan_vae_bands.decode_halo` / `split_rows`), so another family plugs in with its own estimate.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..core.memory import available_memory  # the plan reads it through this module (tests patch it here)

from . import wan_vae_bands, wan_vae_winograd

logger = logging.getLogger(__name__)

ALLOC_MARGIN = 1.75  # usable = available / margin when planning (fragmentation, oneDNN scratch)


def estimate_decode_bytes(cfg, latent_shape, dtype: torch.dtype, tile: Optional[int] = None,
                          bands: int = 1, halo: int = 6, device_type: str = "cpu") -> int:
    """Peak bytes for a decode beyond the weights (a `WanVAEConfig`): causal caches + per-frame working
    set + output.

    Caches: every causal 3-tap conv keeps its last 2 input frames at its resolution (one tile's worth when
    tiled, tile-major). Working set: ~6 frame-sized activations at the widest/biggest layer (norm
    temporaries, conv output, residual, upsampled input). Output: the whole video in the model dtype
    (+ an fp32 weight map when tiled). With `bands` > 1 (the decoder's levels after its last temporal
    upsampling run band by band, see `wan_vae_bands`): the front levels' caches and working set plus the
    kept front frames, or the kept front frames plus one band (its rows + the halo it computes for the
    next band, at most the whole frame) of the back levels' caches and working set and the rows carried
    between bands (they grow with the frame count, like the kept front frames), whichever is larger.
    In fp32/fp64 the convs after the first temporal upsampling hold one pending output frame each between
    the two frames of a time pair (`CausalConv3d.pair_step`), and the wide 3x3 convs' Winograd scratch
    (`wan_vae_winograd.scratch_elements`, per stream: whole frames, or one band) is added."""
    b, _, t, h, w = (int(s) for s in latent_shape)
    es = torch.empty((), dtype=dtype).element_size()
    r = cfg.spatial_ratio
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    dims = [cfg.dim * u for u in (cfg.dim_mult[-1],) + tuple(cfg.dim_mult[::-1])]
    tup = tuple(cfg.temporal_downsample[::-1])
    split = max((i for i in range(len(dims) - 2) if tup[i]), default=None)  # stage of the last upsample3d
    px = th * tw  # pixels per frame at the current decoder level
    cache = [2 * cfg.z_dim * px + 4 * 2 * dims[0] * px, 0]  # [front, back]: conv1, middle (2 blocks x 2 convs)
    work = [0, 0]
    fronts, rows, carry = 0, th, 0
    pairs = dtype in (torch.float32, torch.float64)
    first_t = min((i for i in range(len(dims) - 2) if tup[i]), default=len(dims))
    wide = [[(dims[0], dims[0], px)] * 4, []]  # [front, back] 3x3 convs (c_in, c_out, px): Winograd scratch
    for i in range(len(dims) - 1):
        side = 0 if split is not None and i <= split else 1
        if side:  # rows carried between bands: 2 input rows per conv (and upsampling) and frame
            carry += 2 * tw * 2 ** i * dims[i + 1] * (2 * (cfg.num_res_blocks + 1) + 1)
        in_dim = dims[i] if i == 0 else dims[i] // 2
        for k in range(cfg.num_res_blocks + 1):
            cache[side] += 2 * px * ((in_dim if k == 0 else dims[i + 1]) + dims[i + 1])
            if pairs and i > first_t:
                cache[side] += 2 * px * dims[i + 1]
            wide[side] += [(in_dim if k == 0 else dims[i + 1], dims[i + 1], px), (dims[i + 1], dims[i + 1], px)]
        work[side] = max(work[side], 6 * max(in_dim, dims[i + 1]) * px)
        if i != len(dims) - 2:
            if tup[i]:
                cache[side] += 2 * dims[i + 1] * px  # time_conv state
            if i == split:  # the kept front frames: the time conv's output for every video frame
                rows = th * 2 ** i  # split-resolution rows
                fronts = (1 + cfg.temporal_ratio * (t - 1)) * dims[i + 1] * px
            work[1 if i == split else side] = max(work[1 if i == split else side],
                                                  4 * dims[i + 1] * px + 2 * dims[i + 1] * px * 4)
            px *= 4
    cache[1] += 2 * 3 * px  # head conv: partial output sums (3 channels), see CausalConv3d.partial_step
    out_bytes = b * 3 * (1 + cfg.temporal_ratio * (t - 1)) * h * r * w * r * (es + (4 if tile else 0))
    if bands <= 1 or split is None:
        return int(peak_elements(b, cache, work, wide, dtype, device_type) * es + out_bytes)
    frac = min(1.0, (math.ceil(rows / bands) + halo) / rows)
    frames = 1 + cfg.temporal_ratio * (t - 1)
    carried = (frames + 1) * carry  # one ring of carried rows per layer for all bands (wan_vae_bands.Band)
    return int(peak_elements(b, cache, work, wide, dtype, device_type, (frac, fronts, carried)) * es + out_bytes)


def peak_elements(b: int, cache: list, work: list, wide: list, dtype: torch.dtype, device_type: str,
                  banded: Optional[tuple] = None) -> float:
    """The peak of a decode's live elements from its per-sample [front, back] caches, working sets and 3x3
    convs `wide` [(c_in, c_out, px)] (for the Winograd scratch), batch b: whole frames (banded None), or
    with bands = (frac, fronts, carried): the front half (plus the kept front frames), or the kept front
    frames plus a `frac` of the back half and the carried rows, whichever is larger. Both VAE families'
    `estimate_decode_bytes` end here."""
    def scratch(convs, f=1.0):
        return wan_vae_winograd.scratch_elements([(ci, co, int(b * f * px)) for ci, co, px in convs], dtype, device_type)

    if banded is None:
        return b * (sum(cache) + max(work)) + scratch(wide[0] + wide[1])
    frac, fronts, carried = banded
    return max(b * (cache[0] + work[0] + fronts) + scratch(wide[0]),
               b * (fronts + frac * (cache[1] + work[1]) + carried) + scratch(wide[1], frac))


def usable_memory(device) -> Optional[int]:
    # The estimate counts live tensor bytes; the process peak is higher by allocator fragmentation and
    # oneDNN scratch (measured RSS peaks 0.7-1.7x the estimate on CPU, see docs/vae.md).
    avail = available_memory(device)
    return None if avail is None else int(avail / ALLOC_MARGIN)


def pick_tile(vae, latent_shape, avail: int) -> Optional[tuple[int, int]]:
    """The largest square tile (latent px, overlap = tile/4) whose decode fits in `avail` bytes."""
    h, w = latent_shape[-2:]
    size = max(h, w)
    while size >= 8:
        if vae.estimate_decode_bytes(latent_shape, tile=size) <= avail:
            return size, max(1, size // 4)
        size = size * 3 // 4
    return None


def auto_bands(vae, latent_shape) -> int:
    """The default band count: bands of at least 3 x halo split-resolution rows (wan2.1: 72 output
    rows), if that needs less memory than whole frames, else 1. Bands compute no row twice, so they
    cost only smaller convolutions and a few carried rows: measured at 9x256x256 (3 bands) as fast as
    whole frames with 0.4x the memory. But a banded decode keeps the front half's output of every
    frame, so for long videos whole frames need less (wan2.1 at 720p: from ~30 frames)."""
    bands = max(1, wan_vae_bands.split_rows(vae, latent_shape) // (3 * max(1, wan_vae_bands.decode_halo(vae))))
    if bands > 1 and (vae.estimate_decode_bytes(latent_shape, bands=bands)
                      >= vae.estimate_decode_bytes(latent_shape)):
        return 1
    return bands


def plan_decode(vae, latent_shape, tiling: str, bands: Optional[int]) -> tuple[int, Optional[tuple[int, int]]]:
    """(bands, tile) for an untiled-or-auto decode, decided before any work. Auto bands grow (exact)
    until the estimate fits; only then does tiling="auto" fall back to (approximate) tiles."""
    rows = wan_vae_bands.split_rows(vae, latent_shape)
    max_bands = max(1, rows // max(1, wan_vae_bands.decode_halo(vae)))  # bands no thinner than their halo
    want = auto_bands(vae, latent_shape) if bands is None else min(bands, max(1, rows))
    avail = usable_memory(vae.device)
    if avail is None or vae.estimate_decode_bytes(latent_shape, bands=want) <= avail:
        return want, None
    if bands is None:
        for b in range(want + 1, max_bands + 1):
            if vae.estimate_decode_bytes(latent_shape, bands=b) <= avail:
                logger.info("Wan VAE decode: %d exact row bands to fit %.2f GiB usable on %s",
                            b, avail / 2 ** 30, vae.device)
                return b, None
        want = max_bands
    return want, _plan_tiling(vae, latent_shape, tiling, avail, bands=want)


def _plan_tiling(vae, latent_shape, tiling: str, avail: int, bands: int = 1) -> Optional[tuple[int, int]]:
    """Tile (auto) or refuse (off) a decode whose estimate does not fit in `avail`."""
    need = vae.estimate_decode_bytes(latent_shape, bands=bands)
    r = vae.cfg.spatial_ratio
    fit = pick_tile(vae, latent_shape, avail)
    gib = 2 ** 30
    if fit is None:
        raise MemoryError(
            f"Wan VAE decode of latents {tuple(latent_shape)} needs about {need / gib:.2f} GiB beyond the "
            f"weights and only {avail / gib:.2f} GiB is usable on {vae.device}; even the smallest tile "
            f"would not fit. Free memory or decode fewer/smaller frames.")
    if tiling == "off":
        raise MemoryError(
            f"Wan VAE decode of latents {tuple(latent_shape)} needs about {need / gib:.2f} GiB beyond the "
            f"weights and only {avail / gib:.2f} GiB is usable on {vae.device}. Enable tiling: a tile of "
            f"{fit[0] * r} px (overlap {fit[1] * r} px) would fit.")
    logger.info("Wan VAE decode: untiled needs ~%.2f GiB, %.2f GiB available on %s -> tiling with %d px tiles",
                need / gib, avail / gib, vae.device, fit[0] * r)
    return fit


def check_tile_fits(vae, latent_shape, tile: tuple[int, int]) -> None:
    """Refuse a custom tile whose decode would not fit, naming one that would."""
    avail = usable_memory(vae.device)
    need = vae.estimate_decode_bytes(latent_shape, tile=tile[0])
    if avail is not None and need > avail:
        fit = pick_tile(vae, latent_shape, avail)
        r = vae.cfg.spatial_ratio
        hint = (f"a tile of {fit[0] * r} px would fit" if fit else
                "even the smallest tile would not fit; free memory or decode fewer frames")
        raise MemoryError(f"Wan VAE tiled decode of latents {tuple(latent_shape)} with {tile[0]} latent px tiles "
                          f"needs about {need / 2 ** 30:.2f} GiB, {avail / 2 ** 30:.2f} GiB usable on "
                          f"{vae.device}; {hint}")
