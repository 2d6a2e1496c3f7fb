"""Wan VAE benchmark: TwinFlow vs diffusers `AutoencoderKLWan`, same random weights, real configs.

    python -m twinflow.benchmarks.vae [--cases dec32,dec32bf16,enc256,dectiled48] [--repeats 2] [--json out.json]
    python -m twinflow.benchmarks.vae --family wan22 [--cases dec16,enc256,dectiled32] ...

`--family wan21` (default): the Wan2.1 VAE (dim 96, z 16). `--family wan22`: the Wan2.2 VAE (dim 160,
decoder 256, z 48, 2x2 patchify, 16x space; `random_wan22_vae("wan2.2")`); diffusers gets its Wan2.2
configuration (`is_residual=True, patch_size=2, decoder_base_dim=256`) and the same weights mapped by
`models.wan22_vae.from_diffusers` (read backwards; diffusers has no Wan2.2 converter). Ours decodes whole
frames at the default sizes (auto picks no bands for 16 latent rows); the `*bands` cases ask for exact row
bands (`dec32`: auto = 3 bands).

Every measurement runs in a fresh subprocess (one model, one op), so allocator state and caches of one
run never leak into the next. Ours and diffusers' runs are interleaved (ours, diffusers, ours, ...)
so a machine shared with other jobs slows both alike; the table reports medians and their ratio.

Method:
  * weights: `random_wan_vae("wan2.1", seed=0)`; diffusers gets the same state dict mapped by its own
    `convert_wan_vae_to_diffusers`, loaded strictly into `AutoencoderKLWan()` (its defaults are Wan2.1).
  * time: wall clock of the op (after a small warm-up op that creates oneDNN primitives), and the
    process CPU time (`time.process_time`, all threads), which is much less sensitive to other jobs
    competing for the cores than wall time.
  * memory: peak resident set above the model: the kernel's high-water mark (VmHWM) is reset through
    `/proc/self/clear_refs` right before the op (after gc + `malloc_trim(0)`, so freed heap pages do not
    sit in the baseline); peak = VmHWM after - VmRSS before. This counts every allocator (torch, oneDNN
    scratch, glibc), unlike torch's own allocator statistics.
  * numerics: each child saves its output; the parent reports max|ours - diffusers|.
  * `--device cuda`: the same, with the models and inputs on the GPU, timed with synchronisation, and
    memory = torch's CUDA allocator peak (allocated bytes) above the model. Written for GPU hosts; no GPU
    was available to this project when it was written, so it has not been run.
Ops: decode = `decode(z).sample` (clamped, as ours); encode = `encode(x).latent_dist.mode()`; the tiled
case uses diffusers' `enable_tiling()` (256 px tiles, stride 192) and ours with the same 256 px tile /
64 px overlap (tiling differs in blending and order, so that numeric column is informative only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    # name: (op, shape, dtype, mode): mode None = defaults, "tiled" = both tile, an int = our `bands`
    "dec32": ("decode", (1, 16, 3, 32, 32), "float32", None),
    "dec32bf16": ("decode", (1, 16, 3, 32, 32), "bfloat16", None),
    # ours with bands=1 (whole frames: fastest, most memory); the two above use the default (auto: 2 exact
    # row bands at this size). diffusers is the same untiled decode in all four.
    "dec32whole": ("decode", (1, 16, 3, 32, 32), "float32", 1),
    # a larger frame: auto picks 7 bands (64 latent rows -> 128 split rows); bands=1 for comparison
    "dec64": ("decode", (1, 16, 2, 64, 64), "float32", None),
    "dec64whole": ("decode", (1, 16, 2, 64, 64), "float32", 1),
    "dec32wholebf16": ("decode", (1, 16, 3, 32, 32), "bfloat16", 1),
    "enc256": ("encode", (1, 3, 9, 256, 256), "float32", None),
    "enc256bf16": ("encode", (1, 3, 9, 256, 256), "bfloat16", None),
    "dectiled48": ("decode", (1, 16, 2, 48, 48), "float32", "tiled"),
    "dectiled40": ("decode", (1, 16, 2, 40, 40), "float32", "tiled"),
    "smoke": ("decode", (1, 16, 2, 4, 4), "float32", None),  # seconds; checks the harness
    # GPU (the acceptance run, tools/gpu_accept.py): 5 latent frames of a 480p clip (-> 17 frames, 832x480)
    "dec480p5bf16": ("decode", (1, 16, 5, 60, 104), "bfloat16", None),
    "dec480p5": ("decode", (1, 16, 5, 60, 104), "float32", None),
}

# The Wan2.2 VAE (--family wan22): latents are 1/16 of the frame, so dec16 decodes the same 9 frames of
# 256x256 as the Wan2.1 dec32 case.
CASES22 = {
    "dec16": ("decode", (1, 48, 3, 16, 16), "float32", None),
    "dec16bf16": ("decode", (1, 48, 3, 16, 16), "bfloat16", None),
    "dec16bands": ("decode", (1, 48, 3, 16, 16), "float32", 3),  # ours: 3 exact row bands
    "dec32": ("decode", (1, 48, 2, 32, 32), "float32", None),  # 5 frames of 512x512
    "dec32bands": ("decode", (1, 48, 2, 32, 32), "float32", 6),
    "enc256": ("encode", (1, 3, 9, 256, 256), "float32", None),
    "enc256bf16": ("encode", (1, 3, 9, 256, 256), "bfloat16", None),
    "dectiled32": ("decode", (1, 48, 2, 32, 32), "float32", "tiled"),  # 512 px: 256 px tiles, as diffusers'
    "smoke": ("decode", (1, 48, 2, 2, 2), "float32", None),  # checks the harness (the real config still loads)
    "dec480p5bf16": ("decode", (1, 48, 5, 30, 52), "bfloat16", None),  # GPU: 17 frames, 832x480
}
FAMILIES = {"wan21": CASES, "wan22": CASES22}
DEFAULT_CASES = {"wan21": "dec32,dec32bf16,dec32whole,enc256,dectiled48",
                 "wan22": "dec16,dec16bf16,dec16bands,enc256,dectiled32"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _diffusers_wan22(sd: dict):
    """diffusers' AutoencoderKLWan in the Wan2.2 configuration holding our official-layout weights `sd`."""
    import torch
    from diffusers import AutoencoderKLWan

    from twinflow.models.wan22_vae import PRESETS, from_diffusers

    c = PRESETS["wan2.2"]
    model = AutoencoderKLWan(base_dim=c.dim, decoder_base_dim=c.dec_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult),
                             num_res_blocks=c.num_res_blocks, temperal_downsample=list(c.temporal_downsample),
                             is_residual=True, patch_size=c.patch_size, in_channels=12, out_channels=12,
                             scale_factor_spatial=c.spatial_ratio).eval()
    names = from_diffusers({k: k for k in model.state_dict()})  # official key -> diffusers key
    model.load_state_dict({names[k]: v for k, v in sd.items()}, strict=True)
    return model.to(torch.float32)


def _child(impl: str, case: str, out_path: str, threads: int, device: str = "cpu", family: str = "wan21") -> None:
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    op, shape, dtype_name, mode = FAMILIES[family][case]
    dtype = getattr(torch, dtype_name)
    if family == "wan22":
        from twinflow.models.wan22_vae import random_wan22_vae

        ours, z_dim = random_wan22_vae("wan2.2", seed=0, dtype=dtype), 48
    else:
        from twinflow.models.wan_vae import random_wan_vae

        ours, z_dim = random_wan_vae("wan2.1", seed=0, dtype=dtype), 16
    g = torch.Generator().manual_seed(123)
    x = torch.randn(shape, generator=g) if op == "decode" else torch.rand(shape, generator=g) * 2 - 1
    x = x.to(device=dev, dtype=dtype)
    if impl == "ours":
        model = ours.to(dev)
        if op == "decode":
            tile = (dict(tiling="on", tile=(256 // model.cfg.spatial_ratio, 64 // model.cfg.spatial_ratio))
                    if mode == "tiled" else
                    dict(bands=mode) if isinstance(mode, int) else {})
            run = lambda inp: model.decode(inp, **tile)  # noqa: E731
        else:
            run = model.encode
        warm = lambda: model.decode(torch.zeros(1, z_dim, 1, 4, 4, dtype=dtype, device=dev))  # noqa: E731
    else:
        from diffusers import AutoencoderKLWan
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        sd = {k: v.contiguous() for k, v in ours.state_dict().items()}
        del ours
        if family == "wan22":
            model = _diffusers_wan22(sd)
        else:
            model = AutoencoderKLWan().eval()
            model.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
        model = model.to(device=dev, dtype=dtype)
        del sd
        if mode == "tiled":
            model.enable_tiling()
        if op == "decode":
            run = lambda inp: model.decode(inp).sample  # noqa: E731
        else:
            run = lambda inp: model.encode(inp).latent_dist.mode()  # noqa: E731
        warm = lambda: model.decode(torch.zeros(1, z_dim, 1, 4, 4, dtype=dtype, device=dev))  # noqa: E731
    if dev.type == "cuda":
        with torch.inference_mode():
            warm()
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            y = run(x)
            torch.cuda.synchronize(dev)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = torch.cuda.max_memory_allocated(dev)
        torch.save(y.float().cpu().contiguous(), out_path)
        # GPU memory: torch's allocator peak above the model (allocated bytes, not reserved)
        print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "peak_above_model_mib": (peak - before) / 2 ** 20,
                          "rss_before_mib": before / 2 ** 20, "device": torch.cuda.get_device_name(dev)}))
        return
    import ctypes
    import gc

    with torch.inference_mode():
        warm()
        gc.collect()
        try:  # hand freed heap back to the OS so the baseline is the model, not reusable free memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        t0, c0 = time.perf_counter(), time.process_time()
        y = run(x)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _rss_kib("VmHWM")
    torch.save(y.float().contiguous(), out_path)
    print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "peak_above_model_mib": (peak - before) / 1024,
                      "rss_before_mib": before / 1024}))


def _run_child(impl, case, threads, tmp, mmap_threshold=0, device="cpu", family="wan21"):
    out = os.path.join(tmp, f"{impl}_{case}.pt")
    cmd = [sys.executable, "-m", "twinflow.benchmarks.vae", "--child", impl, case, out, "--threads", str(threads),
           "--device", device, "--family", family]
    env = dict(os.environ)
    if mmap_threshold:
        # glibc: serve every allocation above this size with its own mmap, returned on free, so the peak
        # RSS is the peak of live memory rather than of heap fragmentation (same for both impls)
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} {case} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), out


def _mode_label(mode) -> str:
    return " tiled" if mode == "tiled" else f" bands={mode}" if mode else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="wan21", choices=sorted(FAMILIES),
                    help="wan21: the Wan2.1 VAE; wan22: the Wan2.2 VAE (z 48, 16x space)")
    ap.add_argument("--cases", default=None, help="comma-separated cases (default: the family's main ones)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the children, e.g. 131072 (0: glibc default)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda[:N]: time with synchronisation, memory = torch's CUDA allocator peak above "
                         "the model (written for GPU hosts; not run in this project yet)")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "CASE", "OUT"))
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child, threads=args.threads, device=args.device, family=args.family)
        return 0
    cases = FAMILIES[args.family]
    import torch

    if args.device != "cpu":
        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            kind = None
        if kind != "cuda":
            ap.error(f"--device {args.device!r}: use cpu or cuda[:N]")
        if not torch.cuda.is_available():
            ap.error(f"--device {args.device!r}: torch sees no CUDA device here")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in (args.cases or DEFAULT_CASES[args.family]).split(","):
            if case not in cases:
                ap.error(f"unknown case {case!r} for --family {args.family}; choose from {sorted(cases)}")
            res = {"ours": [], "diffusers": []}
            outs = {}
            for _ in range(args.repeats):
                for impl in ("ours", "diffusers"):
                    r, outs[impl] = _run_child(impl, case, args.threads, tmp, args.mmap_threshold, args.device,
                                               args.family)
                    res[impl].append(r)
                    print(f"  {case} {impl}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, "
                          f"+{r['peak_above_model_mib']:.0f} MiB", flush=True)
            diff = (torch.load(outs["ours"]) - torch.load(outs["diffusers"])).abs().max().item()
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "cpu_seconds", "peak_above_model_mib")}
                   for k, v in res.items()}
            op, shape, dtype, mode = cases[case]
            row = {"family": args.family, "case": case, "op": op, "shape": shape, "dtype": dtype, "mode": mode, "median": med,
                   "runs": res, "speedup": med["diffusers"]["seconds"] / med["ours"]["seconds"],
                   "cpu_speedup": med["diffusers"]["cpu_seconds"] / med["ours"]["cpu_seconds"],
                   "memory_ratio": med["ours"]["peak_above_model_mib"] / max(1e-9, med["diffusers"]["peak_above_model_mib"]),
                   "max_abs_diff": diff}
            rows.append(row)
    print("\n| case | op | shape | dtype | ours s (CPU s) | diffusers s (CPU s) | speed-up wall / CPU | ours +MiB | "
          "diffusers +MiB | mem ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["median"]
        print(f"| {r['case']} | {r['op']}{_mode_label(r['mode'])} | {'x'.join(map(str, r['shape']))} | "
              f"{r['dtype']} | {m['ours']['seconds']:.1f} ({m['ours']['cpu_seconds']:.1f}) | "
              f"{m['diffusers']['seconds']:.1f} ({m['diffusers']['cpu_seconds']:.1f}) | "
              f"{r['speedup']:.2f}x / {r['cpu_speedup']:.2f}x | "
              f"{m['ours']['peak_above_model_mib']:.0f} | {m['diffusers']['peak_above_model_mib']:.0f} | "
              f"{r['memory_ratio']:.2f} | {r['max_abs_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
