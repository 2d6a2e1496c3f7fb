"""Launch planning shared by the kernel families: C type names, vector width, block/grid sizes,
and the checks every launcher makes. Pure Python on tensor metadata: no CuPy, no GPU.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
FLOAT_DTYPES = tuple(CTYPES)

# Row kernels (one block per row) keep each thread's NV vectors in registers. The registers are
# allocated for the instantiated NV whether a row needs them or not, and they bound occupancy, so
# the vector variant exists for NV in NV_VEC_CHOICES and the launcher picks the smallest that
# covers the row with <= 1024 threads (D=5120 bf16: NV=1, 640 threads). The scalar variant (odd D
# or unaligned pointers) has one NV_SCALAR. __launch_bounds__(1024, 1) caps registers at 64; the
# CI ptxas check proves there are no spills.
NV_VEC_CHOICES = (1, 2, 4)
NV_SCALAR = 16
MAX_BLOCK = 1024
# Elementwise kernels: grid-stride loops with this block size and at most MAX_GRID blocks
# (about 8 waves of 256-thread blocks on a 132-SM H100: enough to hide latency, few enough that
# every thread loops a handful of times).
ELEMWISE_BLOCK = 256
MAX_GRID = 8192
INT32_MAX = 2**31 - 1


def vec_width(*dtypes: torch.dtype) -> int:
    """Elements per 128-bit access of the widest of `dtypes`."""
    return 16 // max(torch.empty((), dtype=d).element_size() for d in dtypes)


def ptr(t: torch.Tensor) -> int:
    """The device address of t's first element (one place, so tests can stand in for it)."""
    return t.data_ptr()


def aligned16(*tensors: Optional[torch.Tensor]) -> bool:
    """All given device pointers are 16-byte aligned (None entries are ignored)."""
    return all(t is None or ptr(t) % 16 == 0 for t in tensors)


def pick_vec(dtype, inner: int, *tensors: Optional[torch.Tensor]) -> int:
    """VEC for a kernel over rows of `inner` elements: 16 bytes of the widest of `dtype` (one
    dtype or a tuple) when `inner` and every pointer allow, else 1."""
    v = vec_width(*dtype) if isinstance(dtype, tuple) else vec_width(dtype)
    return v if inner % v == 0 and aligned16(*tensors) else 1


def row_nv(n: int, vec: int) -> Optional[int]:
    """Vectors per thread for a row of `n` elements read `vec` at a time (None: row too long)."""
    nvec = n // vec
    for nv in (NV_VEC_CHOICES if vec > 1 else (NV_SCALAR,)):
        if nvec <= MAX_BLOCK * nv:
            return nv
    return None


def row_block(n: int, vec: int) -> Optional[int]:
    """Threads for a row kernel over rows of `n` elements read `vec` at a time (None: row too long):
    as few vectors per thread as fit in 1024 threads, then the block trimmed to a multiple of 32
    that still covers the row (the instantiated NV is only the capacity)."""
    if row_nv(n, vec) is None:
        return None
    nvec = n // vec
    per = max(1, math.ceil(nvec / MAX_BLOCK))
    return max(32, 32 * math.ceil(math.ceil(nvec / per) / 32))


# Longest row the row kernels take: what the scalar variant holds (the vector variants hold at
# least as much: 1024 threads x 4 vectors x 4..8 elements).
MAX_ROW = MAX_BLOCK * NV_SCALAR


def elementwise_grid(n_vec: int, block: int = ELEMWISE_BLOCK) -> tuple:
    return (max(1, min(MAX_GRID, math.ceil(n_vec / block))),)


def device_reason(tensors: Sequence[Optional[torch.Tensor]], names: Sequence[str]) -> Optional[str]:
    """All tensors on one CUDA device, else why not."""
    ts = [(n, t) for n, t in zip(names, tensors) if t is not None]
    n0, t0 = ts[0]
    if t0.device.type != "cuda":
        return f"{n0} is on {t0.device}, the CuPy kernels need CUDA tensors"
    for n, t in ts[1:]:
        if t.device != t0.device:
            return f"{n} is on {t.device} but {n0} is on {t0.device}"
    return None


def grad_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "inputs require grad and the CuPy kernels have no backward"
    return None


def dtype_reason(name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> Optional[str]:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return f"{name} has dtype {str(t.dtype).replace('torch.', '')}; the kernel supports {names}"
    return None


def contiguous_reason(name: str, t: torch.Tensor) -> Optional[str]:
    if not t.is_contiguous():
        return f"{name} is not contiguous (stride {tuple(t.stride())}); call .contiguous() first"
    return None


def mod_groups(x_shape: Sequence[int], m_shape: Sequence[int], name: str):
    """How a modulation tensor maps onto the rows of x: returns (M, rows_per_mod) or a reason str.

    Supported: m broadcasts to x as [*x.shape[:k], 1, ..., 1, D] for some k, i.e. row r of x
    (flattened over all but the last dim) uses row r // rows_per_mod of m reshaped to [M, D].
    That covers per-sample [B, 1, D], per-frame [B, F, 1, D] against x [B, F, S, D], per-token
    [B, L, D] and a single [D] row.
    """
    x_shape, m_shape = list(x_shape), list(m_shape)
    d = x_shape[-1]
    if len(m_shape) > len(x_shape):
        return f"{name} has more dims ({len(m_shape)}) than x ({len(x_shape)})"
    m_shape = [1] * (len(x_shape) - len(m_shape)) + m_shape
    if m_shape[-1] != d:
        return f"{name} has last dim {m_shape[-1]}, expected D={d}"
    lead = m_shape[:-1]
    k = len(lead)
    while k > 0 and lead[k - 1] == 1:
        k -= 1
    if lead[:k] != x_shape[:k]:
        return (f"{name} of shape {tuple(m_shape)} does not group the rows of x {tuple(x_shape)}; "
                "expected [*x.shape[:k], 1, ..., 1, D] (e.g. [B, 1, D] or [B, F, 1, D])")
    return math.prod(x_shape[:k]), math.prod(x_shape[k:-1])
