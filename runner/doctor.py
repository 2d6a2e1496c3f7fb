"""`twinflow doctor`: what this environment can do, and why not. Never imports optional heavy modules."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import platform
import sys

logger = logging.getLogger(__name__)

# (import name, what it enables, install hint)
EXTRAS = (
    ("cupy", "CuPy fused kernels", "pip install 'comfyui-twinflow[cupy]'  (cupy-cuda13x; match your CUDA)"),
    ("torch_tensorrt", "TensorRT compile backend", "pip install torch-tensorrt  (same version line as torch)"),
    ("av", "MP4 (H.264) video save/load", "pip install 'comfyui-twinflow[video]'  (PyAV)"),
    ("transformers", "UMT5 text encoder", "pip install 'comfyui-twinflow[text]'"),
    ("diffusers", "reference checks in the tests", "pip install 'diffusers==0.42.1'"),
    ("onnxruntime", "ONNX export checks", "pip install 'comfyui-twinflow[onnx]'"),
    ("aiohttp", "twinflow serve (ComfyUI's HTTP + WebSocket API)", "pip install 'comfyui-twinflow[serve]'"),
    ("ray", "twinflow serve/batch --ray (prompts on Ray actors)", "pip install 'comfyui-twinflow[ray]'"),
)
HOOK_PACKAGES = ("fused", "compiled", "quant", "models")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: MISSING - install PyTorch first (https://pytorch.org/get-started/locally/)"]
    from ..core import cpu_linear

    lines = [f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none, CPU-only wheel'})",
             f"cpu linear (Wan DiT, weight-only quant): {cpu_linear.status()}"]
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if not torch.version.cuda else "no CUDA device or driver visible"
        lines.append(f"GPU: none ({why}); everything runs on the CPU, slowly")
        return lines
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        name = torch.cuda.get_device_name(i)
        mem = torch.cuda.get_device_properties(i).total_memory / 2**30
        fp8 = "fp8 matmul: yes" if (major, minor) >= (8, 9) else "fp8 matmul: no (needs sm_89+)"
        bf16 = "bf16: yes" if major >= 8 else "bf16: no (needs sm_80+)"
        lines.append(f"GPU {i}: {name}, compute capability {major}.{minor} (sm_{major}{minor}), "
                     f"{mem:.1f} GiB; {bf16}; {fp8}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f"cuDNN: {cudnn or 'not available'}")
    return lines


def extras_lines() -> list[str]:
    lines = []
    for module, what, hint in EXTRAS:
        if _has(module):
            lines.append(f"{module}: found ({what})")
        else:
            lines.append(f"{module}: missing - {what} unavailable; install: {hint}")
    return lines


def hook_lines() -> list[str]:
    """`doctor_lines()` of the library packages that define it (kernel paths, compile backends, fp8...)."""
    lines = []
    root = __package__.rsplit(".", 1)[0]
    for pkg in HOOK_PACKAGES:
        try:
            mod = importlib.import_module(f"{root}.{pkg}")
        except ImportError as e:
            lines.append(f"{pkg}: cannot be imported ({e})")
            continue
        fn = getattr(mod, "doctor_lines", None)
        if fn is None:
            continue
        try:
            lines += [line if str(line).lower().startswith(pkg) else f"{pkg}: {line}" for line in fn()]
        except Exception as e:  # a hook must never break the report; show what went wrong instead
            logger.debug("doctor_lines of %s raised", pkg, exc_info=True)
            lines.append(f"{pkg}: doctor check failed: {type(e).__name__}: {e}")
    return lines


def doctor_lines() -> list[str]:
    from ..core import paths
    from ..core.version import __version__

    lines = [f"twinflow {__version__} on Python {platform.python_version()} ({sys.platform})"]
    lines += torch_lines()
    lines += extras_lines()
    md = paths.models_dir()
    lines.append(f"models folder: {md.resolve()} ({'exists' if md.is_dir() else 'missing; set --models-dir or TWINFLOW_MODELS_DIR'})")
    lines.append(f"output folder: {paths.output_dir().resolve()}")
    lines += hook_lines()
    return lines
