"""CuPy runtime for the kernels: availability, module sources, compiled-module cache, and `launch`,
the one place a kernel is launched (tests replace it to check launchers without a GPU).

CuPy is imported lazily and only here. Outputs are always allocated by torch (the two caching
allocators do not share memory); CuPy only sees raw device pointers and torch's current stream.
"""
from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

# Extra NVRTC options our modules pass to cupy.RawModule. CuPy adds its own (--std=c++17, include
# dirs, -ftz=true, -arch=sm_XX, --device-as-default-execution-space); `fused.build` reproduces
# the full list for the CI compile check. No --use_fast_math: the norms use rsqrtf/expf/tanhf at
# their accurate defaults, and -ftz=true is already what CuPy compiles with.
NVRTC_OPTIONS: tuple = ()

CUPY_INSTALL_HINT = "install it with `pip install cupy-cuda13x` (the `cupy` extra of twinflow)"


@functools.lru_cache(maxsize=None)
def source(module: str) -> str:
    """The CUDA source of kernel module `module` (`fused/<module>.cu`) with common.cuh prepended."""
    common = (HERE / "common.cuh").read_text()
    body = (HERE / f"{module}.cu").read_text()
    return f"{common}\n// ---- {module}.cu ----\n{body}"


_avail_lock = threading.Lock()
_avail: Optional[tuple] = None


def unavailable_reason() -> Optional[str]:
    """Why the CuPy path cannot run in this process at all (None when it can). Cached."""
    global _avail
    with _avail_lock:
        if _avail is None:
            _avail = (_probe(),)
        return _avail[0]


def _probe() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        import cupy  # noqa: F401  (optional dependency, imported lazily)
    except ImportError:
        return f"cupy is not installed; {CUPY_INSTALL_HINT}"
    except Exception as exc:  # a broken CuPy install raises various errors on import
        return f"cupy failed to import ({type(exc).__name__}: {exc})"
    try:
        if not cupy.cuda.is_available():
            return "cupy sees no CUDA device (driver/toolkit mismatch?)"
    except Exception as exc:  # CUDARuntimeError and friends
        return f"cupy cannot use the GPU ({type(exc).__name__}: {exc})"
    return None


def reset_probe() -> None:
    """Forget the cached availability (tests, or after installing CuPy in a live session)."""
    global _avail
    with _avail_lock:
        _avail = None


_functions: dict = {}
_modules_lock = threading.Lock()


def _function(module: str, name_expressions: tuple, kernel: str, device_index: int):
    """The compiled kernel `kernel` (a name expression) of `module` on a device; compiled once.

    All instantiations of a module are compiled together (RawModule name_expressions), which is
    also how the CI compile check compiles them (fused/build.py). CuPy caches modules per
    device, so the lookup runs with that device current.
    """
    key = (module, device_index, kernel)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy

    with _modules_lock, cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=source(module), options=NVRTC_OPTIONS, name_expressions=name_expressions)
        fn = _functions[key] = mod.get_function(kernel)  # compiles on first use (disk-cached by CuPy)
    return fn


def _as_arg(a):
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if a is None:
        return np.uint64(0)  # a null pointer for optional inputs
    if isinstance(a, (np.int32, np.int64, np.uint64, np.float32)):
        return a
    raise TypeError(f"kernel argument {a!r}: pass tensors, None or numpy int32/int64/float32 scalars "
                    "(a Python int/float would be passed as 64-bit and corrupt the argument list)")


def launch(module: str, name_expressions: tuple, kernel: str, grid: tuple, block: tuple, args: tuple,
           device: torch.device) -> None:
    """THE launch boundary: run `kernel` of `module` on torch's current stream of `device`.

    `args` are tensors (passed as device pointers), None (a null pointer) and numpy scalars.
    """
    import cupy

    fn = _function(module, name_expressions, kernel, device.index)
    ts = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index):
        stream = cupy.cuda.ExternalStream(ts.cuda_stream, device.index)
        fn(grid, block, tuple(_as_arg(a) for a in args), stream=stream)
