"""A dense `x @ w.T + b` for the CPU hot paths, through oneDNN where aten is slower.

On the x86 machine we measured (docs/dit.md, docs/quant.md), aten's fp32 `addmm` (what `F.linear` and
`nn.Linear` run) reaches about half of oneDNN's rate; `torch.ops.mkldnn._linear_pointwise` computes the
same fp32 GEMM (bf16 with fp32 accumulation) + bias. It has no autograd formula and is not traceable,
so anything that needs those keeps `F.linear`.
"""
from __future__ import annotations

import platform
from typing import Optional

import torch
import torch.nn.functional as F

# Only on x86, where it was measured; elsewhere (e.g. arm64 with Accelerate/OpenBLAS) aten runs.
ONEDNN = platform.machine().lower() in ("x86_64", "amd64")
_DTYPES = {torch.float32: True, torch.bfloat16: None}  # bf16: probed once (needs CPU bf16 support)
# Plain tensors and parameters only: a tensor subclass (fake/functional tensors of a trace, a quantized
# wrapper) must go through F.linear, where its __torch_function__ / dispatch sees the call.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def onednn_ok(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> bool:
    """Whether `F.linear(x, w, b)` may run as oneDNN's linear: plain contiguous CPU tensors of one fp32 or
    bf16 dtype, no autograd, no compile/export/ONNX tracing."""
    if not ONEDNN or type(x) not in _PLAIN or type(w) not in _PLAIN or x.device.type != "cpu":
        return False
    dt = x.dtype
    if w.dtype != dt or dt not in _DTYPES or not (x.is_contiguous() and w.is_contiguous()):
        return False
    if b is not None and (b.dtype != dt or type(b) not in _PLAIN):
        return False
    if _DTYPES[dt] is None:
        _DTYPES[dt] = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not _DTYPES[dt] or not torch.backends.mkldnn.is_available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False  # oneDNN's op has no autograd formula
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # export/compile/ONNX graphs keep aten.linear
    return True


def status() -> str:
    """One line for `twinflow doctor`: which GEMM the CPU linears of the Wan DiT and the weight-only quant
    formats run."""
    if not ONEDNN:
        return f"aten F.linear (oneDNN's linear is used on x86_64 only; this is {platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return "aten F.linear (this torch build has no oneDNN/mkldnn)"
    probe = torch.nn.Linear(4, 4)
    with torch.no_grad():
        if not onednn_ok(torch.zeros(1, 4), probe.weight, probe.bias):
            return "aten F.linear (oneDNN's linear refused a plain nn.Linear: a bug, please report)"
        bf16 = onednn_ok(torch.zeros(1, 4, dtype=torch.bfloat16), probe.weight.to(torch.bfloat16))
    return f"oneDNN linear for fp32{' and bf16' if bf16 else ' (bf16: aten, no CPU bf16 support)'}"


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None, gelu_tanh: bool = False) -> torch.Tensor:
    """`F.linear(x, w, b)` (then GELU-tanh if asked, applied to the fp32 accumulator by oneDNN)."""
    if onednn_ok(x, w, b):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu_tanh else "none", [],
                                                  "tanh" if gelu_tanh else "")
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu_tanh else y
