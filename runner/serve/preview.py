"""Binary preview frames of ComfyUI's WebSocket protocol, and a rough preview image of a latent.

A frame is ComfyUI's: 4-byte big-endian event type (1 = PREVIEW_IMAGE), 4-byte image type (1 JPEG,
2 PNG), then the encoded image. No aiohttp here: the worker builds frames, the app sends them.
"""
from __future__ import annotations

import struct
from io import BytesIO

PREVIEW_IMAGE = 1  # ComfyUI's protocol.BinaryEventTypes.PREVIEW_IMAGE
PREVIEW_FORMATS = {"JPEG": 1, "PNG": 2}  # the 4-byte image type after the event type


def encode_preview(image, fmt: str = "JPEG") -> bytes:
    """A binary WebSocket preview frame as ComfyUI sends it: event 1, image type (1 JPEG, 2 PNG), image bytes."""
    if fmt not in PREVIEW_FORMATS:
        raise ValueError(f"preview format {fmt!r} must be one of {sorted(PREVIEW_FORMATS)}")
    buf = BytesIO()
    image.save(buf, format=fmt, quality=95, compress_level=1)
    return struct.pack(">I", PREVIEW_IMAGE) + struct.pack(">I", PREVIEW_FORMATS[fmt]) + buf.getvalue()


def latent_preview(latent, scale: int = 8):
    """A rough RGB view of a latent (B, C, [T,] H, W): batch 0, first frame, channels 0-2 each stretched to
    0..255, upscaled `scale` times (nearest). Not a learned latent-to-RGB projection: it shows layout and
    progress, not colours."""
    import torch
    from PIL import Image

    x = latent.detach()[0].float().cpu()
    if x.dim() == 4:  # (C, T, H, W)
        x = x[:, 0]
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255.0).round().to(torch.uint8)
    img = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def preview_frame(latent):
    """The JPEG preview frame of a latent, or None (logged once) when it cannot be made: a preview must never
    fail the prompt."""
    import logging

    from ...core.log import log_once

    try:
        return encode_preview(latent_preview(latent), "JPEG")
    except Exception as e:
        log_once(logging.getLogger(__name__), ("twinflow.serve.preview", type(e).__name__), "preview not sent: %s",
                 e, level=logging.WARNING)
        return None
