"""Quantized checkpoints: TwinFlow's own record and ComfyUI's two scaled-fp8 layouts, read and write.

Layouts (tensor names relative to the model; ComfyUI files may carry a `model.diffusion_model.` prefix):
- **twinflow**: `<layer>.weight` (int8 | float8_e4m3fn), `<layer>.weight_scale` (fp32), optional
  `<layer>.pre_quant_scale` (fp32 [K], SmoothQuant), `<layer>.bias`; metadata `twinflow_quant` = JSON
  `{"format_version": 1, "layers": {layer: {"format", "layer_opts", "in_features", "out_features"}}, "recipe"}`.
  When every quantized layer is per-tensor fp8, the file also carries ComfyUI's `_quantization_metadata`,
  so the same file loads in ComfyUI.
- **ComfyUI `_quantization_metadata`** (comfy/quant_ops.py QUANT_ALGOS, comfy/utils.py convert_old_quants):
  metadata JSON `{"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"}}}` (or per-layer
  `<layer>.comfy_quant` uint8 JSON tensors), `<layer>.weight` fp8, `<layer>.weight_scale` fp32 scalar,
  optional `<layer>.input_scale` (activation scale; unused here: we run these layers weight-only).
- **ComfyUI legacy scaled fp8** (comfy/model_detection.py, comfy/ops.py scaled_fp8_ops): a `scaled_fp8`
  marker tensor whose dtype is the fp8 type (float32 means e4m3fn; 2 elements = no fp8 matmul, which
  is what we write: our layers have no calibrated input scale), per
  linear `<layer>.scale_weight` fp32 scalar (W = weight.to(dtype) * scale_weight) and optional
  `<layer>.scale_input`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.log import log_once
from ..models import loading
from .formats import get_format
from .linear import QuantLinear

logger = logging.getLogger(__name__)

TWINFLOW_KEY = "twinflow_quant"
COMFY_META_KEY = "_quantization_metadata"
FORMAT_VERSION = 1
_FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
LAYOUTS = ("twinflow", "comfy_quant_metadata", "comfy_scaled_fp8")


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------

def _is_marker(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith(".scaled_fp8")


def is_quantized(metadata: Optional[dict], state_dict) -> bool:
    """Whether a checkpoint holds quantized layers in any layout this module reads."""
    meta = metadata or {}
    if TWINFLOW_KEY in meta or COMFY_META_KEY in meta:
        return True
    return any(_is_marker(k) or k.endswith(".comfy_quant") or k.endswith(".scale_weight") for k in state_dict)


def strip_record_prefix(metadata: Optional[dict], prefix: str) -> dict:
    """The metadata with a key prefix (e.g. `model.diffusion_model.`) removed from the layer names of its
    quantization records, for a loader that stripped the prefix from the tensors."""
    meta = dict(metadata or {})
    if not prefix:
        return meta
    for key in (TWINFLOW_KEY, COMFY_META_KEY):
        if key not in meta:
            continue
        try:
            record = json.loads(meta[key])
        except (TypeError, ValueError):
            continue  # read_layers reports invalid JSON with the file name
        layers = record.get("layers") if isinstance(record, dict) else None
        if isinstance(layers, dict):
            record["layers"] = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in layers.items()}
            meta[key] = json.dumps(record)
    return meta


# --------------------------------------------------------------------------------------------------
# Reading: every layout -> (state dict in TwinFlow names, {layer: (format, layer_opts)})
# --------------------------------------------------------------------------------------------------

def _json(raw, what: str, source: str):
    if isinstance(raw, (dict, list)):
        return raw
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: metadata {what!r} is not valid JSON ({e})") from None


def _comfy_layer(name: str, conf: dict, sd: dict, source: str) -> tuple[str, dict]:
    fmt = conf.get("format") if isinstance(conf, dict) else conf
    if fmt != "float8_e4m3fn":
        raise CheckpointError(
            f"{source}: layer {name!r} uses ComfyUI quantization format {fmt!r}; TwinFlow reads float8_e4m3fn "
            f"(scaled fp8) only. Convert the file to scaled fp8 or load the unquantized model and use "
            f"TwinFlow Quantize Model.")
    return "fp8_e4m3_weight_only", {"per_channel": False}  # per-channel scales are recognised at load


def read_layers(metadata: Optional[dict], state_dict: dict, source: str = "checkpoint") -> tuple[dict, dict]:
    """Normalize any supported layout to `(state_dict, {layer_name: (format, layer_opts)})`.

    The returned state dict uses TwinFlow tensor names (`weight_scale`), without marker / `comfy_quant` /
    activation-scale entries. Layer names are as in the file (possibly prefixed). Raises CheckpointError.
    """
    meta = metadata or {}
    sd = dict(state_dict)
    layers: dict[str, tuple[str, dict]] = {}
    if TWINFLOW_KEY in meta:
        record = _json(meta[TWINFLOW_KEY], TWINFLOW_KEY, source)
        version = record.get("format_version") if isinstance(record, dict) else None
        if version != FORMAT_VERSION or not isinstance(record.get("layers"), dict):
            raise CheckpointError(f"{source}: {TWINFLOW_KEY} record has format_version {version!r}; this TwinFlow "
                                  f"reads version {FORMAT_VERSION}. Update TwinFlow or re-quantize the model.")
        for name, spec in record["layers"].items():
            if not isinstance(spec, dict):
                raise CheckpointError(f"{source}: {TWINFLOW_KEY} entry for layer {name!r} is not an object")
            fmt = spec.get("format")
            try:
                get_format(fmt)
            except ValueError as e:
                raise CheckpointError(f"{source}: layer {name!r}: {e}") from None
            layers[name] = (fmt, dict(spec.get("layer_opts") or {}))
        for k in [k for k in sd if k.endswith(".comfy_quant") or k.endswith(".input_scale")]:
            sd.pop(k)
        return sd, layers

    comfy_layers: dict = {}
    if COMFY_META_KEY in meta:
        record = _json(meta[COMFY_META_KEY], COMFY_META_KEY, source)
        if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
            raise CheckpointError(f"{source}: {COMFY_META_KEY} must be a JSON object with a 'layers' object")
        comfy_layers.update(record["layers"])
    for k in [k for k in sd if k.endswith(".comfy_quant")]:
        t = sd.pop(k)
        try:
            conf = json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{source}: {k} is not a UTF-8 JSON tensor ({e})") from None
        comfy_layers.setdefault(k[: -len(".comfy_quant")], conf)
    if comfy_layers:
        for name, conf in comfy_layers.items():
            layers[name] = _comfy_layer(name, conf, sd, source)
        dropped = [k for k in sd if k.endswith(".input_scale")]
        if dropped:
            log_once(logger, ("quant.input_scale", source), "%s: %d static input_scale tensors ignored: TwinFlow runs "
                     "ComfyUI float8 layers weight-only (dequantize, then a high-precision GEMM)", source, len(dropped))
            for k in dropped:
                sd.pop(k)
        return sd, layers

    markers = [k for k in sd if _is_marker(k)]
    # A loader that strips a `model.diffusion_model.` prefix may drop a top-level marker: `scale_weight`
    # tensors alone still identify the legacy layout.
    if markers or any(k.endswith(".scale_weight") for k in sd):
        marker = sd.pop(markers[0]) if markers else torch.empty(0, dtype=torch.float8_e4m3fn)
        for extra in markers[1:]:
            sd.pop(extra)
        dtype = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
        if dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{source}: scaled fp8 file with marker dtype {marker.dtype}; TwinFlow reads "
                                  f"float8_e4m3fn scaled files only")
        n_input = 0
        for k in list(sd):
            if k.endswith(".scale_weight"):
                name = k[: -len(".scale_weight")]
                sd[f"{name}.weight_scale"] = sd.pop(k).float()
                layers[name] = ("fp8_e4m3_weight_only", {"per_channel": False})  # [N] scales: see load
            elif k.endswith(".scale_input"):
                sd.pop(k)
                n_input += 1
        # ComfyUI's scaled_fp8 Linear defaults scale_weight to 1: fp8 linear weights without a scale mean scale 1.
        for k, v in list(sd.items()):
            name = k[: -len(".weight")]
            if k.endswith(".weight") and v.dtype in _FP8_TYPES and v.ndim == 2 and name not in layers:
                sd[f"{name}.weight_scale"] = torch.ones((), dtype=torch.float32)
                layers[name] = ("fp8_e4m3_weight_only", {"per_channel": False})
        if n_input:
            log_once(logger, ("quant.scale_input", source), "%s: %d scale_input tensors ignored: TwinFlow runs "
                     "scaled-fp8 layers weight-only", source, n_input)
        return sd, layers
    raise CheckpointError(f"{source}: no quantization record: expected metadata {TWINFLOW_KEY!r} or "
                          f"{COMFY_META_KEY!r}, per-layer '.comfy_quant' tensors, or a 'scaled_fp8' marker")


def _match_names(layers: dict, module: nn.Module, source: str) -> dict:
    """Map file layer names (maybe prefixed, e.g. `model.diffusion_model.blocks.0.ffn.0`) to module names:
    returns {file name: module name}."""
    modules = dict(module.named_modules())
    out = {}
    for name in layers:
        target = name
        if target not in modules:
            cands = [m for m in modules if m and name.endswith("." + m)]
            target = max(cands, key=len) if cands else None
        if target is None or not isinstance(modules[target], nn.Linear):
            what = "is not a module" if target is None else f"is a {type(modules[target]).__name__}, not nn.Linear"
            raise CheckpointError(f"{source}: quantized layer {name!r} {what} of the model "
                                  f"({type(module).__name__}); the file does not belong to this model architecture")
        out[name] = target
    return out


def _rename_keys(sd: dict, layers: dict, mapping: dict) -> dict:
    """Rename `<file layer>.<x>` to `<module layer>.<x>` for layers whose names differ (prefix)."""
    ren = {f: m for f, m in mapping.items() if f != m}
    if not ren:
        return sd
    out = {}
    for k, v in sd.items():
        head, _, tail = k.rpartition(".")
        out[f"{ren[head]}.{tail}" if head in ren else k] = v
    return out


@torch.no_grad()
def load_quantized_into(module: nn.Module, state_dict: dict, metadata: Optional[dict] = None,
                        source: str = "checkpoint", dtype: Optional[torch.dtype] = None,
                        keep_fp32: Optional[Callable[[str], bool]] = None) -> nn.Module:
    """Swap the quantized layers of `module` (on meta or cpu, plain `nn.Linear`s) for `QuantLinear`s
    and load `state_dict` strictly with `assign=True`; no re-quantization. Returns the module (eval).

    Args:
        module: the model, built with plain `nn.Linear`s (meta device is best: nothing is allocated twice).
        state_dict: the file's tensors with the model's key names (prefixes already stripped); the layer
            names in a ComfyUI `_quantization_metadata` record may keep theirs.
        metadata: the safetensors metadata (`twinflow_quant` / `_quantization_metadata`), may be None for
            legacy scaled-fp8 files (the `scaled_fp8` marker / `scale_weight` tensors identify them).
        dtype: cast the high-precision tensors (not the quantized layers' codes/scales) to this dtype;
            None keeps the file's, except float8 tensors outside quantized layers, widened to bfloat16.
        keep_fp32: keys that stay float32 whatever `dtype` (a model's fp32 islands).
    Raises:
        CheckpointError: unknown/unsupported layout or format, a record naming a non-linear layer, wrong
            code dtype, or missing / unexpected / shape-mismatched keys (all listed together).
    """
    sd, file_layers = read_layers(metadata, state_dict, source)
    mapping = _match_names(file_layers, module, source)
    by_module = {mapping[f]: spec for f, spec in file_layers.items()}
    sd = _rename_keys(sd, file_layers, mapping)
    for name, (fmt, layer_opts) in by_module.items():
        lin = module.get_submodule(name)
        scale = sd.get(f"{name}.weight_scale")
        if fmt == "fp8_e4m3_weight_only" and scale is not None and not layer_opts.get("per_channel"):
            if scale.numel() == 1:
                sd[f"{name}.weight_scale"] = scale.float().reshape(())
            elif tuple(scale.shape) in ((lin.out_features,), (lin.out_features, 1)):
                # ComfyUI layouts are per tensor; other tools write one scale per output row.
                layer_opts = {**layer_opts, "per_channel": True}
                sd[f"{name}.weight_scale"] = scale.float().reshape(-1)
        bias_key = f"{name}.bias"
        bias_dtype = sd[bias_key].dtype if bias_key in sd else torch.float32
        q = QuantLinear(lin.in_features, lin.out_features, fmt, layer_opts, bias=lin.bias is not None,
                        bias_dtype=bias_dtype, device="meta")
        module.set_submodule(name, q)
        for tname, (shape, store_dtype) in q.format.storage(q.out_features, q.in_features, q.layer_opts).items():
            key = f"{name}.{tname}"
            if key not in sd:
                continue  # reported by the strict check below
            t = sd[key]
            if tname == "weight" and t.dtype != store_dtype:
                raise CheckpointError(f"{source}: {key} is {t.dtype}, but format {fmt} stores {store_dtype}")
            if tname != "weight":
                sd[key] = t.float()  # scales are fp32; a bf16/fp16 scale widens exactly
    quantized = set(by_module)
    for k, v in list(sd.items()):
        owner, _, leaf = k.rpartition(".")
        if owner in quantized and leaf != "bias":
            continue  # codes and scales keep their storage dtypes
        if not v.is_floating_point():
            continue
        if keep_fp32 is not None and keep_fp32(k):
            sd[k] = v.float()
        elif dtype is not None:
            sd[k] = v.to(dtype)
        elif v.dtype in _FP8_TYPES:
            log_once(logger, ("quant.fp8_plain", source), "%s: float8 tensors of high-precision layers "
                     "(e.g. %s) widened to bfloat16", source, k)
            sd[k] = v.to(torch.bfloat16)
    loading.check_state_dict(sd, loading.expected_shapes(module), source)
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors left unloaded (still on meta): {', '.join(left[:8])}")
    fmts = sorted({f for f, _ in by_module.values()})
    logger.info("%s: loaded %d quantized layers (%s) without re-quantizing", source, len(by_module), ", ".join(fmts))
    return module.eval()


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def quantized_layers(module: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}


def quant_record(module: nn.Module, recipe: Optional[dict] = None) -> dict:
    """The `twinflow_quant` record of a module with `QuantLinear` layers."""
    layers = {n: {"format": m.fmt_name, "layer_opts": m.layer_opts, "in_features": m.in_features,
                  "out_features": m.out_features} for n, m in quantized_layers(module).items()}
    return {"format_version": FORMAT_VERSION, "layers": layers, "recipe": recipe}


def _comfy_compatible(layers: dict[str, QuantLinear]) -> list[str]:
    """Names of layers ComfyUI cannot read as float8_e4m3fn per-tensor (empty = all can)."""
    return [n for n, m in layers.items()
            if m.format.comfy_format != "float8_e4m3fn" or m.weight_scale.ndim != 0 or m.pre_quant_scale is not None]


def quantized_state_dict(module: nn.Module, layout: str = "twinflow", prefix: str = "",
                         recipe: Optional[dict] = None) -> tuple[dict, dict]:
    """`(tensors, metadata)` of a quantized module in one of LAYOUTS (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    layers = quantized_layers(module)
    if not layers:
        raise ValueError("the model has no quantized layers; run TwinFlow Quantize Model (quant.swap) first")
    sd = {prefix + k: v.detach().contiguous() for k, v in module.state_dict().items()}
    meta: dict[str, str] = {}
    comfy_bad = _comfy_compatible(layers)
    if layout != "twinflow" and comfy_bad:
        m = layers[comfy_bad[0]]
        raise ValueError(f"ComfyUI's scaled-fp8 layouts hold float8_e4m3fn weights with one fp32 scale per tensor; "
                         f"{len(comfy_bad)} layer(s) are not (e.g. {comfy_bad[0]}: {m.fmt_name}, "
                         f"scale shape {tuple(m.weight_scale.shape)}). Quantize with fp8_e4m3_weight_only per tensor, "
                         f"or save with layout 'twinflow'.")
    if layout == "twinflow":
        meta[TWINFLOW_KEY] = json.dumps(quant_record(module, recipe))
    if layout == "comfy_scaled_fp8":
        for name in layers:
            sd[f"{prefix}{name}.scale_weight"] = sd.pop(f"{prefix}{name}.weight_scale")
        # Two elements = "no fp8 matmul" in ComfyUI (model_detection / convert_old_quants): our layers carry no
        # calibrated input scale, so ComfyUI must dequantize and multiply in full precision, as we do.
        sd[f"{prefix}scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    elif not comfy_bad:
        # full_precision_matrix_mult: same reason (otherwise ComfyUI may cast activations to fp8 with scale 1).
        conf = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
        meta[COMFY_META_KEY] = json.dumps({"format_version": "1.0", "layers": {prefix + n: conf for n in layers}})
    return sd, meta


def save_quantized(module: nn.Module, path, layout: str = "twinflow", prefix: str = "",
                   recipe: Optional[dict] = None, metadata: Optional[dict] = None) -> Path:
    """Write a quantized module as safetensors, atomically; refuses to overwrite an existing file."""
    from safetensors.torch import save_file

    from ..core.outputs import atomic_output

    sd, meta = quantized_state_dict(module, layout, prefix, recipe)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"refusing to overwrite existing file {path}; choose another name")
    with atomic_output(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    logger.info("wrote %s (%s layout, %d quantized layers)", path, layout, len(quantized_layers(module)))
    return path
