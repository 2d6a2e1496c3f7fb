"""The parts of the GPU acceptance run (tools/gpu_accept.py), one function each, run in a child process.

`part_<name>(rec)` measures on the GPU and writes figures as it goes through `rec` (a gpu_accept.Recorder);
before each case it asks `rec.fits(seconds, what)` and records what it leaves out. `dry_imports(rec)` is the
CPU dry run: it imports every module the parts use and checks the torch APIs they rely on.

TwinFlow is imported as `twinflow` from the working tree (the parent puts a symlink folder on PYTHONPATH).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The fused CuPy kernels' package, named in this ONE place (the GPU parts and the dry run follow from it).
FUSED = "fused"
FUSED_BENCH = f"benchmarks.{FUSED}"  # the fused kernels' benchmark module: GB/s, % of HBM peak, x eager
# OPTIONAL (issue 18, being built in parallel): step caching. The part runs when this module exists, through
# the benchmark module below (`--device cuda --json FILE`); adapt the two names when that work lands.
STEP_CACHE_MODULE = "sampling.step_cache"
STEP_CACHE_BENCH = "benchmarks.step_cache"
MARKERS = ("cuda", "cupy")
# One Wan 480p clip is 21 x 60 x 104 latents (32,760 tokens); the DiT parts use 5 latent frames (7,800 tokens)
# so that eager, diffusers, the dual-branch steps and a compile all fit in the 5-minute budget.
DIT_LATENT = (1, 16, 5, 60, 104)
DIT_TEXT_TOKENS = 64
FUSED_DIMS = (1536, 5120)
FUSED_TOKENS = 32760
VAE_CASES = ("dec480p5bf16", "dec480p5")


def _tf(name: str):
    return importlib.import_module(f"twinflow.{name}")


# ----------------------------------------------------------------------------------------------
# API gates: what the GPU code paths call, checked on whatever torch this process has
# ----------------------------------------------------------------------------------------------

def _params(fn) -> set:
    return set(inspect.signature(fn).parameters)


# The GPU image's torch is 2.11; the CPU machines (CI) have 2.13. `gates()` runs on whatever torch is there: in the
# dry run on 2.13, on the GPU host on 2.11 as the env part, the first part, so a 2.11 mismatch shows before any
# part needs the API. Where 2.11 could not be run, its API was checked by READING PyTorch's documentation and
# sources (docs/code search, December 2026); what was found, per gate, is below and printed by the dry run.
GPU_HOST_TORCH = "2.11"
TORCH_2_11_BY_READING = {
    "_scaled_mm signature": "the current C++ API docs and torch 2.13 give the same aten schema (self, mat2, scale_a, "
                            "scale_b, bias?, scale_result?, out_dtype?, use_fast_accum); 2.10 added _scaled_mm_v2 "
                            "and F.scaled_mm beside it (torchao moved to F.scaled_mm on 2.10 nightlies), not in "
                            "its place: _scaled_mm is still there on 2.13",
    "_int_mm": "torch._int_mm since 2.2, present on 2.13",
    "AOTInductor packaging API": "aoti_compile_and_package(ep, *, package_path=, inductor_configs=) and aoti_load_package "
                                 "since 2.6 (2.6 release notes: 'new packaging APIs for AOTInductor'); "
                                 "AOTICompiledModel.load_constants(user_managed=) NOT dated by reading (older "
                                 "sources have load_constants(map, *, check_full_update) only): the env part checks it "
                                 "on the host first",
    "torch.library registration": "torch.library.custom_op(name, fn, /, *, mutates_args, device_types, schema) and "
                                  ".register_fake since 2.4/2.5, unchanged on 2.13",
    "torch.export / compile cache API": "export(strict=, dynamic_shapes=) since 2.3, "
                                        "torch.compiler.save/load_cache_artifacts since 2.7",
    "CUDA timing / graph / dynamo counters API": "long-standing (torch.cuda.graph since 1.10)",
}


def torch_version_is_host() -> bool:
    import torch

    return torch.__version__.startswith(GPU_HOST_TORCH + ".")


def gates() -> list:
    """(name, ok, detail) for every version-dependent torch API a GPU path uses."""
    import torch

    out = []

    def gate(name, check):
        try:
            detail = check()
            out.append((name, True, detail))
        except Exception as exc:  # each gate reports its own failure; the run goes on
            out.append((name, False, f"{type(exc).__name__}: {exc}"))

    def scaled_mm():
        schema = torch.ops.aten._scaled_mm.default._schema
        names = [a.name for a in schema.arguments]
        need = ["self", "mat2", "scale_a", "scale_b", "out_dtype"]
        missing = [n for n in need if n not in names]
        if missing or names[:2] != ["self", "mat2"]:
            raise RuntimeError(f"aten::_scaled_mm lacks {missing} (schema: {schema}); quant/primitives.py and "
                               "benchmarks/quant.py call it as _scaled_mm(a, b, scale_a=, scale_b=, out_dtype=)")
        torch.float8_e4m3fn  # noqa: B018  (the fp8 dtype the formats store)
        return f"aten::_scaled_mm({', '.join(names)})"

    def int_mm():
        if not hasattr(torch, "_int_mm"):
            raise RuntimeError("torch._int_mm is missing (int8_dynamic W8A8)")
        return "torch._int_mm"

    def aoti():
        from torch._inductor import aoti_compile_and_package, aoti_load_package
        from torch._inductor import config as ic
        from torch._inductor.package.package import AOTICompiledModel

        p = _params(aoti_compile_and_package)
        if not {"package_path", "inductor_configs"} <= p:
            raise RuntimeError(f"aoti_compile_and_package{inspect.signature(aoti_compile_and_package)} lacks "
                               "package_path / inductor_configs (compiled/backends.build_aoti_package)")
        for key in ("package_constants_in_so", "use_runtime_constant_folding"):
            if not hasattr(ic.aot_inductor, key):
                raise RuntimeError(f"inductor config aot_inductor.{key} is missing (weight-free packages)")
        for meth in ("get_constant_fqns", "load_constants"):
            if not hasattr(AOTICompiledModel, meth):
                raise RuntimeError(f"AOTICompiledModel.{meth} is missing (loading weights into a package)")
        lp = _params(AOTICompiledModel.load_constants)
        if not {"check_full_update", "user_managed"} <= lp:
            raise RuntimeError(f"AOTICompiledModel.load_constants{inspect.signature(AOTICompiledModel.load_constants)}"
                               " lacks check_full_update / user_managed")
        _params(aoti_load_package)
        return "aoti_compile_and_package(package_path=, inductor_configs=), aoti_load_package, load_constants(user_managed=)"

    def library():
        p = _params(torch.library.custom_op)
        if "mutates_args" not in p:
            raise RuntimeError(f"torch.library.custom_op{inspect.signature(torch.library.custom_op)} lacks mutates_args")
        ops = _tf(f"{FUSED}.ops")
        names = re.findall(r'^_register\("(\w+)"', Path(ops.__file__).read_text(), re.M)
        missing = [n for n in names if not hasattr(torch.ops.twinflow, n)]
        if missing or not names:
            raise RuntimeError(f"torch.ops.twinflow lacks {missing or 'every op'} after importing {FUSED}.ops")
        return f"{len(names)} custom ops registered with register_fake: {', '.join(names)}"

    def export():
        p = _params(torch.export.export)
        if not {"dynamic_shapes", "strict"} <= p:
            raise RuntimeError(f"torch.export.export{inspect.signature(torch.export.export)} lacks dynamic_shapes/strict")
        torch.export.Dim  # noqa: B018
        for fn in ("save_cache_artifacts", "load_cache_artifacts"):
            getattr(torch.compiler, fn)
        return "torch.export.export(strict=, dynamic_shapes=), Dim, torch.compiler.save/load_cache_artifacts"

    def cuda_api():
        for name in ("Event", "CUDAGraph", "graph", "Stream", "reset_peak_memory_stats", "max_memory_allocated"):
            getattr(torch.cuda, name)
        from torch._dynamo.utils import counters  # recompile counting

        counters["stats"]  # noqa: B018
        return "torch.cuda Event/CUDAGraph/graph/Stream/peak memory; torch._dynamo.utils.counters"

    for name, check in (("_scaled_mm signature", scaled_mm), ("_int_mm", int_mm), ("AOTInductor packaging API", aoti),
                        ("torch.library registration", library), ("torch.export / compile cache API", export),
                        ("CUDA timing / graph / dynamo counters API", cuda_api)):
        gate(name, check)
    return out


# ----------------------------------------------------------------------------------------------
# The test files that carry the cuda/cupy markers
# ----------------------------------------------------------------------------------------------

def marked_test_files() -> list:
    """tests/*.py that mark a test (or the module) cuda or cupy: what `-m 'cuda or cupy'` can select."""
    pat = re.compile(r"pytest\.mark\.(%s)\b" % "|".join(MARKERS))
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if pat.search(p.read_text()))


def _pytest_cmd(files, extra) -> list:
    # -P: the repository root stays off sys.path (TwinFlow is imported as the installed/shimmed package)
    return [sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-m", " or ".join(MARKERS), *extra, *files]


RESULT_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_pytest(text: str) -> dict:
    res = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "failed_tests": [], "skip_reasons": []}
    key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors", "XFAIL": "xfailed",
           "XPASS": "passed"}
    for line in text.splitlines():
        m = RESULT_LINE.match(line)
        if m:
            res[key[m.group(2)]] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                res["failed_tests"].append(m.group(1))
        elif line.startswith("SKIPPED ["):
            res["skip_reasons"].append(line[:200])
        elif line.startswith("ERROR ") and "::" not in line.split(" - ")[0]:
            res["errors"] += 1  # a collection error (a test's own error is counted from its result line)
            res["failed_tests"].append(line[:200])
    res["skip_reasons"] = sorted(set(res["skip_reasons"]))[:10]
    return res


def part_tests(rec) -> int:
    files = marked_test_files()
    rec.note(f"files: {', '.join(files)}")
    log = Path(tempfile.mkdtemp()) / "pytest.log"
    cmd = _pytest_cmd(files, ["-v", "-rs", "--timeout=60"])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            rc = proc.wait(timeout=max(1.0, rec.left()))
            incomplete = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc, incomplete = None, True
    text = log.read_text(errors="replace")
    res = parse_pytest(text)
    summary = next((line for line in reversed(text.splitlines()) if line.startswith("=")), "")
    rec.figure("pytest", exit_status=rc, incomplete=incomplete, summary=summary.strip("= "), **res)
    if incomplete:
        rec.skip("the rest of the cuda/cupy tests", "stopped at the part's cap; the counts cover the tests that finished")
    sys.stdout.write(text[-6000:])
    return 0 if rc in (0, 5) else 1


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------

def _cuda_or_skip(rec, what) -> bool:
    import torch

    if not torch.cuda.is_available():
        rec.skip(what, "torch sees no CUDA device")
        return False
    return True


def _copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """A device-to-device copy (bytes read + written): the measured ceiling beside the datasheet peak."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def _peak_gbps(bench, dev: int) -> tuple:
    """(datasheet HBM bandwidth in GB/s, where it came from). The fused benchmark reads CuPy's device properties;
    CUDA 13 dropped `memoryClockRate` from cudaDeviceProp, so where CuPy's dict lacks it, torch's properties
    (memory_clock_rate in kHz, memory_bus_width in bits, which torch 2.11 has) give the same formula."""
    try:
        return bench._peak_bytes_per_s(dev) / 1e9, "cupy device properties"
    except (KeyError, AttributeError):
        import torch

        p = torch.cuda.get_device_properties(dev)
        clock, width = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
        return 2.0 * clock * 1e3 * width / 8 / 1e9, "torch device properties"


def part_fused(rec) -> int:
    import torch

    if not _cuda_or_skip(rec, "fused kernels"):
        return 1
    bench = _tf(FUSED_BENCH)
    reason = _tf(f"{FUSED}._runtime").unavailable_reason()
    if reason:
        rec.skip("fused kernels", f"CuPy path unavailable: {reason}")
        return 1
    dev = torch.cuda.current_device()
    peak, source = _peak_gbps(bench, dev)
    copy = _copy_bandwidth_gbps()
    if peak <= 0:
        rec.skip("% of HBM peak", f"the device reports no memory clock / bus width ({source}); GB/s and % of the "
                 "measured copy bandwidth are still recorded")
        peak = None
    rec.figure("bandwidth", datasheet_peak_GBps=peak, peak_from=source, measured_copy_GBps=copy,
               copy_pct_of_peak=100 * copy / peak if peak else None)
    rec.skip("torch.compile column of the fused benchmark", "not a target; one compile per op and width would take "
             "most of the part's cap (run `python -m twinflow.%s` for it)" % FUSED_BENCH)
    with torch.no_grad():
        for d in FUSED_DIMS:
            if not rec.fits(6, f"fused kernels at D={d}"):
                continue
            cases = bench._cases(d, FUSED_TOKENS)
            for op, kern, ref, a, nbytes in cases:
                if not rec.fits(1.5, f"D={d} {op}"):
                    continue
                tk = bench._time_ms(lambda: kern(*a), 5, 30)
                te = bench._time_ms(lambda: ref(*a), 5, 30)
                gbs = nbytes / (tk * 1e-3) / 1e9
                rec.figure("fused_op", D=d, op=op, kernel_ms=tk, eager_ms=te, kernel_GBps=gbs, peak_GBps=peak,
                           pct_peak=100 * gbs / peak if peak else None, pct_measured_copy=100 * gbs / copy,
                           x_eager=te / tk)
            del cases
            torch.cuda.empty_cache()
        if rec.fits(12, "one Wan DiT block (D=1536) with the kernels on vs off"):
            b = bench._block(1536, FUSED_TOKENS, 2, 5)
            rec.figure("fused_block", D=1536, torch_ms=b["torch"], cupy_ms=b["cupy"], speedup=b["torch"] / b["cupy"])
    return 0


def part_quant(rec) -> int:
    if not _cuda_or_skip(rec, "W8A8 GEMMs"):
        return 1
    q = _tf("benchmarks.quant")
    for shape in q.GPU_SHAPES:
        if not rec.fits(2, f"GEMMs at {shape[0]}"):
            continue
        for row in q.gpu_table(32760, 20, shapes=(shape,)):
            rec.figure("gemm", fp8_gemm_speedup=row["gemm_speedup"], **row)
    return 0


def part_vae(rec) -> int:
    if not _cuda_or_skip(rec, "VAE decode vs diffusers"):
        return 1
    import torch

    vae = _tf("benchmarks.vae")
    with tempfile.TemporaryDirectory() as tmp:
        for case in VAE_CASES:
            if not rec.fits(14, f"VAE case {case}"):
                continue
            res, outs = {}, {}
            for impl in ("ours", "diffusers"):
                res[impl], outs[impl] = vae._run_child(impl, case, 4, tmp, 0, "cuda")
            diff = (torch.load(outs["ours"]) - torch.load(outs["diffusers"])).abs().max().item()
            op, shape, dtype, mode = vae.CASES[case]
            o, d = res["ours"], res["diffusers"]
            rec.figure("vae_decode", case=case, shape="x".join(map(str, shape)), dtype=dtype,
                       ours_s=o["seconds"], diffusers_s=d["seconds"], speedup=d["seconds"] / o["seconds"],
                       ours_peak_mib=o["peak_above_model_mib"], diffusers_peak_mib=d["peak_above_model_mib"],
                       memory_ratio=o["peak_above_model_mib"] / max(1e-9, d["peak_above_model_mib"]),
                       max_abs_diff=diff, runs=1)
    return 0


def part_dit(rec) -> int:
    if not _cuda_or_skip(rec, "Wan DiT vs diffusers"):
        return 1
    dit = _tf("benchmarks.dit")
    row = dit.cuda_rows("1.3b", "bf16", DIT_LATENT, DIT_TEXT_TOKENS, repeats=5, fits=rec.fits)
    if row:
        rec.figure("dit_eager", **row)
    return 0


def part_dual(rec) -> int:
    if not _cuda_or_skip(rec, "dual-branch step"):
        return 1
    import torch

    wan_dit, sampling = _tf("models.wan_dit"), _tf("benchmarks.sampling")
    cfg = wan_dit.get_config("wan2.1-1.3b")
    big = wan_dit.random_wan_dit(config=cfg, dtype=torch.bfloat16, device="cuda")
    if not rec.fits(8, "dual-branch steps (1.3B, 30 blocks)"):
        return 0
    r = sampling.bench_dual_overhead(big, "cuda", DIT_LATENT, 4, 3, torch.bfloat16)
    rec.figure("dual_step", latent="x".join(map(str, DIT_LATENT)), layers=cfg.num_layers, **r)
    return 0


def part_compile(rec) -> int:
    if not _cuda_or_skip(rec, "AOTInductor cold/warm"):
        return 1
    comp = _tf("benchmarks.compile")
    rec.skip("JIT torch.compile path (aot=False) cold/warm", "not in the 5-minute plan (a second cold build); "
             "run `python benchmarks/compile.py --device cuda --jit`")
    profile = dict(batch=DIT_LATENT[0], frames=DIT_LATENT[2], height=DIT_LATENT[3], width=DIT_LATENT[4],
                   text=DIT_TEXT_TOKENS)
    cache = tempfile.mkdtemp(prefix="twinflow-cache-")
    keys = ("cache", "export_s", "build_or_load_s", "total_s", "verified", "line")
    try:
        cold = comp.run_child("cold", cache, jit=False, device="cuda", preset="wan2.1-1.3b", profile=profile,
                              steps=0, timeout=max(1.0, rec.left()))
    except subprocess.TimeoutExpired:
        rec.skip("1.3B AOTInductor cold build, warm load, compiled steps", "the cold build did not finish before "
                 "the part's cap; rerun with a larger cap: ./dev gpu --only compile --cap compile=300")
        return 0
    rec.figure("cold_build", **{k: cold[k] for k in keys})
    if not rec.fits(25, "warm load + compiled steps (1.3B)"):
        return 0
    try:
        warm = comp.run_child("warm", cache, jit=False, device="cuda", preset="wan2.1-1.3b", profile=profile,
                              steps=4, timeout=max(1.0, rec.left()))
    except subprocess.TimeoutExpired:
        rec.skip("1.3B warm load + compiled steps", "did not finish before the part's cap")
        return 0
    rec.figure("warm_load", **{k: warm[k] for k in keys})
    rec.figure("cold_warm", warm_over_cold=warm["total_s"] / cold["total_s"],
               warm_over_cold_build=warm["build_or_load_s"] / cold["build_or_load_s"])
    s = warm["steps"]
    rec.figure("compiled_step", backend=warm["backend"], compiled_s=s["compiled_s"], eager_s=s["eager_s"],
               x_eager=s["eager_s"] / s["compiled_s"], rel_err=s["rel_err"])
    rec.figure("recompiles", recompiles=s["recompiles"], eager_fallbacks=s["eager_fallbacks"], steps=s["steps"])
    return 0


STREAM_BUDGETS = (2, 4, 8)  # resident blocks of the 1.3B model's 30 (about 90 MB each in bf16)


def stream_rows(cname="wan2.1-1.3b", dtype="bf16", shape=DIT_LATENT, ctx_tokens=DIT_TEXT_TOKENS,
                budgets=STREAM_BUDGETS, repeats=3, fits=None, device="cuda", engine=None) -> list:
    """Block streaming (models/block_stream.py) against the resident model: median forward time, overhead, peak
    CUDA memory allocated during one forward (weights included), and the largest difference from the resident
    output (the same kernels run: 0 expected). One row for the resident model, one per budget. `fits(seconds,
    what)` may veto a case. `device="cpu"` with a copy `engine` runs the same steps with wall-clock times and no
    memory figures: the CPU test of this code (the streaming engine there is the test's shim)."""
    import gc
    import time

    import torch

    wan_dit, bs = _tf("models.wan_dit"), _tf("models.block_stream")
    cuda = torch.device(device).type == "cuda"
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = wan_dit.get_config(cname)

    def median_s(fn):
        times = []
        for _ in range(repeats):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def peak_mib(fn):
        if not cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20

    resident = wan_dit.random_wan_dit(config=cfg, seed=0, dtype=dt, device=device)  # built where it is fast
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(device, dt)
    t = torch.tensor([700.0] * shape[0], device=device)
    ctx = torch.randn(shape[0], ctx_tokens, cfg.text_dim, generator=g).to(device, dt)
    rows = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        want = resident(x, t, ctx)
        if cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        if fits is not None and not fits(repeats * first_s * (1 + len(budgets)) + 10, f"block streaming {cname}"):
            return []
        base_s = median_s(lambda: resident(x, t, ctx))
        rows.append({"case": "resident", "budget": cfg.num_layers, "seconds": base_s, "overhead": 0.0,
                     "peak_mib": peak_mib(lambda: resident(x, t, ctx)), "max_abs_diff": 0.0})
        # The host copy: every tensor moved to (pinned) host memory once, so each budget streams from the same copy
        pin = cuda and torch.cuda.is_available()
        for p in list(resident.parameters()):
            p.data = p.data.to("cpu").pin_memory() if pin else p.data.to("cpu")
        for mod in resident.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
        for n in budgets:
            if fits is not None and not fits(repeats * first_s * 2 + 2, f"block streaming, budget {n}"):
                continue
            streamed = bs.stream_blocks(resident, n, device=None if engine else device, engine=engine,
                                        name=f"{cname} budget {n}")
            got = streamed(x, t, ctx)  # warm-up
            s = median_s(lambda: streamed(x, t, ctx))
            rows.append({"case": f"streamed {n}", "budget": n, "seconds": s, "overhead": s / base_s - 1.0,
                         "peak_mib": peak_mib(lambda: streamed(x, t, ctx)),
                         "max_abs_diff": (got.float() - want.float()).abs().max().item(),
                         "block_mib": bs.streamer_of(streamed).block_bytes / cfg.num_layers / 2 ** 20,
                         "status": bs.streamer_of(streamed).status()})
            del streamed, got
            gc.collect()  # the model and its streamer refer to each other (hooks): free its device weights now
            if cuda:
                torch.cuda.empty_cache()
    for r in rows:
        r.update(config=cname, dtype=dtype, layers=cfg.num_layers, shape="x".join(map(str, shape)),
                 device=torch.cuda.get_device_name() if cuda else "cpu")
    return rows


def part_stream(rec) -> int:
    if not _cuda_or_skip(rec, "block streaming vs resident"):
        return 1
    rows = stream_rows(fits=rec.fits)
    for r in rows:
        rec.figure("block_stream", **r)
    return 0


def part_step_cache(rec) -> int:
    """OPTIONAL: runs only where issue 18's step cache exists (the parent checks STEP_CACHE_MODULE first)."""
    try:
        _tf(STEP_CACHE_MODULE)
        bench = _tf(STEP_CACHE_BENCH)
    except ImportError as exc:
        rec.skip("step caching", f"{exc}; adapt STEP_CACHE_BENCH in tools/gpu_parts.py to issue 18's benchmark")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cache.json"
        cmd = [sys.executable, "-P", "-m", bench.__name__, "--device", "cuda", "--json", str(out)]
        try:
            res = subprocess.run(cmd, cwd=tmp, timeout=max(1.0, rec.left()), capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            rec.skip("step caching", "its benchmark did not finish before the part's cap")
            return 0
        if res.returncode != 0 or not out.is_file():
            rec.skip("step caching", f"{' '.join(cmd[2:])} failed: {res.stderr.strip()[-300:]}")
            return 1
        rec.figure("step_cache", result=json.loads(out.read_text()))
    return 0


def part_env(rec) -> int:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    for mod in ("cupy", "triton", "diffusers"):
        try:
            from importlib.metadata import version

            info[mod] = version({"cupy": "cupy-cuda13x"}.get(mod, mod))
        except Exception:  # not installed (or another cupy wheel name): say so
            info[mod] = "not installed"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                    multiprocessors=p.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "nvidia-smi failed"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["driver"] = "nvidia-smi unavailable"
    else:
        info["gpu"] = "no CUDA device"
    rec.figure("device", **info)
    for name, ok, detail in gates():
        rec.figure("gate", gate=name, ok=ok, detail=detail)
    return 0


# ----------------------------------------------------------------------------------------------
# Dry run (CPU): import every GPU code path, check the gates, collect the marked tests
# ----------------------------------------------------------------------------------------------

DRY_IMPORTS = tuple(f"{FUSED}.{m}" for m in ("_runtime", "ops", "norm", "rope", "int8", "vae_norm", "build")) + (
               FUSED_BENCH, "benchmarks.quant", "benchmarks.vae", "benchmarks.dit",
               "benchmarks.compile", "benchmarks.sampling", "compiled.backends", "compiled.runtime", "compiled.export",
               "quant.primitives", "quant.formats", "quant.linear", "models.wan_dit", "models.wan_vae", "models.block_stream",
               "sampling.dual")


def dry_imports(rec) -> int:
    import torch

    rec.note(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}")
    for name in DRY_IMPORTS:
        try:
            _tf(name)
            rec.figure(f"import twinflow.{name}", ok=True)
        except Exception as exc:  # report every failing import, not only the first
            rec.figure(f"import twinflow.{name}", ok=False, detail=f"{type(exc).__name__}: {exc}")
    try:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
        from diffusers.loaders.single_file_utils import (  # noqa: F401
            convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers)

        rec.figure("import diffusers (Wan VAE / DiT + converters)", ok=True)
    except Exception as exc:  # diffusers is carried as a wheel to the GPU host
        rec.figure("import diffusers (Wan VAE / DiT + converters)", ok=False, detail=f"{type(exc).__name__}: {exc}")
    q = _tf("benchmarks.quant")
    ok = all(callable(getattr(mod, fn, None)) for mod, fn in (
        (_tf("benchmarks.dit"), "cuda_rows"), (_tf("benchmarks.compile"), "run_child"), (q, "gpu_table"),
        (_tf("benchmarks.sampling"), "bench_dual_overhead"), (_tf(FUSED_BENCH), "_cases"), (_tf(FUSED_BENCH), "_block")))
    rec.figure("benchmark entry points the parts call", ok=ok, detail="" if ok else "one is missing")
    vae = _tf("benchmarks.vae")
    rec.figure("VAE cases", ok=all(c in vae.CASES for c in VAE_CASES), detail=", ".join(VAE_CASES))
    checked = gates()
    for name, ok, detail in checked:
        rec.figure(f"gate: {name}", ok=ok, detail=detail)
    if not torch_version_is_host():
        unread = [name for name, _, _ in checked if name not in TORCH_2_11_BY_READING]
        rec.figure(f"every gate read against torch {GPU_HOST_TORCH} (the GPU host's)", ok=not unread,
                   detail=f"gates with no reading in TORCH_2_11_BY_READING: {unread}" if unread else
                   f"this torch is {torch.__version__}; torch {GPU_HOST_TORCH} is checked by reading, and run by the "
                   "env part on the GPU host first")
        for name, _, _ in checked:
            if name in TORCH_2_11_BY_READING:
                rec.note(f"torch {GPU_HOST_TORCH}, {name} (read, not run): {TORCH_2_11_BY_READING[name]}")
    try:
        _tf(STEP_CACHE_MODULE)
        rec.note(f"optional step_cache part: twinflow.{STEP_CACHE_MODULE} exists; it runs")
    except ImportError:
        rec.note(f"optional step_cache part: twinflow.{STEP_CACHE_MODULE} does not exist yet; it will be skipped")
    files = marked_test_files()
    res = subprocess.run(_pytest_cmd(files, ["--collect-only", "-q"]), cwd=str(ROOT), capture_output=True, text=True,
                         timeout=max(1.0, rec.left()))
    n = sum(1 for line in res.stdout.splitlines() if "::" in line)
    rec.figure("collect the cuda/cupy tests", ok=res.returncode == 0 and n > 0,
               detail=f"{n} tests in {', '.join(files)}" if res.returncode == 0 else res.stdout[-1500:] + res.stderr[-500:])
    return 0
