"""The sampling loop shared by the single-branch and the dual-branch sampler.

Per step i at noise level sigma_i the gate gives (alpha, c) and the prediction is
    v = LP_c(v_S) + HP_c(alpha*v_S + (1-alpha)*v_D)          (fusion.fuse)
fed to the solver as the x0 prediction x - sigma*v, so multistep solvers keep the fused history.
No wasted forwards: alpha = 1 runs only the semantic branch (LP(v_S) + HP(v_S) = v_S), alpha = 0 with
c = 0 only the detail branch. The single-branch sampler is this loop with no detail branch.

ComfyUI parity (`KSampler` on a flow model): noise from `prepare_noise(seed)`, sigmas from
`schedules.sampler_sigmas`, a non-empty input latent is normalised (`process_in`) and noised as
x = sigma_0*noise + (1-sigma_0)*latent, the solver runs, and the result is de-normalised (`process_out`).
Image-to-video: each branch builds its model's image inputs from its conditioning (`Branch.prepare`); a LATENT
noise mask keeps the known frames around every model call (`image_cond.KnownRegion`, as ComfyUI's KSampler).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.handles import enter_text_caches
from ..core.progress import Progress, check_interrupt
from .fusion import DEFAULT_WIDTH, fuse
from .gates import GateSchedule
from .guidance import Branch
from .image_cond import known_region
from .noise import latent_format_for, prepare_noise
from .schedules import sampler_sigmas
from .solvers import get_solver
from .step_cache import BranchCache, config_for, percent_to_sigma_flow, text_lines

logger = logging.getLogger(__name__)


@dataclass
class RunReport:
    sampler: str
    scheduler: str
    steps: int
    shift: float
    seed: int
    denoise: float
    gate: str
    sigmas: list = field(default_factory=list)
    alphas: list = field(default_factory=list)  # (alpha, cutoff, ran) per model evaluation; ran in {S, D, S+D}
    branches: dict = field(default_factory=dict)  # name -> {forwards, items, seconds, model}
    cache: dict = field(default_factory=dict)  # name -> step cache summary (step_cache.BranchCache.summary) or None
    fuse_seconds: float = 0.0
    total_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def text(self) -> str:
        lines = [f"TwinFlow sampler: {self.sampler} / {self.scheduler}, {self.steps} steps, shift {self.shift:g}, "
                 f"denoise {self.denoise:g}, seed {self.seed}", f"gate: {self.gate}"]
        for name, b in self.branches.items():
            lines.append(f"{name} ({b['model']}): {b['forwards']} forwards ({b['items']} latents), "
                         f"{b['seconds']:.3f} s")
        lines.extend(text_lines(self.cache))
        lines.append(f"fusion: {self.fuse_seconds:.3f} s; total {self.total_seconds:.3f} s")
        if self.alphas:
            lines.append("per step (alpha, cutoff, branches): " + "; ".join(
                f"{i + 1}:{a:.2f},{c:.2f},{r}" for i, (a, c, r) in enumerate(self.alphas)))
        return "\n".join(lines)


def _check_latent(latent) -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise TypeError("latent: expected a LATENT dict {'samples': Tensor[B,C,T,H,W]}; connect an Empty Latent "
                        "Video or a VAE Encode output")
    x = latent["samples"]
    if x.ndim != 5:
        raise ValueError(f"latent: expected samples [B, C, T, H, W] (a video latent), got shape {tuple(x.shape)}")
    return x


def _check_channels(latent: torch.Tensor, semantic: Branch, detail: Optional[Branch]) -> None:
    c = latent.shape[1]
    if detail is not None and semantic.latent_channels != detail.latent_channels:
        raise ValueError(
            f"the two models do not share a latent space: the semantic model "
            f"{semantic.denoiser.name or semantic.denoiser.family!r} works on {semantic.latent_channels} latent "
            f"channels, the detail model {detail.denoiser.name or detail.denoiser.family!r} on "
            f"{detail.latent_channels}; pair models made for the same VAE (e.g. Wan2.1 14B with Wan2.1 1.3B)")
    for b in (semantic, detail):
        if b is not None and b.latent_channels != c:
            raise ValueError(f"the latent has {c} channels but the {b.name} model "
                             f"{b.denoiser.name or b.denoiser.family!r} expects {b.latent_channels}; use a latent "
                             f"from this model family's VAE")


def sample(semantic: Branch, latent: dict, *, seed: int, steps: int, sampler: str = "euler",
           scheduler: str = "simple", shift: float = 8.0, denoise: float = 1.0, detail: Optional[Branch] = None,
           gate: Optional[GateSchedule] = None, over_time: bool = False, width: float = DEFAULT_WIDTH,
           noise: Optional[torch.Tensor] = None, desc: str = "sampling") -> tuple[dict, RunReport]:
    """Sample a LATENT with one branch or two; returns (new LATENT dict, RunReport).

    `gate` is required with a detail branch and ignored without one. `noise` overrides the seeded noise.
    """
    t_start = time.perf_counter()
    samples = _check_latent(latent)
    if detail is not None and gate is None:
        raise ValueError("a detail branch needs a GATE_SCHEDULE; connect a TwinFlow Gate Schedule")
    _check_channels(samples, semantic, detail)
    fmt = latent_format_for(semantic.denoiser)
    if detail is not None and latent_format_for(detail.denoiser).name != fmt.name:
        raise ValueError(f"the semantic and detail models declare different latent formats "
                         f"({fmt.name!r} vs {latent_format_for(detail.denoiser).name!r}); they must share a VAE")
    solver = get_solver(sampler)
    sigmas = sampler_sigmas(scheduler, steps, shift, sampler, denoise)
    report = RunReport(sampler=sampler, scheduler=scheduler, steps=max(0, len(sigmas) - 1), shift=float(shift),
                       seed=seed, denoise=float(denoise),
                       gate=gate.describe() if (gate is not None and detail is not None) else "single branch",
                       sigmas=[float(s) for s in sigmas])
    if noise is None:
        noise = prepare_noise(samples, seed, latent.get("batch_index"))
    elif noise.shape != samples.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match the latent {tuple(samples.shape)}")
    if len(sigmas) == 0:  # denoise 0: nothing to do
        return {**latent, "samples": samples.clone()}, report

    device = semantic.denoiser.device
    batch = samples.shape[0]
    x0 = samples.to(device=device, dtype=torch.float32)
    if torch.count_nonzero(x0) > 0:  # ComfyUI leaves an empty latent un-normalised
        x0 = fmt.process_in(x0)
    noise = noise.to(device=device, dtype=torch.float32)
    # a noise mask (Wan22ImageToVideoLatent's start frames) keeps its region, as ComfyUI's KSamplerX0Inpaint
    known, denoise_mask = known_region(latent, samples.shape, x0, noise, semantic.denoiser, device)
    for b in (semantic, detail):
        if b is not None:
            b.prepare(batch, samples.shape, denoise_mask)
            # one cache per branch: a branch's skips never use another branch's history
            cfg = config_for(b.denoiser, b.name)
            b.cache = BranchCache(cfg, b.name, sigmas, percent_to_sigma_flow(float(shift)), b.denoiser) \
                if cfg is not None else None
    s0 = float(sigmas[0])
    x = s0 * noise + (1.0 - s0) * x0
    n_steps = len(sigmas) - 1
    fuse_time = [0.0]

    def model(x: torch.Tensor, i: int) -> torch.Tensor:
        check_interrupt()
        sigma = float(sigmas[i])
        if detail is None:
            v, ran = semantic.velocity(x, sigma, i), "S"
            report.alphas.append((1.0, 0.0, ran))
            return x - sigma * v
        alpha, cutoff = gate(i, sigma, n_steps)
        if alpha >= 1.0:
            v, ran = semantic.velocity(x, sigma, i), "S"
        elif alpha <= 0.0 and cutoff <= 0.0:
            v, ran = detail.velocity(x, sigma, i), "D"
        else:
            v_s = semantic.velocity(x, sigma, i)
            v_d = detail.velocity(x, sigma, i)  # a skipped detail step returns its cached output: no forward
            t0 = time.perf_counter()
            v = fuse(v_s, v_d, alpha, cutoff, width, over_time)
            if v.is_cuda:
                torch.cuda.synchronize(v.device)
            fuse_time[0] += time.perf_counter() - t0
            ran = "S+D"
        report.alphas.append((alpha, cutoff, ran))
        return x - sigma * v

    last_x0: list = [None]  # the latest denoised estimate: a host may show it as a preview

    def model_keep(x: torch.Tensor, i: int) -> torch.Tensor:
        if known is None:
            last_x0[0] = model(x, i)
        else:
            x = known.model_input(x, float(sigmas[i]))
            last_x0[0] = known.prediction(model(x, i))
        return last_x0[0]

    try:
        with contextlib.ExitStack() as caches, Progress(total=n_steps, desc=desc) as bar:
            enter_text_caches(caches, semantic.denoiser, detail.denoiser if detail is not None else None)
            x = solver(model_keep, x, sigmas, lambda i: bar.update(1, preview=last_x0[0]))
        out = fmt.process_out(x).to(device="cpu", dtype=torch.float32)

        for b in (semantic, detail):
            if b is not None:
                report.branches[b.name] = {"forwards": b.stats.forwards, "items": b.stats.items,
                                           "seconds": round(b.stats.seconds, 4),
                                           "model": b.denoiser.name or b.denoiser.family}
                c = b.cache
                report.cache[b.name] = None if c is None else c.summary(max(0.0, b.stats.seconds - c.overhead))
    finally:
        for b in (semantic, detail):
            if b is not None:
                b.cache = None  # drop the cached residuals with the run
    report.fuse_seconds = round(fuse_time[0], 4)
    report.total_seconds = round(time.perf_counter() - t_start, 4)
    logger.info("%s", report.text())
    return {**latent, "samples": out}, report
