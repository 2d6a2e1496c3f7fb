"""Exact row bands for the Wan VAE: low-memory encode and decode that equal the whole-frame result.

The layers after the decoder's last temporal upsampling, and the encoder's first stage (conv1, the
full-resolution blocks and the first stride-2 downsampling), are local in space: 3x3 convs, the
per-pixel RMS norm, SiLU, nearest upsampling, no attention. So they can run band by band, top to
bottom, each band through all frames with its own causal state: only one band's caches (the bulk of
the memory: the full-resolution convs) are alive at a time. The rest of the network streams whole
frames as usual, before (decoder) or after (encoder) the banded part, whose frames are kept.

No row is computed twice. Each layer of a band computes exactly the rows that are valid (their
receptive field lies inside what the band has), down to where the rest of the band's part still
needs them (`decode_needs` / `encode_needs`), so a band reaches that many rows past its own end at
every layer. The next band starts each layer where the previous one stopped; the 1-2 input rows above
that start which a 3x3 conv also reads are carried over from the previous band (stored per layer and
frame: a few rows, ~30 MiB at wan2.1 9x256x256 fp32), and at the image edges the zero padding rows are
explicit, so a conv never computes a row that is thrown away. Only an upsampling whose start is odd
recomputes one row (its output starts on an even row).

The engine talks to the model through its streaming API only: `init_state`, `decode_step(stop=)`,
`encode_mean`, the split hooks `decode_split` / `encode_split`, the walks `Encoder3d.walk` /
`Decoder3d.walk` (run here with `BandOps` instead of whole frames), and each banded layer's `rows_in`.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from ..core.progress import Progress
from ..fused.ops import rms_norm_cf
from ..fused.vae_norm import rms_norm_cf_ref
from .wan_vae_layout import empty_frame, memory_format, subpixel_conv, to_layout


# ----------------------------------------------------------------------------------------------------
# Receptive fields and band edges
# ----------------------------------------------------------------------------------------------------
def decode_needs(vae) -> dict:
    """Rows of context left after each banded decoder layer (index in `decoder.upsamples`, "head"), at
    its output resolution, walked from the output backwards; "halo": what the split layer's input needs.
    wan2.1: head + 6 convs = 7 rows at 4x, -> 4 at 2x, + 6 convs -> 10, -> 6 at the split."""
    stop, _ = vae.decode_split()
    dec = vae.decoder
    needs = {"head": 0}
    need = dec.head[2].rows_in(0)
    for i in range(len(dec.upsamples) - 1, stop - 1, -1):
        needs[i] = need
        need = dec.upsamples[i].rows_in(need)
    needs["halo"] = need
    return needs


def decode_halo(vae) -> int:
    """How far past its own end a decode band computes rows for the next one, in split-resolution rows
    (0 if the decoder has no split)."""
    return 0 if vae.decode_split() is None else decode_needs(vae)["halo"]


def split_rows(vae, latent_shape) -> int:
    """Rows of a frame at the decoder's split (0 without one)."""
    split = vae.decode_split()
    return 0 if split is None else int(latent_shape[-2]) * split[1]


def decode_band_rows(rows: int, bands: int, halo: int, lead: float = 0.0) -> list[tuple[int, int]]:
    """[(c0, c1)]: the split-resolution rows each band delivers. A band is exact once the band before
    it has run, except that the last band must be taller than the halo: the band before it computes
    `halo` rows past its own end, which would otherwise reach the frame's bottom edge. Such a last band
    is merged into the one before. `lead` (`decode_lead`): the edges move up by it, so that the first
    band, which computes from row 0 to past its end, holds no more cache rows than the others."""
    edges = [0]
    for k in range(1, bands):
        c = round(k * rows / bands - lead)
        if edges[-1] < c < rows:
            edges.append(c)
    edges.append(rows)
    while len(edges) > 2 and rows - edges[-2] <= halo:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


def banded_layers(vae) -> list[tuple[int, int, int]]:
    """The cached layers of the decoder's banded half for `decode_lead`: (context after it, scale, channels)."""
    stop, _ = vae.decode_split()
    needs, layers, scale = decode_needs(vae), [], 1
    for i in range(stop, len(vae.decoder.upsamples)):
        layer = vae.decoder.upsamples[i]
        if getattr(layer, "up", False):
            scale *= 2
        elif hasattr(layer, "residual"):
            layers.append((needs[i], scale, layer.residual[2].in_channels + layer.residual[6].out_channels))
    return layers


def decode_lead(layers: list[tuple[int, int, int]]) -> float:
    """How far the band edges move up (split rows) for the cached layers of the banded half [(rows of
    context left after the layer, its scale: its rows per split row, its input + output channels)].

    At a layer of scale s and context n, a middle band computes s x its split rows; the first band n more
    (from row 0 to past its end), the last n fewer. Moving the edges up by d changes them by -/+ s d; the
    d that gives the first and the last band the same cache (rows x channels x width, width ~ s) summed
    over the layers is sum(w n) / sum(w s) with w = channels x s."""
    w = [c * s for _n, s, c in layers]
    den = sum(wi * s for wi, (_n, s, _c) in zip(w, layers))
    return sum(wi * n for wi, (n, _s, _c) in zip(w, layers)) / den if den else 0.0


def encode_needs(vae) -> dict:
    """Rows of context left after each banded encoder layer ("conv1", index in `encoder.downsamples`), at
    its output resolution, walked backwards from the split. wan2.1: 5 rows after conv1."""
    needs, need = {}, 0
    layers = vae.encoder.downsamples
    for i in range(vae.encode_split(), -1, -1):
        needs[i] = need
        need = layers[i].rows_in(need)
    needs["conv1"] = need
    return needs


def encode_auto_bands(video_shape) -> int:
    """The default band count of `encode`: bands of >= 128 input rows, 1 (whole frames) below 256 px.
    Bands compute no row twice; they cost smaller convolutions and a few carried rows (measured at
    9x256x256: 2 bands ~2% slower than whole frames, 4 bands ~4%) for ~0.4-0.55x the peak memory.
    Only the first stage is banded: bands thin enough to matter at the 1/4 and 1/8 stages made the
    256 px encode ~6% slower (small convolutions) for little memory."""
    return max(1, int(video_shape[-2]) // 128)


def encode_band_rows(vae, rows: int, bands: int) -> list[tuple[int, int]]:
    """[(c0, c1)]: rows of each band at the split resolution (`rows` there: half the input's). A band
    computes down to `encode_needs` rows past its end, so the edges are placed where the bands'
    full-resolution rows (where the caches are) are equal; a last band no taller than that reach is
    merged into the one before."""
    reach = encode_needs(vae)["conv1"] + 1  # full-resolution rows past the band's end
    edges = [0]
    for k in range(1, bands):
        c = round((k * rows * 2 / bands - reach) / 2)
        if edges[-1] < c < rows:
            edges.append(c)
    edges.append(rows)
    while len(edges) > 2 and (rows - edges[-2]) * 2 <= reach:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


# ----------------------------------------------------------------------------------------------------
# Banded decode and encode
# ----------------------------------------------------------------------------------------------------
def decode_banded(vae, z: torch.Tensor, bands: int, out: torch.Tensor) -> torch.Tensor:
    """Exact low-memory decode of z (model dtype and device) into `out`. The front half (conv1 .. the last
    upsample3d's time conv) streams as usual and keeps its output frames (small: 4x fewer pixels than
    the output, 2x fewer at wan2.1's split); its caches are then freed. The back half runs band by band."""
    stop, _ = vae.decode_split()
    t = z.shape[2]
    st, fronts = vae.init_state(), []
    scratch = st.scratch  # one Winograd scratch for the whole decode (no fresh pages per band)
    with Progress(total=t, desc=f"Wan VAE decode (front, {bands} bands)") as bar:
        for i in range(t):
            fronts.extend(vae.decode_step(z[:, :, i], st, last=i == t - 1, stop=stop))
            bar.update(1)
    cl = st.channels_last
    del st
    release_free_heap(out.device)  # the front half's caches go back to the OS before the bands
    needs = decode_needs(vae)
    rows, frames = fronts[0].shape[-2], len(fronts)
    plan = decode_band_rows(rows, bands, needs["halo"], decode_lead(banded_layers(vae)))
    carry = None
    with Progress(total=len(plan) * frames, desc="Wan VAE decode (bands)") as bar:
        for k, (c0, c1) in enumerate(plan):
            band = Band(c1, rows, frames, last=k == len(plan) - 1, carry=carry, channels_last=cl)
            ops, st = BandOps(band, needs), vae.init_state(cl)
            st.scratch = scratch
            release_free_heap(out.device)  # the previous band's caches go back to the OS
            for n in range(frames):
                ops.begin(n, rows)
                (y,) = vae.decoder.walk(fronts[n], st, first=False, keep=n < frames - 1, ops=ops, start=stop)
                if band.last:
                    fronts[n] = None  # the last band frees the front frames as it goes
                out[:, :, n, ops.lo:ops.lo + y.shape[2]] = y
                bar.update(1)
            carry = band.stored
            del st, band, ops
    return out


def encode_banded(vae, x: torch.Tensor, frames: int, plan: list, out: torch.Tensor, *, ops_class=None,
                  needs: Optional[dict] = None, frame=None, desc: str = "Wan VAE encode") -> torch.Tensor:
    """Exact low-memory encode of the first `frames` (1 + 4k) frames of video x into `out`. The encoder's
    first stage runs band by band through all frames (rows carried between bands as in the decoder);
    its output frames (1/2 resolution) are kept for every video frame; the rest of the encoder then
    streams them whole. A family with its own stage shortcuts passes its `ops_class` (a `BandOps`), its
    `needs` and `frame` (what turns a video frame into the encoder's input, e.g. a patchify)."""
    ops_class, needs = ops_class or BandOps, needs or encode_needs(vae)
    frame = frame or (lambda f: f)
    full = frame(x[:, :, 0]).shape[-2]  # rows of the encoder's input
    rows, stop = full // 2, vae.encode_split()  # at the split, after the first x2 downsampling
    kept: list = []
    carry, scratch = None, {}  # one Winograd scratch for the whole encode
    with Progress(total=len(plan) * frames, desc=f"{desc} ({len(plan)} bands)") as bar:
        for k, (c0, c1) in enumerate(plan):
            st, j = vae.init_state(), 0
            st.scratch = scratch
            cl = st.channels_last
            band = Band(c1, rows, frames, last=k == len(plan) - 1, carry=carry, channels_last=cl)
            ops = ops_class(band, needs)
            release_free_heap(out.device)
            for n in range(frames):
                ops.begin(n, full)
                y = vae.encoder.walk(to_layout(frame(x[:, :, n]), cl), st, keep=n < frames - 1, ops=ops, stop=stop)
                if y is not None:  # None: a temporal downsampling waits for the second frame of its pair
                    if j == len(kept):
                        kept.append(empty_frame(y, cl, rows))
                    kept[j][:, :, ops.lo:ops.lo + y.shape[2]] = y
                    j += 1
                bar.update(1)
            carry = band.stored
            del st, band, ops
    del carry
    release_free_heap(out.device)
    st, j = vae.init_state(cl), 0
    st.scratch = scratch
    for n in range(len(kept)):
        y = vae.encoder.walk(kept[n], st, keep=n < len(kept) - 1, start=stop + 1)
        kept[n] = None
        if y is not None:
            out[:, :, j] = vae.encode_mean(y)
            j += 1
    assert j == out.shape[2], (j, out.shape)
    return out


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to call
        return None


def release_free_heap(device) -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`), on the CPU only.

    Frees nothing that is in use; it only makes the next allocations fault fresh pages (cheap next to a
    band of convolutions). Called at the points of a banded run where the live set is smallest, so the
    holes the previous phase left behind do not add to the next phase's peak RSS."""
    if torch.device(device).type == "cpu":
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


# ----------------------------------------------------------------------------------------------------
# Row bookkeeping
# ----------------------------------------------------------------------------------------------------
def row_slice(pieces: list, lo: int, hi: int) -> list:
    """Rows [lo, hi) of consecutive (first row, frame rows) pieces, as such pieces (views; a row slice of
    an NHWC CPU frame is still dense)."""
    out = []
    for r0, x in pieces:
        a, b = max(lo, r0), min(hi, r0 + x.shape[2])
        if a < b:
            out.append((a, x[:, :, a - r0:b - r0]))
    return out


class Band:
    """Row bookkeeping of one band of a banded decode or encode, per layer `key`.

    From the band before it (`carry`, None for the first band): where that band stopped at each layer
    (`carry["end"][key]`), and its last input rows of each layer and frame (`carry[key][n]` = (first
    row, rows)). It records the same for the next band in `stored` (None for the last band).

    The carried rows of a layer live in one ring of frames + 1 slots that every band shares
    (`stored["rings"]`): the band with shift s (0 for the first, one less for each band after it) writes
    frame n's rows into slot (n + s) mod (frames + 1), the slot from which it read the previous band's rows
    of frame n - 1 (the spare slot at n = 0). A band reads and writes carried rows with one buffer per layer
    instead of two."""

    def __init__(self, c1: int, split_rows: int, frames: int, last: bool, carry: Optional[dict], channels_last: bool):
        self.c1, self.split_rows, self.frames, self.last, self.carry = c1, split_rows, frames, last, carry
        self.stored = None if last else {"end": {}, "rings": dict(carry["rings"]) if carry else {},
                                         "shift": carry["shift"] - 1 if carry else 0}
        self.channels_last = channels_last

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
        pieces += row_slice(src, max(lo, own), hi)
        if sum(x.shape[2] for _, x in pieces) != hi - lo:
            have = [(r, r + x.shape[2]) for r, x in pieces]
            raise RuntimeError(f"banded decode: layer {key} needs input rows [{lo}, {hi}), has {have}")
        if store and self.stored is not None and nxt < hi:
            r0 = max(nxt, lo)
            if key not in self.stored:
                self.stored[key] = self._slots(key, pieces[0][1], r0, hi - r0)
            dst = self.stored[key][n][1]
            for a, x in row_slice(pieces, r0, hi):
                dst[:, :, a - r0:a - r0 + x.shape[2]] = x
        return pieces

    def _slots(self, key, ref: torch.Tensor, r0: int, rows: int) -> list:
        """Where frame n's carried rows [r0, r0 + rows) of layer `key` go: (r0, a view of its ring slot) per
        frame. A ring is a few long-lived allocations, not one per frame; a new one is made if the layer
        carries more rows than the ring holds (the bands carry the same few rows of a layer, so only
        at the first band)."""
        rings, k, b = self.stored["rings"], self.frames + 1, ref.shape[0]
        buf = rings.get(key)
        if (buf is None or buf.shape[2] < rows or (buf.shape[1], buf.shape[3]) != (ref.shape[1], ref.shape[3])
                or buf.dtype != ref.dtype or buf.device != ref.device):
            buf = torch.empty((k * b, ref.shape[1], rows, ref.shape[3]), dtype=ref.dtype, device=ref.device,
                              memory_format=memory_format(self.channels_last))
            rings[key] = buf
        shift = self.stored["shift"]
        return [(r0, buf[j * b:(j + 1) * b, :, :rows]) for j in ((n + shift) % k for n in range(self.frames))]


class BandOps:
    """Runs the model's walks (`Encoder3d.walk` / `Decoder3d.walk`) on one band of one frame at a time,
    in place of `wan_vae.FrameOps`. A frame here is the tensor of the band's rows [lo, lo + its height)
    at the current layer; `lo` and the current frame height `rows` are tracked as the walk proceeds."""

    def __init__(self, band: Band, needs: dict):
        self.band, self.needs = band, needs

    def begin(self, n: int, rows: int) -> None:
        """Frame n enters, whole, with `rows` rows: its first layer stores no carry (every band has it all)."""
        self.n, self.rows, self.lo, self.whole = n, rows, 0, True

    def _take(self, key, src: list, lo: int, hi: int, nxt: int) -> list:
        pieces = self.band.take(key, self.n, src, lo, hi, nxt, store=not self.whole)
        self.whole = False
        return pieces

    def _conv(self, key, conv, norm, src: list, need: int, st, keep: bool) -> tuple:
        """(norm + SiLU +) causal 3x3 conv of the band: (first row, output rows, input pieces)."""
        lo, hi = self.band.out_rows(key, self.rows, need)
        inp = self._take(key, src, max(0, lo - 1), min(self.rows, hi + 1), hi - 1)
        out = conv_rows(conv, [x for _, x in inp], (int(lo == 0), int(hi == self.rows)), st, keep, norm)
        return lo, out, inp

    def conv(self, key, conv, norm, x, st, keep: bool):
        self.lo, out, _ = self._conv(key, conv, norm, [(self.lo, x)], self.needs[key], st, keep)
        return out

    def block(self, key, block, x, st, keep: bool):
        """A residual block of the band (its two convs and the shortcut of the rows they keep)."""
        r, need = block.residual, self.needs[key]
        lo1, h, inp = self._conv((key, 0), r[2], r[0], [(self.lo, x)], need + 1, st, keep)
        self.lo, h, _ = self._conv((key, 1), r[6], r[3], [(lo1, h)], need, st, keep)
        for r0, xx in row_slice(inp, self.lo, self.lo + h.shape[2]):  # the block input's rows (carried ones included)
            dst = h[:, :, r0 - self.lo:r0 - self.lo + xx.shape[2]]
            dst += block.skip(xx)
        return h

    def spatial(self, key, layer, x, st):
        """The band's rows of a resampling's spatial part (the walk then applies its temporal part)."""
        rows, cl, key2 = self.rows, st.channels_last, ("resample", key)
        if layer.up:
            lo, hi = self.band.out_rows(key2, 2 * rows, self.needs[key], even=True)
            inp = self._take(key2, [(self.lo, x)], max(0, lo // 2 - 1), min(rows, hi // 2 + 1), hi // 2 - 1)
            y = up_rows(layer, [t for _, t in inp], rows, lo, hi, cl)
            self.rows *= 2
        else:
            lo, hi = self.band.out_rows(key2, rows // 2, self.needs[key])
            inp = self._take(key2, [(self.lo, x)], 2 * lo, min(rows, 2 * hi + 1), 2 * hi)
            y = down_rows(layer, [t for _, t in inp], lo, hi, cl)
            self.rows //= 2
        self.lo = lo
        return y


# ----------------------------------------------------------------------------------------------------
# Layers on rows
# ----------------------------------------------------------------------------------------------------
def conv_rows(conv, pieces: list, pad: tuple[int, int], st, keep: bool, norm) -> torch.Tensor:
    """`CausalConv3d.step` for one band of a frame, input given before its norm + SiLU.

    pieces: row slices [B, C, h_i, W] that follow each other (rows carried over from the previous band,
    then the band's own); pad = (top, bottom) zero rows where the band touches the image edge. They are
    normalised one after another into one frame that holds the explicit zero rows, and the conv runs
    without row padding, so it computes exactly the valid output rows: sum(h_i) + sum(pad) - 2.
    The frames are recycled: the oldest tap is convolved first, and in fp32 the new frame is then
    normalised straight into its buffer (no temporary, no copy); the long-lived caches then stay put
    in the heap while per-frame temporaries churn around them, which keeps glibc's heap from
    fragmenting."""
    s = st.slot(conv)
    padding, cl = (0, conv.pad_s), st.channels_last
    if conv.out_channels < conv.in_channels:  # the head: partial sums, no input frames kept
        return conv.partial_step(norm_rows(norm, pieces, pad, cl), s, keep, padding, st.scratch)
    w = conv.weight
    if conv.pairs_apply(pieces[0], s):  # half of a Winograd pair (see CausalConv3d.pair_step)
        x = norm_rows(norm, pieces, pad, cl)
        out = conv.pair_step(x, s, keep, padding, st.scratch, own=True)  # the frame it drops holds differences
    elif pieces[0].dtype == torch.float32:
        out = conv.conv2d(s[0], w[:, :, 0], None, padding, st.scratch) if s[0] is not None else None
        x = norm_rows(norm, pieces, pad, cl, out=s[0])
        y = conv.conv2d(x, w[:, :, 2], conv.bias, padding, st.scratch)
        out = y if out is None else out.add_(y)
        if s[1] is not None:
            out += conv.conv2d(s[1], w[:, :, 1], None, padding, st.scratch)
    else:  # low precision: the taps are stacked into one conv (see `taps`); the frame is then copied
        x = norm_rows(norm, pieces, pad, cl)  # into the oldest buffer, or a new one of the conv's own
        out = conv.taps([s[0], s[1], x], padding=padding)
        x = (s[0] if s[0] is not None else empty_frame(x, cl)).copy_(x)
    if keep:
        s[0], s[1] = s[1], x
    else:
        s[0] = s[1] = None
    return out


def norm_rows(norm, pieces: list, pad: tuple[int, int], cl: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMS norm + SiLU (none if `norm` is None) of row pieces (see `conv_rows`), written one after another
    into one frame with pad = (top, bottom) zero rows; `out`: a frame of that shape from an earlier call
    with the same pad (its zero rows are never written, so they stay zero)."""
    ref = pieces[0]
    rows = pad[0] + sum(p.shape[2] for p in pieces) + pad[1]
    if out is None:
        out = empty_frame(ref, cl, rows)
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
            dst.copy_(rms_norm_cf(p if p.device.type == "cpu" else p.contiguous(), gamma, None, silu=True))
        r += p.shape[2]
    return out


def up_rows(layer, pieces: list, rows: int, out_lo: int, out_hi: int, cl: bool) -> torch.Tensor:
    """Rows [out_lo, out_hi) (out_lo even) of `Resample.spatial` (upsampling) for one band of a frame
    `rows` high. pieces: consecutive row slices covering low-res rows [max(0, out_lo/2 - 1),
    min(rows, out_hi//2 + 1)), the ones those output rows see. They are copied once into a frame with the
    zero border (as F.pad would), and only the sub-pixel phases of the wanted rows are convolved."""
    conv = layer.resample[1]
    m0, m1 = out_lo // 2, (out_hi + 1) // 2  # low-res rows whose x2 rows cover [out_lo, out_hi)
    ref = pieces[0]
    xp = empty_frame(ref, cl, m1 - m0 + 2, ref.shape[3] + 2)  # low-res rows [m0 - 1, m1 + 1), cols [-1, W]
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
    y = subpixel_conv(xp, conv.bias, layer.subpixel_kernels(ref.dtype, cl))
    return y[:, :, out_lo - 2 * m0:out_hi - 2 * m0]


def down_rows(layer, pieces: list, out_lo: int, out_hi: int, cl: bool) -> torch.Tensor:
    """Rows [out_lo, out_hi) of `Resample.spatial` (downsampling: zero row and column at the bottom/right,
    then the stride-2 3x3 conv) for one band; pieces: consecutive slices of the input rows
    [2 out_lo, min(rows, 2 out_hi + 1)), copied once into a frame with the zero column (and zero row
    if the band reaches the bottom)."""
    ref = pieces[0]
    n = 2 * (out_hi - out_lo) + 1
    xp = empty_frame(ref, cl, n, ref.shape[3] + 1)
    xp[..., -1].zero_()
    r = 0
    for p in pieces:
        xp[:, :, r:r + p.shape[2], :-1] = p
        r += p.shape[2]
    if r < n:
        xp[:, :, r:].zero_()
    return layer.resample[1](xp)
