"""Model inputs that may be core ComfyUI objects: the one node module that touches `comfy_adapter`.

Widened inputs ("TWINFLOW_MODEL,MODEL", "TWINFLOW_VAE,VAE") call `as_model` / `as_vae`. Our own objects
pass through unchanged; anything else goes to `comfy_adapter.models`, which is imported only inside a
running ComfyUI (headless, no core object can arrive, so a headless run never imports the adapter).
"""
from __future__ import annotations

from ..core.handles import Denoiser


def _adapter():
    """`comfy_adapter.models` inside a running ComfyUI, else None."""
    from ..comfy_adapter import is_comfyui

    if not is_comfyui():
        return None
    from ..comfy_adapter import models

    return models


def as_model(obj, *, need_module: bool = False, name: str = "model") -> Denoiser:
    """A TWINFLOW_MODEL from input `name`: ours unchanged, a core MODEL converted by the adapter.

    need_module=False (samplers): a core MODEL runs through ComfyUI's apply_model. need_module=True
    (quantize, compile): a TwinFlow Wan DiT rebuilt from its weights, also for a wrapped core MODEL."""
    if isinstance(obj, Denoiser) and not (need_module and obj.family == "comfy"):
        return obj
    adapter = _adapter()
    if adapter is not None:
        return adapter.as_denoiser(obj, need_module=need_module)
    raise TypeError(f"input '{name}' must be a TWINFLOW_MODEL (TwinFlow Load DiT or Load Refiner), got "
                    f"{type(obj).__name__}; a core MODEL is accepted inside ComfyUI only")


def with_step_cache(obj, config, *, name: str = "model"):
    """A copy of input `name` that samples with the step cache `config`: a TWINFLOW_MODEL carries it in its info
    (the TwinFlow samplers build one cache per branch from it); a core MODEL is cloned with the adapter's wrappers
    (core samplers, and the TwinFlow ones, cache with it). The input is not changed."""
    if isinstance(obj, Denoiser):
        new = obj.clone()
        new.info["step_cache"] = config
        return new
    if _adapter() is not None:
        from ..comfy_adapter import step_cache

        return step_cache.with_step_cache(obj, config)
    raise TypeError(f"TwinFlow Step Cache: input '{name}' must be a TWINFLOW_MODEL or, inside ComfyUI, a core MODEL; "
                    f"got {type(obj).__name__}")


def as_vae(obj, *, name: str = "vae"):
    """A TWINFLOW_VAE (`models.wan_vae.WanVAE`) from input `name`: ours unchanged, a core VAE converted by
    the adapter (weights shared)."""
    from ..models.wan_vae import WanVAE

    if isinstance(obj, WanVAE):
        return obj
    adapter = _adapter()
    if adapter is not None:
        return adapter.as_wan_vae(obj)
    raise TypeError(f"input '{name}' must be a TWINFLOW_VAE (from TwinFlow Load VAE), got {type(obj).__name__}; "
                    f"a core VAE is accepted inside ComfyUI only")
