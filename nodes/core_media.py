"""ComfyUI core nodes, headless: decode and save (VAEDecode, CreateVideo, SaveVideo, SaveImage).

VIDEO is a `Video` (frames, fps, audio) like ComfyUI's `VideoFromComponents`; SaveVideo writes it as
MP4/H.264 (yuv420p, x264's default quality) through the same writer as TwinFlow Save Video, named
`<prefix>_00001_.mp4` as ComfyUI does, and reports it under "images" with "animated" as core SaveVideo.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch

X264_DEFAULT_CRF = 23  # ComfyUI passes no quality option to libx264, whose default is crf 23


@dataclass(frozen=True)
class Video:
    """ComfyUI's VIDEO built from components: frames IMAGE [N, H, W, 3], a frame rate, optional audio."""

    images: torch.Tensor
    frame_rate: Fraction
    audio: Optional[Any] = None

    def get_dimensions(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[1])


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                             "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."

    def decode(self, vae, samples):
        from ..models.wan_vae import WanVAE

        if not isinstance(vae, WanVAE):
            raise TypeError(f"VAEDecode: input 'vae' must be a VAE from VAELoader, got {type(vae).__name__}")
        z = samples["samples"]
        if z.ndim == 4:
            z = z.unsqueeze(2)  # an image latent [B, C, H, W] is one latent frame
        if z.ndim != 5 or z.shape[1] != vae.cfg.z_dim:
            raise ValueError(f"VAEDecode: samples must be Wan latents [B, {vae.cfg.z_dim}, T, H, W], got "
                             f"{tuple(samples['samples'].shape)}")
        p = next(vae.parameters())
        video = vae.decode(z.to(device=p.device, dtype=p.dtype), tiling="auto")  # [B, 3, T, H, W] in [-1, 1]
        images = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
        b, c, t, h, w = images.shape
        return (images.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).contiguous(),)


class CreateVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to create a video from."}),
                             "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0})},
                "optional": {"audio": ("AUDIO", {"tooltip": "The audio to add to the video."})}}

    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "execute"
    CATEGORY = "image/video"
    DESCRIPTION = "Create a video from images."

    def execute(self, images, fps, audio=None):
        if audio is not None:
            raise ValueError("CreateVideo: audio is not supported by the headless runner; disconnect it")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise TypeError(f"CreateVideo: images must be an IMAGE [N, H, W, C], got {getattr(images, 'shape', images)}")
        return (Video(images, Fraction(fps)),)


class SaveVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO", {"tooltip": "The video to save."}),
                             "filename_prefix": ("STRING", {"default": "video/ComfyUI",
                                                            "tooltip": "The prefix for the file to save."}),
                             "format": (["auto", "mp4"], {"default": "auto", "tooltip": "The format to save the video as."}),
                             "codec": (["auto", "h264"], {"default": "auto", "tooltip": "The codec to use for the video."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = "image/video"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def execute(self, video, filename_prefix="video/ComfyUI", format="auto", codec="auto", prompt=None,
                extra_pnginfo=None):
        from .io import TwinFlowSaveVideo

        if not isinstance(video, Video):
            raise TypeError(f"SaveVideo: input 'video' must be a VIDEO from CreateVideo, got {type(video).__name__}")
        out = TwinFlowSaveVideo().save(video.images, filename_prefix, fps=float(video.frame_rate),
                                       crf=X264_DEFAULT_CRF, prompt=prompt, extra_pnginfo=extra_pnginfo)
        ui = out["ui"]
        return {"ui": {"images": ui["videos"], "animated": (True,)}, "result": ()}


class SaveImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI",
                                                            "tooltip": "The prefix for the file to save."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        from .io import TwinFlowSaveImage

        return TwinFlowSaveImage().save(images, filename_prefix, prompt=prompt, extra_pnginfo=extra_pnginfo)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (VAEDecode, CreateVideo, SaveVideo, SaveImage)}
NODE_DISPLAY_NAME_MAPPINGS = {"VAEDecode": "VAE Decode", "CreateVideo": "Create Video", "SaveVideo": "Save Video",
                              "SaveImage": "Save Image"}
