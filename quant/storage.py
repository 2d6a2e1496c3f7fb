"""Plain fp8 weight storage (ComfyUI's UNETLoader `weight_dtype` fp8 modes): every Linear keeps its weight
cast to float8 (no scale, as ComfyUI casts it) and computes in the input's dtype.

The layers become `QuantLinear`s of the `fp8_e4m3_weight_only` format with a weight scale of 1, so they
save, compile and report like other quantized layers."""
from __future__ import annotations

import torch
from torch import nn

from .linear import QuantLinear
from .swap import shared_copy

FP8_STORAGE = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cast_linears_fp8(module: nn.Module, storage: str) -> nn.Module:
    """A copy of `module` whose nn.Linear weights are stored as `storage` ('fp8_e4m3fn' | 'fp8_e5m2');
    the original is not modified."""
    if storage not in FP8_STORAGE:
        raise ValueError(f"unknown fp8 storage {storage!r}; expected one of {sorted(FP8_STORAGE)}")
    dtype = FP8_STORAGE[storage]
    out = shared_copy(module)
    for name, lin in [(n, m) for n, m in out.named_modules() if type(m) is nn.Linear]:
        q = QuantLinear(lin.in_features, lin.out_features, "fp8_e4m3_weight_only", bias=lin.bias is not None,
                        bias_dtype=lin.weight.dtype, device="meta")
        q.weight = lin.weight.detach().to(dtype)  # a plain cast: values beyond the fp8 range saturate/overflow as in ComfyUI
        q.weight_scale = torch.ones((), dtype=torch.float32, device=lin.weight.device)
        if lin.bias is not None:
            q.bias = lin.bias.detach()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, q)
    return out
