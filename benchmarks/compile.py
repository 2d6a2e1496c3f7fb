"""Compile backends: eager vs Inductor per DiT (tiny) and per 1.3B-shaped block, cold build vs warm
cache load, and on a GPU eager vs Inductor vs AOTInductor per block and per VAE decode step.

CPU part (default):
  * ratio eager / inductor for the tiny Wan DiT and for one 1.3B-shaped block (dim 1536, ffn 8960,
    12 heads) at a small token grid; best of `--repeats` after a warm-up, under `no_grad`.
  * cold vs warm: `compile_denoiser(..., "inductor")` in a child process with an empty TwinFlow cache
    (which also holds Inductor's kernel cache), then in a second child with the same cache (warm), for
    the default path (weight-free AOTInductor package: the warm child computes the key without
    exporting, loads the package with the model's weights and verifies it on the opt shape) and, with
    `--jit`, for JIT `torch.compile` of the exported module (`aot=False`: the warm child still exports
    and dynamo still traces; only Inductor's compiled kernels come from the cache). Export time is
    reported apart; `total_s` is what the caller waits for inside `compile_denoiser`.
GPU part (`--gpu`): the same per block and per VAE decode step on CUDA; exits with a clear message
(status 2) where no CUDA device is visible.
GPU cold/warm (`--device cuda`): the real 1.3B DiT (bf16, 5 latent frames at 60 x 104, 64 text tokens) through
AOTInductor, cold build then warm load in fresh processes, then 4 sampler-like steps (new timestep each) timed
against eager, with dynamo graphs and eager fallbacks counted over the steps (`./dev gpu` runs this).

    python -m twinflow.benchmarks.compile            # CPU: ratios + cold/warm
    python -m twinflow.benchmarks.compile --jit      # + the JIT torch.compile path
    python -m twinflow.benchmarks.compile --gpu      # on a CUDA host
    python -m twinflow.benchmarks.compile --device cuda [--jit]  # on a CUDA host: 1.3B cold/warm + steps
(from any directory, with TwinFlow installed; `python benchmarks/compile.py ...` in a checkout does the same).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from twinflow.benchmarks import cpu_name

PROFILE_ARGS = dict(batch=(1, 2, 2), frames=(2, 3, 4), height=(4, 6, 8), width=(4, 8, 8), text=(1, 8, 16))


def _best(fn, args, repeats: int) -> float:
    with torch.no_grad():
        fn(*args)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t0)
    return best


def _block_module(device, dtype):
    """One 1.3B-shaped Wan block + its inputs for a 2x(6x8)-token grid and 16 text tokens."""
    from twinflow.models.wan_dit import WanAttentionBlock, get_config, rope_tables

    cfg = get_config("wan2.1-1.3b")
    torch.manual_seed(0)
    block = WanAttentionBlock(cfg).to(device, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        block.modulation.normal_(0, cfg.dim ** -0.5)
    grid = (2, 3, 4)
    n = grid[0] * grid[1] * grid[2]
    cos, sin = rope_tables(grid, cfg.rope_dims, cfg.rope_theta, device)
    args = (torch.randn(1, n, cfg.dim, device=device), torch.randn(1, 6, cfg.dim, device=device) * 0.1, cos, sin,
            torch.randn(1, 17, cfg.dim, device=device, dtype=dtype), torch.zeros(1, 1, 1, 17, device=device))
    return block, args


def ratios(repeats: int, device="cpu") -> dict:
    from twinflow.compiled import backends, export as ex
    from twinflow.models.wan_dit import random_wan_dit

    out = {}
    dit = random_wan_dit("tiny").to(device)
    prof = ex.Profile.make(**PROFILE_ARGS)
    ep, graph = ex.export_dit(dit, prof)
    args = ex.dit_example_inputs(dit, prof, opt=True)
    fn = backends.build_inductor(ep)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    out["tiny_dit"] = {"compile_s": time.perf_counter() - t0, "eager_s": _best(graph, args, repeats),
                       "inductor_s": _best(fn, args, repeats)}
    block, bargs = _block_module(device, torch.float32)
    bep = torch.export.export(block, bargs, strict=False)
    bfn = torch.compile(bep.module(), backend="inductor")
    t0 = time.perf_counter()
    with torch.no_grad():
        bfn(*bargs)
    out["block_1.3b"] = {"compile_s": time.perf_counter() - t0, "eager_s": _best(block, bargs, repeats),
                         "inductor_s": _best(bfn, bargs, repeats)}
    for v in out.values():
        v["eager_over_inductor"] = v["eager_s"] / v["inductor_s"]
    return out


def run_child(phase: str, cache_dir: str, jit: bool, device: str = "cpu", preset: str = "tiny",
              profile: Optional[dict] = None, steps: int = 0, timeout: Optional[float] = None) -> dict:
    """Run one compile in a fresh process (cold or warm) and return its report as JSON."""
    # Inductor's kernel cache lives under TWINFLOW_CACHE_DIR (compiled.backends.use_inductor_cache_dir):
    # a fresh TwinFlow cache is a fully cold start, and the warm child reuses only what the cold one left there.
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TWINFLOW_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--device", device, "--preset", preset,
           "--steps", str(steps)] + (["--jit"] if jit else []) + (["--profile", json.dumps(profile)] if profile else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cache_dir, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"child {phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(eager, compiled, report, profile, steps: int, device: str) -> dict:
    """A sampler's view of the compiled denoiser: `steps` calls at the profile's opt shape with a different
    timestep each, timed (median, synchronised) against eager; dynamo graphs compiled and eager fallbacks
    counted over the steps (both must stay 0: the AOTInductor package never re-traces)."""
    from torch._dynamo.utils import counters

    cfg = eager.config
    g = torch.Generator().manual_seed(0)
    dtype = eager.patch_embedding.weight.dtype
    b, f, h, w, n = (getattr(profile, a).opt for a in ("batch", "frames", "height", "width", "text"))
    x = torch.randn(b, cfg.in_dim, f, h, w, generator=g).to(device, dtype)
    ctx = torch.randn(b, n, cfg.text_dim, generator=g).to(device, dtype)
    ts = torch.linspace(999.0, 50.0, steps)
    graphs0, fallbacks0 = counters["stats"]["unique_graphs"], report.details["calls"]["eager"]
    tc, te = [], []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((b,), float(ts[i]), device=device)
            for fn, acc in ((compiled, tc), (eager, te)):
                _sync(device)
                t0 = time.perf_counter()
                out = fn(x, t, ctx)
                _sync(device)
                acc.append(time.perf_counter() - t0)
                if fn is compiled:
                    got = out.float()
            want = eager(x, t, ctx).float()
    # the first step pays one-off costs (runtime constant folding, allocator growth): medians of the rest
    med = lambda v: sorted(v[1:] or v)[len(v[1:] or v) // 2]  # noqa: E731
    return {"steps": steps, "compiled_s": med(tc), "eager_s": med(te), "first_compiled_s": tc[0],
            "recompiles": counters["stats"]["unique_graphs"] - graphs0,
            "eager_fallbacks": report.details["calls"]["eager"] - fallbacks0,
            "rel_err": ((got - want).norm() / want.norm()).item()}


def child_main(phase: str, jit: bool, device: str = "cpu", preset: str = "tiny", profile: Optional[dict] = None,
               steps: int = 0) -> None:
    from twinflow.compiled import export as ex
    from twinflow.compiled.runtime import compile_denoiser
    from twinflow.core.handles import Denoiser
    from twinflow.models.wan_dit import random_wan_dit

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dit = random_wan_dit(preset, dtype=dtype, device=device)
    den = Denoiser(dit, "wan_dit", dit.config.in_dim, dit.config.text_dim, name=preset)
    prof = ex.Profile.make(**(profile or PROFILE_ARGS))
    t0 = time.perf_counter()
    compiled, rep = compile_denoiser(den, prof, "inductor", aot=not jit)
    _sync(device)
    total = time.perf_counter() - t0
    out = {"phase": phase, "cache": rep.cache, "backend": rep.backend + ("" if jit else " (AOTInductor)"),
           "export_s": rep.export_s, "build_or_load_s": rep.build_s, "total_s": total,
           "verified": bool(rep.verdict and rep.verdict.ok), "line": rep.line()}
    if steps:
        out["steps"] = time_steps(dit, compiled.module, rep, prof, steps, device)
    print(json.dumps(out))


def cold_warm(jit: bool, device: str = "cpu", preset: str = "tiny", profile: Optional[dict] = None,
              steps: int = 0) -> dict:
    cache_dir = tempfile.mkdtemp(prefix="twinflow-cache-")
    cold = run_child("cold", cache_dir, jit, device, preset, profile)
    warm = run_child("warm", cache_dir, jit, device, preset, profile, steps)
    if cold["cache"] != "miss" or warm["cache"] != "hit" or not (cold["verified"] and warm["verified"]):
        raise RuntimeError(f"expected a verified miss then a verified hit, got {cold['line']} / {warm['line']}")
    return {"cold": cold, "warm": warm, "warm_over_cold_build": warm["build_or_load_s"] / cold["build_or_load_s"],
            "warm_over_cold_total": warm["total_s"] / cold["total_s"]}


def gpu(repeats: int) -> dict:
    if not torch.cuda.is_available():
        sys.stderr.write("GPU part: no CUDA device visible (torch.cuda.is_available() is False); run it on a CUDA "
                         "host. Nothing was measured.\n")
        raise SystemExit(2)
    from twinflow.compiled import backends, export as ex
    from twinflow.models.wan_vae import random_wan_vae

    out = {"device": torch.cuda.get_device_name()}
    block, bargs = _block_module("cuda", torch.bfloat16)
    bep = torch.export.export(block, bargs, strict=False)
    variants = {"eager": block, "inductor": torch.compile(bep.module(), backend="inductor")}
    pkg = Path(tempfile.mkdtemp()) / "block.pt2"
    backends.build_aoti_package(bep, pkg)
    variants["aoti"] = backends.load_aoti(pkg, backends.exported_state(bep))
    out["block_1.3b_bf16_s"] = {k: cuda_best_time(v, bargs, repeats) for k, v in variants.items()}
    vae = random_wan_vae("wan2.1", dtype=torch.bfloat16, device="cuda")
    prof = ex.Profile.make(batch=1, height=60, width=104)
    ep, step = ex.export_vae_decode_step(vae, prof, first=False)
    args = ex.vae_decode_example(step, prof, opt=True)
    out["vae_decode_step_480p_bf16_s"] = {"eager": cuda_best_time(step, args, repeats),
                                         "inductor": cuda_best_time(torch.compile(ep.module()), args, repeats)}
    return out


def cuda_best_time(fn, args, repeats):
    """Best wall time of `repeats` synchronised CUDA calls after one warm-up (also used by tools/trt_smoke.py)."""
    with torch.no_grad():
        fn(*args)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jit", action="store_true", help="also time the JIT torch.compile path (aot=False) cold / warm")
    p.add_argument("--gpu", action="store_true", help="run the CUDA part instead of the CPU part")
    p.add_argument("--skip-ratios", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: cold build / warm load of the real 1.3B DiT (bf16) through AOTInductor on the GPU, "
                        "then compiled vs eager steps and recompiles (written for GPU hosts; not run on a GPU yet)")
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args.child, args.jit, args.device, args.preset or "tiny",
                   json.loads(args.profile) if args.profile else None, args.steps)
        return
    result = {"machine": f"{cpu_name()}, torch {torch.__version__}"}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here")
        prof = dict(batch=1, frames=5, height=60, width=104, text=64)
        result["device"] = torch.cuda.get_device_name()
        result["aoti_cold_warm_1.3b"] = cold_warm(False, "cuda", "wan2.1-1.3b", prof, steps=4)
        if args.jit:
            result["jit_cold_warm_1.3b"] = cold_warm(True, "cuda", "wan2.1-1.3b", prof, steps=4)
    elif args.gpu:
        result["gpu"] = gpu(args.repeats)
    else:
        if not args.skip_ratios:
            result["ratios"] = ratios(args.repeats)
        result["aoti_cold_warm"] = cold_warm(False)
        if args.jit:
            result["jit_cold_warm"] = cold_warm(True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
