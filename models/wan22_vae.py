"""Wan2.2 VAE (TI2V-5B): 48 latent channels, 4x16x16 compression; official layout, streaming, loading.

Reads top to bottom: config + presets, the 2x2 patchify, the parameter-free shortcuts (`AvgDown`,
`DupUp`), the residual down/up blocks, how a walk runs a shortcut on whole frames or a row band
(`Frames22`, `BandOps22`), `Encoder22`/`Decoder22` (each owns its per-frame walk), `Wan22VAE`, latent
normalisation, the diffusers key mapping, config detection, loading, random init.

The Wan2.2 VAE is the Wan2.1 VAE's causal network (same causal conv, RMS norm, residual and attention
blocks, the same per-frame chunk rules of the temporal resamplers: all reused from `wan_vae`) with:
  * a 2x2 patchify of the RGB frames into 12 channels in front of the encoder (and its inverse after
    the decoder), so an 8x VAE compresses 16x in space;
  * stages wrapped in residual blocks whose shortcut has no weights: the encoder averages groups of
    space(-time)-to-depth channels (`AvgDown`), the decoder duplicates channels into depth-to-space
    (-time) (`DupUp`); the decoder's upsampling conv keeps its width (Wan2.1 halves it);
  * separate encoder (160) and decoder (256) base widths.
`Wan22VAE` subclasses `WanVAE` and keeps its public streaming API (`init_state`, `encode_step`,
`decode_step`, `iter_decode`, `encode`/`decode`, spatial tiles and the memory plan), so nodes and samplers
use it as a `TWINFLOW_VAE` with 48-channel latents at 1/16 of the frame size. Exact row bands run through
`wan_vae_bands`' engine (`BandOps22` adds the stage shortcuts): the encode's first stage and the
decode's back half, picked automatically as for Wan2.1 (`auto_bands`, with this VAE's banded memory
estimate). `compiled/export.py` exports its decode and encode steps as it does Wan2.1's.

Per-frame forms of the official chunk rules (`wan/modules/vae2_2.py`, mirrored by diffusers):
  * `AvgDown` with a time factor pairs input frames (2k-1, 2k) like the stride-2 time conv next to it;
    the first frame is paired with a zero frame (the official code pads a 1-frame chunk in front);
  * `DupUp` with a time factor makes frames (2i, 2i+1) from channel groups t=0/1; on the very first
    latent frame only t=1 is kept (the official `first_chunk` drops the leading frame).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import CheckpointError
from ..core.progress import Progress
from . import wan_vae, wan_vae_bands, wan_vae_plan
from .loading import build_and_load, convert_dtype, load_file, strip_prefix
from .wan_vae import (AttentionBlock, CausalConv3d, CausalState, FrameOps, Resample, ResidualBlock, RMSNorm,
                      WanVAE, latent_stats, mark_pairs)
from .wan_vae_layout import to_layout

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wan22VAEConfig:
    """Structure of the Wan2.2 VAE (names follow the official `WanVAE` of vae2_2.py)."""

    dim: int = 160  # encoder base width
    dec_dim: int = 256  # decoder base width
    z_dim: int = 48
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple = (False, True, True)  # encoder; the decoder uses the reverse
    in_channels: int = 3  # RGB; the network itself sees in_channels * patch_size**2
    patch_size: int = 2

    @property
    def spatial_ratio(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


PRESETS: dict[str, Wan22VAEConfig] = {
    "wan2.2": Wan22VAEConfig(),
    # 48 latent channels like the real model (LATENTs interoperate with a tiny Wan2.2 DiT); small widths,
    # different encoder/decoder widths so both are exercised.
    "tiny": Wan22VAEConfig(dim=8, dec_dim=12),
}
# The `random:<name>` VAE names of this family -> its preset (the Wan2.1 VAE's names are `wan_vae.PRESETS`' keys);
# loaders, the compile plan and the memory preflight read this one table.
RANDOM_NAMES = {"wan2.2-tiny": "tiny", "wan2.2": "wan2.2"}

WAN22_KEY = wan_vae.WAN22_KEY  # "decoder.upsamples.0.upsamples.0.residual.2.weight": ComfyUI's detection key
DIFFUSERS_ANCHOR = "decoder.mid_block.resnets.0.norm1.gamma"
DIFFUSERS_WAN22_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"  # Wan2.1 diffusers files have no resnets here


# ----------------------------------------------------------------------------------------------------
# Patchify (official `rearrange(x, "b c (h q) (w r) -> b (c r q) h w")`, per frame)
# ----------------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*p*p, H/p, W/p]; channel c*p*p + r*p + q holds pixel (p*h + q, p*w + r)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, q, w, r)
    return x.permute(0, 1, 5, 3, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, C*p*p, h, w] -> [B, C, h*p, w*p]."""
    b, cpp, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, h, w)  # (B, C, r, q, h, w)
    return x.permute(0, 1, 4, 3, 5, 2).reshape(b, cpp // (p * p), h * p, w * p)


# ----------------------------------------------------------------------------------------------------
# The weightless shortcuts
# ----------------------------------------------------------------------------------------------------
class AvgDown(nn.Module):
    """Shortcut of a down block: space(-time)-to-depth, then the mean of consecutive channel groups.

    Channels are ordered (c, t, i, j) (i, j: the row/column offset in the factor_s x factor_s cell, t: the
    frame in the pair), as the official AvgDown3D orders them."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if in_dim * factor % out_dim:
            raise ValueError(f"AvgDown: {in_dim} channels x factor {factor} is not a multiple of {out_dim}")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor // out_dim

    def frame(self, prev: Optional[torch.Tensor], cur: torch.Tensor) -> torch.Tensor:
        """The shortcut frame of input frames (prev, cur) (prev only with a time factor; None = zeros)."""
        fs = self.factor_s
        u = F.pixel_unshuffle(cur, fs) if fs > 1 else cur  # (B, C*fs*fs, H/fs, W/fs), channels (c, i, j)
        b, _, h, w = u.shape
        if self.factor_t == 2:
            v = torch.zeros_like(u) if prev is None else (F.pixel_unshuffle(prev, fs) if fs > 1 else prev)
            c = cur.shape[1]
            u = torch.stack((v.reshape(b, c, fs * fs, h, w), u.reshape(b, c, fs * fs, h, w)), 2)  # (B, C, 2, fs², h, w)
        return u.reshape(b, self.out_dim, self.group, h, w).mean(2)


class DupUp(nn.Module):
    """Shortcut of an up block: each input channel repeated, then depth-to-space(-time) (official DupUp3D).

    Output channel o of frame t at cell offset (i, j) is input channel (o*ft*fs² + t*fs² + i*fs + j) // repeats."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if out_dim * factor % in_dim:
            raise ValueError(f"DupUp: {out_dim} channels x factor {factor} is not a multiple of {in_dim}")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor // in_dim
        self._index: dict = {}

    def index(self, t: int, device) -> torch.Tensor:
        key = (t, str(device))
        if key not in self._index:
            ss, ft = self.factor_s ** 2, self.factor_t
            k = torch.arange(self.out_dim).view(-1, 1) * ft * ss + t * ss + torch.arange(ss).view(1, -1)
            self._index[key] = (k.flatten() // self.repeats).to(device)
        return self._index[key]

    def frame(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Output frame t (of factor_t) of input frame x [B, C, H, W] -> [B, out, H*fs, W*fs]."""
        return F.pixel_shuffle(x.index_select(1, self.index(t, x.device)), self.factor_s)


# ----------------------------------------------------------------------------------------------------
# Residual stages (official names: downsamples.{j} / upsamples.{j} inside each stage)
# ----------------------------------------------------------------------------------------------------
class DownBlock(nn.Module):
    """Encoder stage: residual blocks (+ a downsampling Resample), plus the AvgDown shortcut of its input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def rows_in(self, n: int) -> int:
        """Rows of context its input needs for `n` at its output (row-band hook; the shortcut reads fewer)."""
        for layer in reversed(self.downsamples):
            n = layer.rows_in(n)
        return n


class UpBlock(nn.Module):
    """Decoder stage: residual blocks (+ an upsampling Resample of full width), plus the DupUp shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers = []
        for _ in range(num_res_blocks + 1):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out: int) -> nn.ModuleList:
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1)])


# ----------------------------------------------------------------------------------------------------
# How the walks run a stage shortcut: whole frames, or one row band (`wan_vae_bands`)
# ----------------------------------------------------------------------------------------------------
class Frames22(FrameOps):
    """`wan_vae.FrameOps` plus the stage shortcuts (DupUp, AvgDown) of whole frames."""

    def row0(self) -> int:
        return 0  # first row of the current frame

    def shortcut(self, key, dup: DupUp, x_in, x_lo: int, t: int, y):
        y += dup.frame(x_in, t)  # y is the upsampling conv's fresh output
        return y

    def down_shortcut(self, key, avg: AvgDown, prev, x_in, x_lo: int, y, st: CausalState):
        # not in place: on the first frame a downsample3d hands back the frame it keeps
        return to_layout(y + avg.frame(prev, x_in), st.channels_last)


WHOLE22 = Frames22()


class BandOps22(wan_vae_bands.BandOps):
    """`wan_vae_bands.BandOps` plus the stage shortcuts of one band. DupUp output rows [lo, hi) read the
    stage input's rows [lo//2, ceil(hi/2)), AvgDown output rows [lo, hi) read rows [2lo, 2hi); those above
    the band's own stage input were computed by the band before, which leaves them here
    (`carry[(key, "in")][frame]`)."""

    def row0(self) -> int:
        return self.lo

    def _stage_rows(self, key, x_in, x_lo: Optional[int], a: int, b: int, nxt: int):
        """Stage-input rows [a, b) (carried ones included), keeping rows [nxt, end) for the next band;
        x_lo None: x_in is a whole kept front frame, which every band gets, so nothing is kept."""
        carry, x_lo = x_lo is not None, x_lo or 0
        pieces, ck = [(x_lo, x_in)], (key, "in")
        if a < x_lo:
            r0, prev = self.band.carry[ck][self.n]
            if r0 > a:
                raise RuntimeError(f"banded run: rows [{a}, {x_lo}) of the stage {key} input were not carried over")
            pieces.insert(0, (r0, prev[:, :, :x_lo - r0]))
        src = wan_vae_bands.row_slice(pieces, a, b)
        if sum(p.shape[2] for _, p in src) != b - a:
            raise RuntimeError(f"banded run: the stage {key} shortcut needs input rows [{a}, {b}), has "
                               f"{[(r, r + p.shape[2]) for r, p in src]}")
        if carry and self.band.stored is not None:
            keep = wan_vae_bands.row_slice(pieces, nxt, x_lo + x_in.shape[2])
            if keep:
                kept = torch.cat([p for _, p in keep], 2).clone()  # a few rows, not the band's whole input
                self.band.stored.setdefault(ck, {})[self.n] = (keep[0][0], kept)
        return src[0][1] if len(src) == 1 else torch.cat([p for _, p in src], 2)

    def shortcut(self, key, dup: DupUp, x_in, x_lo: Optional[int], t: int, y):
        """x_lo None: x_in is a whole kept front frame (the split stage's input), which every band gets."""
        lo, hi = self.lo, self.lo + y.shape[2]
        a = lo // 2  # the next band's upsampling starts at row hi (even: hi - 1), reading from hi // 2
        xs = self._stage_rows(key, x_in, x_lo, a, (hi + 1) // 2, hi // 2)
        y += dup.frame(xs, t)[:, :, lo - 2 * a:hi - 2 * a]
        return y

    def down_shortcut(self, key, avg: AvgDown, prev, x_in, x_lo: int, y, st: CausalState):
        if avg.factor_t != 1:
            raise RuntimeError("banded encode: a stage before the split downsamples in time")
        lo, hi = self.lo, self.lo + y.shape[2]  # the next band's downsampling starts at row hi
        xs = self._stage_rows(key, x_in, x_lo, 2 * lo, 2 * hi, 2 * hi)
        return y + avg.frame(None, xs)


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder: the per-frame walks
# ----------------------------------------------------------------------------------------------------
class Encoder22(nn.Module):
    def __init__(self, cfg: Wan22VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1,) + tuple(cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv1 = CausalConv3d(cfg.in_channels * cfg.patch_size ** 2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, temporal=i < n - 1 and cfg.temporal_downsample[i],
                      down=i < n - 1) for i in range(n)])
        n = cfg.temporal_ratio  # frames per chunk at each stage: 4, then halved by each temporal stage
        for stage in self.downsamples:
            if n >= 2:
                mark_pairs(stage.downsamples)
            if stage.avg_shortcut.factor_t == 2:
                n //= 2
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def walk(self, x, st: CausalState, keep: bool, ops: Frames22 = WHOLE22, start: Optional[int] = None,
             stop: Optional[int] = None) -> Optional[torch.Tensor]:
        """One patchified frame through the encoder: the head's output, or None while a temporal
        downsampling waits for its second frame (the stage's input is then kept for its shortcut). A split
        after stage i (banded encode): stop=i returns that stage's output, start=i+1 takes such a frame."""
        if start is None:
            x = ops.conv("conv1", self.conv1, None, x, st, keep)
            start = 0
        for i in range(start, len(self.downsamples)):
            stage = self.downsamples[i]
            x_in, x_lo = x, ops.row0()
            for j, layer in enumerate(stage.downsamples):
                if isinstance(layer, Resample):
                    x = ops.spatial((i, j), layer, x, st)
                    if layer.mode == "downsample3d":
                        x = layer.down_time(x, st)
                else:
                    x = ops.block((i, j), layer, x, st, keep)
            pending = st.slot(stage)  # [the stage input waiting for its pair, -]
            if x is None:
                pending[0] = x_in
                return None
            prev, pending[0] = pending[0], None
            x = ops.down_shortcut((i, "avg"), stage.avg_shortcut, prev, x_in, x_lo, x, st)
            if i == stop:
                return x
        for k, layer in enumerate(self.middle):
            x = ops.block(("middle", k), layer, x, st, keep)
        return ops.conv("head", self.head[2], self.head[0], x, st, keep)


class Decoder22(nn.Module):
    def __init__(self, cfg: Wan22VAEConfig):
        super().__init__()
        dims = [cfg.dec_dim * u for u in (cfg.dim_mult[-1],) + tuple(cfg.dim_mult[::-1])]
        tup = tuple(cfg.temporal_downsample[::-1])
        n = len(cfg.dim_mult)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*[
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks, temporal=i < n - 1 and tup[i], up=i < n - 1)
            for i in range(n)])
        temporal = [i for i, s in enumerate(self.upsamples) if s.avg_shortcut is not None and s.avg_shortcut.factor_t == 2]
        for stage in self.upsamples[temporal[0] + 1:] if temporal else []:
            mark_pairs(stage.upsamples)  # 2 or 4 frames per latent frame after the first temporal upsampling
        self.head = _head(dims[-1], cfg.in_channels * cfg.patch_size ** 2)

    def walk(self, x, st: CausalState, first: bool, keep: bool, ops: Frames22 = WHOLE22,
             stop: Optional[int] = None) -> Iterator:
        """One post-quant latent frame through the decoder, depth first: yields its output frames (still
        patchified, clamped to [-1, 1]) as soon as each is ready. `stop`: a stage whose upsampling is
        temporal; yields `(frame its time conv made, the stage input, DupUp frame index)` instead (the
        front half of a banded decode; `walk_back` runs the rest)."""
        x = ops.conv("conv1", self.conv1, None, x, st, keep)
        for k, layer in enumerate(self.middle):
            x = ops.block(("middle", k), layer, x, st, keep)
        yield from self._walk_stages(0, x, st, first, keep, ops, stop)

    def walk_back(self, f, x_in, t: int, st: CausalState, keep: bool, ops: Frames22, start: int):
        """The back half of a banded decode for one front frame of `walk(stop=start)`: the rest of stage
        `start` (spatial upsampling + shortcut) and everything after it; returns the output (rows)."""
        stage = self.upsamples[start]
        up = stage.upsamples[-1]
        y = ops.spatial((start, len(stage.upsamples) - 1), up, f, st)
        y = ops.shortcut((start, "dup"), stage.avg_shortcut, x_in, None, t, y)  # x_in: the whole front frame
        (y,) = self._walk_stages(start + 1, y, st, False, keep, ops, None)
        return y

    def _walk_stages(self, i: int, x, st: CausalState, first: bool, keep: bool, ops: Frames22,
                     stop: Optional[int]):
        if i == len(self.upsamples):
            x = ops.conv("head", self.head[2], self.head[0], x, st, keep)
            yield x.clamp_(-1.0, 1.0)
            return
        stage = self.upsamples[i]
        layers = stage.upsamples
        x_in, x_lo = x, ops.row0()
        for j, layer in enumerate(layers):
            if not isinstance(layer, Resample):
                x = ops.block((i, j), layer, x, st, keep)
        if stage.avg_shortcut is None:
            yield from self._walk_stages(i + 1, x, st, first, keep, ops, stop)
            return
        up = layers[-1]
        if up.mode == "upsample3d":
            frames = up.up_time(x, st, first, keep)
            ts = [1] if first else [0, 1]  # the first latent frame keeps only DupUp's second frame
        else:
            frames, ts = [x], [0]
        del x
        if i == stop:
            yield from ((f, x_in, t) for f, t in zip(frames, ts))
            return
        for k, (f, t) in enumerate(zip(frames, ts)):
            y = ops.spatial((i, len(layers) - 1), up, f, st)
            y = ops.shortcut((i, "dup"), stage.avg_shortcut, x_in, x_lo, t, y)
            # a layer's cache is released after its very last frame
            yield from self._walk_stages(i + 1, y, st, first, keep or k < len(frames) - 1, ops, stop)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class Wan22VAE(WanVAE):
    """The Wan2.2 VAE (a `TWINFLOW_VAE`). Video in [-1, 1] as [B, 3, T, H, W]; raw latents
    [B, 48, 1+(T-1)//4, H/16, W/16]. The public API is `WanVAE`'s (see the module docstring for what is
    refused)."""

    def __init__(self, cfg: Wan22VAEConfig = PRESETS["wan2.2"]):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.encoder = Encoder22(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # quant conv: mu | log_var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # post-quant conv
        self.decoder = Decoder22(cfg)
        self.source = ""
        self.channels_last: Optional[bool] = None

    # ---- the streaming API ---------------------------------------------------------------------------
    def encode_step(self, frame: torch.Tensor, st: CausalState, last: bool = False) -> Optional[torch.Tensor]:
        """Push one video frame [B, 3, H, W] through the encoder: the latent mean [B, 48, H/16, W/16] it
        completes, or None (every latent but the first takes 4 frames)."""
        x = to_layout(patchify(frame, self.cfg.patch_size), st.channels_last)
        y = self.encoder.walk(x, st, keep=not last)
        return None if y is None else self.encode_mean(y)

    def decode_step(self, z: torch.Tensor, st: CausalState, last: bool = False,
                    stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Push one raw latent frame [B, 48, h, w] through the decoder; yields its output frames
        [B, 3, 16h, 16w] in [-1, 1] (1 for the stream's first latent, then 4)."""
        first, st.started = not st.started, True
        x = self.conv2.pointwise(to_layout(z, st.channels_last))
        if stop is not None:  # the front half of a banded decode: (frame, stage input, DupUp index) tuples
            return self.decoder.walk(x, st, first=first, keep=not last, stop=stop)
        p = self.cfg.patch_size
        return (unpatchify(f, p) for f in self.decoder.walk(x, st, first=first, keep=not last))

    # `state_modules` (the flat cache of compiled/export.py) is WanVAE's: the decoder's shortcuts keep
    # nothing between latent frames, and the encoder's stage inputs waiting for their pair are, like the
    # temporal downsamplers' pending frames, empty at every chunk boundary (1 frame, then 4).

    def encode_split(self) -> int:
        """The encoder stage that ends the banded part of an encode: the first one (full patch resolution,
        where the encoder's memory is), if it downsamples in space only."""
        st = self.encoder.downsamples[0]
        if st.avg_shortcut.factor_s != 2 or st.avg_shortcut.factor_t != 1:
            raise ValueError("this Wan2.2 VAE's first encoder stage is not a 2x spatial downsampling; encode "
                             "with bands=1")
        return 0

    def encode_needs(self) -> dict:
        """Rows of context left after each banded encoder layer ((stage, index), "conv1"), walked backwards
        from the split (see `wan_vae_bands.encode_needs`)."""
        s = self.encode_split()
        needs, need = {}, 0
        for i in range(s, -1, -1):
            layers = self.encoder.downsamples[i].downsamples
            for j in range(len(layers) - 1, -1, -1):
                needs[(i, j)] = need
                need = layers[j].rows_in(need)
        needs["conv1"] = need
        return needs

    def encode_banded(self, x: torch.Tensor, frames: int, plan: list, out: torch.Tensor) -> torch.Tensor:
        """Exact row-band encode (`wan_vae_bands.encode_banded`'s scheme): the first stage runs band by band
        through all frames with `BandOps22`; its output frames are kept and the rest streams them whole."""
        p = self.cfg.patch_size
        return wan_vae_bands.encode_banded(self, x, frames, plan, out, ops_class=BandOps22, needs=self.encode_needs(),
                                           frame=lambda f: patchify(f, p), desc="Wan2.2 VAE encode")

    def decode_split(self) -> None:
        # None for `wan_vae_plan`'s generic planner (its band rules walk the Wan2.1 layer list): `decode`
        # picks row bands itself (`auto_bands`), then hands whole frames or tiles to that planner.
        return None

    # ---- exact row bands of the decode (on request) --------------------------------------------------
    def band_split(self) -> Optional[int]:
        """The last decoder stage whose upsampling is temporal: its time conv ends the front half of a
        banded decode; everything after it (its spatial upsampling and shortcut, the later stages, the
        head) is local in space and runs band by band."""
        idx = [i for i, s in enumerate(self.decoder.upsamples)
               if s.avg_shortcut is not None and s.upsamples[-1].mode == "upsample3d"]
        return idx[-1] if idx else None

    def decode_needs(self) -> dict:
        """Rows of context left after each banded decoder layer ((stage, index), "head"), walked from the
        output backwards; "halo": what the split's time-conv frames need (see `wan_vae_bands.decode_needs`).
        The shortcuts read fewer rows than the upsampling conv beside them, so they add none."""
        dec, s = self.decoder, self.band_split()
        needs = {"head": 0}
        need = dec.head[2].rows_in(0)
        for i in range(len(dec.upsamples) - 1, s - 1, -1):
            layers = dec.upsamples[i].upsamples
            for j in (range(len(layers) - 1, -1, -1) if i > s else [len(layers) - 1]):
                needs[(i, j)] = need
                need = layers[j].rows_in(need)
        needs["halo"] = need
        return needs

    def banded_layers(self) -> list[tuple[int, int, int]]:
        """The cached layers of the banded half for `wan_vae_bands.decode_lead`: (context after it, scale,
        channels)."""
        s, needs = self.band_split(), self.decode_needs()
        layers, scale = [], 2  # after stage s's spatial upsampling
        for i in range(s + 1, len(self.decoder.upsamples)):
            for j, layer in enumerate(self.decoder.upsamples[i].upsamples):
                if isinstance(layer, ResidualBlock):
                    layers.append((needs[(i, j)], scale, layer.residual[2].in_channels + layer.residual[6].out_channels))
                elif layer.up:
                    scale *= 2
        return layers

    def decode_banded(self, z: torch.Tensor, bands: int, out: torch.Tensor) -> torch.Tensor:
        """Exact row-band decode into `out` (`wan_vae_bands.decode_banded`'s scheme): the front half streams
        and keeps, per output frame, its time-conv frame and the stage input its shortcut reads; the back
        half runs band by band with `BandOps22`."""
        s = self.band_split()
        if s is None:
            raise ValueError("this Wan2.2 VAE has no temporal upsampling to split at; decode with bands=1")
        t, p = z.shape[2], self.cfg.patch_size
        st, fronts = self.init_state(), []
        scratch = st.scratch  # one Winograd scratch for the whole decode (no fresh pages per band)
        with Progress(total=t, desc=f"Wan2.2 VAE decode (front, {bands} bands)") as bar:
            for i in range(t):
                fronts.extend(self.decode_step(z[:, :, i], st, last=i == t - 1, stop=s))
                bar.update(1)
        cl = st.channels_last
        del st
        wan_vae_bands.release_free_heap(out.device)
        needs = self.decode_needs()
        rows, frames = fronts[0][0].shape[-2], len(fronts)
        lead = wan_vae_bands.decode_lead(self.banded_layers())
        plan = wan_vae_bands.decode_band_rows(rows, bands, needs["halo"], lead)
        carry = None
        with Progress(total=len(plan) * frames, desc="Wan2.2 VAE decode (bands)") as bar:
            for k, (_c0, c1) in enumerate(plan):
                band = wan_vae_bands.Band(c1, rows, frames, last=k == len(plan) - 1, carry=carry, channels_last=cl)
                ops, st = BandOps22(band, needs), self.init_state(cl)
                st.scratch = scratch
                wan_vae_bands.release_free_heap(out.device)
                for n in range(frames):
                    ops.begin(n, rows)
                    f, x_in, tt = fronts[n]
                    y = self.decoder.walk_back(f, x_in, tt, st, keep=n < frames - 1, ops=ops, start=s)
                    if band.last:
                        fronts[n] = None  # the last band frees the front frames as it goes
                    out[:, :, n, p * ops.lo:p * (ops.lo + y.shape[2])] = unpatchify(y, p)
                    bar.update(1)
                carry = band.stored
                del st, band, ops
        return out

    # ---- encode / decode -----------------------------------------------------------------------------
    @staticmethod
    def _check_bands(bands) -> None:
        if bands is not None and (not isinstance(bands, int) or bands < 1):
            raise ValueError(f"bands must be None (auto) or an integer >= 1, got {bands!r}")

    @torch.inference_mode()
    def encode(self, video: torch.Tensor, *, bands: Optional[int] = None) -> torch.Tensor:
        """Encode video [B, 3, T, H, W] in [-1, 1] to the raw latent mean [B, 48, 1+(T-1)//4, H/16, W/16].
        Frames beyond the last 1+4k are dropped, with a log line, as ComfyUI and the official code do.
        `bands`: exact row bands for the first (full patch resolution) stage: None = auto
        (`wan_vae_bands.encode_auto_bands`), 1 = whole frames."""
        self._check_bands(bands)
        if video.ndim != 5 or video.shape[1] != self.cfg.in_channels:
            raise ValueError(f"encode expects video [B, {self.cfg.in_channels}, T, H, W], got {tuple(video.shape)}")
        b, _, t, h, w = video.shape
        r = self.cfg.spatial_ratio
        if h % r or w % r:
            raise ValueError(f"encode needs height and width divisible by {r}, got {h}x{w}; crop or resize the frames")
        keep = self.video_frames(self.latent_frames(t))
        if keep != t:
            logger.info("Wan2.2 VAE encode: %d frames is not 1+%dk; using the first %d (the last %d are dropped)",
                        t, self.cfg.temporal_ratio, keep, t - keep)
        x = video.to(device=self.device, dtype=self.dtype)
        out = torch.empty(b, self.cfg.z_dim, self.latent_frames(t), h // r, w // r, device=self.device,
                          dtype=self.dtype)
        bands = wan_vae_bands.encode_auto_bands(video.shape) if bands is None else bands
        if bands > 1:
            plan = wan_vae_bands.encode_band_rows(self, h // self.cfg.patch_size // 2, bands)
            if len(plan) > 1:
                return self.encode_banded(x, keep, plan, out)
        st, n = self.init_state(), 0
        with Progress(total=keep, desc="Wan2.2 VAE encode") as bar:
            for i in range(keep):
                mu = self.encode_step(x[:, :, i], st, last=i == keep - 1)
                if mu is not None:
                    out[:, :, n] = mu
                    n += 1
                bar.update(1)
        assert n == out.shape[2], (n, out.shape)
        return out

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, *, tile: Optional[tuple[int, int]] = None, tiling: str = "off",
               bands: Optional[int] = None, callback=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode raw latents [B, 48, T, h, w] to video [B, 3, 1+4(T-1), 16h, 16w] in [-1, 1]: `WanVAE.decode`
        (streaming `callback`, spatial tiles, the memory plan). `bands`: None = auto (`auto_bands`; whole
        frames with a callback or tiles), 1 = whole frames, n > 1 = n exact row bands (`decode_banded`)."""
        self._check_bands(bands)
        if bands is None and callback is None and tiling != "on" and tile is None:
            bands = self.auto_bands(z.shape)
        if bands is None or bands == 1:
            return super().decode(z, tile=tile, tiling=tiling, bands=1, callback=callback, out=out)
        self._check_latent(z)
        if callback is not None:
            raise ValueError("a per-frame callback needs bands=1 (bands finish one at a time)")
        if tiling == "on" or tile is not None:
            raise ValueError("choose row bands or tiles, not both (bands > 1 with tiling='on' or a tile)")
        b, _, t, h, w = z.shape
        r = self.cfg.spatial_ratio
        shape = (b, 3, self.video_frames(t), h * r, w * r)
        if out is None:
            out = torch.empty(shape, device=self.device, dtype=self.dtype)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, decode produces {shape}")
        return self.decode_banded(z.to(device=self.device, dtype=self.dtype), bands, out)

    def estimate_decode_bytes(self, latent_shape, tile: Optional[int] = None, dtype=None, bands: int = 1) -> int:
        """Peak bytes of a decode beyond the weights: every 3-tap causal conv keeps its last 2 input frames,
        plus ~6 frame-sized activations at the biggest layer, plus the output (and an fp32 weight map when
        tiled). With `bands` > 1 (untiled): the front half's caches and working set plus the kept front
        frames (time-conv frames and stage inputs), or the kept front frames plus one band of the back
        half's caches and working set and the rows carried between bands, whichever is larger (as
        `wan_vae_plan.estimate_decode_bytes` counts the Wan2.1 VAE, with its time-pair and Winograd terms)."""
        cfg = self.cfg
        b, _, t, h, w = (int(s) for s in latent_shape)
        es = torch.empty((), dtype=dtype or self.dtype).element_size()
        th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
        dims = [cfg.dec_dim * u for u in (cfg.dim_mult[-1],) + tuple(cfg.dim_mult[::-1])]
        tup = tuple(cfg.temporal_downsample[::-1])
        split = self.band_split() if bands > 1 and not tile else None
        frames = self.video_frames(t)
        px = th * tw
        cache = [2 * cfg.z_dim * px + 4 * 2 * dims[0] * px, 0]  # [front, back]: conv1, middle (2 blocks x 2 convs)
        work = [6 * dims[0] * px, 0]
        fronts, rows, carry = 0, th, 0
        dtype = dtype or self.dtype
        pairs = dtype in (torch.float32, torch.float64)  # time pairs: a pending output frame per conv
        first_t = min((i for i in range(len(dims) - 2) if tup[i]), default=len(dims))
        wide = [[(dims[0], dims[0], px)] * 4, []]  # [front, back] 3x3 convs (c_in, c_out, px): Winograd scratch
        for i in range(len(dims) - 1):
            side = 0 if split is None or i <= split else 1  # the split stage's blocks and time conv: front
            for k in range(cfg.num_res_blocks + 1):
                cache[side] += 2 * px * ((dims[i] if k == 0 else dims[i + 1]) + dims[i + 1])
                if pairs and i > first_t:
                    cache[side] += 2 * px * dims[i + 1]
                wide[side] += [(dims[i] if k == 0 else dims[i + 1], dims[i + 1], px), (dims[i + 1], dims[i + 1], px)]
            work[side] = max(work[side], 6 * max(dims[i], dims[i + 1]) * px)
            if side:  # rows carried between bands: 2 input rows per conv (and upsampling), 1 per shortcut
                carry += tw * 2 ** i * (2 * dims[i + 1] * (2 * (cfg.num_res_blocks + 1) + 1) + dims[i])
            if i < len(dims) - 2:
                if tup[i]:
                    cache[side] += 2 * dims[i + 1] * px  # time_conv state
                up = 0 if split is None or i < split else 1  # the split stage's spatial part: back
                work[up] = max(work[up], 8 * dims[i + 1] * px)  # time-conv frames, upsampled output, shortcut
                if i == split:  # kept: the time-conv frame of every output frame, the stage input per latent
                    rows = th * 2 ** i
                    fronts = (frames * dims[i + 1] + t * dims[i]) * px
                px *= 4
        cache[0 if split is None else 1] += 2 * cfg.in_channels * cfg.patch_size ** 2 * px  # head: partial sums
        wide[0 if split is None else 1].append((dims[-1], cfg.in_channels * cfg.patch_size ** 2, px))
        r = cfg.spatial_ratio
        out_bytes = b * 3 * frames * h * r * w * r * (es + (4 if tile else 0))
        dev = self.device.type
        if split is None:
            return int(wan_vae_plan.peak_elements(b, cache, work, wide, dtype, dev) * es + out_bytes)
        frac = min(1.0, (math.ceil(rows / bands) + self.decode_needs()["halo"]) / rows)
        carried = (frames + 1) * carry  # one ring of carried rows per layer for all bands (wan_vae_bands.Band)
        peak = wan_vae_plan.peak_elements(b, cache, work, wide, dtype, dev, (frac, fronts, carried))
        return int(peak * es + out_bytes)

    def auto_bands(self, latent_shape) -> int:
        """The decode's row bands when `bands` is None (`wan_vae_plan.auto_bands` / `plan_decode`'s rule):
        bands of at least 3 x halo split rows if that needs less memory than whole frames; more if the
        device's usable memory needs them (bands no thinner than their halo); 1 when even those do not
        fit (the whole-frame plan then tiles or refuses)."""
        s = self.band_split()
        if s is None:
            return 1
        rows, halo = int(latent_shape[-2]) * 2 ** s, self.decode_needs()["halo"]
        want = max(1, rows // (3 * halo))
        if want > 1 and self.estimate_decode_bytes(latent_shape, bands=want) >= self.estimate_decode_bytes(latent_shape):
            want = 1
        avail = wan_vae_plan.usable_memory(self.device)
        if avail is None or self.estimate_decode_bytes(latent_shape, bands=want) <= avail:
            return want
        for n in range(want + 1, max(1, rows // halo) + 1):
            if self.estimate_decode_bytes(latent_shape, bands=n) <= avail:
                logger.info("Wan2.2 VAE decode: %d exact row bands to fit %.2f GiB usable on %s", n,
                            avail / 2 ** 30, self.device)
                return n
        return 1


# ----------------------------------------------------------------------------------------------------
# Latent normalisation (ComfyUI latent_formats.Wan22; the official Wan2.2 VAE's mean/std)
# ----------------------------------------------------------------------------------------------------
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


def _stats(z: torch.Tensor):
    return latent_stats(z, WAN22_LATENT_MEAN, WAN22_LATENT_STD, "Wan2.2")


def normalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> the model's space: (z - mean) / std (ComfyUI Wan22.process_in)."""
    mean, std = _stats(z)
    return ((z.float() - mean) / std).to(z.dtype)


def denormalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Model space -> raw VAE latent: z * std + mean (ComfyUI Wan22.process_out)."""
    mean, std = _stats(z)
    return (z.float() * std + mean).to(z.dtype)


# ----------------------------------------------------------------------------------------------------
# diffusers layout -> official layout
# ----------------------------------------------------------------------------------------------------
_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}
_FIXED = [(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."), (r"^quant_conv\.", "conv1."),
          (r"^post_quant_conv\.", "conv2."), (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
          (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
          (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1.")]


def _resnet_key(rest: str, source: str, key: str) -> str:
    for d, o in _RESNET.items():
        if rest.startswith(d + ".") or rest == d:
            return o + rest[len(d):]
    raise CheckpointError(f"{source}: unexpected diffusers key {key!r} in a residual block")


def from_diffusers(sd: dict, source: str = "state dict") -> dict:
    """A diffusers `AutoencoderKLWan` Wan2.2 state dict (is_residual=True) in the official key layout."""
    n_down: dict = {}  # stage -> number of residual blocks (the resample comes after them)
    n_up: dict = {}
    for k in sd:
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", k):
            n_down[m[1]] = max(n_down.get(m[1], 0), int(m[2]) + 1)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", k):
            n_up[m[1]] = max(n_up.get(m[1], 0), int(m[2]) + 1)
    out = {}
    for k, v in sd.items():
        new = None
        for pat, rep in _FIXED:
            if re.match(pat, k):
                new = re.sub(pat, rep, k)
                break
        if new is None:
            if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$", k):
                new = f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_key(m[3], source, k)}"
            elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
                new = f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_resnet_key(m[3], source, k)}"
            elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$", k):
                new = f"encoder.downsamples.{m[1]}.downsamples.{n_down.get(m[1], 0)}.{m[2]}"
            elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
                new = f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_resnet_key(m[3], source, k)}"
            elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.+)$", k):
                new = f"decoder.upsamples.{m[1]}.upsamples.{n_up.get(m[1], 0)}.{m[2]}"
            else:
                raise CheckpointError(f"{source}: unexpected key {k!r} for a diffusers-format Wan2.2 VAE")
        out[new] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Config detection, loading, random init
# ----------------------------------------------------------------------------------------------------
def _need(sd: dict, key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: not a Wan2.2 VAE: key {key!r} is missing")
    return sd[key]


def detect_config(sd: dict, source: str = "state dict") -> Wan22VAEConfig:
    """Derive the config from tensor shapes (official layout, prefix stripped)."""
    if WAN22_KEY not in sd:
        if wan_vae.ANCHOR in sd:
            raise CheckpointError(f"{source}: this is a Wan2.1 VAE (no {WAN22_KEY!r}); load it with the Wan2.1 "
                                  f"VAE loader (the VAE loader nodes pick the family by themselves)")
        _need(sd, WAN22_KEY, source)
    w = _need(sd, "encoder.conv1.weight", source)
    if w.ndim != 5:
        raise CheckpointError(f"{source}: encoder.conv1.weight has shape {tuple(w.shape)}, expected a 5-D conv3d weight")
    dim, in_patch = int(w.shape[0]), int(w.shape[1])
    patch = {3: 1, 12: 2, 27: 3, 48: 4}.get(in_patch)
    if patch is None:
        raise CheckpointError(f"{source}: encoder.conv1.weight takes {in_patch} channels; expected 3 x patch²")
    z_dim = int(_need(sd, "conv2.weight", source).shape[0])
    stages = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    mult, tds, nres = [], [], None
    for i in stages:
        p = f"encoder.downsamples.{i}.downsamples."
        blocks = sorted({int(k[len(p):].split(".")[0]) for k in sd if k.startswith(p)})
        res = [j for j in blocks if f"{p}{j}.residual.2.weight" in sd]
        if not res:
            raise CheckpointError(f"{source}: encoder stage {i} has no residual block ({p}0.residual.2.weight)")
        nres = len(res) if nres is None else nres
        if len(res) != nres:
            raise CheckpointError(f"{source}: uneven residual blocks per encoder stage ({len(res)} vs {nres})")
        mult.append(int(sd[f"{p}0.residual.2.weight"].shape[0]))
        if i < stages[-1]:
            tds.append(f"{p}{nres}.time_conv.weight" in sd)
    if any(c % dim for c in mult):
        raise CheckpointError(f"{source}: encoder widths {mult} are not multiples of dim {dim}")
    last = _need(sd, f"decoder.upsamples.{len(stages) - 1}.upsamples.0.residual.2.weight", source)
    dec_dim = int(last.shape[0]) // (mult[0] // dim)
    return Wan22VAEConfig(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=tuple(c // dim for c in mult),
                          num_res_blocks=nres, temporal_downsample=tuple(tds), patch_size=patch)


def file_config(sd: dict, source: str) -> Wan22VAEConfig:
    """The config of a Wan2.2 VAE state dict in any layout the loader takes (prefixed, diffusers); meta tensors
    made from a file's header will do (the memory preflight)."""
    return detect_config(_official(sd, source), source)


def is_wan22(sd: dict) -> bool:
    """Whether a (possibly prefixed, official or diffusers layout) state dict is a Wan2.2 VAE (reads key names
    only, so a dict of the file's header keys will do)."""
    return any(k.endswith(WAN22_KEY) or k.endswith(DIFFUSERS_WAN22_KEY) for k in sd)


def _official(sd: dict, source: str) -> dict:
    """Strip a prefix and map diffusers keys: the official layout."""
    try:
        sd, prefix = strip_prefix(sd, wan_vae.ANCHOR, ("first_stage_model.", "vae."))
    except KeyError:
        try:
            sd, prefix = strip_prefix(sd, DIFFUSERS_ANCHOR, ("vae.",))
        except KeyError:
            keys = list(sd)
            if any(k.endswith(h) for k in keys for h in wan_vae.DIT_HINT_KEYS):
                hint = ("it looks like a Wan DiT (diffusion model) checkpoint; load it with the diffusion model "
                        "loader, and pick the VAE file (wan2.2_vae.safetensors) here")
            else:
                hint = f"first keys: {', '.join(keys[:5]) or '(none)'}"
            raise CheckpointError(f"{source}: not a Wan2.2 VAE: neither {wan_vae.ANCHOR!r} (official) nor "
                                  f"{DIFFUSERS_ANCHOR!r} (diffusers) found under any prefix; {hint}") from None
        sd = from_diffusers(sd, source)
        logger.info("Wan2.2 VAE %s: diffusers layout mapped to the official keys", source)
    if prefix:
        logger.info("Wan2.2 VAE %s: stripped key prefix %r", source, prefix)
    return sd


def wan22_vae_from_state_dict(sd: dict, source: str, dtype: Optional[torch.dtype] = None,
                              device="cpu") -> Wan22VAE:
    sd = _official(sd, source)
    cfg = detect_config(sd, source)
    if dtype is None:
        counts: dict = {}
        for v in sd.values():
            if v.is_floating_point():
                counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
        if len(counts) > 1:
            dtype = max(counts, key=counts.get)
            logger.info("Wan2.2 VAE %s: mixed dtypes %s; using %s for all", source, sorted(map(str, counts)), dtype)
    sd = convert_dtype(sd, dtype)
    model = build_and_load(lambda: Wan22VAE(cfg), sd, source).tap_major_()
    model.source = source
    logger.info("Wan2.2 VAE loaded from %s: dim %d/%d, z %d, dtype %s", source, cfg.dim, cfg.dec_dim, cfg.z_dim,
                model.dtype)
    return model.to(device)


def load_wan22_vae(path, dtype: Optional[torch.dtype] = None, device="cpu") -> Wan22VAE:
    """Load a Wan2.2 VAE: official `.pth`, ComfyUI `wan2.2_vae.safetensors` (official keys, optionally
    prefixed) or a diffusers-format file. `dtype` None keeps the file's dtype."""
    sd, _meta = load_file(Path(path))
    return wan22_vae_from_state_dict(sd, str(path), dtype, device)


def load_vae(path, dtype: Optional[torch.dtype] = None, device="cpu") -> WanVAE:
    """Load a Wan VAE file of either family (what the VAE loader nodes call): a Wan2.2 file gives a
    `Wan22VAE`, anything else goes to the Wan2.1 loader (which names what is wrong with it)."""
    path = Path(path)
    sd, _meta = load_file(path)
    if is_wan22(sd):
        return wan22_vae_from_state_dict(sd, str(path), dtype, device)
    return wan_vae.wan_vae_from_state_dict(sd, str(path), dtype, device)


def random_wan22_vae(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                     device="cpu") -> Wan22VAE:
    """A Wan2.2 VAE with seeded random weights (every tensor randomised, incl. gammas)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Wan2.2 VAE preset {preset!r}; expected one of {sorted(PRESETS)}")
    with torch.device("meta"):
        model = Wan22VAE(PRESETS[preset])
    return wan_vae.seeded_weights(model, seed, dtype, f"random:{preset}").to(device)
