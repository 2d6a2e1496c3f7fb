"""The sampling loop shared by the single-branch and the dual-branch sampler.

Per step i at noise level sigma_i the gate gives (alpha, c) and the prediction is
    v = LP_c(v_S) + HP_c(alpha*v_S + (1-alpha)*v_D)          (fusion.fuse)
fed to the solver as the x0 prediction x - sigma*v, so multistep solvers keep the fused history.
No wasted forwards: alpha = 1 runs only the semantic branch (LP(v_S) + HP(v_S) = v_S), alpha = 0 with
c = 0 only the detail branch. The single-branch sampler is this loop with no detail branch.

Hard boundary gates (Wan2.2's two experts, `experts.py`) may run as two solver segments split at the switch
step k: the semantic branch over its grid's sigmas[0..k], then the detail branch over the grid of its own shift
from sigma_k' on, with a fresh solver (`handoff="restart"`, ComfyUI's two-KSamplerAdvanced template, whose
hand-over is x' = (1 - sigma_k') * process_in(process_out(x / (1 - sigma_k))), done here op for op); the default
keeps one solver across the switch and hands x over untouched (Wan2.2's own loop), which needs one grid.

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
from .experts import HANDOFFS
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


def _segments(sigmas, semantic, detail, gate, scheduler, steps, shift, sampler, denoise, shift_detail, handoff):
    """[(first step, sigmas, branch), ...] for a run split at a hard boundary, or None for one solver run."""
    if handoff not in HANDOFFS:
        raise ValueError(f"handoff must be one of {', '.join(HANDOFFS)}, got {handoff!r}")
    two_grids = shift_detail is not None and abs(float(shift_detail) - float(shift)) > 1e-12
    if detail is None or (handoff == "continue" and not two_grids):
        return None
    if not gate.hard_switch:
        raise ValueError(f"per-branch shifts and handoff 'restart' need a hard boundary gate (kind 'boundary', "
                         f"width 0, cutoff 0), got {gate.describe()}; set the blend width to 0, or use one shift "
                         f"and handoff 'continue'")
    if two_grids and handoff != "restart":
        raise ValueError(f"the branches' shifts differ ({float(shift):g} and {float(shift_detail):g}), so the schedule "
                         f"jumps at the switch and only a fresh solver can take it (ComfyUI's two-KSamplerAdvanced "
                         f"template does that); set handoff to 'restart' or give both branches the same shift")
    sig_d = sampler_sigmas(scheduler, steps, float(shift_detail), sampler, denoise) if two_grids else sigmas
    k, n = gate.switch_step(sigmas), len(sigmas) - 1
    if n <= 0:
        return None
    parts = [(0, sigmas[: k + 1], semantic), (k, sig_d[k:], detail)]
    return [p for p in parts if len(p[1]) > 1]  # a branch with no step gets no segment


def sample(semantic: Branch, latent: dict, *, seed: int, steps: int, sampler: str = "euler",
           scheduler: str = "simple", shift: float = 8.0, denoise: float = 1.0, detail: Optional[Branch] = None,
           gate: Optional[GateSchedule] = None, over_time: bool = False, width: float = DEFAULT_WIDTH,
           noise: Optional[torch.Tensor] = None, desc: str = "sampling", shift_detail: Optional[float] = None,
           handoff: str = "continue") -> tuple[dict, RunReport]:
    """Sample a LATENT with one branch or two; returns (new LATENT dict, RunReport).

    `gate` is required with a detail branch and ignored without one. `noise` overrides the seeded noise.
    `shift_detail` (None = `shift`) gives the detail branch its own sigma grid and `handoff="restart"` a fresh
    solver at the switch; both need a hard boundary gate (see the module docstring).
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
    segments = _segments(sigmas, semantic, detail, gate, scheduler, steps, shift, sampler, denoise, shift_detail,
                         handoff)
    report = RunReport(sampler=sampler, scheduler=scheduler, steps=max(0, len(sigmas) - 1), shift=float(shift),
                       seed=seed, denoise=float(denoise),
                       gate=gate.describe() if (gate is not None and detail is not None) else "single branch",
                       sigmas=[float(s) for s in sigmas])
    if segments is not None:
        report.sigmas = [float(v) for _, seg, _ in segments for v in seg[:-1]] + [float(segments[-1][1][-1])]
        if len(segments) == 2:
            (_, sig_s, _), (k, sig_d, _) = segments
            report.gate += (f"; handoff {handoff} at step {k + 1}: semantic to sigma {float(sig_s[-1]):.4f} (shift "
                            f"{float(shift):g}), detail from sigma {float(sig_d[0]):.4f} (shift "
                            f"{float(shift if shift_detail is None else shift_detail):g}) with a fresh {sampler}")
        else:
            report.gate += f"; handoff {handoff}: only the {segments[0][2].name} branch has steps"
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
            b_shift = float(shift_detail) if (b is detail and shift_detail is not None) else float(shift)
            b_sigmas = sigmas
            if segments is not None and b is detail and shift_detail is not None:
                b_sigmas = sampler_sigmas(scheduler, steps, float(shift_detail), sampler, denoise)
            b.cache = BranchCache(cfg, b.name, b_sigmas, percent_to_sigma_flow(b_shift), b.denoiser) \
                if cfg is not None else None
    s0 = float(segments[0][1][0] if segments else sigmas[0])  # a detail-only split run starts on its own grid
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
            if segments is None:
                x = solver(model_keep, x, sigmas, lambda i: bar.update(1, preview=last_x0[0]))
            else:  # one solver per branch, each over its own part of the schedule (ComfyUI's two passes)
                for n_seg, (start, seg_sigmas, branch) in enumerate(segments):
                    if n_seg > 0:
                        # the hand-over of ComfyUI's two passes, op for op (so a restart equals the template to the
                        # bit): the first pass returns the LATENT process_out(x / (1 - sigma_k)), the second takes it
                        # as a clean latent and re-noises it at its own grid's sigma_k' with zero noise:
                        # x' = (1 - sigma_k') * process_in(latent)  (= x when both grids agree, up to rounding)
                        s_end, s_new = float(segments[n_seg - 1][1][-1]), float(seg_sigmas[0])
                        handed = fmt.process_out(x / (1.0 - s_end))
                        if torch.count_nonzero(handed) > 0:  # ComfyUI leaves an all-zero latent un-normalised
                            handed = fmt.process_in(handed)
                        x = (1.0 - s_new) * handed
                    def seg_model(x, j, start=start, seg_sigmas=seg_sigmas, branch=branch):
                        check_interrupt()
                        sigma = float(seg_sigmas[j])
                        if known is not None:  # a noise mask keeps its region in both passes, as in ComfyUI's
                            x = known.model_input(x, sigma)
                        v = branch.velocity(x, sigma, start + j)
                        report.alphas.append((1.0, 0.0, "S") if branch is semantic else (0.0, 0.0, "D"))
                        last_x0[0] = x - sigma * v if known is None else known.prediction(x - sigma * v)
                        return last_x0[0]
                    x = solver(seg_model, x, seg_sigmas, lambda j: bar.update(1, preview=last_x0[0]))
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
