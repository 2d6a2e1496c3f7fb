"""Quality on trained weights: does the dual-branch sampler, a cached step, a quantized layer or a tile seam cost or
buy quality? Reads the shipped `trained:tiny` family (weights/trained_tiny/, tools/train_fixtures.py) and the
procedural data set (media/procedural.py); writes one markdown report.

Every generation uses the captions of held-out clips (seeds never trained on), one sample per caption with
sample seed i, the same sampler, schedule and shift, and is decoded by the trained VAE. Measures:
  * FD: Fréchet distance between the generated clips and the held-out real clips on the features of
    `RandomVideoFeatures`, a fixed, seeded random 3D conv net (never trained, so it favours none of the models
    under test, unlike the trained VAE's own encoder, which cannot see what it cannot reconstruct). Its
    features are per-channel means and standard deviations of ReLU responses at 64, 32 and 16 px, with
    3x3x3 kernels: colour and layout (means), edges, motion and fine texture (deviations). Two reference
    rows give the scale: FD of one held-out set against another (the floor at this sample count) and of the
    VAE's reconstructions (the best a DiT can do through this VAE).
  * HF ratio: the share of spatial spectral energy above half the Nyquist frequency (per frame and channel,
    mean removed), generated over real; 1 matches the data, below 1 is blurrier.
  * dual-branch (semantic DiT + detail refiner, fusion cutoff 0.5) for the gate kinds steps 3/6/9 (alpha from
    the gate net), boundary and learned, against the semantic DiT alone and the small DiT alone, at equal
    steps; semantic-only and small-only also at more steps, so each dual run has a single-branch run of about
    its wall time (the "equal wall time" column names it).
  * step caching (each policy and threshold, semantic branch): forwards saved, latent rel. L2 and frame PSNR
    against the uncached run, FD and HF ratio.
  * quantization (each format this machine runs): denoiser velocity cosine and rel. L2 against fp32 on
    held-out latents at 5 noise levels, FD and HF ratio.
  * VAE: held-out reconstruction PSNR (trained and random), and tiled / row-band decodes against the
    whole-frame decode: max abs seam error, PSNR against the whole-frame decode and against the real clip.

    python benchmarks/quality.py --out quality.md                      # shipped weights (~10 min, 2 cores)
    python benchmarks/quality.py --weights /tmp/tf_smoke --smoke       # weights of a --smoke training run
    python -m twinflow.benchmarks.quality --help

Wall times are this machine's; compare them only inside one report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from twinflow.benchmarks import cpu_name

FRAMES, SIZE = 9, 64
CUTOFF = 0.5  # the fusion cutoff the refiner was trained for (tools/train_fixtures.py)
SECTIONS = ("vae", "reference", "branches", "cache", "quant")
POLICIES = ("easycache:0.1", "easycache:0.2", "easycache:0.6", "magcache:0.12,calibration=wan2.1-1.3b",
            "magcache:0.3,calibration=wan2.1-1.3b", "teacache:0.2,calibration=wan2.1-1.3b")


# ---------------------------------------------------------------------------------------------
# Metrics (closed-form checks in tests/test_train_fixtures.py)
# ---------------------------------------------------------------------------------------------

class RandomVideoFeatures(nn.Module):
    """A fixed random 3D conv net: video [N, 3, T, H, W] in [-1, 1] -> features [N, 2 * width * 3]."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        c = 3
        for _ in range(3):
            conv = nn.Conv3d(c, width, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / (c * 27)))
                conv.bias.zero_()
            self.convs.append(conv)
            c = width
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h, feats = video.float(), []
        for k, conv in enumerate(self.convs):
            if k:
                h = F.avg_pool3d(h, (1, 2, 2))
            h = F.relu(conv(h))
            feats += [h.mean(dim=(2, 3, 4)), h.std(dim=(2, 3, 4))]
        return torch.cat(feats, dim=1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2) of feature sets [N, D] (float64; sample covariances)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    # Tr (C_a C_b)^1/2 = Tr (S C_b S)^1/2 with S = C_a^1/2: a symmetric PSD product, so eigvalsh is exact
    w, v = torch.linalg.eigh(ca)
    s = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s @ cb @ s).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)


def high_freq_fraction(video: torch.Tensor, cutoff: float = 0.5) -> float:
    """Share of the spatial power spectrum above `cutoff` x Nyquist (radius over H, W), per frame and channel
    with the mean removed, summed over the set. video [N, C, T, H, W]."""
    x = video.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    p = torch.fft.rfft2(x).abs().pow(2)
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64) / 0.5
    fx = torch.fft.rfftfreq(x.shape[-1], dtype=torch.float64) / 0.5
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    # rfft2 holds the positive-x half once: double the columns that stand for two (all but 0 and Nyquist)
    w = torch.full((x.shape[-1] // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if x.shape[-1] % 2 == 0:
        w[-1] = 1.0
    p = p * w
    total = float(p.sum())
    return float(p[..., r > cutoff].sum()) / total if total > 0 else 0.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between videos in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Models and generation
# ---------------------------------------------------------------------------------------------

def load_family(folder: Path) -> dict:
    from twinflow.models import refiner, wan_dit, wan_vae
    from twinflow.quant.load import load_wan_dit
    from twinflow.sampling.gates import load_gate_net

    files = {"vae": "vae.safetensors", "dit": "dit.safetensors", "small": "dit_small.safetensors",
             "refiner": "refiner.safetensors", "gate": "gate.safetensors"}
    missing = [str(folder / f) for f in files.values() if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"missing weights: {', '.join(missing)}; train them with `python tools/train_fixtures.py "
                         f"--out {folder}` (or pass --weights)")
    vae = wan_vae.load_wan_vae(folder / files["vae"]).eval()
    dit = wan_dit.make_denoiser(load_wan_dit(folder / files["dit"]), "trained:tiny", str(folder / files["dit"]))
    small = wan_dit.make_denoiser(load_wan_dit(folder / files["small"]), "trained:tiny-small",
                                  str(folder / files["small"]))
    rmod, rcfg = refiner.load_refiner(folder / files["refiner"])
    ref = refiner.make_denoiser(rmod, rcfg, "trained:tiny-refiner", str(folder / files["refiner"]))
    meta = {}
    from twinflow.models.loading import load_file

    for k, f in files.items():
        meta[k] = json.loads(load_file(folder / f)[1].get("twinflow.training", "{}"))
    return {"vae": vae, "dit": dit, "small": small, "refiner": ref, "gate_net": load_gate_net(folder / files["gate"]),
            "meta": meta}


def context(caption: str, width: int):
    from twinflow.models.text import conditioning, tiny_text_encode

    return conditioning(tiny_text_encode(caption, width=width))


def generate(semantic, captions, steps: int, *, detail=None, gate=None, a=None, cfg: float = 1.0) -> dict:
    """Raw latents of one sample per caption (sample seed i), wall seconds and model forwards. cfg > 1: the
    semantic branch's negative is zero conditioning, the unconditional the DiTs were trained with (dropped
    captions are all-zero rows; ConditioningZeroOut in a workflow)."""
    from twinflow.models.text import conditioning
    from twinflow.sampling.dual import sample
    from twinflow.sampling.guidance import Branch

    lats, forwards, t0 = [], {}, time.perf_counter()
    for i, cap in enumerate(captions):
        neg = conditioning(torch.zeros(1, 1, semantic.text_dim)) if cfg != 1.0 else None
        s = Branch(semantic, context(cap, semantic.text_dim), neg, cfg)
        d = Branch(detail, None, None, 1.0, name="detail") if detail is not None else None
        out, rep = sample(s, {"samples": torch.zeros(1, 16, 3, SIZE // 8, SIZE // 8)}, seed=i, steps=steps,
                          sampler=a.sampler, scheduler=a.scheduler, shift=a.shift, detail=d, gate=gate)
        lats.append(out["samples"])
        for name, b in rep.branches.items():
            forwards[name] = forwards.get(name, 0) + b["forwards"]
    return {"latents": torch.cat(lats), "seconds": time.perf_counter() - t0, "forwards": forwards}


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(latents[i:i + 1], bands=1) for i in range(latents.shape[0])])


class Scorer:
    """FD and HF ratio of generated videos against the held-out real clips."""

    def __init__(self, real: torch.Tensor):
        self.net = RandomVideoFeatures()
        self.real = real
        self.real_feats = self.net(real)
        self.real_hf = high_freq_fraction(real)

    def __call__(self, video: torch.Tensor) -> dict:
        return {"fd": frechet_distance(self.net(video), self.real_feats),
                "hf_ratio": high_freq_fraction(video) / self.real_hf}


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def section_reference(fam, a, real, captions, scorer) -> list[str]:
    from twinflow.media import procedural
    from twinflow.models import wan_dit

    other, _ = procedural.make_batch(procedural.split_seeds("heldout", a.n, start=a.n), FRAMES, SIZE)
    recon = decode(fam["vae"], fam["vae"].encode(real))
    cfg = fam["dit"].module.config
    rnd = wan_dit.make_denoiser(wan_dit.random_wan_dit(config=cfg, seed=0), "random (same config)", "random seed 0")
    g = generate(rnd, captions, a.steps, a=a)
    rows = [("held-out set B (floor at this N)", scorer(other)), ("VAE reconstruction of the held-out clips",
                                                                   scorer(recon)),
            (f"random-weight DiT (semantic config), {a.steps} steps", scorer(decode(fam["vae"], g["latents"])))]
    out = ["## Reference points", "", "| set | FD ↓ | HF ratio (1 = data) |", "|---|---|---|"]
    out += [f"| {name} | {m['fd']:.3f} | {m['hf_ratio']:.3f} |" for name, m in rows]
    return out + [""]


def section_vae(fam, a, real) -> list[str]:
    from twinflow.models import wan_vae

    vae = fam["vae"]
    z = vae.encode(real)
    whole = decode(vae, z)
    rnd = wan_vae.random_wan_vae("tiny", seed=0)
    out = ["## VAE (held-out clips)", "",
           f"Reconstruction PSNR: trained {psnr(whole, real):.2f} dB, random weights "
           f"{psnr(decode(rnd, rnd.encode(real)), real):.2f} dB ({a.n} clips, {FRAMES}x{SIZE}x{SIZE}).", "",
           "| decode | max abs seam error vs whole-frame | PSNR vs whole-frame (dB) | PSNR vs real (dB) |",
           "|---|---|---|---|", f"| whole frame | 0 | inf | {psnr(whole, real):.2f} |"]
    h = z.shape[-1]
    for label, kw in ((f"tiles {h // 2}, overlap 1 (latent px)", {"tile": (h // 2, 1), "tiling": "on"}),
                      (f"tiles {h // 2}, overlap 2", {"tile": (h // 2, 2), "tiling": "on"}),
                      ("row bands 2", {"bands": 2}), ("row bands 4", {"bands": 4})):
        try:
            dec = torch.cat([vae.decode(z[i:i + 1], **kw) for i in range(z.shape[0])])
        except ValueError as e:
            out.append(f"| {label} | n/a: {e} | | |")
            continue
        out.append(f"| {label} | {float((dec - whole).abs().max()):.4f} | {psnr(dec, whole):.2f} | "
                   f"{psnr(dec, real):.2f} |")
    return out + [""]


def section_branches(fam, a, captions, scorer) -> list[str]:
    from twinflow.sampling.gates import GateSchedule

    vae, s, k = fam["vae"], fam["dit"], a.steps
    gates = {"steps 3/6/9 (gate net alpha)": GateSchedule(kind="steps", fuse_steps=(3, 6, 9), cutoff=CUTOFF,
                                                          gate_net=fam["gate_net"]),
             "boundary 0.875": GateSchedule(kind="boundary", boundary=0.875, cutoff=CUTOFF),
             "learned (gate net)": GateSchedule(kind="learned", gate_net=fam["gate_net"], cutoff=CUTOFF)}
    for den in (s, fam["small"]):  # warm-up (first calls allocate and pick kernels): not timed
        generate(den, captions[:1], 2, detail=fam["refiner"] if den is s else None, gate=gates["learned (gate net)"]
                 if den is s else None, a=a)
    runs = []
    for name, den, steps in [("semantic DiT only", s, k), ("small DiT only", fam["small"], k)]:
        runs.append((name, steps, generate(den, captions, steps, a=a)))
    for name, gate in gates.items():
        runs.append((f"dual: semantic + refiner, {name}", k, generate(s, captions, k, detail=fam["refiner"],
                                                                        gate=gate, a=a)))
    for cfg in a.cfg:  # classifier-free guidance against the zero conditioning (the quickstart's setting)
        runs.append((f"semantic DiT only, CFG {cfg:g} (negative = zeros)", k, generate(s, captions, k, a=a, cfg=cfg)))
        runs.append((f"dual: semantic + refiner, steps 3/6/9 (gate net alpha), CFG {cfg:g} (negative = zeros)", k,
                     generate(s, captions, k, detail=fam["refiner"], gate=gates["steps 3/6/9 (gate net alpha)"],
                              a=a, cfg=cfg)))
    extra = []  # single-branch runs with more steps: the equal-wall-time partners
    for mult in a.time_steps:
        steps = max(1, round(k * mult))
        extra.append(("semantic DiT only", steps, generate(s, captions, steps, a=a)))
    for mult in (2, 3):
        extra.append(("small DiT only", k * mult, generate(fam["small"], captions, k * mult, a=a)))
    singles = [r for r in runs + extra if not r[0].startswith("dual") and "CFG" not in r[0]]
    out = [f"## Dual-branch vs single-branch ({a.sampler}/{a.scheduler}, shift {a.shift:g}, {a.n} captions)", "",
           "| run | steps | forwards (S / D) | wall s | FD ↓ | HF ratio | single-branch run of about equal wall time "
           "(FD) |", "|---|---|---|---|---|---|---|"]
    scores = {}
    for name, steps, g in runs + extra:
        scores[id(g)] = scorer(decode(vae, g["latents"]))
    for name, steps, g in runs + extra:
        m = scores[id(g)]
        fw = g["forwards"]
        partner = ""
        if name.startswith("dual") and "CFG" not in name:  # a CFG dual run's partner is the CFG row above it
            best = min(singles, key=lambda r: abs(r[2]["seconds"] - g["seconds"]))
            partner = f"{best[0]}, {best[1]} steps, {best[2]['seconds']:.1f} s (FD {scores[id(best[2])]['fd']:.3f})"
        out.append(f"| {name} | {steps} | {fw.get('semantic', 0)} / {fw.get('detail', 0)} | {g['seconds']:.1f} | "
                   f"{m['fd']:.3f} | {m['hf_ratio']:.3f} | {partner} |")
    base = scores[id(runs[0][2])]["fd"]
    duals = [(n, scores[id(g)]["fd"]) for n, _, g in runs if n.startswith("dual") and "CFG" not in n]
    best = min(duals, key=lambda r: r[1])
    verdict = "better than" if best[1] < base else "not better than"
    out += ["", f"At {k} steps the best dual-branch run ({best[0]}, FD {best[1]:.3f}) is {verdict} the semantic DiT "
            f"alone (FD {base:.3f})."]
    for cfg in a.cfg:
        sem, dual = (scores[id(g)]["fd"] for n, _, g in runs if f"CFG {cfg:g} " in n)
        out.append(f"With CFG {cfg:g}: semantic DiT alone FD {sem:.3f}, dual-branch (steps 3/6/9) FD {dual:.3f}.")
    return out + [""], runs[0][2]


def section_cache(fam, a, captions, scorer, ref) -> list[str]:
    from twinflow.sampling.step_cache import parse_spec

    vae = fam["vae"]
    ref_video = decode(vae, ref["latents"])
    m0 = scorer(ref_video)
    out = [f"## Step caching (semantic DiT, {a.steps} steps)", "",
           "| policy | forwards saved (N/M) | latent rel. L2 | frame PSNR vs uncached (dB) | FD ↓ | HF ratio | wall s |",
           "|---|---|---|---|---|---|---|",
           f"| none | 0/{ref['forwards']['semantic']} | 0 | inf | {m0['fd']:.3f} | {m0['hf_ratio']:.3f} | "
           f"{ref['seconds']:.1f} |"]
    for spec in a.policies:
        den = fam["dit"].clone(info={**fam["dit"].info, "step_cache": parse_spec(spec)})
        g = generate(den, captions, a.steps, a=a)
        video = decode(vae, g["latents"])
        m = scorer(video)
        saved = ref["forwards"]["semantic"] - g["forwards"]["semantic"]
        out.append(f"| {spec} | {saved}/{ref['forwards']['semantic']} | {rel_l2(ref['latents'], g['latents']):.4f} | "
                   f"{psnr(video, ref_video):.2f} | {m['fd']:.3f} | {m['hf_ratio']:.3f} | {g['seconds']:.1f} |")
    return out + [""]


def section_quant(fam, a, captions, scorer, ref, heldout_latents) -> list[str]:
    from twinflow.quant.formats import FORMATS
    from twinflow.quant.report import compare, quantize_denoiser
    from twinflow.quant.swap import Recipe

    den = fam["dit"]
    x0 = heldout_latents[:4]
    ctxs = [context(c, den.text_dim)[0][0] for c in captions[:x0.shape[0]]]  # [1, L_i, D] each
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = (0.1, 0.3, 0.5, 0.7, 0.9)

    def velocities(d):
        with torch.no_grad():
            return [torch.cat([d.velocity(((1 - s) * x0 + s * noise)[i:i + 1], torch.full((1,), s), c).float()
                               for i, c in enumerate(ctxs)]) for s in sigmas]

    v_ref = velocities(den)
    m0 = scorer(decode(fam["vae"], ref["latents"]))
    out = ["## Quantization (semantic DiT)", "",
           "| format | velocity cosine (worst of 5 sigmas) | velocity rel. L2 (worst) | FD ↓ | HF ratio |",
           "|---|---|---|---|---|", f"| fp32 | 1 | 0 | {m0['fd']:.3f} | {m0['hf_ratio']:.3f} |"]
    for name, fmt in FORMATS.items():
        why = fmt.unsupported_reason(den.device)
        if why:
            out.append(f"| {name} | n/a on this machine: {why} | | | |")
            continue
        qden, _ = quantize_denoiser(den, Recipe(format=name), force=True, latent_shape=(1,) + tuple(x0.shape[1:]))
        errs = [compare(r, q) for r, q in zip(v_ref, velocities(qden))]
        g = generate(qden, captions, a.steps, a=a)
        m = scorer(decode(fam["vae"], g["latents"]))
        out.append(f"| {name} | {min(e['cosine'] for e in errs):.6f} | {max(e['rel_l2'] for e in errs):.5f} | "
                   f"{m['fd']:.3f} | {m['hf_ratio']:.3f} |")
    return out + [""]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(root / "weights" / "trained_tiny"),
                   help="folder of the trained family (default: the shipped weights/trained_tiny)")
    p.add_argument("--out", help="write the markdown report here (atomic; refuses to overwrite)")
    p.add_argument("--n", type=int, default=64, help="held-out captions / clips per set (default 64)")
    p.add_argument("--steps", type=int, default=12, help="sampler steps for the equal-steps runs (default 12)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="simple")
    p.add_argument("--shift", type=float, default=3.0, help="sigma shift (default 3, as the training draws)")
    p.add_argument("--policies", nargs="*", default=list(POLICIES), help="step cache specs")
    p.add_argument("--time-steps", type=float, nargs="*", default=[1.25, 1.5, 2.0],
                   help="semantic-only runs at these multiples of --steps (equal-wall-time partners)")
    p.add_argument("--cfg", type=float, nargs="*", default=[3.0, 6.0],
                   help="extra rows with classifier-free guidance against zero conditioning (default 3 6)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--smoke", action="store_true", help="2 captions, 4 steps, two policies: checks the script")
    a = p.parse_args(argv)
    a.sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    bad = [x for x in a.sections if x not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; expected some of {list(SECTIONS)}")
    if a.smoke:
        a.n, a.steps, a.time_steps = 2, 4, [1.5]
        if a.policies == list(POLICIES):
            a.policies = a.policies[:2]
    return a


def main(argv=None) -> int:
    from twinflow.media import procedural
    from twinflow.models.wan_vae import normalize_latent

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    fam = load_family(Path(a.weights))
    real, captions = procedural.make_batch(procedural.split_seeds("heldout", a.n), FRAMES, SIZE)
    scorer = Scorer(real)
    root = Path(__file__).resolve().parents[1]
    shown = Path(a.weights).resolve()
    shown = shown.relative_to(root) if shown.is_relative_to(root) else shown  # no machine path for the shipped ones
    lines = ["# TwinFlow quality on the trained:tiny family", "",
             f"Weights: `{shown}` (training commit {fam['meta']['dit'].get('commit', '?')}, data seed "
             f"{fam['meta']['dit'].get('data_seed', '?')}). Machine: {cpu_name()}, torch {torch.__version__}, {a.threads} threads. "
             f"Command: `python benchmarks/quality.py {' '.join(argv if argv is not None else __import__('sys').argv[1:])}`.",
             "", "FD: Fréchet distance on a fixed random 3D conv net's features (lower is better); HF ratio: "
             "share of spectral energy above half Nyquist, generated / real.", ""]
    if "vae" in a.sections:
        lines += section_vae(fam, a, real)
    if "reference" in a.sections:
        lines += section_reference(fam, a, real, captions, scorer)
    ref = None
    if "branches" in a.sections:
        branch_lines, ref = section_branches(fam, a, captions, scorer)
        lines += branch_lines
    if ref is None and ("cache" in a.sections or "quant" in a.sections):
        generate(fam["dit"], captions[:1], 2, a=a)  # warm-up, not timed
        ref = generate(fam["dit"], captions, a.steps, a=a)  # the uncached, full-precision semantic run
    if "cache" in a.sections:
        lines += section_cache(fam, a, captions, scorer, ref)
    if "quant" in a.sections:
        lines += section_quant(fam, a, captions, scorer, ref, normalize_latent(fam["vae"].encode(real)))
    lines.append(f"Total benchmark time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        if out.exists():
            raise SystemExit(f"{out} exists; choose another --out")
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
