"""The quantization format registry: what each format stores, how it runs, where it can run.

| format                 | stored per layer                              | forward                                   |
|------------------------|-----------------------------------------------|-------------------------------------------|
| int8_weight_only       | weight int8 [N,K], weight_scale fp32 [N] or [N,K/g] | dequantize to x.dtype, then the linear (oneDNN on x86 CPU) |
| fp8_e4m3_weight_only   | weight e4m3fn [N,K], weight_scale fp32 () or [N] | dequantize to x.dtype, then the linear (oneDNN on x86 CPU) |
| fp8_e4m3_dynamic (W8A8)| weight e4m3fn [N,K], weight_scale fp32 [N]     | per-row fp8 activations + torch._scaled_mm (CUDA, CC >= 8.9 only) |
| int8_dynamic (W8A8)    | weight int8 [N,K], weight_scale fp32 [N] (+ pre_quant_scale fp32 [K] with SmoothQuant) | per-token int8 activations + torch._int_mm |

Weight-only formats save memory, not time: at Wan token counts every large GEMM is compute-bound, so
a dequantize + bf16 GEMM costs the same FLOPs as before plus the dequantize (see docs/quant.md).
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from typing import Optional

import torch

from ..core import cpu_linear
from ..core.errors import UnsupportedError
from ..core.log import log_once
from . import primitives as P

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantOptions:
    """Per-recipe options. group_size: int8 weight-only groups (0 = per output channel);
    per_channel: fp8 scale granularity; smoothquant_alpha: int8_dynamic smoothing strength (0 = off)."""

    group_size: int = 0
    per_channel: Optional[bool] = None  # None = the format's default
    smoothquant_alpha: float = 0.0

    def to_json(self) -> dict:
        return {"group_size": self.group_size, "per_channel": self.per_channel,
                "smoothquant_alpha": self.smoothquant_alpha}


def device_name(device) -> str:
    """A human name for a device, for refusals: 'cuda:0 (NVIDIA A100, compute capability 8.0)'."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)}, compute capability {major}.{minor})"
    if device.type == "cpu":
        proc = platform.processor() or platform.machine() or "unknown processor"
        return f"cpu ({proc})"
    return str(device)


class QuantFormat:
    """Base of every format: subclasses fill in quantize / dequantize / linear / storage."""

    name: str = ""
    weight_only: bool = True
    min_cosine: float = 0.999  # default accuracy threshold on the denoiser output
    comfy_format: Optional[str] = None  # ComfyUI QUANT_ALGOS name when the stored layout matches

    def layer_options(self, opts: QuantOptions) -> dict:
        """The options recorded per layer (what `storage`/`dequantize` need to rebuild it)."""
        return {}

    def quantize(self, w: torch.Tensor, layer_opts: dict, smooth: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _no_smooth(self, smooth) -> None:
        if smooth is not None:
            raise ValueError(f"{self.name} does not take SmoothQuant scales (only int8_dynamic does)")

    def dequantize(self, t: dict[str, torch.Tensor], layer_opts: dict, dtype=torch.float32) -> torch.Tensor:
        """The effective weight W' such that, for weight-only formats, y = x @ W'^T + b exactly (up to
        the GEMM's rounding). For SmoothQuant layers W' already includes the 1/s of the input side."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], layer_opts: dict,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        w = self.dequantize(t, layer_opts, dtype=x.dtype)
        # dense GEMM through oneDNN on x86 CPUs, where aten's F.linear runs at about half its rate
        return cpu_linear.linear(x.contiguous(), w, None if bias is None else bias.to(x.dtype))

    def storage(self, out_features: int, in_features: int, layer_opts: dict) -> dict[str, tuple[tuple, torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a layer stores (besides the bias)."""
        raise NotImplementedError

    def unsupported_reason(self, device) -> Optional[str]:
        """None when the format can run on `device`, else why not."""
        return None

    def check_device(self, device) -> None:
        reason = self.unsupported_reason(device)
        if reason:
            raise UnsupportedError(reason)

    def check_shape(self, name: str, out_features: int, in_features: int, layer_opts: dict) -> Optional[str]:
        """None when a layer of this shape can use the format, else why not."""
        return None


class Int8WeightOnly(QuantFormat):
    name = "int8_weight_only"
    weight_only = True
    min_cosine = 0.999

    def layer_options(self, opts):
        return {"group_size": int(opts.group_size)}

    def check_shape(self, name, out_features, in_features, layer_opts):
        g = layer_opts.get("group_size", 0)
        if g and in_features % g:
            return f"in_features {in_features} is not a multiple of group_size {g}"
        return None

    def quantize(self, w, layer_opts, smooth=None):
        self._no_smooth(smooth)
        q, s = P.quantize_int8_weight(w, layer_opts.get("group_size", 0))
        return {"weight": q, "weight_scale": s}

    def dequantize(self, t, layer_opts, dtype=torch.float32):
        return P.dequantize_int8_weight(t["weight"], t["weight_scale"], dtype)

    def storage(self, out_features, in_features, layer_opts):
        g = layer_opts.get("group_size", 0)
        scale_shape = (out_features, in_features // g) if g else (out_features,)
        return {"weight": ((out_features, in_features), torch.int8), "weight_scale": (scale_shape, torch.float32)}


class Fp8WeightOnly(QuantFormat):
    name = "fp8_e4m3_weight_only"
    weight_only = True
    min_cosine = 0.999
    comfy_format = "float8_e4m3fn"  # when per tensor

    def layer_options(self, opts):
        return {"per_channel": bool(opts.per_channel) if opts.per_channel is not None else False}

    def quantize(self, w, layer_opts, smooth=None):
        self._no_smooth(smooth)
        q, s = P.quantize_fp8_weight(w, per_channel=layer_opts.get("per_channel", False))
        return {"weight": q, "weight_scale": s}

    def dequantize(self, t, layer_opts, dtype=torch.float32):
        return P.dequantize_fp8_weight(t["weight"], t["weight_scale"], dtype)

    def storage(self, out_features, in_features, layer_opts):
        scale_shape = (out_features,) if layer_opts.get("per_channel") else ()
        return {"weight": ((out_features, in_features), P.FP8_DTYPE), "weight_scale": (scale_shape, torch.float32)}


class Fp8Dynamic(Fp8WeightOnly):
    name = "fp8_e4m3_dynamic"
    weight_only = False
    min_cosine = 0.995
    comfy_format = None  # row-wise weight scales are not ComfyUI's per-tensor float8 layout

    def layer_options(self, opts):
        return {"per_channel": bool(opts.per_channel) if opts.per_channel is not None else True}

    def unsupported_reason(self, device):
        device = torch.device(device)
        if device.type != "cuda":
            return (f"fp8_e4m3_dynamic (W8A8) needs an NVIDIA GPU with compute capability >= 8.9 "
                    f"(Ada, Hopper or newer) for torch._scaled_mm; this model is on {device_name(device)}. "
                    f"Move the model to such a GPU, or use fp8_e4m3_weight_only / int8_weight_only "
                    f"(memory) or int8_dynamic (W8A8, runs on the CPU too).")
        if not torch.cuda.is_available():
            return f"fp8_e4m3_dynamic: CUDA is not available in this torch build ({torch.__version__})"
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(idx) < (8, 9):
            return (f"fp8_e4m3_dynamic (W8A8) needs compute capability >= 8.9 for fp8 tensor cores; "
                    f"{device_name(device)} has none. Use int8_dynamic or a weight-only format instead.")
        return None

    def check_shape(self, name, out_features, in_features, layer_opts):
        if in_features % 16 or out_features % 16:
            return (f"torch._scaled_mm needs in/out features that are multiples of 16, "
                    f"got {out_features}x{in_features}")
        return None

    def linear(self, x, t, layer_opts, bias):
        # Also checked here, not only at quantize time: a model moved to another device after quantizing
        # must refuse rather than run a path nobody chose.
        _check_device_cached(self, x.device)
        return P.fp8_dynamic_linear(x, t["weight"], t["weight_scale"], bias)


_DEVICE_OK: set = set()


def _check_device_cached(fmt: QuantFormat, device: torch.device) -> None:
    key = (fmt.name, str(device))
    if key not in _DEVICE_OK:
        fmt.check_device(device)
        _DEVICE_OK.add(key)


class Int8Dynamic(QuantFormat):
    name = "int8_dynamic"
    weight_only = False
    min_cosine = 0.995

    def layer_options(self, opts):
        if opts.group_size:
            raise ValueError("int8_dynamic uses per-channel weight scales; set group_size to 0 "
                             "(groups only work with int8_weight_only)")
        return {"smoothquant": bool(opts.smoothquant_alpha)}

    def quantize(self, w, layer_opts, smooth=None):
        if smooth is not None:
            w = w.float() * smooth.float()[None, :]  # W' = W diag(s); the forward divides x by s
        q, s = P.quantize_int8_weight(w, 0)
        out = {"weight": q, "weight_scale": s}
        if smooth is not None:
            out["pre_quant_scale"] = smooth.float()
        return out

    def dequantize(self, t, layer_opts, dtype=torch.float32):
        w = P.dequantize_int8_weight(t["weight"], t["weight_scale"], torch.float32)
        if "pre_quant_scale" in t:
            w = w / t["pre_quant_scale"].float()[None, :]
        return w.to(dtype)

    def storage(self, out_features, in_features, layer_opts):
        out = {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,), torch.float32)}
        if layer_opts.get("smoothquant"):
            out["pre_quant_scale"] = ((in_features,), torch.float32)
        return out

    def linear(self, x, t, layer_opts, bias):
        log_once(logger, ("quant.int8_dynamic", x.device.type),
                 "int8_dynamic: per-token int8 activations x int8 weights with torch._int_mm on %s",
                 x.device.type)
        return P.int8_dynamic_linear(x, t["weight"], t["weight_scale"], bias, t.get("pre_quant_scale"))


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (Int8WeightOnly(), Fp8WeightOnly(), Fp8Dynamic(), Int8Dynamic())}


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quantization format {name!r}; expected one of {sorted(FORMATS)}") from None
