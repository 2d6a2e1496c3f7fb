"""ComfyUI core nodes, headless: images, video and the VAE (VAEDecode, VAEDecodeTiled, VAEEncode, CreateVideo,
SaveVideo, SaveImage, SaveAnimatedWEBP, PreviewImage, LoadImage).

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
        return (_decode(vae, samples, "VAEDecode"),)


def _latent(vae, samples, where: str) -> torch.Tensor:
    from ..models.wan_vae import WanVAE

    if not isinstance(vae, WanVAE):
        raise TypeError(f"{where}: input 'vae' must be a VAE from VAELoader, got {type(vae).__name__}")
    z = samples["samples"]
    if z.ndim == 4:
        z = z.unsqueeze(2)  # an image latent [B, C, H, W] is one latent frame
    if z.ndim != 5 or z.shape[1] != vae.cfg.z_dim:
        raise ValueError(f"{where}: samples must be Wan latents [B, {vae.cfg.z_dim}, T, H, W], got "
                         f"{tuple(samples['samples'].shape)}")
    p = next(vae.parameters())
    return z.to(device=p.device, dtype=p.dtype)


def _images(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> IMAGE [B*T, H, W, 3] (ComfyUI's process_output, batches combined)."""
    images = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
    b, c, t, h, w = images.shape
    return images.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).contiguous()


def _decode(vae, samples, where: str) -> torch.Tensor:
    z = _latent(vae, samples, where)
    return _images(vae.decode(z, tiling="auto"))  # [B, 3, T, H, W] in [-1, 1]


class VAEDecodeTiled:
    """ComfyUI's tiled decode (`models.wan_vae_tiles.decode_tiled_comfy`): tiles in space and time, each decoded
    on its own and blended with ComfyUI's feathered masks, so the frames equal ComfyUI's (not the untiled
    decode). TwinFlow VAE Decode keeps the exact decode (row bands)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",),
                             "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32}),
                             "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
                             "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                                       "tooltip": "Only used for video VAEs: Amount of frames to decode at a time."}),
                             "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                                          "tooltip": "Only used for video VAEs: Amount of frames to overlap."})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "_for_testing"

    def decode(self, vae, samples, tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8):
        from ..models.wan_vae_tiles import comfy_tile_params, decode_tiled_comfy

        z = _latent(vae, samples, "VAEDecodeTiled")
        tile, over = comfy_tile_params(tile_size, overlap, temporal_size, temporal_overlap,
                                       vae.cfg.spatial_ratio, vae.cfg.temporal_ratio)
        with torch.no_grad():
            video = decode_tiled_comfy(vae, z, tile, over)
        return (_images(video),)


class VAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae, pixels):
        from ..models.wan_vae import WanVAE

        if not isinstance(vae, WanVAE):
            raise TypeError(f"VAEEncode: input 'vae' must be a VAE from VAELoader, got {type(vae).__name__}")
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise ValueError(f"VAEEncode: pixels must be an IMAGE [N, H, W, 3], got {getattr(pixels, 'shape', pixels)}")
        r = vae.cfg.spatial_ratio
        n, h, w, _ = pixels.shape
        h8, w8 = (h // r) * r, (w // r) * r
        if h8 == 0 or w8 == 0:
            raise ValueError(f"VAEEncode: the image is {w}x{h}; the Wan VAE needs at least {r}x{r} pixels")
        y0, x0 = (h % r) // 2, (w % r) // 2  # ComfyUI crops to a multiple of 8, centred
        pixels = pixels[:, y0:y0 + h8, x0:x0 + w8, :3]
        p = next(vae.parameters())
        video = pixels.movedim(-1, 0).unsqueeze(0).to(device=p.device, dtype=p.dtype) * 2.0 - 1.0  # (1, 3, N, H, W)
        return ({"samples": vae.encode(video).float().cpu()},)


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
        return TwinFlowSaveVideo().save(video.images, filename_prefix, fps=float(video.frame_rate),
                                        crf=X264_DEFAULT_CRF, prompt=prompt, extra_pnginfo=extra_pnginfo)


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


class SaveAnimatedWEBP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                             "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                             "lossless": ("BOOLEAN", {"default": True}),
                             "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                             "method": (["default", "fastest", "slowest"],)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"

    def save_images(self, images, fps, filename_prefix, lossless, quality, method, num_frames=0, prompt=None,
                    extra_pnginfo=None):
        from .io import TwinFlowSaveAnimatedWEBP

        return TwinFlowSaveAnimatedWEBP().save(images, filename_prefix, fps=fps, lossless=lossless, quality=quality,
                                               method=method, prompt=prompt, extra_pnginfo=extra_pnginfo)


class PreviewImage:
    """Headless, previews are PNGs in the temp folder (`core.paths.temp_dir()`), reported with type 'temp'."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        import random

        from ..core import paths
        from .io import TwinFlowSaveImage

        rng = random.Random()
        suffix = "".join(rng.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))  # as ComfyUI names previews
        with paths.using(output_dir=paths.temp_dir()):
            out = TwinFlowSaveImage().save(images, f"ComfyUI_temp_{suffix}", prompt=prompt, extra_pnginfo=extra_pnginfo)
        for entry in out["ui"]["images"]:
            entry["type"] = "temp"
        return out


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        from .io import IMAGE_EXTENSIONS, list_input_files

        return {"required": {"image": (list_input_files(IMAGE_EXTENSIONS), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        from .io import TwinFlowLoadImage

        return TwinFlowLoadImage.VALIDATE_INPUTS(image)

    @classmethod
    def IS_CHANGED(cls, image):
        from .io import TwinFlowLoadImage

        return TwinFlowLoadImage.IS_CHANGED(image=image)

    def load_image(self, image):
        from .io import TwinFlowLoadImage

        return TwinFlowLoadImage().load(image)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (VAEDecode, VAEDecodeTiled, VAEEncode, CreateVideo, SaveVideo, SaveImage,
                                               SaveAnimatedWEBP, PreviewImage, LoadImage)}
NODE_DISPLAY_NAME_MAPPINGS = {"VAEDecode": "VAE Decode", "VAEDecodeTiled": "VAE Decode (Tiled)",
                              "VAEEncode": "VAE Encode", "CreateVideo": "Create Video", "SaveVideo": "Save Video",
                              "SaveImage": "Save Image", "SaveAnimatedWEBP": "SaveAnimatedWEBP",
                              "PreviewImage": "Preview Image", "LoadImage": "Load Image"}
