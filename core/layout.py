"""ComfyUI's tensor layouts <-> the video models' layouts (shape math only, no model code).

IMAGE: float32 [N, H, W, 3] in 0..1, video frames stacked on N. Video: (B, C, T, H, W) in -1..1.
LATENT: {"samples": [B, C, T, h, w]} (an image latent [B, C, h, w] is one frame).
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def images_to_video(pixels, multiple: int) -> torch.Tensor:
    """IMAGE [N, H, W, >=3] -> video (1, 3, N, H', W') float32 in -1..1, H and W centre-cropped to `multiple`
    (as ComfyUI's VAEEncode crops). Raises ValueError naming input 'pixels' for anything else."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] < 3 or pixels.shape[0] < 1:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"input 'pixels' must be an IMAGE tensor [N, H, W, 3] in 0..1, got {shape}")
    r = int(multiple)
    n, h, w, _ = pixels.shape
    h8, w8 = (h // r) * r, (w // r) * r
    if h8 == 0 or w8 == 0:
        raise ValueError(f"input 'pixels' is {h}x{w}; the Wan VAE needs at least {r}x{r}")
    if (h8, w8) != (h, w):
        y0, x0 = (h % r) // 2, (w % r) // 2
        logger.info("cropping IMAGE %dx%d to %dx%d (multiples of %d)", h, w, h8, w8, r)
        pixels = pixels[:, y0:y0 + h8, x0:x0 + w8]
    video = pixels[..., :3].movedim(-1, 0).unsqueeze(0)  # (1, 3, N, H, W)
    return video.to(torch.float32) * 2.0 - 1.0


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """Video (B, C, T, H, W) in -1..1 -> IMAGE [B*T, H, W, C] float32 in 0..1 (clamped)."""
    b, c, t, h, w = video.shape
    images = ((video.float() + 1.0) * 0.5).clamp_(0.0, 1.0)  # (B, C, T, H, W)
    return images.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).contiguous()


def latent_video(samples, channels: int) -> torch.Tensor:
    """The (B, channels, T, h, w) tensor of a LATENT dict (an image latent becomes one frame); raises
    TypeError / ValueError naming input 'samples'."""
    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise TypeError("input 'samples' must be a LATENT dict with a 'samples' tensor")
    z = samples["samples"]
    if z.ndim == 4:  # an image latent [B, C, H, W]
        z = z.unsqueeze(2)
    if z.ndim != 5 or z.shape[1] != channels:
        raise ValueError(f"input 'samples' must be Wan latents [B, {channels}, T, H, W], "
                         f"got {tuple(samples['samples'].shape)}")
    return z
