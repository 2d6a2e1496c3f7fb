"""TwinFlow nodes: dit — load a diffusion transformer as a `TWINFLOW_MODEL` (core.handles.Denoiser).

Wan checkpoints (Wan2.1 T2V/I2V/FLF2V, Wan2.2 A14B experts and TI2V-5B) load through
`quant.load` (plain or quantized files; `models.wan_dit` builds the model and its Denoiser); files
with the adaLN-Zero DiT layout (DiT-XL/2, Open-Sora v1) are recognised by their keys and handed to
`models.dit`.
"""
from __future__ import annotations

import logging

import torch

from ..core import paths
from ..core.errors import CheckpointError
from ._loaders import DTYPE_CHOICES, model_names, random_preset, weight_seed

logger = logging.getLogger(__name__)

# random 14B weights (56 GB in fp32) are not offered; the tiny image models are for demos and CI
RANDOM_PRESETS = ("tiny", "wan2.1-1.3b", "i2v-tiny", "i2v-noclip-tiny", "ti2v-tiny")
PRESET_CHOICES = ("auto", "tiny", "wan2.1-1.3b", "wan2.1-14b", "wan2.1-i2v-14b", "wan2.1-flf2v-14b",
                  "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "i2v-tiny", "i2v-noclip-tiny", "ti2v-tiny")


class TwinFlowLoadDiT:
    """Load a Wan diffusion model (or an adaLN-Zero DiT) from the diffusion_models folder."""

    @classmethod
    def INPUT_TYPES(cls):
        names = model_names("diffusion_models", RANDOM_PRESETS)
        return {
            "required": {
                "ckpt_name": (names, {"tooltip": "A Wan checkpoint (T2V, I2V, FLF2V, TI2V) from "
                                                 "models/diffusion_models (official, ComfyUI-repackaged or diffusers "
                                                 "layout; a shard index .json works too), or 'random:<preset>' for "
                                                 "seeded random weights (demos, CI)."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "default",
                                                "tooltip": "Compute dtype. 'default' keeps the file's dtype (fp32 for "
                                                           "random presets). Time embedding, modulation and head "
                                                           "always stay fp32, as in the official code."}),
                "preset": (list(PRESET_CHOICES), {"default": "auto",
                                                  "tooltip": "Force a Wan config instead of detecting it from tensor "
                                                             "shapes; the file is still checked strictly."}),
                "seed": weight_seed(),
            }
        }

    RETURN_TYPES = ("TWINFLOW_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = "TwinFlow/dit"
    DESCRIPTION = ("Loads a Wan diffusion transformer (Wan2.1 T2V 1.3B/14B, I2V/FLF2V 14B, Wan2.2 A14B experts, "
                   "TI2V-5B; detected from the file) as a velocity-predicting TWINFLOW_MODEL; its info says the kind, "
                   "latent channels and whether it needs CLIP vision features. adaLN-Zero DiT files (DiT-XL/2, "
                   "Open-Sora v1) load too.")

    def load(self, ckpt_name, dtype="default", preset="auto", seed=0):
        from ..models import loading, wan_dit

        torch_dtype = loading.parse_dtype(dtype)
        forced = None if preset == "auto" else preset
        name = random_preset(ckpt_name, wan_dit.PRESETS, "preset", RANDOM_PRESETS)
        if name is not None:
            if forced is not None and forced != name:
                raise ValueError(f"preset override {forced!r} conflicts with {ckpt_name!r}; set preset to 'auto' or "
                                 f"pick random:{forced}")
            module = wan_dit.random_wan_dit(name, seed=seed, dtype=torch_dtype or torch.float32)
            return (wan_dit.make_denoiser(module, ckpt_name, f"random seed {seed}"),)

        path = paths.find_model("diffusion_models", ckpt_name)
        keys = wan_dit.checkpoint_keys(path)
        if keys is not None and wan_dit.checkpoint_family(keys) == "dit":
            return (self._load_adaln(path, ckpt_name, torch_dtype, forced),)
        from ..quant.load import load_wan_dit  # plain or quantized (the quant part decides)

        module = load_wan_dit(path, dtype=torch_dtype, preset=forced)
        return (wan_dit.make_denoiser(module, ckpt_name, str(path)),)

    @staticmethod
    def _load_adaln(path, name, torch_dtype, forced):
        """Hand an adaLN-Zero DiT file to models.dit (imported lazily: it is another family's module)."""
        if forced is not None:
            raise ValueError(f"{path}: an adaLN-Zero DiT file; the preset override {forced!r} only applies to Wan "
                             f"models. Set preset to 'auto'.")
        try:
            from ..models import dit
        except ImportError as e:
            raise CheckpointError(f"{path}: an adaLN-Zero DiT checkpoint (keys like 'x_embedder.proj.weight'), "
                                  f"but the DiT loader (models.dit) cannot be imported: {e}") from None
        if not (hasattr(dit, "load_adaln_dit") and hasattr(dit, "make_denoiser")):
            raise CheckpointError(f"{path}: an adaLN-Zero DiT checkpoint, but models.dit has no "
                                  f"load_adaln_dit/make_denoiser to load it with")
        logger.info("%s: adaLN-Zero DiT layout; loading with models.dit", path)
        model, cfg = dit.load_adaln_dit(path, dtype=torch_dtype)
        return dit.make_denoiser(model, cfg, name=name, source=str(path))


NODE_CLASS_MAPPINGS: dict = {"TwinFlowLoadDiT": TwinFlowLoadDiT}
NODE_DISPLAY_NAME_MAPPINGS: dict = {"TwinFlowLoadDiT": "TwinFlow Load DiT"}
