"""LoRA files for the Wan DiT: read the key layouts Wan LoRAs ship in and merge them as ComfyUI does.

Layouts (one file may mix them; every tensor name is `<layer><suffix>`):
  <layer>: `diffusion_model.blocks.0.self_attn.q` (ComfyUI), `blocks.0.self_attn.q` (bare),
           `lora_unet_blocks_0_self_attn_q` / `lora_unet__blocks_...` (kohya), `transformer.blocks.0.attn1.to_q`
           (diffusers names, also under `base_model.model.` / `diffusion_model.`).
  <suffix>: `.lora_up.weight` + `.lora_down.weight` (+ `.alpha`), `.lora_B.weight` + `.lora_A.weight` (+ `.alpha`),
            `.diff` (a full weight delta), `.diff_b` (a bias delta).

Merge (comfy/weight_adapter/lora.py, comfy/lora.py, comfy/model_patcher.py): W += (strength * alpha / rank) *
(up @ down) in float32 (alpha absent: scale 1), W += strength * diff, b += strength * diff_b; the result is
stored in the layer's dtype, and an fp8 layer (ComfyUI fp8_scaled files, UNETLoader fp8 modes) is re-rounded
to fp8 under its own scale with ComfyUI's seeded stochastic rounding, so it stays fp8 as in ComfyUI.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.log import log_once
from .storage import FP8_BIAS_ATTR, comfy_key_seed, stochastic_round_fp8

logger = logging.getLogger(__name__)

PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))
OTHER = (".alpha", ".diff", ".diff_b")
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet__",
            "lora_unet_", "lycoris_")


@dataclass
class LayerPatch:
    """What a LoRA does to one layer (`<layer>.weight` / `<layer>.bias`)."""

    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    diff: Optional[torch.Tensor] = None
    diff_b: Optional[torch.Tensor] = None

    def merge_weight(self, weight: torch.Tensor, strength: float, name: str, source: str) -> torch.Tensor:
        """`weight` (float32) with this patch added in place, in ComfyUI's order and rounding
        (comfy/weight_adapter/lora.py: `weight += (strength * alpha / rank) * (up @ down)`; comfy/lora.py 'diff':
        `weight += strength * diff`)."""
        if self.up is not None:
            scale = self.alpha / self.down.shape[0] if self.alpha is not None else 1.0
            mm = torch.mm(self.up.float().flatten(1), self.down.float().flatten(1))
            weight += (strength * scale) * _check(name, mm, weight.shape, "weight", source)
        if self.diff is not None:
            weight += strength * _check(name, self.diff.float(), weight.shape, "weight", source)
        return weight


@dataclass
class LoraPlan:
    patches: dict = field(default_factory=dict)  # layer name (module path) -> LayerPatch
    unmatched: list = field(default_factory=list)  # LoRA keys that name no layer of the model


def _split(key: str) -> tuple[Optional[str], Optional[str]]:
    for up, down in PAIRS:
        for suffix in (up, down):
            if key.endswith(suffix):
                return key[: -len(suffix)], suffix
    for suffix in OTHER:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None, None


def _resolver(module: nn.Module):
    """layer name in any supported naming -> the module path of a layer with a weight, or None."""
    from ..models.wan_dit import from_diffusers_keys

    layers = {name for name, m in module.named_modules() if getattr(m, "weight", None) is not None}
    kohya = {name.replace(".", "_"): name for name in layers}

    def resolve(raw: str) -> Optional[str]:
        name = raw
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        if name in layers:
            return name
        if name in kohya:
            return kohya[name]
        mapped = next(iter(from_diffusers_keys({name + ".weight": None})))[: -len(".weight")]
        return mapped if mapped in layers else None

    return resolve


def plan_lora(lora_sd: dict, module: nn.Module, source: str = "LoRA") -> LoraPlan:
    """Match every tensor of a LoRA file to a layer of `module` (unmatched keys are listed, not dropped silently)."""
    resolve = _resolver(module)
    plan = LoraPlan()
    for key, t in lora_sd.items():
        base, suffix = _split(key)
        target = resolve(base) if base is not None else None
        if target is None:
            plan.unmatched.append(key)
            continue
        p = plan.patches.setdefault(target, LayerPatch())
        if suffix in (".lora_up.weight", ".lora_B.weight"):
            p.up = t
        elif suffix in (".lora_down.weight", ".lora_A.weight"):
            p.down = t
        elif suffix == ".alpha":
            p.alpha = float(t.item())
        elif suffix == ".diff":
            p.diff = t
        else:
            p.diff_b = t
    for name, p in plan.patches.items():
        if (p.up is None) != (p.down is None):
            raise CheckpointError(f"{source}: layer {name} has only one half of its low-rank pair "
                                  f"({'up/B' if p.up is not None else 'down/A'}); the file is incomplete")
    return plan


def _check(name: str, delta: torch.Tensor, shape, what: str, source: str) -> torch.Tensor:
    if delta.numel() != torch.Size(shape).numel():
        raise CheckpointError(f"{source}: the {what} delta for {name} has shape {tuple(delta.shape)} but the model's "
                              f"{what} is {tuple(shape)}; this LoRA was made for a different model size")
    return delta.reshape(shape)


def apply_lora(module: nn.Module, lora_sd: dict, strength: float, source: str = "LoRA") -> nn.Module:
    """A copy of `module` with the LoRA merged at `strength`; the original module is not modified (unpatched
    tensors are shared). Quantized layers (QuantLinear) that a LoRA touches become plain Linears."""
    from .swap import shared_copy

    plan = plan_lora(lora_sd, module, source)
    if not plan.patches:
        raise CheckpointError(f"{source}: none of its {len(lora_sd)} keys names a layer of this model (first keys: "
                              f"{sorted(lora_sd)[:3]}); is it a LoRA for a Wan2.1/2.2 diffusion model?")
    if plan.unmatched:
        logger.warning("%s: %d LoRA keys match no layer and are not loaded: %s", source, len(plan.unmatched),
                       ", ".join(plan.unmatched[:5]) + (" ..." if len(plan.unmatched) > 5 else ""))
    out = shared_copy(module)
    mods = dict(out.named_modules())
    for name, p in plan.patches.items():
        layer = mods[name]
        weight = layer.weight
        if p.up is not None or p.diff is not None:
            if _comfy_fp8(layer):
                # ComfyUI's scaled/plain fp8 layer: merge on the dequantized weight in float32, then store it
                # back in fp8 under the same scale with the patcher's seeded stochastic rounding
                scale = layer.weight_scale.float()
                merged = p.merge_weight(layer.weight.float() * scale, strength, name, source)
                layer.weight = stochastic_round_fp8(merged / scale, weight.dtype,
                                                    comfy_key_seed(f"diffusion_model.{name}.weight"))
            else:
                if not isinstance(weight, nn.Parameter) and hasattr(layer, "dequantized_weight"):
                    layer = _to_linear(out, name, layer, source)
                    weight = layer.weight
                merged = p.merge_weight(weight.float().clone(), strength, name, source)  # float32, as ComfyUI
                layer.weight = nn.Parameter(_store(merged, weight.dtype, f"{name}.weight"), requires_grad=False)
        if p.diff_b is not None:
            if getattr(layer, "bias", None) is None:
                raise CheckpointError(f"{source}: a bias delta for {name}, which has no bias")
            b = layer.bias
            merged = b.float() + strength * _check(name, p.diff_b.float(), b.shape, "bias", source)
            fp8 = getattr(layer, FP8_BIAS_ATTR, None)
            if fp8 is not None:  # ComfyUI keeps this bias in fp8: stochastic rounding, as for fp8 weights
                merged = stochastic_round_fp8(merged, fp8, comfy_key_seed(f"diffusion_model.{name}.bias")).float()
            new = _store(merged, b.dtype, f"{name}.bias")
            if isinstance(b, nn.Parameter):
                layer.bias = nn.Parameter(new, requires_grad=False)
            else:
                layer.bias = new
    return out


def _store(merged: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """A merged float32 tensor in its parameter's dtype: an fp8 parameter (the norms and modulation of an fp8
    `weight_dtype` model) with the patcher's seeded stochastic rounding, as ComfyUI stores every patched weight."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return stochastic_round_fp8(merged, dtype, comfy_key_seed(f"diffusion_model.{key}"))
    return merged.to(dtype)


def _comfy_fp8(layer: nn.Module) -> bool:
    """A QuantLinear holding fp8 codes under one per-tensor scale (ComfyUI's fp8_scaled / fp8 weight_dtype)."""
    from .linear import QuantLinear

    return (isinstance(layer, QuantLinear) and layer.fmt_name == "fp8_e4m3_weight_only"
            and layer.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and layer.weight_scale.ndim == 0)


def _to_linear(root: nn.Module, name: str, q: nn.Module, source: str) -> nn.Linear:
    """Replace a QuantLinear by an nn.Linear with its dequantized weight (in the bias' dtype) to merge into."""
    dtype = q.bias.dtype if q.bias is not None else torch.bfloat16
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.dequantized_weight(dtype), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias, requires_grad=False)
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, lin)
    log_once(logger, ("lora_dequant", source), "%s: layers the LoRA patches are dequantized to %s (not re-quantized)",
             source, dtype)
    return lin
