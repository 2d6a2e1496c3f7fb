"""TwinFlow nodes: quant — quantize a TWINFLOW_MODEL (with an accuracy report) and save it.

Thin wrappers: the work is `quant.report.quantize_denoiser` and `quant.checkpoint.quantized_state_dict`.
"""
from __future__ import annotations

import json
import logging
import re

from ..core import paths
from ._inputs import as_model

logger = logging.getLogger(__name__)

FORMAT_CHOICES = ("int8_weight_only", "fp8_e4m3_weight_only", "fp8_e4m3_dynamic", "int8_dynamic")
SCALE_CHOICES = ("auto", "per_tensor", "per_channel")
LAYOUT_CHOICES = ("twinflow", "comfy_quant_metadata", "comfy_scaled_fp8")


def _parse_sigmas(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in re.split(r"[,\s]+", str(text).strip()) if t)
    except ValueError:
        raise ValueError(f"report_sigmas {text!r}: expected 3-5 comma-separated numbers in (0, 1], "
                         f"e.g. '0.95, 0.75, 0.5, 0.25, 0.05'") from None
    return vals


class TwinFlowQuantizeModel:
    """Quantize the DiT's attention and FFN linears; always reports what it cost in accuracy."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TWINFLOW_MODEL,MODEL", {"tooltip": "The model to quantize (it is not modified; a copy is returned). A core MODEL is rebuilt as a TwinFlow Wan DiT first."}),
                "format": (list(FORMAT_CHOICES), {"default": "int8_weight_only", "tooltip":
                           "int8_weight_only / fp8_e4m3_weight_only: about half the weight memory, not faster. "
                           "fp8_e4m3_dynamic: W8A8 with fp8 tensor cores (GPUs with compute capability >= 8.9 only). "
                           "int8_dynamic: W8A8 with int8 GEMMs (also runs on the CPU)."}),
                "group_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16, "tooltip":
                               "int8_weight_only: one scale per group of this many input columns (0 = one per "
                               "output channel). Must divide the layers' input width."}),
                "fp8_scale": (list(SCALE_CHOICES), {"default": "auto", "tooltip":
                              "fp8 weight scale granularity. auto: per tensor for weight-only (ComfyUI's scaled "
                              "fp8, loadable by ComfyUI), per output channel for fp8_e4m3_dynamic."}),
                "smoothquant_alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.95, "step": 0.05, "tooltip":
                                      "int8_dynamic only: SmoothQuant migration strength from calibration runs "
                                      "(0 = off; 0.5 is the paper's default)."}),
                "include": ("STRING", {"default": "", "tooltip":
                            "Comma-separated glob patterns of layers to quantize (empty = the blocks' attention "
                            "q/k/v/o and FFN linears), e.g. 'blocks.*.ffn.*'."}),
                "exclude": ("STRING", {"default": "", "tooltip":
                            "Comma-separated glob patterns to keep in high precision (empty = norms, modulation, "
                            "embeddings, time projection, head). Given patterns replace the defaults."}),
                "min_cosine": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001, "tooltip":
                               "Refuse when the denoiser output cosine vs the unquantized model falls below this "
                               "(0 = format default: 0.999 weight-only, 0.995 W8A8)."}),
                "force": ("BOOLEAN", {"default": False, "tooltip": "Accept a result below the threshold."}),
                "report_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "step": 1, "tooltip":
                                "The report probes seeds report_seed and report_seed + 1."}),
                "report_sigmas": ("STRING", {"default": "0.95, 0.75, 0.5, 0.25, 0.05", "tooltip":
                                  "3-5 noise levels in (0, 1] at which the velocity is compared."}),
            }
        }

    RETURN_TYPES = ("TWINFLOW_MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "quantize"
    CATEGORY = "TwinFlow/quant"
    DESCRIPTION = ("Quantizes the transformer blocks' linears (int8 / fp8, weight-only or W8A8) into a new model and "
                   "reports weight bytes before/after, per-layer errors and the denoiser output error at fixed seeds "
                   "and sigmas. Refuses (naming the worst layers) below the accuracy threshold unless forced.")

    def quantize(self, model, format="int8_weight_only", group_size=0, fp8_scale="auto", smoothquant_alpha=0.0,
                 include="", exclude="", min_cosine=0.0, force=False, report_seed=0,
                 report_sigmas="0.95, 0.75, 0.5, 0.25, 0.05"):
        from ..quant.formats import QuantOptions
        from ..quant.report import quantize_denoiser
        from ..quant.swap import Recipe, parse_patterns

        from ..models.block_stream import refuse_streamed

        model = as_model(model, need_module=True)
        refuse_streamed(model.module, "TwinFlow Quantize Model")
        if fp8_scale not in SCALE_CHOICES:
            raise ValueError(f"fp8_scale {fp8_scale!r}: expected one of {SCALE_CHOICES}")
        per_channel = None if fp8_scale == "auto" else fp8_scale == "per_channel"
        if not format.startswith("fp8") and fp8_scale != "auto":
            raise ValueError(f"fp8_scale applies to the fp8 formats only; set it to 'auto' for {format}")
        recipe = Recipe(format, QuantOptions(group_size=int(group_size), per_channel=per_channel,
                                             smoothquant_alpha=float(smoothquant_alpha)),
                        include=parse_patterns(include), exclude=parse_patterns(exclude))
        seeds = (int(report_seed), int(report_seed) + 1)
        qmodel, report = quantize_denoiser(model, recipe, min_cosine=min_cosine or None, force=bool(force),
                                           sigmas=_parse_sigmas(report_sigmas), seeds=seeds)
        text = report.to_text()
        logger.info("%s", text)
        return {"ui": {"text": [text]}, "result": (qmodel, text)}


class TwinFlowSaveQuantized:
    """Write a quantized model as safetensors (scales + format record) under the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TWINFLOW_MODEL", {"tooltip": "A model from TwinFlow Quantize Model."}),
                "filename_prefix": ("STRING", {"default": "twinflow/quantized", "tooltip":
                                    "File name prefix inside the output folder (sub-folders allowed); a counter "
                                    "is appended, existing files are never overwritten."}),
                "layout": (list(LAYOUT_CHOICES), {"default": "twinflow", "tooltip":
                           "twinflow: every format, read back by TwinFlow's loaders (per-tensor fp8 files also "
                           "carry ComfyUI's _quantization_metadata). comfy_quant_metadata / comfy_scaled_fp8: "
                           "ComfyUI's current / legacy scaled-fp8 layouts (per-tensor fp8 weight-only only)."}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "TwinFlow/quant"
    DESCRIPTION = ("Saves a quantized TWINFLOW_MODEL as .safetensors with its scales and a format record, so the "
                   "loaders read it back without re-quantizing.")

    def save(self, model, filename_prefix="twinflow/quantized", layout="twinflow"):
        from safetensors.torch import save_file

        from ..core.outputs import atomic_numbered, resolve_prefix, ui_entry
        from ..quant.checkpoint import quantized_state_dict

        model = as_model(model, need_module=True)
        if layout not in LAYOUT_CHOICES:
            raise ValueError(f"layout {layout!r}: expected one of {LAYOUT_CHOICES}")
        recipe = (model.info.get("quant") or {}).get("recipe")
        sd, meta = quantized_state_dict(model.module, layout=layout, recipe=recipe)
        meta["twinflow_family"] = model.family
        cfg = model.config
        if cfg is not None and hasattr(cfg, "to_json"):
            meta["twinflow_config"] = cfg.to_json()
        if model.info.get("quant"):
            meta["twinflow_quant_summary"] = json.dumps(model.info["quant"])
        target = resolve_prefix(filename_prefix, paths.output_dir())
        with atomic_numbered(target, ".safetensors") as out:
            save_file(sd, str(out.tmp_path), metadata=meta)
        logger.info("saved quantized model to %s (%s layout)", out.path, layout)
        return {"ui": {"text": [str(out.path)], "files": [ui_entry(target, out.filename)]}, "result": (str(out.path),)}


NODE_CLASS_MAPPINGS: dict = {
    "TwinFlowQuantizeModel": TwinFlowQuantizeModel,
    "TwinFlowSaveQuantized": TwinFlowSaveQuantized,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "TwinFlowQuantizeModel": "TwinFlow Quantize Model",
    "TwinFlowSaveQuantized": "TwinFlow Save Quantized",
}
