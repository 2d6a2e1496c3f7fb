"""Frequency split of the two branches' predictions: v = LP_c(v_S) + HP_c(alpha*v_S + (1-alpha)*v_D).

LP_c / HP_c are complementary smooth radial masks in the FFT domain over the last two (H, W) or three
(T, H, W) dims. The radius is measured in units of the Nyquist frequency along each axis (r = 1 at Nyquist
on one axis, sqrt(2) in the (H, W) corner), so the cutoff c in [0, ~1.5] means the same on any latent size.
The mask falls from 1 to 0 with a raised cosine of width `width` centred on c; c = 0 means no split.

Because LP + HP = identity, the fused field needs one real FFT pair, not two:
    v = blend + (1 - alpha) * LP_c(v_S - v_D),   blend = alpha*v_S + (1-alpha)*v_D.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

DEFAULT_WIDTH = 0.1


@lru_cache(maxsize=32)
def _radius(shape: tuple, device_str: str) -> torch.Tensor:
    """Normalised radial frequency on the rfftn grid of `shape` (last dim halved), float32."""
    device = torch.device(device_str)
    axes = []
    for k, n in enumerate(shape):
        f = torch.fft.rfftfreq(n, device=device) if k == len(shape) - 1 else torch.fft.fftfreq(n, device=device)
        axes.append((f / 0.5) ** 2)  # cycles/sample -> fraction of Nyquist, squared
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(grids)).to(torch.float32)


def lowpass_mask(shape: tuple, cutoff: float, width: float = DEFAULT_WIDTH, device="cpu") -> torch.Tensor:
    """The LP mask on the rfftn grid of `shape`: 1 below c - w/2, 0 above c + w/2, raised cosine between."""
    if cutoff < 0 or width <= 0:
        raise ValueError(f"cutoff must be >= 0 and width > 0, got cutoff={cutoff}, width={width}")
    r = _radius(tuple(int(n) for n in shape), str(torch.device(device)))
    t = ((r - (cutoff - width / 2)) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def _dims(x: torch.Tensor, over_time: bool) -> tuple:
    if over_time:
        if x.ndim < 3:
            raise ValueError(f"a (T, H, W) split needs a tensor with >= 3 dims, got shape {tuple(x.shape)}")
        return (-3, -2, -1)
    if x.ndim < 2:
        raise ValueError(f"an (H, W) split needs a tensor with >= 2 dims, got shape {tuple(x.shape)}")
    return (-2, -1)


def _apply(x: torch.Tensor, mask: torch.Tensor, dims: tuple) -> torch.Tensor:
    # FFT in fp32 at least: bf16/fp16 FFTs lose the small high-frequency energy the split is about.
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    spec = torch.fft.rfftn(xf, dim=dims)
    out = torch.fft.irfftn(spec * mask, s=[x.shape[d] for d in dims], dim=dims)
    return out.to(x.dtype)


def split(x: torch.Tensor, cutoff: float, width: float = DEFAULT_WIDTH, over_time: bool = False):
    """(low, high) parts of `x` over (H, W) or (T, H, W), each computed with its own mask (LP and 1 - LP)."""
    dims = _dims(x, over_time)
    mask = lowpass_mask(tuple(x.shape[d] for d in dims), cutoff, width, x.device)
    return _apply(x, mask, dims), _apply(x, 1.0 - mask, dims)


def fuse(v_s: torch.Tensor, v_d: torch.Tensor, alpha: float, cutoff: float, width: float = DEFAULT_WIDTH,
         over_time: bool = False) -> torch.Tensor:
    """LP_c(v_S) + HP_c(alpha*v_S + (1-alpha)*v_D); cutoff 0 is the plain blend (no FFT)."""
    if v_s.shape != v_d.shape:
        raise ValueError(f"the two branches predicted different shapes: semantic {tuple(v_s.shape)}, "
                         f"detail {tuple(v_d.shape)}; both models must work on the same latent")
    blend = v_s if alpha == 1.0 else alpha * v_s + (1.0 - alpha) * v_d
    if cutoff <= 0.0 or alpha == 1.0:
        return blend
    dims = _dims(v_s, over_time)
    mask = lowpass_mask(tuple(v_s.shape[d] for d in dims), cutoff, width, v_s.device)
    return blend + (1.0 - alpha) * _apply(v_s - v_d, mask, dims)
