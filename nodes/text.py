"""TwinFlow nodes: text — CONDITIONING (`[[tensor [B, L, D], {}]]`, ComfyUI's form) from embeddings files,
a local umT5 encoder, or the deterministic tiny encoder."""
from __future__ import annotations

import logging

from ..core import paths

logger = logging.getLogger(__name__)

CATEGORY = "TwinFlow/text"
DTYPE_CHOICES = ("default", "fp32", "bf16", "fp16")


def umt5_folders() -> list[str]:
    """Folders under text_encoders/ that hold a config.json (transformers-format encoders)."""
    out = set()
    for name in paths.list_models("text_encoders"):
        if name.endswith("/config.json"):
            out.add(name[: -len("/config.json")])
    return sorted(out)


class TwinFlowLoadTextEmbeddings:
    """Precomputed text embeddings from models/text_embeddings as CONDITIONING."""

    @classmethod
    def INPUT_TYPES(cls):
        names = [n for n in paths.list_models("text_embeddings") if n.lower().endswith((".safetensors", ".sft"))]
        return {
            "required": {
                "embeddings_name": (names, {"tooltip": "A .safetensors file in models/text_embeddings holding one "
                                                       "tensor [L, D] or [B, L, D] (e.g. umT5 outputs, D=4096 for "
                                                       "Wan2.1), named 'embeddings', 'context' or 'prompt_embeds'."}),
                "key": ("STRING", {"default": "auto", "tooltip": "Tensor name to read; 'auto' tries embeddings, "
                                                                 "context, prompt_embeds, then the only tensor."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 65536, "step": 1,
                                  "tooltip": "Required embedding width D (4096 for Wan2.1); 0 accepts any."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads precomputed text embeddings (safetensors) as CONDITIONING, for runs without a text encoder."

    def load(self, embeddings_name, key="auto", width=0):
        from ..models import text

        path = paths.find_model("text_embeddings", embeddings_name)
        return (text.conditioning(text.load_text_embeddings(path, key=key or "auto", width=int(width))),)


class TwinFlowUMT5TextEncode:
    """Encode a prompt with a local umT5 encoder (transformers format), padded as Wan2.1/ComfyUI do."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (umt5_folders(), {"tooltip": "A folder under models/text_encoders with config.json, the "
                                                        "weights (model.safetensors) and spiece.model, e.g. the "
                                                        "encoder of google/umt5-xxl. Never downloaded."}),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "default",
                                                "tooltip": "Encoder weight dtype ('default' = fp32). Wan ran umT5 in "
                                                           "bf16; fp16 may overflow in T5 attention."}),
                "max_length": ("INT", {"default": 512, "min": 1, "max": 4096, "step": 1,
                                       "tooltip": "Prompts are truncated to this many tokens (</s> included); Wan2.1 "
                                                  "uses 512."}),
                "pad_to": ("INT", {"default": 512, "min": 0, "max": 4096, "step": 1,
                                   "tooltip": "Pad the output with zeros to this many tokens (Wan2.1/ComfyUI: 512); "
                                              "0 keeps only the real tokens."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with umT5 through transformers (optional extra: pip install transformers "
                   "sentencepiece), local files only. Real tokens are kept, everything beyond is zero, as in Wan2.1.")

    def encode(self, encoder, text, dtype="default", max_length=512, pad_to=512):
        from ..models import loading
        from ..models import text as T

        if not isinstance(text, str):
            raise TypeError(f"input 'text' must be a string, got {type(text).__name__}")
        folder = paths.find_model("text_encoders", f"{encoder}/config.json").parent
        enc = T.load_umt5(folder, dtype=loading.parse_dtype(dtype))
        return (T.conditioning(enc.encode([text], max_length=int(max_length), pad_to=int(pad_to))),)


class TwinFlowTinyTextEncode:
    """Deterministic hashed-token embeddings (no model files) for demos and CI."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt."}),
                "width": ("INT", {"default": 4096, "min": 2, "max": 16384, "step": 2,
                                  "tooltip": "Embedding width D: 4096 for Wan2.1 models; match the text width of a "
                                             "tiny random model otherwise."}),
                "pad_to": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 1,
                                   "tooltip": "Pad with zeros to this many tokens (512 as Wan); 0 keeps only the real "
                                              "tokens."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A stand-in text encoder: each word maps to a fixed pseudo-random vector (stable hash), plus a "
                   "position code. Same text -> same tensor on every machine. It carries no meaning; for demos/CI.")

    def encode(self, text, width=4096, pad_to=0):
        from ..models import text as T

        if not isinstance(text, str):
            raise TypeError(f"input 'text' must be a string, got {type(text).__name__}")
        return (T.conditioning(T.tiny_text_encode(text, width=int(width), pad_to=int(pad_to))),)


NODE_CLASS_MAPPINGS: dict = {
    "TwinFlowLoadTextEmbeddings": TwinFlowLoadTextEmbeddings,
    "TwinFlowUMT5TextEncode": TwinFlowUMT5TextEncode,
    "TwinFlowTinyTextEncode": TwinFlowTinyTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "TwinFlowLoadTextEmbeddings": "TwinFlow Load Text Embeddings",
    "TwinFlowUMT5TextEncode": "TwinFlow UMT5 Text Encode",
    "TwinFlowTinyTextEncode": "TwinFlow Tiny Text Encode",
}
