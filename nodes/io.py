"""TwinFlow nodes: io — save/load images, animated WebP, MP4 video, latents; the empty video latent.

Wiring only: the codecs live in `media/` (PNG/WebP in `media.images`, MP4 in `media.video`, `.latent` in
`media.latent`), input-file resolution in `core.inputs`, naming and atomic publishing in `core.outputs`.
Savers write under `core.paths.output_dir()` and return ComfyUI's `{"ui": {...}, "result": ()}`. Loaders
read from `core.paths.input_dir()` (a name ending in ` [output]` reads from the output folder, as in ComfyUI).
"""
from __future__ import annotations

import torch

from ..core import paths
from ..core.inputs import file_fingerprint, list_input_files, resolve_input
from ..core.outputs import resolve_prefix, ui_entry
from ..core.progress import Progress
from ..media import images as media_images, latent as media_latent, video as media_video
from ..media.images import IMAGE_EXTENSIONS, WEBP_METHODS, check_images, embedded_metadata, read_image_file
from ..media.latent import LATENT_EXTENSIONS, read_latent_file
from ..media.video import VIDEO_EXTENSIONS, import_av, read_video_file

CATEGORY = "TwinFlow/io"
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION

_PREFIX_TOOLTIP = ("File name prefix, relative to the output folder; may contain sub-folders ('video/run1/clip') "
                   "and %width%, %height%, %year%..%second%. Absolute paths and '..' are refused.")
_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def _saved(kind: str, target, files: list, **extra) -> dict:
    return {"ui": {kind: [ui_entry(target, f) for f in files], **extra}, "result": ()}


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
        images = check_images(images)
        meta = embedded_metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir(), images.shape[2], images.shape[1])
        with Progress(images.shape[0], desc="save images") as bar:
            files = media_images.save_png_frames(target, images, meta, progress=bar)
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
        images = check_images(images)
        if not (fps > 0):
            raise ValueError(f"fps must be > 0, got {fps}")
        meta = embedded_metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir(), images.shape[2], images.shape[1])
        with Progress(images.shape[0], desc="save webp") as bar:
            out = media_images.save_webp(target, images, fps, lossless, quality, method, meta, progress=bar)
        return _saved("images", target, [out], animated=(images.shape[0] > 1,))


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
        images = check_images(images)
        if not (0 < fps <= 1000):
            raise ValueError(f"fps must be in (0, 1000], got {fps}")
        if not (0 <= int(crf) <= 51):
            raise ValueError(f"crf must be in 0..51, got {crf}")
        import_av("Save Video (MP4/H.264)")  # fail before creating folders when PyAV is missing
        meta = embedded_metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir(), images.shape[2], images.shape[1])
        with Progress(images.shape[0], desc="save video") as bar:
            out = media_video.save_mp4(target, images, fps, crf, meta, progress=bar)
        # reported as core SaveVideo reports (comfy_api ui.PreviewVideo): under "images" with animated=(True,);
        # the ComfyUI frontend draws a <video> on the node only from that shape, not from a "videos" key
        return _saved("images", target, [out], animated=(True,))


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
        meta = embedded_metadata(prompt, extra_pnginfo)
        target = resolve_prefix(filename_prefix, paths.output_dir())
        out = media_latent.save_latent(target, samples["samples"], meta)
        return _saved("latents", target, [out])


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
