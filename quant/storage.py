"""Plain fp8 weight storage (ComfyUI's UNETLoader `weight_dtype` fp8 modes): every Linear keeps its weight
cast to float8 (no scale, as ComfyUI casts it) and computes in the input's dtype.

The layers become `QuantLinear`s of the `fp8_e4m3_weight_only` format with a weight scale of 1, so they
save, compile and report like other quantized layers. A LoRA merged into such a layer is stored back in fp8
with ComfyUI's seeded stochastic rounding (`stochastic_round_fp8`)."""
from __future__ import annotations

import zlib

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


def comfy_key_seed(key: str) -> int:
    """The seed ComfyUI's model patcher rounds a patched weight with (`string_to_seed`: CRC-32 of the key's
    characters, e.g. 'diffusion_model.blocks.0.self_attn.q.weight')."""
    return zlib.crc32(key.encode("ascii")) if key.isascii() else _crc_chars(key)


def _crc_chars(key: str) -> int:
    crc = 0xFFFFFFFF
    for ch in key:  # one code point per step, as ComfyUI does for str keys
        crc ^= ord(ch)
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


_FP8_BITS = {torch.float8_e4m3fn: (4, 3, 7), torch.float8_e5m2: (5, 2, 15)}


def _round_slice(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    exp_bits, man_bits, bias = _FP8_BITS[dtype]
    x = x.half()  # ComfyUI rounds in float16
    mag = x.abs()
    sign = torch.where(mag == 0, torch.zeros_like(x), torch.sign(x))
    e = torch.clamp(torch.floor(torch.log2(mag)) + bias, 0, 2 ** exp_bits - 1)
    normal = e != 0
    frac = torch.where(normal, (mag / 2.0 ** (e - bias) - 1.0) * 2 ** man_bits, mag / 2.0 ** (1 - bias - man_bits))
    frac = frac + torch.rand(frac.size(), dtype=frac.dtype, layout=frac.layout, device=frac.device, generator=gen)
    frac = frac.floor() / 2 ** man_bits
    value = sign * torch.where(normal, 2.0 ** (e - bias) * (1.0 + frac), 2.0 ** (1 - bias) * frac)
    info = torch.finfo(dtype)
    return value.clamp(info.min, info.max)


def stochastic_round_fp8(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """`x` rounded to fp8 `dtype` the way ComfyUI stores a LoRA-patched fp8 weight (comfy/float.py
    `stochastic_rounding`): each value goes to one of its two fp8 neighbours with probability given by its
    distance, drawn from a generator seeded with `seed`, in row slices of about 4096*4096 values."""
    if dtype not in _FP8_BITS:
        return x.to(dtype)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    out = torch.empty_like(x, dtype=dtype)
    slices = max(1, x.numel() / (4096 * 4096))
    rows = max(1, round(x.shape[0] / slices))
    for i in range(0, x.shape[0], rows):
        out[i:i + rows].copy_(_round_slice(x[i:i + rows], dtype, gen))
    return out
