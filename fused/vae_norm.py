"""The Wan VAE's channel-first RMS norm, optionally fused with SiLU (every VAE residual block runs
norm -> SiLU -> conv). `rms_norm_cf_ref` is the spec and fallback; the kernel (`vae_norm.cu`)
walks the channels of VEC adjacent positions per thread, accumulating the sum of squares in fp32,
and rounds once at the end (the reference rounds after every op when x is bf16/fp16). A block of
256 threads covers CF_TX vectors of positions, its threads splitting the channels (see the .cu).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import _plan as P
from . import _runtime

MODULE = "vae_norm"
CF_TX, CF_TY = 8, 32  # TF_CF_TX / TF_CF_TY in vae_norm.cu
INSTANCES = tuple(f"rms_norm_cf_kernel<{ct}, {v}>" for dt, ct in P.CTYPES.items()
                  for v in (P.vec_width(dt), 1))


def rms_norm_cf_ref(x: torch.Tensor, gamma: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    silu: bool = False, eps: float = 1e-12, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Wan VAE's channel-first RMS norm: F.normalize(x, dim=1) * sqrt(C) * gamma (+ bias), then
    optionally SiLU. x: [B, C, T, H, W] (or [B, C, H, W]); gamma: [C, 1, 1(, 1)].

    F.normalize's steps (L2 norm over dim 1, clamped at eps, one division), then one multiply by
    gamma * sqrt(C) and an in-place SiLU: 3 passes over x instead of 5, in x's memory layout (the VAE's
    CPU engine keeps frames channels-last, where the channel reduction is contiguous). `out`: write the
    result there (same shape and dtype as x, gamma of x's dtype, no bias), e.g. a cache buffer."""
    c = x.shape[1]
    if torch.is_grad_enabled() and out is None and any(t is not None and t.requires_grad for t in (x, gamma, bias)):
        # training (tools/train_fixtures.py): the in-place steps below would break autograd
        y = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps) * (c ** 0.5) * gamma
        y = y + bias if bias is not None else y
        return F.silu(y) if silu else y
    if out is not None:
        if bias is not None or gamma.dtype != x.dtype or out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError("rms_norm_cf_ref(out=...) needs no bias, gamma in x's dtype and out shaped like x")
        y = torch.div(x, torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps), out=out)
    else:
        y = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps)
    if gamma.dtype == y.dtype:
        y *= gamma * (c ** 0.5)
    else:  # mixed dtypes promote, as the official formula does
        y = y * (c ** 0.5) * gamma
    if bias is not None:
        y = y + bias
    return F.silu(y, inplace=True) if silu else y


def rms_norm_cf_unsupported(x, gamma, bias=None, silu=False, eps=1e-12) -> Optional[str]:
    r = P.device_reason((x, gamma, bias), ("x", "gamma", "bias")) or P.grad_reason(x, gamma, bias) \
        or P.dtype_reason("x", x) or P.contiguous_reason("x", x)
    if r:
        return r
    if x.ndim not in (4, 5) or x.numel() == 0:
        return f"x has shape {tuple(x.shape)}; expected a non-empty [B, C, T, H, W] or [B, C, H, W]"
    c = x.shape[1]
    for name, t in (("gamma", gamma), ("bias", bias)):
        if t is None:
            continue
        # One value per channel *aligned with dim 1 of x* under broadcasting: (C, 1, 1, 1) for a
        # 5-D x. A (C, 1, 1) gamma against [B, C, T, H, W] would broadcast over T instead.
        padded = [1] * (x.ndim - t.ndim) + list(t.shape)
        if t.ndim > x.ndim or padded != [1, c] + [1] * (x.ndim - 2):
            return (f"{name} has shape {tuple(t.shape)}; for x of {x.ndim} dims expected "
                    f"{(c,) + (1,) * (x.ndim - 2)} (one value per channel)")
        if t.dtype != x.dtype:
            return (f"{name} has dtype {t.dtype} but x has {x.dtype}; the reference would promote "
                    "the output, the kernel keeps x's dtype (cast the VAE to one dtype)")
    if c > P.INT32_MAX or math.ceil(x.shape[0] * math.prod(x.shape[2:]) / CF_TX) > P.INT32_MAX:
        return f"x of shape {tuple(x.shape)} is too large for one launch grid"
    return None


def plan(x: torch.Tensor, *ptrs) -> tuple:
    """(name expression, grid, block, S, n_vec) for x [B, C, *spatial]."""
    s = math.prod(x.shape[2:])
    vec = P.pick_vec(x.dtype, s, x, *ptrs)
    n_vec = x.shape[0] * s // vec
    return (f"rms_norm_cf_kernel<{P.CTYPES[x.dtype]}, {vec}>", (math.ceil(n_vec / CF_TX),),
            (CF_TX * CF_TY,), s, n_vec)


def rms_norm_cf_launch(x, gamma, bias=None, silu=False, eps=1e-12) -> torch.Tensor:
    reason = rms_norm_cf_unsupported(x, gamma, bias, silu, eps)
    if reason:
        raise ValueError(f"rms_norm_cf kernel: {reason}")
    g = gamma.reshape(-1).contiguous()
    b = None if bias is None else bias.reshape(-1).contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    name, grid, block, s, n_vec = plan(x, out)
    c = x.shape[1]
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, g, b, out, np.int32(c), np.int64(s), np.int64(n_vec), np.float32(eps),
                     np.float32(math.sqrt(c)), np.int32(bool(silu))), x.device)
    return out
