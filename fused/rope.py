"""3D RoPE apply for q and k. Wan splits the head dim 128 into 44/42/42 pairs for frame/height/
width; that split lives in the cos/sin tables the model builds (fp32 [L, Dh/2]), so the kernel
only rotates adjacent pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in fp32.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _plan as P
from . import _runtime

MODULE = "rope"
INSTANCES = tuple(f"rope_kernel<{ct}, {v}>" for dt, ct in P.CTYPES.items()
                  for v in (P.vec_width(dt), 2))


def rope_apply_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the head dim by angles given as float32 cos/sin.

    x: [B, L, H, Dh]; cos/sin: [L, Dh/2] (or broadcastable [B, L, 1, Dh/2]). Computed in fp32,
    returned in x's dtype. Equivalent to the official complex multiplication.
    """
    xp = x.unflatten(-1, (-1, 2))  # (B, L, H, Dh/2, 2) view
    x0, x1 = xp[..., 0], xp[..., 1]
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or (torch.is_grad_enabled() and x.requires_grad):
        # Graph capture (inductor/export/ONNX) cannot take out= into strided views; the functional form
        # computes the same mul/addcmul and the compiler fuses it. Training (autograd) cannot take out= either.
        out = torch.stack((torch.addcmul(x0 * cos, x1, sin, value=-1), torch.addcmul(x0 * sin, x1, cos)), dim=-1)
        return out.flatten(-2).to(x.dtype)
    # Eager: written straight into the even/odd lanes of one fp32 output (no stacked temporaries); a
    # bf16/fp16 x is promoted to fp32 element by element inside mul/addcmul (exact), never copied.
    out = torch.empty(torch.broadcast_shapes(xp.shape[:-1], cos.shape) + (2,), dtype=torch.float32,
                      device=x.device)
    o0, o1 = out[..., 0], out[..., 1]
    torch.mul(x0, cos, out=o0).addcmul_(x1, sin, value=-1)  # x0 cos - x1 sin
    torch.mul(x0, sin, out=o1).addcmul_(x1, cos)  # x0 sin + x1 cos
    return out.flatten(-2).to(x.dtype)


def _tables_reason(x, t, name) -> Optional[str]:
    b, l, _, dh = x.shape
    if t.dtype != torch.float32:
        return f"{name} has dtype {t.dtype}; the kernel reads float32 tables"
    if not t.is_contiguous():
        return f"{name} is not contiguous"
    if t.ndim == 2 and tuple(t.shape) == (l, dh // 2):
        return None
    if t.ndim == 4 and tuple(t.shape) in ((1, l, 1, dh // 2), (b, l, 1, dh // 2)):
        return None
    return f"{name} has shape {tuple(t.shape)}; expected [L, Dh/2]=({l}, {dh // 2}) or [B|1, L, 1, Dh/2]"


def rope_apply_unsupported(x, cos, sin) -> Optional[str]:
    r = P.device_reason((x, cos, sin), ("x", "cos", "sin")) or P.grad_reason(x) \
        or P.dtype_reason("x", x) or P.contiguous_reason("x", x)
    if r:
        return r
    if x.ndim != 4 or x.numel() == 0 or x.shape[-1] % 2:
        return f"x has shape {tuple(x.shape)}; expected a non-empty [B, L, H, Dh] with even Dh"
    return _tables_reason(x, cos, "cos") or _tables_reason(x, sin, "sin") or (
        None if cos.shape == sin.shape else f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")


def plan(x: torch.Tensor, *ptrs) -> tuple:
    """(name expression, grid, block, n_vec)."""
    v = P.vec_width(x.dtype)
    vec = v if x.shape[-1] % v == 0 and P.aligned16(x, *ptrs) else 2
    n_vec = x.numel() // vec
    return f"rope_kernel<{P.CTYPES[x.dtype]}, {vec}>", P.elementwise_grid(n_vec), (P.ELEMWISE_BLOCK,), n_vec


def rope_apply_launch(x, cos, sin) -> torch.Tensor:
    reason = rope_apply_unsupported(x, cos, sin)
    if reason:
        raise ValueError(f"rope_apply kernel: {reason}")
    b, l, h, dh = x.shape
    per_batch = cos.ndim == 4 and cos.shape[0] == b and b > 1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    name, grid, block, n_vec = plan(x, out)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, cos, sin, out, np.int64(n_vec), np.int32(dh // 2), np.int32(h), np.int32(l),
                     np.int32(per_batch)), x.device)
    return out
