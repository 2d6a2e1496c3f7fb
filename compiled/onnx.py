"""ONNX export of the same sub-graphs (opset >= 17) for users who build TensorRT engines with trtexec.

Uses the TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and maps LayerNorm,
SiLU, GELU-tanh and scaled_dot_product_attention to opset-17 ops. Dynamic axes follow the profile's
dynamic dimensions. `check_onnxruntime` runs the file on the CPU and compares with eager.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from . import export as ex

logger = logging.getLogger(__name__)

MIN_OPSET = 17


def _layer_norm_onnx(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm as mean/variance over the trailing dims. The tracer records `x.shape[-1:]` (how the
    models call layer_norm) as a runtime shape tensor, which the exporter cannot turn into
    LayerNormalization's static axis; this form needs only the number of normalised dims."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rms_norm_onnx(x, normalized_shape, weight=None, eps=None):
    """RMSNorm as x * rsqrt(mean(x^2) + eps) (aten::rms_norm has no opset-17 symbolic); eps=None is
    torch's default, the dtype's machine epsilon."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


@contextlib.contextmanager
def onnx_friendly():
    """Swap `F.layer_norm` / `F.rms_norm` for ONNX-friendly forms while tracing (restored on exit)."""
    F = torch.nn.functional
    originals = F.layer_norm, F.rms_norm
    F.layer_norm, F.rms_norm = _layer_norm_onnx, _rms_norm_onnx
    try:
        yield
    finally:
        F.layer_norm, F.rms_norm = originals


def export_dit_onnx(dit, profile: ex.Profile, path, opset: int = MIN_OPSET) -> tuple:
    """Write the Wan DiT graph to `path`; returns the example inputs used (opt shapes)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: LayerNormalization needs opset 17")
    graph = ex.WanDiTGraph(dit, (profile.frames.max, profile.height.max, profile.width.max)).eval()
    args = ex.dit_example_inputs(dit, profile)
    axes = {"x": {0: "batch", 2: "frames", 3: "height", 4: "width"}, "timestep": {0: "batch"},
            "context": {0: "batch", 1: "text"}, "text_bias": {3: "text"}, "velocity": {0: "batch", 2: "frames",
                                                                                     3: "height", 4: "width"}}
    with torch.no_grad(), onnx_friendly():
        torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=opset,
                          input_names=["x", "timestep", "context", "text_bias"], output_names=["velocity"],
                          dynamic_axes=axes)
    return args


def check_onnxruntime(path, graph_fn, inputs: tuple, names=("x", "timestep", "context", "text_bias")) -> float:
    """max abs difference between onnxruntime (CPU) and eager on `inputs`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(path)), providers=["CPUExecutionProvider"])
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    got = torch.from_numpy(sess.run(None, feeds)[0])
    with torch.no_grad():
        ref = graph_fn(*inputs)
    return float((got - ref.float()).abs().max())
