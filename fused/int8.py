"""The int8 GEMM's neighbours: per-token symmetric activation quantization (absmax + round) and the
dequant + bias + activation epilogue of the int32 accumulator. Both kernels are in `int8.cu`.

Quantization uses the reference's fp32 operations (max, clamp, /127, a true division per element,
round-half-even), so its q and scale match `quantize_int8_per_token_ref` on the CPU bit for bit.
(torch's CUDA divide-by-scalar multiplies by 1/127 instead, so on the GPU the reference's scale can
differ in its last bit.)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import _plan as P
from . import _runtime
from .norm import _row_reason, row_plan

MODULE = "int8"
ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "silu": 2}
OUT_DTYPES = P.FLOAT_DTYPES

INSTANCES = tuple(
    [s for dt, ct in P.CTYPES.items()
     for s in [f"quantize_int8_kernel<{ct}, {P.vec_width(dt)}, {nv}>" for nv in P.NV_VEC_CHOICES]
     + [f"quantize_int8_kernel<{ct}, 1, {P.NV_SCALAR}>"]]
    + [f"int8_gemm_epilogue_kernel<{ct}, {a}, {v}>" for ct in P.CTYPES.values()
       for a in ACTIVATIONS.values() for v in (4, 1)]
)


def quantize_int8_per_token_ref(x: torch.Tensor, eps: float = 1e-8):
    """Per-row (token) symmetric int8: scale = max|x|/127 over the last dim; q = round(x/scale).

    Returns (q int8 same shape, scale float32 [..., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(eps) / 127.0
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8_per_token_unsupported(x, eps=1e-8) -> Optional[str]:
    return (P.device_reason((x,), ("x",)) or P.dtype_reason("x", x) or P.contiguous_reason("x", x)
            or _row_reason(x))


def quantize_int8_per_token_launch(x, eps=1e-8):
    reason = quantize_int8_per_token_unsupported(x, eps)
    if reason:
        raise ValueError(f"quantize_int8_per_token kernel: {reason}")
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    # The vector variant stores VEC int8 per access (8 bytes for bf16/fp16 input, 4 for fp32);
    # D % VEC == 0 keeps those stores aligned on every row.
    name, grid, block = row_plan("quantize_int8_kernel", x, q)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, q, scale, np.int32(x.shape[-1]), np.float32(eps)), x.device)
    return q, scale


def int8_gemm_epilogue_ref(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
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


def int8_gemm_epilogue_unsupported(acc, a_scale, w_scale, bias=None, activation="none",
                                   out_dtype=torch.float32) -> Optional[str]:
    r = (P.device_reason((acc, a_scale, w_scale, bias), ("acc", "a_scale", "w_scale", "bias"))
         or P.grad_reason(a_scale, w_scale, bias)
         or P.dtype_reason("acc", acc, (torch.int32,)) or P.contiguous_reason("acc", acc))
    if r:
        return r
    if activation not in ACTIVATIONS:
        return f"unknown activation {activation!r}"
    if out_dtype not in OUT_DTYPES:
        return f"out_dtype {out_dtype} is not one of float32, float16, bfloat16"
    if acc.ndim != 2 or acc.numel() == 0:
        return f"acc has shape {tuple(acc.shape)}; expected a non-empty [M, N]"
    m, n = acc.shape
    if a_scale.numel() != m or tuple(a_scale.shape) not in ((m, 1), (m,)):
        return f"a_scale has shape {tuple(a_scale.shape)}, expected ({m}, 1)"
    if tuple(w_scale.shape) not in ((n,), (1, n), (n, 1)):
        return f"w_scale has shape {tuple(w_scale.shape)}, expected ({n},)"
    if bias is not None and tuple(bias.shape) not in ((n,), (1, n)):
        return f"bias has shape {tuple(bias.shape)}, expected ({n},)"
    return None


def epilogue_plan(acc: torch.Tensor, activation: str, out_dtype: torch.dtype, *ptrs) -> tuple:
    """(name expression, grid, block, n_vec)."""
    n = acc.shape[1]
    vec = 4 if n % 4 == 0 and P.aligned16(acc, *ptrs) else 1
    n_vec = acc.numel() // vec
    name = f"int8_gemm_epilogue_kernel<{P.CTYPES[out_dtype]}, {ACTIVATIONS[activation]}, {vec}>"
    return name, P.elementwise_grid(n_vec), (P.ELEMWISE_BLOCK,), n_vec


def int8_gemm_epilogue_launch(acc, a_scale, w_scale, bias=None, activation="none",
                              out_dtype=torch.float32) -> torch.Tensor:
    reason = int8_gemm_epilogue_unsupported(acc, a_scale, w_scale, bias, activation, out_dtype)
    if reason:
        raise ValueError(f"int8_gemm_epilogue kernel: {reason}")
    a = a_scale.float().reshape(-1).contiguous()
    w = w_scale.float().reshape(-1).contiguous()
    b = None if bias is None else bias.float().reshape(-1).contiguous()
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    name, grid, block, n_vec = epilogue_plan(acc, activation, out_dtype, w, b, out)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (acc, a, w, b, out, np.int64(n_vec), np.int32(acc.shape[1])), acc.device)
    return out
