"""Choose which linears to quantize and build a quantized copy of a module (the input is never modified).

Default selection (what DiT quantization practice keeps in high precision, see docs/quant.md): quantize
the blocks' attention projections (self/cross q, k, v, o) and FFN linears; keep patch/text/time
embeddings, the time projection, modulation, norms and the head in their original precision.
Patterns are `fnmatch` globs on module names (`*` also matches dots): `blocks.*.ffn.*`, `*.cross_attn.k`.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .formats import QuantOptions, get_format
from .linear import QuantLinear
from .primitives import smoothquant_scale

logger = logging.getLogger(__name__)

# Wan (`blocks.N.self_attn.q`, `blocks.N.ffn.0`) and DiT/OpenSora-style (`blocks.N.attn.qkv`, `blocks.N.mlp.fc1`),
# also inside a wrapper module (`inner.blocks.N...`).
DEFAULT_INCLUDE = ("*blocks.*.self_attn.*", "*blocks.*.cross_attn.*", "*blocks.*.attn.*",
                   "*blocks.*.ffn.*", "*blocks.*.mlp.*")
DEFAULT_EXCLUDE = ("*norm*", "*modulation*", "*adaLN*", "*embed*", "head", "head.*", "*.head", "*.head.*",
                   "*time_proj*", "*final_layer*")


def parse_patterns(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """'a, b\\n c' -> ('a', 'b', 'c'); empty / None -> None (= use the defaults)."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        items = [str(t).strip() for t in text]
    else:
        items = [t.strip() for t in re.split(r"[,\n;]+", str(text))]
    items = [t for t in items if t]
    return tuple(items) if items else None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how; recorded in saved files so a loader can rebuild the layers."""

    format: str
    options: QuantOptions = field(default_factory=QuantOptions)
    include: Optional[tuple[str, ...]] = None  # None = DEFAULT_INCLUDE
    exclude: Optional[tuple[str, ...]] = None  # None = DEFAULT_EXCLUDE

    def to_json(self) -> dict:
        return {"format": self.format, "options": self.options.to_json(),
                "include": list(self.include or DEFAULT_INCLUDE), "exclude": list(self.exclude or DEFAULT_EXCLUDE)}


def linear_names(module: nn.Module) -> list[str]:
    """Names of every plain `nn.Linear` in `module` (already-quantized layers are not listed)."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def select_layers(module: nn.Module, include=None, exclude=None) -> list[str]:
    """Names of the `nn.Linear` layers matched by `include` and not by `exclude` (None = the defaults)."""
    inc = parse_patterns(include) or DEFAULT_INCLUDE
    exc = parse_patterns(exclude)
    exc = DEFAULT_EXCLUDE if exc is None else exc
    names = [n for n in linear_names(module) if _matches(n, inc) and not _matches(n, exc)]
    if not names:
        already = [n for n, m in module.named_modules() if isinstance(m, QuantLinear)]
        if already:
            raise ValueError(f"the model is already quantized ({len(already)} layers, e.g. {already[0]} as "
                             f"{module.get_submodule(already[0]).fmt_name}) and no plain linear layer matches; "
                             f"quantize the original model instead")
        available = linear_names(module)
        shown = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "")
        raise ValueError(f"no linear layer matches include={list(inc)} minus exclude={list(exc)}; "
                         f"the model's linear layers are: {shown or '(none)'}. Adjust the include/exclude patterns.")
    return names


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers are the *same* tensors.

    Swapping layers in the copy leaves the original untouched, at no extra memory for the layers that
    stay in high precision. (Nodes never modify tensors in place, so sharing them is safe.)
    """
    memo = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def collect_activation_amax(module: nn.Module, names: Iterable[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by each named linear while `run()` executes (SmoothQuant calibration)."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return hook

    for name in names:
        hooks.append(module.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


@dataclass
class LayerRecord:
    name: str
    format: str
    out_features: int
    in_features: int
    layer_opts: dict
    bytes_before: int
    bytes_after: int


@torch.no_grad()
def quantize_module(module: nn.Module, recipe: Recipe,
                    act_amax: Optional[dict[str, torch.Tensor]] = None) -> tuple[nn.Module, list[LayerRecord]]:
    """Return (a copy of `module` with the selected linears replaced by `QuantLinear`, per-layer records).

    Raises `UnsupportedError` when the format cannot run on the module's device, ValueError when a selected
    layer's shape does not suit the format (naming the layers) or SmoothQuant lacks calibration stats.
    """
    fmt = get_format(recipe.format)
    fmt.check_device(module_device(module))
    layer_opts = fmt.layer_options(recipe.options)
    names = select_layers(module, recipe.include, recipe.exclude)
    bad = []
    for name in names:
        lin = module.get_submodule(name)
        why = fmt.check_shape(name, lin.out_features, lin.in_features, layer_opts)
        if why:
            bad.append(f"{name} ({why})")
    if bad:
        raise ValueError(f"{fmt.name} cannot quantize {len(bad)} selected layer(s): {'; '.join(bad[:8])}. "
                         f"Add them to the exclude patterns or pick another format.")
    alpha = recipe.options.smoothquant_alpha
    if alpha and fmt.name != "int8_dynamic":
        raise ValueError(f"smoothquant_alpha applies to int8_dynamic only, not {fmt.name}; set it to 0")
    if alpha and act_amax is None:
        raise ValueError("smoothquant_alpha > 0 needs calibration statistics (per-channel activation amax); "
                         "run collect_activation_amax first or set smoothquant_alpha to 0")
    out = shared_copy(module)
    records = []
    for name in names:
        lin = out.get_submodule(name)
        smooth = None
        if alpha:
            if name not in act_amax:
                raise ValueError(f"SmoothQuant: no calibration statistics for layer {name!r} "
                                 f"(it did not run during calibration)")
            smooth = smoothquant_scale(act_amax[name].to(lin.weight.device), lin.weight, alpha)
        q = QuantLinear.from_linear(lin, fmt.name, layer_opts, smooth=smooth)
        out.set_submodule(name, q)
        records.append(LayerRecord(name, fmt.name, lin.out_features, lin.in_features, dict(q.layer_opts),
                                   lin.weight.numel() * lin.weight.element_size(), q.weight_bytes()))
    logger.info("quantized %d layers to %s", len(records), fmt.name)
    return out.eval(), records
