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

    python -m twinflow.benchmarks.compile            # CPU: ratios + cold/warm
    python -m twinflow.benchmarks.compile --jit      # + the JIT torch.compile path
    python -m twinflow.benchmarks.compile --gpu      # on a CUDA host
(from any directory, with TwinFlow installed; `python benchmarks/compile.py ...` in a checkout does the same).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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


def _child(phase: str, cache_dir: str, jit: bool) -> dict:
    """Run one compile in a fresh process (cold or warm) and return its report as JSON."""
    # Inductor's kernel cache lives under TWINFLOW_CACHE_DIR (compiled.backends.use_inductor_cache_dir):
    # a fresh TwinFlow cache is a fully cold start, and the warm child reuses only what the cold one left there.
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TWINFLOW_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase] + (["--jit"] if jit else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cache_dir)
    if res.returncode != 0:
        raise RuntimeError(f"child {phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_main(phase: str, jit: bool) -> None:
    from twinflow.compiled import export as ex
    from twinflow.compiled.runtime import compile_denoiser
    from twinflow.core.handles import Denoiser
    from twinflow.models.wan_dit import random_wan_dit

    den = Denoiser(random_wan_dit("tiny"), "wan_dit", 16, 4096, name="tiny")
    t0 = time.perf_counter()
    _, rep = compile_denoiser(den, ex.Profile.make(**PROFILE_ARGS), "inductor", aot=not jit)
    total = time.perf_counter() - t0
    print(json.dumps({"phase": phase, "cache": rep.cache, "export_s": rep.export_s, "build_or_load_s": rep.build_s,
                      "total_s": total, "verified": bool(rep.verdict and rep.verdict.ok), "line": rep.line()}))


def cold_warm(jit: bool) -> dict:
    cache_dir = tempfile.mkdtemp(prefix="twinflow-cache-")
    cold = _child("cold", cache_dir, jit)
    warm = _child("warm", cache_dir, jit)
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
    p.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args.child, args.jit)
        return
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"}
    if args.gpu:
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
