"""TwinFlow nodes: vae — load a Wan2.1 or Wan2.2 VAE (`TWINFLOW_VAE`), encode IMAGE frames to LATENT, decode back.

Formats are ComfyUI's: IMAGE is float32 [N, H, W, 3] in 0..1 with video frames stacked on N; LATENT is
`{"samples": Tensor[B, 16, T, H/8, W/8]}` (Wan2.2: [B, 48, T, H/16, W/16]) raw (un-normalised) VAE space. All
math is in `models.wan_vae` / `models.wan22_vae`.
"""
from __future__ import annotations

import torch

from ..core import paths
from ..core.layout import images_to_video, latent_video, video_to_images
from ._inputs import as_vae
from ._loaders import DTYPE_CHOICES, model_names, random_preset, weight_seed

CATEGORY = "TwinFlow/vae"
RANDOM_PRESETS = ("tiny", "wan2.1", "wan2.2-tiny", "wan2.2")  # the Wan2.2 ones: models.wan22_vae.RANDOM_NAMES
TILING_CHOICES = ("auto", "off", "custom")
MAX_RESOLUTION = 16384


class TwinFlowLoadVAE:
    """Load a Wan2.1 or Wan2.2 VAE file (official .pth or ComfyUI .safetensors) or seeded random weights."""

    @classmethod
    def INPUT_TYPES(cls):
        names = model_names("vae", RANDOM_PRESETS)
        return {
            "required": {
                "vae_name": (names, {"tooltip": "A Wan2.1 or Wan2.2 VAE from models/vae (Wan2.1_VAE.pth, wan2.2_vae.safetensors or "
                                                "wan_2.1_vae.safetensors, prefixes such as 'first_stage_model.' are "
                                                "stripped), or 'random:<preset>' for seeded random weights (demos, CI)."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "default",
                                                "tooltip": "Weights/compute dtype. 'default' keeps the file's dtype "
                                                           "(fp32 for random presets)."}),
                "seed": weight_seed(),
            }
        }

    RETURN_TYPES = ("TWINFLOW_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a Wan causal video VAE, the family read from the file: Wan2.1 (16 latent channels, 4x time "
                   "and 8x space compression) or Wan2.2 (48 channels, 4x time, 16x space).")

    def load(self, vae_name, dtype="default", seed=0):
        from ..models import loading, wan22_vae, wan_vae

        torch_dtype = loading.parse_dtype(dtype)
        preset = random_preset(vae_name, RANDOM_PRESETS, "VAE")
        if preset in wan22_vae.RANDOM_NAMES:
            return (wan22_vae.random_wan22_vae(wan22_vae.RANDOM_NAMES[preset], seed=int(seed),
                                               dtype=torch_dtype or torch.float32),)
        if preset is not None:
            return (wan_vae.random_wan_vae(preset, seed=int(seed), dtype=torch_dtype or torch.float32),)
        path = paths.find_model("vae", vae_name)
        return (wan22_vae.load_vae(path, dtype=torch_dtype),)  # Wan2.1 or Wan2.2, from the tensors


def _check_row_bands(row_bands) -> None:
    if not isinstance(row_bands, int) or isinstance(row_bands, bool) or row_bands < 0:
        raise ValueError(f"row_bands must be 0 (auto) or a positive integer, got {row_bands!r}")


class TwinFlowVAEEncode:
    """IMAGE frames -> LATENT (the raw latent mean, as ComfyUI's VAE Encode)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("TWINFLOW_VAE,VAE", {"tooltip": "The VAE from TwinFlow Load VAE, or a Wan2.1/Wan2.2 VAE from core Load VAE."}),
                "pixels": ("IMAGE", {"tooltip": "Video frames [N, H, W, 3] in 0..1. N should be 1+4k; extra frames "
                                                "are dropped. H and W are cropped to multiples of 8."}),
            },
            "optional": {
                "row_bands": ("INT", {"default": 0, "min": 0, "max": 64,
                                      "tooltip": "Exact low-memory encode: the full-resolution layers run in "
                                                 "horizontal bands that pass their edge rows on to the next "
                                                 "band; the result equals the whole-frame encode. 0 = auto "
                                                 "(bands of >= 128 px, e.g. 2 at 256 px), 1 = whole frames."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes video frames with the Wan VAE; 1+4k frames give 1+k latent frames; exact low-memory "
                   "row bands for tall frames")

    def encode(self, vae, pixels, row_bands=0):
        vae = as_vae(vae)
        _check_row_bands(row_bands)
        video = images_to_video(pixels, vae.cfg.spatial_ratio)  # (1, 3, N, H, W) in -1..1
        samples = vae.encode(video, bands=row_bands or None)
        return ({"samples": samples.to(torch.float32)},)


class TwinFlowVAEDecode:
    """LATENT -> IMAGE frames, streaming one latent frame at a time; spatial tiling when needed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("TWINFLOW_VAE,VAE", {"tooltip": "The VAE from TwinFlow Load VAE, or a Wan2.1/Wan2.2 VAE from core Load VAE."}),
                "samples": ("LATENT", {"tooltip": "Raw Wan latents [B, 16, T, H/8, W/8]; T latent frames give "
                                                  "1+4(T-1) frames."}),
                "tiling": (list(TILING_CHOICES), {"default": "auto",
                                                  "tooltip": "auto: decode whole frames if the memory estimate fits "
                                                             "the device, else tile. off: never tile (refuses up front "
                                                             "if it cannot fit). custom: tile with the sizes below. "
                                                             "Time is always streamed one latent frame at a time."}),
                "tile_size": ("INT", {"default": 512, "min": 32, "max": MAX_RESOLUTION, "step": 16,
                                      "tooltip": "Tile size in pixels (custom tiling)."}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 16,
                                    "tooltip": "Tile overlap in pixels, blended linearly (custom tiling); at most "
                                               "half the tile size."}),
            },
            "optional": {
                "row_bands": ("INT", {"default": 0, "min": 0, "max": 64,
                                      "tooltip": "Exact low-memory decode: the full-resolution layers run in "
                                                 "horizontal bands that pass their edge rows on to the next "
                                                 "band, so only one band's caches are alive and no row is "
                                                 "computed twice; the result equals the whole-frame decode "
                                                 "(unlike tiles). 0 = auto (bands of >= 72 px, e.g. 3 at 256 px; "
                                                 "more if memory needs it), 1 = whole frames (most memory)."}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Decodes Wan latents to video frames (IMAGE, 0..1): streamed in time, exact low-memory row bands "
                   "for tall frames, optional tiling.")

    def decode(self, vae, samples, tiling="auto", tile_size=512, overlap=64, row_bands=0):
        vae = as_vae(vae)
        z = latent_video(samples, vae.cfg.z_dim)
        if tiling not in TILING_CHOICES:
            raise ValueError(f"tiling must be one of {TILING_CHOICES}, got {tiling!r}")
        r = vae.cfg.spatial_ratio
        if tiling == "custom":
            if overlap * 2 > tile_size:
                raise ValueError(f"overlap {overlap} must be at most half of tile_size {tile_size}")
            video = vae.decode(z, tiling="on", tile=(max(2, tile_size // r), overlap // r))
        else:
            _check_row_bands(row_bands)
            video = vae.decode(z, tiling=tiling, bands=row_bands or None)
        return (video_to_images(video),)


class TwinFlowImageToVideo:
    """Start image -> image-to-video conditioning, the way the model family takes it (ComfyUI's formulas)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("TWINFLOW_VAE,VAE", {"tooltip": "The model family's VAE: Wan2.1 (16 channels) for Wan2.1 I2V "
                                                        "and the Wan2.2 I2V experts, Wan2.2 (48) for Wan2.2 TI2V-5B."}),
                "start_image": ("IMAGE", {"tooltip": "The first frame(s); resized (bilinear, centre crop) to "
                                                     "width x height."}),
                "width": ("INT", {"default": 832, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                                  "tooltip": "video width in pixels (Wan2.2 VAE: a multiple of 32)"}),
                "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                                   "tooltip": "video height in pixels (Wan2.2 VAE: a multiple of 32)"}),
                "length": ("INT", {"default": 81, "min": 1, "max": MAX_RESOLUTION, "step": 4,
                                   "tooltip": "frames of the video (1+4k)"}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "step": 1,
                                       "tooltip": "latents in the batch"}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Wan2.1 VAE: gets the start image (needed)"}),
                "negative": ("CONDITIONING", {"tooltip": "Wan2.1 VAE: gets the start image (needed for cfg != 1)"}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {"tooltip": "Wan2.1 I2V 14B only: CLIPVisionEncode of "
                                                                         "the start image"}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Image-to-video for the TwinFlow samplers and core KSampler. With a Wan2.1 VAE: ComfyUI's "
                   "WanImageToVideo (the encoded image + mask on the conditioning, an empty latent). With the Wan2.2 "
                   "VAE: ComfyUI's Wan22ImageToVideoLatent (the image inside the latent with a noise mask; the "
                   "conditioning passes through).")

    def build(self, vae, start_image, width, height, length, batch_size, positive=None, negative=None,
              clip_vision_output=None):
        from ..sampling.image_cond import wan22_image_to_video_latent, wan_image_to_video

        vae = as_vae(vae)

        def encode(pixels):
            return vae.encode(images_to_video(pixels, vae.cfg.spatial_ratio)).to(torch.float32).cpu()

        where = "TwinFlow Image to Video"
        if vae.cfg.z_dim == 48:
            if clip_vision_output is not None:
                raise ValueError(f"{where}: Wan2.2 TI2V-5B takes no CLIP vision output; disconnect clip_vision_output")
            latent = wan22_image_to_video_latent(encode, width, height, length, batch_size, start_image, where=where)
            return (positive, negative, latent)
        if positive is None:
            raise ValueError(f"{where}: with a Wan2.1 VAE the start image rides on the conditioning; connect positive "
                             f"(and negative for cfg != 1)")
        pos, neg, latent = wan_image_to_video(positive, negative if negative is not None else [], encode, width,
                                              height, length, batch_size, start_image=start_image,
                                              clip_vision_output=clip_vision_output, where=where)
        return (pos, neg if negative is not None else None, latent)


NODE_CLASS_MAPPINGS = {
    "TwinFlowLoadVAE": TwinFlowLoadVAE,
    "TwinFlowVAEEncode": TwinFlowVAEEncode,
    "TwinFlowVAEDecode": TwinFlowVAEDecode,
    "TwinFlowImageToVideo": TwinFlowImageToVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TwinFlowLoadVAE": "TwinFlow Load VAE",
    "TwinFlowVAEEncode": "TwinFlow VAE Encode",
    "TwinFlowVAEDecode": "TwinFlow VAE Decode",
    "TwinFlowImageToVideo": "TwinFlow Image to Video",
}
