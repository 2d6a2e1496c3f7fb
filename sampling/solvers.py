"""ODE solvers for flow-matching sampling, written as ComfyUI runs them on `CONST` (flow) models.

Every solver takes `model(x, i) -> denoised`, the x0 prediction at noise level `sigmas[i]` (the caller
has applied CFG and, in the dual-branch sampler, the fusion of both branches), and calls it exactly once
per step, at `sigmas[0..steps-1]` in order. Multistep solvers keep a history of those predictions, so
they integrate the fused prediction. `on_step(i)` runs after step i (progress and interrupt).

ComfyUI treats the flow sigma as a k-diffusion sigma: x = x0 + sigma*eps with eps = (x - x0)/sigma. For
flow models (x - x0 = sigma * v) the Euler step is the flow Euler step x += v * dsigma, and the first-order
DPM-Solver++ step x' = (s'/s) x + (1 - s'/s) x0 is the exact DDIM step of the flow ODE for a fixed x0.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from ..core.log import log_once

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]
StepFn = Optional[Callable[[int], None]]

# ComfyUI's sample_unipc replaces a final sigma of 0 by this (its lambda = -log(sigma) is infinite at 0).
UNIPC_FINAL_SIGMA = 0.001


def _s(sigmas: torch.Tensor, i: int) -> float:
    return float(sigmas[i])


def euler(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepFn = None) -> torch.Tensor:
    """Euler (ComfyUI `euler`, no churn): x += (x - x0)/sigma * (sigma_next - sigma)."""
    for i in range(len(sigmas) - 1):
        s, s_next = _s(sigmas, i), _s(sigmas, i + 1)
        denoised = model(x, i)
        d = (x - denoised) / s  # the flow velocity v
        x = x + d * (s_next - s)
        if on_step is not None:
            on_step(i)
    return x


def dpmpp_2m(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepFn = None) -> torch.Tensor:
    """DPM-Solver++(2M) in ComfyUI's k-diffusion form (lambda = -log sigma); first order on the first and last step."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = _s(sigmas, i), _s(sigmas, i + 1)
        denoised = model(x, i)
        if old is None or s_next == 0:
            d = denoised
        else:
            h = math.log(s) - math.log(s_next)
            h_last = math.log(_s(sigmas, i - 1)) - math.log(s)
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        # (s'/s) x - expm1(-h) d with h = log(s/s'): expm1(-h) = s'/s - 1, exact also for s' = 0.
        ratio = s_next / s
        x = ratio * x + (1.0 - ratio) * d
        old = denoised
        if on_step is not None:
            on_step(i)
    return x


def _unipc_update(model: ModelFn, x, hist_m, hist_s, t: float, t_index: int, order: int, variant: str,
                  use_corrector: bool):
    """One UniPC-bh step from hist_s[-1] to t (data prediction, ComfyUI's `multistep_uni_pc_bh_update`).

    ComfyUI runs it in VP coordinates y = x / sqrt(1+s^2); dividing its update by alpha_t gives the same
    step in our coordinates: x_t = (t/s0) x - h_phi_1 m0 - B_h * residual.
    """
    s0, m0 = hist_s[-1], hist_m[-1]
    lam0, lam_t = -math.log(s0), -math.log(t)
    h = lam_t - lam0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (-math.log(hist_s[-(k + 1)]) - lam0) / h
        rks.append(rk)
        d1s.append((hist_m[-(k + 1)] - m0) / rk)
    rks.append(1.0)

    hh = -h
    h_phi_1 = math.expm1(hh)  # h*phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}; expected 'bh1' or 'bh2'")
    rows, b = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor(rows, dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)

    x_base = (t / s0) * x - h_phi_1 * m0
    if d1s:
        # order 2 uses the simplified predictor coefficient 0.5, as the UniPC reference does
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
        pred_res = sum(r * d for r, d in zip(rhos_p, d1s))
        x_t = x_base - b_h * pred_res
    else:
        x_t = x_base
    model_t = None
    if use_corrector:
        rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
        model_t = model(x_t, t_index)
        corr = model_t - m0
        corr_res = sum(r * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0
        x_t = x_base - b_h * (corr_res + rhos_c[-1] * corr)
    return x_t, model_t


def uni_pc(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepFn = None,
           variant: str = "bh1") -> torch.Tensor:
    """UniPC multistep predictor-corrector (ComfyUI `uni_pc` = bh1, `uni_pc_bh2` = bh2), order min(3, steps-1).

    As in ComfyUI, a final sigma of 0 is replaced by 0.001 and the result divided by (1 - 0.001): ComfyUI's
    `sample_unipc` writes 0.001 into the caller's sigma tensor, so its `inverse_noise_scaling` then divides by
    (1 - sigma_last). Reproduced for parity; the effect is a 0.1% rescale of the result.
    """
    steps = len(sigmas) - 1
    if steps < 1:
        return x
    ts = [float(s) for s in sigmas]
    final_rescale = 1.0
    if ts[-1] == 0:
        ts[-1] = UNIPC_FINAL_SIGMA
        final_rescale = 1.0 / (1.0 - UNIPC_FINAL_SIGMA)
    if steps == 1:
        # ComfyUI's order would be 0 and it would return the scaled noise; take one first-order step instead.
        log_once(logger, ("unipc_one_step",), "uni_pc with 1 step: taking a single first-order (DDIM) step")
        m = model(x, 0)
        x = (ts[1] / ts[0]) * x + (1 - ts[1] / ts[0]) * m
        if on_step is not None:
            on_step(0)
        return x * final_rescale
    repeated = next((i for i in range(steps) if ts[i + 1] >= ts[i]), None)
    if repeated is not None:  # UniPC steps in log-sigma: an equal (or rising) pair has no step size
        raise ValueError(f"uni_pc: sigmas {repeated} and {repeated + 1} of the schedule are not decreasing "
                         f"({ts[repeated]:.6g} -> {ts[repeated + 1]:.6g}; too many steps for this scheduler/shift "
                         f"in float32): use fewer steps, another scheduler, or euler")
    order = min(3, steps - 1)
    hist_m = [model(x, 0)]
    hist_s = [ts[0]]
    if on_step is not None:
        on_step(0)
    for step_index in range(1, steps):
        if step_index < order:  # warm-up with increasing order; the corrector evaluates the model at t
            x, m = _unipc_update(model, x, hist_m, hist_s, ts[step_index], step_index, step_index, variant, True)
            hist_m.append(m)
            hist_s.append(ts[step_index])
        else:
            last = step_index == steps - 1
            for step in range(step_index, step_index + 1 + int(last)):
                step_order = min(order, steps + 1 - step)  # lower order on the final steps
                use_corrector = step != steps  # no model call after the final step
                x, m = _unipc_update(model, x, hist_m, hist_s, ts[step], step, step_order, variant, use_corrector)
                hist_s = hist_s[1:] + [ts[step]] if len(hist_s) >= order else hist_s + [ts[step]]
                if step < steps:
                    hist_m = hist_m[1:] + [m] if len(hist_m) >= order else hist_m + [m]
        if on_step is not None:
            on_step(step_index)
    return x * final_rescale


def uni_pc_bh2(model: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepFn = None) -> torch.Tensor:
    return uni_pc(model, x, sigmas, on_step, variant="bh2")


SOLVERS: dict[str, Callable] = {
    "euler": euler,
    "uni_pc": uni_pc,
    "uni_pc_bh2": uni_pc_bh2,
    "dpmpp_2m": dpmpp_2m,
}
SAMPLER_NAMES = tuple(SOLVERS)


def get_solver(name: str) -> Callable:
    if name not in SOLVERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return SOLVERS[name]
