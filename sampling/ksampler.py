"""ComfyUI's sampler wrapper for flow (`CONST`) models: what `comfy.samplers.KSAMPLER.sample` and
`KSampler.sample` do around a solver, on TwinFlow's schedules, noise and solvers.

  sigmas   `advanced_sigmas`: the KSampler grid (`schedules.sampler_sigmas`), cut at `last_step` (the
           last sigma set to 0 when `force_full_denoise`), then started at `start_step`
           (KSamplerAdvanced's split; None when nothing is left to run).
  in       x = sigma0 * noise + (1 - sigma0) * process_in(latent)   (an all-zero latent is not normalised)
  model    x0 = x - sigma * v, CFG on x0 (the `Branch`, which also builds image-to-video inputs); a LATENT
           noise_mask keeps its region at the known latent around each call (`image_cond.KnownRegion`)
  out      process_out(x / (1 - sigma_last))                       (`inverse_noise_scaling`)
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.handles import enter_text_caches
from ..core.progress import Progress, check_interrupt
from .guidance import Branch
from .image_cond import known_region
from .noise import latent_format_for
from .schedules import sampler_sigmas
from .solvers import get_solver
from .step_cache import BranchCache, config_for, percent_to_sigma_flow, text_lines

logger = logging.getLogger(__name__)


def advanced_sigmas(scheduler: str, steps: int, shift: float, sampler: str, *, start_step: int = 0,
                    last_step: Optional[int] = None, force_full_denoise: bool = True,
                    denoise: float = 1.0) -> Optional[torch.Tensor]:
    """The sigmas ComfyUI's `KSampler.sample` runs; None when `start_step` leaves no step (the latent is
    returned unchanged)."""
    sigmas = sampler_sigmas(scheduler, steps, shift, sampler, denoise)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0.0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


@dataclass
class SampleResult:
    latent: dict  # the output LATENT
    denoised: dict  # the last step's x0 prediction as a LATENT (SamplerCustomAdvanced's second output)


def sample(branch: Branch, latent: dict, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str,
           desc: str = "sampling") -> SampleResult:
    """Run `sampler` over `sigmas` from `latent` with `noise` (already drawn; zeros for no noise)."""
    samples = latent["samples"]
    if noise.shape != samples.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match the latent {tuple(samples.shape)}")
    if len(sigmas) == 0:
        out = {**latent, "samples": samples.clone()}
        return SampleResult(out, out)
    solver = get_solver(sampler)
    fmt = latent_format_for(branch.denoiser)
    device = branch.denoiser.device
    x0 = samples.to(device=device, dtype=torch.float32)
    if torch.count_nonzero(x0) > 0:  # ComfyUI leaves an empty latent un-normalised
        x0 = fmt.process_in(x0)
    noise = noise.to(device=device, dtype=torch.float32)
    known, denoise_mask = known_region(latent, samples.shape, x0, noise, branch.denoiser, device)
    branch.prepare(samples.shape[0], samples.shape, denoise_mask)
    s0 = float(sigmas[0])
    x = s0 * noise + (1.0 - s0) * x0
    last = {}

    # a step cache (TwinFlow Step Cache on the model, or `twinflow run --step-cache`) as in the TwinFlow samplers
    cfg = config_for(branch.denoiser, branch.name)
    if cfg is not None:
        shift = branch.denoiser.info.get("sampling_shift")
        if shift is None:
            raise ValueError(f"{desc}: step caching needs the model's sampling shift (ModelSamplingSD3 or a Wan "
                             f"model from UNETLoader)")
        branch.cache = BranchCache(cfg, branch.name, sigmas, percent_to_sigma_flow(float(shift)), branch.denoiser)

    def model(x: torch.Tensor, i: int) -> torch.Tensor:
        check_interrupt()
        sigma = float(sigmas[i])
        if known is not None:  # a noise mask (Wan22ImageToVideoLatent's start frames): KSamplerX0Inpaint
            x = known.model_input(x, sigma)
        den = x - sigma * branch.velocity(x, sigma, i)
        if known is not None:
            den = known.prediction(den)
        last["x0"] = den
        return den

    try:
        with contextlib.ExitStack() as caches, Progress(total=len(sigmas) - 1, desc=desc) as bar:
            enter_text_caches(caches, branch.denoiser)
            x = solver(model, x, sigmas, lambda i: bar.update(1))
        c = branch.cache
        if c is not None:
            for line in text_lines({branch.name: c.summary(max(0.0, branch.stats.seconds - c.overhead))}):
                logger.info("%s: %s", desc, line)
    finally:
        branch.cache = None  # drop the cached residuals with the run
    x = x / (1.0 - float(sigmas[-1]))  # inverse_noise_scaling (identity when the run ends at sigma 0)
    out = {**latent, "samples": fmt.process_out(x).to(device="cpu", dtype=torch.float32)}
    den = {**latent, "samples": fmt.process_out(last["x0"]).to(device="cpu", dtype=torch.float32)} if last else out
    return SampleResult(out, den)
