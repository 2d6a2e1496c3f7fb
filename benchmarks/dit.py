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

    cd /work/main && .venv/bin/python benchmarks/dit.py   # tiny + 1.3B-shaped 2 blocks, fp32 + bf16
    .venv/bin/python benchmarks/dit.py --configs tiny --dtypes fp32 --repeats 5 --no-fold

(Run it as a script path, not `python -m` from the repository root: that puts the root on sys.path,
where transformers' probe for a top-level `kernels` package would find our `kernels/` folder.)
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

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


def build_pair(cfg, dtype, seed=0):
    """Ours (fp32 islands kept) and diffusers' model (all `dtype`) with the same weights."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from twinflow.models import wan_dit

    fp32 = wan_dit.random_wan_dit(config=cfg, seed=seed, dtype=torch.float32)
    sd = {k: v.clone() for k, v in fp32.state_dict().items()}
    ours = wan_dit.wan_dit_from_state_dict({k: v.to(dtype) for k, v in sd.items()}, "benchmark")
    with torch.device("meta"):
        ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                    attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                                    text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                    num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                                    qk_norm="rms_norm_across_heads", eps=cfg.eps)
    dsd = convert_wan_transformer_to_diffusers(sd)
    ref.load_state_dict({k: v.to(dtype) for k, v in dsd.items()}, strict=True, assign=True)
    ref.rope = type(ref.rope)(cfg.head_dim, cfg.patch_size, 1024)  # non-persistent buffers, built on meta
    del fp32, sd, dsd
    return ours.eval(), ref.eval()


CONFIGS = ("tiny", "1.3b-2blocks")


def dit_config(name: str):
    """A benchmark model config: `tiny`, or `1.3b-2blocks` (Wan2.1 1.3B widths, 2 of its 30 blocks)."""
    from twinflow.models import wan_dit

    if name == "tiny":
        return wan_dit.get_config("tiny")
    if name == "1.3b-2blocks":
        return wan_dit.with_config(wan_dit.get_config("wan2.1-1.3b"), num_layers=2)
    raise SystemExit(f"unknown config {name!r}; use {' or '.join(CONFIGS)}")


def _cases(configs, dtypes, shape, ctx_tokens, fold_variants, sampler_step=True):
    """Yield (key, ours-call, diffusers-call, rel. error) for every config x dtype x fold, and a
    "cached" case (a sampler step with the text K/V cached) after the folded one, timed while the
    generator is suspended inside its text_cache() block."""
    for cname in configs:
        cfg = dit_config(cname)
        for dname in dtypes:
            dtype = DTYPES[dname]
            ours, ref = build_pair(cfg, dtype)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(*shape, generator=g).to(dtype)
            t = torch.tensor([700.0] * shape[0])
            ctx = torch.randn(shape[0], ctx_tokens, cfg.text_dim, generator=g).to(dtype)
            ctx_padded = torch.cat([ctx, ctx.new_zeros(shape[0], cfg.text_len - ctx_tokens, cfg.text_dim)], 1)
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
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
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
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
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


if __name__ == "__main__":
    main()
