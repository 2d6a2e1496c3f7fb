"""The glue ops the Wan DiT and VAE call. This module is the stable API; `kernels/` may route each op
to a fused CuPy kernel (issue 8) behind these signatures. Until then every op is its torch reference.

All ops compute in float32 and return the input dtype unless stated.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x) (no affine, over the last dim) * (1 + scale) + shift, computed in fp32.

    x: [B, L, D]; shift/scale: [B, 1, D] (per sample) or broadcastable to x.
    Returns float32 (Wan keeps the modulated activations in fp32 before casting for the linear).
    """
    xf = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return xf * (1 + scale.float()) + shift.float()


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, in fp32, returned in x's dtype."""
    return (x.float() + y.float() * gate.float()).to(x.dtype)


def gated_residual_ln_modulate(x, gate, y, shift, scale, eps: float = 1e-6):
    """Fused: x' = x + gate*y; y' = LN(x')*(1+scale)+shift. Returns (x' in x.dtype, y' in fp32)."""
    x2 = gated_residual(x, gate, y)
    return x2, ln_modulate(x2, shift, scale, eps)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times `weight`, returned in x's dtype (Wan's q/k norms)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rms_norm_cf(x: torch.Tensor, gamma: torch.Tensor, bias: Optional[torch.Tensor] = None,
                silu: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """The Wan VAE's channel-first RMS norm: F.normalize(x, dim=1) * sqrt(C) * gamma (+ bias), then
    optionally SiLU. x: [B, C, T, H, W] (or [B, C, H, W]); gamma: [C, 1, 1(, 1)]."""
    y = F.normalize(x, dim=1, eps=eps) * (x.shape[1] ** 0.5) * gamma
    if bias is not None:
        y = y + bias
    return F.silu(y) if silu else y


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the head dim by angles given as float32 cos/sin.

    x: [B, L, H, Dh]; cos/sin: [L, Dh/2] (or broadcastable [B, L, 1, Dh/2]). Computed in fp32,
    returned in x's dtype. Equivalent to the official complex multiplication.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, Dh/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def quantize_int8_per_token(x: torch.Tensor, eps: float = 1e-8):
    """Per-row (token) symmetric int8: scale = max|x|/127 over the last dim; q = round(x/scale).

    Returns (q int8 same shape, scale float32 [..., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(eps) / 127.0
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_gemm_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, activation: str = "none",
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize an int32 GEMM accumulator [M, N]: acc * a_scale[M,1] * w_scale[N] (+ bias[N]),
    then the activation ("none" | "gelu_tanh" | "silu"), cast to out_dtype."""
    y = acc.float() * a_scale.float() * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "silu":
        y = F.silu(y)
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}; expected none, gelu_tanh or silu")
    return y.to(out_dtype)
