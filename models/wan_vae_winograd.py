"""Winograd F(2x2, 3x3) for the wide 3x3 convolutions of the Wan VAEs on the CPU.

A 3x3 conv at stride 1 computes each 2x2 block of output pixels from a 4x4 block of input pixels. Winograd's
minimal filtering does it with 16 multiplies per (input, output) channel pair instead of 36: the input
block d becomes B^T d B, the kernel g becomes G g G^T (both 4x4), they are multiplied elementwise, and
A^T (.) A gives the 2x2 outputs. Summed over input channels, the 16 elementwise products are 16 matrix
products [blocks x C_in] @ [C_in x C_out] (one batched GEMM), so the multiply count drops 2.25x.

Where it pays here (2 cores, AMD EPYC family 25 model 17 (Zen 4), against oneDNN's direct conv, scratch reused): 3x3 convs with >= 160
input channels and >= 32x32 output pixels, 1.15-1.7x per conv (1.17x at 160 channels / 128 px, 1.27x at
256 / 128 px, 1.52x at 512 / 64 px and 1024 / 32 px, 1.69x 1024->512 / 64 px); narrower convs gain
nothing (0.99x at 128 channels, 0.90x at 96) and at 16x16 px the per-call kernel transform costs more
than it saves (0.80x at 1024 channels). Rounding is smaller than the direct conv's (the transforms use only
1/2 and sums; measured 2.4e-6 vs 9e-6 max abs against float64 at 1024 channels).
`CausalConv3d.conv2d` decides per conv (CPU, fp32/fp64, inference, >= `MIN_CHANNELS` input channels).

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

MIN_CHANNELS = 160  # narrower convs stay direct (see the module docstring)
MIN_PIXELS = 32 * 32  # so do smaller frames: the kernel transform costs as much as the pixels save
CHUNK_ELEMENTS = 1 << 22  # transformed kernel / input / products per run (16 MiB each in fp32)


def _buffer(ws: Optional[dict], name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of `shape` from the workspace `ws` (grown as needed, reused across calls: large
    fresh allocations are fresh pages, and faulting them in costs as much as the transforms), or new."""
    n = math.prod(shape)
    buf = None if ws is None else ws.get(name)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        buf = torch.empty(n, dtype=like.dtype, device=like.device)
        if ws is not None:
            ws[name] = buf
    return buf[:n].view(shape)


class TapSum(NamedTuple):
    """The kernel (g0 + g2 + sign g1) / 2 of a causal conv's time taps g_k = w[:, :, k] (w [C_out, C_in, 3,
    kh, kw]), formed where it is used: `kernel_transform` sums it one kernel row at a time into its output,
    and only a direct conv asks for the whole kernel (`dense`), so a wide layer's time pair needs no
    kernel-sized temporary."""
    w: torch.Tensor
    sign: float

    @property
    def shape(self) -> torch.Size:
        return self.w[:, :, 0].shape

    def part(self, o0: int, o1: int) -> "TapSum":
        return TapSum(self.w[o0:o1], self.sign)

    def dense(self) -> torch.Tensor:
        w = self.w
        return torch.add(w[:, :, 0], w[:, :, 2]).add_(w[:, :, 1], alpha=self.sign).mul_(0.5)

    def kernel_row(self, k: int, out: torch.Tensor) -> None:
        """Row kh = k of the kernel, as [kw, C_out, C_in], into `out` (the same sums as `dense`)."""
        g = [self.w[:, :, t, k].permute(2, 0, 1) for t in range(3)]
        torch.add(g[0], g[2], out=out).add_(g[1], alpha=self.sign).mul_(0.5)


def kernel(w) -> torch.Tensor:
    """A kernel tensor, or the whole kernel of a `TapSum`."""
    return w.dense() if isinstance(w, TapSum) else w


def kernel_transform(w, ws: Optional[dict] = None) -> torch.Tensor:
    """G g G^T of a [C_out, C_in, 3, 3] kernel (a tensor or a `TapSum`) as [16, C_out, C_in] (the GEMM reads
    it transposed), formed in the scratch: g's rows go to slots (0, 1, 3) of the first index, G g is
    completed there, then G^T along the second index with one [C_out, C_in] temporary. With the CPU's
    channels-last kernels every (kh, kw) slice is [C_out, C_in] with unit stride along C_in, so each sum
    streams rows of the kernel."""
    o, i = w.shape[:2]
    ref = w.w if isinstance(w, TapSum) else w
    out = _buffer(ws, "kernel", (4, 4, o, i), ref)
    tmp = _buffer(ws, "kernel_row", (o, i), ref)
    for k, slot in ((0, 0), (1, 1), (2, 3)):  # g's kernel rows (kw, O, I) into out[slot, :3]
        if isinstance(w, TapSum):
            w.kernel_row(k, out[slot, :3])
        else:
            out[slot, :3] = w[:, :, k].permute(2, 0, 1)
    g0, g1, g2 = out[0, :3], out[1, :3], out[3, :3]
    torch.sub(g0, g1, out=out[2, :3]).add_(g2).mul_(0.5)  # G g, row 2: (g0 - g1 + g2) / 2
    g1.add_(g0).add_(g2).mul_(0.5)  # row 1: (g0 + g1 + g2) / 2
    for r in out:  # (G g) G^T: r = (r0, r1, r2, -) -> (r0, (r0 + r1 + r2) / 2, (r0 - r1 + r2) / 2, r2)
        torch.add(r[0], r[2], out=tmp)
        r[3] = r[2]
        torch.sub(tmp, r[1], out=r[2]).mul_(0.5)
        r[1].add_(tmp).mul_(0.5)
    return out.view(16, o, i)


def _input_transform(x: torch.Tensor, th: int, tw: int, ws: Optional[dict] = None) -> torch.Tensor:
    """B^T d B of every 4x4 block (stride 2) of a padded NHWC frame x [N, 2th+2, 2tw+2, C] -> [16, N*th*tw, C]
    (one row combination of the blocks alive at a time)."""
    n, c = x.shape[0], x.shape[-1]
    r = lambda k: x[:, k:k + 2 * th:2]  # row k of every block: [N, th, W, C]
    out = _buffer(ws, "input", (4, 4, n, th, tw, c), x)
    for i, (a, b, sign) in enumerate(((0, 2, -1), (1, 2, 1), (2, 1, -1), (1, 3, -1))):
        v = torch.add(r(a), r(b), alpha=sign)
        col = lambda k: v[:, :, k:k + 2 * tw:2]
        torch.sub(col(0), col(2), out=out[i, 0])
        torch.add(col(1), col(2), out=out[i, 1])
        torch.sub(col(2), col(1), out=out[i, 2])
        torch.sub(col(1), col(3), out=out[i, 3])
    return out.view(16, n * th * tw, c)


def _output_transform(m: torch.Tensor, y: torch.Tensor) -> None:
    """A^T m A of every block into y: m [16, N*th*tw, C_out] (scratch: overwritten) -> y, a view
    [N, th, 2, tw, 2, C_out]. The row combinations are formed in m itself, so no temporaries."""
    m = m.view((4, 4) + y.shape[:2] + y.shape[3:4] + y.shape[5:])
    m[0].add_(m[1]).add_(m[2])  # A^T's first row (reads m[1] before it changes)
    m[1].sub_(m[2]).sub_(m[3])  # its second row
    for a, r in enumerate((m[0], m[1])):
        torch.add(r[0], r[1], out=y[:, :, a, :, 0]).add_(r[2])
        torch.sub(r[1], r[2], out=y[:, :, a, :, 1]).sub_(r[3])


def _padded(x: torch.Tensor, top: int, right: int, bottom: int, left: int, ws: Optional[dict]) -> torch.Tensor:
    """x [N, C, H, W] as NHWC with zero borders, in the scratch (a conv-sized copy per call otherwise)."""
    n, c, h, w = x.shape
    xp = _buffer(ws, "padded", (n, top + h + bottom, left + w + right, c), x)
    for edge in (xp[:, :top], xp[:, top + h:], xp[:, top:top + h, :left], xp[:, top:top + h, left + w:]):
        edge.zero_()
    xp[:, top:top + h, left:left + w] = x.permute(0, 2, 3, 1)
    return xp


def conv3x3(x: torch.Tensor, w, bias: Optional[torch.Tensor], padding,
            ws: Optional[dict] = None) -> torch.Tensor:
    """`F.conv2d(x, w, bias, padding=padding)` for a 3x3 kernel at stride 1, by Winograd F(2x2, 3x3).

    x [N, C, H, W] (any memory format; the result is channels-last, as the CPU frames); padding: an int or
    (rows, cols) of zeros on both sides. Odd output sizes are computed on one extra zero row/column and
    cropped. The blocks go through in runs of block rows, and the output channels in groups, so that the
    transformed kernel, input and products stay within `CHUNK_ELEMENTS` each (a wide kernel is transformed
    in parts, the input once per part). `ws`: a dict that keeps the scratch tensors between calls (one stream's
    `CausalState.scratch`); the output never aliases it."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    n, c, h, wd = x.shape
    ho, wo = h + 2 * ph - 2, wd + 2 * pw - 2
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    xp = _padded(x, ph, pw + (wo & 1), ph + (ho & 1), pw, ws)  # NHWC
    co = w.shape[0]
    y = torch.empty((n, th, 2, tw, 2, co), dtype=x.dtype, device=x.device)
    cstep = max(1, CHUNK_ELEMENTS // (16 * c))  # output channels per kernel transform
    step = max(1, CHUNK_ELEMENTS // (16 * n * tw * max(c, min(co, cstep))))  # block rows per run
    for o0 in range(0, co, cstep):
        o1 = min(co, o0 + cstep)
        part = w.part(o0, o1) if isinstance(w, TapSum) else w[o0:o1]
        u = kernel_transform(part, ws).transpose(1, 2)  # [16, C_in, o1 - o0]
        for r0 in range(0, th, step):
            r1 = min(th, r0 + step)
            v = _input_transform(xp[:, 2 * r0:2 * r1 + 2], r1 - r0, tw, ws)
            m = torch.bmm(v, u, out=_buffer(ws, "product", (16, v.shape[1], o1 - o0), v))
            _output_transform(m, y[:, r0:r1, :, :, :, o0:o1])
    y = y.view(n, 2 * th, 2 * tw, co)
    if bias is not None:
        y += bias
    y = y[:, :ho, :wo].permute(0, 3, 1, 2)
    return y if (ho, wo) == (2 * th, 2 * tw) else y.contiguous(memory_format=torch.channels_last)


def applies(c_in: int, out_pixels: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether `CausalConv3d.conv2d` takes Winograd for a 3x3 conv of this width and output size (memory
    estimates ask this too; the conv also needs inference mode)."""
    return (c_in >= MIN_CHANNELS and out_pixels >= MIN_PIXELS and device_type == "cpu"
            and dtype in (torch.float32, torch.float64))


def scratch_elements(convs, dtype: torch.dtype, device_type: str) -> int:
    """Elements of the scratch one stream keeps (`conv3x3`'s `ws`) for convs [(c_in, c_out, output pixels)]:
    each buffer grows to its largest use, at most `CHUNK_ELEMENTS`: the transformed kernel (16 c_in c_out),
    input (4 px c_in) and products (4 px c_out), a kernel row of it (1/16); and the zero-bordered input
    (px c_in, + ~15% for the borders of a band or a small frame)."""
    wide = [(ci, co, px) for ci, co, px in convs if applies(ci, px, dtype, device_type)]
    if not wide:
        return 0
    kern, inp, prod = (min(CHUNK_ELEMENTS, max(f(ci, co, px) for ci, co, px in wide))
                       for f in (lambda ci, co, px: 16 * ci * co, lambda ci, co, px: 4 * px * ci,
                                 lambda ci, co, px: 4 * px * co))
    return kern + kern // 16 + inp + prod + int(1.15 * max(px * ci for ci, _, px in wide))
