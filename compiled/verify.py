"""Check a compiled artifact against eager on the profile's opt shape before it is used.

NaN/Inf in the compiled output, a cosine below the dtype's threshold, or a max abs error beyond the
tolerance -> the artifact is discarded and the caller runs eager, saying so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# (min cosine, max abs error relative to max|eager|) per compute dtype. Inductor/TensorRT reorder
# reductions and fuse ops, so fp32 outputs differ at ~1e-6 relative; bf16/fp16 at a few 1e-3.
TOLERANCES = {
    torch.float32: (0.99999, 1e-3),
    torch.float16: (0.999, 2e-2),
    torch.bfloat16: (0.995, 5e-2),
}


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    metrics: dict = field(default_factory=dict)

    def line(self) -> str:
        m = self.metrics
        nums = f"cos {m.get('cos', float('nan')):.6f}, max abs {m.get('max_abs', float('nan')):.3g}"
        return f"verified ({nums})" if self.ok else f"verification failed: {self.reason} ({nums})"


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def compare(out, ref) -> dict:
    """cosine similarity and max abs error over all tensors of two outputs, plus finiteness."""
    a = torch.cat([t.detach().float().reshape(-1).cpu() for t in _flat(out)])
    b = torch.cat([t.detach().float().reshape(-1).cpu() for t in _flat(ref)])
    if a.shape != b.shape:
        return {"finite": bool(torch.isfinite(a).all()), "cos": float("nan"), "max_abs": float("inf"),
                "shape_mismatch": [tuple(a.shape), tuple(b.shape)]}
    finite = bool(torch.isfinite(a).all())
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item() if a.numel() else 1.0
    if a.numel() and float(a.double().norm()) == 0.0 and float(b.double().norm()) == 0.0:
        cos = 1.0
    max_abs = (a - b).abs().max().item() if a.numel() else 0.0
    return {"finite": finite, "cos": cos, "max_abs": max_abs, "ref_max": b.abs().max().item() if b.numel() else 0.0}


def verify(compiled_fn, eager_fn, args, dtype: torch.dtype = torch.float32) -> Verdict:
    """Run both on `args` (the opt shape) and judge the compiled output."""
    with torch.no_grad():
        ref = eager_fn(*args)
        try:
            out = compiled_fn(*args)
        except Exception as exc:  # any backend failure discards the artifact; the reason is reported
            return Verdict(False, f"compiled call raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return judge(compare(out, ref), dtype)


def judge(m: dict, dtype: torch.dtype = torch.float32) -> Verdict:
    cos_min, rel = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    if "shape_mismatch" in m:
        return Verdict(False, f"output sizes differ {m['shape_mismatch']}", m)
    if not m["finite"]:
        return Verdict(False, "NaN/Inf in the compiled output", m)
    tol = rel * max(m["ref_max"], 1e-6)
    if m["cos"] < cos_min:
        return Verdict(False, f"cosine {m['cos']:.6f} < {cos_min}", m)
    if m["max_abs"] > tol:
        return Verdict(False, f"max abs {m['max_abs']:.3g} > {tol:.3g}", m)
    return Verdict(True, "", m)
