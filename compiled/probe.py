"""Feature probe: can the TensorRT / Inductor backends run here, and if not, why (never raises).

`torch_tensorrt` is never imported at module import time: importing it loads libnvinfer and
libtorchtrt.so, which fails (with a long traceback) on machines without TensorRT or CUDA. The probe
first reads installed package metadata, then checks the CUDA device, then imports lazily.
"""
from __future__ import annotations

import ctypes.util
import importlib
import importlib.metadata as md
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_cache: dict = {}


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution (without importing it), or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _major_minor(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def tensorrt_version() -> Optional[str]:
    return package_version("torch-tensorrt") or package_version("torch_tensorrt")


def tensorrt_unavailable(*, importer=importlib.import_module, force: bool = False) -> Optional[str]:
    """None if the tensorrt backend can run, else a one-line reason.

    Checks, in order: the torch_tensorrt package, its torch pin (X.Y must equal torch's X.Y),
    a CUDA build of torch and a visible device, libnvinfer, and finally the import itself."""
    if not force and "trt" in _cache:
        return _cache["trt"]
    reason = _tensorrt_reason(importer)
    _cache["trt"] = reason
    return reason


def _tensorrt_reason(importer) -> Optional[str]:
    ver = tensorrt_version()
    if ver is None:
        return ("torch_tensorrt not installed (pip install torch-tensorrt==<your torch X.Y>; it needs the "
                "TensorRT libraries from NVIDIA's package index)")
    try:
        if _major_minor(ver) != _major_minor(torch.__version__):
            return (f"version mismatch: torch-tensorrt {ver} is built for torch {'.'.join(map(str, _major_minor(ver)))}"
                    f".x, this is torch {torch.__version__}; install torch-tensorrt {_major_minor(torch.__version__)[0]}."
                    f"{_major_minor(torch.__version__)[1]}.*")
    except ValueError:
        return f"cannot parse the torch-tensorrt version {ver!r}"
    if torch.version.cuda is None:
        return f"no CUDA device: this torch build ({torch.__version__}) is CPU-only"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    if ctypes.util.find_library("nvinfer") is None and package_version("tensorrt-cu13-libs") is None \
            and package_version("tensorrt-cu12-libs") is None and package_version("tensorrt_libs") is None:
        return "libnvinfer not found (TensorRT libraries are not installed or not on the library path)"
    try:
        importer("torch_tensorrt")
    except Exception as exc:  # the import runs native loaders that raise plain Exception subclasses
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "nvinfer" in text:
            return f"libnvinfer not found ({text})"
        return f"import torch_tensorrt failed: {type(exc).__name__}: {text}"
    return None


def inductor_unavailable() -> Optional[str]:
    """None if torch.compile/Inductor can build here, else why (a C++ compiler is needed on CPU)."""
    if "inductor" in _cache:
        return _cache["inductor"]
    import shutil

    reason = None
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        reason = "no C++ compiler on PATH (Inductor's CPU backend needs g++ or clang++)"
    elif torch.cuda.is_available() and package_version("triton") is None \
            and package_version("pytorch-triton") is None:
        reason = "triton not installed (Inductor's CUDA backend needs it)"
    _cache["inductor"] = reason
    return reason


def reset() -> None:
    """Forget cached probe results (tests, or after installing something)."""
    _cache.clear()


def doctor_lines() -> list[str]:
    lines = []
    ir = inductor_unavailable()
    lines.append("inductor " + ("available" if ir is None else f"unavailable ({ir})"))
    tr = tensorrt_unavailable()
    lines.append("tensorrt (experimental, unverified) " + ("available" if tr is None else f"unavailable ({tr})"))
    return lines
