"""Initial noise identical to ComfyUI's `comfy.sample.prepare_noise`, and the latent normalisation.

ComfyUI seeds the CPU generator with `torch.manual_seed(seed)` and draws `randn(latent.shape)` on the CPU.
We use a private `torch.Generator` seeded the same way (same Mersenne-Twister stream, same numbers) so we do
not reset the process-wide RNG as a side effect. With a `batch_index` list (a latent split from a batch),
ComfyUI draws one [1, ...] sample per index up to the largest and picks the requested ones; so do we.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..core.log import log_once

logger = logging.getLogger(__name__)

SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Standard normal noise of `latent`'s shape and dtype, on the CPU, as ComfyUI draws it for `seed`."""
    if not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2^64-1], got {seed!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.shape, dtype=latent.dtype, layout=latent.layout, generator=gen, device="cpu")
    inds = [int(i) for i in batch_index]
    if not inds or min(inds) < 0:
        raise ValueError(f"latent batch_index must be a non-empty list of indices >= 0, got {list(batch_index)!r}")
    if len(inds) != latent.shape[0]:
        raise ValueError(f"latent batch_index has {len(inds)} entries but the latent batch is {latent.shape[0]}")
    wanted = set(inds)
    drawn = {}
    for i in range(max(inds) + 1):
        n = torch.randn([1, *latent.shape[1:]], dtype=latent.dtype, layout=latent.layout, generator=gen, device="cpu")
        if i in wanted:
            drawn[i] = n
    return torch.cat([drawn[i] for i in inds], dim=0)


# Wan2.1 VAE latent statistics (the 16 per-channel means/stds published with Wan2.1's VAE and used by
# ComfyUI's `latent_formats.Wan21`). Models see (z - mean) / std; LATENT dicts hold raw z.
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

LATENT_FORMATS = ("wan21", "none")


class LatentFormat:
    """Maps raw VAE latents [B,C,T,H,W] to the space the denoisers work in and back (ComfyUI `process_in/out`)."""

    def __init__(self, name: str):
        if name not in LATENT_FORMATS:
            raise ValueError(f"unknown latent format {name!r}; expected one of {LATENT_FORMATS}")
        self.name = name

    def _stats(self, x: torch.Tensor):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(WAN21_MEAN, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(WAN21_STD, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def process_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "none":
            return x
        self._check(x)
        mean, std = self._stats(x)
        return (x - mean) / std

    def process_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "none":
            return x
        self._check(x)
        mean, std = self._stats(x)
        return x * std + mean

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[1] != len(WAN21_MEAN):
            raise ValueError(f"the wan21 latent format needs 16 channels on dim 1, got a latent of shape "
                             f"{tuple(x.shape)}; use a Wan2.1 VAE latent (Empty Latent Video makes 16 channels)")


def latent_format_for(denoiser) -> LatentFormat:
    """The latent format a denoiser declares in `info['latent_format']`, else Wan2.1's for 16-channel models."""
    name = denoiser.info.get("latent_format") if getattr(denoiser, "info", None) else None
    if name is None:
        channels = denoiser.info.get("latent_channels", denoiser.in_channels)
        name = "wan21" if channels == 16 else "none"
        log_once(logger, ("latent_format_guess", denoiser.family, name),
                 "denoiser %r (%s) declares no info['latent_format']; using %r from its %d latent channels",
                 denoiser.name, denoiser.family, name, channels)
    return LatentFormat(name)
