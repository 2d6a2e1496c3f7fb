"""The accuracy report every quantization produces, and `quantize_denoiser` (quantize + report + threshold).

Metrics (computed in float64 on flattened tensors; `ref` is the unquantized model's output):
  cosine   = <ref, out> / (|ref| |out|)
  rel_l2   = |out - ref| / |ref|
  psnr_db  = 20 log10(max|ref| / rmse(out - ref))      (peak = the reference's largest magnitude)
  max_abs  = max |out - ref|
The denoiser output is the velocity v(x_sigma, sigma, context) at fixed seeds and 3-5 sigmas; inputs are
seeded standard normals (latent and text context), the same for both models.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..core.errors import TwinFlowError
from ..core.handles import Denoiser
from ..core.progress import Progress
from .formats import get_format
from .swap import LayerRecord, Recipe, collect_activation_amax, quantize_module, select_layers

logger = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.95, 0.75, 0.5, 0.25, 0.05)
DEFAULT_SEEDS = (0, 1)


class QuantAccuracyError(TwinFlowError, ValueError):
    """The quantized model is less accurate than the threshold; the message names the worst layers."""

    def __init__(self, message: str, report: "QuantReport"):
        super().__init__(message)
        self.report = report


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """cosine, rel_l2, psnr_db, max_abs of `out` against `ref` (see the module docstring)."""
    a = ref.detach().double().flatten()
    b = out.detach().double().flatten()
    diff = b - a
    na, nb = a.norm().item(), b.norm().item()
    cos = (a @ b).item() / (na * nb) if na > 0 and nb > 0 else float(na == nb)
    mse = diff.pow(2).mean().item()
    peak = a.abs().max().item() if a.numel() else 0.0
    psnr = math.inf if mse == 0 else (20 * math.log10(peak / math.sqrt(mse)) if peak > 0 else -math.inf)
    return {"cosine": cos, "rel_l2": diff.norm().item() / na if na > 0 else (0.0 if mse == 0 else math.inf),
            "psnr_db": psnr, "max_abs": diff.abs().max().item() if diff.numel() else 0.0}


@dataclass
class LayerReport:
    name: str
    format: str
    shape: tuple
    bytes_before: int
    bytes_after: int
    weight_rel_l2: float
    output_rel_l2: float = float("nan")  # the layer's own output vs fp at the probe activations (worst call)


@dataclass
class QuantReport:
    format: str
    recipe: dict
    weight_bytes_before: int  # all parameters and buffers of the model
    weight_bytes_after: int
    layers: list[LayerReport]
    probes: list[dict]  # {"seed", "sigma", **compare()}
    min_cosine: float  # threshold used
    passed: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> dict:
        return min(self.probes, key=lambda p: p["cosine"])

    def worst_layers(self, k: int = 5) -> list[LayerReport]:
        key = (lambda l: l.output_rel_l2) if all(not math.isnan(l.output_rel_l2) for l in self.layers) \
            else (lambda l: l.weight_rel_l2)
        return sorted(self.layers, key=key, reverse=True)[:k]

    def to_text(self) -> str:
        mib = 1 / 2 ** 20
        q_before = sum(l.bytes_before for l in self.layers)
        q_after = sum(l.bytes_after for l in self.layers)
        lines = [
            f"TwinFlow quantization report: {self.format} on {len(self.layers)} linear layers",
            f"weights: {self.weight_bytes_before:,} B ({self.weight_bytes_before * mib:.1f} MiB) -> "
            f"{self.weight_bytes_after:,} B ({self.weight_bytes_after * mib:.1f} MiB), "
            f"x{self.weight_bytes_after / max(self.weight_bytes_before, 1):.3f}; "
            f"quantized layers {q_before:,} B -> {q_after:,} B",
            "denoiser output (velocity) vs unquantized:",
            "  seed  sigma   cosine      rel_l2     psnr_dB   max_abs",
        ]
        for p in self.probes:
            lines.append(f"  {p['seed']:>4}  {p['sigma']:.3f}  {p['cosine']:.6f}  {p['rel_l2']:.3e}  "
                         f"{p['psnr_db']:8.2f}  {p['max_abs']:.3e}")
        w = self.worst
        verdict = "PASS" if w["cosine"] >= self.min_cosine else ("FORCED" if self.passed else "FAIL")
        lines.append(f"worst cosine {w['cosine']:.6f} (seed {w['seed']}, sigma {w['sigma']:.3f}); "
                     f"threshold {self.min_cosine}: {verdict}")
        lines.append("worst layers (layer output rel-L2 at probe activations | weight rel-L2):")
        for l in self.worst_layers():
            lines.append(f"  {l.name:<40} {l.output_rel_l2:.3e} | {l.weight_rel_l2:.3e}")
        lines.append("per-layer weight rel-L2:")
        for l in self.layers:
            lines.append(f"  {l.name:<40} {l.format:<22} {str(l.shape):<14} {l.weight_rel_l2:.3e} "
                         f"{l.bytes_before:>12,} -> {l.bytes_after:,} B")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"format": self.format, "recipe": self.recipe, "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after, "min_cosine": self.min_cosine,
                "passed": self.passed, "probes": self.probes,
                "layers": [l.__dict__ for l in self.layers]}


def module_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (each tensor once; shared tensors count once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def probe_inputs(denoiser: Denoiser, seed: int, latent_shape: Sequence[int],
                 context_tokens: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Seeded latent [B, C, (T,) H, W] (standard normal) and text context [B, L, D] (or None).

    L = the model's fixed caption length if its config has one (`caption_tokens`), else 16."""
    if context_tokens is None:
        context_tokens = int(getattr(denoiser.config, "caption_tokens", 0) or 16)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(tuple(latent_shape), generator=gen)
    ctx = None
    if denoiser.text_dim:
        ctx = torch.randn(latent_shape[0], context_tokens, denoiser.text_dim, generator=gen)
    return x, ctx


def default_latent_shape(denoiser: Denoiser) -> tuple[int, ...]:
    """A small latent the model accepts: its native grid if fixed (`input_size`), else 2 latent frames of
    16x16 (scaled with the patch size)."""
    native = getattr(denoiser.config, "input_size", None)
    if native:
        return (1, denoiser.in_channels, *tuple(native))
    patch = tuple(getattr(denoiser.config, "patch_size", (1, 2, 2)) or (1, 2, 2))
    if len(patch) == 2:
        return (1, denoiser.in_channels, 8 * patch[0], 8 * patch[1])
    return (1, denoiser.in_channels, 2 * patch[0], 8 * patch[1], 8 * patch[2])


@torch.no_grad()
def _velocities(denoiser: Denoiser, inputs, sigmas, bar: Optional[Progress] = None) -> list[torch.Tensor]:
    out = []
    dev, dt = denoiser.device, denoiser.dtype
    for x, ctx in inputs:
        for s in sigmas:
            sigma = torch.full((x.shape[0],), float(s), device=dev)
            c = None if ctx is None else ctx.to(dev, dt)
            out.append(denoiser.velocity(x.to(dev, dt), sigma, c).float().cpu())
            if bar is not None:
                bar.update(1)
    return out


def _layer_output_hooks(qmodule: nn.Module, ref_module: nn.Module, names: Sequence[str], errs: dict):
    """Hooks measuring each QuantLinear's output against the original linear on the same input."""
    hooks = []
    for name in names:
        q = qmodule.get_submodule(name)
        ref = ref_module.get_submodule(name)

        def hook(mod, args, out, ref=ref, name=name):
            x = args[0]
            y = nn.functional.linear(x, ref.weight.to(x.dtype), None if ref.bias is None else ref.bias.to(x.dtype))
            e = compare(y, out)["rel_l2"]
            errs[name] = max(errs.get(name, 0.0), e)
        hooks.append(q.register_forward_hook(hook))
    return hooks


@torch.no_grad()
def accuracy_report(ref: Denoiser, quant: Denoiser, records: Sequence[LayerRecord], recipe: Recipe,
                    sigmas: Sequence[float] = DEFAULT_SIGMAS, seeds: Sequence[int] = DEFAULT_SEEDS,
                    latent_shape: Optional[Sequence[int]] = None, min_cosine: Optional[float] = None) -> QuantReport:
    """Compare `quant` against `ref` on seeded probes; per-layer weight and output errors."""
    fmt = get_format(recipe.format)
    threshold = fmt.min_cosine if not min_cosine else float(min_cosine)
    shape = tuple(latent_shape) if latent_shape else default_latent_shape(ref)
    inputs = [probe_inputs(ref, s, shape) for s in seeds]
    layer_errs: dict[str, float] = {}
    with Progress(total=2 * len(inputs) * len(sigmas), desc="quantization report") as bar:
        v_ref = _velocities(ref, inputs, sigmas, bar)
        hooks = _layer_output_hooks(quant.module, ref.module, [r.name for r in records], layer_errs)
        try:
            v_q = _velocities(quant, inputs, sigmas, bar)
        finally:
            for h in hooks:
                h.remove()
    probes = []
    i = 0
    for seed in seeds:
        for s in sigmas:
            probes.append({"seed": int(seed), "sigma": float(s), **compare(v_ref[i], v_q[i])})
            i += 1
    layers = []
    for r in records:
        w_ref = ref.module.get_submodule(r.name).weight.detach().float()
        w_q = quant.module.get_submodule(r.name).dequantized_weight(torch.float32)
        layers.append(LayerReport(r.name, r.format, (r.out_features, r.in_features), r.bytes_before, r.bytes_after,
                                  compare(w_ref, w_q)["rel_l2"], layer_errs.get(r.name, float("nan"))))
    rep = QuantReport(format=fmt.name, recipe=recipe.to_json(), weight_bytes_before=module_bytes(ref.module),
                      weight_bytes_after=module_bytes(quant.module), layers=layers, probes=probes,
                      min_cosine=threshold)
    rep.passed = rep.worst["cosine"] >= threshold
    if fmt.weight_only:
        rep.notes.append("note: weight-only formats save memory, not time (the GEMMs stay compute-bound; "
                         "see docs/quant.md)")
    return rep


def quantize_denoiser(denoiser: Denoiser, recipe: Recipe, *, min_cosine: Optional[float] = None,
                      force: bool = False, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                      seeds: Sequence[int] = DEFAULT_SEEDS,
                      latent_shape: Optional[Sequence[int]] = None) -> tuple[Denoiser, QuantReport]:
    """Quantize a denoiser's linears (a new module; the input is untouched) and measure what it cost.

    Raises:
        UnsupportedError: the format cannot run on the model's device (fp8_e4m3_dynamic off CC >= 8.9 GPUs).
        QuantAccuracyError: worst velocity cosine below the threshold (format default: 0.999 weight-only,
            0.995 W8A8) and not `force`; the message names the worst layers and how to proceed.
    """
    if denoiser.family == "comfy":
        from ..core.errors import UnsupportedError
        raise UnsupportedError("quantizing a wrapped ComfyUI MODEL is not supported yet (ComfyUI adapter, issue 9); "
                               "load the model with a TwinFlow loader")
    if not 3 <= len(sigmas) <= 5 or not all(0.0 < float(s) <= 1.0 for s in sigmas):
        raise ValueError(f"report sigmas must be 3-5 values in (0, 1], got {list(sigmas)}")
    act_amax = None
    if recipe.options.smoothquant_alpha:
        names = select_layers(denoiser.module, recipe.include, recipe.exclude)
        shape = tuple(latent_shape) if latent_shape else default_latent_shape(denoiser)
        # Calibrate on seeds disjoint from the report's, so the report does not grade its own calibration.
        calib = [probe_inputs(denoiser, 10_000 + s, shape) for s in seeds]
        act_amax = collect_activation_amax(denoiser.module, names, lambda: _velocities(denoiser, calib, sigmas))
    qmodule, records = quantize_module(denoiser.module, recipe, act_amax)
    qden = denoiser.clone(module=qmodule)
    report = accuracy_report(denoiser, qden, records, recipe, sigmas, seeds, latent_shape, min_cosine)
    if not report.passed:
        w = report.worst
        worst = ", ".join(f"{l.name} (out rel-L2 {l.output_rel_l2:.2e}, weight rel-L2 {l.weight_rel_l2:.2e})"
                          for l in report.worst_layers(3))
        msg = (f"{recipe.format}: denoiser output cosine {w['cosine']:.6f} at sigma {w['sigma']:.3f} (seed "
               f"{w['seed']}) is below the threshold {report.min_cosine}. Worst layers: {worst}. "
               f"Exclude them (exclude patterns), use a weight-only format, or set force to accept.")
        if not force:
            raise QuantAccuracyError(msg, report)
        report.passed = True
        report.notes.append(f"FORCED below threshold: {msg}")
        logger.warning("quantization accepted below threshold (force): %s", msg)
    qden.info["quant"] = {"recipe": recipe.to_json(), "worst_cosine": report.worst["cosine"],
                          "weight_bytes": report.weight_bytes_after}
    qden.info["quant_report"] = report.to_text()
    return qden, report
