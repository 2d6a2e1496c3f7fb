"""ComfyUI core nodes, headless: model loaders and model/conditioning patches (UNETLoader, CLIPLoader,
VAELoader, ModelSamplingSD3, CLIPTextEncode, ConditioningZeroOut).

Class names, inputs, defaults and outputs are ComfyUI 0.3.64's; the work is done by TwinFlow's library
(no ComfyUI import). These classes are registered in the headless runner only (`nodes.core_headless`):
inside ComfyUI the same names come from ComfyUI itself.

Headless types: MODEL is a `core.handles.Denoiser` whose `info["sampling_shift"]` plays ComfyUI's
`model_sampling` (Wan2.1 T2V: flow, shift 8); CLIP is a `models.umt5.UMT5TextModel`; VAE is a
`models.wan_vae.WanVAE`.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..core import paths

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
CLIP_TYPES = ("wan",)  # the CLIPLoader recipes that run headless


def compute_device() -> torch.device:
    """Where core models run headless: the CUDA device when there is one, else the CPU (as ComfyUI)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_ON_HOST: list = []  # `twinflow run --stream-blocks`: UNETLoader leaves the model in host memory


@contextlib.contextmanager
def loading_on_host(on: bool = True):
    """Within the block UNETLoader keeps the model in host memory (the TwinFlow Block Stream node that
    `run --stream-blocks` puts after it moves the embeddings and head to the GPU and streams the blocks),
    so the GPU never holds the whole model."""
    _ON_HOST.append(bool(on))
    try:
        yield
    finally:
        _ON_HOST.pop()


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_dtype_override: list = []  # the innermost `compute_dtype_override` record


class _DtypeUse:
    def __init__(self, name):
        self.name, self.used = name, False

    def __bool__(self):
        return self.used


@contextlib.contextmanager
def compute_dtype_override(name):
    """Within the block UNETLoader and VAELoader load their models in this dtype ("fp32" / "bf16" / "fp16"),
    as ComfyUI's process flags --fp32-unet/--bf16-unet/--fp16-unet and --fp32-vae/--bf16-vae/--fp16-vae do,
    instead of the default (float32 on the CPU, the file's dtype on a GPU). None changes nothing. Yields a record
    that is falsy when no loader consulted it (`twinflow run --dtype` says so). umT5 always computes in float32."""
    if name is not None and name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; expected one of {', '.join(COMPUTE_DTYPES)}")
    use = _DtypeUse(name)
    if name is None:
        yield use
        return
    _dtype_override.append(use)
    try:
        yield use
    finally:
        _dtype_override.pop()


def _model_dtype(device: torch.device, what: str):
    """The dtype a core loader loads its model in: the run's override, else ComfyUI's CPU/GPU default."""
    if _dtype_override:
        use = _dtype_override[-1]
        use.used = True
        logger.info("%s: computing in %s (twinflow run --dtype)", what, use.name)
        return COMPUTE_DTYPES[use.name]
    return torch.float32 if device.type == "cpu" else None


def _fp8_storage(module, weight_dtype: str, name: str):
    """ComfyUI's fp8 storage (quant/storage.py). 'default': a ComfyUI fp8_scaled file keeps its scaled layers and
    its other Linears are stored in the same fp8 dtype (ComfyUI's scaled_fp8_ops), the rest in the compute dtype.
    The fp8 modes: the whole model in that fp8 dtype (the patch embedding in float32, as ComfyUI's WanModel),
    a file's own fp8 Linears keeping their dtype and scale. fp8_e4m3fn_fast stores as fp8_e4m3fn; its fp8
    matmuls need a GPU with fp8 compute in ComfyUI too (on the CPU ComfyUI upcasts the same way)."""
    from ..core.log import log_once
    from ..quant.storage import cast_linears_fp8, cast_params_fp8, fp8_file_dtype

    file_dtype = fp8_file_dtype(module)
    if weight_dtype == "default":
        return module if file_dtype is None else cast_linears_fp8(module, file_dtype)
    if weight_dtype == "fp8_e4m3fn_fast":
        log_once(logger, ("unet_fp8_fast", name), "UNETLoader %s: fp8_e4m3fn_fast stores weights as fp8 e4m3fn; "
                 "the fp8 matrix-multiply kernels are not used headless (weights are upcast per layer)", name)
    return cast_params_fp8(module, "fp8_e5m2" if weight_dtype == "fp8_e5m2" else "fp8_e4m3fn")


class UNETLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (paths.list_models("diffusion_models"),),
                             "weight_dtype": (list(WEIGHT_DTYPES),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"

    def load_unet(self, unet_name, weight_dtype):
        from ..models import wan_dit
        from ..quant.load import load_wan_dit

        path = paths.find_model("diffusion_models", unet_name)
        device = compute_device()
        keys = wan_dit.checkpoint_keys(path)
        if keys is not None and wan_dit.checkpoint_family(keys) not in ("wan_dit", "wan_dit_diffusers"):
            raise ValueError(f"UNETLoader: {unet_name} is not a Wan diffusion model; the headless runner loads Wan "
                             f"T2V, I2V, FLF2V and TI2V files (use TwinFlow Load DiT for other TwinFlow models)")
        # ComfyUI's 'default': float32 on the CPU, the file's 16-bit dtype on a GPU
        # quant.load: plain files and ComfyUI fp8_scaled ones (stored codes and scales)
        module = load_wan_dit(path, dtype=_model_dtype(device, f"UNETLoader {unet_name}"))
        module = _fp8_storage(module, weight_dtype, unet_name)
        place = torch.device("cpu") if _ON_HOST and _ON_HOST[-1] else device  # dtype still follows `device`
        denoiser = wan_dit.make_denoiser(module.to(place), unet_name, str(path))
        # ComfyUI's supported_models entry for the detected kind: its sampling shift and latent format
        denoiser.info.update(sampling_shift=denoiser.info["sampling_shift_comfy"],
                             latent_format=denoiser.info["latent_format_comfy"], core=True)
        return (denoiser,)


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (paths.list_models("text_encoders"),),
                             "type": (list(CLIP_TYPES),)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = "[Recipes]\n\nwan: umt5 xxl (headless: the only recipe)"

    def load_clip(self, clip_name, type="wan", device="default"):
        from ..models import umt5

        if type not in CLIP_TYPES:
            raise ValueError(f"CLIPLoader type {type!r} needs the ComfyUI host; the headless runner loads 'wan' (umT5-XXL)")
        path = paths.find_model("text_encoders", clip_name)
        dev = torch.device("cpu") if device == "cpu" else compute_device()
        return (umt5.load_umt5_file(path, device=dev),)


class VAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (paths.list_models("vae"),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"

    def load_vae(self, vae_name):
        from ..models import wan22_vae

        path = paths.find_model("vae", vae_name)
        device = compute_device()
        # ComfyUI decodes in float32 on the CPU; on a GPU the file's 16-bit dtype
        dtype = _model_dtype(device, f"VAELoader {vae_name}")
        return (wan22_vae.load_vae(path, dtype=dtype, device=device),)  # Wan2.1 or Wan2.2, from the tensors


class ModelSamplingSD3:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, shift):
        if not shift > 0:
            raise ValueError(f"ModelSamplingSD3 shift must be > 0 (sigma = shift*t / (1 + (shift-1)*t)), got {shift}")
        m = model.clone()
        m.info["sampling_shift"] = float(shift)
        m.info["sampling_shift_source"] = "ModelSamplingSD3 patch"
        return (m,)


class LoraLoaderModelOnly:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "lora_name": (paths.list_models("loras"),),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"
    CATEGORY = "loaders"

    def load_lora_model_only(self, model, lora_name, strength_model):
        from ..core.handles import Denoiser
        from ..quant.lora import apply_lora
        from ..models.loading import load_file

        if not isinstance(model, Denoiser):
            raise TypeError(f"LoraLoaderModelOnly: input 'model' must be a MODEL, got {type(model).__name__}")
        if strength_model == 0:
            return (model,)
        path = paths.find_model("loras", lora_name)
        lora_sd, _meta = load_file(path)
        module = apply_lora(model.module, lora_sd, float(strength_model), source=str(path))
        return (model.clone(module=module, name=f"{model.name}+{lora_name}"),)


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                   "diffusion model towards generating specific images.")

    def encode(self, clip, text):
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None")
        return ([[clip.encode(text), {"pooled_output": None}]],)


class ConditioningZeroOut:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"

    def zero_out(self, conditioning):
        out = []
        for t, d in conditioning:
            d = dict(d)
            for key in ("pooled_output", "conditioning_lyrics"):
                if d.get(key) is not None:
                    d[key] = torch.zeros_like(d[key])
            out.append([torch.zeros_like(t), d])
        return (out,)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (UNETLoader, CLIPLoader, VAELoader, ModelSamplingSD3, LoraLoaderModelOnly,
                                               CLIPTextEncode, ConditioningZeroOut)}
NODE_DISPLAY_NAME_MAPPINGS = {"UNETLoader": "Load Diffusion Model", "CLIPLoader": "Load CLIP",
                              "VAELoader": "Load VAE", "ModelSamplingSD3": "ModelSamplingSD3",
                              "LoraLoaderModelOnly": "LoraLoaderModelOnly",
                              "CLIPTextEncode": "CLIP Text Encode (Prompt)",
                              "ConditioningZeroOut": "ConditioningZeroOut"}
