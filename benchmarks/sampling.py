"""Cost of the dual-branch machinery: an alpha = 1 / alpha = 0 dual step against a single-model step, and the
FFT split against a model step.

    python -m twinflow.benchmarks.sampling [--device cpu|cuda] [--layers 2] [--repeats 5] [--threads N] [--json]

Models: a Wan2.1-1.3B-shaped DiT (dim 1536, ffn 8960, 12 heads, text 4096) with `--layers` blocks (30 in the
real model; per-block time scales the step), and the tiny Wan DiT (where fixed per-step overheads show most).
Ratios are medians of interleaved runs in the same process, so machine load affects both sides alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from twinflow.benchmarks import cpu_name


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _denoiser(module, name):
    from twinflow.core.handles import Denoiser

    cfg = module.config
    return Denoiser(module=module, family="wan_dit", in_channels=cfg.in_dim, text_dim=cfg.text_dim, name=name,
                    config=cfg, info={"latent_format": "wan21"})


def _step_times(make_run, repeats):
    """Median seconds per step of several run closures, run interleaved `repeats` times."""
    names = list(make_run)
    times = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            times[n].append(make_run[n]())
    return {n: statistics.median(v) for n, v in times.items()}


def bench_dual_overhead(module, device, latent_shape, steps, repeats, dtype):
    from twinflow.models.text import conditioning, tiny_text_encode
    from twinflow.sampling.dual import sample
    from twinflow.sampling.gates import GateSchedule
    from twinflow.sampling.guidance import Branch

    S = _denoiser(module, "semantic")
    D = _denoiser(module, "detail")  # same weights: alpha = 0 must cost what the detail model alone costs
    pos = conditioning(tiny_text_encode("a fox in the snow", width=S.text_dim).to(dtype))
    lat = {"samples": torch.zeros(latent_shape)}
    args = dict(seed=0, steps=steps, sampler="uni_pc", scheduler="simple", shift=8.0)

    def run(detail, gate):
        def go():
            _sync(device)
            t0 = time.perf_counter()
            sample(Branch(S, pos, None, 1.0), lat, detail=Branch(D, pos, None, 1.0, name="detail") if detail else None,
                   gate=gate, **args)
            _sync(device)
            return (time.perf_counter() - t0) / steps
        return go

    run(False, None)()  # warm-up (allocator, RoPE tables)
    t = _step_times({"single": run(False, None),
                     "dual_alpha1": run(True, GateSchedule("constant", alpha=1.0, cutoff=0.3)),
                     "dual_alpha0": run(True, GateSchedule("constant", alpha=0.0, cutoff=0.0))}, repeats)
    return {"step_s": t, "alpha1_overhead": t["dual_alpha1"] / t["single"] - 1,
            "alpha0_overhead": t["dual_alpha0"] / t["single"] - 1}


class _Zero(torch.nn.Module):
    """A free model (v = 0): what is left of a step is the sampler's own work."""

    def __init__(self, channels=16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"in_dim": channels, "text_dim": None})()

    def forward(self, x, t, context):
        return torch.zeros_like(x)


def bench_loop_overhead(device, latent_shape, steps, repeats):
    """Seconds per step of the sampler itself (model cost zero): single vs dual alpha=1 vs dual alpha=0."""
    from twinflow.sampling.dual import sample
    from twinflow.sampling.gates import GateSchedule
    from twinflow.sampling.guidance import Branch

    z = _Zero().to(device)
    S, D = _denoiser(z, "s"), _denoiser(z, "d")
    lat = {"samples": torch.zeros(latent_shape)}
    args = dict(seed=0, steps=steps, sampler="uni_pc", scheduler="simple", shift=8.0)

    def run(detail, gate):
        def go():
            _sync(device)
            t0 = time.perf_counter()
            sample(Branch(S), lat, detail=Branch(D, name="detail") if detail else None, gate=gate, **args)
            _sync(device)
            return (time.perf_counter() - t0) / steps
        return go

    run(False, None)()
    return _step_times({"single": run(False, None),
                        "dual_alpha1": run(True, GateSchedule("constant", alpha=1.0, cutoff=0.3)),
                        "dual_alpha0": run(True, GateSchedule("constant", alpha=0.0))}, repeats)


def bench_fft(shape, device, repeats):
    from twinflow.sampling.fusion import fuse

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(shape, generator=g).to(device)
    b = torch.randn(shape, generator=g).to(device)
    fuse(a, b, 0.5, 0.3)  # warm-up + mask cache
    out = {}
    for name, kw in (("fft_hw", {}), ("fft_thw", {"over_time": True}), ("blend", {"cutoff": 0.0})):
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fuse(a, b, 0.5, kw.get("cutoff", 0.3), over_time=kw.get("over_time", False))
            _sync(device)
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def bench_forward(module, device, latent_shape, repeats, dtype):
    from twinflow.models.text import tiny_text_encode

    x = torch.randn(latent_shape, device=device, dtype=dtype)
    t = torch.full((latent_shape[0],), 500.0, device=device)
    ctx = tiny_text_encode("a fox in the snow", width=module.config.text_dim).to(device=device, dtype=dtype)
    with torch.no_grad():
        module(x, t, ctx)
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            module(x, t, ctx)
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    from twinflow.models import wan_dit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=2, help="blocks of the 1.3B-shaped DiT (real model: 30)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--latent", default="1,16,3,16,16", help="B,C,T,H,W for the 1.3B-shaped step")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 1 on cpu: on a shared machine OpenMP waits dominate small ops)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    dev = a.device
    if a.threads or not dev.startswith("cuda"):
        torch.set_num_threads(a.threads or 1)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    lat = tuple(int(v) for v in a.latent.split(","))
    res = {"machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads"
                      + (f", {torch.cuda.get_device_name()}" if dev.startswith("cuda") else ""),
           "device": dev, "dtype": str(dtype), "torch": torch.__version__}

    tiny = wan_dit.random_wan_dit("tiny", dtype=dtype, device=dev)
    res["tiny"] = bench_dual_overhead(tiny, dev, (1, 16, 1, 8, 8), a.steps * 3, a.repeats, dtype)
    del tiny

    cfg = wan_dit.with_config(wan_dit.get_config("wan2.1-1.3b"), num_layers=a.layers)
    big = wan_dit.random_wan_dit(config=cfg, dtype=dtype, device=dev)
    res["wan1.3b_shaped"] = bench_dual_overhead(big, dev, lat, a.steps, a.repeats, dtype)
    fwd = bench_forward(big, dev, lat, a.repeats, dtype)
    lat2 = lat[:3] + (lat[3] * 2, lat[4] * 2)
    fwd2 = bench_forward(big, dev, lat2, a.repeats, dtype)
    del big
    # per-block step time = A + B * tokens (A: text embedding and cross-attention K/V, independent of the latent);
    # the O(tokens^2) self-attention term is left out, and it only makes a real 480p step longer.
    tokens = lambda sh: sh[2] * (sh[3] // 2) * (sh[4] // 2)
    n1, n2 = tokens(lat), tokens(lat2)
    slope = max(0.0, (fwd2 - fwd) / (n2 - n1))
    const = max(0.0, fwd - slope * n1)
    per30 = 30 / a.layers  # embeddings/head scaled along with the blocks: small next to 30 blocks
    step30 = fwd * per30
    real = (1, 16, 21, 60, 104)  # 832x480, 81 frames -> 32760 tokens
    step30_real = (const + slope * tokens(real)) * per30
    res["forward_s"] = {"layers": a.layers, "latent": lat, "measured": fwd, "latent_x4": lat2, "measured_x4": fwd2,
                        "extrapolated_30_blocks": step30, "extrapolated_30_blocks_480p_81f_no_attention": step30_real}
    loop = bench_loop_overhead(dev, real, 10, max(5, a.repeats))
    res["loop_s_per_step_480p_latent"] = loop
    res["loop_overhead_vs_480p_step"] = {k: (loop[k] - loop["single"]) / step30_real for k in loop if k != "single"}
    res["fft_small"] = bench_fft(lat, dev, a.repeats * 4)
    res["fft_small"]["fraction_of_30_block_step"] = res["fft_small"]["fft_hw"] / step30
    res["fft_480p_81f"] = {"shape": real, **bench_fft(real, dev, a.repeats)}
    res["fft_480p_81f"]["fraction_of_step"] = res["fft_480p_81f"]["fft_hw"] / step30_real
    res["fft_480p_81f"]["fraction_thw"] = res["fft_480p_81f"]["fft_thw"] / step30_real
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
