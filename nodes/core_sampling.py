"""ComfyUI core nodes, headless: latents and sampling (EmptyHunyuanLatentVideo, KSampler, KSamplerAdvanced,
SamplerCustomAdvanced with KSamplerSelect / BasicScheduler / RandomNoise / DisableNoise / CFGGuider /
BasicGuider).

Every sampler runs `sampling.ksampler.sample`, ComfyUI's KSAMPLER wrapper on TwinFlow's library: the noise
of `comfy.sample.prepare_noise`, the schedulers of `comfy.samplers.calculate_sigmas` at the model's shift
(ModelSamplingSD3), the penultimate-sigma drop of the UniPC samplers (KSampler only, as in ComfyUI), CFG on
the x0 prediction (skipped at cfg 1), the flow noise scaling and its inverse, `process_in`/`process_out`
of the Wan2.1 latent format.

Headless value types: NOISE is `Noise` (seed or None), GUIDER is a `sampling.guidance.Branch`, SAMPLER is
`SamplerName`, SIGMAS a 1-D float tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    return latent


@dataclass(frozen=True)
class Noise:
    """ComfyUI's NOISE: seeded Gaussian noise (`Noise_RandomNoise`) or none at all (`Noise_EmptyNoise`)."""

    seed: Optional[int] = None

    def generate(self, latent: dict) -> torch.Tensor:
        from ..sampling.noise import prepare_noise

        samples = latent["samples"]
        if self.seed is None:
            return torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout, device="cpu")
        return prepare_noise(samples, int(self.seed), latent.get("batch_index"))


@dataclass(frozen=True)
class SamplerName:
    """ComfyUI's SAMPLER from KSamplerSelect (headless: one of SAMPLERS)."""

    name: str


def ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
            *, add_noise=True, start_step=0, last_step=None, force_full_denoise=True, where="KSampler") -> dict:
    """ComfyUI's `common_ksampler` (KSampler, KSamplerAdvanced) on TwinFlow's sampler."""
    from ..sampling import ksampler
    from ..sampling.guidance import Branch

    model = _check_model(model, where)
    latent = _check_latent(latent, where)
    sigmas = ksampler.advanced_sigmas(scheduler, int(steps), model.info["sampling_shift"], sampler_name,
                                      start_step=start_step, last_step=last_step,
                                      force_full_denoise=force_full_denoise, denoise=float(denoise))
    if sigmas is None:  # start_at_step past the schedule: ComfyUI returns the latent as it came
        return {**latent}
    noise = Noise(int(seed) if add_noise else None).generate(latent)
    branch = Branch(model, positive=positive, negative=negative, cfg=float(cfg), name=where)
    return ksampler.sample(branch, latent, noise, sigmas, sampler_name, desc=where).latent


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


class KSamplerAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (list(SAMPLERS),),
            "scheduler": (list(SCHEDULERS),),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        return (ksample(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                        denoise, add_noise=add_noise != "disable", start_step=start_at_step, last_step=end_at_step,
                        force_full_denoise=return_with_leftover_noise != "enable", where="KSamplerAdvanced"),)


class KSamplerSelect:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler_name": (list(SAMPLERS),)}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"

    def get_sampler(self, sampler_name):
        return (SamplerName(sampler_name),)


class BasicScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "scheduler": (list(SCHEDULERS),),
                             "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"

    def get_sigmas(self, model, scheduler, steps, denoise):
        from ..sampling.schedules import calculate_sigmas

        model = _check_model(model, "BasicScheduler")
        total = steps
        if denoise < 1.0:
            if denoise <= 0.0:
                return (torch.FloatTensor([]),)
            total = int(steps / denoise)
        return (calculate_sigmas(scheduler, total, model.info["sampling_shift"])[-(steps + 1):],)


class DisableNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"

    def get_noise(self):
        return (Noise(None),)


class RandomNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                                                    "control_after_generate": True})}}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"

    def get_noise(self, noise_seed):
        return (Noise(int(noise_seed)),)


class CFGGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model, positive, negative, cfg):
        from ..sampling.guidance import Branch

        return (Branch(_check_model(model, "CFGGuider"), positive=positive, negative=negative, cfg=float(cfg),
                       name="CFGGuider"),)


class BasicGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model, conditioning):
        from ..sampling.guidance import Branch

        return (Branch(_check_model(model, "BasicGuider"), positive=conditioning, cfg=1.0, name="BasicGuider"),)


class SamplerCustomAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",),
                             "sigmas": ("SIGMAS",), "latent_image": ("LATENT",)}}

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"

    def sample(self, noise, guider, sampler, sigmas, latent_image):
        from ..sampling import ksampler
        from ..sampling.guidance import Branch

        where = "SamplerCustomAdvanced"
        if not isinstance(noise, Noise) or not isinstance(guider, Branch) or not isinstance(sampler, SamplerName):
            raise TypeError(f"{where}: noise, guider and sampler must come from RandomNoise/DisableNoise, "
                            f"CFGGuider/BasicGuider and KSamplerSelect")
        if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
            raise TypeError(f"{where}: sigmas must be a 1-D SIGMAS tensor (BasicScheduler), got {type(sigmas).__name__}")
        latent = _check_latent(latent_image, where)
        result = ksampler.sample(guider, latent, noise.generate(latent), sigmas.float(), sampler.name, desc=where)
        return (result.latent, result.denoised)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (EmptyHunyuanLatentVideo, KSampler, KSamplerAdvanced, KSamplerSelect,
                                               BasicScheduler, DisableNoise, RandomNoise, CFGGuider, BasicGuider,
                                               SamplerCustomAdvanced)}
NODE_DISPLAY_NAME_MAPPINGS = {"KSamplerAdvanced": "KSampler (Advanced)", "SamplerCustomAdvanced": "SamplerCustomAdvanced"}
