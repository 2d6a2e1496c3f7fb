"""ComfyUI's fp8 storage of a diffusion model (UNETLoader `weight_dtype` fp8 modes, fp8_scaled files): every
Linear keeps its weight in float8 (the file's scale, else 1) and its bias rounded to float8, and computes in
the input's dtype. In the `weight_dtype` fp8 modes ComfyUI builds the whole Wan model in that fp8 dtype, so
its other parameters (q/k RMSNorm weights, the affine cross-attention LayerNorm, the modulation tables) are
stored in fp8 too, except the patch embedding, which ComfyUI's WanModel creates in float32
(`cast_params_fp8`); every fp8 parameter is upcast to the compute dtype where it is used.

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


FP8_BIAS_ATTR = "comfy_fp8_bias"  # set on a layer whose bias holds fp8-rounded values (ComfyUI stores it in fp8)


def cast_linears_fp8(module: nn.Module, storage) -> nn.Module:
    """A copy of `module` whose Linears are stored as ComfyUI stores them in an fp8 model: the weight cast to
    fp8 `storage` ('fp8_e4m3fn' | 'fp8_e5m2' or the torch dtype) under a scale of 1, the bias rounded to fp8
    too (kept in its dtype, marked with `FP8_BIAS_ATTR`). Layers already stored in fp8 (a ComfyUI fp8_scaled
    file) keep their weight and scale; their bias is rounded the same way. The original is not modified.

    ComfyUI creates every Linear of such a model with an fp8 dtype (`comfy.ops.scaled_fp8_ops`, and the
    fp8 `weight_dtype` modes), so state-dict loading rounds each weight and bias to the nearest fp8 value."""
    dtype = FP8_STORAGE.get(storage, storage)
    if dtype not in FP8_STORAGE.values():
        raise ValueError(f"unknown fp8 storage {storage!r}; expected one of {sorted(FP8_STORAGE)}")
    out = shared_copy(module)
    for name, lin in list(out.named_modules()):
        if type(lin) is nn.Linear:
            q = QuantLinear(lin.in_features, lin.out_features, "fp8_e4m3_weight_only", bias=lin.bias is not None,
                            bias_dtype=lin.weight.dtype, device="meta")
            q.weight = lin.weight.detach().to(dtype)  # a plain cast, as copy_ into an fp8 parameter
            q.weight_scale = torch.ones((), dtype=torch.float32, device=lin.weight.device)
            if lin.bias is not None:
                q.bias = lin.bias.detach()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, q)
        elif not (isinstance(lin, QuantLinear) and lin.weight.dtype in FP8_STORAGE.values()):
            continue
        layer = out.get_submodule(name)
        if layer.bias is not None and not getattr(layer, FP8_BIAS_ATTR, None):
            layer.bias = layer.bias.to(dtype).to(layer.bias.dtype)
            setattr(layer, FP8_BIAS_ATTR, dtype)
    return out


# parameters ComfyUI 0.3.64's WanModel creates in float32 whatever the model dtype (comfy/ldm/wan/model.py:
# `operations.Conv3d(..., dtype=torch.float32)` for the patch embedding)
COMFY_FP32_PARAMS = ("patch_embedding.",)


def cast_params_fp8(module: nn.Module, storage, keep=COMFY_FP32_PARAMS) -> nn.Module:
    """A copy of `module` stored as ComfyUI stores a Wan model loaded with an fp8 `weight_dtype`
    (`load_diffusion_model_state_dict`: the model is built with `dtype=<fp8>`, and `load_state_dict` copies each
    tensor into its fp8 parameter, a round to nearest): Linears as `cast_linears_fp8` (a file's own fp8 layers
    keep their dtype and scale, as `scaled_fp8_ops` overrides the Linear dtype), every other parameter cast to
    fp8 `storage` except those whose name starts with one of `keep`. The model's forward upcasts them where
    they are used (`.float()`), as ComfyUI's `cast_to` / manual-cast ops do. The original is not modified."""
    dtype = FP8_STORAGE.get(storage, storage)
    if dtype not in FP8_STORAGE.values():
        raise ValueError(f"unknown fp8 storage {storage!r}; expected one of {sorted(FP8_STORAGE)}")
    out = cast_linears_fp8(module, fp8_file_dtype(module) or dtype)
    for mname, mod in out.named_modules():
        if isinstance(mod, (nn.Linear, QuantLinear)):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if p.is_floating_point() and p.dtype not in FP8_STORAGE.values() and not full.startswith(tuple(keep)):
                setattr(mod, pname, nn.Parameter(p.detach().to(dtype), requires_grad=False))
    return out


def storage_dtypes(module: nn.Module) -> dict:
    """Each parameter's storage dtype by state-dict name: its own dtype, or the fp8 dtype its values are rounded
    to where a Linear's bias holds fp8 values in the compute dtype (`FP8_BIAS_ATTR`; QuantLinear computes with
    the bias in the input dtype)."""
    out = {}
    for mname, mod in module.named_modules():
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if pname == "weight_scale":
                continue
            full = f"{mname}.{pname}" if mname else pname
            out[full] = getattr(mod, FP8_BIAS_ATTR, None) if pname == "bias" and getattr(mod, FP8_BIAS_ATTR, None) \
                else t.dtype
    return out


def fp8_file_dtype(module: nn.Module):
    """The fp8 dtype of a model loaded from a ComfyUI fp8_scaled file (its scaled layers' weights), or None."""
    for m in module.modules():
        if isinstance(m, QuantLinear) and m.weight.dtype in FP8_STORAGE.values():
            return m.weight.dtype
    return None


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
