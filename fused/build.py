"""Compile every kernel instantiation without a GPU: NVRTC with the options CuPy uses, and nvcc's
ptxas with `-v` for registers, spills and shared memory. CI runs these checks (tests/test_kernels_build.py);
`python -m twinflow.fused.build` prints the report.

Why both: CuPy compiles with NVRTC, which has no host C++ headers and differs from nvcc in what it
accepts (`#include <cstdint>` passes nvcc, fails NVRTC); only ptxas reports spills and registers.

CuPy's option list (read from cupy 14.2 `_core/core.pyx::assemble_cupy_compiler_options` and
`cuda/compiler.py::_compile_with_cache_cuda` / `_compile_using_nvrtc_no_warning`) for
`RawModule(code=..., options=opts, name_expressions=...)` is, in order:
  -I<cupy>/_cccl/cub -I<cupy>/_cccl/thrust -I<cupy>/_cccl/libcudacxx, *opts, --std=c++17 (when opts
  name no standard), -I<cupy/_core/include>, -I<CUDA include dir>, -ftz=true, -arch=sm_<cc>,
  --device-as-default-execution-space  (plus --pch only with CUPY_NVRTC_USE_PCH=1).
With CuPy importable, `cupy_nvrtc_options` asks CuPy itself for the first part; without it, it
reproduces the list minus CuPy's own include dirs (our sources include nothing from them).
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import _runtime

MODULES = ("norm", "vae_norm", "rope", "int8")
ARCH = "90"  # H100: CuPy passes -arch=sm_90 there
# Kernel launch limits the ptxas report is checked against.
MAX_STATIC_SMEM = 48 * 1024
REGS_PER_SM = 65536


def instances() -> dict:
    """{module: (name expression, ...)} for every kernel instantiation the launchers can pick."""
    from . import int8, norm, rope, vae_norm

    return {m.MODULE: tuple(m.INSTANCES) for m in (norm, vae_norm, rope, int8)}


def max_block(expr: str) -> int:
    """Largest block the launchers use for a kernel (row kernels up to 1024, elementwise 256)."""
    from . import _plan

    row = expr.split("<")[0] in ("ln_modulate_kernel", "gated_residual_ln_modulate_kernel",
                                 "rms_norm_kernel", "quantize_int8_kernel")
    return _plan.MAX_BLOCK if row else _plan.ELEMWISE_BLOCK


# ---------------------------------------------------------------------------------------------
# Finding the toolkit
# ---------------------------------------------------------------------------------------------

def cuda_home() -> Optional[Path]:
    """A CUDA toolkit with cuda_fp16.h: $CUDA_PATH, $CUDA_HOME, nvcc's parent, /usr/local/cuda."""
    cands = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c)
    return None


def find_nvcc() -> Optional[str]:
    home = cuda_home()
    if home and (home / "bin" / "nvcc").is_file():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_nvrtc() -> Optional[str]:
    """libnvrtc: the `nvidia-cuda-nvrtc` wheel (nvidia/cu13/lib), then the toolkit, then the loader."""
    cands = []
    for p in sys.path:
        cands += sorted(glob.glob(os.path.join(p, "nvidia", "cu*", "lib", "libnvrtc.so.*")))
        cands += sorted(glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.*")))
    home = cuda_home()
    if home:
        cands += sorted(glob.glob(str(home / "lib64" / "libnvrtc.so*")))
    cands = [c for c in cands if "alt" not in os.path.basename(c) and "builtins" not in os.path.basename(c)]
    if cands:
        return cands[0]
    import ctypes.util

    return ctypes.util.find_library("nvrtc")


# ---------------------------------------------------------------------------------------------
# NVRTC through ctypes (works without a GPU or driver)
# ---------------------------------------------------------------------------------------------

class CompileError(RuntimeError):
    """A kernel source that a compiler rejected; the message holds the compiler log."""


@dataclass
class NvrtcResult:
    cubin: bytes
    lowered: dict = field(default_factory=dict)  # name expression -> mangled name
    log: str = ""


class Nvrtc:
    """The few NVRTC calls CuPy's RawModule makes: create, add name expressions, compile, lowered
    names, cubin, log."""

    def __init__(self, path: str):
        # libnvrtc dlopens libnvrtc-builtins by soname; a wheel install is not on the loader path,
        # so load it first, globally, from the same folder.
        for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
            if "alt" not in os.path.basename(b):
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                break
        self.lib = ctypes.CDLL(path)
        self.path = path

    def version(self) -> tuple:
        a, b = ctypes.c_int(), ctypes.c_int()
        self._ok(self.lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)), "nvrtcVersion")
        return a.value, b.value

    def _ok(self, rc: int, what: str, prog=None):
        if rc != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            msg = self.lib.nvrtcGetErrorString(rc).decode()
            log = self._log(prog) if prog is not None else ""
            raise CompileError(f"{what} failed: {msg}\n{log}")

    def _log(self, prog) -> str:
        n = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        self.lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    def compile(self, src: str, name: str, options, name_expressions=()) -> NvrtcResult:
        prog = ctypes.c_void_p()
        self._ok(self.lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
                 "nvrtcCreateProgram")
        try:
            for e in name_expressions:
                self._ok(self.lib.nvrtcAddNameExpression(prog, e.encode()), f"nvrtcAddNameExpression({e})")
            opts = [o.encode() for o in options]
            arr = (ctypes.c_char_p * len(opts))(*opts)
            self._ok(self.lib.nvrtcCompileProgram(prog, len(opts), arr), f"nvrtcCompileProgram({name})", prog)
            lowered = {}
            for e in name_expressions:
                p = ctypes.c_char_p()
                self._ok(self.lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(p)),
                         f"nvrtcGetLoweredName({e})")
                lowered[e] = p.value.decode()
            n = ctypes.c_size_t()
            self._ok(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(n)), "nvrtcGetCUBINSize")
            buf = ctypes.create_string_buffer(n.value)
            self._ok(self.lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
            return NvrtcResult(buf.raw, lowered, self._log(prog))
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cupy_nvrtc_options(arch: str = ARCH, cuda_include: Optional[str] = None, use_cupy: bool = True) -> tuple:
    """The NVRTC option tuple CuPy passes for our RawModules on a GPU of compute capability `arch`.

    With CuPy importable (and `use_cupy`), CuPy assembles the front part itself; otherwise it is
    reproduced without CuPy's own include dirs, which our sources do not use.
    """
    assemble = None
    if use_cupy:
        try:
            from cupy._core.core import assemble_cupy_compiler_options as assemble  # optional dependency
        except ImportError:
            assemble = None
    if assemble is not None:
        opts = tuple(assemble(tuple(_runtime.NVRTC_OPTIONS)))
    else:
        if cuda_include is None:
            home = cuda_home()
            if home is None:
                raise FileNotFoundError("no CUDA toolkit headers found (set CUDA_PATH to the toolkit "
                                        "that holds include/cuda_fp16.h)")
            cuda_include = str(home / "include")
        opts = tuple(_runtime.NVRTC_OPTIONS)
        if not any("-std=" in o for o in opts):
            opts += ("--std=c++17",)
        opts += (f"-I{cuda_include}",)
    return opts + ("-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")


def nvrtc_compile_all(nvrtc: Nvrtc, arch: str = ARCH) -> dict:
    """{module: NvrtcResult}, each module compiled once with all its name expressions, as RawModule does."""
    opts = cupy_nvrtc_options(arch)
    return {m: nvrtc.compile(_runtime.source(m), f"{m}.cu", opts, exprs) for m, exprs in instances().items()}


# ---------------------------------------------------------------------------------------------
# nvcc + ptxas -v
# ---------------------------------------------------------------------------------------------

@dataclass
class PtxasEntry:
    registers: int = -1
    smem: int = 0
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict:
    """{mangled entry name: PtxasEntry} from `ptxas -v` output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), PtxasEntry())
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur.registers = int(m.group(1))
            s = _SMEM.search(line)
            cur.smem = int(s.group(1)) if s else 0
    return out


def nvcc_translation_unit() -> str:
    """All module sources in one translation unit, with each instantiation referenced from host
    code (that is what makes nvcc instantiate a __global__ template)."""
    parts = []
    for m, exprs in instances().items():
        parts.append(_runtime.source(m))
        refs = ",\n    ".join(f"(void*)&{e}" for e in exprs)
        parts.append(f"__attribute__((unused)) static void* const twinflow_{m}_instances[] = {{\n    {refs}\n}};\n")
    return "\n".join(parts)


def ptxas_report(nvcc: Optional[str] = None, arch: str = ARCH, timeout: float = 600) -> tuple:
    """Compile every instantiation with one `nvcc -cubin -Xptxas -v` call: ({mangled: PtxasEntry}, log)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (install the CUDA toolkit or set CUDA_PATH)")
    with tempfile.TemporaryDirectory(prefix="twinflow-ptxas-") as d:
        cu = Path(d) / "twinflow_kernels.cu"
        cu.write_text(nvcc_translation_unit())
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-std=c++17", "-ftz=true", "-Xptxas", "-v",
               "-o", str(Path(d) / "twinflow_kernels.cubin"), str(cu)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise CompileError(f"{' '.join(cmd)} failed ({r.returncode}):\n{log}")
    return parse_ptxas(log), log


def check_entries(entries: dict, lowered: dict) -> list:
    """Problems with the ptxas report: [] when every instantiation compiled with no stack, no spills,
    shared memory within the static limit and registers that fit the largest block launched."""
    problems = []
    for expr, mangled in lowered.items():
        e = entries.get(mangled)
        if e is None:
            problems.append(f"{expr}: not in the ptxas report")
            continue
        if e.spill_stores or e.spill_loads:
            problems.append(f"{expr}: spills ({e.spill_stores} B stores, {e.spill_loads} B loads)")
        if e.stack:
            problems.append(f"{expr}: {e.stack} B stack frame (local memory)")
        if e.smem > MAX_STATIC_SMEM:
            problems.append(f"{expr}: {e.smem} B static shared memory > {MAX_STATIC_SMEM}")
        if e.registers < 0 or e.registers * max_block(expr) > REGS_PER_SM:
            problems.append(f"{expr}: {e.registers} registers x {max_block(expr)} threads > {REGS_PER_SM}")
    return problems


def main() -> int:  # pragma: no cover - a developer tool around the functions tested above
    lib = find_nvrtc()
    if lib is None:
        print("libnvrtc not found: pip install 'nvidia-cuda-nvrtc==13.0.*'")
        return 1
    nv = Nvrtc(lib)
    print(f"NVRTC {nv.version()} at {lib}; options: {' '.join(cupy_nvrtc_options())}")
    res = nvrtc_compile_all(nv)
    lowered = {e: n for r in res.values() for e, n in r.lowered.items()}
    print(f"NVRTC: {len(lowered)} instantiations compiled")
    entries, _ = ptxas_report()
    for expr, mangled in lowered.items():
        e = entries.get(mangled, PtxasEntry())
        print(f"  {expr:60s} regs={e.registers:3d} smem={e.smem:5d} stack={e.stack} "
              f"spill={e.spill_stores}/{e.spill_loads}")
    problems = check_entries(entries, lowered)
    print("\n".join(problems) or "ptxas: no problems")
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
