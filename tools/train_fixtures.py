"""Train the `trained:tiny` family on the procedural data set (media/procedural.py), deterministically.

Stages, in order (each writes one safetensors file with its training config, data seed, git commit and
metrics in the metadata key `twinflow.training`):
  vae      a Wan2.1 VAE at base width 8 (the `tiny` structure, 0.9 M parameters), trained for reconstruction
           (L1 + L2 + an L1 on the spatial image gradients, so fine texture is not averaged away) on random
           9-frame 32x32 crops (whole clips in time: a causal VAE trained on 5-frame windows never sees its
           caches past the second latent frame and decodes frames 6-9 badly); a light penalty keeps its normalised latents (Wan21 mean/std) near zero mean and
           unit variance, so the samplers' latent normalisation fits it. Metric: PSNR on held-out clips through
           the inference path (`WanVAE.encode` / `decode`, whole 9-frame 64x64 clips).
  dit      the semantic Wan2.1 DiT (dim 256, 2 blocks, text width 64) and
  small    a smaller one (dim 128, 1 block), both flow matching on the VAE's normalised latents
           (x = (1-s) x0 + s n, target n - x0, s from a shifted uniform), conditioned on the caption through
           the tiny hashed text encoder (models/text.tiny_text_encode), 10 % of captions dropped (CFG).
  refiner  the detail refiner (models/refiner.py, widths 16/32) on the high-frequency part of the velocity:
           loss |HP_c(v_D - v*)|^2 + 0.25 |LP_c(v_D - v*)|^2 with the fusion's own split (sampling/fusion.py,
           cutoff c = 0.5), so its capacity goes where the fused sampler uses it while it stays a usable
           denoiser on its own.
  gate     `twinflow fit-gate` (runner/fit_gate.py) on the semantic DiT and the refiner, with latents of
           held-out-free training clips sharing one caption (fit-gate takes one prompt).

    python tools/train_fixtures.py --out weights/trained_tiny          # the shipped weights (~30 min, 2 cores)
    python tools/train_fixtures.py --smoke --out /tmp/tf_smoke           # every stage in seconds (CI, checks)
    python tools/train_fixtures.py --only vae --vae-steps 200 --out /tmp/x

Deterministic: the data are seeded clips, every stage seeds torch itself, and the thread count is fixed
(`--threads`, default 2; float sums depend on it). `--*-budget-s` is a safety cap: a stage that hits it
stops early, says so in its log and metadata, and is then no longer reproducible step for step.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_fixtures")

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 9, 64
TEXT_DIM = 64  # width of the tiny hashed text encoder the DiTs are conditioned on
TEXT_TOKENS = 20  # captions are <= 16 tokens; zero rows pad them (the DiT's own padding token)
CUTOFF = 0.5  # the fusion cutoff the refiner is trained for and the gate is fitted with
FILES = {"vae": "vae.safetensors", "dit": "dit.safetensors", "small": "dit_small.safetensors",
         "refiner": "refiner.safetensors", "gate": "gate.safetensors"}
STAGES = tuple(FILES)
META_TRAINING = "twinflow.training"


def vae_config(dim: int = 8):
    """The Wan2.1 VAE structure at base width `dim` (8 = the `tiny` preset, 0.9 M parameters)."""
    from twinflow.models import wan_vae

    return wan_vae.WanVAEConfig(dim=dim, z_dim=16)


def dit_configs() -> dict:
    from twinflow.models import wan_dit

    base = wan_dit.PRESETS["tiny"]
    return {"dit": wan_dit.with_config(base, dim=256, num_heads=2, ffn_dim=768, num_layers=2, text_dim=TEXT_DIM),
            "small": wan_dit.with_config(base, dim=128, num_heads=1, ffn_dim=256, num_layers=1, text_dim=TEXT_DIM)}


def refiner_config():
    from twinflow.models import refiner

    return refiner.PRESETS["tiny"]


# Full run / smoke run settings. Steps are the reproducible knob; the budget only caps wall time.
FULL = {"vae_steps": 1800, "vae_batch": 5, "vae_frames": 9, "vae_crop": 32, "vae_lr": 2e-3, "vae_pool": 512,
        "pool": 1536, "dit_steps": 3000, "dit_batch": 16, "dit_lr": 5e-4,
        "small_steps": 3000, "small_batch": 16, "small_lr": 1e-3,
        "refiner_steps": 2500, "refiner_batch": 16, "refiner_lr": 1e-3,
        "gate_clips": 8, "gate_draws": 2, "gate_buckets": 10, "eval_clips": 32}
# Single-thread CPU seconds per step measured with these batches (busy shared machine, process_time):
# vae 0.47 (8 x 5 frames; now 5 x 9), dit 0.16, small 0.036, refiner 0.073 at batch 8 (~0.14 at 16); encoding the pool 0.03 s per clip
# -> about 31 min of one core in all (a 300/400/400/200-step run took 10 min of wall time on the busy machine).
SMOKE = {"vae_steps": 6, "vae_batch": 2, "vae_frames": 5, "vae_crop": 32, "vae_lr": 2e-3, "vae_pool": 4,
         "pool": 8, "dit_steps": 6, "dit_batch": 4, "dit_lr": 5e-4,
         "small_steps": 6, "small_batch": 4, "small_lr": 1e-3,
         "refiner_steps": 6, "refiner_batch": 2, "refiner_lr": 1e-3,
         "gate_clips": 2, "gate_draws": 1, "gate_buckets": 3, "eval_clips": 2}


# ---------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the repository this file lives in, with '-dirty' when tracked files differ (or 'unknown'); read
    once, at the start of the run (`settings_for`), so every file names the code that trained it, not a later HEAD."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("-dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def training_meta(stage: str, args, settings: dict, result: dict) -> dict:
    info = {"stage": stage, "data": "twinflow.media.procedural", "data_seed": args.seed,
            "split": "train (held-out seeds for metrics)", "frames": FRAMES, "size": SIZE,
            "settings": {k: v for k, v in settings.items() if k.split("_")[0] in (stage, "pool", "eval", "gate")},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
            "command": "python tools/train_fixtures.py " + " ".join(args.argv), "machine": platform.machine(),
            **result}
    return {META_TRAINING: json.dumps(info, sort_keys=True)}


def atomic_save(write, path: Path, force: bool) -> None:
    """Write through `write(tmp_path)` into a temp file beside `path`, then rename; never overwrite unless forced."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it (or choose another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are for everyone
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Loop:
    """Step counter with a wall-time cap and a loss log (means over windows of steps)."""

    def __init__(self, name: str, steps: int, budget_s: float):
        self.name, self.steps, self.budget_s = name, int(steps), float(budget_s)
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()  # CPU seconds (all threads): the duration estimate on a busy machine
        self.losses: list = []
        self.capped = False

    def __iter__(self):
        for i in range(self.steps):
            if self.budget_s > 0 and time.perf_counter() - self.t0 > self.budget_s:
                self.capped = True
                logger.warning("%s: wall-time cap %.0f s reached after %d of %d steps; this run is not "
                               "reproducible step for step", self.name, self.budget_s, i, self.steps)
                return
            yield i

    def log(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        every = max(1, self.steps // 20)
        if (i + 1) % every == 0 or i == 0:
            recent = self.losses[-every:]
            logger.info("%s step %d/%d loss %.5f (%.1f s)", self.name, i + 1, self.steps, sum(recent) / len(recent),
                        time.perf_counter() - self.t0)

    def summary(self) -> dict:
        n = max(1, len(self.losses) // 10)
        first = self.losses[:n]
        last = self.losses[-n:]
        return {"steps_done": len(self.losses), "seconds": round(time.perf_counter() - self.t0, 1),
                "capped": self.capped, "loss_first": sum(first) / max(1, len(first)),
                "loss_last": sum(last) / max(1, len(last)),
                "seconds_per_step": round((time.perf_counter() - self.t0) / max(1, len(self.losses)), 4),
                "cpu_seconds_per_step": round((time.process_time() - self.c0) / max(1, len(self.losses)), 4)}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def encode_text(captions, dropout: float = 0.0, gen=None) -> torch.Tensor:
    """Captions -> [B, TEXT_TOKENS, TEXT_DIM] (tiny hashed encoder; zero rows pad; dropped captions all zero)."""
    from twinflow.models.text import tiny_text_encode

    out = torch.zeros(len(captions), TEXT_TOKENS, TEXT_DIM)
    for i, c in enumerate(captions):
        if dropout > 0 and float(torch.rand((), generator=gen)) < dropout:
            continue
        e = tiny_text_encode(c, width=TEXT_DIM)[0]
        out[i, : e.shape[0]] = e[:TEXT_TOKENS]
    return out


def clips(split: str, n: int, start: int = 0, frames: int = FRAMES, size: int = SIZE, attrs=None):
    from twinflow.media import procedural

    return procedural.make_batch(procedural.split_seeds(split, n, start), frames, size, attrs)


# ---------------------------------------------------------------------------------------------
# VAE: a differentiable whole-clip pass through the model's own per-frame walks
# ---------------------------------------------------------------------------------------------

def vae_forward(vae, video: torch.Tensor, noise_std: float = 0.0, gen=None):
    """(reconstruction, latent mean) of video [B, 3, T, H, W] with grad, through `encoder.walk` / `decode_step`
    (the inference code; only the in-place-free norm differs, see fused/vae_norm.py)."""
    st = vae.init_state(channels_last=False)
    mus = []
    for i in range(video.shape[2]):
        y = vae.encoder.walk(video[:, :, i], st, keep=True)
        if y is not None:
            mus.append(vae.encode_mean(y))
    mu = torch.stack(mus, dim=2)  # (B, z, T', h, w)
    z = mu
    if noise_std > 0:  # decoder robustness to imperfect latents from the DiT
        z = mu + noise_std * torch.randn(mu.shape, generator=gen) * _wan_std(mu)
    st = vae.init_state(channels_last=False)
    frames = []
    for i in range(z.shape[2]):
        frames.extend(vae.decode_step(z[:, :, i], st))
    return torch.stack(frames, dim=2), mu


def _wan_std(z: torch.Tensor) -> torch.Tensor:
    from twinflow.models.wan_vae import WAN21_LATENT_STD

    return torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1).to(z)


def grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the spatial finite differences of two videos (keeps edges and fine texture sharp)."""
    dx = lambda v: v[..., :, 1:] - v[..., :, :-1]  # noqa: E731
    dy = lambda v: v[..., 1:, :] - v[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def vae_loss(vae, video: torch.Tensor, gen=None):
    from twinflow.models.wan_vae import normalize_latent

    rec, mu = vae_forward(vae, video, noise_std=0.02, gen=gen)
    zn = normalize_latent(mu)
    stats = zn.mean(dim=(0, 2, 3, 4)).pow(2).mean() + (zn.std(dim=(0, 2, 3, 4)) - 1).pow(2).mean()
    return (rec - video).abs().mean() + (rec - video).pow(2).mean() + grad_l1(rec, video) + 0.1 * stats


def random_crops(video: torch.Tensor, frames: int, crop: int, gen) -> torch.Tensor:
    """A random 1+4k-frame window and a crop (multiple of 8 px, so latents stay aligned) per clip."""
    out = []
    for v in video:
        t0 = int(torch.randint(v.shape[1] - frames + 1, (), generator=gen))
        y0 = 8 * int(torch.randint((v.shape[2] - crop) // 8 + 1, (), generator=gen))
        x0 = 8 * int(torch.randint((v.shape[3] - crop) // 8 + 1, (), generator=gen))
        out.append(v[:, t0:t0 + frames, y0:y0 + crop, x0:x0 + crop])
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def train_vae(args, s: dict):
    from safetensors.torch import save_file

    from twinflow.models import wan_vae

    torch.manual_seed(args.seed)
    if vae_config(args.vae_dim) == wan_vae.PRESETS["tiny"]:
        vae = wan_vae.random_wan_vae("tiny", seed=args.seed)  # the random:tiny init, then trained
    else:  # another width: PyTorch's default init (seeded above), laid out as the loaders lay it out
        vae = wan_vae.WanVAE(vae_config(args.vae_dim)).tap_major_()
    vae.train().requires_grad_(True)
    cfg = vae.cfg
    opt = torch.optim.Adam(vae.parameters(), lr=s["vae_lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["vae_lr"], total_steps=max(2, s["vae_steps"]), pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t = time.perf_counter()
    video_pool, _ = clips("train", s["vae_pool"])  # rendered once; each step crops a batch of them
    logger.info("vae: %d training clips rendered in %.1f s", video_pool.shape[0], time.perf_counter() - t)
    loop = Loop("vae", s["vae_steps"], args.vae_budget_s)
    for i in loop:
        idx = torch.randint(video_pool.shape[0], (s["vae_batch"],), generator=gen)
        loss = vae_loss(vae, random_crops(video_pool[idx], s["vae_frames"], s["vae_crop"], gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        loop.log(i, float(loss.detach()))
    vae.eval().requires_grad_(False)
    metrics = {**loop.summary(), **eval_vae(vae, s["eval_clips"])}
    logger.info("vae: %s", json.dumps(metrics))
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    meta = {"format": "pt", **training_meta("vae", args, s, {"config": {"dim": cfg.dim, "z_dim": cfg.z_dim},
                                                                 "metrics": metrics})}
    atomic_save(lambda p: save_file(sd, p, metadata=meta), Path(args.out) / FILES["vae"], args.force)
    return vae, loop


@torch.no_grad()
def eval_vae(vae, n: int) -> dict:
    """Held-out PSNR through the inference path, the share of the clips' high-frequency energy the
    reconstructions keep (benchmarks/quality.py's HF ratio), and the normalised latents' mean and std."""
    from twinflow.benchmarks.quality import high_freq_fraction
    from twinflow.models.wan_vae import normalize_latent

    video, _ = clips("heldout", n)
    z = vae.encode(video)
    rec = vae.decode(z)
    zn = normalize_latent(z)
    return {"heldout_psnr_db": round(psnr(rec, video), 3), "heldout_clips": n,
            "heldout_hf_ratio": round(high_freq_fraction(rec) / high_freq_fraction(video), 4),
            "latent_mean": round(float(zn.mean()), 4), "latent_std": round(float(zn.std()), 4)}


# ---------------------------------------------------------------------------------------------
# Latent pool, flow matching
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def latent_pool(vae, split: str, n: int, start: int = 0, attrs=None, chunk: int = 32):
    """(normalised latents [n, 16, 3, 8, 8], captions) of clips of `split` encoded by `vae`."""
    from twinflow.models.wan_vae import normalize_latent

    lats, caps = [], []
    for a in range(0, n, chunk):
        video, c = clips(split, min(chunk, n - a), start=start + a, attrs=attrs)
        lats.append(normalize_latent(vae.encode(video)))
        caps += c
    return torch.cat(lats), caps


def sample_sigmas(n: int, gen, shift: float = 3.0) -> torch.Tensor:
    """Flow-matching noise levels: uniform u pushed towards high noise by `shift` (as the samplers' shift)."""
    u = torch.rand(n, generator=gen).clamp(1e-3, 1 - 1e-3)
    return shift * u / (1 + (shift - 1) * u)


def fm_batch(pool, batch: int, gen, dropout: float = 0.0):
    lat, caps = pool
    idx = torch.randint(lat.shape[0], (batch,), generator=gen)
    x0 = lat[idx]
    n = torch.randn(x0.shape, generator=gen)
    s = sample_sigmas(batch, gen)
    x = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * n
    ctx = encode_text([caps[int(i)] for i in idx], dropout, gen)
    return x, s, ctx, n - x0


def dit_loss(module, x, s, ctx, target):
    return (module(x, s * 1000.0, ctx).float() - target).pow(2).mean()


def train_dit(args, s: dict, which: str, pool, heldout):
    from twinflow.models import wan_dit

    cfg = dit_configs()[which]
    torch.manual_seed(args.seed)
    module = wan_dit.random_wan_dit(config=cfg, seed=args.seed + (10 if which == "small" else 20))
    module.train().requires_grad_(True)
    steps, lr = s[f"{which}_steps"], s[f"{which}_lr"]
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(2, steps), pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed + 2)
    loop = Loop(which, steps, getattr(args, f"{which}_budget_s"))
    for i in loop:
        loss = dit_loss(module, *fm_batch(pool, s[f"{which}_batch"], gen, dropout=0.1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        loop.log(i, float(loss.detach()))
    module.eval().requires_grad_(False)
    metrics = {**loop.summary(), "heldout_fm_loss": heldout_fm_loss(lambda x, t, c: module(x, t, c), heldout),
               "params": sum(p.numel() for p in module.parameters())}
    logger.info("%s: %s", which, json.dumps(metrics))
    meta = training_meta(which, args, s, {"metrics": metrics})
    atomic_save(lambda p: wan_dit.save_wan_dit(module, p, meta), Path(args.out) / FILES[which], args.force)
    return module, loop


@torch.no_grad()
def heldout_fm_loss(fn, heldout, text: bool = True) -> float:
    """Flow-matching loss on held-out latents at fixed noise (seed 0) and 8 fixed sigmas."""
    lat, caps = heldout
    gen = torch.Generator().manual_seed(0)
    ctx = encode_text(caps) if text else None
    total = 0.0
    sigmas = [(k + 0.5) / 8 for k in range(8)]
    for sig in sigmas:
        n = torch.randn(lat.shape, generator=gen)
        x = (1 - sig) * lat + sig * n
        t = torch.full((lat.shape[0],), sig * 1000.0)
        total += float((fn(x, t, ctx).float() - (n - lat)).pow(2).mean())
    return round(total / len(sigmas), 5)


# ---------------------------------------------------------------------------------------------
# Refiner: the high band of the velocity
# ---------------------------------------------------------------------------------------------

def refiner_loss(model, x, s, target, cutoff: float = CUTOFF, lp_weight: float = 0.25):
    from twinflow.sampling.fusion import split

    err = model(x, s * 1000.0).float() - target
    low, high = split(err, cutoff)
    return high.pow(2).mean() + lp_weight * low.pow(2).mean()


def train_refiner(args, s: dict, pool, heldout, semantic=None):
    from safetensors.torch import save_file

    from twinflow.models import refiner

    torch.manual_seed(args.seed)
    model, cfg = refiner.random_refiner(refiner_config(), seed=args.seed + 30)
    model.train().requires_grad_(True)
    steps, lr = s["refiner_steps"], s["refiner_lr"]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(2, steps), pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed + 3)
    loop = Loop("refiner", steps, args.refiner_budget_s)
    for i in loop:
        x, sig, _ctx, target = fm_batch(pool, s["refiner_batch"], gen)
        loss = refiner_loss(model, x, sig, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loop.log(i, float(loss.detach()))
    model.eval().requires_grad_(False)

    metrics = {**loop.summary(), "params": refiner.param_count(model), "cutoff": CUTOFF,
               "heldout_fm_loss": heldout_fm_loss(lambda x, t, c: model(x, t), heldout, text=False),
               "heldout_high_band_loss": high_band_loss(lambda x, t, c: model(x, t), heldout, text=False)}
    if semantic is not None:  # the same loss of the semantic DiT: what the refiner has to beat in the high band
        metrics["heldout_high_band_loss_semantic"] = high_band_loss(lambda x, t, c: semantic(x, t, c), heldout)
    logger.info("refiner: %s", json.dumps(metrics))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", refiner.META_FAMILY: refiner.FAMILY, refiner.META_CONFIG: cfg.to_json(),
            **training_meta("refiner", args, s, {"metrics": metrics})}
    atomic_save(lambda p: save_file(sd, p, metadata=meta), Path(args.out) / FILES["refiner"], args.force)
    return model, loop


@torch.no_grad()
def high_band_loss(fn, heldout, text: bool = True) -> float:
    """|HP_c(v - v*)|^2 on held-out latents at fixed noise (seed 0) and 8 fixed sigmas."""
    from twinflow.sampling.fusion import split

    lat, caps = heldout
    gen = torch.Generator().manual_seed(0)
    ctx = encode_text(caps) if text else None
    total = 0.0
    for k in range(8):
        sig = (k + 0.5) / 8
        n = torch.randn(lat.shape, generator=gen)
        x = (1 - sig) * lat + sig * n
        t = torch.full((lat.shape[0],), sig * 1000.0)
        total += float(split(fn(x, t, ctx).float() - (n - lat), CUTOFF)[1].pow(2).mean())
    return round(total / 8, 5)


# ---------------------------------------------------------------------------------------------
# Gate: `twinflow fit-gate` on the trained pair
# ---------------------------------------------------------------------------------------------

GATE_ATTRS = {"shape": "square", "colour": "red", "texture": "checkered", "motion": "right", "spin": "clockwise",
              "background": "teal", "pan": "up"}  # fit-gate takes one prompt: clips that share one caption


def fit_gate(args, s: dict, vae):
    from safetensors.torch import load_file, save_file

    from twinflow.media import procedural
    from twinflow.runner.cli import main as twinflow_main

    out = Path(args.out)
    prompt = procedural.caption(GATE_ATTRS)
    with tempfile.TemporaryDirectory(prefix="twinflow-gate-") as tmp:
        with torch.no_grad():
            video, _ = clips("train", s["gate_clips"], start=0, attrs=GATE_ATTRS)
            z = vae.encode(video)  # raw VAE space, as fit-gate reads latents (it normalises them itself)
        for i in range(z.shape[0]):
            save_file({"latent_tensor": z[i:i + 1].contiguous()}, str(Path(tmp) / f"clip_{i:04d}.safetensors"))
        gate_tmp = Path(tmp) / "gate.safetensors"
        argv = ["fit-gate", "--semantic", f"wan:{out / FILES['dit']}", "--detail", f"refiner:{out / FILES['refiner']}",
                "--latents", tmp, "--out", str(gate_tmp), "--prompt", prompt, "--cutoff", str(CUTOFF),
                "--buckets", str(s["gate_buckets"]), "--draws", str(s["gate_draws"]), "--net", "tiny",
                "--seed", str(args.seed), "--device", "cpu"]
        logger.info("gate: twinflow %s", " ".join(argv))
        code = twinflow_main(argv)
        if code != 0:
            raise RuntimeError(f"twinflow fit-gate exited with {code}")
        sd = load_file(str(gate_tmp))
        from twinflow.models.loading import load_file as load_with_meta

        _, meta = load_with_meta(gate_tmp)
    fit = json.loads(meta.get("fit", "{}"))
    metrics = {"alphas": fit.get("alphas"), "net_alphas": fit.get("net_alphas"), "sigmas": fit.get("sigmas"),
               "prompt": prompt, "clips": s["gate_clips"], "cutoff": CUTOFF,
               "command": "twinflow " + " ".join(a if i % 2 == 0 or not a.startswith(("/", tempfile.gettempdir()))
                                                else "<tmp>" for i, a in enumerate(argv))}
    meta = {**meta, **training_meta("gate", args, s, {"metrics": metrics})}
    atomic_save(lambda p: save_file(sd, p, metadata=meta), out / FILES["gate"], args.force)
    logger.info("gate: alphas per sigma bucket %s", metrics["alphas"])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def load_stage(out: Path, stage: str):
    """A stage's module from an earlier run's file (for `--only` runs of later stages). Each `train_*` returns
    (module, Loop) and writes its file."""
    from twinflow.models import refiner, wan_dit, wan_vae

    path = out / FILES[stage]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage first (or drop --only)")
    if stage == "vae":
        return wan_vae.load_wan_vae(path).eval()
    if stage in ("dit", "small"):
        return wan_dit.load_wan_dit(path)
    return refiner.load_refiner(path)[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "weights" / "trained_tiny"),
                   help="folder for the weights (default: the repo's weights/trained_tiny, the trained:tiny presets)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI; never ship these)")
    p.add_argument("--only", help=f"comma-separated stages of {','.join(STAGES)} (later ones read earlier files)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2; float sums depend on it)")
    p.add_argument("--force", action="store_true", help="replace existing files in --out")
    for st in ("vae", "dit", "small", "refiner"):
        p.add_argument(f"--{st}-steps", type=int, help=f"{st} optimiser steps (default: full {FULL[st + '_steps']}, "
                                                       f"smoke {SMOKE[st + '_steps']})")
        p.add_argument(f"--{st}-budget-s", type=float, default=0.0,
                       help=f"wall-time cap of the {st} stage in seconds (0 = none; hitting it breaks reproducibility)")
    p.add_argument("--vae-dim", type=int, default=8,
                   help="VAE base width (default 8, the tiny structure, 3.7 MB; 12 costs about 1.5-2.5x the VAE "
                        "time and 8.2 MB, and was not better after 300 steps: see docs/quality.md)")
    p.add_argument("--pool", type=int, help="training clips encoded for the DiT/refiner stages (default 1536)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def settings_for(args) -> dict:
    s = dict(SMOKE if args.smoke else FULL)
    git_commit()  # the code this run starts from (cached: later files name it too)
    for st in ("vae", "dit", "small", "refiner"):
        if getattr(args, f"{st}_steps") is not None:
            s[f"{st}_steps"] = getattr(args, f"{st}_steps")
    if args.pool is not None:
        s["pool"] = args.pool
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    s = settings_for(args)
    stages = STAGES if not args.only else tuple(x.strip() for x in args.only.split(","))
    bad = [x for x in stages if x not in STAGES]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; expected some of {list(STAGES)}")
    out = Path(args.out)
    if not args.force:
        clash = [str(out / FILES[x]) for x in stages if (out / FILES[x]).exists()]
        if clash:
            raise SystemExit(f"{', '.join(clash)} exist; pass --force to replace them or choose another --out")
    t0 = time.perf_counter()
    vae = train_vae(args, s)[0] if "vae" in stages else load_stage(out, "vae")
    need_pool = any(x in stages for x in ("dit", "small", "refiner"))
    if need_pool:
        t = time.perf_counter()
        pool = latent_pool(vae, "train", s["pool"])
        heldout = latent_pool(vae, "heldout", s["eval_clips"])
        logger.info("latent pool: %d train + %d held-out clips in %.1f s", len(pool[1]), len(heldout[1]),
                    time.perf_counter() - t)
    semantic = None
    if "dit" in stages:
        semantic = train_dit(args, s, "dit", pool, heldout)[0]
    if "small" in stages:
        train_dit(args, s, "small", pool, heldout)
    if "refiner" in stages:
        if semantic is None and (out / FILES["dit"]).is_file():
            semantic = load_stage(out, "dit")
        train_refiner(args, s, pool, heldout, semantic)
    if "gate" in stages:
        fit_gate(args, s, vae)
    total = sum((out / f).stat().st_size for f in FILES.values() if (out / f).is_file())
    logger.info("done in %.1f s; weights in %s (%.1f MB in all)", time.perf_counter() - t0, out, total / 1e6)
    if total > 20e6:
        logger.warning("the weights take %.1f MB, over the 20 MB the repository ships; use smaller models",
                       total / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
