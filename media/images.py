"""Image codecs: IMAGE tensors <-> PNG / animated WebP files, with ComfyUI's embedded workflow metadata.

Encoders write one file at a given path (naming and atomic publishing are `core.outputs`' job); readers
return ComfyUI's IMAGE/MASK tensors. Pillow is imported lazily.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import numpy as np
import torch

from ..core.log import log_once
from ..core.outputs import OutputTarget, PendingOutput, atomic_numbered, output_batch
from ..core.progress import Progress, check_interrupt

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}


# --- tensors -> pixels -------------------------------------------------------------------------

def check_images(images, name: str = "images") -> torch.Tensor:
    """IMAGE input -> CPU float32 [N,H,W,C] (C in 1/3/4); clear TypeError/ValueError otherwise."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"input '{name}' must be an IMAGE tensor [N,H,W,3], got {type(images).__name__}")
    if images.ndim == 3:  # a single frame [H,W,C]
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] < 1 or 0 in images.shape:
        raise ValueError(f"input '{name}' must be an IMAGE tensor [N,H,W,3] (float 0..1) with N>=1, "
                         f"got shape {tuple(images.shape)}")
    return images.detach().to("cpu", torch.float32)


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """[H,W,C] float 0..1 -> uint8; rounds to nearest (ComfyUI truncates) so load->save is lossless."""
    x = torch.nan_to_num(frame, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).numpy()


def _pil(arr: np.ndarray):
    from PIL import Image

    if arr.shape[-1] == 1:
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr, mode="RGBA" if arr.shape[-1] == 4 else "RGB")


def embedded_metadata(prompt, extra_pnginfo) -> dict:
    """ComfyUI's embedded metadata: `prompt` (API prompt) and each `extra_pnginfo` key (`workflow`), as JSON."""
    meta = {}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    if extra_pnginfo is not None:
        if not isinstance(extra_pnginfo, dict):
            raise TypeError(f"hidden input 'extra_pnginfo' must be a dict such as {{'workflow': {{...}}}}, "
                            f"got {type(extra_pnginfo).__name__}")
        for key, value in extra_pnginfo.items():
            meta[str(key)] = json.dumps(value)
    return meta



# --- encoders ----------------------------------------------------------------------------------

def write_png(path, frame_u8: np.ndarray, text: dict, compress_level: int = 4) -> None:
    """One PNG with `text` as tEXt/iTXt chunks (ComfyUI stores `prompt` and `workflow` this way)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    _pil(frame_u8).save(path, format="PNG", pnginfo=info, compress_level=compress_level)



def _webp_exif(first, meta: dict):
    # ComfyUI's layout: prompt in ImageDescription (0x0110) as "prompt:<json>", the extra_pnginfo keys
    # counting down from Make (0x010f) as "<key>:<json>".
    exif = first.getexif()
    if "prompt" in meta:
        exif[0x0110] = "prompt:" + meta["prompt"]
    tag = 0x010F
    for key, value in meta.items():
        if key == "prompt":
            continue
        exif[tag] = f"{key}:{value}"
        tag -= 1
    return exif


def write_webp(path, frames_u8: list, fps: float, lossless: bool, quality: int, method: str, meta: dict) -> None:
    """An animated WebP (one frame -> a still WebP), options as ComfyUI's SaveAnimatedWEBP."""
    if method not in WEBP_METHODS:
        raise ValueError(f"method {method!r} is not one of {sorted(WEBP_METHODS)}")
    images = [_pil(f) for f in frames_u8]
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000.0 / fps),
                   loop=0, exif=_webp_exif(images[0], meta), lossless=bool(lossless), quality=int(quality),
                   method=WEBP_METHODS[method])



def save_png_frames(target: OutputTarget, images: torch.Tensor, meta: dict,
                    progress: Optional[Progress] = None) -> list[PendingOutput]:
    """One numbered PNG per frame of `images` [N,H,W,C], published all together or not at all."""
    files = []
    with output_batch():
        for i in range(images.shape[0]):
            with atomic_numbered(target, ".png", batch_num=i) as out:
                write_png(out.tmp_path, to_uint8(images[i]), meta)
            files.append(out)
            if progress is not None:
                progress.update(1)  # also raises Interrupted if the user stopped the run
    return files


def save_webp(target: OutputTarget, images: torch.Tensor, fps: float, lossless: bool, quality: int, method: str,
              meta: dict, progress: Optional[Progress] = None) -> PendingOutput:
    """One numbered (animated) WebP of `images` [N,H,W,C]."""
    frames = []
    for i in range(images.shape[0]):
        frames.append(to_uint8(images[i]))
        if progress is not None:
            progress.update(1)
    with atomic_numbered(target, ".webp") as out:
        write_webp(out.tmp_path, frames, fps, lossless, quality, method, meta)
    return out


# --- decoders ----------------------------------------------------------------------------------

def _pil_frame_to_tensors(img):
    """One Pillow frame -> (RGB float [H,W,3], mask [H,W] = 1 - alpha, or None when there is no alpha)."""
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: scale the full 0..65535 range (ComfyUI's `/255` clips these to white).
        grey = np.asarray(img, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.repeat(grey[..., None], 3, axis=-1)), None
    if img.mode == "I":
        img = img.point(lambda v: v * (1 / 255))  # as ComfyUI: 32-bit int images hold 0..255*255
    rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
    mask = None
    if "A" in img.getbands():
        mask = 1.0 - torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)
    elif img.mode == "P" and "transparency" in img.info:
        mask = 1.0 - torch.from_numpy(np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0)
    return rgb, mask


def read_image_file(path) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file -> (IMAGE [N,H,W,3], MASK [N,H,W]); every frame of a multi-frame file, as ComfyUI."""
    from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); use PNG, JPEG, WebP, GIF, BMP or TIFF") from None
    with img:
        images, masks = [], []
        size = None
        frames = [img] if img.format == "MPO" else ImageSequence.Iterator(img)  # MPO: stereo pair, keep the first
        for frame in frames:
            check_interrupt()
            frame = ImageOps.exif_transpose(frame)
            rgb, mask = _pil_frame_to_tensors(frame)
            if size is None:
                size = rgb.shape[:2]
            elif rgb.shape[:2] != size:
                log_once(logger, ("twinflow.io.frame_size", str(path)),
                         "Load Image: %s has frames of different sizes; kept only the %dx%d ones",
                         path, size[1], size[0], level=logging.WARNING)
                continue
            images.append(rgb)
            # No alpha: an all-zero mask of the image's size (ComfyUI returns a 64x64 one).
            masks.append(mask if mask is not None else torch.zeros(size, dtype=torch.float32))
    return torch.stack(images), torch.stack(masks)

