"""TwinFlow nodes: compile — wrap a TWINFLOW_MODEL / TWINFLOW_VAE with a compiled forward."""
from __future__ import annotations

import torch

from ._inputs import as_model, as_vae

CATEGORY = "TwinFlow/compile"
BACKENDS = ["auto", "tensorrt", "inductor", "eager"]
DTYPES = ["default", "fp32", "fp16", "bf16"]
MAX_RES = 16384


def _range_inputs(defaults: dict) -> dict:
    """min/opt/max INT widgets for the custom profile (pixels and video frames, as the latent nodes)."""
    spec = {"frames": (1, 4097, 4, "video frames (1+4k)"), "height": (16, MAX_RES, 16, "pixels"),
            "width": (16, MAX_RES, 16, "pixels"), "batch": (1, 64, 1, "batch (CFG doubles it)")}
    out = {}
    for name, (lo, hi, step, what) in spec.items():
        for k in ("min", "opt", "max"):
            out[f"{k}_{name}"] = ("INT", {"default": defaults[name][k], "min": lo, "max": hi, "step": step,
                                          "tooltip": f"{k} {what} of the custom profile (profile = custom only)"})
    return out


_DEFAULTS = {"frames": {"min": 1, "opt": 33, "max": 81}, "height": {"min": 256, "opt": 480, "max": 720},
             "width": {"min": 256, "opt": 832, "max": 1280}, "batch": {"min": 1, "opt": 2, "max": 2}}


def _common_inputs(extra: dict) -> dict:
    return {
        "backend": (BACKENDS, {"default": "auto", "tooltip": "auto: tensorrt on CUDA when usable (experimental), "
                               "else inductor, else eager"}),
        "profile": (["from workflow", "custom"], {"default": "from workflow", "tooltip": "from workflow: "
                    "the shapes of the latent reaching this graph (one call) widened to the custom ranges' "
                    "batch; custom: the ranges below"}),
        **extra,
        **_range_inputs(_DEFAULTS),
    }


def _profile(kind: str, profile: str, kw: dict, latent=None):
    """The node's profile: its custom ranges, or the shapes of the connected latent (compiled.profiles)."""
    from ..compiled.profiles import custom_profile, latent_profile

    if profile == "custom":
        return custom_profile(kind, kw)
    if latent is None:
        raise ValueError("profile 'from workflow' needs the 'latent' input connected (the latent this model will "
                         "sample), or choose profile 'custom'")
    return latent_profile(kind, tuple(latent["samples"].shape))


class TwinFlowCompileModel:
    DESCRIPTION = ("Compile a TWINFLOW_MODEL (Wan DiT) through torch.export -> tensorrt | inductor | eager, with an "
                   "on-disk cache and a check against eager. Inputs outside the profile run eager for that call. "
                   "TensorRT is experimental and unverified.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("TWINFLOW_MODEL,MODEL", {"tooltip": "TwinFlow model, or a core MODEL (rebuilt as a TwinFlow Wan DiT)"}), **_common_inputs({
                    "dtype": (DTYPES, {"default": "default", "tooltip": "cast (a copy of) the model before export; "
                              "precision comes from this cast, fp32 islands stay fp32"})})},
                "optional": {"latent": ("LATENT", {"tooltip": "the latent the sampler will see (profile = from "
                                                              "workflow)"})}}

    RETURN_TYPES = ("TWINFLOW_MODEL", "STRING")
    RETURN_NAMES = ("model", "status")
    FUNCTION = "compile"
    CATEGORY = CATEGORY

    def compile(self, model, backend, profile, dtype, latent=None, **kw):
        from ..compiled.runtime import compile_denoiser
        from ..models.loading import parse_dtype

        from ..models.block_stream import refuse_streamed

        model = as_model(model, need_module=True)
        refuse_streamed(model.module, "TwinFlow Compile Model")
        prof = _profile("dit", profile, kw, latent)
        new, report = compile_denoiser(model, prof, backend, dtype=parse_dtype(dtype))
        status = report.line()
        return {"ui": {"text": [status]}, "result": (new, status)}  # the status shows in ComfyUI too


class TwinFlowCompileVAE:
    DESCRIPTION = ("Compile the Wan VAE decode step (first-frame and next-frame graphs with the causal cache as "
                   "explicit tensors). Untiled decodes inside the profile run compiled; others run eager.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("TWINFLOW_VAE,VAE", {"tooltip": "TwinFlow VAE, or a Wan2.1 VAE from core Load VAE"}), **_common_inputs({})},
                "optional": {"latent": ("LATENT", {"tooltip": "the latent that will be decoded (profile = from "
                                                              "workflow)"})}}

    RETURN_TYPES = ("TWINFLOW_VAE", "STRING")
    RETURN_NAMES = ("vae", "status")
    FUNCTION = "compile"
    CATEGORY = CATEGORY

    def compile(self, vae, backend, profile, latent=None, **kw):
        from ..compiled.runtime import compile_vae

        vae = as_vae(vae)
        prof = _profile("vae", profile, kw, latent)
        new, reports = compile_vae(vae, prof, backend)
        status = " | ".join(r.line() for r in reports)
        return {"ui": {"text": [status]}, "result": (new, status)}


class KernelModeModule(torch.nn.Module):
    """Runs the wrapped module with the kernel mode set for the duration of each call."""

    def __init__(self, inner: torch.nn.Module, mode: str):
        super().__init__()
        self.inner = inner
        self.mode = mode

    def forward(self, *args, **kwargs):
        from .. import fused

        before = fused.get_mode()
        fused.set_mode(self.mode)
        try:
            return self.inner(*args, **kwargs)
        finally:
            fused.set_mode(before)


class TwinFlowKernelMode:
    """Choose the glue-op path (fused CuPy kernels or torch references) for one model."""

    DESCRIPTION = ("Sets which path the fused glue ops (LayerNorm+modulate, RMSNorm, RoPE, gated residual, int8 "
                   "quantize/epilogue) take inside this model: auto (CuPy kernels on CUDA when usable, else torch), "
                   "cupy (prefer kernels; every fallback is logged as a warning), torch (references only). "
                   "The status output lists each op's path and why.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..fused import MODES

        return {"required": {
            "model": ("TWINFLOW_MODEL", {"tooltip": "The model whose forward should use this kernel mode."}),
            "mode": (list(MODES), {"default": "auto", "tooltip": "auto | cupy | torch (also: twinflow --kernels, "
                                                                 "env TWINFLOW_KERNELS)"}),
        }}

    RETURN_TYPES = ("TWINFLOW_MODEL", "STRING")
    RETURN_NAMES = ("model", "status")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, mode):
        from ..fused import doctor_lines, set_mode, get_mode

        before = get_mode()
        set_mode(mode)  # validates the name; report the paths this mode gives here
        try:
            status = "\n".join(doctor_lines())
        finally:
            set_mode(before)
        new = model.clone(module=KernelModeModule(model.module, mode))
        new.info["kernels"] = mode
        return {"ui": {"text": [status]}, "result": (new, status)}


NODE_CLASS_MAPPINGS = {"TwinFlowCompileModel": TwinFlowCompileModel, "TwinFlowCompileVAE": TwinFlowCompileVAE,
                       "TwinFlowKernelMode": TwinFlowKernelMode}
NODE_DISPLAY_NAME_MAPPINGS = {"TwinFlowCompileModel": "TwinFlow Compile Model",
                              "TwinFlowCompileVAE": "TwinFlow Compile VAE",
                              "TwinFlowKernelMode": "TwinFlow Kernel Mode"}
