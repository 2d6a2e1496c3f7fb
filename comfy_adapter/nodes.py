"""Nodes that exist only inside ComfyUI (they take or return core MODEL / VAE / GUIDER objects).

Registered by the pack's `__init__.py` when `comfy_adapter.is_comfyui()`; the headless runner never sees
them. Importing this module does not import ComfyUI (the guider class is built on first use).
"""
from __future__ import annotations

from .guider import guider_class
from .models import as_denoiser, as_wan_vae

_CFG = {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}


class TwinFlowDualBranchGuider:
    DESCRIPTION = ("The TwinFlow dual-branch fusion as a GUIDER for core SamplerCustomAdvanced: two core MODELs, "
                   "each with ComfyUI's own CFG, fused per step under a gate schedule (FFT split). Works with every "
                   "core sampler and scheduler; alpha = 1 steps run only the semantic model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "semantic": ("MODEL", {"tooltip": "The large model (global structure), e.g. Wan2.1 14B from Load "
                                                  "Diffusion Model."}),
                "detail": ("MODEL", {"tooltip": "The light model (textures), e.g. Wan2.1 1.3B; must share the "
                                                "latent space (same VAE)."}),
                "gate": ("GATE_SCHEDULE", {"tooltip": "From TwinFlow Gate Schedule: alpha and FFT cutoff per step."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt for both branches (unless positive_detail is set)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt for both branches (unless negative_detail "
                                                         "is set)."}),
                "cfg_semantic": ("FLOAT", {**_CFG, "tooltip": "CFG scale of the semantic branch."}),
                "cfg_detail": ("FLOAT", {**_CFG, "tooltip": "CFG scale of the detail branch."}),
                "split": (["HW", "THW"], {"default": "HW", "tooltip": "FFT split over (H, W) per frame or over "
                                                                      "(T, H, W)."}),
            },
            "optional": {
                "positive_detail": ("CONDITIONING", {"tooltip": "Prompt for the detail branch only (e.g. from its "
                                                                "own text encoder)."}),
                "negative_detail": ("CONDITIONING", {"tooltip": "Negative prompt for the detail branch only."}),
            },
        }

    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    FUNCTION = "build"
    CATEGORY = "TwinFlow/sampling"

    def build(self, semantic, detail, gate, positive, negative, cfg_semantic, cfg_detail, split,
              positive_detail=None, negative_detail=None):
        from ..sampling.gates import GateSchedule

        if not isinstance(gate, GateSchedule):
            raise TypeError(f"input 'gate' must be a GATE_SCHEDULE from TwinFlow Gate Schedule, got "
                            f"{type(gate).__name__}")
        if split not in ("HW", "THW"):
            raise ValueError(f"input 'split' must be 'HW' or 'THW', got {split!r}")
        guider = guider_class()(semantic, detail, gate, float(cfg_semantic), float(cfg_detail),
                                over_time=(split == "THW"))
        guider.set_conds(positive, negative, positive_detail, negative_detail)
        return (guider,)


class TwinFlowFromCoreModel:
    DESCRIPTION = ("Use a core MODEL (Load Diffusion Model, with its LoRAs/patches) as a TWINFLOW_MODEL. 'wrap' runs "
                   "it through ComfyUI's apply_model (patches, fp8 ops and memory management kept; for samplers); "
                   "'rebuild' copies its weights into a TwinFlow Wan DiT (needed by Quantize and Compile).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Wan2.1 text-to-video model from Load Diffusion Model."}),
            "mode": (["wrap", "rebuild"], {"default": "wrap", "tooltip": "wrap: keep ComfyUI's model (samplers). "
                                           "rebuild: TwinFlow Wan DiT from the weights (quantize, compile)."}),
        }}

    RETURN_TYPES = ("TWINFLOW_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "convert"
    CATEGORY = "TwinFlow/interop"

    def convert(self, model, mode="wrap"):
        if mode not in ("wrap", "rebuild"):
            raise ValueError(f"input 'mode' must be 'wrap' or 'rebuild', got {mode!r}")
        return (as_denoiser(model, need_module=(mode == "rebuild")),)


class TwinFlowFromCoreVAE:
    DESCRIPTION = "Use a core VAE (Load VAE with a Wan2.1 or Wan2.2 VAE) as a TWINFLOW_VAE; the weights are shared, not copied."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE", {"tooltip": "A Wan2.1 or Wan2.2 VAE from Load VAE (wan_2.1_vae.safetensors, wan2.2_vae.safetensors)."})}}

    RETURN_TYPES = ("TWINFLOW_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "convert"
    CATEGORY = "TwinFlow/interop"

    def convert(self, vae):
        return (as_wan_vae(vae),)


NODE_CLASS_MAPPINGS = {
    "TwinFlowDualBranchGuider": TwinFlowDualBranchGuider,
    "TwinFlowFromCoreModel": TwinFlowFromCoreModel,
    "TwinFlowFromCoreVAE": TwinFlowFromCoreVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TwinFlowDualBranchGuider": "TwinFlow Dual-Branch Guider",
    "TwinFlowFromCoreModel": "TwinFlow From Core Model",
    "TwinFlowFromCoreVAE": "TwinFlow From Core VAE",
}
