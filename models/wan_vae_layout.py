"""Frame layout of the Wan VAE engines: channels-last frames, and nearest x2 upsampling + 3x3 conv in
sub-pixel form. Used by the model (`wan_vae.py`) and the row bands (`wan_vae_bands.py`).

On the CPU the engines run every frame channels-last (NHWC) from the moment it enters: oneDNN convolves
NHWC natively (NCHW frames are reordered to a blocked layout and back around every conv), and the channel
reduction of the RMS norm becomes contiguous. Every later op (conv2d, elementwise, cat over channels)
keeps the layout, so only the entry and the few places that allocate a frame need to know it: they get
it from the stream's state (`CausalState.channels_last`). Elsewhere frames stay NCHW (the CUDA norm
kernel reads NCHW); the same code runs either layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A frame [B, C, H, W] entering an engine (or a channel slice of one), dense in the engine's layout."""
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def empty_frame(x: torch.Tensor, channels_last: bool, rows: Optional[int] = None,
                cols: Optional[int] = None) -> torch.Tensor:
    """An uninitialised frame like x (optionally with other row/column counts) in the engine's layout
    (`empty_like` of a non-dense view, such as a channel slice, would fall back to NCHW)."""
    fmt = torch.channels_last if channels_last and x.ndim == 4 else torch.contiguous_format
    shape = (*x.shape[:2], x.shape[2] if rows is None else rows, x.shape[3] if cols is None else cols)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


# ----------------------------------------------------------------------------------------------------
# Nearest x2 upsampling + 3x3 conv, sub-pixel form
# ----------------------------------------------------------------------------------------------------
def subpixel_kernels(w: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> list:
    """The four (O, C, 2, 2) kernels of `upsample2x_conv3x3` for output phases (a, c) = 00, 01, 10, 11,
    summed in fp32 (or float64) and rounded once to `dtype`; in the frames' layout."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # fp32 sums for fp16/bf16 weights, float64 stays
    rows = (torch.stack((w[:, :, 0], w[:, :, 1] + w[:, :, 2]), 2),  # a=0: rows i-1, i     (O, C, 2, 3)
            torch.stack((w[:, :, 0] + w[:, :, 1], w[:, :, 2]), 2))  # a=1: rows i, i+1
    fmt = memory_format(channels_last)
    return [k.to(dtype).contiguous(memory_format=fmt) for r in rows
            for k in (torch.stack((r[..., 0], r[..., 1] + r[..., 2]), -1),      # c=0: cols j-1, j
                      torch.stack((r[..., 0] + r[..., 1], r[..., 2]), -1))]     # c=1: cols j, j+1


def upsample2x_conv3x3(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                       kernels: Optional[list] = None, channels_last: bool = False) -> torch.Tensor:
    """conv3x3(pad 1)(nearest_upsample_x2(x)) without building the upsampled image (sub-pixel form).

    With integer scale 2, nearest-exact reads source pixel i//2, so output pixel (2i+a, 2j+c) only sees
    low-res rows {i-1, i} (a=0: kernel rows 0 | 1+2) or {i, i+1} (a=1: rows 0+1 | 2), likewise for
    columns: four 2x2 convs on the low-res frame, 16 instead of 36 multiply-adds per low-res pixel and
    no 4x-sized temporary. The summed kernel taps change float rounding slightly (~1e-7 relative in fp32).
    x: (B, C, h, w); w: (O, C, 3, 3) -> (B, O, 2h, 2w)."""
    kernels = kernels or subpixel_kernels(w, x.dtype, channels_last)
    return subpixel_conv(F.pad(x, (1, 1, 1, 1)), b, kernels)  # zero border of the upsampled image = here


def subpixel_conv(xp: torch.Tensor, b: Optional[torch.Tensor], kernels: list) -> torch.Tensor:
    """The four 2x2 phase convs of `upsample2x_conv3x3` on a frame padded by one row/column on every
    side: (B, C, h + 2, w + 2) -> (B, O, 2h, 2w), in xp's layout."""
    bsz, _, h, wd = xp.shape
    h, wd = h - 2, wd - 2
    o = kernels[0].shape[0]
    cl = xp.is_contiguous(memory_format=torch.channels_last) and not xp.is_contiguous()
    if cl:  # keep the frame channels-last: interleave into (B, h, 2, w, 2, O) memory
        out = torch.empty(bsz, h, 2, wd, 2, o, device=xp.device, dtype=xp.dtype)
    else:
        out = torch.empty(bsz, o, h, 2, wd, 2, device=xp.device, dtype=xp.dtype)
    for a in (0, 1):
        for c in (0, 1):
            y = F.conv2d(xp[:, :, a:a + h + 1, c:c + wd + 1], kernels[2 * a + c], b)
            if cl:
                out[:, :, a, :, c] = y.permute(0, 2, 3, 1)
            else:
                out[:, :, :, a, :, c] = y
    if cl:
        return out.view(bsz, 2 * h, 2 * wd, o).permute(0, 3, 1, 2)
    return out.view(bsz, o, 2 * h, 2 * wd)
