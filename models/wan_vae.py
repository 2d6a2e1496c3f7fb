"""Wan2.1 causal 3D video VAE: official checkpoint layout, a frame-streaming encoder/decoder, loading.

Reads top to bottom: config + presets, the streaming state, the causal conv, blocks (residual,
attention, resample) with the official parameter names, `Encoder3d`/`Decoder3d` (each owns its
per-frame walk: the only place the layer order is written), `WanVAE` (encode / decode and the public
streaming API `init_state` / `encode_step` / `decode_step`), latent normalisation, loading, random init.
The engines live beside it and use only that API: row bands (`wan_vae_bands.py`), memory planning
(`wan_vae_plan.py`), spatial tiles (`wan_vae_tiles.py`), frame layout and the sub-pixel upsampling
(`wan_vae_layout.py`); `compiled/export.py` traces `decode_step` / `encode_step`.

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

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import CheckpointError
from ..core.progress import Progress
from ..fused.ops import rms_norm_cf
from . import wan_vae_bands, wan_vae_plan, wan_vae_tiles, wan_vae_winograd
from .loading import build_and_load, convert_dtype, load_file, strip_prefix
from .wan_vae_layout import subpixel_kernels, to_layout, upsample2x_conv3x3
from .wan_vae_winograd import TapSum

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
# Streaming state
# ----------------------------------------------------------------------------------------------------
class CausalState:
    """The causal caches of one streamed encode or decode (one per spatial tile or row band).

    Each stateful module has a slot of three entries: a causal conv its last two input frames (or, for a
    narrowing conv, partial output sums) and what a time pair's second frame still needs (see
    `CausalConv3d.pair_step`), a temporal downsampler its kept and its pending frame; None is "no frame
    yet" (zeros). `channels_last`: the layout frames run in (see `wan_vae_layout`);
    `started`: a latent frame has been decoded (the first one skips the temporal upsampling)."""

    def __init__(self, channels_last: bool = False):
        self.slots: dict[int, list] = {}
        self.channels_last = channels_last
        self.started = False
        self.scratch: dict = {}  # reused scratch tensors of the stream's Winograd convs (wan_vae_winograd)

    def slot(self, module: nn.Module) -> list:
        return self.slots.setdefault(id(module), [None, None, None])

    # The caches as explicit tensors, for graphs that carry them as inputs and outputs (compiled/export.py).
    def load_flat(self, modules: list, values: tuple) -> None:
        """Fill the slots of `modules` (`WanVAE.state_modules` order) from 2 tensors each, at a chunk
        boundary: a temporal downsampler then holds its kept frame and no pending one."""
        for i, m in enumerate(modules):
            self.slots[id(m)] = [values[2 * i], None if isinstance(m, Resample) else values[2 * i + 1], None]

    def flat(self, modules: list, zeros: Callable[[int, int], torch.Tensor]) -> tuple:
        """The slots of `modules` as 2 tensors each; `zeros(i, j)` stands for an empty entry j of module i
        (a zero frame adds exactly 0 to a causal conv's tap sum)."""
        out = []
        for i, m in enumerate(modules):
            s = self.slot(m)
            if s[2] is not None:
                raise RuntimeError(f"{type(m).__name__} holds a Winograd pair's pending sum at a chunk boundary: "
                                   "only levels with whole pairs per chunk may set CausalConv3d.pairs")
            out += [s[j] if s[j] is not None else zeros(i, j) for j in (0, 1)]
        return tuple(out)


# ----------------------------------------------------------------------------------------------------
# The causal conv and the norm
# ----------------------------------------------------------------------------------------------------
class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time (zeros in front), run one frame at a time with a 2-frame state.

    `pairs` (set by the encoder/decoder on the residual convs of levels that get their frames in whole
    pairs per chunk, see `mark_pairs`): in fp32/fp64 inference, consecutive frames (A, B) = (t, t+1), t
    odd, share their time taps by Winograd F(2,3) over time (`pair_step`): 4 frame convs per pair
    instead of 6, same accumulation precision, the state holding B's partial output sum in between."""

    pairs = False

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

    def rows_in(self, n: int) -> int:
        """Rows of context its input needs for `n` rows of context at its output (row-band hook)."""
        return n + self.kernel_size[1] // 2

    def pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """A kernel-1 conv on one frame x [B, C, H, W] (shortcuts, quant convs)."""
        return F.conv2d(x, self.weight[:, :, 0], self.bias)

    def conv2d(self, x: torch.Tensor, w: torch.Tensor, bias, padding, ws: Optional[dict]) -> torch.Tensor:
        """One 2-D conv of a frame with a time tap (or a sum of taps) `w`: `F.conv2d`, or on the CPU in
        fp32/fp64 inference, for a 3x3 kernel with >= 160 input channels and >= 32x32 output pixels, Winograd
        F(2x2, 3x3) (`wan_vae_winograd`: 2.25x fewer multiplies; below those sizes its transforms cost
        more than it saves). `ws`: the stream's scratch (`CausalState.scratch`)."""
        if w.shape[2:] == (3, 3) and not torch.is_grad_enabled():
            ph, pw = (padding, padding) if isinstance(padding, int) else padding
            px = (x.shape[2] + 2 * ph - 2) * (x.shape[3] + 2 * pw - 2)
            if wan_vae_winograd.applies(w.shape[1], px, x.dtype, x.device.type):
                return wan_vae_winograd.conv3x3(x, w, bias, padding, ws)
        return F.conv2d(x, wan_vae_winograd.kernel(w), bias, padding=padding)

    def taps(self, frames: list, bias: bool = True, padding=None, ws: Optional[dict] = None) -> torch.Tensor:
        """sum_k W[:, :, k] * frames[k] (+ bias); None frames are zero and skipped. frames: 3 x [B,C,H,W].
        `padding`: spatial zero padding (default: the layer's own on both axes); `ws`: scratch (`conv2d`)."""
        w, p = self.weight, (self.pad_s if padding is None else padding)
        cur = frames[-1]
        if cur.dtype != torch.float32 and sum(f is not None for f in frames) > 1:
            # Low precision: one conv over the channel-stacked taps keeps the sum inside the conv's
            # fp32 accumulator instead of rounding each partial sum to bf16/fp16.
            ks = [k for k, f in enumerate(frames) if f is not None]
            wk = torch.cat([w[:, :, k] for k in ks], dim=1)
            return self.conv2d(torch.cat([frames[k] for k in ks], dim=1), wk, self.bias if bias else None, p, ws)
        out = self.conv2d(cur, w[:, :, 2], self.bias if bias else None, p, ws)  # (B, O, H, W)
        for k in (1, 0):
            if frames[k] is not None:
                out += self.conv2d(frames[k], w[:, :, k], None, p, ws)
        return out

    def step(self, x: torch.Tensor, st: CausalState, keep: bool = True) -> torch.Tensor:
        """One frame through the causal conv; the state keeps the last two inputs (by reference).

        `keep=False` on a layer's final frame releases its cache at once."""
        s = st.slot(self)
        if self.out_channels < self.in_channels:
            return self.partial_step(x, s, keep, ws=st.scratch)
        ws = st.scratch
        out = self.pair_step(x, s, keep, ws=ws) if self.pairs_apply(x, s) else self.taps([s[0], s[1], x], ws=ws)
        if keep:
            s[0], s[1] = s[1], x
        else:
            s[0] = s[1] = None
        return out

    def pairs_apply(self, x: torch.Tensor, s: list) -> bool:
        """Whether this frame runs as half of a Winograd pair: a pair conv, fp32/fp64 inference, and a
        previous frame to pair with (the stream's first frame has one tap only; s[1] is that frame, or in
        the partial-sum form of a narrowing conv the next frame's sum, set from the first frame on)."""
        return (self.pairs and s[1] is not None and x.dtype in (torch.float32, torch.float64)
                and not torch.is_grad_enabled())

    def pair_step(self, x: torch.Tensor, s: list, keep: bool, padding=None, ws: Optional[dict] = None,
                  own: bool = False) -> torch.Tensor:
        """Winograd F(2,3) over time for output frames A = t, B = t+1 (t odd) of inputs d0..d3 =
        x[t-2..t+1] and taps g0..g2 (each a 2-D conv):
            m1 = (d0 - d2) g0,  m2 = (d1 + d2) (g0 + g1 + g2)/2,  m3 = (d2 - d1) (g0 - g1 + g2)/2,
            m4 = (d1 - d3) g2;  A = m1 + m2 + m3,  B = m2 - m3 - m4.
        At A (state [d0, d1], x = d2) three convs give A, and m2 - m3 (+ bias) waits in s[2] for B; at B
        (state [d1, d2], x = d3) one conv finishes it. The state's frames are never written to (a compiled
        step gets them as graph inputs), unless `own`: the caller owns them (the band engine), and the frame
        this step drops (d0 at A, d1 at B) then holds the input differences. s: the slot, [d_old, d_prev,
        pending B sum]."""
        w, p = self.weight, (self.pad_s if padding is None else padding)
        sub = (lambda a, b: a.sub_(b)) if own else torch.sub
        if s[2] is not None:  # B
            pend, s[2] = s[2], None
            return pend.sub_(self.conv2d(sub(s[0], x), w[:, :, 2], None, p, ws))
        c = torch.neg(x) if s[0] is None else sub(s[0], x)  # d0 - d2 (d0 = 0 at the stream's second frame)
        out = self.conv2d(c, w[:, :, 0], None, p, ws)
        pend = self.conv2d(torch.add(s[1], x, out=c), TapSum(w, 1.0), self.bias, p, ws)
        out += pend
        m3 = self.conv2d(torch.sub(x, s[1], out=c), TapSum(w, -1.0), None, p, ws)
        del c
        out += m3
        if keep:
            s[2] = pend.sub_(m3)
        return out

    def partial_step(self, x: torch.Tensor, s: list, keep: bool, padding=None,
                     ws: Optional[dict] = None) -> torch.Tensor:
        """Narrowing convs (the decoder head, 96 -> 3) keep partial output sums instead of inputs:
        s = [W1 x[t-1] + W0 x[t-2], W0 x[t-1]] in fp32, i.e. 2 x 3 channels instead of 2 x 96 per pixel."""
        w, p = self.weight, (self.pad_s if padding is None else padding)
        if self.pairs_apply(x, s):
            return self.partial_pair_step(x, s, keep, p, ws)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 sums for bf16/fp16, fp64 for fp64
        out = self.conv2d(x, w[:, :, 2], self.bias, p, ws)
        if s[0] is not None:
            out = (out.to(acc) + s[0]).to(x.dtype)
        if keep:
            nxt = self.conv2d(x, w[:, :, 1], None, p, ws).to(acc)
            if s[1] is not None:
                nxt += s[1]
            s[0], s[1] = nxt, self.conv2d(x, w[:, :, 0], None, p, ws).to(acc)
        else:
            s[0] = s[1] = None
        return out

    def partial_pair_step(self, x: torch.Tensor, s: list, keep: bool, p, ws: Optional[dict]) -> torch.Tensor:
        """`partial_step` for a Winograd pair A = t, B = t+1 (t odd): the pair's contributions to the output
        frames t..t+3 are the linear convolution (x_A, x_B) * (g2, g1, g0) = (c0, c1, c2, c3), and Toom-Cook
        at 0, 1, -1, inf gives them from 4 frame convs instead of 6: c0 = g2 x_A, c3 = g0 x_B,
        e1 = (x_A + x_B) (g0 + g1 + g2)/2, em = (x_A - x_B) (g0 - g1 + g2)/2, c1 = e1 - em - c3,
        c2 = e1 + em - c0. A (s = [S_t, S_t+1]) costs one conv and holds x_A and c0 in s[2]; B three;
        afterwards s = [S_t+2, S_t+3] = [c2, c3] as in `partial_step`."""
        w = self.weight
        if s[2] is None:  # A
            c0 = self.conv2d(x, w[:, :, 2], None, p, ws)
            out = torch.add(s[0], c0)
            if self.bias is not None:
                out += self.bias.view(1, -1, 1, 1)
            s[0], s[2] = None, ((x, c0) if keep else None)
            if not keep:
                s[1] = None
            return out.to(x.dtype)
        (xa, c0), s[2] = s[2], None
        c3 = self.conv2d(x, w[:, :, 0], None, p, ws)
        e1 = self.conv2d(torch.add(xa, x), TapSum(w, 1.0), None, p, ws)
        em = self.conv2d(xa.sub_(x), TapSum(w, -1.0), None, p, ws)
        del xa
        out = torch.add(s[1], e1).sub_(em).sub_(c3)  # S_t+1 + c1
        if self.bias is not None:
            out += self.bias.view(1, -1, 1, 1)
        if keep:
            s[0], s[1] = e1.add_(em).sub_(c0), c3
        else:
            s[0] = s[1] = None
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Channel-first RMS norm holding `gamma` with the official shape ((C,1,1,1) video, (C,1,1) image)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))


def norm_silu(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # RMS_norm of the official code: F.normalize over channels (eps clamps the L2 norm at 1e-12) *
    # sqrt(C) * gamma, then SiLU; the fused-kernel slot lives in fused.ops.
    return rms_norm_cf(x, norm.gamma.view(-1, 1, 1), None, silu=True)


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

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut branch of one frame (or of some of its rows)."""
        return self.shortcut.pointwise(x) if isinstance(self.shortcut, CausalConv3d) else x

    def rows_in(self, n: int) -> int:
        return self.residual[2].rows_in(self.residual[6].rows_in(n))

    def step(self, x: torch.Tensor, st: CausalState, keep: bool) -> torch.Tensor:
        r = self.residual
        h = r[2].step(norm_silu(r[0], x), st, keep)
        h = r[6].step(norm_silu(r[3], h), st, keep)
        h += self.skip(x)
        return h


def mark_pairs(layers) -> None:
    """Flag the convs of the residual blocks among `layers` as Winograd pair convs (`CausalConv3d.pairs`).
    Only for levels whose frames come in whole pairs per chunk (encoder: 4 or 2 frames per chunk;
    decoder: after a temporal upsampling): a pair then never spans two chunks, so the state holds no
    pending sum at a chunk boundary (`CausalState.flat`, the compiled steps)."""
    for layer in layers:
        if isinstance(layer, ResidualBlock):
            layer.residual[2].pairs = layer.residual[6].pairs = True


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention, per frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def step(self, x: torch.Tensor, st: CausalState = None, keep: bool = True) -> torch.Tensor:
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

    def __init__(self, dim: int, mode: str, up_dim: Optional[int] = None):
        super().__init__()
        self.mode = mode
        self.up = mode.startswith("upsample")
        if self.up:  # `up_dim`: the upsampling conv's width (Wan2.1 halves it; Wan2.2 keeps `dim`)
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, up_dim or dim // 2, 3, padding=1)])
        else:
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)])
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def rows_in(self, n: int) -> int:
        """Row-band hook: nearest x2 + 3x3 conv needs ceil((n + 1) / 2) input rows for n output rows of
        context; the zero row at the bottom + stride-2 3x3 conv needs 2n + 1."""
        return math.ceil((n + 1) / 2) if self.up else 2 * n + 1

    def spatial(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        conv = self.resample[1]
        x = to_layout(x, channels_last)  # upsample3d hands over channel slices of its time conv's output
        if self.up:
            # nearest-exact x2 then the 3x3 conv, in sub-pixel form (the official code upsamples in fp32
            # and casts back, which is exact: nearest only copies values)
            return upsample2x_conv3x3(x, conv.weight, conv.bias, self.subpixel_kernels(x.dtype, channels_last))
        return conv(F.pad(x, (0, 1, 0, 1)))  # ZeroPad2d((0,1,0,1)): right/bottom only

    def subpixel_kernels(self, dtype: torch.dtype, channels_last: bool) -> list:
        """The sub-pixel kernels of the upsampling conv, made once per weight version (eager; traced graphs
        rebuild them: inference tensors have no version counter, so an in-place patch would go unseen)."""
        w = self.resample[1].weight
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or w.is_meta or w.is_inference():
            return subpixel_kernels(w, dtype, channels_last)
        key = (w.data_ptr(), w._version, w.device, dtype, channels_last)
        cached = getattr(self, "_sp_cache", None)
        if cached is None or cached[0] != key:
            cached = self._sp_cache = (key, subpixel_kernels(w.detach(), dtype, channels_last))
        return cached[1]

    def up_time(self, x: torch.Tensor, st: CausalState, first: bool, keep: bool) -> list:
        """upsample3d's temporal part: 1 frame -> [frame] (first latent) or [frame 2i, frame 2i+1]."""
        if first:
            return [x]
        y = self.time_conv.step(x, st, keep)  # (B, 2C, H, W)
        c = x.shape[1]
        return [y[:, :c], y[:, c:]]

    def down_time(self, x: torch.Tensor, st: CausalState) -> Optional[torch.Tensor]:
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


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder: the per-frame walks
# ----------------------------------------------------------------------------------------------------
class FrameOps:
    """How a walk runs one layer on one frame; `key` names the layer ("conv1", "head", ("middle", k), or
    its index in `downsamples` / `upsamples`). These run whole frames; the row-band engine
    (`wan_vae_bands.BandOps`) runs the same walks on bands of rows."""

    def conv(self, key, conv: CausalConv3d, norm: Optional[RMSNorm], x, st: CausalState, keep: bool):
        return conv.step(x if norm is None else norm_silu(norm, x), st, keep)

    def block(self, key, block: nn.Module, x, st: CausalState, keep: bool):
        return block.step(x, st, keep)

    def spatial(self, key, layer: Resample, x, st: CausalState):
        return layer.spatial(x, st.channels_last)


WHOLE_FRAMES = FrameOps()


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
        n = cfg.temporal_ratio  # frames per chunk at each level: 4, then halved by each downsample3d
        for layer in layers:
            if isinstance(layer, Resample) and layer.mode == "downsample3d":
                n //= 2
            elif n >= 2:
                mark_pairs([layer])
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)])

    def walk(self, x, st: CausalState, keep: bool, ops: FrameOps = WHOLE_FRAMES, start: Optional[int] = None,
             stop: Optional[int] = None) -> Optional[torch.Tensor]:
        """One video frame through the encoder: the head's output, or None while a temporal downsampling
        waits for its second frame. A split after `downsamples[i]`: stop=i returns that layer's output,
        start=i+1 takes such a frame and runs the rest."""
        if start is None:
            x = ops.conv("conv1", self.conv1, None, x, st, keep)
            start = 0
        for i in range(start, len(self.downsamples)):
            layer = self.downsamples[i]
            if isinstance(layer, Resample):
                x = ops.spatial(i, layer, x, st)
                if layer.mode == "downsample3d":
                    x = layer.down_time(x, st)
                    if x is None:
                        return None
            else:
                x = ops.block(i, layer, x, st, keep)
            if i == stop:
                return x
        for k, layer in enumerate(self.middle):
            x = ops.block(("middle", k), layer, x, st, keep)
        return ops.conv("head", self.head[2], self.head[0], x, st, keep)


class Decoder3d(nn.Module):
    clamp_output = True  # frames clamped to [-1, 1] (the official decode); WanVAE.raw_output() turns it off

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
        ups = [k for k, layer in enumerate(layers) if isinstance(layer, Resample) and layer.mode == "upsample3d"]
        if ups:  # 2 or 4 frames per latent frame after the first temporal upsampling
            mark_pairs(layers[ups[0] + 1:])
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)])

    def walk(self, x, st: CausalState, first: bool, keep: bool, ops: FrameOps = WHOLE_FRAMES,
             start: Optional[int] = None, stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """One post-quant latent frame through the decoder, depth first (one frame per layer alive): yields
        its output frames in [-1, 1]. A split at an upsample3d `upsamples[i]`: stop=i yields the frames
        its time conv makes and goes no further; start=i takes such a frame into its spatial part."""
        if start is None:
            x = ops.conv("conv1", self.conv1, None, x, st, keep)
            for k, layer in enumerate(self.middle):
                x = ops.block(("middle", k), layer, x, st, keep)
            yield from self._walk_ups(0, x, st, first, keep, ops, stop, timed=False)
        else:
            yield from self._walk_ups(start, x, st, first, keep, ops, None, timed=True)

    def _walk_ups(self, i: int, x, st: CausalState, first: bool, keep: bool, ops: FrameOps,
                  stop: Optional[int], timed: bool) -> Iterator[torch.Tensor]:
        layers = self.upsamples
        for i in range(i, len(layers)):
            layer = layers[i]
            if not isinstance(layer, Resample):
                x = ops.block(i, layer, x, st, keep)
                continue
            if layer.mode == "upsample3d" and not timed:
                frames = layer.up_time(x, st, first, keep)
                if i == stop:
                    yield from frames
                    return
                del x
                for j, f in enumerate(frames):  # a layer's cache is released after its very last frame
                    yield from self._walk_ups(i, f, st, first, keep or j < len(frames) - 1, ops, stop, True)
                return
            timed = False
            x = ops.spatial(i, layer, x, st)
        x = ops.conv("head", self.head[2], self.head[0], x, st, keep)  # (B, 3, H, W)
        yield x.clamp_(-1.0, 1.0) if self.clamp_output else x


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
FrameCallback = Callable[[int, torch.Tensor], None]


class WanVAE(nn.Module):
    """The Wan2.1 VAE (`TWINFLOW_VAE`). Video in [-1, 1] as [B, 3, T, H, W]; raw latents [B, z, T', H/8, W/8].

    `channels_last`: the frame layout of its streams: None = channels-last on the CPU, NCHW elsewhere
    (see `wan_vae_layout`); False runs the CUDA engine's NCHW layout on the CPU (tests)."""

    def __init__(self, cfg: WanVAEConfig = PRESETS["wan2.1"]):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # quant conv: mu | log_var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # post-quant conv
        self.decoder = Decoder3d(cfg)
        self.source = ""
        self.channels_last: Optional[bool] = None

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

    def latent_frames(self, frames: int) -> int:
        """1+4k video frames -> 1+k latent frames (surplus frames are dropped, as ComfyUI/official)."""
        return 1 + (frames - 1) // self.cfg.temporal_ratio

    def video_frames(self, latent_frames: int) -> int:
        return 1 + self.cfg.temporal_ratio * (latent_frames - 1)

    @contextmanager
    def raw_output(self):
        """Decode without the final clamp to [-1, 1] inside this block: ComfyUI's Wan VAE returns raw values
        (its process_output clamps after its tiled decode has blended them; `wan_vae_tiles.decode_tiled_comfy`)."""
        prev = self.decoder.clamp_output
        self.decoder.clamp_output = False
        try:
            yield self
        finally:
            self.decoder.clamp_output = prev

    # ---- the streaming API (bands, tiles, compiled/export.py) -----------------------------------------
    def init_state(self, channels_last: Optional[bool] = None) -> CausalState:
        """A fresh state for one stream (an encode or a decode; one per tile or row band)."""
        if channels_last is None:
            channels_last = self.device.type == "cpu" if self.channels_last is None else self.channels_last
        return CausalState(channels_last)

    def encode_step(self, frame: torch.Tensor, st: CausalState, last: bool = False) -> Optional[torch.Tensor]:
        """Push one video frame [B, 3, H, W] (model dtype and device) through the encoder: the latent mean
        [B, z, H/8, W/8] it completes, or None (every latent but the first takes 4 frames). `last`: the
        stream's final frame (caches are released as it goes). Runs under the caller's no-grad mode."""
        y = self.encoder.walk(to_layout(frame, st.channels_last), st, keep=not last)
        return None if y is None else self.encode_mean(y)

    def encode_mean(self, y: torch.Tensor) -> torch.Tensor:
        """The latent mean of one encoder output frame: only the mu half of the quant conv (log_var is never
        used at inference)."""
        z = self.cfg.z_dim
        return F.conv2d(y, self.conv1.weight[:z, :, 0], self.conv1.bias[:z])

    def decode_step(self, z: torch.Tensor, st: CausalState, last: bool = False,
                    stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Push one raw latent frame [B, z, h, w] (model dtype and device) through the decoder; yields its
        output frames [B, 3, 8h, 8w] in [-1, 1] (1 for the stream's first latent, then 4), each as soon as
        it is ready: consume them all before the next step. `last`: the stream's final latent (caches are
        released as it goes). `stop`: yield the frames entering that upsample3d layer's spatial part
        instead (the front half of a banded decode)."""
        first, st.started = not st.started, True
        x = self.conv2.pointwise(to_layout(z, st.channels_last))
        return self.decoder.walk(x, st, first=first, keep=not last, stop=stop)

    def state_modules(self, part: str) -> list:
        """The modules of `part` ("encoder" | "decoder") with a slot in a `CausalState`, in a fixed order:
        3-tap causal convs and temporal downsamplers (their time conv uses the downsampler's slot)."""
        root = self.encoder if part == "encoder" else self.decoder
        down = {id(m.time_conv) for m in root.modules() if isinstance(m, Resample) and m.mode == "downsample3d"}
        return [m for m in root.modules()
                if (isinstance(m, CausalConv3d) and m.weight.shape[2] == 3 and id(m) not in down)
                or (isinstance(m, Resample) and m.mode == "downsample3d")]

    # Row-band hooks (`wan_vae_bands`): where the encoder/decoder may be split into a banded and a whole part.
    def encode_split(self) -> int:
        """Index in `encoder.downsamples` of the first spatial downsampling: the layers up to and including
        it run in bands (the full-resolution convs hold most of the encoder's memory)."""
        return next(i for i, m in enumerate(self.encoder.downsamples) if isinstance(m, Resample))

    def decode_split(self) -> Optional[tuple[int, int]]:
        """(index in `decoder.upsamples` of the last upsample3d, its input's scale over the latent), or None.
        Everything after its time conv is local in space (3x3 convs, the per-pixel RMS norm, SiLU, nearest
        upsampling: no attention, no other global op), so it can run in row bands."""
        ups = self.decoder.upsamples
        idx = [i for i, m in enumerate(ups) if isinstance(m, Resample) and m.mode == "upsample3d"]
        if not idx:
            return None
        return idx[-1], 2 ** sum(1 for m in ups[:idx[-1]] if isinstance(m, Resample))

    # ---- encode / decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, video: torch.Tensor, *, bands: Optional[int] = None) -> torch.Tensor:
        """Encode video [B, 3, T, H, W] in [-1, 1] to the raw latent mean [B, z, 1+(T-1)//4, H/8, W/8].

        No sampling and no normalisation (ComfyUI's LATENT convention). Frames beyond the last 1+4k
        are dropped, with a log line. `bands`: exact row bands for the full-resolution stage (see
        `wan_vae_bands.encode_banded`): None = auto (`wan_vae_bands.encode_auto_bands`), 1 = whole frames."""
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
        out = torch.empty(b, self.cfg.z_dim, self.latent_frames(t), h // r, w // r, device=self.device,
                          dtype=self.dtype)
        bands = wan_vae_bands.encode_auto_bands(video.shape) if bands is None else bands
        plan = wan_vae_bands.encode_band_rows(self, h // 2, bands)  # split rows: after the first x2 downsampling
        if len(plan) > 1:
            return wan_vae_bands.encode_banded(self, x, keep, plan, out)
        st, n = self.init_state(), 0
        with Progress(total=keep, desc="Wan VAE encode") as bar:
            for i in range(keep):
                mu = self.encode_step(x[:, :, i], st, last=i == keep - 1)
                if mu is not None:
                    out[:, :, n] = mu
                    n += 1
                bar.update(1)
        assert n == out.shape[2], (n, out.shape)
        return out

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
        st, n = self.init_state(), 0
        with Progress(total=t, desc="Wan VAE decode") as bar:
            for i in range(t):
                for frame in self.decode_step(z[:, :, i], st, last=i == t - 1):
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
            bands: exact row bands of the full-resolution half (see `wan_vae_bands.decode_banded`): None =
                auto (`wan_vae_plan.auto_bands`; more if memory needs it), 1 = whole frames (most memory;
                the only mode that streams frames to `callback`).
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
            tile = wan_vae_tiles.check_tile(tile)
            wan_vae_plan.check_tile_fits(self, z.shape, tile)
        else:
            bands, tile = wan_vae_plan.plan_decode(self, z.shape, tiling, bands)
        if out is None:
            out = torch.empty(shape, device=self.device, dtype=self.dtype)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, decode produces {shape}")
        if tile is not None and (tile[0] < h or tile[0] < w):
            if callback is not None:
                raise ValueError("a per-frame callback needs an untiled decode (tiles finish one at a time)")
            return wan_vae_tiles.decode_tiled(self, z.to(device=self.device, dtype=self.dtype), tile, out)
        if bands is not None and bands > 1:
            if callback is not None:
                raise ValueError("a per-frame callback needs bands=1 (bands finish one at a time)")
            if self.decode_split() is None:
                raise ValueError("this VAE has no temporal upsampling layer to split at; decode with bands=1")
            return wan_vae_bands.decode_banded(self, z.to(device=self.device, dtype=self.dtype), bands, out)
        for n, frame in self.iter_decode(z):
            out[:, :, n] = frame
            if callback is not None:
                callback(n, out[:, :, n])
        return out

    def estimate_decode_bytes(self, latent_shape, tile: Optional[int] = None, dtype=None, bands: int = 1) -> int:
        """Peak bytes a decode of `latent_shape` [B, z, T, h, w] needs beyond the weights (see docs/vae.md)."""
        return wan_vae_plan.estimate_decode_bytes(self.cfg, latent_shape, dtype or self.dtype, tile, bands=bands,
                                                  halo=wan_vae_bands.decode_halo(self), device_type=self.device.type)


# ----------------------------------------------------------------------------------------------------
# Latent normalisation (ComfyUI latent_formats.Wan21; official WanVAE scale)
# ----------------------------------------------------------------------------------------------------
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def latent_stats(z: torch.Tensor, mean: tuple, std: tuple, family: str):
    """Per-channel latent mean/std as tensors broadcastable to `z` ([B, C, ...]); `family` names the VAE in the
    error for a latent with the wrong channel count."""
    c = len(mean)
    if z.ndim < 2 or z.shape[1] != c:
        raise ValueError(f"{family} latent normalisation needs {c} channels on dim 1, got shape {tuple(z.shape)}")
    shape = (1, c) + (1,) * (z.ndim - 2)
    return (torch.tensor(mean, dtype=torch.float32, device=z.device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=z.device).view(shape))


def _stats(z: torch.Tensor):
    return latent_stats(z, WAN21_LATENT_MEAN, WAN21_LATENT_STD, "Wan2.1")


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
    sd, _meta = load_file(path)
    return wan_vae_from_state_dict(sd, str(path), dtype, device)


def wan_vae_from_state_dict(sd: dict, source: str, dtype: Optional[torch.dtype] = None, device="cpu") -> WanVAE:
    """`load_wan_vae` on a state dict already read from `source` (the family dispatcher reads files once)."""
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
    return seeded_weights(model, seed, dtype, f"random:{preset}").to(device)


def seeded_weights(model: "WanVAE", seed: int, dtype: torch.dtype, source: str) -> "WanVAE":
    """Fill a meta-device VAE of either family with seeded random weights (gammas near 1, small biases, the
    rest scaled by fan-in), in state-dict order; eval mode, taps laid out for the CPU."""
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
    model.source = source
    return model.eval()
