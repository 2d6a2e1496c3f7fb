"""DiT norms: LayerNorm + adaLN modulate, gated residual (alone and fused with the next LN +
modulate), RMSNorm with weight. Each op: math, `<op>_ref` (the spec and the fallback),
`<op>_unsupported` (why the kernel cannot take these inputs, or None) and `<op>_launch`
(validates, allocates with torch, launches `norm.cu` through `_runtime.launch`).

Numerics of the kernels: fp32 statistics (two-pass variance from registers), fp32 math, one
rounding to the output dtype; CuPy compiles with -ftz=true (denormals flush to zero).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import _plan as P
from . import _runtime

MODULE = "norm"


def _row_instances(kernel: str, mixed: bool = False) -> list:
    out = []
    for dt, ct in P.CTYPES.items():
        for dty, cty in (P.CTYPES.items() if mixed else [(dt, None)]):
            t = f"{ct}, {cty}" if mixed else ct
            out += [f"{kernel}<{t}, {P.vec_width(dt, dty)}, {nv}>" for nv in P.NV_VEC_CHOICES]
            out.append(f"{kernel}<{t}, 1, {P.NV_SCALAR}>")
    return out


INSTANCES = tuple(
    _row_instances("ln_modulate_kernel")
    + _row_instances("gated_residual_ln_modulate_kernel", mixed=True)
    + _row_instances("rms_norm_kernel")
    + [f"gated_residual_kernel<{ct}, {cty}, {v}>" for dt, ct in P.CTYPES.items()
       for dty, cty in P.CTYPES.items() for v in (P.vec_width(dt, dty), 1)]
)


def row_plan(kernel: str, x: torch.Tensor, *ptrs: Optional[torch.Tensor], y_dtype=None) -> tuple:
    """(name expression, grid, block) for a row kernel over x [..., D] (and y of `y_dtype`, if mixed).

    VEC is 16 bytes of the widest element type when D and every pointer allow it, else 1. D is
    within the row limit (`_row_reason`), so the block always covers the row.
    """
    d = x.shape[-1]
    rows = x.numel() // d
    dts = (x.dtype,) if y_dtype is None else (x.dtype, y_dtype)
    vec = P.pick_vec(dts, d, x, *ptrs)
    block = P.row_block(d, vec)
    assert block is not None, "D beyond the row limit passed validation"
    t = ", ".join(P.CTYPES[dt] for dt in dts)
    return f"{kernel}<{t}, {vec}, {P.row_nv(d, vec)}>", (rows,), (block,)


def _row_reason(x: torch.Tensor) -> Optional[str]:
    """Shape rules shared by the row kernels (x already checked for dtype/contiguity)."""
    if x.ndim < 1 or x.numel() == 0:
        return f"x has shape {tuple(x.shape)}; the kernel needs a non-empty [..., D] tensor"
    d = x.shape[-1]
    rows = x.numel() // d
    if rows > P.INT32_MAX:
        return f"x has {rows} rows, more than one launch grid holds ({P.INT32_MAX})"
    if d > P.MAX_ROW:
        return f"D={d} is longer than the row kernels hold in registers ({P.MAX_ROW})"
    return None


def _first(*reasons):
    for r in reasons:  # a plain loop: traced by dynamo without a graph break
        if r:
            return r
    return None


# ---------------------------------------------------------------------------------------------
# ln_modulate
# ---------------------------------------------------------------------------------------------

def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x) (no affine, over the last dim) * (1 + scale) + shift, computed in fp32.

    x: [B, L, D]; shift/scale: [B, 1, D] (per sample) or broadcastable to x.
    Returns float32 (Wan keeps the modulated activations in fp32 before casting for the linear).
    """
    d = x.shape[-1]
    xf = x.float()
    if shift.numel() == d and scale.numel() == d and \
            torch.broadcast_shapes(x.shape, shift.shape, scale.shape) == x.shape:
        # One modulation row for all of x (batch 1): it is LayerNorm's own affine, one fused pass.
        return F.layer_norm(xf, (d,), 1 + scale.float().reshape(d), shift.float().reshape(d), eps)
    # (1 + scale) is a small [B, 1, D] tensor; addcmul does the multiply-add in one pass over x.
    return torch.addcmul(shift.float(), F.layer_norm(xf, (d,), eps=eps), 1 + scale.float())


def _mods_reason(x, named) -> Optional[str]:
    for name, m in named:
        g = P.mod_groups(x.shape, m.shape, name)
        if isinstance(g, str):
            return g
    return None


def ln_modulate_unsupported(x, shift, scale, eps=1e-6) -> Optional[str]:
    return _first(
        P.device_reason((x, shift, scale), ("x", "shift", "scale")),
        P.grad_reason(x, shift, scale),
        P.dtype_reason("x", x), P.contiguous_reason("x", x), _row_reason(x),
        _mods_reason(x, (("shift", shift), ("scale", scale))),
        _same_groups(x, shift, scale),
    )


def _same_groups(x, a, b) -> Optional[str]:
    if P.mod_groups(x.shape, a.shape, "a") != P.mod_groups(x.shape, b.shape, "b"):
        return f"shift {tuple(a.shape)} and scale {tuple(b.shape)} group the rows of x differently"
    return None


def _mod_rows(x: torch.Tensor, m: torch.Tensor, name: str):
    """m as contiguous fp32 [M, D] (a small copy: M is B or B*F) and rows_per_mod."""
    mm, rpm = P.mod_groups(x.shape, m.shape, name)
    # .float() is exact for bf16/fp16, as the reference's scale.float().
    return m.float().reshape(mm, x.shape[-1]).contiguous(), rpm


def ln_modulate_launch(x, shift, scale, eps=1e-6) -> torch.Tensor:
    reason = ln_modulate_unsupported(x, shift, scale, eps)
    if reason:
        raise ValueError(f"ln_modulate kernel: {reason}")
    sh, rpm = _mod_rows(x, shift, "shift")
    sc, _ = _mod_rows(x, scale, "scale")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    name, grid, block = row_plan("ln_modulate_kernel", x, sh, sc, out)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, sh, sc, out, np.int32(x.shape[-1]), np.int32(rpm), np.float32(eps)), x.device)
    return out


# ---------------------------------------------------------------------------------------------
# gated_residual and the fused gated_residual_ln_modulate
# ---------------------------------------------------------------------------------------------

def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, in fp32, returned in x's dtype."""
    # addcmul promotes a bf16/fp16 y to fp32 element by element (exact), so y is never copied to fp32.
    return torch.addcmul(x.float(), y, gate.float()).to(x.dtype)


def gated_residual_unsupported(x, gate, y) -> Optional[str]:
    return _first(
        P.device_reason((x, gate, y), ("x", "gate", "y")),
        P.grad_reason(x, gate, y),
        P.dtype_reason("x", x), P.contiguous_reason("x", x), P.contiguous_reason("y", y),
        None if y.shape == x.shape else f"y has shape {tuple(y.shape)}, x has {tuple(x.shape)}",
        P.dtype_reason("y", y),
        _row_reason(x), _mods_reason(x, (("gate", gate),)),
    )


def gated_residual_launch(x, gate, y) -> torch.Tensor:
    reason = gated_residual_unsupported(x, gate, y)
    if reason:
        raise ValueError(f"gated_residual kernel: {reason}")
    g, rpm = _mod_rows(x, gate, "gate")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    name, grid, block, n_vec = elementwise_plan(x, y, g, out)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, g, y, out, np.int64(n_vec), np.int32(x.shape[-1]), np.int32(rpm)), x.device)
    return out


def elementwise_plan(x: torch.Tensor, y: torch.Tensor, *ptrs) -> tuple:
    """(name expression, grid, block, n_vec) for gated_residual_kernel over x [..., D]."""
    vec = P.pick_vec((x.dtype, y.dtype), x.shape[-1], x, y, *ptrs)
    n_vec = x.numel() // vec
    return (f"gated_residual_kernel<{P.CTYPES[x.dtype]}, {P.CTYPES[y.dtype]}, {vec}>",
            P.elementwise_grid(n_vec), (P.ELEMWISE_BLOCK,), n_vec)


def gated_residual_ln_modulate_ref(x, gate, y, shift, scale, eps: float = 1e-6):
    """Fused: x' = x + gate*y; y' = LN(x')*(1+scale)+shift. Returns (x' in x.dtype, y' in fp32)."""
    x2 = gated_residual_ref(x, gate, y)
    return x2, ln_modulate_ref(x2, shift, scale, eps)


def gated_residual_ln_modulate_unsupported(x, gate, y, shift, scale, eps=1e-6) -> Optional[str]:
    return _first(
        P.device_reason((x, gate, y, shift, scale), ("x", "gate", "y", "shift", "scale")),
        gated_residual_unsupported(x, gate, y),
        ln_modulate_unsupported(x, shift, scale, eps),
    )


def gated_residual_ln_modulate_launch(x, gate, y, shift, scale, eps=1e-6):
    reason = gated_residual_ln_modulate_unsupported(x, gate, y, shift, scale, eps)
    if reason:
        raise ValueError(f"gated_residual_ln_modulate kernel: {reason}")
    g, grpm = _mod_rows(x, gate, "gate")
    sh, rpm = _mod_rows(x, shift, "shift")
    sc, _ = _mod_rows(x, scale, "scale")
    out_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    out_y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    name, grid, block = row_plan("gated_residual_ln_modulate_kernel", x, y, g, sh, sc, out_x, out_y,
                                 y_dtype=y.dtype)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, g, y, sh, sc, out_x, out_y, np.int32(x.shape[-1]), np.int32(grpm),
                     np.int32(rpm), np.float32(eps)), x.device)
    return out_x, out_y


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times `weight`, returned in x's dtype (Wan's q/k norms)."""
    # x / sqrt(mean(x^2) + eps) * weight: torch's fused CPU/CUDA kernel, the same math in fp32.
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)


def rms_norm_unsupported(x, weight, eps=1e-6) -> Optional[str]:
    wr = None
    if weight is not None and x.ndim >= 1 and tuple(weight.shape) != (x.shape[-1],):
        wr = f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)"
    return _first(
        P.device_reason((x, weight), ("x", "weight")),
        P.grad_reason(x, weight),
        P.dtype_reason("x", x), P.contiguous_reason("x", x), _row_reason(x), wr,
    )


def rms_norm_launch(x, weight, eps=1e-6) -> torch.Tensor:
    reason = rms_norm_unsupported(x, weight, eps)
    if reason:
        raise ValueError(f"rms_norm kernel: {reason}")
    w = None if weight is None else weight.float().contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    name, grid, block = row_plan("rms_norm_kernel", x, w, out)
    _runtime.launch(MODULE, INSTANCES, name, grid, block,
                    (x, w, out, np.int32(x.shape[-1]), np.float32(eps)), x.device)
    return out


def bytes_moved(op: str, x: torch.Tensor) -> int:
    """Minimum HBM traffic of one call (for the benchmark's GB/s): reads + writes of x-sized data."""
    n, s = x.numel(), x.element_size()
    return {
        "ln_modulate": n * s + n * 4,
        "gated_residual": 3 * n * s,
        "gated_residual_ln_modulate": 3 * n * s + n * 4,
        "rms_norm": 2 * n * s,
    }[op]

