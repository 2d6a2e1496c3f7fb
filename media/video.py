"""Video codecs: IMAGE frames <-> MP4/H.264 (PyAV) and GIF/WebP/MP4/WebM/... readers.

PyAV (`pip install av`) is imported lazily and only needed for MP4/WebM/MKV; GIF and WebP are decoded
with Pillow.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.errors import UnsupportedError
from ..core.log import log_once
from ..core.outputs import OutputTarget, PendingOutput, atomic_numbered
from ..core.progress import Progress, check_interrupt
from .images import to_uint8

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif", ".webp")
PILLOW_VIDEO_EXTENSIONS = (".gif", ".webp")  # decoded with Pillow, no PyAV needed
AV_INSTALL_HINT = "pip install av  (or: pip install 'comfyui-twinflow[video]')"


def import_av(purpose: str):
    try:
        import av
    except ImportError as e:
        raise UnsupportedError(f"{purpose} needs PyAV, which is not installed ({e}). Install it with: "
                               f"{AV_INSTALL_HINT}") from None
    return av


def pad_even(frames: torch.Tensor) -> torch.Tensor:
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


# Reproducible H.264: the same frames give the same bytes on every machine. x264's output depends on its
# thread count (threads=auto follows the CPUs this process may use, so a busy or differently sized machine
# gave another file), so it encodes on one thread; the preset is pinned (not left to the library's default)
# and `bitexact` keeps the muxer from writing its version string. The RGB -> YUV 4:2:0 conversion is ours
# (`rgb_to_yuv420p`, integer arithmetic) and the encoder gets frames whose every byte, row padding included, we
# wrote: with PyAV's own conversion (swscale), a long-lived process now and then produced another MP4 from
# identical frames, which a fresh process never did (issue 15).
H264_OPTIONS = {"preset": "medium", "threads": "1"}
MP4_OPTIONS = {"movflags": "use_metadata_tags", "fflags": "+bitexact"}


def rgb_to_yuv420p(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 RGB [H, W, 3] (even H, W) -> the Y [H, W], U and V [H/2, W/2] planes of limited-range BT.601
    YUV 4:2:0 (the colour space H.264 players assume for untagged video, and the one PyAV decodes back with):
    8-bit fixed-point coefficients, chroma from the mean of each 2x2 block. Pure integer arithmetic, so the
    same frame gives the same planes on every machine and in every process."""
    h, w, _ = rgb.shape
    c = rgb.astype(np.int32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    s = c.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))  # 2x2 sums: 4x the mean, folded into the shift
    sr, sg, sb = s[..., 0], s[..., 1], s[..., 2]
    u = ((-38 * sr - 74 * sg + 112 * sb + 512) >> 10) + 128
    v = ((112 * sr - 94 * sg - 18 * sb + 512) >> 10) + 128
    return y.astype(np.uint8), u.astype(np.uint8), v.astype(np.uint8)


def yuv420p_frame(av, rgb: np.ndarray, pts: int, time_base: Fraction):
    """A PyAV yuv420p frame of `rgb` whose planes are written whole: pixels, then zeros in each row's
    alignment padding (never left as whatever the allocator held)."""
    h, w, _ = rgb.shape
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, values in zip(frame.planes, rgb_to_yuv420p(rgb)):
        rows = np.zeros((plane.height, plane.line_size), dtype=np.uint8)
        rows[:, :plane.width] = values
        plane.update(rows.tobytes())
    frame.pts, frame.time_base = pts, time_base
    return frame


def write_mp4(path, frames: torch.Tensor, fps: float, crf: int, meta: dict, progress: Optional[Progress] = None) -> None:
    """MP4 / H.264 (libx264 through PyAV), yuv420p, constant quality `crf`; `meta` as MP4 metadata tags.
    Byte-identical output for identical frames and settings (see H264_OPTIONS)."""
    av = import_av("Save Video (MP4/H.264)")
    frames = pad_even(frames)
    n, h, w, _ = frames.shape
    rate = Fraction(round(fps * 1000), 1000)  # as ComfyUI: millisecond-exact rational frame rate
    with av.open(str(path), mode="w", format="mp4", options=dict(MP4_OPTIONS)) as container:
        for key, value in meta.items():
            container.metadata[key] = value
        stream = container.add_stream("libx264", rate=rate, options={**H264_OPTIONS, "crf": str(int(crf))})
        stream.codec_context.thread_count = 1
        log_once(logger, "twinflow.io.h264", "Save Video: encoding H.264 with PyAV %s (%s)", av.__version__,
                 stream.codec_context.codec.name)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            rgb = to_uint8(frames[i])
            if rgb.shape[-1] != 3:  # grey or RGBA -> RGB (alpha is dropped: yuv420p has none)
                rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb[..., :3]
            container.mux(stream.encode(yuv420p_frame(av, rgb, pts=i, time_base=1 / rate)))
            if progress is not None:
                progress.update(1)  # also raises Interrupted if the user stopped the run
        container.mux(stream.encode(None))  # flush the encoder's delayed frames



def save_mp4(target: OutputTarget, frames: torch.Tensor, fps: float, crf: int, meta: dict,
             progress: Optional[Progress] = None) -> PendingOutput:
    """One numbered MP4 of `frames` [T,H,W,C]."""
    with atomic_numbered(target, ".mp4") as out:
        write_mp4(out.tmp_path, frames, fps, crf, meta, progress=progress)
    return out


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
        av = import_av(f"Load Video ({path.suffix or 'no extension'})")
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

