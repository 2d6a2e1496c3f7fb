"""Pure quantize / dequantize pairs and the quantized GEMMs they feed. No modules, no state.

Conventions (all symmetric, zero-point free):
  int8 weights:  scale[n] = amax(|W[n, :]|) / 127  (or per group of `group_size` input columns),
                 q = round(W / scale) clamped to [-127, 127]  (-128 unused: keeps the range symmetric)
  fp8 e4m3fn:    scale = amax(|W|) / 448 (per tensor, ComfyUI's "scaled fp8") or per output row,
                 q = (W / scale).to(float8_e4m3fn)   (round-to-nearest-even by the cast)
  dequantize:    W ~= q.float() * scale
Scales are float32 always: a bf16 scale alone would add ~0.4 % relative error to every weight.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..core.log import log_once
from ..fused.ops import int8_gemm_epilogue, quantize_int8_per_token

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
INT8_MAX = 127.0
_EPS = 1e-12  # floor for amax so an all-zero row quantizes to zeros instead of NaN


def _check_weight(w: torch.Tensor, what: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point weight, got {w.dtype}")


# --------------------------------------------------------------------------------------------------
# int8 weights, per output channel (optionally per group of input columns)
# --------------------------------------------------------------------------------------------------

def quantize_int8_weight(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scale fp32 [N] or [N, K // group_size]). group_size 0 = per channel."""
    _check_weight(w, "quantize_int8_weight")
    n, k = w.shape
    wf = w.float()
    if group_size:
        if group_size < 0 or k % group_size:
            raise ValueError(f"group_size {group_size} must be positive and divide in_features {k}")
        g = wf.reshape(n, k // group_size, group_size)  # (N, G, gs)
        scale = g.abs().amax(dim=-1).clamp_min(_EPS) / INT8_MAX  # (N, G)
        q = torch.round(g / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(n, k)
        return q, scale
    scale = wf.abs().amax(dim=1).clamp_min(_EPS) / INT8_MAX  # (N,)
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_int8_weight`; the group size is implied by scale's shape."""
    n, k = q.shape
    if scale.ndim == 1:
        return (q.float() * scale.float()[:, None]).to(dtype)
    groups = scale.shape[1]
    w = q.float().reshape(n, groups, k // groups) * scale.float()[..., None]
    return w.reshape(n, k).to(dtype)


# --------------------------------------------------------------------------------------------------
# fp8 e4m3fn weights ("scaled fp8"), per tensor or per output channel
# --------------------------------------------------------------------------------------------------

def quantize_fp8_weight(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q float8_e4m3fn [N, K], scale fp32: scalar () per tensor, or [N] per channel)."""
    _check_weight(w, "quantize_fp8_weight")
    wf = w.float()
    if per_channel:
        scale = wf.abs().amax(dim=1).clamp_min(_EPS) / FP8_MAX  # (N,)
        q = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        scale = wf.abs().amax().clamp_min(_EPS) / FP8_MAX  # ()
        q = (wf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp8_weight` (scale () or [N])."""
    s = scale.float()
    if s.ndim == 1:
        s = s[:, None]
    return (q.float() * s).to(dtype)


# --------------------------------------------------------------------------------------------------
# Activations (dynamic, per token / row)
# --------------------------------------------------------------------------------------------------

def quantize_int8_activation(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], scale fp32 [M, 1]); the kernels layer's per-token quantizer."""
    return quantize_int8_per_token(x2d)


def quantize_fp8_activation(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q float8_e4m3fn [M, K], scale fp32 [M, 1]) with scale = amax(row) / 448."""
    xf = x2d.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / FP8_MAX
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# --------------------------------------------------------------------------------------------------
# SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, per input channel
# --------------------------------------------------------------------------------------------------

def smoothquant_scale(act_amax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s[k] = amax|X[:, k]|^alpha / amax|W[:, k]|^(1 - alpha); then X' = X / s and W' = W * s (exact product)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"SmoothQuant alpha must be in (0, 1), got {alpha}")
    if act_amax.shape != (w.shape[1],):
        raise ValueError(f"activation stats have shape {tuple(act_amax.shape)}, expected ({w.shape[1]},) "
                         f"= the layer's in_features")
    a = act_amax.float().clamp_min(1e-5)
    wmax = w.float().abs().amax(dim=0).clamp_min(1e-5)
    s = a.pow(alpha) / wmax.pow(1.0 - alpha)
    # Channels never seen active (a at the floor) would get tiny s and blow up x/s: keep them at 1.
    return torch.where(act_amax.float() > 1e-5, s, torch.ones_like(s)).clamp(1e-4, 1e4)


# --------------------------------------------------------------------------------------------------
# Quantized GEMMs
# --------------------------------------------------------------------------------------------------

def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pr, pc = rows - t.shape[0], cols - t.shape[1]
    return t if (pr == 0 and pc == 0) else torch.nn.functional.pad(t, (0, pc, 0, pr))


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N] with `torch._int_mm`.

    cuBLAS's int8 GEMM needs M > 16 and K, N multiples of 8; other shapes are zero-padded, which is
    exact (padded rows/columns contribute 0 to the int32 sums) and sliced away. The CPU kernel takes
    any shape.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if a.device.type == "cuda":
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        if (mp, kp, np_) != (m, k, n):
            log_once(logger, ("quant.int_mm.pad", m, k, n),
                     "int8 GEMM %dx%dx%d zero-padded to %dx%dx%d for cuBLAS (exact)", m, k, n, mp, kp, np_)
            out = torch._int_mm(_pad_to(a, mp, kp), _pad_to(b_t, np_, kp).t())
            return out[:m, :n]
    return torch._int_mm(a.contiguous(), b_t.t())


def int8_dynamic_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None,
                        smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 int8: y = (x / smooth) quantized per token, times int8 W (already multiplied by smooth).

    x [..., K]; wq int8 [N, K]; w_scale fp32 [N] (per channel only: the int32 accumulator can be
    rescaled per row and column, not per K-group). Returns x's dtype.
    """
    if w_scale.ndim != 1:
        raise ValueError("int8_dynamic needs per-channel weight scales [N]; group scales only work weight-only")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if smooth is not None:
        x2 = x2.float() / smooth.float()
    xq, xs = quantize_int8_activation(x2)
    acc = int_mm(xq, wq)  # (M, N) int32
    y = int8_gemm_epilogue(acc, xs, w_scale, bias, out_dtype=x.dtype)
    return y.reshape(*lead, wq.shape[0])


def fp8_dynamic_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 fp8: per-row activation scales and per-row (or per-tensor) weight scales, `torch._scaled_mm`.

    The device check (compute capability >= 8.9) is the caller's (`formats`); this function is the math
    and also runs on the CPU kernel for tests. Accumulates in fp32, returns x's dtype.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8_activation(x2)
    n = w8.shape[0]
    ws = w_scale.float().reshape(1, -1).expand(1, n).contiguous()  # (1, N): row-wise scaling of B
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32, torch.float16) else torch.float32
    if x.device.type == "cuda":
        # Row-wise scaled_mm on CUDA only supports a bf16 output; the bias is added in fp32 below.
        y = torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
    else:
        y = torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.float32)
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, n)
