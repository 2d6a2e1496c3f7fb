"""The glue ops the Wan DiT and VAE call: the stable API, and the dispatcher behind it.

Each op runs either its fused CuPy kernel or its torch reference `<op>_ref` (the spec, and the
CPU path: bit-identical to calling the reference). The kernel runs when the mode allows it
(`set_mode("auto" | "cupy" | "torch")`, env `TWINFLOW_KERNELS`), CuPy and a CUDA device are
usable, and the inputs are what the kernel handles (CUDA, fp32/fp16/bf16, contiguous, supported
shapes, no autograd); otherwise the reference runs and the reason is logged once per op and
reason. `doctor_lines()` reports the path of every op.

On the kernel path the op is called as `torch.ops.twinflow.<op>`, a `torch.library.custom_op`
with a fake implementation, so torch.export / torch.compile see one graph node per op (the
custom op's own implementation re-checks its inputs and runs the reference for anything the
kernel cannot take). On the reference path the traced graph holds the plain ATen ops, which other
backends (TensorRT) fuse themselves.

All ops compute in float32 and return the input dtype unless stated.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from ..core.log import log_once
from . import _runtime, int8, norm, rope, vae_norm
from .int8 import int8_gemm_epilogue_ref, quantize_int8_per_token_ref
from .norm import gated_residual_ln_modulate_ref, gated_residual_ref, ln_modulate_ref, rms_norm_ref
from .rope import rope_apply_ref
from .vae_norm import rms_norm_cf_ref

logger = logging.getLogger(__name__)

MODES = ("auto", "cupy", "torch")
OPS = ("ln_modulate", "gated_residual", "gated_residual_ln_modulate", "rms_norm", "rms_norm_cf",
       "rope_apply", "quantize_int8_per_token", "int8_gemm_epilogue")

__all__ = list(OPS) + [f"{o}_ref" for o in OPS] + ["set_mode", "get_mode", "MODES", "OPS", "op_status"]


def _initial_mode() -> str:
    m = os.environ.get("TWINFLOW_KERNELS", "auto").strip().lower() or "auto"
    if m not in MODES:
        logger.warning("TWINFLOW_KERNELS=%r is not one of %s; using 'auto'", m, ", ".join(MODES))
        return "auto"
    return m


_mode = _initial_mode()
_last: dict = {}  # op -> (path, reason) of its latest eager call


def set_mode(mode: str) -> None:
    """Choose the kernel path for every op: "auto" (CuPy kernel where it applies, else the torch
    reference), "cupy" (the same, but a fallback is logged as a warning) or "torch" (always the
    reference)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(MODES)}")
    _mode = mode


def get_mode() -> str:
    return _mode


def op_status() -> dict:
    """{op: (path, reason)} of each op's latest eager call ("cupy" or "torch"; reason None for cupy)."""
    return dict(_last)


@torch.compiler.assume_constant_result
def _unavailable() -> str:
    # A constant for the whole process: traced code asks once at trace time, eagerly.
    return _runtime.unavailable_reason() or ""


def _reason(check: Callable, args) -> Optional[str]:
    """Why `op` runs its reference for these inputs (None: the kernel runs)."""
    if _mode == "torch":
        return "kernel mode is 'torch'"
    return _unavailable() or check(*args)


def _record(op: str, reason: Optional[str]) -> None:
    if torch.compiler.is_compiling():
        return  # decided at trace time; logged by the eager calls
    path = "torch" if reason else "cupy"
    _last[op] = (path, reason)
    if reason is None:
        log_once(logger, ("twinflow.fused", op, "cupy"), "kernels: %s runs the CuPy kernel", op)
    else:
        level = logging.WARNING if _mode == "cupy" else logging.INFO
        log_once(logger, ("twinflow.fused", op, reason), "kernels: %s runs the torch reference: %s",
                 op, reason, level=level)


def _use_kernel(op: str, check: Callable, *args) -> bool:
    reason = _reason(check, args)
    _record(op, reason)
    return reason is None


def _run(op: str, check: Callable, launch: Callable, ref: Callable, *args):
    """The custom op's implementation: the kernel if it takes these inputs, else the reference."""
    reason = _reason(check, args)
    _record(op, reason)
    return ref(*args) if reason else launch(*args)


# ---------------------------------------------------------------------------------------------
# Custom ops (one graph node each under export/compile) and their fake implementations
# ---------------------------------------------------------------------------------------------

def _ln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _run("ln_modulate", norm.ln_modulate_unsupported, norm.ln_modulate_launch, ln_modulate_ref,
                x, shift, scale, eps)


def _ln_modulate_fake(x, shift, scale, eps):
    return x.new_empty(torch.broadcast_shapes(x.shape, shift.shape, scale.shape), dtype=torch.float32)


def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _run("gated_residual", norm.gated_residual_unsupported, norm.gated_residual_launch,
                gated_residual_ref, x, gate, y)


def _gated_residual_fake(x, gate, y):
    return x.new_empty(torch.broadcast_shapes(x.shape, gate.shape, y.shape))


def _gated_residual_ln_modulate_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                                   scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("gated_residual_ln_modulate", norm.gated_residual_ln_modulate_unsupported,
                norm.gated_residual_ln_modulate_launch, gated_residual_ln_modulate_ref,
                x, gate, y, shift, scale, eps)


def _gated_residual_ln_modulate_fake(x, gate, y, shift, scale, eps):
    s = torch.broadcast_shapes(x.shape, gate.shape, y.shape)
    return x.new_empty(s), x.new_empty(torch.broadcast_shapes(s, shift.shape, scale.shape), dtype=torch.float32)


def _rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _run("rms_norm", norm.rms_norm_unsupported, norm.rms_norm_launch, rms_norm_ref, x, weight, eps)


def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape if weight is None else torch.broadcast_shapes(x.shape, weight.shape))


def _rms_norm_cf_op(x: torch.Tensor, gamma: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                    eps: float) -> torch.Tensor:
    return _run("rms_norm_cf", vae_norm.rms_norm_cf_unsupported, vae_norm.rms_norm_cf_launch, rms_norm_cf_ref,
                x, gamma, bias, silu, eps)


def _rms_norm_cf_fake(x, gamma, bias, silu, eps):
    ts = [x, gamma] + ([bias] if bias is not None else [])
    dtype = torch.result_type(*ts[:2]) if bias is None else torch.promote_types(
        torch.result_type(x, gamma), bias.dtype)
    return x.new_empty(torch.broadcast_shapes(*(t.shape for t in ts)), dtype=dtype)


def _rope_apply_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _run("rope_apply", rope.rope_apply_unsupported, rope.rope_apply_launch, rope_apply_ref, x, cos, sin)


def _rope_apply_fake(x, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _quantize_int8_op(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("quantize_int8_per_token", int8.quantize_int8_per_token_unsupported,
                int8.quantize_int8_per_token_launch, quantize_int8_per_token_ref, x, eps)


def _quantize_int8_fake(x, eps):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _int8_gemm_epilogue_op(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                           bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _run("int8_gemm_epilogue", int8.int8_gemm_epilogue_unsupported, int8.int8_gemm_epilogue_launch,
                int8_gemm_epilogue_ref, acc, a_scale, w_scale, bias, activation, out_dtype)


def _int8_gemm_epilogue_fake(acc, a_scale, w_scale, bias, activation, out_dtype):
    if activation not in int8.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected none, gelu_tanh or silu")
    return acc.new_empty(acc.shape, dtype=out_dtype)


def _register(name: str, impl, fake) -> None:
    """Register `twinflow::<name>` unless this process already has it. ComfyUI may import this
    package a second time under a path-derived name; torch would then silently swap the op's
    implementation for the second copy's. The first registration (identical code) serves both."""
    try:
        getattr(torch.ops.twinflow, name)
        return
    except (AttributeError, RuntimeError):
        pass
    torch.library.custom_op(f"twinflow::{name}", mutates_args=())(impl).register_fake(fake)


_register("ln_modulate", _ln_modulate_op, _ln_modulate_fake)
_register("gated_residual", _gated_residual_op, _gated_residual_fake)
_register("gated_residual_ln_modulate", _gated_residual_ln_modulate_op, _gated_residual_ln_modulate_fake)
_register("rms_norm", _rms_norm_op, _rms_norm_fake)
_register("rms_norm_cf", _rms_norm_cf_op, _rms_norm_cf_fake)
_register("rope_apply", _rope_apply_op, _rope_apply_fake)
_register("quantize_int8_per_token", _quantize_int8_op, _quantize_int8_fake)
_register("int8_gemm_epilogue", _int8_gemm_epilogue_op, _int8_gemm_epilogue_fake)

# ---------------------------------------------------------------------------------------------
# The public ops (signatures and CPU behaviour are the contract the models rely on)
# ---------------------------------------------------------------------------------------------

def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x) (no affine, over the last dim) * (1 + scale) + shift, computed in fp32.

    x: [B, L, D]; shift/scale: [B, 1, D] (per sample), [B, F, 1, D] against x [B, F, S, D]
    (per frame), or broadcastable to x. Returns float32 (Wan keeps the modulated activations in
    fp32 before casting for the linear).
    """
    if _use_kernel("ln_modulate", norm.ln_modulate_unsupported, x, shift, scale, eps):
        return torch.ops.twinflow.ln_modulate(x, shift, scale, eps)
    return ln_modulate_ref(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, in fp32, returned in x's dtype."""
    if _use_kernel("gated_residual", norm.gated_residual_unsupported, x, gate, y):
        return torch.ops.twinflow.gated_residual(x, gate, y)
    return gated_residual_ref(x, gate, y)


def gated_residual_ln_modulate(x, gate, y, shift, scale, eps: float = 1e-6):
    """Fused: x' = x + gate*y; y' = LN(x')*(1+scale)+shift. Returns (x' in x.dtype, y' in fp32)."""
    if _use_kernel("gated_residual_ln_modulate", norm.gated_residual_ln_modulate_unsupported,
                   x, gate, y, shift, scale, eps):
        return torch.ops.twinflow.gated_residual_ln_modulate(x, gate, y, shift, scale, eps)
    return gated_residual_ln_modulate_ref(x, gate, y, shift, scale, eps)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times `weight`, returned in x's dtype (Wan's q/k norms)."""
    if _use_kernel("rms_norm", norm.rms_norm_unsupported, x, weight, eps):
        return torch.ops.twinflow.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def rms_norm_cf(x: torch.Tensor, gamma: torch.Tensor, bias: Optional[torch.Tensor] = None,
                silu: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """The Wan VAE's channel-first RMS norm: F.normalize(x, dim=1) * sqrt(C) * gamma (+ bias), then
    optionally SiLU. x: [B, C, T, H, W] (or [B, C, H, W]); gamma: [C, 1, 1(, 1)]."""
    if _use_kernel("rms_norm_cf", vae_norm.rms_norm_cf_unsupported, x, gamma, bias, silu, eps):
        return torch.ops.twinflow.rms_norm_cf(x, gamma, bias, silu, eps)
    return rms_norm_cf_ref(x, gamma, bias, silu, eps)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the head dim by angles given as float32 cos/sin.

    x: [B, L, H, Dh]; cos/sin: [L, Dh/2] (or broadcastable [B, L, 1, Dh/2]). Computed in fp32,
    returned in x's dtype. Equivalent to the official complex multiplication.
    """
    if _use_kernel("rope_apply", rope.rope_apply_unsupported, x, cos, sin):
        return torch.ops.twinflow.rope_apply(x, cos, sin)
    return rope_apply_ref(x, cos, sin)


def quantize_int8_per_token(x: torch.Tensor, eps: float = 1e-8):
    """Per-row (token) symmetric int8: scale = max|x|/127 over the last dim; q = round(x/scale).

    Returns (q int8 same shape, scale float32 [..., 1])."""
    if _use_kernel("quantize_int8_per_token", int8.quantize_int8_per_token_unsupported, x, eps):
        return torch.ops.twinflow.quantize_int8_per_token(x, eps)
    return quantize_int8_per_token_ref(x, eps)


def int8_gemm_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, activation: str = "none",
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize an int32 GEMM accumulator [M, N]: acc * a_scale[M,1] * w_scale[N] (+ bias[N]),
    then the activation ("none" | "gelu_tanh" | "silu"), cast to out_dtype."""
    if _use_kernel("int8_gemm_epilogue", int8.int8_gemm_epilogue_unsupported,
                   acc, a_scale, w_scale, bias, activation, out_dtype):
        return torch.ops.twinflow.int8_gemm_epilogue(acc, a_scale, w_scale, bias, activation, out_dtype)
    return int8_gemm_epilogue_ref(acc, a_scale, w_scale, bias, activation, out_dtype)


def doctor_lines() -> list:
    """One line per op: which path it takes here and why. Cheap; never raises."""
    try:
        unavailable = _runtime.unavailable_reason()
    except Exception as exc:  # doctor must not raise, whatever a broken CuPy install does
        unavailable = f"probe failed: {type(exc).__name__}: {exc}"
    lines = [f"fused kernels: mode {_mode!r}; CuPy path "
             + ("available" if not unavailable else f"unavailable ({unavailable})")]
    for op in OPS:
        if op in _last:
            path, reason = _last[op]
            lines.append(f"fused kernels: {op}: last call ran the {'CuPy kernel' if path == 'cupy' else 'torch reference'}"
                         + (f" ({reason})" if reason else ""))
        elif _mode == "torch":
            lines.append(f"fused kernels: {op}: torch reference (mode 'torch')")
        elif unavailable:
            lines.append(f"fused kernels: {op}: torch reference ({unavailable})")
        else:
            lines.append(f"fused kernels: {op}: CuPy kernel for CUDA fp32/fp16/bf16 contiguous inputs, "
                         "else the torch reference (not called yet)")
    return lines
