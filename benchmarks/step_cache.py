"""Step caching: the same sampling run with and without each policy; wall time, forwards saved, deviation.

For every policy the run is the same (model, prompt, negative prompt, seed, sampler, steps, CFG), through the
TwinFlow sampler (`sampling.dual.sample`, the code the TwinFlow Sampler node runs). Per policy it reports:
  * forwards: M (uncached) and N saved, counted from the model branch's own forward counter (not the cache's),
    and the same in latents pushed through the model (they differ where CFG's cond and uncond skip apart);
  * wall time of the whole run, median of `--repeats` runs interleaved with the uncached one, and the speed-up
    against M / (M - N) in latents, the most skipping them can give;
  * the policy's own overhead (its decisions, copies of the cached outputs) as % of one uncached step;
  * the deviation from the uncached result: latent relative L2, and PSNR of the decoded frames (Wan VAE).
With random weights (the default: no trained Wan2.1 checkpoint on this machine) the deviation says little about
image quality: random models neither converge nor respond to caching like trained ones. `--dit` / `--vae` take
trained checkpoints where a run has them.

    python benchmarks/step_cache.py                       # 1.3B-shaped DiT (real widths, 2 blocks), CPU
    python benchmarks/step_cache.py --smoke --json r.json # tiny model, seconds: checks the script end to end
    python -m twinflow.benchmarks.step_cache --help        # also as a module, from any directory

MagCache / TeaCache use the published Wan2.1 1.3B calibration (`calibration=wan2.1-1.3b`): the 1.3B-shaped model
has the real widths but not the real depth or weights, so their skip pattern is the published table's (MagCache)
or the random time embedding's (TeaCache), not a calibrated one. Last line of output: a markdown row per policy
for docs/sampling.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from twinflow.benchmarks import cpu_name

DEFAULT_POLICIES = ("easycache:0.2", "easycache:0.6", "magcache:0.12,calibration=wan2.1-1.3b",
                    "teacache:0.2,calibration=wan2.1-1.3b")
SMOKE_POLICIES = ("easycache:0", "easycache:0.6,start=0", "magcache:0.12,calibration=wan2.1-1.3b",
                  "teacache:0.2,calibration=wan2.1-1.3b")
TABLE_HEADER = ("| policy | forwards saved, latents saved (N/M) | speed-up (bound M/(M−N) in latents) | policy overhead "
                "(% of a step) | latent rel. L2 | frame PSNR | machine |\n|---|---|---|---|---|---|---|")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of frames in [-1, 1], clamped, on a [0, 1] scale; inf when identical."""
    a = (a.float().clamp(-1, 1) + 1) / 2
    b = (b.float().clamp(-1, 1) + 1) / 2
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def build(a):
    """(denoiser factory, VAE, positive, negative, latent) for the run."""
    from twinflow.benchmarks.dit import dit_config
    from twinflow.models import wan_dit, wan_vae
    from twinflow.models.text import conditioning, tiny_text_encode

    if a.dit:
        module = wan_dit.load_wan_dit(a.dit)
    else:
        module = wan_dit.random_wan_dit(config=dit_config(a.config), seed=0)
    module = module.eval()
    cfg = module.config
    if a.vae:
        from twinflow.models.wan_vae import load_wan_vae

        vae = load_wan_vae(a.vae)
    else:
        vae = wan_vae.random_wan_vae(a.vae_preset, seed=0)
    vae = vae.eval()

    def denoiser(step_cache=None):
        d = wan_dit.make_denoiser(module, "dit", a.dit or f"random:{a.config}")
        d.info["latent_format"] = "wan21"
        if step_cache is not None:
            d.info["step_cache"] = step_cache
        return d

    pos = conditioning(tiny_text_encode("a red fox running through fresh snow", width=cfg.text_dim))
    neg = conditioning(tiny_text_encode("blurry, low quality", width=cfg.text_dim))
    lat = {"samples": torch.zeros(tuple(int(v) for v in a.latent.split(",")))}
    return denoiser, vae, pos, neg, lat


def run_once(denoiser, pos, neg, lat, a, config):
    from twinflow.sampling.dual import sample
    from twinflow.sampling.guidance import Branch

    t0 = time.perf_counter()
    out, rep = sample(Branch(denoiser(config), pos, neg if a.cfg != 1.0 else None, a.cfg), lat, seed=a.seed,
                      steps=a.steps, sampler=a.sampler, scheduler="simple", shift=a.shift)
    return time.perf_counter() - t0, out["samples"], rep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="1.3b-2blocks", help="benchmark DiT config (benchmarks/dit.py): tiny | "
                   "1.3b-2blocks")
    p.add_argument("--dit", help="a trained Wan2.1 T2V checkpoint instead of random weights")
    p.add_argument("--vae", help="a trained Wan2.1 VAE instead of random weights (for the frame PSNR)")
    p.add_argument("--vae-preset", default="wan2.1", help="random VAE preset when --vae is not given")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="step cache specs as `twinflow run --step-cache` takes them")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent", default="1,16,3,16,16", help="B,C,T,H,W")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per policy, interleaved with uncached ones")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--save", help="directory to save each run's latent and decoded frames (.pt) in")
    p.add_argument("--smoke", action="store_true", help="tiny model and VAE, 8 steps, 1 repeat: checks the script")
    a = p.parse_args(argv)
    if a.smoke:
        a.config, a.vae_preset, a.steps, a.repeats, a.latent = "tiny", "tiny", 8, 1, "1,16,2,4,4"
        a.threads = a.threads or 1  # tiny ops: OpenMP waits would dominate on a shared machine
        if a.policies == list(DEFAULT_POLICIES):
            a.policies = list(SMOKE_POLICIES)
    if a.threads:
        torch.set_num_threads(a.threads)
    from twinflow.sampling.step_cache import parse_spec

    try:
        configs = [(spec, parse_spec(spec)) for spec in a.policies]
    except ValueError as e:
        p.error(str(e))
    if any(c is None for _, c in configs):
        p.error("a policy of none/off is the uncached baseline, which always runs")

    machine = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    denoiser, vae, pos, neg, lat = build(a)
    with torch.inference_mode():
        _, ref_latent, ref_rep = run_once(denoiser, pos, neg, lat, a, None)  # warm-up and the reference
        ref_frames = vae.decode(ref_latent)
        results = []
        base_times = []
        for spec, cfg in configs:
            times, ctimes = [], []
            for _ in range(a.repeats):  # uncached and cached alternated: machine load hits both alike
                t, _, _ = run_once(denoiser, pos, neg, lat, a, None)
                base_times.append(t)
                times.append(t)
                t, latent, rep = run_once(denoiser, pos, neg, lat, a, cfg)
                ctimes.append(t)
            frames = vae.decode(latent)
            # counted by the model branch itself (forwards made, latents pushed through), not by the cache
            m = ref_rep.branches["semantic"]["forwards"]
            n = m - rep.branches["semantic"]["forwards"]
            lm = ref_rep.branches["semantic"]["items"]
            ln = lm - rep.branches["semantic"]["items"]
            t_base, t_cached = statistics.median(times), statistics.median(ctimes)
            summary = rep.cache["semantic"]
            step_s = t_base / a.steps
            r = {"policy": spec, "config": summary["config"], "forwards_uncached": m, "forwards_saved": n,
                 "latents_uncached": lm, "latents_saved": ln, "skipped_steps": summary["skipped_steps"],
                 "seconds_uncached": t_base, "seconds_cached": t_cached, "speedup": t_base / t_cached,
                 # a forward's cost grows with its batch: the bound counts latents (= forwards without CFG, or
                 # with CFG where cond and uncond are skipped together)
                 "speedup_bound": lm / (lm - ln) if lm > ln else math.inf,
                 "policy_overhead_s": summary["overhead_seconds"],
                 "policy_overhead_pct_of_step": 100.0 * summary["overhead_seconds"] / a.steps / step_s,
                 "latent_rel_l2": rel_l2(latent, ref_latent), "frame_psnr_db": psnr(frames, ref_frames),
                 "report": rep.text()}
            results.append(r)
            if a.save:
                os.makedirs(a.save, exist_ok=True)
                torch.save({"latent": latent, "frames": frames}, os.path.join(a.save, f"run_{len(results)}.pt"))
        if a.save:
            torch.save({"latent": ref_latent, "frames": ref_frames}, os.path.join(a.save, "run_0.pt"))

    weights = "trained" if a.dit else "random"
    res = {"machine": machine, "torch": torch.__version__, "model": a.dit or a.config, "weights": weights,
           "vae": a.vae or f"random {a.vae_preset}", "steps": a.steps, "sampler": a.sampler, "cfg": a.cfg,
           "latent": a.latent, "repeats": a.repeats, "uncached_report": ref_rep.text(), "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    note = "" if a.dit else " (random weights: the deviation says little about quality)"
    print(f"model {res['model']} ({weights} weights), {a.steps} {a.sampler} steps, CFG {a.cfg}, latent {a.latent}; "
          f"{machine}")
    for r in results:
        print(f"{r['policy']}: {r['forwards_saved']}/{r['forwards_uncached']} forwards, {r['latents_saved']}/"
              f"{r['latents_uncached']} latents saved "
              f"(skipped steps {r['skipped_steps'] or 'none'}), {r['seconds_uncached']:.3f} s -> "
              f"{r['seconds_cached']:.3f} s = {r['speedup']:.2f}x (bound {r['speedup_bound']:.2f}x), policy overhead "
              f"{r['policy_overhead_pct_of_step']:.3f}% of a step, latent rel. L2 {r['latent_rel_l2']:.3e}, "
              f"frame PSNR {r['frame_psnr_db']:.2f} dB{note}")
    print(TABLE_HEADER)
    for r in results:
        print(table_row(r, res))
    return res


def table_row(r: dict, res: dict) -> str:
    """One markdown row for docs/sampling.md."""
    dev = "" if res["weights"] == "trained" else " (random weights)"
    return (f"| {r['policy']} | {r['forwards_saved']}/{r['forwards_uncached']}, {r['latents_saved']}/"
            f"{r['latents_uncached']} | {r['speedup']:.2f}x "
            f"({r['speedup_bound']:.2f}x) | {r['policy_overhead_pct_of_step']:.2f}% | {r['latent_rel_l2']:.2e}{dev} | "
            f"{r['frame_psnr_db']:.1f} dB{dev} | {res['machine']}; {res['model']}, {res['steps']} steps |")


if __name__ == "__main__":
    main()
