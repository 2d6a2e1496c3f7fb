"""Core ComfyUI objects -> TwinFlow objects: `as_denoiser` (MODEL -> TWINFLOW_MODEL), `as_wan_vae` (VAE -> TWINFLOW_VAE).

Both pass our own objects through unchanged, so a node input widened to "TWINFLOW_MODEL,MODEL" just calls
the converter on whatever arrives. ComfyUI is imported lazily, only when a core object is converted.

Which way per case, and why:
  * MODEL for sampling (TwinFlow Sampler, Dual-Branch Sampler): **wrap `apply_model`**. The core model keeps
    everything the user set up with core nodes — LoRA weight patches, object patches and APPLY_MODEL
    wrappers (e.g. core TorchCompileModel), fp8 / scaled-fp8 ops, ComfyUI's device placement and offloading
    (`load_models_gpu` before the run) — and the model computes exactly what core KSampler would. Our loop
    calls it with sigma; for a flow model (`CONST` sampling) ComfyUI returns x0 = x - sigma*v, so
    v = (x - x0) / sigma (sigma > 0 at every model evaluation).
  * MODEL for Quantize / Compile (`need_module=True`): **rebuild our `WanDiT` from the state dict**. Those
    passes rewrite or export our module's layers; ComfyUI's `WanModel` is a different class with
    ComfyUI-specific ops. The patcher is loaded first so LoRA weight patches are baked into the weights we
    read; the keys are the official layout on both sides, and tensors are shared, not copied.
  * VAE: **rebuild our `WanVAE` from the state dict**. Keys and math are the official ones on both sides,
    the weights are shared (no copy), and our VAE streams one latent frame at a time with progress, tiling
    and its own memory estimate, which `comfy.sd.VAE` does not offer. Conversions are cached per core object.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
from torch import nn

from ..core.errors import UnsupportedError
from ..core.handles import Denoiser
from ..core.log import log_once

logger = logging.getLogger(__name__)

_vae_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_dit_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load_patchers(patchers: list, full: bool = False) -> None:
    """Have ComfyUI load (and patch) these ModelPatchers on their device; cheap when they already are."""
    import comfy.model_management

    comfy.model_management.load_models_gpu(list(patchers), force_full_load=full)


def is_model_patcher(obj) -> bool:
    """Duck-typed check for a core MODEL (`comfy.model_patcher.ModelPatcher`): .model.apply_model + .model_options."""
    inner = getattr(obj, "model", None)
    return (inner is not None and callable(getattr(inner, "apply_model", None))
            and isinstance(getattr(obj, "model_options", None), dict))


def is_core_vae(obj) -> bool:
    """Duck-typed check for a core VAE (`comfy.sd.VAE`): a `first_stage_model` module."""
    return isinstance(getattr(obj, "first_stage_model", None), nn.Module)


def _diffusion_model(patcher) -> nn.Module:
    dm = getattr(patcher.model, "diffusion_model", None)
    if not isinstance(dm, nn.Module):
        raise TypeError(f"the MODEL input ({type(patcher.model).__name__}) has no diffusion_model module; "
                        f"connect a Wan2.1 model from Load Diffusion Model")
    return dm


def _check_flow(patcher) -> None:
    ms = patcher.get_model_object("model_sampling") if hasattr(patcher, "get_model_object") else None
    kinds = [c.__name__ for c in type(ms).__mro__] if ms is not None else []
    if "CONST" not in kinds:
        raise UnsupportedError(
            f"the MODEL input uses {type(ms).__name__ if ms is not None else 'no'} model sampling; TwinFlow samplers "
            f"need a flow-matching model (ComfyUI 'CONST' sampling, e.g. Wan2.1 from Load Diffusion Model). "
            f"Remove a ModelSamplingDiscrete/EPS patch or use a core sampler")


def sampling_shift(patcher) -> tuple[float, bool]:
    """(shift, patched) of a core MODEL's flow sampling object: what core samplers build their sigmas from.

    `patched` is True when a node (ModelSamplingSD3, ...) replaced the model's own `model_sampling`. TwinFlow's
    sigma grid is ComfyUI's flow grid sigma = shift*t / (1 + (shift-1)*t) with timestep multiplier 1000 (Wan);
    another multiplier or a sampling object without a `shift` is refused rather than sampled on a wrong grid."""
    ms = patcher.get_model_object("model_sampling")
    shift = getattr(ms, "shift", None)
    mult = getattr(ms, "multiplier", 1000)
    if not isinstance(shift, (int, float)) or float(mult) != 1000.0:
        raise UnsupportedError(
            f"the MODEL input's model sampling {type(ms).__name__} (shift {shift!r}, multiplier {mult!r}) is not "
            f"the flow schedule TwinFlow samplers build (ModelSamplingSD3-style, multiplier 1000); patch the model "
            f"with ModelSamplingSD3 or use a core sampler")
    patched = "model_sampling" in patcher.object_patches if hasattr(patcher, "object_patches") else False
    return float(shift), bool(patched)


def _latent_format_name(patcher) -> Optional[str]:
    lf = getattr(patcher.model, "latent_format", None)
    name = type(lf).__name__ if lf is not None else ""
    return {"Wan21": "wan21"}.get(name)


class ComfyApplyModel(nn.Module):
    """Velocity predictor over a core ModelPatcher: forward(x, sigma, context) -> v, via `apply_model`.

    Holds the patcher outside the module tree (its weights stay ComfyUI's); a 0-element parameter on the
    load device tells our samplers where to put the latent and that inputs stay float32 (ComfyUI casts them)."""

    def __init__(self, patcher):
        super().__init__()
        self.__dict__["patcher"] = patcher  # not a submodule: never moved/cast/state-dict'ed by us
        device = getattr(patcher, "load_device", None) or torch.device("cpu")
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def time_source(self) -> nn.Module:
        """The core Wan model, whose time embedding and shape the step cache's teacache/magcache read."""
        return self.patcher.model.diffusion_model

    def transformer_options(self) -> dict:
        """The patcher's transformer options with its wrappers merged in, as ComfyUI's sampling passes them."""
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        wrappers = getattr(self.patcher, "wrappers", None)
        if wrappers:
            merged = {k: dict(v) for k, v in opts.get("wrappers", {}).items()}
            for wtype, by_key in wrappers.items():
                slot = merged.setdefault(wtype, {})
                for key, fns in by_key.items():
                    slot[key] = list(slot.get(key, [])) + list(fns)
            opts["wrappers"] = merged
        return opts

    def has_cfg_patches(self) -> bool:
        opts = self.patcher.model_options
        return "sampler_cfg_function" in opts or bool(opts.get("sampler_post_cfg_function"))

    def __getattr__(self, name):
        # `combine_guidance` exists only when the core MODEL carries CFG patches, so our loop keeps its own plain
        # CFG (bit-identical to ComfyUI's) otherwise
        if name == "combine_guidance" and self.__dict__.get("patcher") is not None and self.has_cfg_patches():
            return self._combine_guidance
        return super().__getattr__(name)

    @torch.no_grad()
    def _combine_guidance(self, x, sigma, v_cond, v_uncond, cfg, cond=None, uncond=None) -> torch.Tensor:
        """ComfyUI's `cfg_function` on our velocities: the MODEL's `sampler_cfg_function` (else plain CFG), then each
        `sampler_post_cfg_function`, with ComfyUI's argument dicts, in the x0 (denoised) space ComfyUI uses.

        As in core, with cfg 1 no negative runs and the uncond prediction is zeros. `cond`/`uncond` in the dicts
        are the CONDITIONING lists the node received (core passes its processed cond dicts there)."""
        opts = self.patcher.model_options
        model = self.patcher.model
        sig = sigma.view(-1, *([1] * (x.ndim - 1)))
        cond_pred = x - sig * v_cond
        uncond_pred = x - sig * v_uncond if v_uncond is not None else torch.zeros_like(x)
        if "sampler_cfg_function" in opts:
            args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cfg, "timestep": sigma,
                    "input": x, "sigma": sigma, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                    "model": model, "model_options": opts, "input_cond": cond, "input_uncond": uncond}
            result = x - opts["sampler_cfg_function"](args)
        else:
            result = uncond_pred + (cond_pred - uncond_pred) * cfg
        for fn in opts.get("sampler_post_cfg_function", []):
            args = {"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cfg, "model": model,
                    "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": sigma, "model_options": opts,
                    "input": x}
            result = fn(args)
        return ((x - result.float()) / sig).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        load_patchers([self.patcher])
        model = self.patcher.model
        dev = self.anchor.device
        xd = x.to(device=dev, dtype=torch.float32)
        s = sigma.to(device=dev, dtype=torch.float32).reshape(-1)
        if s.numel() == 1 and xd.shape[0] != 1:
            s = s.expand(xd.shape[0])
        ctx = context.to(dev) if context is not None else None
        x0 = model.apply_model(xd, s, c_crossattn=ctx, transformer_options=self.transformer_options())
        # CONST: x0 = x - sigma * v  ->  v = (x - x0) / sigma; sigma > 0 at every evaluation of a sampler.
        v = (xd - x0.float()) / s.view(-1, *([1] * (xd.ndim - 1)))
        return v.to(x.dtype)


# Core model_options entries TwinFlow's own sampling loop cannot honour (it calls apply_model per pass and combines
# CFG itself): refused by name. sampler_cfg_function and sampler_post_cfg_function are applied (ComfyApplyModel).
UNSUPPORTED_OPTIONS = {
    "sampler_pre_cfg_function": "a pre-CFG patch",
    "sampler_calc_cond_batch_function": "a cond-batch patch",
    "model_function_wrapper": "a model function wrapper (set_model_unet_function_wrapper)",
    "disable_cfg1_optimization": "disable_cfg1_optimization",
}


def check_model_options(patcher) -> None:
    """Refuse core patches our loop would otherwise ignore, naming them and the patch nodes' functions."""
    opts = patcher.model_options
    found = []
    for key, what in UNSUPPORTED_OPTIONS.items():
        val = opts.get(key)
        if val:
            fns = val if isinstance(val, (list, tuple)) else [val]
            names = ", ".join(getattr(f, "__qualname__", type(f).__name__) for f in fns if callable(f))
            found.append(f"{key} ({what}{': ' + names if names else ''})")
    if found:
        raise UnsupportedError(
            "the MODEL input carries core patches the TwinFlow samplers cannot apply: " + "; ".join(found) +
            ". Sample it with a core sampler (KSampler, or TwinFlow Dual-Branch Guider in SamplerCustomAdvanced, "
            "which runs ComfyUI's own CFG), or remove the patch node")


def wrap_model(patcher, name: str = "") -> Denoiser:
    """A TWINFLOW_MODEL that runs a core MODEL through `apply_model` (patches, wrappers, fp8 ops kept)."""
    _check_flow(patcher)
    check_model_options(patcher)
    dm = _diffusion_model(patcher)
    pe = getattr(dm, "patch_embedding", None)
    te = getattr(dm, "text_embedding", None)
    if pe is None or te is None:
        raise UnsupportedError(f"the MODEL input is a {type(dm).__name__}, not a Wan2.1 WanModel (no patch_embedding/"
                               f"text_embedding); TwinFlow samplers take Wan2.1 models")
    in_ch = int(pe.weight.shape[1])
    text_dim = int(te[0].weight.shape[1])
    out_ch = int(getattr(dm, "out_dim", in_ch))
    if in_ch != out_ch:
        raise UnsupportedError(f"the MODEL input takes {in_ch} channels and predicts {out_ch} (an image-to-video or "
                               f"control model needing extra inputs); TwinFlow samplers run Wan2.1 text-to-video")
    shift, patched = sampling_shift(patcher)
    # the model's sigma schedule, as core KSampler reads it (a widget shift of 0 on our samplers means "this")
    info = {"source": "ComfyUI MODEL (apply_model)", "latent_channels": out_ch, "sampling_shift": shift,
            "sampling_shift_source": "ModelSamplingSD3 patch" if patched else "the model's default"}
    cache = patcher.model_options.get("transformer_options", {}).get("twinflow_step_cache")
    if cache is not None:  # from TwinFlow Step Cache: our sampler caches at its loop (comfy_adapter/step_cache.py)
        info["step_cache"] = cache
    opts = patcher.model_options
    cfg_patches = (["sampler_cfg_function"] if "sampler_cfg_function" in opts else []) + \
        [f"sampler_post_cfg_function {getattr(f, '__qualname__', f)}"
         for f in opts.get("sampler_post_cfg_function", [])]
    if cfg_patches:
        log_once(logger, ("comfy_adapter.cfg_patches", id(patcher)), "TwinFlow: applying the core MODEL's CFG "
                 "patches in the TwinFlow sampler as ComfyUI's cfg_function does: %s", ", ".join(cfg_patches))
    fmt = _latent_format_name(patcher)
    if fmt is not None:
        info["latent_format"] = fmt
    log_once(logger, ("comfy_adapter.wrap", id(patcher)), "TwinFlow: running core MODEL %s through ComfyUI's "
             "apply_model (keeps LoRA/object patches, wrappers, fp8 ops and ComfyUI memory management)",
             type(dm).__name__)
    return Denoiser(module=ComfyApplyModel(patcher), family="comfy", in_channels=in_ch,
                    text_dim=text_dim, name=name or f"comfy:{type(dm).__name__}", timestep_scale=1.0, info=info)


def rebuild_wan_dit(patcher) -> Denoiser:
    """Our `WanDiT` (TWINFLOW_MODEL family wan_dit) built from a core MODEL's weights (patches baked in)."""
    from ..models.wan_dit import make_denoiser, wan_dit_from_state_dict

    cached = _dit_cache.get(patcher)
    if cached is not None:
        return cached
    load_patchers([patcher], full=True)  # LoRA/weight patches are applied on load: bake them into what we read
    sd = _diffusion_model(patcher).state_dict()
    fp8 = {k for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}
    if fp8:
        raise UnsupportedError(f"the MODEL input keeps {len(fp8)} weights in fp8 (e.g. {sorted(fp8)[0]!r}); TwinFlow "
                               f"Quantize/Compile need float weights. Load it with weight_dtype 'default' in Load "
                               f"Diffusion Model, or load the file with TwinFlow Load DiT")
    module = wan_dit_from_state_dict(dict(sd), "ComfyUI MODEL state dict")
    den = make_denoiser(module, f"comfy:{type(_diffusion_model(patcher)).__name__}", "ComfyUI MODEL (rebuilt)")
    log_once(logger, ("comfy_adapter.rebuild", id(patcher)), "TwinFlow: rebuilt core MODEL as a TwinFlow WanDiT from "
             "its state dict (quantize/compile rewrite our module's layers)")
    _dit_cache[patcher] = den
    return den


def as_denoiser(obj, *, need_module: bool = False, name: str = "") -> Denoiser:
    """TWINFLOW_MODEL from a TWINFLOW_MODEL (unchanged) or a core MODEL.

    need_module=False (samplers): wrap apply_model. need_module=True (quantize, compile): a TwinFlow WanDiT
    rebuilt from the weights. A wrapped core model arriving where a module is needed is rebuilt from its patcher."""
    if isinstance(obj, Denoiser):
        if need_module and isinstance(obj.module, ComfyApplyModel):
            return rebuild_wan_dit(obj.module.patcher)
        return obj
    if is_model_patcher(obj):
        return rebuild_wan_dit(obj) if need_module else wrap_model(obj, name=name)
    raise TypeError(f"expected a TWINFLOW_MODEL (TwinFlow Load DiT) or a core MODEL (Load Diffusion Model), got "
                    f"{type(obj).__name__}")


def as_wan_vae(obj):
    """TWINFLOW_VAE from a TWINFLOW_VAE (unchanged) or a core VAE holding a Wan2.1 or Wan2.2 VAE (weights
    shared)."""
    from ..models import wan22_vae, wan_vae

    if isinstance(obj, wan_vae.WanVAE):
        return obj
    if not is_core_vae(obj):
        raise TypeError(f"expected a TWINFLOW_VAE (TwinFlow Load VAE) or a core VAE (Load VAE), got "
                        f"{type(obj).__name__}")
    cached = _vae_cache.get(obj)
    if cached is not None:
        return cached
    fsm = obj.first_stage_model
    sd = fsm.state_dict()
    if wan_vae.ANCHOR not in sd:
        raise UnsupportedError(f"the VAE input is a {type(fsm).__name__} without {wan_vae.ANCHOR!r}: not a Wan2.1 "
                               f"or Wan2.2 VAE. Load wan_2.1_vae.safetensors or wan2.2_vae.safetensors with Load VAE")
    source = f"ComfyUI VAE ({type(fsm).__name__})"
    family = wan22_vae if wan22_vae.WAN22_KEY in sd else wan_vae
    cls = wan22_vae.Wan22VAE if family is wan22_vae else wan_vae.WanVAE
    cfg = family.detect_config(sd, source)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) > 1:
        dt = max(dtypes, key=lambda d: sum(v.numel() for v in sd.values() if v.dtype == d))
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
    from ..models.loading import build_and_load

    vae = build_and_load(lambda: cls(cfg), dict(sd), source).eval()
    vae.source = source
    log_once(logger, ("comfy_adapter.vae", id(obj)), "TwinFlow: using core VAE %s as a TwinFlow %s (same weights, "
             "official key layout; streamed per-frame decode)", type(fsm).__name__, cls.__name__)
    _vae_cache[obj] = vae
    return vae
