"""Backends on one exported program: eager, inductor (JIT or AOTInductor package), tensorrt.

Every backend takes the `ExportedProgram` from `compiled.export` and returns a callable with the
same signature. `torch_tensorrt` is imported only inside `compile_tensorrt` / `refit_tensorrt`;
the keyword arguments we pass it are built by `trt_compile_kwargs`, gated on its version (the
contract tests check them against a recording stand-in for 2.11 and 2.14).
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.errors import UnsupportedError
from . import probe

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "inductor", "eager")


def resolve_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """(backend that will run, why). `auto` = tensorrt on CUDA when it is usable, else inductor, else eager."""
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "eager":
        return "eager", "eager requested"
    if requested in ("auto", "tensorrt"):
        why = probe.tensorrt_unavailable() if torch.device(device).type == "cuda" else "tensors are not on CUDA"
        if why is None:
            return "tensorrt", "tensorrt available"
        if requested == "tensorrt":
            return "eager", f"tensorrt unavailable: {why}"
        inductor_why = probe.inductor_unavailable()
        if inductor_why is None:
            return "inductor", f"auto: tensorrt unavailable ({why}); using inductor"
        return "eager", f"auto: tensorrt unavailable ({why}); inductor unavailable ({inductor_why})"
    why = probe.inductor_unavailable()
    if why is None:
        return "inductor", "inductor requested"
    return "eager", f"inductor unavailable: {why}"


# ----------------------------------------------------------------------------------------------
# eager / inductor
# ----------------------------------------------------------------------------------------------

def build_eager(ep):
    return ep.module()


def build_inductor(ep, options: Optional[dict] = None):
    """JIT `torch.compile(ep.module(), dynamic=True)` (the `aot=False` path): one graph for sizes >= 2.

    Known limit of this path: dynamo specialises axes of size 0/1 (batch 1, one latent frame), so the
    first call with such a size compiles a second graph. Size-oblivious sizes would avoid that, but
    combined with the exported module's `size <= max` asserts they collapse a [1, 2] batch range to the
    single value 2, and they break the (1, 1, 1, L) text-bias broadcast; so they are not used. The
    default inductor path is the AOTInductor package, which never re-traces (no guards, no recompiles)."""
    return build_inductor_module(ep.module(), options)


def build_inductor_module(gm, options: Optional[dict] = None):
    """`torch.compile` of an unlifted exported module (`ep.module()`); see `build_inductor`."""
    return torch.compile(gm, backend="inductor", dynamic=True, fullgraph=True, options=dict(options or {}) or None)


def module_state(module) -> dict:
    """name -> tensor of a module's parameters and buffers (persistent or not), as the exported program names them."""
    out = dict(module.named_parameters())
    out.update(dict(module.named_buffers()))
    return out


def swap_module_tensors(gm, state: dict) -> int:
    """Point the parameters/buffers of `gm` (an `ep.module()`) named in `state` at new tensors (no copy into the
    old ones, which may be shared with the caller's model). Same shapes/dtypes, so a module compiled with
    `torch.compile` reads them without recompiling. Returns how many were replaced."""
    n = 0
    for name, new in state.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(prefix) if prefix else gm
        except AttributeError:
            continue
        old = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        if old is None:
            continue
        if old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
            raise ValueError(f"new weight {name} is {tuple(new.shape)} {new.dtype} on {new.device}; the compiled "
                             f"graph has {tuple(old.shape)} {old.dtype} on {old.device}")
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(new.detach(), requires_grad=False)
        else:
            owner._buffers[leaf] = new.detach()
        n += 1
    return n


# Whether the user chose Inductor's cache dir (read at import, before anything compiled: Inductor
# writes the variable itself on first use).
_USER_INDUCTOR_DIR = "TORCHINDUCTOR_CACHE_DIR" in os.environ


def use_inductor_cache_dir(path: Path) -> None:
    """Point Inductor's own cache (compiled C++/Triton kernels, FX graphs) inside TwinFlow's cache, so a
    later process reuses the compiled kernels, not only the graphs; a user-set TORCHINDUCTOR_CACHE_DIR
    wins. Process-wide (Inductor reads the variable on every lookup)."""
    if _USER_INDUCTOR_DIR:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(path.resolve()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
        logger.info("inductor: kernel cache in %s (set TORCHINDUCTOR_CACHE_DIR to choose another)", path)


def save_inductor_artifacts(path: Path) -> bool:
    """Write Inductor's portable cache artifacts (FX graph / AOTAutograd caches) of this process."""
    res = torch.compiler.save_cache_artifacts()
    if res is None:
        return False
    Path(path).write_bytes(res[0])
    return True


def load_inductor_artifacts(path: Path) -> None:
    torch.compiler.load_cache_artifacts(Path(path).read_bytes())


def build_aoti_package(ep, package_path: Path, options: Optional[dict] = None) -> Path:
    """AOTInductor package **without weights**: new weights (LoRA, another checkpoint of the same shape)
    load with `load_aoti(...)` / `aoti_swap_constants(...)` without recompiling.

    `package_constants_in_so=False` keeps the parameters out of the package; `use_runtime_constant_folding`
    keeps *derived* constants out too: by default Inductor folds weight-only subexpressions (a conv
    weight sliced per tap, a bias folded into an addmm) at build time into baked tensors, which new
    weights would never reach (measured on the Wan VAE decode step: cos 0.977 after a swap). With it, the
    folded constants (`_FOLDED_CONST_*`) are recomputed from the loaded weights on the first call."""
    from torch._inductor import aoti_compile_and_package

    configs = {"aot_inductor.package_constants_in_so": False, "aot_inductor.use_runtime_constant_folding": True,
               **(options or {})}
    out = aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=configs)
    return Path(out)


FOLDED = "_FOLDED_CONST_"  # constants the package computes itself from the loaded ones


def _load_constants(runner, state: dict, what: str) -> None:
    fqns = [n for n in runner.get_constant_fqns() if not n.startswith(FOLDED)]
    missing = [n for n in fqns if n not in state]
    if missing:
        raise ValueError(f"{what} lack constants the compiled graph needs: {missing[:5]}")
    runner.load_constants({n: state[n] for n in fqns}, check_full_update=False, user_managed=True)


def load_aoti(package_path: Path, state: dict):
    """Load a weight-free AOTInductor package and give it `state` (name -> tensor) as its constants."""
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(package_path))
    _load_constants(runner, state, f"the weights given to AOTInductor package {package_path}")
    return runner


def aoti_swap_constants(runner, state: dict) -> None:
    """New weights into a loaded package (same names/shapes): the compiled code is kept, nothing is rebuilt;
    folded constants are recomputed on the next call."""
    _load_constants(runner, state, "the new weights")


def exported_state(ep) -> dict:
    """name -> tensor of everything an exported program lifts (parameters, buffers, constants)."""
    out = dict(ep.state_dict)
    out.update(getattr(ep, "constants", {}) or {})
    return out


# ----------------------------------------------------------------------------------------------
# tensorrt
# ----------------------------------------------------------------------------------------------

MIN_TRT = (2, 9)


def _version_tuple(v: str) -> tuple[int, int]:
    parts = str(v).split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def trt_compile_kwargs(version: str, arg_inputs: Sequence, dtype: torch.dtype,
                       options: Optional[dict] = None) -> dict:
    """The keyword arguments of `torch_tensorrt.dynamo.compile(ep, **kw)` for this torch-tensorrt version.

    - precision comes from the dtype the graph was exported in (explicit/strong typing): 2.10-2.13
      take `use_explicit_typing=True`; 2.14 removed both `use_explicit_typing` and
      `enabled_precisions`; 2.9 predates explicit typing by default, so it gets `enabled_precisions`.
    - `truncate_double=True`: the time embedding computes its sinusoid in float64.
    - `immutable_weights=False`: engines stay refittable (LoRA / new weights -> refit, not rebuild).
    - torch-tensorrt's own engine cache hashes only op names and misses node arguments and the
      TensorRT/GPU version, so it is off; our cache keys the saved artifact instead."""
    ver = _version_tuple(version)
    if ver < MIN_TRT:
        raise UnsupportedError(f"torch-tensorrt {version} is too old; TwinFlow needs >= {MIN_TRT[0]}.{MIN_TRT[1]} "
                               f"(immutable_weights / arg_inputs API)")
    opts = dict(options or {})
    kw = {
        "arg_inputs": list(arg_inputs),
        "truncate_double": True,
        "immutable_weights": False,
        "min_block_size": int(opts.pop("min_block_size", 5)),
        "require_full_compilation": bool(opts.pop("require_full_compilation", False)),
        "cache_built_engines": False,
        "reuse_cached_engines": False,
        "offload_module_to_cpu": bool(opts.pop("offload_module_to_cpu", True)),
    }
    if "optimization_level" in opts:
        kw["optimization_level"] = int(opts.pop("optimization_level"))
    if ver < (2, 10):
        kw["enabled_precisions"] = {dtype}
    elif ver < (2, 14):
        kw["use_explicit_typing"] = True
    if "enabled_precisions" in opts and ver >= (2, 14):
        raise ValueError("enabled_precisions was removed in torch-tensorrt 2.14; cast the model to the dtype "
                         "you want before compiling (the dtype widget) instead")
    if opts:
        raise ValueError(f"unknown tensorrt options {sorted(opts)}; known: min_block_size, require_full_compilation, "
                         f"offload_module_to_cpu, optimization_level")
    return kw


def trt_inputs(trt, shapes: Sequence[tuple], dtypes: Sequence[torch.dtype]):
    """`torch_tensorrt.Input(min_shape, opt_shape, max_shape, dtype)` per graph input; shapes = (min, opt, max)."""
    out = []
    for (lo, opt, hi), dt in zip(shapes, dtypes):
        if tuple(lo) == tuple(hi):
            out.append(trt.Input(shape=tuple(opt), dtype=dt))
        else:
            out.append(trt.Input(min_shape=tuple(lo), opt_shape=tuple(opt), max_shape=tuple(hi), dtype=dt))
    return out


def _import_trt(importer=importlib.import_module):
    return importer("torch_tensorrt")


def compile_tensorrt(ep, shapes: Sequence[tuple], dtypes: Sequence[torch.dtype], dtype: torch.dtype,
                     options: Optional[dict] = None, importer=importlib.import_module):
    """Build TensorRT engines for an exported program over the (min, opt, max) input shapes."""
    trt = _import_trt(importer)
    version = getattr(trt, "__version__", None) or probe.tensorrt_version() or "0.0"
    kw = trt_compile_kwargs(version, trt_inputs(trt, shapes, dtypes), dtype, options)
    logger.info("tensorrt %s: dynamo.compile with %s", version, sorted(kw))
    return trt.dynamo.compile(ep, **kw)


def save_tensorrt(trt_gm, path: Path, example_args, importer=importlib.import_module) -> None:
    trt = _import_trt(importer)
    trt.save(trt_gm, str(path), output_format="exported_program", arg_inputs=list(example_args), pickle_protocol=4)


def load_tensorrt(path: Path, importer=importlib.import_module):
    trt = _import_trt(importer)
    return trt.load(str(path)).module()


def refit_tensorrt(trt_gm, new_ep, importer=importlib.import_module):
    """New weights (LoRA applied, another checkpoint of the same architecture) into built engines,
    without rebuilding. `use_weight_map_cache` exists up to 2.13 and is left at its default."""
    trt = _import_trt(importer)
    return trt.dynamo.refit_module_weights(trt_gm, new_ep, in_place=False)
