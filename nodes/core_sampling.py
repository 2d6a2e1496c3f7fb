"""ComfyUI core nodes, headless: latents and sampling (EmptyHunyuanLatentVideo, KSampler).

KSampler runs ComfyUI's `common_ksampler` on TwinFlow's sampler (`sampling.dual.sample` with one branch):
the noise of `comfy.sample.prepare_noise`, the schedulers of `comfy.samplers.calculate_sigmas` at the
model's shift (ModelSamplingSD3), the penultimate-sigma drop of the UniPC samplers, CFG on the
x0 prediction (skipped at cfg 1), `process_in`/`process_out` of the Wan2.1 latent format.
"""
from __future__ import annotations

import torch

from ..sampling.noise import SEED_MAX

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
# The sampler/scheduler names that run headless, in ComfyUI's list order (the first is the default).
SAMPLERS = ("euler", "dpmpp_2m", "uni_pc", "uni_pc_bh2")
SCHEDULERS = ("simple", "sgm_uniform", "beta", "normal")


def _check_model(model, where: str):
    from ..core.handles import Denoiser

    if not isinstance(model, Denoiser) or "sampling_shift" not in model.info:
        raise TypeError(f"{where}: input 'model' must be a MODEL from UNETLoader (or ModelSamplingSD3), got "
                        f"{type(model).__name__}")
    return model


def _check_latent(latent, where: str) -> dict:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise TypeError(f"{where}: input 'latent_image' must be a LATENT dict with a 'samples' tensor")
    if latent.get("noise_mask") is not None:
        raise ValueError(f"{where}: the latent carries a noise_mask (inpainting); masked sampling needs the "
                         f"ComfyUI host")
    return latent


def ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
            where="KSampler") -> dict:
    """ComfyUI's `common_ksampler` (full schedule, noise added) on TwinFlow's sampler."""
    from ..sampling.dual import sample
    from ..sampling.guidance import Branch

    model = _check_model(model, where)
    latent = _check_latent(latent, where)
    branch = Branch(model, positive=positive, negative=negative, cfg=float(cfg), name="KSampler")
    out, _report = sample(branch, latent, seed=int(seed), steps=int(steps), sampler=sampler_name,
                          scheduler=scheduler, shift=model.info["sampling_shift"], denoise=float(denoise),
                          desc=where)
    return out


class EmptyHunyuanLatentVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 848, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                             "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                             "length": ("INT", {"default": 25, "min": 1, "max": MAX_RESOLUTION, "step": 4}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent/video"

    def generate(self, width, height, length, batch_size=1):
        latent = torch.zeros([batch_size, 16, ((length - 1) // 4) + 1, height // 8, width // 8])
        return ({"samples": latent},)


class KSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The Classifier-Free Guidance scale."}),
            "sampler_name": (list(SAMPLERS), {"tooltip": "The algorithm used when sampling (headless: the ones "
                                                         "listed)."}),
            "scheduler": (list(SCHEDULERS), {"tooltip": "How noise is removed over the steps (headless: the ones "
                                                        "listed)."}),
            "positive": ("CONDITIONING", {"tooltip": "What to include."}),
            "negative": ("CONDITIONING", {"tooltip": "What to exclude."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The amount of denoising applied."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
        return (ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise),)


NODE_CLASS_MAPPINGS = {"EmptyHunyuanLatentVideo": EmptyHunyuanLatentVideo, "KSampler": KSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"EmptyHunyuanLatentVideo": "EmptyHunyuanLatentVideo", "KSampler": "KSampler"}
