"""Wan2.1 causal 3D video VAE: official checkpoint layout, frame-streaming encode/decode, tiled decode.

Reads top to bottom: config + presets, the per-frame causal conv engine, blocks (residual, attention,
resample) with the official parameter names, encoder/decoder, `WanVAE` (encode / decode / streaming /
tiled decode / memory estimate), latent normalisation, loading and random init.

How it matches the official chunked algorithm (`wan/modules/vae.py`, mirrored by diffusers):
the official code runs the encoder on frame 0 then on chunks of 4 frames, and the decoder on one
latent frame at a time, keeping for every causal 3-tap conv the last 2 input frames (the "feature
cache"; front padding is zeros). A causal conv with such a cache is exactly a 1-D causal filter over
time, so it can equally be run **one frame at a time** with the same 2-frame state. We do that, depth
first through the whole network, which gives the same numbers (up to float summation order) with:
  * no `cat(cache, chunk)` + `F.pad` copies: the three time taps are three 2-D convs summed, and the
    state holds references to the previous inputs (no clones);
  * a zero state is skipped instead of multiplied (the first frame costs 1/3 of a full frame);
  * a working set of one frame per layer instead of a whole chunk, and frames written straight into a
    preallocated output (or handed to a callback) instead of a growing `torch.cat`.
The two temporal resamplers keep their official chunk semantics in per-frame form (see `Resample`).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import CheckpointError
from ..core.log import log_once
from ..core.progress import Progress
from ..fused.ops import rms_norm_cf
from ..fused.vae_norm import rms_norm_cf_ref
from .loading import build_and_load, convert_dtype, load_file, strip_prefix

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WanVAEConfig:
    """Structure of the Wan2.1 VAE (names follow the official `WanVAE_`)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple = (False, True, True)  # encoder; the decoder uses the reverse
    in_channels: int = 3

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),
    # 16 latent channels like the real model so LATENTs interoperate with the Wan tiny DiT and the
    # Wan21 latent normalisation; dim 8 keeps it at ~0.2 M parameters.
    "tiny": WanVAEConfig(dim=8, z_dim=16),
}

# Anchors used to recognise files (ComfyUI detects the Wan2.1 VAE by the first one).
ANCHOR = "decoder.middle.0.residual.0.gamma"
WAN22_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
DIT_HINT_KEYS = ("head.modulation", "blocks.0.self_attn.q.weight", "patch_embedding.weight")


# ----------------------------------------------------------------------------------------------------
# The per-frame causal conv engine
# ----------------------------------------------------------------------------------------------------
class _State:
    """Streaming state of one decode/encode (one per spatial tile or row band): per-layer caches keyed
    by module."""

    def __init__(self):
        self.slots: dict[int, list] = {}

    def slot(self, module: nn.Module) -> list:
        return self.slots.setdefault(id(module), [None, None])


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time (zeros in front), run one frame at a time with a 2-frame state."""

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        self.pad_s = (padding if isinstance(padding, int) else padding[1])  # spatial zero padding

    def tap_major_(self) -> None:
        """Re-lay the weight in memory as (kt, O, I, kh, kw) while keeping the official (O, I, kt, kh, kw)
        shape and values, so each time tap `weight[:, :, k]` is contiguous and conv2d never copies it."""
        w = self.weight
        if w.is_meta:
            return
        if w.device.type == "cpu" and w.shape[3:] != (1, 1):
            # CPU frames are channels-last, so each tap is laid out channels-last too: (kt, O, kh, kw, I).
            # A contiguous tap weight would be converted by conv2d on every call.
            if not w[:, :, 0].is_contiguous(memory_format=torch.channels_last) or w[:, :, 0].is_contiguous():
                tm = w.detach().permute(2, 0, 3, 4, 1).contiguous()  # (kt, O, kh, kw, I)
                self.weight = nn.Parameter(tm.permute(1, 4, 0, 2, 3), requires_grad=w.requires_grad)
        elif w.shape[2] > 1 and not w[:, :, 0].is_contiguous():
            tm = w.detach().permute(2, 0, 1, 3, 4).contiguous()  # (kt, O, I, kh, kw)
            self.weight = nn.Parameter(tm.permute(1, 2, 0, 3, 4), requires_grad=w.requires_grad)

    def pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """A kernel-1 conv on one frame x [B, C, H, W] (shortcuts, quant convs)."""
        return F.conv2d(x, self.weight[:, :, 0], self.bias)

    def taps(self, frames: list, bias: bool = True, padding=None) -> torch.Tensor:
        """sum_k W[:, :, k] * frames[k] (+ bias); None frames are zero and skipped. frames: 3 x [B,C,H,W].
        `padding`: spatial zero padding (default: the layer's own on both axes)."""
        w, p = self.weight, (self.pad_s if padding is None else padding)
        cur = frames[-1]
        if cur.dtype != torch.float32 and sum(f is not None for f in frames) > 1:
            # Low precision: one conv over the channel-stacked taps keeps the sum inside the conv's
            # fp32 accumulator instead of rounding each partial sum to bf16/fp16.
            ks = [k for k, f in enumerate(frames) if f is not None]
            wk = torch.cat([w[:, :, k] for k in ks], dim=1)
            return F.conv2d(torch.cat([frames[k] for k in ks], dim=1), wk, self.bias if bias else None, padding=p)
        out = F.conv2d(cur, w[:, :, 2], self.bias if bias else None, padding=p)  # (B, O, H, W)
        for k in (1, 0):
            if frames[k] is not None:
                out += F.conv2d(frames[k], w[:, :, k], None, padding=p)
        return out

    def step(self, x: torch.Tensor, st: _State, keep: bool = True) -> torch.Tensor:
        """One frame through the causal conv; the state keeps the last two inputs (by reference).

        `keep=False` on a layer's final frame releases its cache at once."""
        s = st.slot(self)
        if self.out_channels < self.in_channels:
            return self._step_partial(x, s, keep)
        out = self.taps([s[0], s[1], x])
        if keep:
            s[0], s[1] = s[1], x
        else:
            s[0] = s[1] = None
        return out

    def step_rows(self, pieces: list, pad: tuple[int, int], st: _State, keep: bool, norm: "RMSNorm") -> torch.Tensor:
        """`step` for one band of a frame (see `WanVAE._decode_banded`), input given before its norm + SiLU.

        pieces: row slices [B, C, h_i, W] that follow each other (rows carried over from the previous band,
        then the band's own); pad = (top, bottom) zero rows where the band touches the image edge. They are
        normalised one after another into one frame that holds the explicit zero rows, and the conv runs
        without row padding, so it computes exactly the valid output rows: sum(h_i) + sum(pad) - 2.
        The frames are recycled: the oldest tap is convolved first, and in fp32 the new frame is then
        normalised straight into its buffer (no temporary, no copy); the long-lived caches then stay put
        in the heap while per-frame temporaries churn around them, which keeps glibc's heap from
        fragmenting."""
        s = st.slot(self)
        padding = (0, self.pad_s)
        if self.out_channels < self.in_channels:  # the head: partial sums, no input frames kept
            return self._step_partial(_norm_rows(norm, pieces, pad), s, keep, padding)
        w = self.weight
        if pieces[0].dtype == torch.float32:
            out = F.conv2d(s[0], w[:, :, 0], None, padding=padding) if s[0] is not None else None
            x = _norm_rows(norm, pieces, pad, out=s[0])
            y = F.conv2d(x, w[:, :, 2], self.bias, padding=padding)
            out = y if out is None else out.add_(y)
            if s[1] is not None:
                out += F.conv2d(s[1], w[:, :, 1], None, padding=padding)
        else:  # low precision: the taps are stacked into one conv (see `taps`); the frame is then copied
            x = _norm_rows(norm, pieces, pad)  # into the oldest buffer, or a new one of the conv's own
            out = self.taps([s[0], s[1], x], padding=padding)
            x = (s[0] if s[0] is not None else _empty_frame(x)).copy_(x)
        if keep:
            s[0], s[1] = s[1], x
        else:
            s[0] = s[1] = None
        return out

    def _step_partial(self, x: torch.Tensor, s: list, keep: bool, padding=None) -> torch.Tensor:
        """Narrowing convs (the decoder head, 96 -> 3) keep partial output sums instead of inputs:
        s = [W1 x[t-1] + W0 x[t-2], W0 x[t-1]] in fp32, i.e. 2 x 3 channels instead of 2 x 96 per pixel."""
        w, p = self.weight, (self.pad_s if padding is None else padding)
        out = F.conv2d(x, w[:, :, 2], self.bias, padding=p)
        if s[0] is not None:
            out = (out.float() + s[0]).to(x.dtype)
        if keep:
            nxt = F.conv2d(x, w[:, :, 1], None, padding=p).float()
            if s[1] is not None:
                nxt += s[1]
            s[0], s[1] = nxt, F.conv2d(x, w[:, :, 0], None, padding=p).float()
        else:
            s[0] = s[1] = None
        return out


def _row_slice(pieces: list, lo: int, hi: int) -> list:
    """Rows [lo, hi) of consecutive (first row, frame rows) pieces, as such pieces (views; a row slice of
    an NHWC CPU frame is still dense)."""
    out = []
    for r0, x in pieces:
        a, b = max(lo, r0), min(hi, r0 + x.shape[2])
        if a < b:
            out.append((a, x[:, :, a - r0:b - r0]))
    return out


class _Band:
    """Row bookkeeping of one band of a banded decode or encode (`WanVAE._decode_banded`,
    `WanVAE._encode_banded`), per layer `key`.

    From the band before it (`carry`, None for the first band): where that band stopped at each layer
    (`carry["end"][key]`), and its last input rows of each layer and frame (`carry[key][n]` = (first
    row, rows)). It records the same for the next band in `stored` (None for the last band)."""

    def __init__(self, c1: int, split_rows: int, frames: int, last: bool, carry: Optional[dict]):
        self.c1, self.split_rows, self.frames, self.last, self.carry = c1, split_rows, frames, last, carry
        self.stored = None if last else {"end": {}}

    def out_rows(self, key, rows: int, need: int, even: bool = False) -> tuple[int, int]:
        """Output rows [lo, hi) this band computes at a layer with `rows` output rows and `need` rows of
        receptive field left after it: from where the previous band stopped (even for an upsampling) to
        `need` rows past this band's end (all rows for the last band)."""
        lo = 0 if self.carry is None else self.carry["end"][key]
        if even:
            lo -= lo % 2
        hi = rows if self.last else min(rows, self.c1 * (rows // self.split_rows) + need)
        if self.stored is not None:
            self.stored["end"][key] = hi
        return lo, hi

    def take(self, key, n: int, src: list, lo: int, hi: int, nxt: int, store: bool = True) -> list:
        """The input rows [lo, hi) of a layer for frame n as pieces: the band's own rows (`src`) and, above
        them, the previous band's carried rows. Keeps rows [nxt, hi) for the next band (where it will
        start reading this layer's input)."""
        own = src[0][0]
        pieces = []
        if lo < own:
            r0, x = self.carry[key][n]
            end = min(own, hi)
            if r0 > lo or r0 + x.shape[2] < end:
                raise RuntimeError(f"banded decode: input rows [{lo}, {end}) of layer {key} were not carried over")
            pieces.append((lo, x[:, :, lo - r0:end - r0]))
        pieces += _row_slice(src, max(lo, own), hi)
        if sum(x.shape[2] for _, x in pieces) != hi - lo:
            have = [(r, r + x.shape[2]) for r, x in pieces]
            raise RuntimeError(f"banded decode: layer {key} needs input rows [{lo}, {hi}), has {have}")
        if store and self.stored is not None and nxt < hi:
            r0 = max(nxt, lo)
            if key not in self.stored:  # one buffer for all frames: a few long-lived allocations, not one per frame
                ref = pieces[0][1]
                fmt = torch.channels_last if _channels_last(ref.device) else torch.contiguous_format
                buf = torch.empty((self.frames * ref.shape[0], ref.shape[1], hi - r0, ref.shape[3]),
                                  dtype=ref.dtype, device=ref.device, memory_format=fmt)
                self.stored[key] = [(r0, buf[k * ref.shape[0]:(k + 1) * ref.shape[0]]) for k in range(self.frames)]
            dst = self.stored[key][n][1]
            for a, x in _row_slice(pieces, r0, hi):
                dst[:, :, a - r0:a - r0 + x.shape[2]] = x
        return pieces


# The CPU engine runs channels-last (see `_frame`). Tests switch it off to run the NCHW layout the CUDA
# engine uses through the same code on the CPU.
CPU_CHANNELS_LAST = True


def _channels_last(device: torch.device) -> bool:
    return device.type == "cpu" and CPU_CHANNELS_LAST


def _frame(x: torch.Tensor) -> torch.Tensor:
    """A frame [B, C, H, W] entering the engine, in the layout the engine runs in. On the CPU that is
    channels-last: oneDNN convolves NHWC natively (NCHW frames are reordered to a blocked layout and
    back around every conv), and the channel reduction of the RMS norm becomes contiguous. Every later
    op (conv2d, elementwise, cat over channels) keeps the layout. Elsewhere frames stay contiguous (the
    CUDA norm kernel reads NCHW)."""
    if _channels_last(x.device):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _empty_frame(x: torch.Tensor, rows: Optional[int] = None, cols: Optional[int] = None) -> torch.Tensor:
    """An uninitialised frame like x (optionally with other row/column counts) in the engine's layout
    (`empty_like` of a non-dense view, such as a channel slice, would fall back to NCHW)."""
    fmt = torch.channels_last if _channels_last(x.device) and x.ndim == 4 else torch.contiguous_format
    shape = (*x.shape[:2], x.shape[2] if rows is None else rows, x.shape[3] if cols is None else cols)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _norm_rows(norm: "RMSNorm", pieces: list, pad: tuple[int, int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMS norm + SiLU (none if `norm` is None) of row pieces (see `CausalConv3d.step_rows`), written one
    after another into one frame with pad = (top, bottom) zero rows; `out`: a frame of that shape from an
    earlier call with the same pad (its zero rows are never written, so they stay zero)."""
    ref = pieces[0]
    rows = pad[0] + sum(p.shape[2] for p in pieces) + pad[1]
    if out is None:
        out = _empty_frame(ref, rows)
        if pad[0]:
            out[:, :, :pad[0]].zero_()
        if pad[1]:
            out[:, :, rows - pad[1]:].zero_()
    gamma = None if norm is None else norm.gamma.view(-1, 1, 1)
    r = pad[0]
    for p in pieces:
        dst = out[:, :, r:r + p.shape[2]]
        if norm is None:
            dst.copy_(p)
        elif p.device.type == "cpu" and p.dtype == torch.float32 and gamma.dtype == p.dtype:
            rms_norm_cf_ref(p, gamma, None, silu=True, out=dst)  # a row slice of an NHWC frame is dense
        else:
            dst.copy_(_norm(norm, p if p.device.type == "cpu" else p.contiguous(), True))
        r += p.shape[2]
    return out


def _norm(norm: "RMSNorm", x: torch.Tensor, silu: bool) -> torch.Tensor:
    # RMS_norm of the official code: F.normalize over channels (eps clamps the L2 norm at 1e-12) *
    # sqrt(C) * gamma, optionally followed by SiLU; the fused-kernel slot lives in fused.ops.
    return rms_norm_cf(x, norm.gamma.view(-1, 1, 1), None, silu=silu)


class RMSNorm(nn.Module):
    """Channel-first RMS norm holding `gamma` with the official shape ((C,1,1,1) video, (C,1,1) image)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))


# ----------------------------------------------------------------------------------------------------
# Blocks (official names: residual.{0,2,3,6}, shortcut, norm/to_qkv/proj, resample.1, time_conv)
# ----------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # 0 RMS_norm, 1 SiLU, 2 conv, 3 RMS_norm, 4 SiLU, 5 Dropout, 6 conv (only 0/2/3/6 have weights)
        self.residual = nn.ModuleList([RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                                       RMSNorm(out_dim), nn.SiLU(), nn.Identity(),
                                       CausalConv3d(out_dim, out_dim, 3, padding=1)])
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def step(self, x: torch.Tensor, st: _State, keep: bool) -> torch.Tensor:
        r = self.residual
        h = r[2].step(_norm(r[0], x, True), st, keep)
        h = r[6].step(_norm(r[3], h, True), st, keep)
        h += self.shortcut.pointwise(x) if isinstance(self.shortcut, CausalConv3d) else x
        return h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention, per frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def step(self, x: torch.Tensor, st: _State = None, keep: bool = True) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(rms_norm_cf(x, self.norm.gamma, None))  # (B, 3C, H, W)
        q, k, v = qkv.reshape(b, 1, 3 * c, h * w).transpose(-1, -2).chunk(3, dim=-1)  # 3 x (B, 1, HW, C)
        del qkv
        o = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())  # (B, 1, HW, C)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        out = self.proj(o)
        out += x
        return out


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, plus the temporal x2 of the `*3d` modes.

    Per-frame forms of the official chunk rules:
      * upsample3d: on the very first latent frame the time conv is skipped (1 frame stays 1 frame, its
        state stays zero: the official 'Rep' marker). Afterwards every input frame goes through a causal
        3-tap time conv with 2*C outputs; channels [0:C] are output frame 2i, [C:2C] frame 2i+1.
      * downsample3d: the first frame passes through unchanged; afterwards one output frame is made
        from every second input frame as time_conv(previous kept frame, a, b) with stride 2.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1)])
        else:
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)])
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        x = _frame(x)  # upsample3d hands over channel slices of its time conv's output
        if self.mode.startswith("upsample"):
            # nearest-exact x2 then the 3x3 conv, in sub-pixel form (the official code upsamples in fp32
            # and casts back, which is exact: nearest only copies values)
            return _upsample2x_conv3x3(x, conv.weight, conv.bias, self._kernels(x.dtype))
        return conv(F.pad(x, (0, 1, 0, 1)))  # ZeroPad2d((0,1,0,1)): right/bottom only

    def spatial_rows(self, pieces: list, rows: int, out_lo: int, out_hi: int) -> torch.Tensor:
        """Rows [out_lo, out_hi) (out_lo even) of `spatial` (upsampling) for one band of a frame `rows` high.
        pieces: consecutive row slices covering low-res rows [max(0, out_lo/2 - 1), min(rows, out_hi//2 + 1)),
        the ones those output rows see. They are copied once into a frame with the zero border (as F.pad
        would), and only the sub-pixel phases of the wanted rows are convolved."""
        conv = self.resample[1]
        m0, m1 = out_lo // 2, (out_hi + 1) // 2  # low-res rows whose x2 rows cover [out_lo, out_hi)
        ref = pieces[0]
        xp = _empty_frame(ref, m1 - m0 + 2, ref.shape[3] + 2)  # low-res rows [m0 - 1, m1 + 1), cols [-1, W]
        xp[..., 0].zero_()
        xp[..., -1].zero_()
        r = 1 if m0 == 0 else 0
        if r:
            xp[:, :, 0].zero_()
        if m1 == rows:
            xp[:, :, -1].zero_()
        for p in pieces:
            xp[:, :, r:r + p.shape[2], 1:-1] = p
            r += p.shape[2]
        y = _subpixel_conv(xp, conv.bias, self._kernels(ref.dtype) or _subpixel_kernels(conv.weight, ref.dtype))
        return y[:, :, out_lo - 2 * m0:out_hi - 2 * m0]

    def down_rows(self, pieces: list, out_lo: int, out_hi: int) -> torch.Tensor:
        """Rows [out_lo, out_hi) of `spatial` (downsampling: zero row and column at the bottom/right, then
        the stride-2 3x3 conv) for one band; pieces: consecutive slices of the input rows
        [2 out_lo, min(rows, 2 out_hi + 1)), copied once into a frame with the zero column (and zero row
        if the band reaches the bottom)."""
        ref = pieces[0]
        n = 2 * (out_hi - out_lo) + 1
        xp = _empty_frame(ref, n, ref.shape[3] + 1)
        xp[..., -1].zero_()
        r = 0
        for p in pieces:
            xp[:, :, r:r + p.shape[2], :-1] = p
            r += p.shape[2]
        if r < n:
            xp[:, :, r:].zero_()
        return self.resample[1](xp)

    def _kernels(self, dtype: torch.dtype) -> Optional[list]:
        """The sub-pixel kernels, made once per weight version (eager only; traced graphs rebuild them)."""
        w = self.resample[1].weight
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or w.is_meta or w.is_inference():
            return None  # inference tensors have no version counter: an in-place patch would go unseen
        key = (w.data_ptr(), w._version, w.device, dtype)
        cached = getattr(self, "_sp_cache", None)
        if cached is None or cached[0] != key:
            cached = self._sp_cache = (key, _subpixel_kernels(w.detach(), dtype))
        return cached[1]

    def up_time(self, x: torch.Tensor, st: _State, first: bool, keep: bool) -> list:
        """upsample3d's temporal part: 1 frame -> [frame] (first latent) or [frame 2i, frame 2i+1]."""
        if first:
            return [x]
        y = self.time_conv.step(x, st, keep)  # (B, 2C, H, W)
        c = x.shape[1]
        return [y[:, :c], y[:, c:]]

    def down_time(self, x: torch.Tensor, st: _State) -> Optional[torch.Tensor]:
        """downsample3d's temporal part: returns a frame, or None while waiting for the second input."""
        s = st.slot(self)  # [last kept frame, pending frame]
        if s[0] is None:
            s[0] = x
            return x
        if s[1] is None:
            s[1] = x
            return None
        out = self.time_conv.taps([s[0], s[1], x])
        s[0], s[1] = x, None
        return out


def _subpixel_kernels(w: torch.Tensor, dtype: torch.dtype) -> list:
    """The four (O, C, 2, 2) kernels of `_upsample2x_conv3x3` for output phases (a, c) = 00, 01, 10, 11,
    summed in fp32 (or float64) and rounded once to `dtype`; channels-last on the CPU like the frames."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # fp32 sums for fp16/bf16 weights, float64 stays
    rows = (torch.stack((w[:, :, 0], w[:, :, 1] + w[:, :, 2]), 2),  # a=0: rows i-1, i     (O, C, 2, 3)
            torch.stack((w[:, :, 0] + w[:, :, 1], w[:, :, 2]), 2))  # a=1: rows i, i+1
    fmt = torch.channels_last if _channels_last(w.device) else torch.contiguous_format
    return [k.to(dtype).contiguous(memory_format=fmt) for r in rows
            for k in (torch.stack((r[..., 0], r[..., 1] + r[..., 2]), -1),      # c=0: cols j-1, j
                      torch.stack((r[..., 0] + r[..., 1], r[..., 2]), -1))]     # c=1: cols j, j+1


def _upsample2x_conv3x3(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                        kernels: Optional[list] = None) -> torch.Tensor:
    """conv3x3(pad 1)(nearest_upsample_x2(x)) without building the upsampled image (sub-pixel form).

    With integer scale 2, nearest-exact reads source pixel i//2, so output pixel (2i+a, 2j+c) only sees
    low-res rows {i-1, i} (a=0: kernel rows 0 | 1+2) or {i, i+1} (a=1: rows 0+1 | 2), likewise for
    columns: four 2x2 convs on the low-res frame, 16 instead of 36 multiply-adds per low-res pixel and
    no 4x-sized temporary. The summed kernel taps change float rounding slightly (~1e-7 relative in fp32).
    x: (B, C, h, w); w: (O, C, 3, 3) -> (B, O, 2h, 2w)."""
    kernels = kernels or _subpixel_kernels(w, x.dtype)
    return _subpixel_conv(F.pad(x, (1, 1, 1, 1)), b, kernels)  # zero border of the upsampled image = here


def _subpixel_conv(xp: torch.Tensor, b: Optional[torch.Tensor], kernels: list) -> torch.Tensor:
    """The four 2x2 phase convs of `_upsample2x_conv3x3` on a frame padded by one row/column on every
    side: (B, C, h + 2, w + 2) -> (B, O, 2h, 2w)."""
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


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1,) + tuple(cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)])


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (cfg.dim_mult[-1],) + tuple(cfg.dim_mult[::-1])]
        tup = tuple(cfg.temporal_downsample[::-1])
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                in_dim = in_dim // 2  # the previous Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if tup[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)])


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
FrameCallback = Callable[[int, torch.Tensor], None]


class WanVAE(nn.Module):
    """The Wan2.1 VAE (`TWINFLOW_VAE`). Video in [-1, 1] as [B, 3, T, H, W]; raw latents [B, z, T', H/8, W/8]."""

    def __init__(self, cfg: WanVAEConfig = PRESETS["wan2.1"]):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # quant conv: mu | log_var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # post-quant conv
        self.decoder = Decoder3d(cfg)
        self.source = ""

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    def tap_major_(self) -> "WanVAE":
        """Lay every causal conv weight out tap-major (same state dict; see CausalConv3d.tap_major_)."""
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.tap_major_()
        return self

    # ---- frame counts --------------------------------------------------------------------------
    def latent_frames(self, frames: int) -> int:
        """1+4k video frames -> 1+k latent frames (surplus frames are dropped, as ComfyUI/official)."""
        return 1 + (frames - 1) // self.cfg.temporal_ratio

    def video_frames(self, latent_frames: int) -> int:
        return 1 + self.cfg.temporal_ratio * (latent_frames - 1)

    # ---- encode -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, video: torch.Tensor, *, bands: Optional[int] = None) -> torch.Tensor:
        """Encode video [B, 3, T, H, W] in [-1, 1] to the raw latent mean [B, z, 1+(T-1)//4, H/8, W/8].

        No sampling and no normalisation (ComfyUI's LATENT convention). Frames beyond the last 1+4k
        are dropped, with a log line. `bands`: exact row bands for everything before the middle block
        (see `_encode_banded`): None = auto (`encode_auto_bands`), 1 = whole frames."""
        if bands is not None and (not isinstance(bands, int) or bands < 1):
            raise ValueError(f"bands must be None (auto) or an integer >= 1, got {bands!r}")
        if video.ndim != 5 or video.shape[1] != self.cfg.in_channels:
            raise ValueError(f"encode expects video [B, {self.cfg.in_channels}, T, H, W], got {tuple(video.shape)}")
        b, _, t, h, w = video.shape
        r = self.cfg.spatial_ratio
        if h % r or w % r:
            raise ValueError(f"encode needs height and width divisible by {r}, got {h}x{w}; crop or resize the frames")
        keep = self.video_frames(self.latent_frames(t))
        if keep != t:
            logger.info("Wan VAE encode: %d frames is not 1+%dk; using the first %d (the last %d are dropped, "
                        "as ComfyUI and the official code do)", t, self.cfg.temporal_ratio, keep, t - keep)
        x = video.to(device=self.device, dtype=self.dtype)
        z = self.cfg.z_dim
        out = torch.empty(b, z, self.latent_frames(t), h // r, w // r, device=self.device, dtype=self.dtype)
        bands = self.encode_auto_bands(video.shape) if bands is None else bands
        plan = self._encode_band_rows(h // 2, bands)  # split rows: after the first x2 downsampling
        if len(plan) > 1:
            return self._encode_banded(x, keep, plan, out)
        st, n = _State(), 0
        with Progress(total=keep, desc="Wan VAE encode") as bar:
            for i in range(keep):
                for y in self._encode_frame(_frame(x[:, :, i]), st, keep=i < keep - 1):
                    out[:, :, n] = self._encode_mean(y)
                    n += 1
                bar.update(1)
        assert n == out.shape[2], (n, out.shape)
        return out

    def _encode_frame(self, x: torch.Tensor, st: _State, keep: bool) -> Iterator[torch.Tensor]:
        """Push one video frame [B, 3, H, W] through the encoder; yields 0 or 1 head outputs."""
        yield from self._encode_from(0, self.encoder.conv1.step(x, st, keep), st, keep)

    def _encode_mean(self, y: torch.Tensor) -> torch.Tensor:
        """The latent mean of one encoder output frame: only the mu half of the quant conv (log_var is never
        used at inference)."""
        z = self.cfg.z_dim
        return F.conv2d(y, self.conv1.weight[:z, :, 0], self.conv1.bias[:z])

    def _encode_from(self, start: int, x: torch.Tensor, st: _State, keep: bool) -> Iterator[torch.Tensor]:
        """Encoder layers `downsamples[start:]`, the middle block and the head on one frame; 0 or 1 outputs."""
        enc = self.encoder
        for layer in enc.downsamples[start:]:
            if isinstance(layer, ResidualBlock):
                x = layer.step(x, st, keep)
            else:
                x = layer.spatial(x)
                if layer.mode == "downsample3d":
                    x = layer.down_time(x, st)
                    if x is None:
                        return
        for layer in enc.middle:
            x = layer.step(x, st, keep)
        yield enc.head[2].step(_norm(enc.head[0], x, True), st, keep)

    # ---- exact row bands, encoder ---------------------------------------------------------------------
    def encode_band_split(self) -> int:
        """Index in `encoder.downsamples` of the first spatial downsampling: the layers up to and including
        it run in bands (the full-resolution convs hold most of the encoder's memory). Everything before
        the middle block is local in space and could be banded, but bands thin enough to matter at the
        1/4 and 1/8 stages made the 256 px encode ~6% slower (small convolutions) for little memory."""
        return next(i for i, m in enumerate(self.encoder.downsamples) if isinstance(m, Resample))

    def _encode_needs(self) -> dict:
        """Per banded encoder op ("conv1", each residual block's index, ("down", i)): the receptive field
        in rows that is left after it, at its output resolution, walked backwards from the split (see
        `encode_band_split`). A 3x3 conv adds a row; the stride-2 downsampling (zero row at the bottom)
        maps `n` rows to 2n + 1. wan2.1: 5 rows after conv1."""
        needs, need = {}, 0
        layers = self.encoder.downsamples
        for i in range(self.encode_band_split(), -1, -1):
            if isinstance(layers[i], ResidualBlock):
                needs[i] = need
                need += 2
            else:
                needs[("down", i)] = need
                need = 2 * need + 1
        needs["conv1"] = need
        return needs

    def encode_auto_bands(self, video_shape) -> int:
        """The default band count of `encode`: bands of >= 128 input rows, 1 (whole frames) below 256 px.
        Bands compute no row twice; they cost smaller convolutions and a few carried rows (measured at
        9x256x256: 2 bands ~2% slower than whole frames, 4 bands ~4%) for ~0.4-0.55x the peak memory."""
        return max(1, int(video_shape[-2]) // 128)

    def _encode_band_rows(self, rows: int, bands: int) -> list[tuple[int, int]]:
        """[(c0, c1)]: rows of each band at the split resolution (`rows` there). A band computes down to
        `_encode_needs` rows past its end, so the edges are placed where the bands' full-resolution rows
        (where the caches are) are equal; a last band no taller than that reach is merged into the one
        before."""
        reach = self._encode_needs()["conv1"] + 1  # full-resolution rows past the band's end
        edges = [0]
        for k in range(1, bands):  # the split is at half resolution (`encode_band_split`)
            c = round((k * rows * 2 / bands - reach) / 2)
            if edges[-1] < c < rows:
                edges.append(c)
        edges.append(rows)
        while len(edges) > 2 and (rows - edges[-2]) * 2 <= reach:
            del edges[-2]
        return list(zip(edges[:-1], edges[1:]))

    def _encode_banded(self, x: torch.Tensor, frames: int, plan: list, out: torch.Tensor) -> torch.Tensor:
        """Exact low-memory encode. The encoder's first stage (conv1, the full-resolution residual blocks
        and the first spatial downsampling) is local in space, so it runs band by band through all frames,
        rows carried between bands as in `_decode_banded`: only one band's full-resolution caches (the
        bulk of the encoder's memory) are alive at a time. Its output frames (1/2 resolution) are kept for
        every video frame; the rest of the encoder then streams them whole. `frames`: the video frames to
        encode (1 + 4k)."""
        rows = x.shape[-2] // 2  # at the split, after the first x2 downsampling
        needs, stop = self._encode_needs(), self.encode_band_split()
        kept: list = []
        carry = None
        with Progress(total=len(plan) * frames, desc=f"Wan VAE encode ({len(plan)} bands)") as bar:
            for k, (c0, c1) in enumerate(plan):
                band = _Band(c1, rows, frames, last=k == len(plan) - 1, carry=carry)
                st, j = _State(), 0
                release_free_heap(out.device)
                for n in range(frames):
                    res = self._encode_band_frame(_frame(x[:, :, n]), band, n, needs, st, stop, last=n == frames - 1)
                    if res is not None:
                        lo, y = res
                        if j == len(kept):
                            kept.append(_empty_frame(y, rows))
                        kept[j][:, :, lo:lo + y.shape[2]] = y
                        j += 1
                    bar.update(1)
                carry = band.stored
                del st, band
        del carry
        release_free_heap(out.device)
        st, j = _State(), 0
        for n in range(len(kept)):
            for y in self._encode_from(stop + 1, kept[n], st, keep=n < len(kept) - 1):
                out[:, :, j] = self._encode_mean(y)
                j += 1
            kept[n] = None
        return out

    def _encode_band_frame(self, x: torch.Tensor, band: "_Band", n: int, needs: dict, st: _State, stop: int,
                           last: bool) -> Optional[tuple]:
        """Video frame n of one band through the encoder's layers up to `stop`: (first row, rows), or None
        while a temporal downsampling there waits for its second frame."""
        enc = self.encoder
        rows = x.shape[-2]
        lo, _, h, _ = self._band_conv(band, "conv1", n, enc.conv1, None, [(0, x)], rows, needs["conv1"], st, last,
                                      store=False)  # every band has the whole input frame
        src = [(lo, h)]
        for i, layer in enumerate(enc.downsamples[:stop + 1]):
            if isinstance(layer, ResidualBlock):
                src = self._band_block(band, i, n, layer, src, rows, needs[i], st, last)
                continue
            lo, hi = band.out_rows(("down", i), rows // 2, needs[("down", i)])
            inp = band.take(("down", i), n, src, 2 * lo, min(rows, 2 * hi + 1), nxt=2 * hi)
            rows //= 2
            y = layer.down_rows([t for _, t in inp], lo, hi)
            if layer.mode == "downsample3d":
                y = layer.down_time(y, st)
                if y is None:
                    return None  # waiting for the second frame of the pair
            src = [(lo, y)]
        return src[0]

    # ---- decode -----------------------------------------------------------------------------------
    def _decode_latent(self, z: torch.Tensor, st: _State, first: bool, last: bool,
                       stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Push one post-quant latent frame [B, z, h, w] through the decoder; yields its output frames
        (or, with `stop`, the frames entering that layer's spatial upsampling)."""
        dec = self.decoder
        x = dec.conv1.step(z, st, not last)
        for layer in dec.middle:
            x = layer.step(x, st, not last)
        yield from self._decode_from(0, x, st, first, last, stop)

    # ---- exact row bands ----------------------------------------------------------------------------
    def band_split(self) -> Optional[int]:
        """Index in `decoder.upsamples` of the last upsample3d, or None. Everything after its time conv
        is local in space (3x3 convs, the per-pixel RMS norm, SiLU, nearest upsampling): no attention,
        no other global op. So from its spatial upsampling on, rows can be decoded in horizontal bands
        (see `_decode_banded`), and the result is the untiled decode (unlike tiling, no blending)."""
        idx = [i for i, m in enumerate(self.decoder.upsamples)
               if isinstance(m, Resample) and m.mode == "upsample3d"]
        return idx[-1] if idx else None

    def band_halo(self) -> int:
        """The receptive field of the back half in rows at the split resolution: how far past its own end
        a band computes rows for the next one (see `_decode_banded`), walked from the output backwards.
        Each 3x3 conv widens it by one row at its resolution; a nearest x2 upsampling followed by its conv
        maps `n` rows to ceil((n + 1) / 2) at half resolution.
        wan2.1: head + 6 convs = 7 rows at 4x, -> 4 at 2x, + 6 convs -> 10, -> 6 at the split."""
        stop = self.band_split()
        return 0 if stop is None else self._band_needs(stop)[stop]

    def _band_needs(self, stop: int) -> dict:
        """Layer index (from `stop` on, and "head") -> context rows its input needs beyond the rows
        kept, at that layer's resolution."""
        needs = {"head": 1}  # the head conv
        need = 1
        layers = self.decoder.upsamples
        for i in range(len(layers) - 1, stop - 1, -1):
            if isinstance(layers[i], Resample):
                need = math.ceil((need + 1) / 2)
            else:  # a residual block: two 3x3 convs
                need += 2
            needs[i] = need
        return needs

    def _band_rows(self, rows: int, bands: int, halo: int) -> list[tuple[int, int]]:
        """[(c0, c1)]: the split-resolution rows each band delivers. A band is exact once the band before
        it has run (see `_decode_banded`), except that the last band must be taller than the halo: the
        band before it computes `halo` rows past its own end, which would otherwise reach the frame's
        bottom edge. Such a last band is merged into the one before."""
        edges = [round(k * rows / bands) for k in range(bands + 1)]
        while len(edges) > 2 and rows - edges[-2] <= halo:
            del edges[-2]
        return list(zip(edges[:-1], edges[1:]))

    def _decode_banded(self, z: torch.Tensor, bands: int, out: torch.Tensor) -> torch.Tensor:
        """Exact low-memory decode. Front half (conv1 .. the last upsample3d's time conv) streams as usual
        and keeps its output frames (small: 4x fewer pixels than the output, 2x fewer at wan2.1's split);
        its caches are then freed. The back half runs band by band, top to bottom, each band through all
        frames with its own causal state, so only one band's caches (the bulk of the decoder's memory:
        the full-resolution convs) are alive at a time.

        No row is computed twice. Each layer of a band computes exactly the rows that are valid (their
        receptive field lies inside what the band has), down to where the rest of the band's back half
        still needs them (`_band_needs`), so a band reaches `needs` rows past its own end at every layer.
        The next band starts each layer where the previous one stopped; the 1-2 input rows above that
        start which a 3x3 conv also reads are carried over from the previous band (stored per layer and
        frame: a few rows, ~30 MiB at wan2.1 9x256x256 fp32), and at the image edges the zero padding rows
        are explicit, so a conv never computes a row that is thrown away. Only an upsampling whose start
        is odd recomputes one row (its output starts on an even row)."""
        stop = self.band_split()
        t = z.shape[2]
        st, fronts = _State(), []
        with Progress(total=t, desc=f"Wan VAE decode (front, {bands} bands)") as bar:
            for i in range(t):
                zi = self.conv2.pointwise(_frame(z[:, :, i]))
                fronts.extend(self._decode_latent(zi, st, first=i == 0, last=i == t - 1, stop=stop))
                bar.update(1)
        del st
        release_free_heap(out.device)  # the front half's caches go back to the OS before the bands
        needs = self._band_needs(stop)
        plan = self._band_rows(fronts[0].shape[-2], bands, needs[stop])
        carry = None
        with Progress(total=len(plan) * len(fronts), desc="Wan VAE decode (bands)") as bar:
            for k, (c0, c1) in enumerate(plan):
                band = _Band(c1, fronts[0].shape[-2], len(fronts), last=k == len(plan) - 1, carry=carry)
                st = _State()
                release_free_heap(out.device)  # the previous band's caches go back to the OS
                for n in range(len(fronts)):
                    lo, hi, frame = self._decode_band_frame(stop, fronts[n], band, n, needs, st,
                                                            last=n == len(fronts) - 1)
                    if band.last:
                        fronts[n] = None  # the last band frees the front frames as it goes
                    out[:, :, n, lo:hi] = frame
                    bar.update(1)
                carry = band.stored
                del st, band
        return out

    def _decode_band_frame(self, stop: int, front: torch.Tensor, band: "_Band", n: int, needs: dict,
                           st: _State, last: bool) -> tuple:
        """Frame n of one band through the back half. front: the whole kept frame at the split resolution.
        Returns (row0, row1, rows [row0, row1) of the output frame)."""
        layers = self.decoder.upsamples
        rows = front.shape[-2]  # at the current resolution
        src = [(0, front)]  # the current layer's input: consecutive (first row, rows) pieces
        for i in range(stop, len(layers)):
            layer = layers[i]
            if isinstance(layer, Resample):
                lo, hi = band.out_rows(("up", i), 2 * rows, needs.get(i + 1, needs["head"]), even=True)
                inp = band.take(("up", i), n, src, max(0, lo // 2 - 1), min(rows, hi // 2 + 1),
                                nxt=hi // 2 - 1, store=i != stop)
                rows *= 2
                src = [(lo, layer.spatial_rows([x for _, x in inp], rows // 2, lo, hi))]
                continue
            src = self._band_block(band, i, n, layer, src, rows, needs[i] - 2, st, last)
        head = self.decoder.head
        lo, hi, x, _ = self._band_conv(band, ("head",), n, head[2], head[0], src, rows, 0, st, last)
        return lo, hi, x.clamp_(-1.0, 1.0)

    @staticmethod
    def _band_conv(band: "_Band", key, n: int, conv: CausalConv3d, norm: Optional[RMSNorm], src: list, rows: int,
                   need: int, st: _State, last: bool, store: bool = True) -> tuple:
        """(norm + SiLU +) causal 3x3 conv of one band: (first row, last row + 1, output rows, input pieces)."""
        lo, hi = band.out_rows(key, rows, need)
        inp = band.take(key, n, src, max(0, lo - 1), min(rows, hi + 1), nxt=hi - 1, store=store)
        out = conv.step_rows([x for _, x in inp], (int(lo == 0), int(hi == rows)), st, not last, norm)
        return lo, hi, out, inp

    @classmethod
    def _band_block(cls, band: "_Band", i: int, n: int, layer: ResidualBlock, src: list, rows: int, need: int,
                    st: _State, last: bool) -> list:
        """A residual block of one band (`need`: receptive field left after it); returns its output piece."""
        r, short = layer.residual, layer.shortcut
        lo1, hi1, h, inp = cls._band_conv(band, (i, 0), n, r[2], r[0], src, rows, need + 1, st, last)
        lo2, hi2, h, _ = cls._band_conv(band, (i, 1), n, r[6], r[3], [(lo1, h)], rows, need, st, last)
        for r0, x in _row_slice(inp, lo2, hi2):  # the block input's rows (carried ones included)
            dst = h[:, :, r0 - lo2:r0 - lo2 + x.shape[2]]
            dst += short.pointwise(x) if isinstance(short, CausalConv3d) else x
        return [(lo2, h)]

    def _decode_from(self, i: int, x: torch.Tensor, st: _State, first: bool, last: bool,
                     stop: Optional[int] = None):
        """Run upsample layers i.. on frame x, depth first (one frame per layer alive), then the head.

        With `stop` (the index of an upsample3d layer), yield that layer's time-upsampled frames instead
        (before its spatial part) and go no further: the front half of a banded decode."""
        dec = self.decoder
        layers = dec.upsamples
        while i < len(layers):
            layer = layers[i]
            if i == stop:
                yield from layer.up_time(x, st, first, not last)
                return
            if isinstance(layer, ResidualBlock):
                x = layer.step(x, st, not last)
                i += 1
                continue
            if layer.mode == "upsample3d":
                frames = layer.up_time(x, st, first, not last)
                del x
                for j, f in enumerate(frames):
                    yield from self._decode_from(i + 1, layer.spatial(f), st, first,
                                                 last and j == len(frames) - 1, stop)
                return
            x = layer.spatial(x)
            i += 1
        h = dec.head[2].step(_norm(dec.head[0], x, True), st, not last)  # (B, 3, H, W)
        yield h.clamp_(-1.0, 1.0)

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"decode expects latents [B, {self.cfg.z_dim}, T, H, W], got {tuple(z.shape)}")

    @torch.inference_mode()
    def iter_decode(self, z: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the decode: yields `(frame_index, frame [B, 3, H*8, W*8])` in [-1, 1] as soon as each
        output frame is ready (untiled). Frames are views the caller may keep; nothing else is retained."""
        self._check_latent(z)
        z = z.to(device=self.device, dtype=self.dtype)
        t = z.shape[2]
        st, n = _State(), 0
        with Progress(total=t, desc="Wan VAE decode") as bar:
            for i in range(t):
                zi = self.conv2.pointwise(_frame(z[:, :, i]))
                for frame in self._decode_latent(zi, st, first=i == 0, last=i == t - 1):
                    yield n, frame
                    n += 1
                bar.update(1)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, *, tile: Optional[tuple[int, int]] = None, tiling: str = "off",
               bands: Optional[int] = None, callback: Optional[FrameCallback] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode raw latents [B, z, T, h, w] to video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1].

        Args:
            tile: `(tile, overlap)` in latent pixels for spatial tiling; None = untiled unless `tiling`
                is "auto" and the memory estimate says the untiled decode would not fit.
            tiling: "off" (refuse up front if it cannot fit), "auto" (tile when needed), "on" (use `tile`).
            bands: exact row bands of the full-resolution half (see `_decode_banded`): None = auto (see
                `auto_bands`; more if memory needs it), 1 = whole frames (most memory; the only mode that
                streams frames to `callback`).
            callback: called as `callback(frame_index, frame)` for each finished frame (untiled only).
            out: optional preallocated output tensor of the right shape.
        """
        self._check_latent(z)
        if tiling not in ("off", "auto", "on"):
            raise ValueError(f"tiling must be 'off', 'auto' or 'on', got {tiling!r}")
        b, _, t, h, w = z.shape
        r = self.cfg.spatial_ratio
        shape = (b, 3, self.video_frames(t), h * r, w * r)
        if tiling == "on" and tile is None:
            raise ValueError("tiling='on' needs tile=(tile, overlap) in latent pixels")
        if bands is not None and (not isinstance(bands, int) or bands < 1):
            raise ValueError(f"bands must be None (auto) or an integer >= 1, got {bands!r}")
        if bands is None and callback is not None:
            bands = 1  # streaming frames as they finish needs whole frames
        if tiling == "on":
            tile = _check_tile(tile, h, w)
            self._check_tile_fits(z.shape, tile)
        else:
            bands, tile = self._plan_decode(z.shape, tiling, bands)
        if out is None:
            out = torch.empty(shape, device=self.device, dtype=self.dtype)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, decode produces {shape}")
        if tile is not None and (tile[0] < h or tile[0] < w):
            if callback is not None:
                raise ValueError("a per-frame callback needs an untiled decode (tiles finish one at a time)")
            return self._decode_tiled(z, tile, out)
        if bands is not None and bands > 1:
            if callback is not None:
                raise ValueError("a per-frame callback needs bands=1 (bands finish one at a time)")
            if self.band_split() is None:
                raise ValueError("this VAE has no temporal upsampling layer to split at; decode with bands=1")
            return self._decode_banded(z, bands, out)
        for n, frame in self.iter_decode(z):
            out[:, :, n] = frame
            if callback is not None:
                callback(n, out[:, :, n])
        return out

    def _decode_tiled(self, z: torch.Tensor, tile: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
        """Spatial tiles with overlap, linear blending. Each tile is decoded through all latent frames
        with its own causal state (tile-major, so only one tile's caches are alive), into `out`."""
        z = z.to(device=self.device, dtype=self.dtype)
        b, _, t, h, w = z.shape
        r = self.cfg.spatial_ratio
        size, overlap = tile
        ys, xs = _tile_starts(h, size, overlap), _tile_starts(w, size, overlap)
        log_once(logger, ("wan_vae_tiled", h, w, size, overlap),
                 "Wan VAE decode: tiled, %d x %d tiles of %d latent px with overlap %d (latent %dx%d)",
                 len(ys), len(xs), size, overlap, h, w)
        out.zero_()
        wsum = torch.zeros(1, 1, 1, h * r, w * r, device=out.device, dtype=torch.float32)
        with Progress(total=len(ys) * len(xs) * t, desc="Wan VAE tiled decode") as bar:
            for y0 in ys:
                for x0 in xs:
                    th, tw = min(size, h - y0), min(size, w - x0)
                    wy = _ramp(th * r, overlap * r, y0 > 0, y0 + th < h, out.device)
                    wx = _ramp(tw * r, overlap * r, x0 > 0, x0 + tw < w, out.device)
                    wt = wy[:, None] * wx[None, :]  # (th*r, tw*r)
                    wsum[..., y0 * r:(y0 + th) * r, x0 * r:(x0 + tw) * r] += wt
                    wt = wt.to(out.dtype)
                    st, n = _State(), 0
                    for i in range(t):
                        zi = self.conv2.pointwise(_frame(z[:, :, i, y0:y0 + th, x0:x0 + tw]))
                        for frame in self._decode_latent(zi, st, first=i == 0, last=i == t - 1):
                            out[:, :, n, y0 * r:(y0 + th) * r, x0 * r:(x0 + tw) * r] += frame * wt
                            n += 1
                        bar.update(1)
        out /= wsum.to(out.dtype)
        return out

    # ---- memory planning ------------------------------------------------------------------------------
    def estimate_decode_bytes(self, latent_shape, tile: Optional[int] = None, dtype=None, bands: int = 1) -> int:
        """Peak bytes a decode of `latent_shape` [B, z, T, h, w] needs beyond the weights (see docs/vae.md)."""
        return estimate_decode_bytes(self.cfg, latent_shape, dtype or self.dtype, tile, bands=bands,
                                     halo=self.band_halo())

    def auto_bands(self, latent_shape) -> int:
        """The default band count: bands of at least 3 x halo split-resolution rows (wan2.1: 72 output
        rows), if that needs less memory than whole frames, else 1. Bands compute no row twice, so they
        cost only smaller convolutions and a few carried rows: measured at 9x256x256 (3 bands) as fast as
        whole frames with 0.4x the memory. But a banded decode keeps the front half's output of every
        frame, so for long videos whole frames need less (wan2.1 at 720p: from ~30 frames)."""
        bands = max(1, self._split_rows(latent_shape) // (3 * max(1, self.band_halo())))
        if bands > 1 and (self.estimate_decode_bytes(latent_shape, bands=bands)
                          >= self.estimate_decode_bytes(latent_shape)):
            return 1
        return bands

    def _split_rows(self, latent_shape) -> int:
        stop = self.band_split()
        if stop is None:
            return 0
        ups = sum(1 for m in self.decoder.upsamples[:stop] if isinstance(m, Resample))
        return int(latent_shape[-2]) * 2 ** ups

    def _plan_decode(self, latent_shape, tiling: str, bands: Optional[int]) -> tuple[int, Optional[tuple[int, int]]]:
        """(bands, tile) for an untiled-or-auto decode, decided before any work. Auto bands grow (exact)
        until the estimate fits; only then does tiling="auto" fall back to (approximate) tiles."""
        rows = self._split_rows(latent_shape)
        max_bands = max(1, rows // max(1, self.band_halo()))  # bands no thinner than their halo
        want = self.auto_bands(latent_shape) if bands is None else min(bands, max(1, rows))
        avail = self._usable_memory()
        if avail is None or self.estimate_decode_bytes(latent_shape, bands=want) <= avail:
            return want, None
        if bands is None:
            for b in range(want + 1, max_bands + 1):
                if self.estimate_decode_bytes(latent_shape, bands=b) <= avail:
                    logger.info("Wan VAE decode: %d exact row bands to fit %.2f GiB usable on %s",
                                b, avail / 2 ** 30, self.device)
                    return b, None
            want = max_bands
        return want, self._plan_tiling(latent_shape, tiling, bands=want)

    def _usable_memory(self) -> Optional[int]:
        # The estimate counts live tensor bytes; the process peak is higher by allocator fragmentation and
        # oneDNN scratch (measured RSS peaks 0.7-1.7x the estimate on CPU, see docs/vae.md).
        avail = available_memory(self.device)
        return None if avail is None else int(avail / ALLOC_MARGIN)

    def _plan_tiling(self, latent_shape, tiling: str, bands: int = 1) -> Optional[tuple[int, int]]:
        """Decide before any work whether the decode fits; tile (auto) or refuse (off) if it does not."""
        avail = self._usable_memory()
        need = self.estimate_decode_bytes(latent_shape, bands=bands)
        if avail is None or need <= avail:
            return None
        h, w = latent_shape[-2:]
        fit = pick_tile(self.cfg, latent_shape, self.dtype, avail)
        gib = 2 ** 30
        if fit is None:
            raise MemoryError(
                f"Wan VAE decode of latents {tuple(latent_shape)} needs about {need / gib:.2f} GiB beyond the "
                f"weights and only {avail / gib:.2f} GiB is usable on {self.device}; even the smallest tile "
                f"would not fit. Free memory or decode fewer/smaller frames.")
        if tiling == "off":
            raise MemoryError(
                f"Wan VAE decode of latents {tuple(latent_shape)} needs about {need / gib:.2f} GiB beyond the "
                f"weights and only {avail / gib:.2f} GiB is usable on {self.device}. Enable tiling: a tile of "
                f"{fit[0] * self.cfg.spatial_ratio} px (overlap {fit[1] * self.cfg.spatial_ratio} px) would fit.")
        logger.info("Wan VAE decode: untiled needs ~%.2f GiB, %.2f GiB available on %s -> tiling with %d px tiles",
                    need / gib, avail / gib, self.device, fit[0] * self.cfg.spatial_ratio)
        return fit


    def _check_tile_fits(self, latent_shape, tile) -> None:
        avail = self._usable_memory()
        need = self.estimate_decode_bytes(latent_shape, tile=tile[0])
        if avail is not None and need > avail:
            fit = pick_tile(self.cfg, latent_shape, self.dtype, avail)
            hint = (f"a tile of {fit[0] * self.cfg.spatial_ratio} px would fit" if fit else
                    "even the smallest tile would not fit; free memory or decode fewer frames")
            raise MemoryError(f"Wan VAE tiled decode of latents {tuple(latent_shape)} with {tile[0]} latent px tiles "
                              f"needs about {need / 2 ** 30:.2f} GiB, {avail / 2 ** 30:.2f} GiB usable on "
                              f"{self.device}; {hint}")


def _check_tile(tile, h: int, w: int) -> tuple[int, int]:
    size, overlap = int(tile[0]), int(tile[1])
    if size < 2 or overlap < 0 or overlap * 2 > size:
        raise ValueError(f"tile (size {size}, overlap {overlap}) in latent pixels: need size >= 2 and "
                         f"0 <= overlap <= size/2")
    return size, overlap


def _tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Tile start offsets covering [0, n): stride size-overlap, the last tile aligned to the end."""
    if size >= n:
        return [0]
    stride = size - overlap
    starts = list(range(0, n - size, stride)) + [n - size]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, ramp_start: bool, ramp_end: bool, device) -> torch.Tensor:
    """Blend weights over n pixels: linear 0->1 over `overlap` pixels at each interior edge."""
    wgt = torch.ones(n, device=device, dtype=torch.float32)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if ramp_start:
            wgt[:overlap] = ramp
        if ramp_end:
            wgt[n - overlap:] = ramp.flip(0)
    return wgt


# ----------------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------------
ALLOC_MARGIN = 1.75  # usable = available / margin when planning (fragmentation, oneDNN scratch)


def estimate_decode_bytes(cfg: WanVAEConfig, latent_shape, dtype: torch.dtype, tile: Optional[int] = None,
                          bands: int = 1, halo: int = 6) -> int:
    """Peak bytes for a decode beyond the weights: causal caches + per-frame working set + output.

    Caches: every causal 3-tap conv keeps its last 2 input frames at its resolution (one tile's worth when
    tiled, tile-major). Working set: ~6 frame-sized activations at the widest/biggest layer (norm
    temporaries, conv output, residual, upsampled input). Output: the whole video in the model dtype
    (+ an fp32 weight map when tiled). With `bands` > 1 (the decoder's levels after its last temporal
    upsampling run band by band, see `WanVAE._decode_banded`): the front levels' caches and working
    set plus the kept front frames, or the kept front frames plus one band (its rows + the halo it
    computes for the next band, at most the whole frame) of the back levels' caches and working set and
    the rows carried between bands (they grow with the frame count, like the kept front frames),
    whichever is larger."""
    b, _, t, h, w = (int(s) for s in latent_shape)
    es = torch.empty((), dtype=dtype).element_size()
    r = cfg.spatial_ratio
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    dims = [cfg.dim * u for u in (cfg.dim_mult[-1],) + tuple(cfg.dim_mult[::-1])]
    tup = tuple(cfg.temporal_downsample[::-1])
    split = max((i for i in range(len(dims) - 2) if tup[i]), default=None)  # stage of the last upsample3d
    px = th * tw  # pixels per frame at the current decoder level
    cache = [2 * cfg.z_dim * px + 4 * 2 * dims[0] * px, 0]  # [front, back]: conv1, middle (2 blocks x 2 convs)
    work = [0, 0]
    fronts, rows, carry = 0, th, 0
    for i in range(len(dims) - 1):
        side = 0 if split is not None and i <= split else 1
        if side:  # rows carried between bands: 2 input rows per conv (and upsampling) and frame
            carry += 2 * tw * 2 ** i * dims[i + 1] * (2 * (cfg.num_res_blocks + 1) + 1)
        in_dim = dims[i] if i == 0 else dims[i] // 2
        for k in range(cfg.num_res_blocks + 1):
            cache[side] += 2 * px * ((in_dim if k == 0 else dims[i + 1]) + dims[i + 1])
        work[side] = max(work[side], 6 * max(in_dim, dims[i + 1]) * px)
        if i != len(dims) - 2:
            if tup[i]:
                cache[side] += 2 * dims[i + 1] * px  # time_conv state
            if i == split:  # the kept front frames: the time conv's output for every video frame
                rows = th * 2 ** i  # split-resolution rows
                fronts = (1 + cfg.temporal_ratio * (t - 1)) * dims[i + 1] * px
            work[1 if i == split else side] = max(work[1 if i == split else side],
                                                  4 * dims[i + 1] * px + 2 * dims[i + 1] * px * 4)
            px *= 4
    cache[1] += 2 * 3 * px  # head conv: partial output sums (3 channels), see CausalConv3d._step_partial
    out_bytes = b * 3 * (1 + cfg.temporal_ratio * (t - 1)) * h * r * w * r * (es + (4 if tile else 0))
    if bands <= 1 or split is None:
        return int(b * (sum(cache) + max(work)) * es + out_bytes)
    frac = min(1.0, (math.ceil(rows / bands) + halo) / rows)
    frames = 1 + cfg.temporal_ratio * (t - 1)
    carried = (2 if bands > 2 else 1) * frames * carry  # a band holds what it got and what it passes on
    peak = max(cache[0] + work[0] + fronts, fronts + frac * (cache[1] + work[1]) + carried)
    return int(b * peak * es + out_bytes)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to call
        return None


def release_free_heap(device) -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`), on the CPU only.

    Frees nothing that is in use; it only makes the next allocations fault fresh pages (cheap next to a
    band of convolutions). Called at the points of a banded decode where the live set is smallest, so
    the holes the previous phase left behind do not add to the next phase's peak RSS."""
    if torch.device(device).type == "cpu":
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


def available_memory(device) -> Optional[int]:
    """Bytes that can still be allocated on `device`: CUDA free memory, or MemAvailable on CPU (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def pick_tile(cfg: WanVAEConfig, latent_shape, dtype, avail: int) -> Optional[tuple[int, int]]:
    """The largest square tile (latent px, overlap = tile/4) whose decode fits in `avail` bytes."""
    h, w = latent_shape[-2:]
    size = max(h, w)
    while size >= 8:
        if estimate_decode_bytes(cfg, latent_shape, dtype, tile=size) <= avail:
            return size, max(1, size // 4)
        size = size * 3 // 4
    return None


# ----------------------------------------------------------------------------------------------------
# Latent normalisation (ComfyUI latent_formats.Wan21; official WanVAE scale)
# ----------------------------------------------------------------------------------------------------
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def _stats(z: torch.Tensor):
    if z.ndim < 2 or z.shape[1] != 16:
        raise ValueError(f"Wan2.1 latent normalisation needs 16 channels on dim 1, got shape {tuple(z.shape)}")
    shape = (1, 16) + (1,) * (z.ndim - 2)
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32, device=z.device).view(shape)
    std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float32, device=z.device).view(shape)
    return mean, std


def normalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> the model's space: (z - mean) / std (ComfyUI Wan21.process_in)."""
    mean, std = _stats(z)
    return ((z.float() - mean) / std).to(z.dtype)


def denormalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Model space -> raw VAE latent: z * std + mean (ComfyUI Wan21.process_out)."""
    mean, std = _stats(z)
    return (z.float() * std + mean).to(z.dtype)


# ----------------------------------------------------------------------------------------------------
# Config detection, loading, random init
# ----------------------------------------------------------------------------------------------------
def _need(sd: dict, key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: not a Wan2.1 VAE: key {key!r} is missing")
    return sd[key]


def detect_config(sd: dict, source: str = "state dict") -> WanVAEConfig:
    """Derive the config from tensor shapes (prefix already stripped)."""
    if WAN22_KEY in sd:
        raise CheckpointError(f"{source}: this is a Wan2.2 VAE (key {WAN22_KEY!r}); only the Wan2.1 VAE "
                              f"(16 latent channels) is supported")
    w = _need(sd, "encoder.conv1.weight", source)
    if w.ndim != 5:
        raise CheckpointError(f"{source}: encoder.conv1.weight has shape {tuple(w.shape)}, expected a 5-D conv3d weight")
    dim, in_ch = int(w.shape[0]), int(w.shape[1])
    z_dim = int(_need(sd, "conv2.weight", source).shape[0])
    idx = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    levels, cur, tds = [], [], []
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "resample.1.weight" in sd:
            levels.append(cur)
            cur = []
            tds.append(p + "time_conv.weight" in sd)
        elif p + "residual.2.weight" in sd:
            cur.append(int(sd[p + "residual.2.weight"].shape[0]))
        else:
            raise CheckpointError(f"{source}: encoder.downsamples.{i} is neither a residual block nor a resample "
                                  f"(no {p}residual.2.weight / {p}resample.1.weight); not a Wan2.1 VAE layout")
    levels.append(cur)
    if not levels[0] or any(len(lv) != len(levels[0]) for lv in levels):
        raise CheckpointError(f"{source}: uneven residual blocks per level {[len(lv) for lv in levels]}")
    if any(c % dim for lv in levels for c in lv):
        raise CheckpointError(f"{source}: channel counts {levels} are not multiples of dim {dim}")
    return WanVAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(lv[-1] // dim for lv in levels),
                        num_res_blocks=len(levels[0]), temporal_downsample=tuple(tds), in_channels=in_ch)


def _strip(sd: dict, source: str) -> dict:
    try:
        sd, prefix = strip_prefix(sd, ANCHOR, ("first_stage_model.", "vae."))
    except KeyError:
        keys = list(sd)
        if any(k.endswith(h) for k in keys for h in DIT_HINT_KEYS):
            hint = ("it looks like a Wan DiT (diffusion model) checkpoint (has e.g. 'head.modulation' / "
                    "'blocks.0.self_attn.q.weight'); load it with the diffusion model loader, and pick the VAE file "
                    "(Wan2.1_VAE.pth or wan_2.1_vae.safetensors) here")
        elif any(k.startswith("decoder.mid_block.") or ".mid_block." in k for k in keys):
            hint = "it looks like a diffusers-format AutoencoderKLWan; use the official/ComfyUI single-file VAE"
        else:
            hint = f"first keys: {', '.join(keys[:5]) or '(none)'}"
        raise CheckpointError(f"{source}: not a Wan2.1 VAE: key {ANCHOR!r} not found under any prefix; {hint}") from None
    if prefix:
        logger.info("Wan VAE %s: stripped key prefix %r", source, prefix)
    return sd


def load_wan_vae(path, dtype: Optional[torch.dtype] = None, device="cpu") -> WanVAE:
    """Load an official `.pth` or ComfyUI `.safetensors` Wan2.1 VAE (optionally prefixed).

    `dtype` None keeps the file's dtype (a file with mixed float dtypes is unified to its most common one)."""
    path = Path(path)
    source = str(path)
    sd, _meta = load_file(path)
    sd = _strip(sd, source)
    cfg = detect_config(sd, source)
    if dtype is None:
        counts: dict = {}
        for v in sd.values():
            if v.is_floating_point():
                counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
        if len(counts) > 1:
            dtype = max(counts, key=counts.get)
            logger.info("Wan VAE %s: mixed dtypes %s; using %s for all", source, sorted(map(str, counts)), dtype)
    sd = convert_dtype(sd, dtype)
    model = build_and_load(lambda: WanVAE(cfg), sd, source).tap_major_()
    model.source = source
    logger.info("Wan VAE loaded from %s: dim %d, z %d, dtype %s", source, cfg.dim, cfg.z_dim, model.dtype)
    return model.to(device)


def random_wan_vae(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device="cpu") -> WanVAE:
    """A VAE with seeded random weights (every tensor randomised, incl. gammas and the attention proj)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Wan VAE preset {preset!r}; expected one of {sorted(PRESETS)}")
    with torch.device("meta"):
        model = WanVAE(PRESETS[preset])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("gamma"):
            t = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("bias"):
            t = 0.05 * torch.randn(v.shape, generator=g)
        else:
            fan_in = math.prod(v.shape[1:])
            t = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
        sd[k] = t.to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tap_major_()
    model.source = f"random:{preset}"
    return model.eval().to(device)
