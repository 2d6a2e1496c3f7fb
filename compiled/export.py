"""One export path for every backend: `torch.export` of a denoiser forward and of a VAE chunk step.

Read top to bottom: the shape profile, the exportable graph modules (the Wan DiT forward with RoPE
tables as buffers and the folded text padding as inputs; the Wan VAE decode/encode chunk step with
its causal feature cache as explicit inputs/outputs), then the export functions.

Why graph modules instead of exporting the models as they are:
  * `WanDiT` caches RoPE tables in a dict keyed by the token grid; under export the grid is symbolic
    and cannot be a dict key. The graph keeps per-axis cos/sin tables for the profile's largest grid
    as buffers and slices them to the traced size. cos/sin of the concatenated per-axis angles equals
    the concatenation of per-axis cos/sin, so the tables are bit-identical to `rope_tables`.
  * The folded text padding adds a logit bias log(512 - L) that depends on the text length L; a
    Python `math.log` of a symbolic size would specialise it. The bias is computed eagerly by
    `prepare_text` (cheap) and fed as an input. With no padding (L = 512) the extra token gets -inf,
    which contributes exactly nothing to the softmax, so one graph covers every length.
  * `WanVAE` streams frames through its public step functions (`decode_step` / `encode_step`) with a
    `CausalState` of per-module caches. The graph fills that state from a flat tuple of tensors and
    reads it back (`CausalState.load_flat` / `flat`), so it runs the model's own per-frame code (no
    copy of the decoder), with a zero tensor standing for "no frame yet" (a zero frame adds exactly 0
    to a causal conv tap sum in float32).

Shapes in a profile are in latent units: frames = latent frames, height/width = latent pixels
(video pixels / 8), text = real text tokens (the graph's text axis is text + 1).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# Example inputs never use 0 or 1 on a dynamic axis: torch.export would specialise such an axis to
# the constant (the 0/1 specialisation), so examples are clamped to >= 2.
_MIN_EXAMPLE = 2


# ----------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """min <= opt <= max of one axis; static when min == max."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"shape range needs 1 <= min <= opt <= max, got min={self.min} opt={self.opt} "
                             f"max={self.max}")

    @property
    def static(self) -> bool:
        return self.min == self.max

    def example(self) -> int:
        """The size used to trace: opt, moved to >= 2 on dynamic axes (0/1 specialisation)."""
        if self.static:
            return self.min
        return min(max(self.opt, _MIN_EXAMPLE), self.max)

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max

    @classmethod
    def of(cls, value) -> "Range":
        if isinstance(value, Range):
            return value
        if isinstance(value, int):
            return cls(value, value, value)
        lo, opt, hi = value
        return cls(int(lo), int(opt), int(hi))


@dataclass(frozen=True)
class Profile:
    """min/opt/max of batch, latent frames, latent height/width and text tokens for one sub-graph."""

    batch: Range = field(default_factory=lambda: Range(1, 1, 1))
    frames: Range = field(default_factory=lambda: Range(1, 1, 1))
    height: Range = field(default_factory=lambda: Range(8, 8, 8))
    width: Range = field(default_factory=lambda: Range(8, 8, 8))
    text: Range = field(default_factory=lambda: Range(1, 1, 1))

    def __post_init__(self):
        for name in ("batch", "frames", "height", "width", "text"):
            object.__setattr__(self, name, Range.of(getattr(self, name)))

    @classmethod
    def make(cls, **axes) -> "Profile":
        """`Profile.make(batch=(1, 1, 2), frames=(2, 5, 9), height=60, ...)`: ints are static axes."""
        unknown = set(axes) - {"batch", "frames", "height", "width", "text"}
        if unknown:
            raise ValueError(f"unknown profile axes {sorted(unknown)}; use batch, frames, height, width, text")
        return cls(**{k: Range.of(v) for k, v in axes.items()})

    def to_dict(self) -> dict:
        return {k: [v["min"], v["opt"], v["max"]] for k, v in asdict(self).items()}

    def text_key(self) -> str:
        return ",".join(f"{k}={a}..{o}..{b}" for k, (a, o, b) in self.to_dict().items())

    def union(self, other: "Profile") -> "Profile":
        """The smallest profile containing both (opt from self)."""
        def u(a: Range, b: Range) -> Range:
            return Range(min(a.min, b.min), a.opt, max(a.max, b.max))
        return Profile(*(u(getattr(self, k), getattr(other, k)) for k in ("batch", "frames", "height", "width", "text")))

    def outside(self, **sizes) -> Optional[str]:
        """None if every given axis size is inside the profile, else a one-line reason."""
        for name, n in sizes.items():
            r = getattr(self, name)
            if not r.contains(int(n)):
                return f"{name} {int(n)} is outside the compiled profile [{r.min}, {r.max}]"
        return None


def _dim(name: str, r: Range, multiple: int = 1):
    """A `torch.export.Dim` for an axis (None = static); `multiple` > 1 gives a derived dim (k * d)."""
    from torch.export import Dim

    if r.static:
        return None
    if r.min % multiple or r.max % multiple:
        raise ValueError(f"profile axis {name} [{r.min}, {r.max}] must be a multiple of {multiple} at both ends "
                         f"(the patch size); round the range to multiples of {multiple}")
    base = Dim(name, min=max(1, r.min // multiple), max=r.max // multiple)
    return base * multiple if multiple > 1 else base


def _example(r: Range, multiple: int = 1) -> int:
    n = r.example()
    if multiple > 1 and n % multiple:
        n = min(n + multiple - n % multiple, r.max)
        if n % multiple:
            n -= n % multiple
    return n


# ----------------------------------------------------------------------------------------------
# DiT graph
# ----------------------------------------------------------------------------------------------

def _axis_tables(n: int, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (n, d/2) float32 of position * theta^(-2j/d), angles in float64 as `rope_tables`."""
    inv = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def _in_dtype(layer: nn.Module) -> torch.dtype:
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.element_size() >= 2:
        return w.dtype
    return torch.float32


def prepare_text(dit: nn.Module, context: Optional[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager prelude of `WanDiTGraph`: (context + one padding token (B, L+1, text_dim), bias (1,1,1,L+1) fp32).

    The padding token's logit bias is log(text_len - L): N identical zero-embedding keys act as one key
    with its logit raised by log(N) (see models/wan_dit.py); -inf when there is no padding."""
    cfg = dit.config
    cdt = dit.patch_embedding.weight.dtype
    device = dit.patch_embedding.weight.device
    if context is None:
        context = torch.zeros(batch, 0, cfg.text_dim, device=device, dtype=cdt)
    if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
        raise ValueError(f"Wan DiT context must be (B, L, {cfg.text_dim}), got {tuple(context.shape)}")
    if context.shape[0] not in (1, batch):
        raise ValueError(f"Wan DiT context batch {context.shape[0]} does not match the latent batch {batch}")
    n_real = context.shape[1]
    if n_real > cfg.text_len:
        raise ValueError(f"Wan DiT context has {n_real} tokens; at most {cfg.text_len} (text_len)")
    context = context.to(device=device, dtype=cdt).expand(batch, -1, -1)
    padded = torch.cat([context, context.new_zeros(batch, 1, cfg.text_dim)], dim=1)  # (B, L+1, text_dim)
    bias = torch.zeros(1, 1, 1, n_real + 1, device=device, dtype=torch.float32)
    n_pad = cfg.text_len - n_real
    bias[..., -1] = math.log(n_pad) if n_pad > 0 else float("-inf")
    return padded, bias


class WanDiTGraph(nn.Module):
    """The exportable Wan DiT forward: (x, timestep, padded context, text bias) -> velocity.

    Same computation as `WanDiT.forward` with folded text padding; RoPE per-axis tables are buffers
    sized for `max_grid` (latent frames, latent height, latent width) and sliced to the input."""

    def __init__(self, dit: nn.Module, max_grid: tuple[int, int, int]):
        super().__init__()
        self.dit = dit
        cfg = dit.config
        if getattr(cfg, "image_dim", 0):  # the graph has no clip_fea input: it would drop the image cross-attention
            from ..core.errors import UnsupportedError

            raise UnsupportedError("compiling a Wan I2V/FLF2V model with CLIP image features is not supported yet "
                                   "(the exported graph takes no clip_fea); run this model uncompiled")
        pt, ph, pw = cfg.patch_size
        sizes = (max_grid[0] // pt, max_grid[1] // ph, max_grid[2] // pw)
        for axis, n, d in zip("fhw", sizes, cfg.rope_dims):
            c, s = _axis_tables(max(n, 1), d, cfg.rope_theta)
            self.register_buffer(f"rope_cos_{axis}", c.to(dit.patch_embedding.weight.device), persistent=False)
            self.register_buffer(f"rope_sin_{axis}", s.to(dit.patch_embedding.weight.device), persistent=False)

    def _rope(self, f: int, h: int, w: int):
        def full(prefix):
            tf, th, tw = (getattr(self, f"{prefix}_{a}") for a in "fhw")
            return torch.cat([tf[:f, None, None, :].expand(f, h, w, -1),
                              th[None, :h, None, :].expand(f, h, w, -1),
                              tw[None, None, :w, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)
        return full("rope_cos"), full("rope_sin")  # (L, head_dim/2) fp32 each

    def forward(self, x, timestep, context, text_bias):
        from ..models.wan_dit import sinusoidal_embedding

        dit = self.dit
        cfg = dit.config
        b, _, t, hh, ww = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = t // pt, hh // ph, ww // pw
        cdt = dit.patch_embedding.weight.dtype
        # fp32 islands exactly as WanDiT.forward
        e = dit.time_embedding(sinusoidal_embedding(timestep, cfg.freq_dim).to(_in_dtype(dit.time_embedding[0]))).float()
        e0 = dit.time_projection(e.to(_in_dtype(dit.time_projection[1]))).float().unflatten(1, (6, cfg.dim))
        ctx = dit.text_embedding(context.to(cdt))  # (B, L+1, D)
        cos, sin = self._rope(f, h, w)
        hs = dit.patch_embedding(x.to(cdt)).flatten(2).transpose(1, 2).float()  # (B, L, D) fp32 stream
        for block in dit.blocks:
            hs = block(hs, e0, cos, sin, ctx, text_bias)
        out = dit.head(hs, e)  # (B, L, pt*ph*pw*C)
        out = out.view(b, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, t, hh, ww).to(x.dtype)


def _distinct(ranges: list, reserved=(16,)) -> list:
    """Tracing sizes that differ from each other (and from static sizes like 16 channels) where the
    ranges allow: torch.compile's duck sizing ties axes that happen to be equal in the first call
    (then a later call with batch != frames recompiles)."""
    used, out = set(reserved), []
    for r, m in ranges:
        n = _example(r, m)
        if not r.static:
            cand = n
            while cand in used and cand + m <= r.max:
                cand += m
            if cand in used:
                cand = n
                while cand in used and cand - m >= max(r.min, _MIN_EXAMPLE):
                    cand -= m
            n = cand if cand not in used else n
        used.add(n)
        out.append(n)
    return out


def dit_example_inputs(dit: nn.Module, profile: Profile, opt: bool = False):
    """Example (x, timestep, context, bias) at the tracing sizes (or at the opt sizes with `opt`)."""
    cfg = dit.config
    pt, ph, pw = cfg.patch_size
    if opt:
        b, t, hh, ww, n_text = (getattr(profile, a).opt for a in ("batch", "frames", "height", "width", "text"))
    else:
        tr = profile.text
        b, t, hh, ww, lc = _distinct([(profile.batch, 1), (profile.frames, pt), (profile.height, ph),
                                      (profile.width, pw), (Range(tr.min + 1, tr.opt + 1, tr.max + 1), 1)])
        n_text = lc - 1
    device, cdt = dit.patch_embedding.weight.device, dit.patch_embedding.weight.dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cfg.in_dim, t, hh, ww, generator=g).to(device, cdt)
    timestep = torch.linspace(900.0, 100.0, b).to(device)
    ctx = torch.randn(b, n_text, cfg.text_dim, generator=g).to(device, cdt)
    context, bias = prepare_text(dit, ctx, b)
    return x, timestep, context, bias


def dit_dynamic_shapes(dit: nn.Module, profile: Profile):
    cfg = dit.config
    pt, ph, pw = cfg.patch_size
    b = _dim("batch", profile.batch)
    f = _dim("frames", profile.frames, pt)
    h = _dim("height", profile.height, ph)
    w = _dim("width", profile.width, pw)
    # graph text axis = real tokens + the one folded padding token
    tr = profile.text
    lc = None if tr.static else _dim("text", Range(tr.min + 1, tr.opt + 1, tr.max + 1))
    x = {k: v for k, v in {0: b, 2: f, 3: h, 4: w}.items() if v is not None}
    return (x, {0: b} if b is not None else {}, {k: v for k, v in {0: b, 1: lc}.items() if v is not None},
            {3: lc} if lc is not None else {})


def dit_graph(dit: nn.Module, profile: Profile) -> "WanDiTGraph":
    """The exportable forward of `dit` for `profile` (RoPE tables for the profile's largest grid); no export."""
    if not hasattr(dit, "config") or not hasattr(dit.config, "rope_dims"):
        raise TypeError(f"export_dit needs a Wan DiT module (models.wan_dit.WanDiT), got {type(dit).__name__}")
    return WanDiTGraph(dit, (profile.frames.max, profile.height.max, profile.width.max)).eval()


def export_dit(dit: nn.Module, profile: Profile, graph: Optional["WanDiTGraph"] = None):
    """`torch.export` the Wan DiT forward over `profile`; returns (ExportedProgram, WanDiTGraph)."""
    graph = graph if graph is not None else dit_graph(dit, profile)
    args = dit_example_inputs(dit, profile)
    with torch.no_grad():
        ep = torch.export.export(graph, args, dynamic_shapes=dit_dynamic_shapes(dit, profile), strict=False)
    return ep, graph


# ----------------------------------------------------------------------------------------------
# VAE chunk steps
# ----------------------------------------------------------------------------------------------

def _state_geometry(vae, modules: list, probe) -> list:
    """(channels, rows, cols) of each module's slot, found by one eager probe on a small input."""
    st = vae.init_state()
    with torch.inference_mode():
        probe(st)
    geo = []
    for m in modules:
        s = st.slot(m)
        ref = s[1] if s[1] is not None else s[0]
        geo.append((ref.shape[1], ref.shape[2], ref.shape[3]))
    return geo


class WanVAEDecodeStep(nn.Module):
    """One latent frame through the Wan VAE decoder with the causal cache as explicit tensors.

    first=True:  forward(z [B,z,h,w])          -> (frames [B,3,1,8h,8w], *cache)
    first=False: forward(z [B,z,h,w], *cache)  -> (frames [B,3,r,8h,8w], *cache)   r = temporal ratio
    The cache is 2 tensors per 3-tap causal conv of the decoder (previous two inputs, zeros = none): the
    `CausalState` of `vae.decode_step` as flat tensors (`CausalState.load_flat` / `flat`)."""

    PROBE = 2  # latent pixels of the probe that measures cache geometry

    def __init__(self, vae: nn.Module, first: bool):
        super().__init__()
        self.vae = vae
        self.first = first
        self.modules_ = vae.state_modules("decoder")
        p = self.PROBE

        def probe(st):
            z = torch.zeros(1, vae.cfg.z_dim, p, p, device=vae.device, dtype=vae.dtype)
            for _ in range(2):
                for _frame in vae.decode_step(z, st):
                    pass

        geo = _state_geometry(vae, self.modules_, probe)
        # scale of each slot relative to the latent size (upsampling only: integer multiples)
        self.geometry = [(c, hh // p, ww // p) for (c, hh, ww) in geo]

    def cache_shapes(self, b: int, h: int, w: int) -> list:
        return [s for (c, ky, kx) in self.geometry for s in ((b, c, h * ky, w * kx),) * 2]

    def zero_cache(self, b: int, h: int, w: int) -> tuple:
        vae = self.vae
        return tuple(torch.zeros(s, device=vae.device, dtype=vae.dtype) for s in self.cache_shapes(b, h, w))

    def forward(self, z, *cache):
        vae = self.vae
        b, _, h, w = z.shape

        def zeros(i, j):
            c, ky, kx = self.geometry[i]
            return z.new_zeros(b, c, h * ky, w * kx)

        st = vae.init_state()
        if not self.first:
            st.load_flat(self.modules_, cache)
            st.started = True
        frames = list(vae.decode_step(z, st))
        return (torch.stack(frames, dim=2),) + st.flat(self.modules_, zeros)


class WanVAEEncodeStep(nn.Module):
    """One chunk of video frames through the Wan VAE encoder (official chunking: 1 frame, then r frames).

    first=True:  forward(video [B,3,1,H,W])            -> (mu [B,z,H/8,W/8], *cache)
    first=False: forward(video [B,3,r,H,W], *cache)    -> (mu [B,z,H/8,W/8], *cache)
    At a chunk boundary every temporal downsampler holds one kept frame and no pending one, so each
    slot is 2 tensors (a downsampler's second tensor is always zero)."""

    PROBE = 16

    def __init__(self, vae: nn.Module, first: bool):
        super().__init__()
        self.vae = vae
        self.first = first
        self.modules_ = vae.state_modules("encoder")
        p = self.PROBE
        r = vae.cfg.temporal_ratio

        def probe(st):
            x = torch.zeros(1, vae.cfg.in_channels, p, p, device=vae.device, dtype=vae.dtype)
            for _ in range(1 + r):
                vae.encode_step(x, st)

        geo = _state_geometry(vae, self.modules_, probe)
        self.geometry = [(c, p // hh, p // ww) for (c, hh, ww) in geo]  # divisors of the frame size

    def cache_shapes(self, b: int, hh: int, ww: int) -> list:
        return [s for (c, dy, dx) in self.geometry for s in ((b, c, hh // dy, ww // dx),) * 2]

    def forward(self, video, *cache):
        vae = self.vae
        b, _, t, hh, ww = video.shape

        def zeros(i, j):
            c, dy, dx = self.geometry[i]
            return video.new_zeros(b, c, hh // dy, ww // dx)

        st = vae.init_state()
        if not self.first:
            st.load_flat(self.modules_, cache)  # a chunk boundary: no downsampler has a pending frame
        mus = [mu for i in range(t) if (mu := vae.encode_step(video[:, :, i], st)) is not None]
        return (mus[-1],) + st.flat(self.modules_, zeros)


def vae_decode_example(step: WanVAEDecodeStep, profile: Profile, opt: bool = False):
    pick = (lambda r: r.opt) if opt else _example
    b, h, w = pick(profile.batch), pick(profile.height), pick(profile.width)
    vae = step.vae
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, vae.cfg.z_dim, h, w, generator=g).to(vae.device, vae.dtype)
    if step.first:
        return (z,)
    return (z,) + tuple(torch.randn(s, generator=g).to(vae.device, vae.dtype) for s in step.cache_shapes(b, h, w))


def export_vae_decode_step(vae: nn.Module, profile: Profile, first: bool,
                           step: Optional[WanVAEDecodeStep] = None):
    """`torch.export` one decode step (first latent frame, or a later one) over batch/height/width."""
    if not hasattr(vae, "decoder") or not hasattr(vae, "decode_step"):
        raise TypeError(f"export_vae_decode_step needs a models.wan_vae.WanVAE, got {type(vae).__name__}")
    step = step if step is not None else WanVAEDecodeStep(vae, first).eval()
    args = vae_decode_example(step, profile)
    b, h, w = _dim("batch", profile.batch), _dim("height", profile.height), _dim("width", profile.width)
    z_dims = {k: v for k, v in {0: b, 2: h, 3: w}.items() if v is not None}
    dyn: tuple = (z_dims,)
    if not first:
        cache_dims = []
        for (c, ky, kx) in step.geometry:
            d = {k: v for k, v in {0: b, 2: (h * ky if h is not None and ky > 1 else h),
                                   3: (w * kx if w is not None and kx > 1 else w)}.items() if v is not None}
            cache_dims += [d, d]
        dyn = (z_dims, tuple(cache_dims))  # forward(z, *cache): the varargs are one tuple input
    with torch.no_grad():
        ep = torch.export.export(step, args, dynamic_shapes=dyn, strict=False)
    return ep, step


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------

def graph_fingerprint(ep) -> str:
    """sha256 of the exported graph's code (ops and their arguments), its signature, the parameter and
    buffer names/shapes/dtypes and the range constraints; never weight values."""
    h = hashlib.sha256()
    h.update(ep.graph_module.code.encode())
    h.update(str(ep.graph_signature).encode())
    for name, t in sorted(ep.state_dict.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(str(sorted((str(k), str(v)) for k, v in ep.range_constraints.items())).encode())
    return h.hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over parameter values (only for artifacts that bake the weights in)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vae_encode_example(step: WanVAEEncodeStep, profile: Profile, opt: bool = False):
    """Example video chunk (+ cache) for an encode step; profile height/width are latent pixels."""
    pick = (lambda r: r.opt) if opt else _example
    vae = step.vae
    r = vae.cfg.spatial_ratio
    b, hh, ww = pick(profile.batch), pick(profile.height) * r, pick(profile.width) * r
    t = 1 if step.first else vae.cfg.temporal_ratio
    g = torch.Generator().manual_seed(0)
    video = torch.rand(b, vae.cfg.in_channels, t, hh, ww, generator=g).to(vae.device, vae.dtype) * 2 - 1
    if step.first:
        return (video,)
    return (video,) + tuple(torch.randn(s, generator=g).to(vae.device, vae.dtype) for s in step.cache_shapes(b, hh, ww))


def export_vae_encode_step(vae: nn.Module, profile: Profile, first: bool):
    """`torch.export` one encode chunk (1 frame first, then temporal-ratio frames) over batch/height/width."""
    if not hasattr(vae, "encoder") or not hasattr(vae, "encode_step"):
        raise TypeError(f"export_vae_encode_step needs a models.wan_vae.WanVAE, got {type(vae).__name__}")
    step = WanVAEEncodeStep(vae, first).eval()
    args = vae_encode_example(step, profile)
    r = vae.cfg.spatial_ratio
    b, h, w = _dim("batch", profile.batch), _dim("height", profile.height), _dim("width", profile.width)
    hv, wv = (h * r if h is not None else None), (w * r if w is not None else None)
    video_dims = {k: v for k, v in {0: b, 3: hv, 4: wv}.items() if v is not None}
    dyn: tuple = (video_dims,)
    if not first:
        cache_dims = []
        for (c, dy, dx) in step.geometry:
            # a slot at 1/d of the frame size is (r/d) * latent size
            d = {k: v for k, v in {0: b, 2: (h * (r // dy) if h is not None else None),
                                   3: (w * (r // dx) if w is not None else None)}.items() if v is not None}
            cache_dims += [d, d]
        dyn = (video_dims, tuple(cache_dims))
    with torch.no_grad():
        ep = torch.export.export(step, args, dynamic_shapes=dyn, strict=False)
    return ep, step
