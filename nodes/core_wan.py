"""ComfyUI core nodes, headless: Wan image-to-video conditioning (WanImageToVideo, Wan22ImageToVideoLatent).

Class names, inputs, defaults and outputs are ComfyUI 0.3.64's (`comfy_extras/nodes_wan.py`); the formulas are
`sampling.image_cond`'s, the VAE encode is core VAEEncode's. The samplers turn the conditioning into the model's
inputs (`sampling.guidance.Branch`). Registered in the headless runner only (`nodes.core_headless`).
"""
from __future__ import annotations

from .core_sampling import MAX_RESOLUTION


def vae_encoder(vae, where: str):
    """`encode(pixels [N, H, W, 3]) -> raw latent` through core VAEEncode (same crop, scaling and device)."""
    from .core_media import VAEEncode

    def encode(pixels):
        try:
            return VAEEncode().encode(vae, pixels)[0]["samples"]
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None

    return encode


class WanImageToVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
                             "width": ("INT", {"default": 832, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                             "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                             "length": ("INT", {"default": 81, "min": 1, "max": MAX_RESOLUTION, "step": 4}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})},
                "optional": {"clip_vision_output": ("CLIP_VISION_OUTPUT",), "start_image": ("IMAGE",)}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "execute"
    CATEGORY = "conditioning/video_models"

    def execute(self, positive, negative, vae, width, height, length, batch_size, start_image=None,
                clip_vision_output=None):
        from ..sampling.image_cond import wan_image_to_video

        encode = vae_encoder(vae, "WanImageToVideo")
        return wan_image_to_video(positive, negative, encode, int(width), int(height), int(length), int(batch_size),
                                  start_image=start_image, clip_vision_output=clip_vision_output)


class Wan22ImageToVideoLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",),
                             "width": ("INT", {"default": 1280, "min": 32, "max": MAX_RESOLUTION, "step": 32}),
                             "height": ("INT", {"default": 704, "min": 32, "max": MAX_RESOLUTION, "step": 32}),
                             "length": ("INT", {"default": 49, "min": 1, "max": MAX_RESOLUTION, "step": 4}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})},
                "optional": {"start_image": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "execute"
    CATEGORY = "conditioning/inpaint"

    def execute(self, vae, width, height, length, batch_size, start_image=None):
        from ..sampling.image_cond import wan22_image_to_video_latent

        encode = vae_encoder(vae, "Wan22ImageToVideoLatent")
        return (wan22_image_to_video_latent(encode, int(width), int(height), int(length), int(batch_size),
                                            start_image=start_image),)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (WanImageToVideo, Wan22ImageToVideoLatent)}
NODE_DISPLAY_NAME_MAPPINGS = {"WanImageToVideo": "WanImageToVideo",
                              "Wan22ImageToVideoLatent": "Wan22ImageToVideoLatent"}
