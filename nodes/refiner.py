"""TwinFlow nodes: refiner — load / save the detail refiner (a `TWINFLOW_MODEL` of family "refiner")."""
from __future__ import annotations

import logging


from ..core import paths
from ..core.handles import Denoiser
from ..core.outputs import atomic_numbered, resolve_prefix, ui_entry
from ._loaders import DTYPE_CHOICES, model_names, random_preset, weight_seed

logger = logging.getLogger(__name__)

RANDOM_PRESETS = ("default", "tiny")


class TwinFlowLoadRefiner:
    """Load the detail refiner (time-causal 3D U-Net velocity predictor) from the twinflow models folder."""

    @classmethod
    def INPUT_TYPES(cls):
        names = model_names("twinflow", RANDOM_PRESETS)
        return {
            "required": {
                "refiner_name": (names, {"tooltip": "A refiner .safetensors from models/twinflow (written by TwinFlow "
                                                    "Save Refiner; its config is read from the file's metadata), or "
                                                    "'random:<preset>' for seeded random weights (no public weights "
                                                    "exist; demos, CI, gate fitting)."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "default",
                                                "tooltip": "Weight dtype. 'default' keeps the file's dtype (fp32 for "
                                                           "random presets). Norms and time embedding run in fp32."}),
                "seed": weight_seed(2**31 - 1),
            }
        }

    RETURN_TYPES = ("TWINFLOW_MODEL",)
    RETURN_NAMES = ("refiner",)
    FUNCTION = "load"
    CATEGORY = "TwinFlow/refiner"
    DESCRIPTION = ("Loads the detail refiner: a light U-Net on the latent video that predicts flow velocity for the "
                   "detail branch. Causal in time (streams like the Wan VAE); conditioned on time only, not text.")

    def load(self, refiner_name, dtype="default", seed=0) -> tuple[Denoiser]:
        from ..models import loading, refiner

        torch_dtype = loading.parse_dtype(dtype)
        preset = random_preset(refiner_name, refiner.PRESETS, "refiner", RANDOM_PRESETS)
        if preset is not None:
            model, cfg = refiner.random_refiner(preset, seed=int(seed), dtype=torch_dtype)
            return (refiner.make_denoiser(model, cfg, name=refiner_name, source=f"random seed {seed}"),)
        path = paths.find_model("twinflow", refiner_name)
        model, cfg = refiner.load_refiner(path, dtype=torch_dtype)
        return (refiner.make_denoiser(model, cfg, name=refiner_name, source=str(path)),)


class TwinFlowSaveRefiner:
    """Save a refiner's weights and config (metadata) as safetensors under the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "refiner": ("TWINFLOW_MODEL", {"tooltip": "A refiner from TwinFlow Load Refiner (family 'refiner')."}),
                "filename_prefix": ("STRING", {"default": "refiners/TwinFlow-refiner",
                                               "tooltip": "Name under the output folder; sub-folders allowed. Move the "
                                                          "file to models/twinflow/ to load it again."}),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "TwinFlow/refiner"
    DESCRIPTION = "Saves a detail refiner as .safetensors with its config in the file metadata."

    def save(self, refiner, filename_prefix="refiners/TwinFlow-refiner"):
        from ..models.refiner import FAMILY, DetailRefiner, save_refiner

        if not isinstance(refiner, Denoiser) or refiner.family != FAMILY or not isinstance(refiner.module,
                                                                                           DetailRefiner):
            got = refiner.family if isinstance(refiner, Denoiser) else type(refiner).__name__
            raise TypeError(f"input 'refiner' must be a detail refiner (TwinFlow Load Refiner), got {got!r}")
        if any(p.is_meta for p in refiner.module.parameters()):
            raise ValueError("input 'refiner' has no weights in memory (meta tensors); load it first")
        target = resolve_prefix(filename_prefix, paths.output_dir())
        with atomic_numbered(target, ".safetensors") as out:
            save_refiner(refiner.module, out.tmp_path)
        logger.info("saved refiner to %s", out.path)
        return {"ui": {"refiners": [ui_entry(target, out.filename)]}, "result": ()}


NODE_CLASS_MAPPINGS: dict = {"TwinFlowLoadRefiner": TwinFlowLoadRefiner, "TwinFlowSaveRefiner": TwinFlowSaveRefiner}
NODE_DISPLAY_NAME_MAPPINGS: dict = {"TwinFlowLoadRefiner": "TwinFlow Load Refiner",
                                    "TwinFlowSaveRefiner": "TwinFlow Save Refiner"}
