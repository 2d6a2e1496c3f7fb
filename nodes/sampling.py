"""TwinFlow nodes: sampling — gate schedule, gate-net loader, single- and dual-branch samplers.

Thin classes: widgets -> one library call in `sampling/`. Both samplers run `sampling.dual.sample`.
"""
from __future__ import annotations

import logging

from ..core import paths
from ..core.log import log_once
from ..sampling.dual import sample
from ..sampling.experts import HANDOFFS, PRESETS as EXPERT_PRESETS, resolve as resolve_experts
from ..sampling.gates import GATE_KINDS, GATE_NET_PRESETS, GateNet, GateSchedule, load_gate_net, parse_floats, \
    parse_steps, plot_schedule
from ..sampling.guidance import Branch
from ..sampling.noise import SEED_MAX
from ..sampling.schedules import SCHEDULERS, sampler_sigmas
from ..sampling.solvers import SAMPLER_NAMES
from ..sampling.step_cache import CALIBRATIONS, DEFAULTS, POLICIES, WINDOW_UNITS, make_config
from ._inputs import as_model, with_step_cache
from ._loaders import model_names, random_preset

CATEGORY = "TwinFlow/sampling"
logger = logging.getLogger(__name__)

_SAMPLER = (list(SAMPLER_NAMES), {"default": "uni_pc", "tooltip": "ODE solver (ComfyUI's formulas)."})
_SCHEDULER = (list(SCHEDULERS), {"default": "simple", "tooltip": "Sigma schedule; simple/normal/sgm_uniform/beta "
                                 "as ComfyUI, wan_unipc = the official Wan2.1 UniPC grid."})
_STEPS = ("INT", {"default": 20, "min": 1, "max": 1000, "step": 1, "tooltip": "number of solver steps"})
_SHIFT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                    "tooltip": "Flow shift sigma' = shift*sigma/(1+(shift-1)*sigma). 0 = from the model, as core "
                               "KSampler: a core MODEL's sampling (ModelSamplingSD3 patch or its default, 8 for "
                               "Wan2.1), else 8. A value > 0 overrides the model (logged when they differ)."})
DEFAULT_SHIFT = 8.0  # ComfyUI's Wan2.1 sampling_settings shift, for models that carry no sampling shift
_DENOISE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                      "tooltip": "< 1 starts from the input latent (noised to the matching sigma)."})
_SEED = ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "step": 1, "control_after_generate": True,
                 "tooltip": "Noise seed; the same seed gives the same noise as ComfyUI's KSampler."})


def _cfg(tip: str):
    return ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": tip})


class TwinFlowGateSchedule:
    DESCRIPTION = "How much of the detail branch enters each step: alpha (1 = semantic only) and FFT cutoff."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (list(GATE_KINDS), {"default": "steps", "tooltip": "constant | linear | cosine ramp | fuse "
                         "only at listed steps | boundary (hard switch at sigma) | learned (gate net) | list"}),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "constant alpha; also alpha at the listed steps of kind 'steps'"}),
                "alpha_start": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "linear/cosine: alpha at the first step (1 = semantic only)"}),
                "alpha_end": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "linear/cosine: alpha at the last step (0 = detail only)"}),
                "fuse_steps": ("STRING", {"default": "3,6,9", "tooltip": "kind 'steps': steps (from 1) that fuse"}),
                "boundary": ("FLOAT", {"default": 0.875, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "kind 'boundary': semantic while sigma >= boundary (Wan2.2: 0.875 "
                                                  "T2V, 0.9 I2V)"}),
                "values": ("STRING", {"default": "", "tooltip": "kind 'list': one alpha per step, comma-separated"}),
                "cutoff": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.5, "step": 0.01,
                                     "tooltip": "FFT radius (fraction of Nyquist) below which the semantic branch is "
                                                "kept whole; 0 = plain blend"}),
                "preview_steps": ("INT", {"default": 20, "min": 1, "max": 1000, "step": 1,
                                          "tooltip": "steps for the plot only"}),
                "preview_shift": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                            "tooltip": "shift for the plot only"}),
            },
            "optional": {"gate_net": ("TWINFLOW_GATE_NET", {"tooltip": "for kinds 'learned' and 'steps'"}),
                         "boundary_width": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005,
                                                      "tooltip": "kind 'boundary': 0 = hard switch; > 0 = soft blend, "
                                                                 "alpha falls linearly from 1 to 0 across boundary "
                                                                 "+- width/2 (sigma)"})},
        }

    RETURN_TYPES = ("GATE_SCHEDULE", "IMAGE")
    RETURN_NAMES = ("gate", "plot")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, kind, alpha, alpha_start, alpha_end, fuse_steps, boundary, values, cutoff, preview_steps,
              preview_shift, gate_net=None, boundary_width=0.0):
        if kind != "boundary" and boundary_width > 0:
            log_once(logger, ("boundary_width", kind), "TwinFlow Gate Schedule: boundary_width %g applies to kind "
                     "'boundary' only; kind %r ignores it", boundary_width, kind)
        gate = GateSchedule(kind=kind, alpha=alpha, alpha_start=alpha_start, alpha_end=alpha_end,
                            fuse_steps=parse_steps(fuse_steps) if kind == "steps" else (3, 6, 9),
                            boundary=boundary, values=parse_floats(values, "values") if kind == "list" else (),
                            cutoff=cutoff, gate_net=gate_net,
                            width=float(boundary_width) if kind == "boundary" else 0.0)
        steps = len(gate.values) if kind == "list" else preview_steps
        plot = plot_schedule(gate, sampler_sigmas("simple", steps, preview_shift))
        return (gate, plot)


class TwinFlowLoadGateNet:
    DESCRIPTION = "Load a gate MLP made by `twinflow fit-gate` (random:<preset> = seeded random weights for demos)."

    @classmethod
    def INPUT_TYPES(cls):
        files = model_names("twinflow", GATE_NET_PRESETS)
        return {"required": {"gate_net_name": (files, {"tooltip": "file in models/twinflow/"})}}

    RETURN_TYPES = ("TWINFLOW_GATE_NET",)
    RETURN_NAMES = ("gate_net",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, gate_net_name):
        preset = random_preset(gate_net_name, GATE_NET_PRESETS, "gate net")
        if preset is not None:
            import torch

            with torch.random.fork_rng(devices=[]):  # seeded weights without touching the global RNG
                torch.manual_seed(0)
                net = GateNet(GATE_NET_PRESETS[preset]).eval()
            return (net,)
        return (load_gate_net(paths.find_model("twinflow", gate_net_name)),)


def resolve_shift(widget: float, *denoisers) -> float:
    """The shift a TwinFlow sampler uses: widget 0 = the (first) model's sampling shift, as core KSampler uses it;
    a widget > 0 wins, logged once when it differs from the model's own (so a ModelSamplingSD3 patch is never
    overridden silently)."""
    widget = float(widget)
    if not (widget >= 0.0):
        raise ValueError(f"input 'shift' must be >= 0 (0 = from the model), got {widget}")
    model_shift = next((float(d.info["sampling_shift"]) for d in denoisers if "sampling_shift" in d.info), None)
    src = next((d.info.get("sampling_shift_source", "the model") for d in denoisers if "sampling_shift" in d.info),
               "")
    for d in denoisers[1:]:
        other = d.info.get("sampling_shift")
        if other is not None and model_shift is not None and abs(float(other) - model_shift) > 1e-9:
            log_once(logger, ("shift_branches", model_shift, float(other)), "TwinFlow sampler: the models' sampling "
                     "shifts differ (%g and %g); the sigma grid uses %g", model_shift, float(other),
                     widget if widget > 0 else model_shift)
    if widget == 0.0:
        if model_shift is None:
            log_once(logger, ("shift_default",), "TwinFlow sampler: shift 0 = from the model, but the model carries "
                     "no sampling shift; using %g (ComfyUI's Wan2.1 default)", DEFAULT_SHIFT)
            return DEFAULT_SHIFT
        return model_shift
    if model_shift is not None and abs(widget - model_shift) > 1e-9:
        log_once(logger, ("shift_override", widget, model_shift), "TwinFlow sampler: the shift widget (%g) overrides "
                 "the model's sampling shift %g (from %s); set shift to 0 to use the model's", widget, model_shift,
                 src)
    return widget


class TwinFlowSampler:
    DESCRIPTION = "Sample a video latent with one TwinFlow model (same loop as the dual-branch sampler)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TWINFLOW_MODEL,MODEL", {"tooltip": "TwinFlow Load DiT, or a core MODEL (Load Diffusion Model; runs through ComfyUI's apply_model)"}),
                "latent": ("LATENT", {"tooltip": "start latent (Empty Latent Video, or an encoded video with denoise < 1)"}),
                "seed": _SEED,
                "steps": _STEPS,
                "cfg": _cfg("classifier-free guidance scale (1 = positive only, one forward per step)"),
                "sampler": _SAMPLER,
                "scheduler": _SCHEDULER,
                "shift": _SHIFT,
                "denoise": _DENOISE,
            },
            "optional": {"positive": ("CONDITIONING", {"tooltip": "text conditioning (omit for unconditional models)"}), "negative": ("CONDITIONING", {"tooltip": "negative conditioning for CFG (needed when cfg != 1)"})},
        }

    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, model, latent, seed, steps, cfg, sampler, scheduler, shift, denoise, positive=None, negative=None):
        branch = Branch(as_model(model), positive, negative, cfg, name="semantic")
        out, report = sample(branch, latent, seed=seed, steps=steps, sampler=sampler, scheduler=scheduler,
                             shift=resolve_shift(shift, branch.denoiser), denoise=denoise)
        return (out, report.text())


class TwinFlowDualBranchSampler:
    DESCRIPTION = ("Two models on one latent: a large semantic model and a light detail model, fused per step "
                   "under a gate schedule. alpha = 1 steps run only the semantic model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "semantic": ("TWINFLOW_MODEL,MODEL", {"tooltip": "the large model (global structure); TwinFlow or core MODEL"}),
                "detail": ("TWINFLOW_MODEL,MODEL", {"tooltip": "the light model (textures); must share the latent space; TwinFlow or core MODEL"}),
                "gate": ("GATE_SCHEDULE", {"tooltip": "alpha and FFT cutoff per step, from TwinFlow Gate Schedule"}),
                "latent": ("LATENT", {"tooltip": "start latent (Empty Latent Video, or an encoded video with denoise < 1)"}),
                "seed": _SEED,
                "steps": _STEPS,
                "cfg_semantic": _cfg("CFG scale of the semantic branch"),
                "cfg_detail": _cfg("CFG scale of the detail branch"),
                "sampler": _SAMPLER,
                "scheduler": _SCHEDULER,
                "shift": _SHIFT,
                "denoise": _DENOISE,
                "split": (["HW", "THW"], {"default": "HW", "tooltip": "FFT split over (H, W) per frame or over "
                                          "(T, H, W)"}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "prompt for both branches (unless a per-branch one is set)"}),
                "negative": ("CONDITIONING", {"tooltip": "negative conditioning for the semantic branch CFG (and the detail branch unless negative_detail is set)"}),
                "positive_detail": ("CONDITIONING", {"tooltip": "prompt for the detail branch only"}),
                "negative_detail": ("CONDITIONING", {"tooltip": "negative conditioning for the detail branch only"}),
            },
        }

    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, semantic, detail, gate, latent, seed, steps, cfg_semantic, cfg_detail, sampler, scheduler, shift,
            denoise, split, positive=None, negative=None, positive_detail=None, negative_detail=None):
        s = Branch(as_model(semantic, name="semantic"), positive, negative, cfg_semantic, name="semantic")
        d = Branch(as_model(detail, name="detail"), positive_detail if positive_detail is not None else positive,
                   negative_detail if negative_detail is not None else negative, cfg_detail, name="detail")
        out, report = sample(s, latent, seed=seed, steps=steps, sampler=sampler, scheduler=scheduler,
                             shift=resolve_shift(shift, s.denoiser, d.denoiser), denoise=denoise, detail=d, gate=gate, over_time=(split == "THW"))
        return (out, report.text())


class TwinFlowDualExpertSampler:
    DESCRIPTION = ("Wan2.2 A14B's two experts on one latent: the high-noise expert (semantic branch) while sigma >= "
                   "boundary, the low-noise expert (detail branch) below it, each with its own CFG and shift; one "
                   "expert per step (or a soft blend across the boundary). Presets hold Wan2.2's published values; "
                   "every widget left at 'preset' (or 0 / -1) uses them, and the report says which were set.")

    @classmethod
    def INPUT_TYPES(cls):
        preset_or = lambda names: (["preset"] + list(names), {"default": "preset"})
        return {
            "required": {
                "high_noise": ("TWINFLOW_MODEL,MODEL", {"tooltip": "the high-noise expert (e.g. wan2.2_t2v_high_noise"
                               "_14B_fp8_scaled.safetensors); runs the early, noisy steps"}),
                "low_noise": ("TWINFLOW_MODEL,MODEL", {"tooltip": "the low-noise expert (e.g. wan2.2_t2v_low_noise_14B"
                              "_fp8_scaled.safetensors); runs the late steps"}),
                "latent": ("LATENT", {"tooltip": "start latent (Empty Latent Video, or an encoded video with denoise < 1)"}),
                "preset": (list(EXPERT_PRESETS), {"default": "wan22_t2v_a14b", "tooltip": "Wan2.2's published "
                           "settings: t2v boundary 0.875, 40 steps, shift 12, cfg 4 high / 3 low; i2v boundary 0.9, "
                           "40 steps, shift 5, cfg 3.5 / 3.5 (uni_pc on Wan's own grid)"}),
                "seed": _SEED,
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "step": 1, "tooltip": "0 = the preset's"}),
                "cfg_high": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "CFG of the high-noise expert; -1 = the preset's"}),
                "cfg_low": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                      "tooltip": "CFG of the low-noise expert; -1 = the preset's"}),
                "shift_high": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "flow "
                               "shift of the high-noise expert's sigma grid; 0 = the preset's (a model's own "
                               "ModelSamplingSD3 shift is not used by this node)"}),
                "shift_low": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "flow "
                              "shift of the low-noise expert's grid; 0 = the preset's. Different from shift_high "
                              "needs handoff 'restart' (ComfyUI's two-KSamplerAdvanced template)"}),
                "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.999, "step": 0.001, "tooltip": "the "
                             "high-noise expert runs while sigma >= boundary (t >= boundary*1000, as Wan2.2); 0 = "
                             "the preset's (0.875 t2v, 0.9 i2v)"}),
                "blend_width": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005, "tooltip": "0 = "
                                "hard switch (one expert per step); > 0 = soft blend: both experts run while sigma "
                                "is within boundary +- width/2, weighted linearly"}),
                "sampler": preset_or(SAMPLER_NAMES),
                "scheduler": preset_or(SCHEDULERS),
                "handoff": preset_or(HANDOFFS),
                "denoise": _DENOISE,
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "prompt for both experts"}),
                "negative": ("CONDITIONING", {"tooltip": "negative prompt for both experts' CFG"}),
            },
        }

    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, high_noise, low_noise, latent, preset, seed, steps, cfg_high, cfg_low, shift_high, shift_low,
            boundary, blend_width, sampler, scheduler, handoff, denoise, positive=None, negative=None):
        pick = lambda v, unset: None if v == unset else v
        st = resolve_experts(preset, boundary=pick(float(boundary), 0.0), width=float(blend_width),
                             steps=pick(int(steps), 0), cfg_high=None if cfg_high < 0 else float(cfg_high),
                             cfg_low=None if cfg_low < 0 else float(cfg_low),
                             shift_high=pick(float(shift_high), 0.0), shift_low=pick(float(shift_low), 0.0),
                             sampler=pick(sampler, "preset"), scheduler=pick(scheduler, "preset"),
                             handoff=pick(handoff, "preset"))
        s = Branch(as_model(high_noise, name="high_noise"), positive, negative, st.cfg_high, name="semantic")
        d = Branch(as_model(low_noise, name="low_noise"), positive, negative, st.cfg_low, name="detail")
        for b, shift in ((s, st.shift_high), (d, st.shift_low)):
            own = b.denoiser.info.get("sampling_shift")
            if own is not None and abs(float(own) - shift) > 1e-9:
                log_once(logger, ("expert_shift", b.name, float(own), shift), "TwinFlow Dual-Expert Sampler: the "
                         "%s expert carries shift %g (%s); this node uses shift %g (preset or widget)", b.name,
                         float(own), b.denoiser.info.get("sampling_shift_source", "the model"), shift)
        gate = GateSchedule(kind="boundary", boundary=st.boundary, width=st.width)
        out, report = sample(s, latent, seed=seed, steps=st.steps, sampler=st.sampler, scheduler=st.scheduler,
                             shift=st.shift_high, denoise=denoise, detail=d, gate=gate, shift_detail=st.shift_low,
                             handoff=st.handoff)
        head = (f"TwinFlow Dual-Expert Sampler: semantic = high-noise expert "
                f"({s.denoiser.name or s.denoiser.family}), detail = low-noise expert "
                f"({d.denoiser.name or d.denoiser.family})\n{st.describe()}")
        return (out, head + "\n" + report.text())


class TwinFlowStepCache:
    DESCRIPTION = ("Skip denoiser forwards whose output barely changes and reuse the cached one (easycache = ComfyUI "
                   "core's EasyCache criterion, calibration-free; magcache / teacache = the authors' published Wan2.1 "
                   "1.3B/14B calibration). Each sampler branch keeps its own cache; the sampler report says what was "
                   "skipped. Works on TwinFlow models and, inside ComfyUI, on core MODELs (core samplers too).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("TWINFLOW_MODEL,MODEL", {"tooltip": "the model to cache (TwinFlow or core MODEL)"}),
            "policy": (list(POLICIES), {"default": "easycache", "tooltip": "easycache: calibration-free (core's "
                       "criterion and defaults); magcache / teacache: need Wan2.1 T2V 1.3B or 14B"}),
            "threshold": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 3.0, "step": 0.005, "tooltip": "higher = more "
                          "skips, more deviation; 0 = never skip. Published defaults: easycache 0.2, magcache 0.12, "
                          "teacache 0.2 (its README: 0.08 for 1.3B)"}),
            "start": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 10000.0, "step": 0.01, "tooltip": "first point "
                      "where skipping may happen (unit: window_unit); easycache's default 0.15 of the schedule"}),
            "end": ("FLOAT", {"default": 0.95, "min": -1.0, "max": 10000.0, "step": 0.01, "tooltip": "last point "
                    "where skipping may happen (percent: 0.95; step: inclusive, -1 = last step; sigma: skip while "
                    "sigma > end)"}),
            "window_unit": (list(WINDOW_UNITS), {"default": "percent", "tooltip": "percent of the schedule (as core, "
                            "mapped to sigma by the model's shift), 0-based step index, or sigma"}),
            "max_consecutive_skips": ("INT", {"default": -1, "min": -1, "max": 1000, "step": 1, "tooltip": "cap on "
                                      "skips in a row per pass; -1 = the policy's default (magcache 2, else none), "
                                      "0 = no cap"}),
            "cache_device": (["compute", "offload"], {"default": "compute", "tooltip": "keep the cached outputs "
                             "beside the latent (compute) or in CPU memory (offload: saves GPU memory, one copy per "
                             "skipped step)"}),
            "calibration": (list(CALIBRATIONS), {"default": "auto", "tooltip": "magcache/teacache data: auto detects "
                            "Wan2.1 1.3B (dim 1536) or 14B (dim 5120) and refuses other models"}),
            "core_compatible": ("BOOLEAN", {"default": False, "tooltip": "easycache: give skipped steps the "
                                "prediction core ComfyUI 0.3.64's EasyCache gives on flow models, (1-sigma)(x+r) "
                                "(with CFG batched: both passes' residuals added), instead of x - sigma(x+r) "
                                "(docs/sampling.md); for comparing with core only"}),
        }}

    RETURN_TYPES = ("TWINFLOW_MODEL,MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, policy, threshold, start, end, window_unit, max_consecutive_skips, cache_device,
              calibration, core_compatible=False):
        skips = DEFAULTS.get(policy, {}).get("max_skips", 0) if max_consecutive_skips < 0 else max_consecutive_skips
        config = make_config(policy, threshold, start=start, end=None if (window_unit == "step" and end < 0) else end,
                             window=window_unit, max_skips=skips, cache_device=cache_device, calibration=calibration,
                             match_core=bool(core_compatible))
        return (with_step_cache(model, config),)


NODE_CLASS_MAPPINGS = {
    "TwinFlowGateSchedule": TwinFlowGateSchedule,
    "TwinFlowLoadGateNet": TwinFlowLoadGateNet,
    "TwinFlowSampler": TwinFlowSampler,
    "TwinFlowDualBranchSampler": TwinFlowDualBranchSampler,
    "TwinFlowDualExpertSampler": TwinFlowDualExpertSampler,
    "TwinFlowStepCache": TwinFlowStepCache,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TwinFlowGateSchedule": "TwinFlow Gate Schedule",
    "TwinFlowLoadGateNet": "TwinFlow Load Gate Net",
    "TwinFlowSampler": "TwinFlow Sampler",
    "TwinFlowDualBranchSampler": "TwinFlow Dual-Branch Sampler",
    "TwinFlowDualExpertSampler": "TwinFlow Dual-Expert Sampler (Wan2.2)",
    "TwinFlowStepCache": "TwinFlow Step Cache",
}
