"""Image-to-video conditioning for the Wan family, as ComfyUI defines it.

Two ways a start image enters a Wan model (ComfyUI 0.3.64, `comfy_extras/nodes_wan.py`, `comfy/model_base.py`):

  concat (Wan2.1 I2V 14B, Wan2.2 I2V A14B experts; 36 input channels = 16 noise + 4 mask + 16 image latent)
      `WanImageToVideo`: the start frames, padded to `length` with grey (0.5), are VAE-encoded and put on both
      CONDITIONINGs as `concat_latent_image` with `concat_mask` (0 on the latent frames the image covers, 1 after);
      an optional CLIP vision output goes on both as `clip_vision_output`. At sampling, `WAN21.concat_cond` builds
      the model's extra channels per conditioning entry: cat(4 x (1 - mask), process_in(image latent)), and the
      CLIP vision tokens (`penultimate_hidden_states`) become the model's `clip_fea`.
  in the latent (Wan2.2 TI2V-5B; 48 channels)
      `Wan22ImageToVideoLatent`: the encoded start frames are written into the latent itself and a `noise_mask`
      (0 on those frames) rides along. At sampling the known frames are put back before and after every model
      call (`KSamplerX0Inpaint`, with `WAN22.scale_latent_inpaint` = the clean latent) and the model's timestep
      is scaled per frame by the mean of the mask (`WAN22.process_timestep`: 0 for the given frames).

This module holds those formulas (ComfyUI's `common_upscale`, `resize_to_batch_size` and
`conditioning_set_values` included) and the per-entry model inputs the samplers hand to
`core.handles.Denoiser.velocity`. The VAE is passed in as an `encode(pixels [N,H,W,3]) -> latent` callable.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..core.log import log_once
from .noise import LatentFormat, latent_format_for

logger = logging.getLogger(__name__)

MASK_CHANNELS = 4  # Wan I2V: the mask is repeated to 4 channels (one per frame of a latent frame's 4-frame group)


# ------------------------------------------------------------------------------------------------
# ComfyUI helpers (comfy.utils / node_helpers), same results
# ------------------------------------------------------------------------------------------------

def common_upscale(samples: torch.Tensor, width: int, height: int, method: str = "bilinear",
                   crop: str = "center") -> torch.Tensor:
    """`comfy.utils.common_upscale` for interpolate modes: [B, C, (T,) H, W] resized to (height, width), the
    source first cropped to the target's aspect ratio around its centre when crop == "center"."""
    if method not in ("nearest", "bilinear", "bicubic", "area", "nearest-exact"):
        raise ValueError(f"upscale method {method!r} is not supported headless; use bilinear")
    shape = tuple(samples.shape)
    if len(shape) > 4:  # frames folded into the batch, as ComfyUI does
        samples = samples.reshape(shape[0], shape[1], -1, shape[-2], shape[-1]).movedim(2, 1)
        samples = samples.reshape(-1, shape[1], shape[-2], shape[-1])
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    out = F.interpolate(samples, size=(height, width), mode=method)
    if len(shape) == 4:
        return out
    out = out.reshape((shape[0], -1, shape[1], height, width))
    return out.movedim(2, 1).reshape(shape[:-2] + (height, width))


def resize_to_batch_size(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`comfy.utils.resize_to_batch_size`: pick evenly spread batch entries (repeat or drop)."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch <= 1:
        return t[:batch]
    out = torch.empty([batch] + list(t.shape)[1:], dtype=t.dtype, device=t.device)
    if batch < n:
        scale = (n - 1) / (batch - 1)
        for i in range(batch):
            out[i] = t[min(round(i * scale), n - 1)]
    else:
        scale = n / batch
        for i in range(batch):
            out[i] = t[min(math.floor((i + 0.5) * scale), n - 1)]
    return out


def repeat_to_batch_size(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`comfy.utils.repeat_to_batch_size` (how a CONDRegular input meets the batch)."""
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat([math.ceil(batch / t.shape[0])] + [1] * (t.ndim - 1))[:batch]
    return t


def conditioning_set_values(conditioning, values: dict) -> list:
    """`node_helpers.conditioning_set_values`: a new CONDITIONING with `values` set on every entry's dict."""
    out = []
    for entry in conditioning:
        d = dict(entry[1])
        d.update(values)
        out.append([entry[0], d])
    return out


def check_conditioning(cond, name: str, where: str) -> list:
    if not isinstance(cond, (list, tuple)) or not all(isinstance(e, (list, tuple)) and len(e) == 2
                                                      and isinstance(e[1], dict) for e in cond):
        raise TypeError(f"{where}: input {name!r} must be a CONDITIONING (a list of [tensor, dict] pairs), got "
                        f"{type(cond).__name__}")
    return list(cond)


def _check_image(image, where: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"{where}: start_image must be an IMAGE [N, H, W, 3], got "
                         f"{tuple(getattr(image, 'shape', ())) or type(image).__name__}")
    return image


# ------------------------------------------------------------------------------------------------
# The nodes' formulas
# ------------------------------------------------------------------------------------------------

def latent_frames(length: int) -> int:
    return ((int(length) - 1) // 4) + 1


def wan_image_to_video(positive, negative, encode: Callable[[torch.Tensor], torch.Tensor], width: int, height: int,
                       length: int, batch_size: int, start_image: Optional[torch.Tensor] = None,
                       clip_vision_output=None, where: str = "WanImageToVideo"):
    """ComfyUI's `WanImageToVideo`: (positive, negative, LATENT) with the image conditioning set on both."""
    positive = check_conditioning(positive, "positive", where)
    negative = check_conditioning(negative, "negative", where)
    latent = torch.zeros([batch_size, 16, latent_frames(length), height // 8, width // 8])
    if start_image is not None:
        start = _check_image(start_image, where)[:length]
        start = common_upscale(start.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
        image = torch.ones((length, height, width, start.shape[-1]), dtype=start.dtype) * 0.5
        image[:start.shape[0]] = start
        concat = encode(image[:, :, :, :3])  # (1, 16, T, h, w) raw VAE latent
        mask = torch.ones((1, 1, latent.shape[2], concat.shape[-2], concat.shape[-1]), dtype=start.dtype)
        mask[:, :, :((start.shape[0] - 1) // 4) + 1] = 0.0
        values = {"concat_latent_image": concat, "concat_mask": mask}
        positive = conditioning_set_values(positive, values)
        negative = conditioning_set_values(negative, values)
    if clip_vision_output is not None:
        if getattr(clip_vision_output, "penultimate_hidden_states", None) is None:
            raise TypeError(f"{where}: clip_vision_output must come from CLIPVisionEncode (a CLIP vision output with "
                            f"penultimate_hidden_states), got {type(clip_vision_output).__name__}")
        positive = conditioning_set_values(positive, {"clip_vision_output": clip_vision_output})
        negative = conditioning_set_values(negative, {"clip_vision_output": clip_vision_output})
    return positive, negative, {"samples": latent}


def wan22_image_to_video_latent(encode: Callable[[torch.Tensor], torch.Tensor], width: int, height: int, length: int,
                                batch_size: int, start_image: Optional[torch.Tensor] = None,
                                where: str = "Wan22ImageToVideoLatent") -> dict:
    """ComfyUI's `Wan22ImageToVideoLatent`: a 48-channel LATENT (/16 spatial) with the encoded start frames
    written in and a `noise_mask` that keeps them. Without a start image it is an empty batch-1 latent and no
    mask (as ComfyUI: batch_size is applied only with an image)."""
    latent = torch.zeros([1, 48, latent_frames(length), height // 16, width // 16])
    if start_image is None:
        return {"samples": latent}
    mask = torch.ones([latent.shape[0], 1, latent_frames(length), latent.shape[-2], latent.shape[-1]])
    start = _check_image(start_image, where)[:length]
    start = common_upscale(start.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    given = encode(start[:, :, :, :3])  # (1, 48, t, h, w)
    if given.shape[1] != 48 or given.shape[-2:] != latent.shape[-2:]:
        raise ValueError(f"{where}: the VAE gives latents of shape {tuple(given.shape)}; this node needs the Wan2.2 "
                         f"VAE (48 channels, 16x spatial compression), e.g. wan2.2_vae.safetensors")
    latent[:, :, :given.shape[-3]] = given
    mask[:, :, :given.shape[-3]] *= 0.0
    latent = LatentFormat("wan22").process_out(latent) * mask + latent * (1.0 - mask)
    return {"samples": latent.repeat((batch_size,) + (1,) * (latent.ndim - 1)),
            "noise_mask": mask.repeat((batch_size,) + (1,) * (mask.ndim - 1))}


# ------------------------------------------------------------------------------------------------
# What a denoiser takes, and what the sampler builds for it
# ------------------------------------------------------------------------------------------------

def latent_channels(denoiser) -> int:
    return int(denoiser.info.get("latent_channels", denoiser.in_channels))


def image_channels(denoiser) -> int:
    """Input channels beyond the latent (Wan I2V: 20 = 4 mask + 16 image latent); 0 for text-to-video."""
    return int(denoiser.in_channels) - latent_channels(denoiser)


def takes_clip_vision(denoiser) -> bool:
    """Whether the model has the CLIP-vision image embedding (Wan2.1 I2V's `img_emb`)."""
    if "clip_vision" in denoiser.info:
        return bool(denoiser.info["clip_vision"])
    return bool(getattr(denoiser.config, "clip_dim", None) or getattr(denoiser.config, "image_dim", None))


def frame_timesteps(denoiser) -> bool:
    """Whether the model takes a timestep per frame from the latent's noise mask (Wan2.2 TI2V, ComfyUI's WAN22)."""
    if "per_token_timestep" in denoiser.info:  # models.wan_dit.model_info: kind == "ti2v"
        return bool(denoiser.info["per_token_timestep"])
    return denoiser.family == "wan_dit" and denoiser.info.get("latent_format") == "wan22"


def inpaint_keeps_clean_latent(denoiser) -> bool:
    """ComfyUI's `scale_latent_inpaint`: WAN22 (the 48-channel TI2V model) feeds the known region as the clean
    latent; every other model as the latent noised to the current sigma."""
    return latent_format_for(denoiser).name == "wan22"


@dataclass
class ModelCond:
    """One conditioning entry as the model takes it (ComfyUI's processed cond dict for a Wan model)."""

    context: Optional[torch.Tensor]  # (B|1, L, D) text
    concat: Optional[torch.Tensor] = None  # (B, C', T, H, W) joined to the latent on channels (in model space)
    clip_fea: Optional[torch.Tensor] = None  # (1|B, N, 1280) CLIP vision tokens

    def batch_key(self) -> tuple:
        """Entries whose key matches can run in one batch (ComfyUI's `can_concat`)."""
        return (None if self.concat is None else tuple(self.concat.shape[1:]),
                None if self.clip_fea is None else tuple(self.clip_fea.shape[1:]))


def concat_cond(denoiser, noise_shape, extras: dict, denoise_mask: Optional[torch.Tensor], fmt: LatentFormat,
                device) -> Optional[torch.Tensor]:
    """ComfyUI's `WAN21.concat_cond` for one entry: the model's extra input channels, or None for a model without.

    `image_to_video` (ComfyUI's flag) is True for the Wan2.1 I2V files (with `img_emb`); the Wan2.2 I2V experts
    load as ComfyUI's T2V config (no `img_emb`) and take the same 4 + 16 channels by the channel count."""
    extra = image_channels(denoiser)
    if extra <= 0:
        return None
    image = extras.get("concat_latent_image")
    n = noise_shape[0]
    if image is None:
        image = torch.zeros([n, extra, *noise_shape[2:]], dtype=torch.float32, device=device)
    else:
        image = common_upscale(image.to(device=device, dtype=torch.float32), noise_shape[-1], noise_shape[-2],
                               "bilinear", "center")
        c = fmt.channels
        for i in range(0, image.shape[1], c):
            image[:, i:i + c] = fmt.process_in(image[:, i:i + c])
        image = resize_to_batch_size(image, n)
    if extra != image.shape[1] + MASK_CHANNELS:
        if not takes_clip_vision(denoiser) or extra == image.shape[1]:
            return image
    if image.shape[1] > extra - MASK_CHANNELS:
        image = image[:, :extra - MASK_CHANNELS]
    mask = extras.get("concat_mask", denoise_mask)
    if mask is None:
        mask = torch.zeros([n, MASK_CHANNELS, *noise_shape[2:]], dtype=torch.float32, device=device)
    else:
        mask = mask.to(device=device, dtype=torch.float32)
        if mask.shape[1] != MASK_CHANNELS:
            mask = torch.mean(mask, dim=1, keepdim=True)
        mask = common_upscale(1.0 - mask, noise_shape[-1], noise_shape[-2], "bilinear", "center")
        if mask.shape[-3] < noise_shape[-3]:
            mask = F.pad(mask, (0, 0, 0, 0, 0, noise_shape[-3] - mask.shape[-3]), mode="constant", value=0)
        if mask.shape[1] == 1:
            mask = mask.repeat(1, MASK_CHANNELS, 1, 1, 1)
        mask = resize_to_batch_size(mask, n)
    return torch.cat((mask, image), dim=1)


def model_cond(denoiser, context: Optional[torch.Tensor], extras: dict, noise_shape, denoise_mask, device,
               where: str) -> ModelCond:
    """The inputs one CONDITIONING entry gives `denoiser`, checked: image conditioning a model needs is present,
    and conditioning a model cannot use is refused (never dropped silently)."""
    name = denoiser.name or denoiser.family
    extra = image_channels(denoiser)
    has_image = extras.get("concat_latent_image") is not None
    if extra > 0 and not has_image:
        raise ValueError(f"{where}: the model {name!r} is an image-to-video model ({denoiser.in_channels} input "
                         f"channels: latent + mask + image) but the conditioning carries no start image; connect a "
                         f"start_image to WanImageToVideo (or TwinFlow Image to Video) and use its positive/negative")
    if extra <= 0 and has_image:
        raise ValueError(f"{where}: the conditioning carries a start image (concat_latent_image from WanImageToVideo) "
                         f"but the model {name!r} takes none ({denoiser.in_channels} input channels); use an "
                         f"image-to-video model (Wan2.1 I2V, Wan2.2 I2V), or for Wan2.2 TI2V-5B "
                         f"Wan22ImageToVideoLatent")
    cvo = extras.get("clip_vision_output")
    clip_fea = None
    if cvo is not None:
        clip_fea = getattr(cvo, "penultimate_hidden_states", None)
        if not isinstance(clip_fea, torch.Tensor) or clip_fea.ndim != 3:
            raise TypeError(f"{where}: clip_vision_output has no penultimate_hidden_states tensor [B, N, D]; connect "
                            f"CLIPVisionEncode")
        clip_fea = clip_fea.to(device=device, dtype=torch.float32)
        if not takes_clip_vision(denoiser):
            # ComfyUI's Wan model drops clip_fea when it has no image embedding, so such workflows (a Wan2.2 I2V
            # expert behind a WanImageToVideo with CLIP vision wired) run there; we run them too, and say so.
            log_once(logger, ("image_cond.clip_unused", name), "%s: the conditioning carries a CLIP vision output but "
                     "the model %r has no image embedding (only Wan2.1 I2V/FLF2V 14B uses CLIP vision; Wan2.2 models "
                     "do not): it is ignored, as ComfyUI does; disconnect clip_vision_output to silence this",
                     where, name, level=logging.WARNING)
            clip_fea = None
    elif takes_clip_vision(denoiser) and extra > 0:
        raise ValueError(f"{where}: the model {name!r} (Wan2.1 I2V) needs a CLIP vision output; connect "
                         f"CLIPVisionEncode (clip_vision_h) to WanImageToVideo's clip_vision_output")
    concat = None
    if extra > 0:
        fmt = latent_format_for(denoiser)
        concat = concat_cond(denoiser, noise_shape, extras, denoise_mask, fmt, device)
        if concat.shape[1] != extra:
            raise ValueError(f"{where}: the image conditioning gives {concat.shape[1]} channels but the model "
                             f"{name!r} takes {extra} beyond the latent; encode the start image with this model "
                             f"family's VAE")
    return ModelCond(context=context, concat=concat, clip_fea=clip_fea)


def prepare_denoise_mask(noise_mask: torch.Tensor, shape) -> torch.Tensor:
    """`comfy.sampler_helpers.prepare_mask` / `comfy.utils.reshape_mask` for a video latent: the LATENT's
    noise_mask resized (trilinear) to the latent's frames and size, repeated over channels and batch."""
    m = noise_mask.float()
    if m.ndim < 5:
        m = m.reshape((1, 1, -1, m.shape[-2], m.shape[-1]))
    m = F.interpolate(m, size=tuple(shape[2:]), mode="trilinear")
    if m.shape[1] < shape[1]:
        m = m.repeat((1, shape[1], 1, 1, 1))[:, :shape[1]]
    return repeat_to_batch_size(m, shape[0])


def frame_weights(denoise_mask: torch.Tensor) -> torch.Tensor:
    """`WAN22.process_timestep`'s factor: per latent frame the mean of the mask, (B, T) (timestep = factor * t)."""
    return torch.mean(denoise_mask, dim=(1, 3, 4))


class KnownRegion:
    """ComfyUI's `KSamplerX0Inpaint` for a LATENT with a noise mask: around every model call the region the mask
    keeps (mask 0) is set to the known latent, noised to the current sigma (or clean for ComfyUI's WAN22), and
    the prediction there is replaced by the known latent. `latent` is in model space, `noise` the run's noise."""

    def __init__(self, denoise_mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor, keep_clean: bool):
        self.mask = denoise_mask
        self.keep = 1.0 - denoise_mask
        self.latent = latent
        self.noise = noise
        self.keep_clean = keep_clean

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        known = self.latent if self.keep_clean else sigma * self.noise + (1.0 - sigma) * self.latent
        return x * self.mask + known * self.keep

    def prediction(self, denoised: torch.Tensor) -> torch.Tensor:
        return denoised * self.mask + self.latent * self.keep


def known_region(latent: dict, shape, x0: torch.Tensor, noise: torch.Tensor, denoiser, device):
    """(KnownRegion or None, the prepared denoise mask or None) for a LATENT dict's `noise_mask`."""
    mask = latent.get("noise_mask")
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"the LATENT's noise_mask must be a tensor, got {type(mask).__name__}")
    dm = prepare_denoise_mask(mask.to(device), shape).to(device=device, dtype=torch.float32)
    return KnownRegion(dm, x0, noise, inpaint_keeps_clean_latent(denoiser)), dm
