"""The dual-branch fusion as a ComfyUI GUIDER, so it composes with every core sampler and scheduler.

`TwinFlowDualBranchGuider` (built by `guider_class()`, a `comfy.samplers.CFGGuider` subclass) holds two core
MODELs. At every model evaluation the sampler asks for a denoised prediction; the guider runs each branch
with ComfyUI's own CFG (`sampling_function`, so conds, areas, hooks and patches behave as in core) and fuses

    x0 = LP_c(x0_S) + HP_c(alpha*x0_S + (1-alpha)*x0_D)

with the gate schedule's (alpha, c) for the current step. Fusing x0 is the same as fusing the velocities
(`sampling/fusion.py`): x0 = x - sigma*v is affine in v, the fusion is linear and LP + HP = identity, so
fuse(x - sigma*v_S, x - sigma*v_D) = x - sigma*fuse(v_S, v_D). Like `sampling/dual.py`, alpha = 1 runs only
the semantic model and alpha = 0 with c = 0 only the detail model.

The step index comes from the sigma grid ComfyUI passes in `transformer_options["sample_sigmas"]`: the step
whose interval [sigma_{i+1}, sigma_i] holds the evaluated sigma (midpoint evaluations of Heun/DPM-2 and the
raised sigmas of ancestral samplers belong to their step).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..sampling.fusion import DEFAULT_WIDTH, fuse

logger = logging.getLogger(__name__)


def step_index(sigmas, sigma: float) -> int:
    """0-based step of `sigma` in a decreasing grid `sigmas` (len steps+1): largest i with sigmas[i] >= sigma."""
    vals = [float(s) for s in sigmas]
    if len(vals) < 2:
        raise ValueError(f"the sigma grid needs at least 2 entries (1 step), got {len(vals)}")
    n = len(vals) - 1
    tol = 1e-6 * max(1.0, abs(vals[0]))
    idx = 0
    for i in range(n):
        if vals[i] + tol >= sigma:
            idx = i
        else:
            break
    return idx


def fused_prediction(x0_semantic: Callable[[], torch.Tensor], x0_detail: Callable[[], torch.Tensor], gate,
                     step: int, sigma: float, steps: int, *, over_time: bool = False,
                     width: float = DEFAULT_WIDTH, log: Optional[list] = None) -> torch.Tensor:
    """The fused denoised prediction at one evaluation; runs only the branches the gate needs."""
    alpha, cutoff = gate(step, sigma, steps)
    if alpha >= 1.0:
        ran, out = "S", x0_semantic()
    elif alpha <= 0.0 and cutoff <= 0.0:
        ran, out = "D", x0_detail()
    else:
        s = x0_semantic()
        d = x0_detail()
        ran, out = "S+D", fuse(s, d, alpha, cutoff, width, over_time)  # fuse upcasts half types for its FFT
    if log is not None:
        log.append((step, float(sigma), alpha, cutoff, ran))
    return out


_CLASS = None


def guider_class():
    """The CFGGuider subclass (ComfyUI imported here, on first use)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers

    from . import step_cache

    class TwinFlowDualBranchGuider(comfy.samplers.CFGGuider):
        """Semantic MODEL = this guider's model_patcher; the detail MODEL is loaded and conditioned alongside."""

        def __init__(self, semantic, detail, gate, cfg_semantic: float, cfg_detail: float, over_time: bool = False):
            super().__init__(semantic)
            self.detail_patcher = detail
            self.gate = gate
            self.cfg = cfg_semantic
            self.cfg_detail = cfg_detail
            self.over_time = over_time
            self.evaluations: list = []
            self.twinflow_branch_name = "semantic"  # the name the step cache reports this model's skips under

        def set_conds(self, positive, negative, positive_detail=None, negative_detail=None):
            conds = {"positive": positive, "negative": negative,
                     "positive_detail": positive if positive_detail is None else positive_detail,
                     "negative_detail": negative if negative_detail is None else negative_detail}
            self.inner_set_conds(conds)

        def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None):
            # Load the detail model next to the semantic one (ComfyUI frees memory for both up front).
            detail_conds = {k: self.conds[k] for k in ("positive_detail", "negative_detail")}
            self.detail_inner, _, self.detail_loaded = comfy.sampler_helpers.prepare_sampling(
                self.detail_patcher, noise.shape, detail_conds, self.detail_patcher.model_options)
            try:
                self.detail_patcher.pre_run()
                return super().outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                            disable_pbar, seed)
            finally:
                self.detail_patcher.cleanup()
                comfy.sampler_helpers.cleanup_models({}, self.detail_loaded)
                del self.detail_inner, self.detail_loaded

        def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                         seed):
            # CFGGuider.inner_sample converts conds for the semantic model; do the same for the detail model.
            latent = latent_image
            if latent is not None and torch.count_nonzero(latent) > 0:
                latent = self.detail_inner.process_latent_in(latent)
            detail = {"positive": self.conds.pop("positive_detail"), "negative": self.conds.pop("negative_detail")}
            self.detail_conds = comfy.samplers.process_conds(self.detail_inner, noise, detail, device, latent,
                                                             denoise_mask, seed)
            # The detail model keeps its own model options (its patches and wrappers), plus the sigma grid.
            opts = comfy.model_patcher.create_model_options_clone(self.detail_patcher.model_options)
            to = opts.setdefault("transformer_options", {})
            to["sample_sigmas"] = sigmas
            # the detail patcher's own wrappers (e.g. TwinFlow Step Cache's), as prepare_model_patcher merges the
            # semantic model's; its step cache gets its own run state (one cache per branch)
            comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), self.detail_patcher.wrappers,
                                                       copy_dict1=False)
            self.detail_cache = step_cache.start_run(to, sigmas, self.detail_patcher.get_model_object(
                "model_sampling"), getattr(self.detail_patcher.model, "diffusion_model", None), "detail")
            self.detail_model_options = opts
            self.evaluations = []
            try:
                return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                            disable_pbar, seed)
            finally:
                step_cache.finish_run(self.detail_cache)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
            sigma = float(timestep.reshape(-1)[0])
            if sigmas is None:
                raise RuntimeError("TwinFlow Dual-Branch Guider: ComfyUI did not pass sample_sigmas; run it from "
                                   "SamplerCustomAdvanced")
            step = step_index(sigmas, sigma)

            def semantic():
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                        self.conds.get("positive"), self.cfg,
                                                        model_options=model_options, seed=seed)

            def detail():
                return comfy.samplers.sampling_function(self.detail_inner, x, timestep,
                                                        self.detail_conds.get("negative"),
                                                        self.detail_conds.get("positive"), self.cfg_detail,
                                                        model_options=self.detail_model_options, seed=seed)

            return fused_prediction(semantic, detail, self.gate, step, sigma, len(sigmas) - 1,
                                    over_time=self.over_time, log=self.evaluations)

    _CLASS = TwinFlowDualBranchGuider
    return _CLASS
