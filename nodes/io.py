"""TwinFlow nodes: io — save/load images, animated WebP, MP4 video, latents; the empty video latent.

Savers write under `core.paths.output_dir()` through `core.outputs` (confined prefix, ComfyUI counters,
atomic never-overwrite files) and return ComfyUI's `{"ui": {...}, "result": ()}`. Loaders read from
`core.paths.input_dir()` (a name ending in ` [output]` reads from the output folder, as in ComfyUI).
Pillow and PyAV are imported lazily; PyAV (`pip install av`) is only needed for MP4/WebM video.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core import paths
from ..core.errors import CheckpointError, UnsupportedError
from ..core.log import log_once
from ..core.outputs import atomic_numbered, resolve_prefix, ui_entry
from ..core.progress import Progress, check_interrupt

logger = logging.getLogger(__name__)

CATEGORY = "TwinFlow/io"
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif", ".webp")
LATENT_EXTENSIONS = (".latent", ".safetensors")
PILLOW_VIDEO_EXTENSIONS = (".gif", ".webp")  # decoded with Pillow, no PyAV needed
AV_INSTALL_HINT = "pip install av  (or: pip install 'comfyui-twinflow[video]')"
# ComfyUI's legacy latents (saved before `latent_format_version_0`) were stored scaled by SD1's 0.18215.
LEGACY_LATENT_SCALE = 0.18215

_PREFIX_TOOLTIP = ("File name prefix, relative to the output folder; may contain sub-folders ('video/run1/clip') "
                   "and %width%, %height%, %year%..%second%. Absolute paths and '..' are refused.")
_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


# --- helpers: tensors -> pixels ----------------------------------------------------------------

def _check_images(images, name: str = "images") -> torch.Tensor:
    """IMAGE input -> CPU float32 [N,H,W,C] (C in 1/3/4); clear TypeError/ValueError otherwise."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"input '{name}' must be an IMAGE tensor [N,H,W,3], got {type(images).__name__}")
    if images.ndim == 3:  # a single frame [H,W,C]
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] < 1 or 0 in images.shape:
        raise ValueError(f"input '{name}' must be an IMAGE tensor [N,H,W,3] (float 0..1) with N>=1, "
                         f"got shape {tuple(images.shape)}")
    return images.detach().to("cpu", torch.float32)


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """[H,W,C] float 0..1 -> uint8; rounds to nearest (ComfyUI truncates) so load->save is lossless."""
    x = torch.nan_to_num(frame, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).numpy()


def _pil(arr: np.ndarray):
    from PIL import Image

    if arr.shape[-1] == 1:
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr, mode="RGBA" if arr.shape[-1] == 4 else "RGB")


def _metadata(prompt, extra_pnginfo) -> dict:
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


def _saved(kind: str, target, files: list[str], **extra) -> dict:
    return {"ui": {kind: [ui_entry(target, f) for f in files], **extra}, "result": ()}


# --- encoders (write one file at `path`; the caller handles naming and atomicity) ---------------

def write_png(path, frame_u8: np.ndarray, text: dict, compress_level: int = 4) -> None:
    """One PNG with `text` as tEXt/iTXt chunks (ComfyUI stores `prompt` and `workflow` this way)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    _pil(frame_u8).save(path, format="PNG", pnginfo=info, compress_level=compress_level)


WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}


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


def _import_av(purpose: str):
    try:
        import av
    except ImportError as e:
        raise UnsupportedError(f"{purpose} needs PyAV, which is not installed ({e}). Install it with: "
                               f"{AV_INSTALL_HINT}") from None
    return av


def _pad_even(frames: torch.Tensor) -> torch.Tensor:
    """yuv420p stores chroma at half resolution, so H.264 needs even sizes: replicate the last row/column."""
    n, h, w, c = frames.shape
    ph, pw = h % 2, w % 2
    if not (ph or pw):
        return frames
    log_once(logger, ("twinflow.io.pad_even", h, w),
             "Save Video: %dx%d is odd; padded to %dx%d by repeating the last row/column (yuv420p needs even sizes)",
             w, h, w + pw, h + ph, level=logging.WARNING)
    x = frames.permute(0, 3, 1, 2)  # (N, C, H, W) for pad
    x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    return x.permute(0, 2, 3, 1)


def write_mp4(path, frames: torch.Tensor, fps: float, crf: int, meta: dict, progress: Optional[Progress] = None) -> None:
    """MP4 / H.264 (libx264 through PyAV), yuv420p, constant quality `crf`; `meta` as MP4 metadata tags."""
    av = _import_av("Save Video (MP4/H.264)")
    frames = _pad_even(frames)
    n, h, w, _ = frames.shape
    rate = Fraction(round(fps * 1000), 1000)  # as ComfyUI: millisecond-exact rational frame rate
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as container:
        for key, value in meta.items():
            container.metadata[key] = value
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(int(crf))})
        log_once(logger, "twinflow.io.h264", "Save Video: encoding H.264 with PyAV %s (%s)", av.__version__,
                 stream.codec_context.codec.name)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            rgb = _to_uint8(frames[i])
            if rgb.shape[-1] != 3:  # grey or RGBA -> RGB (alpha is dropped: yuv420p has none)
                rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb[..., :3]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            container.mux(stream.encode(frame))
            if progress is not None:
                progress.update(1)  # also raises Interrupted if the user stopped the run
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def write_latent(path, samples: torch.Tensor, meta: dict) -> None:
    """ComfyUI's `.latent` layout: safetensors with `latent_tensor` and an empty `latent_format_version_0`."""
    from safetensors.torch import save_file

    tensors = {"latent_tensor": samples.detach().to("cpu").contiguous(),
               "latent_format_version_0": torch.tensor([])}
    save_file(tensors, str(path), metadata={"prompt": meta.get("prompt", ""), **meta})


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


def _select(index: int, skip_first: int, every_nth: int) -> bool:
    return index >= skip_first and (index - skip_first) % every_nth == 0


def read_video_file(path, frame_load_cap: int = 0, skip_first_frames: int = 0,
                    select_every_nth: int = 1) -> tuple[torch.Tensor, float]:
    """A video -> (IMAGE [T,H,W,3] float 0..1, fps of the returned frames = source fps / select_every_nth)."""
    path = Path(path)
    if skip_first_frames < 0 or select_every_nth < 1 or frame_load_cap < 0:
        raise ValueError("frame_load_cap >= 0, skip_first_frames >= 0 and select_every_nth >= 1 are required")
    frames: list[torch.Tensor] = []

    def wanted(i: int) -> bool:
        return _select(i, skip_first_frames, select_every_nth)

    def full() -> bool:
        return bool(frame_load_cap) and len(frames) >= frame_load_cap

    if path.suffix.lower() in PILLOW_VIDEO_EXTENSIONS:
        from PIL import Image, ImageSequence

        with Image.open(path) as img:
            durations = []
            for i, frame in enumerate(ImageSequence.Iterator(img)):
                check_interrupt()
                frame.load()  # WebP sets info["duration"] only once the frame is decoded
                durations.append(frame.info.get("duration", 0) or 0)
                if full():
                    break
                if wanted(i):
                    frames.append(torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0))
        mean_ms = sum(durations) / len(durations) if durations else 0
        fps = 1000.0 / mean_ms if mean_ms > 0 else 0.0
    else:
        av = _import_av(f"Load Video ({path.suffix or 'no extension'})")
        try:
            container = av.open(str(path))
        except av.FFmpegError as e:
            raise ValueError(f"{path}: not a readable video ({e})") from None
        with container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            for i, frame in enumerate(container.decode(stream)):
                check_interrupt()
                if full():
                    break
                if wanted(i):
                    frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24").astype(np.float32) / 255.0))
    if not frames:
        raise ValueError(f"{path}: no frames selected (skip_first_frames={skip_first_frames}, "
                         f"select_every_nth={select_every_nth}); the video may be shorter than that")
    return torch.stack(frames), fps / select_every_nth


def read_latent_file(path) -> dict:
    """A `.latent` (ComfyUI's or ours) -> LATENT; legacy files without `latent_format_version_0` are unscaled."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if "latent_tensor" not in keys:
                raise CheckpointError(f"{path}: no 'latent_tensor' in this file (keys: {sorted(keys)[:10]}); "
                                      f"it is not a latent saved by Save Latent")
            samples = f.get_tensor("latent_tensor").float()
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{path}: not a readable latent file ({type(e).__name__}: {e})") from None
    if "latent_format_version_0" not in keys:
        log_once(logger, ("twinflow.io.legacy_latent", str(path)),
                 "Load Latent: %s is a legacy latent (no latent_format_version_0); scaled by 1/%s as ComfyUI does",
                 path, LEGACY_LATENT_SCALE)
        samples = samples * (1.0 / LEGACY_LATENT_SCALE)
    return {"samples": samples}


# --- input files -------------------------------------------------------------------------------

def _split_annotation(name: str) -> tuple[str, Path, str]:
    """ComfyUI's annotated names: `x.png [output]` reads the output folder, `x.png [input]` / `x.png` the input."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name must be a non-empty string, got {name!r}")
    for tag, folder, label in ((" [output]", paths.output_dir, "output"), (" [input]", paths.input_dir, "input")):
        if name.endswith(tag):
            return name[: -len(tag)], folder(), label
    return name, paths.input_dir(), "input"


def list_input_files(extensions) -> list[str]:
    """Files under the input folder with one of `extensions` (relative, `/`-separated, sorted)."""
    root = paths.input_dir()
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.lower().endswith(extensions) and not f.startswith("."):
                found.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(found)


def resolve_input(name: str, extensions, what: str) -> Path:
    """Resolve a loader's file name inside its folder; a clear error listing the folder's files otherwise."""
    rel, folder, label = _split_annotation(name)
    rel_parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or (len(rel) >= 2 and rel[1] == ":") or ".." in rel_parts:
        raise ValueError(f"{what} {name!r} must be a name inside the {label} folder ({folder}), "
                         f"not an absolute path or one with '..'")
    root = folder.resolve()
    path = (root / rel).resolve()
    try:
        path.relative_to(root)
    except ValueError:
        raise ValueError(f"{what} {name!r} resolves to {path}, outside the {label} folder {root}") from None
    if not path.is_file():
        if label == "input":
            available = list_input_files(extensions)
        else:
            available = sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
        shown = ", ".join(available[:30]) + (" ..." if len(available) > 30 else "")
        hint = f"files there: {shown}" if available else f"the {label} folder has no {what} files"
        raise FileNotFoundError(f"{what} {name!r} not found in the {label} folder {root}; {hint}. "
                                f"Put the file there (or set --input-dir / TWINFLOW_INPUT_DIR).")
    return path


def file_fingerprint(path: Path) -> str:
    """IS_CHANGED value: sha256 of the content (size + mtime for files over 256 MiB, to stay quick)."""
    st = path.stat()
    if st.st_size > (256 << 20):
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _FileLoader:
    """IS_CHANGED / VALIDATE_INPUTS shared by the loaders (input name in `_INPUT`)."""

    _INPUT = "file"
    _EXTENSIONS: tuple = ()
    _WHAT = "file"

    @classmethod
    def _path(cls, name):
        return resolve_input(name, cls._EXTENSIONS, cls._WHAT)

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        try:
            return file_fingerprint(cls._path(kwargs.get(cls._INPUT)))
        except (OSError, ValueError) as e:
            return f"unavailable: {e}"  # validation reports the problem; never crash the cache check


# --- savers ------------------------------------------------------------------------------------

class TwinFlowSaveImage:
    DESCRIPTION = "Saves each frame as a PNG in the output folder, with the workflow embedded (as ComfyUI)."
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Frames [N,H,W,3] in 0..1; one PNG per frame."}),
            "filename_prefix": ("STRING", {"default": "TwinFlow", "tooltip": _PREFIX_TOOLTIP + " %batch_num% = frame index."}),
        }, "hidden": dict(_HIDDEN)}

    def save(self, images, filename_prefix="TwinFlow", prompt=None, extra_pnginfo=None):
        images = _check_images(images)
        meta = _metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir(), images.shape[2], images.shape[1])
        files = []
        with Progress(images.shape[0], desc="save images") as bar:
            for i in range(images.shape[0]):
                with atomic_numbered(target, ".png", batch_num=i) as out:
                    write_png(out.tmp_path, _to_uint8(images[i]), meta)
                files.append(out.filename)
                bar.update(1)
        return _saved("images", target, files)


class TwinFlowSaveAnimatedWEBP:
    DESCRIPTION = "Saves the frames as one animated WebP (options as ComfyUI's Save Animated WEBP)."
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Frames [N,H,W,3] in 0..1."}),
            "filename_prefix": ("STRING", {"default": "TwinFlow", "tooltip": _PREFIX_TOOLTIP}),
            "fps": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1000.0, "step": 0.01, "tooltip": "Frames per second."}),
            "lossless": ("BOOLEAN", {"default": True, "tooltip": "Lossless WebP (exact pixels, larger files)."}),
            "quality": ("INT", {"default": 80, "min": 0, "max": 100, "step": 1,
                                "tooltip": "Lossy: image quality; lossless: compression effort."}),
            "method": (list(WEBP_METHODS), {"default": "default", "tooltip": "Encoder speed/size trade-off."}),
        }, "hidden": dict(_HIDDEN)}

    def save(self, images, filename_prefix="TwinFlow", fps=16.0, lossless=True, quality=80, method="default",
             prompt=None, extra_pnginfo=None):
        images = _check_images(images)
        if not (fps > 0):
            raise ValueError(f"fps must be > 0, got {fps}")
        meta = _metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir(), images.shape[2], images.shape[1])
        frames = []
        with Progress(images.shape[0], desc="save webp") as bar:
            for i in range(images.shape[0]):
                frames.append(_to_uint8(images[i]))
                bar.update(1)
        with atomic_numbered(target, ".webp") as out:
            write_webp(out.tmp_path, frames, fps, lossless, quality, method, meta)
        return _saved("images", target, [out.filename], animated=(images.shape[0] > 1,))


class TwinFlowSaveVideo:
    DESCRIPTION = "Saves the frames as an MP4 (H.264, yuv420p) with PyAV; odd sizes are padded to even."
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Frames [T,H,W,3] in 0..1."}),
            "filename_prefix": ("STRING", {"default": "video/TwinFlow", "tooltip": _PREFIX_TOOLTIP}),
            "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 240.0, "step": 0.01,
                              "tooltip": "Frames per second (Wan2.1 generates 16)."}),
            "crf": ("INT", {"default": 19, "min": 0, "max": 51, "step": 1,
                            "tooltip": "H.264 constant quality: 0 = best/largest, 51 = worst; 17-23 is typical."}),
        }, "hidden": dict(_HIDDEN)}

    def save(self, images, filename_prefix="video/TwinFlow", fps=16.0, crf=19, prompt=None, extra_pnginfo=None):
        images = _check_images(images)
        if not (0 < fps <= 1000):
            raise ValueError(f"fps must be in (0, 1000], got {fps}")
        if not (0 <= int(crf) <= 51):
            raise ValueError(f"crf must be in 0..51, got {crf}")
        _import_av("Save Video (MP4/H.264)")  # fail before creating folders when PyAV is missing
        meta = _metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir(), images.shape[2], images.shape[1])
        with Progress(images.shape[0], desc="save video") as bar:
            with atomic_numbered(target, ".mp4") as out:
                write_mp4(out.tmp_path, images, fps, crf, meta, progress=bar)
        return _saved("videos", target, [out.filename], animated=(True,))


class TwinFlowSaveLatent:
    DESCRIPTION = "Saves a LATENT as a .latent (safetensors) file that ComfyUI's Load Latent can read."
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to save."}),
            "filename_prefix": ("STRING", {"default": "latents/TwinFlow", "tooltip": _PREFIX_TOOLTIP}),
        }, "hidden": dict(_HIDDEN)}

    def save(self, samples, filename_prefix="latents/TwinFlow", prompt=None, extra_pnginfo=None):
        if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
            raise TypeError("input 'samples' must be a LATENT: a dict with a 'samples' tensor")
        meta = _metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir())
        with atomic_numbered(target, ".latent") as out:
            write_latent(out.tmp_path, samples["samples"], meta)
        return _saved("latents", target, [out.filename])


# --- loaders -----------------------------------------------------------------------------------

class TwinFlowLoadLatent(_FileLoader):
    DESCRIPTION = "Loads a .latent file saved by Save Latent (TwinFlow's or ComfyUI's) from the input folder."
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    _INPUT, _EXTENSIONS, _WHAT = "latent", LATENT_EXTENSIONS, "latent"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": (list_input_files(LATENT_EXTENSIONS), {
            "tooltip": "A .latent file in the input folder ('name [output]' reads the output folder)."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, latent):
        try:
            cls._path(latent)
        except (OSError, ValueError) as e:
            return str(e)
        return True

    def load(self, latent):
        return (read_latent_file(self._path(latent)),)


class TwinFlowLoadImage(_FileLoader):
    DESCRIPTION = "Loads an image from the input folder as IMAGE [N,H,W,3] (every frame of a GIF/WebP) and MASK = 1 - alpha."
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    _INPUT, _EXTENSIONS, _WHAT = "image", IMAGE_EXTENSIONS, "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (list_input_files(IMAGE_EXTENSIONS), {
            "image_upload": True, "tooltip": "An image in the input folder ('name [output]' reads the output folder)."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        try:
            cls._path(image)
        except (OSError, ValueError) as e:
            return str(e)
        return True

    def load(self, image):
        return read_image_file(self._path(image))


class TwinFlowLoadVideo(_FileLoader):
    DESCRIPTION = ("Loads a video (MP4/WebM/MKV/MOV via PyAV; GIF/WebP via Pillow) from the input folder as "
                   "IMAGE [T,H,W,3], with the frame count and fps of the returned frames.")
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT")
    RETURN_NAMES = ("images", "frame_count", "fps")
    OUTPUT_TOOLTIPS = ("Frames [T,H,W,3] in 0..1.", "Number of frames returned.",
                       "Frame rate of the returned frames: source fps / select_every_nth.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    _INPUT, _EXTENSIONS, _WHAT = "video", VIDEO_EXTENSIONS, "video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": (list_input_files(VIDEO_EXTENSIONS), {
                "video_upload": True, "tooltip": "A video in the input folder ('name [output]' reads the output folder)."}),
            "frame_load_cap": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1,
                                       "tooltip": "Return at most this many frames (0 = all)."}),
            "skip_first_frames": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1,
                                          "tooltip": "Skip this many frames at the start."}),
            "select_every_nth": ("INT", {"default": 1, "min": 1, "max": 1000, "step": 1,
                                         "tooltip": "Keep every n-th frame after the skipped ones (1 = all)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        try:
            cls._path(video)
        except (OSError, ValueError) as e:
            return str(e)
        return True

    def load(self, video, frame_load_cap=0, skip_first_frames=0, select_every_nth=1):
        frames, fps = read_video_file(self._path(video), int(frame_load_cap), int(skip_first_frames),
                                      int(select_every_nth))
        return (frames, int(frames.shape[0]), float(fps))


# --- latents -----------------------------------------------------------------------------------

class TwinFlowEmptyLatentVideo:
    DESCRIPTION = "An all-zero Wan2.1 video latent [B,16,1+(length-1)//4,H/8,W/8] (as ComfyUI's EmptyHunyuanLatentVideo)."
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 832, "min": 16, "max": MAX_RESOLUTION, "step": 16, "tooltip": "Video width in pixels."}),
            "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16, "tooltip": "Video height in pixels."}),
            "length": ("INT", {"default": 33, "min": 1, "max": MAX_RESOLUTION, "step": 4,
                               "tooltip": "Frames; the Wan VAE maps 1+4k frames to 1+k latent frames."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "step": 1, "tooltip": "Videos per batch."}),
        }}

    def generate(self, width, height, length, batch_size=1):
        for name, value, lo in (("width", width, 16), ("height", height, 16), ("length", length, 1), ("batch_size", batch_size, 1)):
            if int(value) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {value}")
        # Wan VAE: 8x spatial and 4x temporal compression with the first frame kept on its own.
        t = (int(length) - 1) // 4 + 1
        samples = torch.zeros([int(batch_size), 16, t, int(height) // 8, int(width) // 8])  # (B, 16, T, H/8, W/8)
        return ({"samples": samples},)


NODE_CLASS_MAPPINGS: dict = {
    "TwinFlowSaveImage": TwinFlowSaveImage,
    "TwinFlowSaveAnimatedWEBP": TwinFlowSaveAnimatedWEBP,
    "TwinFlowSaveVideo": TwinFlowSaveVideo,
    "TwinFlowSaveLatent": TwinFlowSaveLatent,
    "TwinFlowLoadLatent": TwinFlowLoadLatent,
    "TwinFlowLoadImage": TwinFlowLoadImage,
    "TwinFlowLoadVideo": TwinFlowLoadVideo,
    "TwinFlowEmptyLatentVideo": TwinFlowEmptyLatentVideo,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "TwinFlowSaveImage": "TwinFlow Save Image",
    "TwinFlowSaveAnimatedWEBP": "TwinFlow Save Animated WEBP",
    "TwinFlowSaveVideo": "TwinFlow Save Video MP4",
    "TwinFlowSaveLatent": "TwinFlow Save Latent",
    "TwinFlowLoadLatent": "TwinFlow Load Latent",
    "TwinFlowLoadImage": "TwinFlow Load Image",
    "TwinFlowLoadVideo": "TwinFlow Load Video",
    "TwinFlowEmptyLatentVideo": "TwinFlow Empty Latent Video",
}
