"""TensorRT smoke test: build one Wan DiT block and one VAE decode step with torch-tensorrt, compare with
eager, time both, and write a JSON report. Run it on a host with a CUDA GPU, torch-tensorrt matching
the installed torch (X.Y) and the TensorRT libraries; nothing here can run it otherwise.

    python tools/trt_smoke.py --out trt_report.json              # 1.3B-shaped block + tiny VAE step, bf16
    python tools/trt_smoke.py --dtype fp16 --vae-preset wan2.1   # the real VAE's width

The report records versions, GPU, build seconds, cosine / max abs against eager, and eager vs TensorRT
times (best of --repeats). The README keeps the backend "experimental, unverified" until such a report
exists; attach it to the issue.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from twinflow.benchmarks.compile import cuda_best_time


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _case(name, module, args, shapes, dtypes, dtype, repeats) -> dict:
    from twinflow.compiled import backends
    from twinflow.compiled.verify import verify

    ep = torch.export.export(module, args, strict=False)
    t0 = time.perf_counter()
    trt_gm = backends.compile_tensorrt(ep, shapes, dtypes, dtype)
    build_s = time.perf_counter() - t0
    verdict = verify(trt_gm, module, args, dtype)
    return {"case": name, "build_s": build_s, "ok": verdict.ok, "reason": verdict.reason, **verdict.metrics,
            "eager_s": cuda_best_time(module, args, repeats),
            "tensorrt_s": cuda_best_time(trt_gm, args, repeats)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="trt_report.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--vae-preset", default="tiny")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    from twinflow.compiled import export as ex, probe

    why = probe.tensorrt_unavailable()
    report = {"python": platform.python_version(), "torch": torch.__version__,
              "torch_tensorrt": probe.tensorrt_version(), "unavailable": why, "cases": []}
    if why is not None:
        Path(args.out).write_text(json.dumps(report, indent=1))
        sys.stderr.write(f"tensorrt unavailable: {why}\n(report with the reason written to {args.out})\n")
        return 2
    import tensorrt

    report.update(tensorrt=tensorrt.__version__, gpu=torch.cuda.get_device_name(),
                  capability=list(torch.cuda.get_device_capability()))
    dtype = DTYPES[args.dtype]
    from twinflow.models.wan_dit import WanAttentionBlock, get_config, rope_tables
    from twinflow.models.wan_vae import random_wan_vae

    cfg = get_config("wan2.1-1.3b")
    torch.manual_seed(0)
    block = WanAttentionBlock(cfg).cuda().to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        block.modulation.normal_(0, cfg.dim ** -0.5)
    grid = (21, 30, 52)  # 81 frames at 480x832
    n = grid[0] * grid[1] * grid[2]
    cos, sin = rope_tables(grid, cfg.rope_dims, cfg.rope_theta, "cuda")
    bargs = (torch.randn(1, n, cfg.dim, device="cuda"), torch.randn(1, 6, cfg.dim, device="cuda") * 0.1, cos, sin,
             torch.randn(1, 33, cfg.dim, device="cuda", dtype=dtype), torch.zeros(1, 1, 1, 33, device="cuda"))
    static = [(tuple(a.shape),) * 3 for a in bargs]
    report["cases"].append(_case("wan2.1-1.3b block, 81x480x832", block, bargs, static,
                                 [a.dtype for a in bargs], dtype, args.repeats))
    vae = random_wan_vae(args.vae_preset, dtype=dtype, device="cuda")
    prof = ex.Profile.make(batch=1, height=60, width=104)
    step = ex.WanVAEDecodeStep(vae, first=False).eval()
    vargs = ex.vae_decode_example(step, prof, opt=True)
    report["cases"].append(_case(f"vae {args.vae_preset} decode step 480x832", step, vargs,
                                 [(tuple(a.shape),) * 3 for a in vargs], [a.dtype for a in vargs], dtype,
                                 args.repeats))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if all(c["ok"] for c in report["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
