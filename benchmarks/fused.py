"""Kernel benchmark: GB/s and % of the GPU's peak memory bandwidth for each fused CuPy kernel, against
its torch reference run eagerly and compiled with torch.compile (inductor), at Wan shapes (1.3B:
D=1536, 14B: D=5120; 32,760 tokens = 21 latent frames x 30 x 52 patches at 480p). With `--block`,
also one Wan DiT block end to end with the kernels on and off.

    python -m twinflow.benchmarks.fused [--dims 1536 5120] [--tokens 32760] [--block] [--json out.json]

GPU only (CUDA + CuPy): on a machine without them it says so and exits with status 2. Bandwidth
counts the minimum HBM traffic of each op (every input read once, every output written once).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def _peak_bytes_per_s(device_index: int) -> float:
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(device_index)
    # DDR: two transfers per clock; memoryClockRate is in kHz, memoryBusWidth in bits.
    return 2.0 * p["memoryClockRate"] * 1e3 * p["memoryBusWidth"] / 8


def _time_ms(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _cases(d: int, tokens: int):
    """(name, kernel fn, reference fn, args, bytes moved) at one Wan width."""
    import torch

    from twinflow.fused import int8, norm, ops, rope, vae_norm

    dev, bf, f32 = "cuda", torch.bfloat16, torch.float32
    x32 = torch.randn(1, tokens, d, device=dev)                 # fp32 residual stream
    xb = torch.randn(1, tokens, d, device=dev, dtype=bf)        # bf16 activations
    m = [torch.randn(1, 1, d, device=dev) for _ in range(3)]     # per-sample modulation (fp32)
    w = torch.randn(d, device=dev, dtype=bf)
    heads = d // 128
    q = torch.randn(1, tokens, heads, 128, device=dev, dtype=bf)
    ang = torch.rand(tokens, 64, device=dev) * 10
    cos, sin = ang.cos(), ang.sin()
    acc = torch.randint(-2**20, 2**20, (tokens, d), device=dev, dtype=torch.int32)
    a_s, w_s, bias = torch.rand(tokens, 1, device=dev), torch.rand(d, device=dev), torch.randn(d, device=dev, dtype=bf)
    # The VAE decoder's widest stage: 384 channels over 2 frames at 60 x 104.
    v = torch.randn(1, 384, 2, 60, 104, device=dev, dtype=bf)
    g = torch.randn(384, 1, 1, 1, device=dev, dtype=bf)
    n = tokens * d
    return [
        ("ln_modulate", norm.ln_modulate_launch, ops.ln_modulate_ref, (xb, m[0], m[1], 1e-6), n * (2 + 4)),
        ("gated_residual", norm.gated_residual_launch, ops.gated_residual_ref, (x32, m[2], xb), n * (4 + 2 + 4)),
        ("gated_residual_ln_modulate", norm.gated_residual_ln_modulate_launch, ops.gated_residual_ln_modulate_ref,
         (x32, m[2], xb, m[0], m[1], 1e-6), n * (4 + 2 + 4 + 4)),
        ("rms_norm", norm.rms_norm_launch, ops.rms_norm_ref, (xb, w, 1e-6), n * (2 + 2)),
        ("rope_apply", rope.rope_apply_launch, ops.rope_apply_ref, (q, cos, sin), n * (2 + 2)),
        ("quantize_int8_per_token", int8.quantize_int8_per_token_launch, ops.quantize_int8_per_token_ref,
         (xb, 1e-8), n * (2 + 1)),
        ("int8_gemm_epilogue", int8.int8_gemm_epilogue_launch, ops.int8_gemm_epilogue_ref,
         (acc, a_s, w_s, bias, "gelu_tanh", bf), n * (4 + 2)),
        ("rms_norm_cf+silu", vae_norm.rms_norm_cf_launch, ops.rms_norm_cf_ref, (v, g, None, True, 1e-12),
         v.numel() * (2 + 2)),
    ]


def _block(d: int, tokens: int, warmup: int, iters: int) -> dict:
    """One Wan DiT block (bf16 weights, fp32 residual stream) with the kernels on and off."""
    import torch

    from twinflow.fused import ops
    from twinflow.models.wan_dit import WanAttentionBlock, WanDiTConfig

    cfg = WanDiTConfig(dim=d, ffn_dim=8960 if d == 1536 else 13824, num_heads=d // 128)
    blk = WanAttentionBlock(cfg).to("cuda")
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.02)
    blk = blk.to(torch.bfloat16)
    blk.modulation.data = blk.modulation.data.float()
    x = torch.randn(1, tokens, d, device="cuda")
    e0 = torch.randn(1, 6, d, device="cuda")
    ang = torch.rand(tokens, 64, device="cuda")
    cos, sin = ang.cos(), ang.sin()
    ctx = torch.randn(1, 512, d, device="cuda", dtype=torch.bfloat16)
    out = {}
    with torch.no_grad():
        for mode in ("torch", "cupy"):
            ops.set_mode(mode)
            out[mode] = _time_ms(lambda: blk(x, e0, cos, sin, ctx, None), warmup, iters)
    ops.set_mode("auto")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1536, 5120])
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--block", action="store_true", help="also time one Wan DiT block, kernels on vs off")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)

    import torch

    from twinflow.fused import _runtime

    if not torch.cuda.is_available():
        print("benchmarks/fused.py needs a CUDA GPU; this machine has none (torch sees no CUDA device).")
        return 2
    reason = _runtime.unavailable_reason()
    if reason:
        print(f"benchmarks/fused.py needs CuPy on the GPU: {reason}")
        return 2

    dev = torch.cuda.current_device()
    peak = _peak_bytes_per_s(dev)
    name = torch.cuda.get_device_name(dev)
    print(f"# {name}: peak memory bandwidth {peak / 1e12:.2f} TB/s; torch {torch.__version__}")
    results = {"device": name, "peak_TBps": peak / 1e12, "rows": []}
    hdr = "| D | op | kernel GB/s | % peak | eager GB/s | compiled GB/s | x eager | x compiled |"
    print(hdr)
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for d in args.dims:
            for op, kern, ref, a, nbytes in _cases(d, args.tokens):
                tk = _time_ms(lambda: kern(*a), args.warmup, args.iters)
                te = _time_ms(lambda: ref(*a), args.warmup, args.iters)
                tc = None
                if not args.no_compile:
                    comp = torch.compile(ref)
                    tc = _time_ms(lambda: comp(*a), args.warmup, args.iters)
                gbs = lambda t: nbytes / (t * 1e-3) / 1e9  # noqa: E731
                row = {"D": d, "op": op, "kernel_ms": tk, "eager_ms": te, "compiled_ms": tc,
                       "kernel_GBps": gbs(tk), "pct_peak": 100 * gbs(tk) * 1e9 / peak}
                results["rows"].append(row)
                comp_s = f"{gbs(tc):.0f}" if tc else "-"
                xc = f"{tc / tk:.2f}" if tc else "-"
                print(f"| {d} | {op} | {gbs(tk):.0f} | {row['pct_peak']:.0f}% | {gbs(te):.0f} | {comp_s} | "
                      f"{te / tk:.2f} | {xc} |")
                torch.cuda.empty_cache()
            if args.block:
                b = _block(d, args.tokens, max(2, args.warmup // 5), max(5, args.iters // 5))
                results.setdefault("block", {})[d] = b
                print(f"| {d} | one DiT block | torch {b['torch']:.2f} ms | cupy {b['cupy']:.2f} ms | "
                      f"x{b['torch'] / b['cupy']:.3f} | | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
