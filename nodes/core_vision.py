"""ComfyUI core nodes, headless: the CLIP vision encoder (CLIPVisionLoader, CLIPVisionEncode), as Wan2.1
image-to-video workflows use it.

Class names, inputs, defaults and outputs are ComfyUI 0.3.64's; the work is done by `models.clip_vision` (no
ComfyUI import). Registered in the headless runner only (`nodes.core_headless`): inside ComfyUI the same names
come from ComfyUI itself.

Headless types: CLIP_VISION is a `models.clip_vision.ClipVisionModel`; CLIP_VISION_OUTPUT a
`models.clip_vision.ClipVisionOutput` (last_hidden_state, image_embeds, penultimate_hidden_states, mm_projected).
"""
from __future__ import annotations

from ..core import paths
from .core_models import compute_device


class CLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (paths.list_models("clip_vision"),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load_clip"
    CATEGORY = "loaders"

    def load_clip(self, clip_name):
        from ..models.clip_vision import load_clip_vision

        path = paths.find_model("clip_vision", clip_name)
        # weights keep the file's dtype (clip_vision_h ships fp16, as ComfyUI stores it); compute is float32
        return (load_clip_vision(path, device=compute_device()),)


class CLIPVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision": ("CLIP_VISION",),
                             "image": ("IMAGE",),
                             "crop": (["center", "none"],)}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    def encode(self, clip_vision, image, crop):
        from ..models.clip_vision import ClipVisionModel

        if not isinstance(clip_vision, ClipVisionModel):
            raise TypeError(f"CLIPVisionEncode: input 'clip_vision' must be a CLIP_VISION (from CLIPVisionLoader), "
                            f"got {type(clip_vision).__name__}")
        return (clip_vision.encode_image(image, crop=crop == "center"),)  # ComfyUI: anything but "center" is no crop


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (CLIPVisionLoader, CLIPVisionEncode)}
NODE_DISPLAY_NAME_MAPPINGS = {"CLIPVisionLoader": "Load CLIP Vision", "CLIPVisionEncode": "CLIP Vision Encode"}
