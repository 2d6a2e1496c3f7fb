"""`QuantLinear`: a drop-in for `nn.Linear` whose weight is stored quantized.

State-dict keys follow ComfyUI's mixed-precision naming so files line up with the host's:
  <layer>.weight (int8 / float8_e4m3fn), <layer>.weight_scale (fp32), <layer>.bias (compute dtype),
  <layer>.pre_quant_scale (fp32 [K], SmoothQuant only).
The output has the input's dtype; scales stay fp32 and the quantized weight keeps its storage dtype even
when the module is cast (`.to(torch.bfloat16)` moves devices and casts the bias only).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .formats import QuantFormat, get_format

_SIDE_TENSORS = ("weight", "weight_scale", "pre_quant_scale")


class QuantLinear(nn.Module):
    """y = x W'^T + b with W' given by a quantization format (see `formats`)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, layer_opts: Optional[dict] = None,
                 bias: bool = True, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt_name = fmt
        self.layer_opts = dict(layer_opts or {})
        spec = self.format.storage(self.out_features, self.in_features, self.layer_opts)
        for name, (shape, dtype) in spec.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if "pre_quant_scale" not in spec:
            self.register_buffer("pre_quant_scale", None)  # SmoothQuant layers only; None is not saved
        if bias:
            self.register_buffer("bias", torch.empty(self.out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @property
    def format(self) -> QuantFormat:
        return get_format(self.fmt_name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, layer_opts: Optional[dict] = None,
                    smooth: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize an `nn.Linear` (its weight is read, never modified)."""
        f = get_format(fmt)
        w = linear.weight.detach()
        layer_opts = dict(layer_opts or {})
        if smooth is not None:
            layer_opts["smoothquant"] = True
        q = cls(linear.in_features, linear.out_features, fmt, layer_opts, bias=linear.bias is not None,
                bias_dtype=w.dtype, device="meta")
        tensors = f.quantize(w, layer_opts, smooth=smooth)
        for name, t in tensors.items():
            setattr(q, name, t.to(w.device))
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in _SIDE_TENSORS if getattr(self, n, None) is not None}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight W' [N, K] (what a plain F.linear would need)."""
        return self.format.dequantize(self.tensors(), self.layer_opts, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.linear(x, self.tensors(), self.layer_opts, self.bias)

    def _apply(self, fn, recurse=True):
        # Keep storage dtypes: a dtype cast (model.to(bf16)) must not turn fp8/int8 codes or fp32 scales
        # into bf16. Only the device follows; the bias follows both (it is in the compute dtype).
        for name in _SIDE_TENSORS:
            t = getattr(self, name, None)
            if t is None:
                continue
            moved = fn(t)
            if moved.dtype != t.dtype:
                moved = t.to(device=moved.device)
            self._buffers[name] = moved
        if self.bias is not None:
            self._buffers["bias"] = fn(self.bias)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt_name}, "
                f"opts={self.layer_opts}, bias={self.bias is not None}")

    def weight_bytes(self) -> int:
        """Bytes of the stored weight and its scales (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
