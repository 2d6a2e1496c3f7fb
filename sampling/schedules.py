"""Flow-matching sigma schedules: the shift, ComfyUI's schedulers, and the official Wan2.1 UniPC grid.

Flow matching (Wan, SD3, ComfyUI's `CONST`): x_sigma = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1].
The shift bends the grid towards high noise: sigma' = shift * sigma / (1 + (shift - 1) * sigma).

ComfyUI parity: `FlowModelSampling` rebuilds the 1000-entry float32 table of `ModelSamplingDiscreteFlow`
and the `simple` / `normal` / `sgm_uniform` / `beta` schedulers pick from it exactly as ComfyUI does, in
the same dtype and order of operations, so the same shift and steps give the same sigmas (to 1e-6).
`sampler_sigmas` adds what ComfyUI's `KSampler` does on top: the discarded penultimate sigma for the UniPC
samplers and the `denoise < 1` tail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta", "wan_unipc")
# ComfyUI's KSampler computes steps+1 sigmas for these samplers and drops the penultimate one.
DISCARD_PENULTIMATE = ("uni_pc", "uni_pc_bh2")


def shift_sigma(sigma, shift: float):
    """sigma' = shift*sigma / (1 + (shift-1)*sigma) (ComfyUI `time_snr_shift`); works on floats and tensors."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowModelSampling:
    """The discrete 1000-step flow table of ComfyUI's `ModelSamplingDiscreteFlow` for one shift."""

    shift: float = 1.0
    multiplier: float = 1000.0
    timesteps: int = 1000

    def __post_init__(self):
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")

    @property
    def sigmas(self) -> torch.Tensor:
        # float32 throughout, in ComfyUI's order: (arange/steps)*multiplier -> /multiplier -> shift.
        t = (torch.arange(1, self.timesteps + 1, 1) / self.timesteps) * self.multiplier
        return self.sigma(t)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return shift_sigma(timestep / self.multiplier, self.shift)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]


def simple(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    """Every (1000/steps)-th table entry from the top, then 0 (ComfyUI `simple`)."""
    table = ms.sigmas
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def normal(ms: FlowModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Uniform in timestep between sigma_max and sigma_min (ComfyUI `normal`; `sgm_uniform` with sgm=True)."""
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        ts = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        ts = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(t)) for t in ts]
    return torch.FloatTensor(sigs + ([0.0] if append_zero else []))


def _betainc(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (float64)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the Beta(a, b) CDF by bisection on `_betainc` (scipy is not a dependency)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):  # 2^-200 is far below float64 resolution; stops early when the interval collapses
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta(ms: FlowModelSampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Table entries at Beta(alpha, beta) quantiles, duplicates dropped (ComfyUI `beta`, arXiv 2407.12173)."""
    table = ms.sigmas
    total = len(table) - 1
    qs = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(np.array([beta_ppf(float(q), alpha, beta_) for q in qs]) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(table[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def wan_unipc(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The grid of Wan2.1's `FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)` (+ final 0).

    The official scheduler is built with shift=1, so its sigma_max is 1 - 1/N and sigma_min is 0; the grid is
    linspace(sigma_max, sigma_min, steps+1)[:-1], shifted in float64, then cast to float32.
    Note: Wan's pipeline feeds the model int64-truncated timesteps (sigma*1000); we feed sigma*1000 as float.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigma_max = 1.0 - 1.0 / num_train_timesteps
    sigmas = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def calculate_sigmas(scheduler: str, steps: int, shift: float) -> torch.Tensor:
    """`steps`+1 sigmas (last 0) for one scheduler name (ComfyUI `calculate_sigmas` + `wan_unipc`)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if scheduler == "wan_unipc":
        return wan_unipc(steps, shift)
    ms = FlowModelSampling(shift=float(shift))
    if scheduler == "simple":
        return simple(ms, steps)
    if scheduler == "normal":
        return normal(ms, steps)
    if scheduler == "sgm_uniform":
        return normal(ms, steps, sgm=True)
    if scheduler == "beta":
        return beta(ms, steps)
    raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")


def sampler_sigmas(scheduler: str, steps: int, shift: float, sampler: str = "euler",
                   denoise: float = 1.0) -> torch.Tensor:
    """The sigmas ComfyUI's `KSampler` would run for (sampler, scheduler, steps, denoise) at this shift.

    UniPC samplers get steps+1 sigmas with the penultimate dropped (ComfyUI's
    `DISCARD_PENULTIMATE_SIGMA_SAMPLERS`; not for the native `wan_unipc` grid). With denoise < 1 the grid is
    computed for int(steps/denoise) steps and only its last steps+1 sigmas are kept.
    """
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    if denoise <= 0.0:
        return torch.FloatTensor([])

    def full(n: int) -> torch.Tensor:
        discard = sampler in DISCARD_PENULTIMATE and scheduler != "wan_unipc"
        sig = calculate_sigmas(scheduler, n + 1 if discard else n, shift)
        return torch.cat([sig[:-2], sig[-1:]]) if discard else sig

    if denoise > 0.9999:
        return full(steps)
    return full(int(steps / denoise))[-(steps + 1):]
