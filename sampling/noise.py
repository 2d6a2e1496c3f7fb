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

# Wan2.2 VAE latent statistics (48 channels; ComfyUI's `latent_formats.Wan22`, the Wan2.2 VAE's published values).
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
_STATS = {"wan21": (WAN21_MEAN, WAN21_STD), "wan22": (WAN22_MEAN, WAN22_STD)}

LATENT_FORMATS = ("wan21", "wan22", "none")


class LatentFormat:
    """Maps raw VAE latents [B,C,T,H,W] to the space the denoisers work in and back (ComfyUI `process_in/out`)."""

    def __init__(self, name: str):
        if name not in LATENT_FORMATS:
            raise ValueError(f"unknown latent format {name!r}; expected one of {LATENT_FORMATS}")
        self.name = name

    @property
    def channels(self) -> int:
        """Latent channels of this format (0 = any)."""
        return len(_STATS[self.name][0]) if self.name in _STATS else 0

    def _stats(self, x: torch.Tensor):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        m, s = _STATS[self.name]
        mean = torch.tensor(m, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(s, dtype=x.dtype, device=x.device).view(shape)
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
        if x.ndim < 2 or x.shape[1] != self.channels:
            hint = ("use a Wan2.1 VAE latent (Empty Latent Video makes 16 channels)" if self.name == "wan21" else
                    "use a Wan2.2 VAE latent (Wan22ImageToVideoLatent makes 48 channels)")
            raise ValueError(f"the {self.name} latent format needs {self.channels} channels on dim 1, got a latent "
                             f"of shape {tuple(x.shape)}; {hint}")


def latent_format_for(denoiser) -> LatentFormat:
    """The latent format a denoiser declares in `info['latent_format']`, else Wan2.1's for 16-channel models and
    Wan2.2's for 48-channel ones."""
    name = denoiser.info.get("latent_format") if getattr(denoiser, "info", None) else None
    if name is None:
        channels = denoiser.info.get("latent_channels", denoiser.in_channels)
        name = {16: "wan21", 48: "wan22"}.get(channels, "none")
        log_once(logger, ("latent_format_guess", denoiser.family, name),
                 "denoiser %r (%s) declares no info['latent_format']; using %r from its %d latent channels",
                 denoiser.name, denoiser.family, name, channels)
    return LatentFormat(name)
