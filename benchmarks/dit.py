"""Wan2.1 DiT forward: TwinFlow's `models.wan_dit` against diffusers' `WanTransformer3DModel`.

Both models hold the same random weights (ours -> diffusers through diffusers' own
`convert_wan_transformer_to_diffusers`) and get the same input: a prompt embedding of `--ctx-tokens`
real tokens, zero-padded to 512 as the official code does (diffusers is given the padded tensor; ours
pads internally, folding the padding; `--no-fold` also times the literal padding). A separate row times
ours as a sampler step after the first: inside `WanDiT.text_cache()` the text embedding and cross-attention
K/V come from the previous call (validated per call; never mixed into the cold forward). Times are the best
of `--repeats` runs, alternating the two models after one warm-up each, under `torch.inference_mode`.
Peak memory is the rise of the peak RSS (VmHWM, reset through /proc/self/clear_refs) over one call,
measured in a child process whose glibc unmaps freed blocks (MALLOC_MMAP_THRESHOLD_=65536).

    python -m twinflow.benchmarks.dit   # tiny + 1.3B-shaped 2 blocks, fp32 + bf16
    python -m twinflow.benchmarks.dit --configs tiny --dtypes fp32 --repeats 5 --no-fold

    python -m twinflow.benchmarks.dit --device cuda   # GPU: the real 1.3B config (30 blocks), bf16

With `--device cuda` the times are medians of CUDA-event-timed calls and the memory is the CUDA allocator's peak
above the model (written for GPU hosts, run by `./dev gpu`; not run on a GPU yet).

(from any directory, with TwinFlow installed; `python benchmarks/dit.py ...` in a checkout does the same).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from twinflow.benchmarks import cpu_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PADDING_LABEL = {True: "folded", False: "literal", "cached": "folded, sampler step (text K/V cached)"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rise_mib(fn) -> float:
    """Peak RSS rise (MiB) over one call, above the RSS before it. Meaningful only in a process started
    with MALLOC_MMAP_THRESHOLD_=65536 (see `memory_rows`), where freed tensors leave the RSS."""
    if not _reset_peak():
        return float("nan")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def measure_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of two calls, alternated (a, b, a, b, ...) after one warm-up each, so
    that load from other processes on a shared machine hits both alike; the minimum is the least
    disturbed run."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def build_pair(cfg, dtype, seed=0, device="cpu"):
    """Ours (fp32 islands kept) and diffusers' model (all `dtype`) with the same weights, on `device`."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from twinflow.models import wan_dit

    fp32 = wan_dit.random_wan_dit(config=cfg, seed=seed, dtype=torch.float32)
    sd = {k: v.clone() for k, v in fp32.state_dict().items()}
    ours = wan_dit.wan_dit_from_state_dict({k: v.to(device, dtype) for k, v in sd.items()}, "benchmark").to(device)
    with torch.device("meta"):
        ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                    attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                                    text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                    num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                                    qk_norm="rms_norm_across_heads", eps=cfg.eps)
    dsd = convert_wan_transformer_to_diffusers(sd)
    ref.load_state_dict({k: v.to(device, dtype) for k, v in dsd.items()}, strict=True, assign=True)
    ref.rope = type(ref.rope)(cfg.head_dim, cfg.patch_size, 1024).to(device)  # non-persistent buffers, built on meta
    del fp32, sd, dsd
    return ours.eval(), ref.eval()


def dit_config(cname):
    """A benchmark model config: tiny, 1.3b-2blocks (Wan2.1 1.3B widths, 2 of its 30 blocks) or 1.3b."""
    from twinflow.models import wan_dit

    if cname == "tiny":
        return wan_dit.get_config("tiny")
    if cname == "1.3b-2blocks":
        return wan_dit.with_config(wan_dit.get_config("wan2.1-1.3b"), num_layers=2)
    if cname == "1.3b":
        return wan_dit.get_config("wan2.1-1.3b")
    raise SystemExit(f"unknown config {cname!r}; use tiny, 1.3b-2blocks or 1.3b (the real config, 30 blocks)")


def _inputs(cfg, dtype, shape, ctx_tokens, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    t = torch.tensor([700.0] * shape[0], device=device)
    ctx = torch.randn(shape[0], ctx_tokens, cfg.text_dim, generator=g).to(device, dtype)
    ctx_padded = torch.cat([ctx, ctx.new_zeros(shape[0], cfg.text_len - ctx_tokens, cfg.text_dim)], 1)
    return x, t, ctx, ctx_padded


def _cuda_median_s(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls timed with CUDA events (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def _wall_median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _cuda_peak_rise_mib(fn) -> float:
    """CUDA allocator peak (allocated bytes) over one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def cuda_rows(cname="1.3b", dname="bf16", shape=(1, 16, 5, 60, 104), ctx_tokens=64, repeats=5, fits=None,
              device="cuda"):
    """Ours (folded text padding) vs diffusers on CUDA: median forward time with CUDA events, alternating the
    two models after a warm-up each; CUDA peak memory above the model; relative error. `fits(seconds, what)`
    (the GPU acceptance run's budget) may veto the timing after the models are built; then None.
    (`device="cpu"` runs the same steps with wall-clock times and no memory figure: the CPU test of this code.)"""
    cfg, dtype = dit_config(cname), DTYPES[dname]
    cuda = torch.device(device).type == "cuda"
    timer = _cuda_median_s if cuda else _wall_median_s
    t0 = time.perf_counter()
    ours, ref = build_pair(cfg, dtype, device=device)
    build_s = time.perf_counter() - t0
    x, t, ctx, ctx_padded = _inputs(cfg, dtype, shape, ctx_tokens, device)
    run_ours = lambda: ours(x, t, ctx)  # noqa: E731
    run_ref = lambda: ref(x, t, ctx_padded, return_dict=False)[0]  # noqa: E731
    with torch.inference_mode():
        want, got = run_ref().float(), run_ours().float()  # also the warm-up
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0 - build_s  # one call of each, first-call set-up included
        if fits is not None and not fits(repeats * warm_s + 3, f"DiT {cname} {dname} timing"):
            return None
        o, d = [], []
        for _ in range(repeats):
            o.append(timer(run_ours, 1))
            d.append(timer(run_ref, 1))
        peak_o, peak_d = (_cuda_peak_rise_mib(run_ours), _cuda_peak_rise_mib(run_ref)) if cuda else (None, None)
    ours_s, ref_s = statistics.median(o), statistics.median(d)
    pt, ph, pw = cfg.patch_size
    return {"config": cname, "layers": cfg.num_layers, "dtype": dname, "shape": "x".join(map(str, shape)),
            "tokens": shape[2] // pt * (shape[3] // ph) * (shape[4] // pw), "ctx_tokens": ctx_tokens,
            "ours_s": ours_s, "diffusers_s": ref_s, "speedup": ref_s / ours_s, "ours_peak_mib": peak_o,
            "diffusers_peak_mib": peak_d, "rel_err_vs_diffusers": ((got - want).norm() / want.norm()).item(),
            "build_s": build_s, "device": torch.cuda.get_device_name() if cuda else "cpu"}


def _cases(configs, dtypes, shape, ctx_tokens, fold_variants, sampler_step=True):
    """Yield (key, ours-call, diffusers-call, rel. error) for every config x dtype x fold, and a
    "cached" case (a sampler step with the text K/V cached) after the folded one, timed while the
    generator is suspended inside its text_cache() block."""
    for cname in configs:
        cfg = dit_config(cname)
        for dname in dtypes:
            dtype = DTYPES[dname]
            ours, ref = build_pair(cfg, dtype)
            x, t, ctx, ctx_padded = _inputs(cfg, dtype, shape, ctx_tokens)
            with torch.inference_mode():
                want = ref(x, t, ctx_padded, return_dict=False)[0].float()
                for fold in fold_variants:
                    ours.fold_text_padding = fold
                    got = ours(x, t, ctx).float()
                    rel = ((got - want).norm() / want.norm()).item()
                    yield ((cname, dname, fold), lambda: ours(x, t, ctx),
                           lambda: ref(x, t, ctx_padded, return_dict=False), rel)
                    if sampler_step and fold:
                        # A sampler step after the first: same prompt, so the text tokens and every block's
                        # cross-attention K/V come from text_cache() (validated against the context per call).
                        with ours.text_cache():
                            ours(x, t, ctx)  # fills the cache, as the first step of a run would
                            got = ours(x, t, ctx).float()
                            yield ((cname, dname, "cached"), lambda: ours(x, t, ctx),
                                   lambda: ref(x, t, ctx_padded, return_dict=False),
                                   ((got - want).norm() / want.norm()).item())
            del ours, ref


def time_rows(configs, dtypes, shape, ctx_tokens, repeats, fold_variants):
    rows = []
    for (cname, dname, fold), ours_fn, ref_fn, rel in _cases(configs, dtypes, shape, ctx_tokens, fold_variants):
        with torch.inference_mode():  # the tiny model is cheap: more runs for a steadier minimum
            o_time, d_time = measure_pair(ours_fn, ref_fn, repeats * (5 if cname == "tiny" else 1))
        rows.append({"config": cname, "dtype": dname, "fold": fold, "ours_s": o_time, "diffusers_s": d_time,
                     "speedup": d_time / o_time, "rel_err_vs_diffusers": rel})
    return rows


def memory_rows(configs, dtypes, shape, ctx_tokens, fold_variants) -> dict:
    """Peak RSS rise per case, measured in a child process whose glibc returns freed blocks to the OS."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--configs", *configs, "--dtypes", *dtypes,
           "--shape", *map(str, shape), "--ctx-tokens", str(ctx_tokens)] + (["--no-fold"] if len(fold_variants) > 1 else [])
    from twinflow.models import wan_dit

    if not wan_dit.ONEDNN_LINEAR:
        cmd.append("--no-onednn")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return {tuple(r["key"]): r for r in json.loads(out.strip().splitlines()[-1])}


def _memory_child(a, folds):
    res = []
    for key, ours_fn, ref_fn, _ in _cases(a.configs, a.dtypes, tuple(a.shape), a.ctx_tokens, folds):
        with torch.inference_mode():
            ref_fn(), ours_fn()  # warm-up
            res.append({"key": list(key), "ours_peak_mib": peak_rise_mib(ours_fn),
                        "diffusers_peak_mib": peak_rise_mib(ref_fn)})
    print(json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "1.3b-2blocks"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--shape", type=int, nargs=5, default=[1, 16, 5, 32, 32], metavar=("B", "C", "T", "H", "W"))
    p.add_argument("--ctx-tokens", type=int, default=32, help="real prompt tokens before padding to 512")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-fold", action="store_true", help="also time ours with the literal 512-token padding")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default); 1 gives steadier numbers on a loaded machine")
    p.add_argument("--no-onednn", action="store_true",
                   help="ours with aten's linear (as diffusers) instead of oneDNN's: isolates the GEMM backend")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: ours vs diffusers on the GPU (CUDA events, CUDA allocator peak; --configs default 1.3b, "
                        "--dtypes bf16, --shape 1 16 5 60 104, 64 prompt tokens); not run on a GPU yet")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "cuda":
        return _cuda_main(p, a, argv or [])
    if a.no_onednn:
        from twinflow.models import wan_dit

        wan_dit.ONEDNN_LINEAR = False
    if a.threads:
        torch.set_num_threads(a.threads)
    folds = (True, False) if a.no_fold else (True,)
    if a.memory_child:
        return _memory_child(a, folds)
    rows = time_rows(a.configs, a.dtypes, tuple(a.shape), a.ctx_tokens, a.repeats, folds)
    mem = memory_rows(a.configs, a.dtypes, tuple(a.shape), a.ctx_tokens, folds)
    for r in rows:
        r.update({k: v for k, v in mem[(r["config"], r["dtype"], r["fold"])].items() if k != "key"})
    print(f"# {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, input {tuple(a.shape)}, {a.ctx_tokens} prompt tokens -> 512, "
          f"ours' linears via {'aten' if a.no_onednn else 'oneDNN'}")
    print("| config | dtype | text padding | ours (s) | diffusers (s) | speedup | ours peak (MiB) | "
          "diffusers peak (MiB) | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {PADDING_LABEL[r['fold']]} | {r['ours_s']:.4f} | "
              f"{r['diffusers_s']:.4f} | {r['speedup']:.2f}x | {r['ours_peak_mib']:.0f} | "
              f"{r['diffusers_peak_mib']:.0f} | {r['rel_err_vs_diffusers']:.1e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def _cuda_main(p, a, argv) -> None:
    if not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    given = lambda flag: any(x == flag or x.startswith(flag + "=") for x in argv)  # noqa: E731
    configs = a.configs if given("--configs") else ["1.3b"]
    dtypes = a.dtypes if given("--dtypes") else ["bf16"]
    shape = tuple(a.shape) if given("--shape") else (1, 16, 5, 60, 104)
    ctx = a.ctx_tokens if given("--ctx-tokens") else 64
    rows = [cuda_rows(c, d, shape, ctx, max(3, a.repeats)) for c in configs for d in dtypes]
    print(f"# {rows[0]['device']}, torch {torch.__version__}, input {shape}, {ctx} prompt tokens -> 512")
    print("| config | dtype | tokens | ours (ms) | diffusers (ms) | speedup | ours peak (MiB) | diffusers peak (MiB) | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {r['tokens']} | {r['ours_s'] * 1e3:.1f} | {r['diffusers_s'] * 1e3:.1f} | "
              f"{r['speedup']:.2f}x | {r['ours_peak_mib']:.0f} | {r['diffusers_peak_mib']:.0f} | "
              f"{r['rel_err_vs_diffusers']:.1e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
