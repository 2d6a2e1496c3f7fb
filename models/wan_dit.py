"""Wan diffusion transformers (Wan2.1 T2V/I2V/FLF2V, Wan2.2 A14B experts and TI2V-5B), with the official
`WanModel` layout and state-dict keys.

Read top to bottom: config and presets, helpers (time embedding, RoPE tables), blocks, the model,
then checkpoint handling (family sniffing, config detection, loading, random weights).

Semantics follow the official `wan/modules/model.py` (T2V) as run by `text2video.py`:
  patch_embedding Conv3d (1,2,2) -> tokens (B, L, dim), L = F*(H/2)*(W/2)
  sinusoid(t) -> time_embedding -> e (B, dim) -> time_projection -> e0 (B, 6, dim)          [fp32]
  context (B, Lc, 4096) zero-padded to text_len=512 -> text_embedding -> (B, 512, dim)
  per block: m = modulation + e0 -> shift/scale/gate for self-attention and FFN
     x += self_attn(LN(x)*(1+m1)+m0) * m2      (qk RMSNorm over the full dim, 3D RoPE 44/42/42)
     x += cross_attn(LN_affine(x), context)    (qk RMSNorm, no RoPE, no mask)
     x += ffn(LN(x)*(1+m4)+m3) * m5            (GELU-tanh)
  head: (shift, scale) = head.modulation + e (not e0); linear; unpatchify with channels fastest.
The other kinds (see `WanDiTConfig`) change only this:
  I2V (in 36): x = [noise, mask, image latent] on channels; with CLIP (Wan2.1 I2V/FLF2V) the CLIP vision
     features go through img_emb (LN, Linear, GELU, Linear, LN) to image tokens, and each cross-attention adds
     a second attention on them (k_img/v_img, norm_k_img) before `o` (the official `WanI2VCrossAttention`).
     The Wan2.2 I2V experts have no CLIP: the T2V blocks with 36 input channels.
  TI2V (in/out 48, Wan2.2 5B): a timestep per token (the conditioning first frame at t=0); e, e0, every
     block's modulation and the head are then per token. We run them per group of tokens sharing a timestep
     (a latent frame, as ComfyUI's WAN22 model builds it), with the stream viewed as (B, G, S, D).

Numerics (fp32 islands): the official code runs under `autocast(bf16)` but forces the time embedding,
the modulation sums, the gated residual adds and the head into fp32. Because `x + y * e[2]` is done
under fp32 autocast, the residual stream itself becomes fp32 after the first block. We reproduce
that without autocast: the residual stream `x` is kept in float32, every norm/modulation/residual op
computes in float32 (`fused.ops`), and only the inputs of the large linears and attention are cast
to the compute dtype (the dtype of `patch_embedding.weight`). The time embedding, time projection,
modulation tables and head are kept in float32 when loading in a lower precision.

Two deliberate differences from the official code, both exact up to float rounding:
- RoPE angles are computed once per (F, H, W) grid in float64 on the host and cached as float32
  cos/sin tables; the hot path never builds complex float64 tensors.
- Text padding folding: the official code zero-pads the text context to 512 tokens, so every padded
  token carries the same vector `text_embedding(0)` and hence the same key/value in every
  cross-attention. N identical keys are equivalent to one key whose logit is raised by log(N), so we
  embed only the real tokens plus one padding token and add a log(N) bias to it (computed in fp32).
  This removes up to ~512/L of the text-side work. `WanDiT.fold_text_padding = False` runs the
  literal padded computation instead (the parity tests check both against diffusers).

Speed on the CPU (same math): the linears go through oneDNN (`linear`, with the FFN/text GELU fused into
the first GEMM) where aten's fp32 addmm reaches about half of this machine's GEMM rate; patch embedding
is one GEMM; inside `WanDiT.text_cache()` a sampler run reuses the text tokens and cross-attention K/V.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import cpu_linear
from ..core.errors import CheckpointError, UnsupportedError
from ..core.log import log_once
from ..fused import ops
from . import loading

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WanDiTConfig:
    """Hyper-parameters of a Wan `WanModel` (names follow the official constructor, plus the image fields).

    The kind of model follows from the channels and the image fields (`kind`):
      t2v   in 16, out 16                       Wan2.1 T2V, Wan2.2 T2V A14B experts
      i2v   in 36 (noise 16 + mask 4 + image latent 16), out 16; with `image_dim` (CLIP vision features
            through `img_emb`, image cross-attention `k_img/v_img`): Wan2.1 I2V/FLF2V; without: the
            Wan2.2 I2V A14B experts (no CLIP)
      ti2v  in 48, out 48                       Wan2.2 TI2V-5B (48-channel Wan2.2 VAE latent, per-token timesteps)
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512  # the official code zero-pads every prompt embedding to this many tokens
    patch_size: tuple = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    image_dim: int = 0  # width of the CLIP vision features `img_emb` takes (1280); 0 = no image cross-attention
    image_pos_tokens: int = 0  # FLF2V: tokens of the learned `img_emb.emb_pos` (2 x 257); 0 = none

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"WanDiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        d = self.head_dim
        if d % 2 or min(self.rope_dims) <= 0 or any(r % 2 for r in self.rope_dims):
            raise ValueError(f"WanDiTConfig: head_dim {d} cannot be split into even RoPE parts {self.rope_dims} "
                             f"(t gets d - 4*(d//6), h and w get 2*(d//6)); use a head_dim that is a multiple of 6*2")
        if len(self.patch_size) != 3:
            raise ValueError(f"WanDiTConfig: patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.image_pos_tokens and not self.image_dim:
            raise ValueError("WanDiTConfig: image_pos_tokens (FLF2V) needs image_dim (the image embedding)")
        if (self.in_dim, self.out_dim) not in _KINDS:
            raise ValueError(f"WanDiTConfig: in_dim {self.in_dim} / out_dim {self.out_dim} is not a Wan model "
                             f"TwinFlow runs; expected one of {sorted(_KINDS)} (t2v, i2v, ti2v)")
        if self.image_dim and _KINDS[(self.in_dim, self.out_dim)] != "i2v":
            raise ValueError(f"WanDiTConfig: image_dim is set but in_dim {self.in_dim} is not an I2V model's 36")

    @property
    def kind(self) -> str:
        """'t2v' | 'i2v' | 'ti2v' (see the class docstring)."""
        return _KINDS[(self.in_dim, self.out_dim)]

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the model denoises (16: Wan2.1 VAE, 48: Wan2.2 VAE)."""
        return self.out_dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split of the 3D RoPE over (frame, height, width), as the official `rope_params` calls."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# (in_dim, out_dim) -> kind. I2V: the caller concatenates [noise 16, mask 4, image latent 16] on channels.
_KINDS = {(16, 16): "t2v", (36, 16): "i2v", (48, 48): "ti2v"}

# The shift of ComfyUI's `supported_models` sampling_settings for every Wan model above (WAN21_T2V,
# WAN21_I2V, WAN22_T2V (TI2V-5B) all inherit shift 8.0); ComfyUI's templates may patch it (ModelSamplingSD3).
COMFY_SAMPLING_SHIFT = 8.0
# ComfyUI's latent format per latent width: `latent_formats.Wan21` (16 ch) and `Wan22` (48 ch).
COMFY_LATENT_FORMAT = {16: "wan21", 48: "wan22"}

_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
PRESETS: dict[str, WanDiTConfig] = {
    "wan2.1-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": WanDiTConfig(**_14B),  # also each Wan2.2 T2V A14B expert
    "wan2.1-i2v-14b": WanDiTConfig(**_14B, in_dim=36, image_dim=1280),  # 480p and 720p share the layout
    "wan2.1-flf2v-14b": WanDiTConfig(**_14B, in_dim=36, image_dim=1280, image_pos_tokens=2 * 257),
    "wan2.2-i2v-a14b": WanDiTConfig(**_14B, in_dim=36),  # each I2V expert: no CLIP, no img_emb
    "wan2.2-ti2v-5b": WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    # head_dim 128 like the real models, so config detection (heads = dim // 128) round-trips.
    "tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
    "i2v-tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, image_dim=64),
    "flf2v-tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, image_dim=64,
                               image_pos_tokens=2 * 5),
    "i2v-noclip-tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36),
    "ti2v-tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=48, out_dim=48),
}


def get_config(preset: str) -> WanDiTConfig:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown Wan DiT preset {preset!r}; expected one of {sorted(PRESETS)}") from None


def preset_name(cfg: WanDiTConfig) -> str:
    """The preset a config equals, else 'custom'."""
    for name, p in PRESETS.items():
        if p == cfg:
            return name
    return "custom"


# ----------------------------------------------------------------------------------------------
# Helpers: time embedding, RoPE tables
# ----------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """cat[cos, sin] of t * 10000^(-i/half), i < half, as float32 (B, dim).

    The official code computes this in float64; it is a (B, 256) table, so we do the same where the
    device supports float64 (MPS does not: float32 there, an error of ~1e-5 rad at t=1000)."""
    half = dim // 2
    wide = torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=wide) / half)
    angles = t.to(wide)[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_tables(grid: tuple[int, int, int], rope_dims: tuple[int, int, int], theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables (L, head_dim/2) for a (F, H, W) token grid, row-major like the tokens.

    Angles are position * theta^(-2j/d_axis) for each axis part, built in float64 on the host (as the
    official float64 `rope_params`), then rounded once to float32."""
    parts = []
    for n, d in zip(grid, rope_dims):
        inv = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64),
                              torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        parts.append(torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :])  # (n, d/2)
    f, h, w = grid
    angles = torch.cat([
        parts[0][:, None, None, :].expand(f, h, w, -1),
        parts[1][None, :, None, :].expand(f, h, w, -1),
        parts[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)  # (L, head_dim/2)
    return torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)


# Route the CPU linears through oneDNN (core.cpu_linear). Module-level so benchmarks can compare; on
# x86 only, where it was measured.
ONEDNN_LINEAR = cpu_linear.ONEDNN


def _onednn_ok(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer(x)` may run as oneDNN's linear instead: a plain nn.Linear (not a quantized or
    subclassed layer) with no hooks, and tensors `cpu_linear.onednn_ok` accepts."""
    if not ONEDNN_LINEAR or type(layer) is not nn.Linear:
        return False
    if _has_hooks(layer):
        return False  # hooks (quant calibration) must fire
    return cpu_linear.onednn_ok(x, layer.weight, layer.bias)


def _has_hooks(*modules: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def linear(layer: nn.Module, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    """`layer(x)` (then GELU-tanh if asked), through oneDNN's linear where `_onednn_ok`.

    Why: on the CPU, aten's fp32 addmm goes to a BLAS that reaches about half of oneDNN's speed on
    the AVX-512 machine we measured (docs/dit.md); oneDNN computes the same fp32 (or bf16 with fp32
    accumulation) GEMM + bias, and can apply the GELU to the fp32 accumulator in the same pass."""
    if _onednn_ok(layer, x):
        return cpu_linear.linear(x, layer.weight, layer.bias, gelu_tanh)
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu_tanh else y


def mlp(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`seq(x)` for Wan's Sequential(Linear, GELU(tanh), Linear), the GELU fused into the first `linear`."""
    up, act, down = seq
    if isinstance(act, nn.GELU) and act.approximate == "tanh" and not _has_hooks(seq, act):
        return linear(down, linear(up, x, gelu_tanh=True))
    return seq(x)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Wan's q/k RMSNorm over the full width (before the head split); key `<name>.weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class _WanAttention(nn.Module):
    """The projections both attentions share; keys `q, k, v, o, norm_q, norm_k`."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class WanSelfAttention(_WanAttention):
    """Self-attention with qk RMSNorm and 3D RoPE."""

    def forward(self, x, cos, sin):
        b, n, dim = x.shape  # (B, L, D) in the compute dtype
        heads = self.num_heads
        q = ops.rope_apply(self.norm_q(linear(self.q, x)).view(b, n, heads, -1), cos, sin)  # (B, L, H, Dh)
        k = ops.rope_apply(self.norm_k(linear(self.k, x)).view(b, n, heads, -1), cos, sin)
        v = linear(self.v, x).view(b, n, heads, -1)
        # Transposed views go in as they are: the CPU flash kernel reads strided heads, and its output
        # is laid out (B, L, H, Dh), so the transpose + reshape below is free.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return linear(self.o, y.transpose(1, 2).reshape(b, n, dim))


class WanCrossAttention(_WanAttention):
    """Cross-attention on the text tokens (no RoPE); same keys as the self-attention. I2V models (config
    `image_dim`) add `k_img, v_img, norm_k_img`: a second attention of the same queries on the image tokens,
    whose output is added to the text attention's before `o` (the official `WanI2VCrossAttention`)."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__(cfg)
        if cfg.image_dim:
            # the image tokens are already `dim` wide (img_emb projects the CLIP features)
            self.k_img, self.v_img = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
            self.norm_k_img = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def image_kv(self, image):
        """Image keys and values (B, H, Li, Dh) each from the embedded image tokens (B, Li, D)."""
        b, li, _ = image.shape
        k = self.norm_k_img(linear(self.k_img, image)).view(b, li, self.num_heads, -1).transpose(1, 2)
        v = linear(self.v_img, image).view(b, li, self.num_heads, -1).transpose(1, 2)
        return k, v

    def kv(self, context):
        """Text keys and values (B, H, Lc, Dh) each: depend on the context only (cached per sampler run)."""
        b, lc, _ = context.shape
        k = self.norm_k(linear(self.k, context)).view(b, lc, self.num_heads, -1).transpose(1, 2)
        v = linear(self.v, context).view(b, lc, self.num_heads, -1).transpose(1, 2)
        return k, v

    def forward(self, x, context, bias: Optional[torch.Tensor], kv=None, image=None):
        # image: embedded image tokens (B, Li, D) of an I2V model with CLIP features, else None
        b, n, dim = x.shape
        q = self.norm_q(linear(self.q, x)).view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        k, v = self.kv(context) if kv is None else kv  # (B, H, Lc, Dh)
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # Folded padding: the log(N) logit bias must not be rounded to bf16/fp16 (6.2 has a bf16
            # step of 0.03), so this small attention (Lc = real tokens + 1) runs in fp32.
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias).to(x.dtype)
        if image is not None:
            # a separate softmax over the image tokens: the text padding fold above is unaffected
            y = y + F.scaled_dot_product_attention(q, *self.image_kv(image))
        return linear(self.o, y.transpose(1, 2).reshape(b, n, dim))


class WanAttentionBlock(nn.Module):
    """One DiT block; keys `modulation, self_attn.*, norm3.*, cross_attn.*, ffn.{0,2}.*`."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanSelfAttention(cfg)
        # norm3 is the cross-attention pre-norm (affine LayerNorm); norm1/norm2 have no parameters.
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim))

    def forward(self, x, e0, cos, sin, context, bias, kv=None, pending=None, defer: bool = False, image=None):
        # x: (B, L, D) float32 residual stream; e0: (B, 6, D) float32; context: (B, Lc, D) compute dtype;
        # kv: this block's cross-attention (K, V) from WanDiT.text_cache(), or None to compute them.
        # pending: the previous block's deferred FFN residual (gate, y): x + gate*y and this block's first
        # LN-modulate run as one fused op (`ops.gated_residual_ln_modulate`). defer=True returns
        # (x, (gate, y)) instead of applying this block's FFN residual, for the next block (or the head).
        # image: embedded image tokens (B, Li, D) for the I2V image cross-attention, or None.
        # Per-group timesteps (TI2V): x is (B, G, S, D) (G groups of S tokens: frames, or single tokens) and
        # e0 (B, G, 6, D); the modulation then broadcasts per group and the attentions see x as (B, G*S, D).
        cdt = context.dtype
        m = (self.modulation.float() + e0).unsqueeze(-2).unbind(-3)  # 6 x (B, 1, D) fp32 [or (B, G, 1, D)]
        if pending is None:
            h = ops.ln_modulate(x, m[0], m[1], self.eps).to(cdt)
        else:
            x, h = ops.gated_residual_ln_modulate(x, pending[0], pending[1], m[0], m[1], self.eps)
            h = h.to(cdt)
        x = ops.gated_residual(x, m[2], self.self_attn(h.flatten(1, -2), cos, sin).view(x.shape))
        if isinstance(self.norm3, nn.LayerNorm):
            h = F.layer_norm(x, x.shape[-1:], self.norm3.weight.float(), self.norm3.bias.float(), self.eps)
        else:
            h = x
        # fp32 + bf16 promotes per element: no fp32 copy
        x = x + self.cross_attn(h.to(cdt).flatten(1, -2), context, bias, kv, image).view(x.shape)
        h = ops.ln_modulate(x, m[3], m[4], self.eps).to(cdt)
        y = mlp(self.ffn, h)
        if defer:
            return x, (m[5], y)
        return ops.gated_residual(x, m[5], y)


class Head(nn.Module):
    """Output head; keys `head.modulation`, `head.head.*`. Runs in fp32 like the official one."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x, e, pending=None):
        # x: (B, L, D) fp32; e: (B, D) fp32 -- the time embedding itself, not the 6-way projection;
        # pending: the last block's deferred FFN residual (gate, y), fused with the head's LN-modulate.
        # Per-group timesteps: x (B, G, S, D), e (B, G, D) -> shift/scale (B, G, 1, D).
        shift, scale = (self.modulation.float() + e.unsqueeze(-2)).unsqueeze(-2).unbind(-3)  # (B, 1, D)
        if pending is None:
            h = ops.ln_modulate(x, shift, scale, self.eps)
        else:
            _, h = ops.gated_residual_ln_modulate(x, pending[0], pending[1], shift, scale, self.eps)
        return linear(self.head, h.to(_float_dtype(self.head))).float()  # (B, L, prod(patch)*out_dim)


class ImageEmbedding(nn.Module):
    """`img_emb` of I2V/FLF2V models: CLIP vision features (B, Li, image_dim) -> image tokens (B, Li, dim) by
    LayerNorm, Linear, GELU (exact), Linear, LayerNorm (keys `proj.{0,1,3,4}`, the official `MLPProj`).
    FLF2V adds a learned position embedding `emb_pos` (1, 2*257, image_dim) over the first and last frame's
    features, concatenated on tokens (ComfyUI's `WanFirstLastFrameToVideo` layout)."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        d_in = cfg.image_dim
        self.proj = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, cfg.dim),
                                  nn.LayerNorm(cfg.dim))
        if cfg.image_pos_tokens:
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.image_pos_tokens, d_in))

    def forward(self, clip_fea):
        ln_in, up, act, down, ln_out = self.proj
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):  # a single image (257 tokens) gets the first positions, as ComfyUI does
            x = x + self.emb_pos[:, : x.shape[1]].float()
        # the LayerNorms in fp32 (the official code runs them under autocast, which keeps layer_norm fp32)
        x = F.layer_norm(x, x.shape[-1:], ln_in.weight.float(), ln_in.bias.float(), ln_in.eps)
        x = linear(down, act(linear(up, x.to(_float_dtype(up)))))
        return F.layer_norm(x.float(), x.shape[-1:], ln_out.weight.float(), ln_out.bias.float(), ln_out.eps)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

# Parameters kept in float32 whatever the load dtype: the official code computes these in fp32.
_FP32_KEYS = re.compile(r"^(time_embedding\.|time_projection\.|head\.|blocks\.\d+\.modulation$)")


def keep_fp32(key: str) -> bool:
    """Whether a state-dict key belongs to an fp32 island (time embedding/projection, modulation, head)."""
    return bool(_FP32_KEYS.match(key))


class WanDiT(nn.Module):
    """Wan `WanModel` (T2V, I2V, TI2V): forward(x, timestep, context, clip_fea) -> velocity; see `forward`."""

    _ROPE_CACHE_SIZE = 8
    _TEXT_CACHE_SIZE = 4  # contexts per text_cache(): positive and negative prompt, with room to spare

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.config = cfg
        self.fold_text_padding = True
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.image_dim:
            self.img_emb = ImageEmbedding(cfg)
        # RoPE tables per (grid, device): plain attribute, not a buffer (never in the state dict, never on meta).
        self._rope_cache: dict = {}
        self._text_cache: Optional[list] = None  # a list only inside text_cache()

    @contextlib.contextmanager
    def text_cache(self):
        """Inside this block, calls with an equal text context reuse its embedding and every block's
        cross-attention K/V (a sampler run: the prompt is fixed, only x and t change). Cleared on exit.

        A cached entry is used only for a context of the same shape/dtype/device that is torch.equal to
        the cached copy, the same batch, compute dtype and padding mode, and text-side weights that are
        the same tensors (identity, storage and version counter) as when it was computed."""
        outer = self._text_cache
        self._text_cache = []
        try:
            yield self
        finally:
            self._text_cache = outer

    def _text_weights_sig(self) -> Optional[tuple]:
        """Identity, storage, dtype and version of every tensor the text K/V depend on; None = don't cache."""
        mods = [self.text_embedding] + [m for blk in self.blocks
                                         for m in (blk.cross_attn.k, blk.cross_attn.v, blk.cross_attn.norm_k)]
        sig = []
        try:
            for m in mods:
                for t in list(m.parameters()) + list(m.buffers()):
                    if t.requires_grad and torch.is_grad_enabled():
                        return None
                    sig.append((id(t), t.data_ptr(), t.dtype, t._version))
        except RuntimeError:  # inference tensors (a model built under inference_mode) carry no version
            return None
        return tuple(sig)

    def _text_kv(self, context, batch: int, cdt, device):
        """(tokens, bias, per-block K/V or None); inside text_cache() from a valid cached entry."""
        cache = self._text_cache
        sig = None
        if cache is not None and context is not None and not torch.compiler.is_compiling():
            sig = self._text_weights_sig()
        if sig is None or (torch.is_grad_enabled() and context.requires_grad):
            return (*self._embed_text(context, batch, cdt, device), None)
        key = (tuple(context.shape), context.dtype, context.device, batch, cdt, str(device),
               self.fold_text_padding, sig)
        for entry in cache:
            if entry[0] == key and torch.equal(entry[1], context):
                cache.remove(entry)
                cache.append(entry)  # most recently used last
                return entry[2:]
        tokens, bias = self._embed_text(context, batch, cdt, device)
        kvs = tuple(blk.cross_attn.kv(tokens) for blk in self.blocks)
        if len(cache) >= self._TEXT_CACHE_SIZE:
            cache.pop(0)
        cache.append((key, context.clone(), tokens, bias, kvs))
        return tokens, bias, kvs

    def _rope(self, grid, device):
        key = (grid, str(device))
        tables = self._rope_cache.get(key)
        if tables is None:
            if len(self._rope_cache) >= self._ROPE_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            tables = rope_tables(grid, self.config.rope_dims, self.config.rope_theta, device)
            self._rope_cache[key] = tables
        return tables

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """patch_embedding as one GEMM over (B, L, C*pt*ph*pw) patches -> contiguous (B, L, D) tokens.

        A Conv3d whose stride equals its kernel (no padding) is a linear map of each patch; as a GEMM
        it skips the convolution's im2col and the (B, D, L) -> (B, L, D) transpose copy."""
        pe = self.patch_embedding
        b, c, t, hh, ww = x.shape
        pt, ph, pw = self.config.patch_size
        patches = x.view(b, c, t // pt, pt, hh // ph, ph, ww // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, (t // pt) * (hh // ph) * (ww // pw), c * pt * ph * pw)  # (c, pt, ph, pw) fastest
        return F.linear(patches, pe.weight.flatten(1), pe.bias)

    def _embed_text(self, context: Optional[torch.Tensor], batch: int, cdt, device):
        """Text tokens (B, Lc, D) in the compute dtype and the cross-attention bias (None if unfolded)."""
        cfg = self.config
        if context is None:
            log_once(logger, ("wan_dit.no_context",), "Wan DiT called without text context: using an empty "
                     "(all-padding) prompt, as the official code does for a zero-length embedding")
            context = torch.zeros(batch, 0, cfg.text_dim, device=device, dtype=cdt)
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"Wan DiT context must be (B, L, {cfg.text_dim}) text embeddings (umT5-xxl), got "
                             f"{tuple(context.shape)}; connect conditioning from a {cfg.text_dim}-wide text encoder")
        if context.shape[0] not in (1, batch):
            raise ValueError(f"Wan DiT context batch {context.shape[0]} does not match the latent batch {batch}")
        n_real = context.shape[1]
        if n_real > cfg.text_len:
            raise ValueError(f"Wan DiT context has {n_real} tokens; the model was trained with at most "
                             f"{cfg.text_len} (text_len). Truncate the prompt embedding.")
        context = context.to(device=device, dtype=cdt).expand(batch, -1, -1)
        n_pad = cfg.text_len - n_real
        if n_pad == 0:
            return mlp(self.text_embedding, context), None
        if not self.fold_text_padding:
            # The official padding: zeros up to text_len, every query attends to all of them.
            context = torch.cat([context, context.new_zeros(batch, n_pad, cfg.text_dim)], dim=1)
            return mlp(self.text_embedding, context), None
        # Folded padding (see module docstring): real tokens + one padding token with logit bias log(n_pad).
        tokens = mlp(self.text_embedding, torch.cat([context, context.new_zeros(batch, 1, cfg.text_dim)], dim=1))
        bias = torch.zeros(1, 1, 1, n_real + 1, device=device, dtype=torch.float32)
        bias[..., -1] = math.log(n_pad)
        return tokens, bias

    def _timestep_groups(self, timestep: torch.Tensor, b: int, grid: tuple) -> torch.Tensor:
        """Timesteps as (B,) (one per sample) or (B, G) (one per group of tokens: G = frames or tokens).

        Accepts a scalar, (B,), (B, L) one per patch token (diffusers' `expand_timesteps`, Wan2.2 TI2V) or
        (B, F) one per latent frame (ComfyUI's WAN22 `process_timestep` from the denoise mask). A per-token
        tensor that is constant within each frame is reduced to frames, one constant over all tokens to (B,):
        the same values, so the same result, with the time MLPs run per frame (or per sample) only."""
        f, gh, gw = grid
        n_tokens = f * gh * gw
        if timestep.ndim == 0:
            return timestep.expand(b)
        if timestep.ndim == 1 and timestep.shape[0] == b:
            return timestep
        if timestep.ndim != 2 or timestep.shape[0] != b or timestep.shape[1] not in (n_tokens, f):
            raise ValueError(f"Wan DiT timestep must be a scalar, ({b},), ({b}, {n_tokens}) one per patch token or "
                             f"({b}, {f}) one per latent frame, got {tuple(timestep.shape)}")
        if timestep.shape[1] == n_tokens:
            per_frame = timestep.view(b, f, gh * gw)
            if not bool((per_frame == per_frame[..., :1]).all()):
                return timestep  # (B, L): varies inside a frame
            timestep = per_frame[..., 0]
        if bool((timestep == timestep[:, :1]).all()):
            return timestep[:, 0].contiguous()  # (B,)
        return timestep  # (B, F)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: Optional[torch.Tensor] = None,
                clip_fea: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity (B, out_dim, T, H, W) in x's dtype.

        Args:
            x: latents (B, in_dim, T, H, W). I2V (in_dim 36): [noisy latent 16, mask 4, image latent 16]
                concatenated on channels by the caller, in that order (ComfyUI's `concat_cond`).
            timestep: sigma * 1000, a scalar, (B,), or for TI2V (B, L) one per patch token / (B, F) one per
                latent frame (L = F*H*W / prod(patch), F = T / patch_t): the time embedding, every block's
                modulation and the head are then per token.
            context: text embeddings (B, Lc <= 512, text_dim) (umT5), None = the empty prompt.
            clip_fea: I2V models with CLIP (`config.image_dim`): CLIP vision ViT-H/14 penultimate hidden states
                (B, 257, 1280); FLF2V: first and last frame's concatenated on tokens (B, 514, 1280).
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"Wan DiT input must be latents (B, {cfg.in_dim}, T, H, W), got {tuple(x.shape)}"
                             + (" (I2V: noise 16 + mask 4 + image latent 16 channels)" if cfg.in_dim == 36 else ""))
        b, _, t, hh, ww = x.shape
        pt, ph, pw = cfg.patch_size
        if t % pt or hh % ph or ww % pw:
            raise ValueError(f"Wan DiT latent size (T={t}, H={hh}, W={ww}) must be divisible by the patch size "
                             f"{cfg.patch_size}; use an image size that is a multiple of {8 * ph} pixels")
        cdt = self.patch_embedding.weight.dtype
        grid = (t // pt, hh // ph, ww // pw)
        timestep = self._timestep_groups(torch.as_tensor(timestep, device=x.device), b, grid)
        groups = timestep.shape[1] if timestep.ndim == 2 else None  # None: one timestep per sample
        image = self._embed_image(clip_fea, b, cdt, x.device)  # (B, Li, D) or None

        # Time: fp32 island (the time layers are kept in fp32 by the loaders; cast in case someone .to()'d them).
        sin_t = sinusoidal_embedding(timestep.flatten(), cfg.freq_dim)  # (B [*G], freq_dim) fp32
        e = self.time_embedding(sin_t.to(_float_dtype(self.time_embedding[0]))).float()  # (B [*G], D)
        e0 = self.time_projection(e.to(_float_dtype(self.time_projection[1]))).float()
        e0 = e0.unflatten(1, (6, cfg.dim))  # (B [*G], 6, D)

        context, bias, kvs = self._text_kv(context, b, cdt, x.device)  # (B, Lc, D); kvs only in text_cache()
        cos, sin = self._rope(grid, x.device)  # (L, Dh/2) fp32

        h = self._embed_patches(x.to(cdt)).float()  # (B, L, D) fp32 stream
        if groups is not None:  # per-group timesteps: stream (B, G, S, D), e (B, G, D), e0 (B, G, 6, D)
            h, e, e0 = h.view(b, groups, -1, cfg.dim), e.view(b, groups, cfg.dim), e0.view(b, groups, 6, cfg.dim)
        pending = None  # each block's FFN residual is fused with the next LN-modulate (see the block)
        for i, block in enumerate(self.blocks):
            h, pending = block(h, e0, cos, sin, context, bias, None if kvs is None else kvs[i],
                               pending=pending, defer=True, image=image)
        out = self.head(h, e, pending)  # (B, L, pt*ph*pw*C) [or (B, G, S, ...)], channels fastest
        out = out.view(b, *grid, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, t, hh, ww).to(x.dtype)

    def _embed_image(self, clip_fea: Optional[torch.Tensor], batch: int, cdt, device) -> Optional[torch.Tensor]:
        """Image tokens (B, Li, D) in the compute dtype for I2V models with CLIP, else None (checked inputs)."""
        cfg = self.config
        if not cfg.image_dim:
            if clip_fea is not None:
                log_once(logger, ("wan_dit.clip_unused", cfg.in_dim), "Wan DiT (%s, no image embedding) called with "
                         "CLIP vision features: this model does not use them (Wan2.2 I2V and TI2V take the image "
                         "through the latent only); ignored", cfg.kind)
            return None
        if clip_fea is None:
            raise ValueError("this Wan I2V model is conditioned on CLIP vision features: pass clip_fea (B, 257, "
                             f"{cfg.image_dim}), the penultimate hidden states of CLIP vision ViT-H/14 "
                             "(clip_vision_h, as ComfyUI's CLIPVisionEncode -> WanImageToVideo provide them)")
        if clip_fea.ndim != 3 or clip_fea.shape[-1] != cfg.image_dim or clip_fea.shape[0] not in (1, batch):
            raise ValueError(f"Wan DiT clip_fea must be ({batch}, tokens, {cfg.image_dim}) CLIP vision features "
                             f"(257 tokens per image), got {tuple(clip_fea.shape)}")
        if cfg.image_pos_tokens and clip_fea.shape[1] > cfg.image_pos_tokens:
            raise ValueError(f"Wan FLF2V clip_fea has {clip_fea.shape[1]} tokens; the model's position embedding "
                             f"covers {cfg.image_pos_tokens} (first and last frame, 257 each)")
        image = self.img_emb(clip_fea.to(device))  # fp32 (Li, D) after the last LayerNorm
        return image.to(cdt).expand(batch, -1, -1)


# ----------------------------------------------------------------------------------------------
# Checkpoints: family sniffing, diffusers keys, config detection, loading, random weights
# ----------------------------------------------------------------------------------------------

# Keys that tell checkpoint families apart (with any prefix in front).
_FAMILY_MARKERS = (
    ("wan_dit", "head.modulation"),
    ("wan_dit_diffusers", "condition_embedder.time_embedder.linear_1.weight"),
    ("dit", "x_embedder.proj.weight"),
    ("dit", "t_embedder.mlp.0.weight"),
    ("wan_vae", "decoder.middle.0.residual.0.gamma"),
    ("wan_vae_diffusers", "decoder.mid_block.resnets.0.norm1.gamma"),
)


def checkpoint_keys(path) -> Optional[list[str]]:
    """The tensor names of a checkpoint without reading its tensors (safetensors and shard indexes);
    None for pickle checkpoints, which can only be inspected by loading them."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".json"):
        try:
            return list(json.loads(path.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index (needs a 'weight_map' object): {e}") from None
    if name.endswith(loading.SAFETENSORS_EXT):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types on corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}). "
                                  f"The file may be truncated or corrupt; copy it again.") from None
    return None


def checkpoint_family(keys) -> Optional[str]:
    """'wan_dit' | 'wan_dit_diffusers' | 'dit' | 'wan_vae' | 'wan_vae_diffusers' | None, from key names."""
    keys = list(keys)
    for family, marker in _FAMILY_MARKERS:
        if any(k == marker or k.endswith("." + marker) for k in keys):
            return family
    return None


# diffusers `WanTransformer3DModel` names -> official names (inverse of diffusers'
# `convert_wan_transformer_to_diffusers`; note the norm2/norm3 swap of the cross-attention pre-norm).
_FROM_DIFFUSERS = (
    # I2V/FLF2V first (diffusers `image_dim` / `added_kv_proj_dim`): the generic `.attn2.norm_` and `.norm2.`
    # rules below would otherwise rename parts of these names
    (".attn2.add_k_proj.", ".cross_attn.k_img."), (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.to_out.0.", ".self_attn.o."), (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."), (".attn2.to_", ".cross_attn."),
    (".attn1.norm_", ".self_attn.norm_"), (".attn2.norm_", ".cross_attn.norm_"),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
    ("proj_out.", "head.head."),
)


def from_diffusers_keys(sd: dict) -> dict:
    """Rename a diffusers-layout Wan transformer state dict to the official keys."""
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            out["head.modulation"] = v
            continue
        if k == "condition_embedder.image_embedder.pos_embed":  # FLF2V (diffusers' own converter skips it)
            out["img_emb.emb_pos"] = v
            continue
        for old, new in _FROM_DIFFUSERS:
            k = k.replace(old, new)
        out[k] = v
    return out


def _wrong_family_error(source: str, family: Optional[str], keys) -> CheckpointError:
    if family in ("wan_vae", "wan_vae_diffusers"):
        return CheckpointError(f"{source}: this is a Wan VAE checkpoint (it has VAE keys such as "
                               f"'decoder.middle.0.residual.0.gamma'), not a diffusion model. Load it with "
                               f"TwinFlow Load VAE, and pick a Wan diffusion model file here.")
    if family == "dit":
        return CheckpointError(f"{source}: this is an adaLN-Zero DiT checkpoint (DiT-XL/2 / Open-Sora keys such as "
                               f"'x_embedder.proj.weight'), not a Wan DiT; load it with the DiT loader "
                               f"(models.dit), or through TwinFlow Load DiT which dispatches on the keys.")
    shown = ", ".join(sorted(keys)[:5])
    return CheckpointError(f"{source}: not a Wan diffusion model: the key 'head.modulation' (official layout, "
                           f"with or without a 'model.diffusion_model.' prefix) is missing. First keys: {shown}. "
                           f"Expected a Wan checkpoint such as wan2.1_t2v_1.3B_fp16.safetensors.")


def normalize_state_dict(sd: dict, source: str) -> dict:
    """Strip prefixes and map diffusers names so the keys are the official ones; clear errors otherwise."""
    family = checkpoint_family(sd)
    if family == "wan_dit_diffusers":
        anchor = "condition_embedder.time_embedder.linear_1.weight"
        sd, prefix = loading.strip_prefix(sd, anchor, ("model.diffusion_model.", "transformer."))
        log_once(logger, ("wan_dit.diffusers", source), "%s: diffusers-layout Wan transformer; renaming keys to the "
                 "official layout", source)
        return from_diffusers_keys(sd)
    if family != "wan_dit":
        raise _wrong_family_error(source, family, sd.keys())
    sd, prefix = loading.strip_prefix(sd, "head.modulation", ("model.diffusion_model.", "diffusion_model.", "model."))
    if prefix:
        logger.info("%s: stripped key prefix %r", source, prefix)
    return sd


def _shape(sd, key, source):
    if key not in sd:
        raise CheckpointError(f"{source}: cannot detect the Wan DiT config: key {key!r} is missing. The file is "
                              f"incomplete or not a Wan diffusion model.")
    return tuple(sd[key].shape)


# Wan-family files TwinFlow does not run (ComfyUI's model_detection keys), named in the refusal.
_OTHER_VARIANTS = (
    ("vace_patch_embedding.weight", "Wan VACE"), ("control_adapter.conv.weight", "Wan Fun camera control"),
    ("casual_audio_encoder.encoder.final_linear.weight", "Wan2.2 S2V"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "HuMo"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "Wan2.2 Animate"),
    ("ref_conv.weight", "Wan Fun (reference image)"),
)


def detect_config(sd: dict, source: str = "state dict") -> WanDiTConfig:
    """Derive the config from tensor shapes (official keys), as ComfyUI's model detection does.

    T2V (Wan2.1, each Wan2.2 A14B T2V expert), I2V with CLIP (Wan2.1 I2V 480p/720p, FLF2V: `img_emb`), I2V
    without CLIP (each Wan2.2 I2V A14B expert: in_dim 36, no `img_emb`) and TI2V (Wan2.2 5B: in/out 48)."""
    for key, name in _OTHER_VARIANTS:
        if key in sd:
            raise UnsupportedError(f"{source}: this is a {name} model (it has '{key}'); TwinFlow runs Wan T2V, "
                                   f"I2V, FLF2V and TI2V diffusion models only.")
    pe = _shape(sd, "patch_embedding.weight", source)  # (dim, in_dim, pt, ph, pw)
    if len(pe) != 5:
        raise CheckpointError(f"{source}: patch_embedding.weight has shape {pe}; expected a Conv3d weight (5 dims)")
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if not layers:
        raise CheckpointError(f"{source}: no 'blocks.N.' keys: the file has no transformer blocks")
    num_layers = max(layers) + 1
    if dim % 128:
        raise CheckpointError(f"{source}: model width {dim} is not a multiple of 128, the Wan head size; "
                              f"pass an explicit preset/config for a custom model")
    head_out = _shape(sd, "head.head.weight", source)[0]
    out_dim = head_out // math.prod(patch)
    if (in_dim, out_dim) not in _KINDS:
        what = {(48, 16): " (a Wan Fun control model)", (32, 16): " (a Wan camera model)"}.get((in_dim, out_dim), "")
        raise UnsupportedError(f"{source}: patch_embedding takes {in_dim} channels and the head gives {out_dim}"
                               f"{what}; TwinFlow runs Wan T2V (16/16), I2V (36/16) and TI2V (48/48) models")
    has_image = "img_emb.proj.0.weight" in sd
    if has_image != any(".cross_attn.k_img." in k for k in sd):
        have, lack = ("img_emb", "cross_attn.k_img") if has_image else ("cross_attn.k_img", "img_emb")
        raise CheckpointError(f"{source}: incomplete I2V model: it has {have} keys but no {lack} keys")
    cfg = WanDiTConfig(
        dim=dim, in_dim=in_dim, patch_size=patch,
        ffn_dim=_shape(sd, "blocks.0.ffn.0.weight", source)[0],
        num_heads=dim // 128,  # every Wan model uses head_dim 128 (ComfyUI detects heads the same way)
        num_layers=num_layers,
        out_dim=out_dim,
        text_dim=_shape(sd, "text_embedding.0.weight", source)[1],
        freq_dim=_shape(sd, "time_embedding.0.weight", source)[1],
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        image_dim=_shape(sd, "img_emb.proj.0.weight", source)[0] if has_image else 0,
        image_pos_tokens=_shape(sd, "img_emb.emb_pos", source)[1] if "img_emb.emb_pos" in sd else 0,
    )
    return cfg


def _island_dtypes(sd: dict, dtype: torch.dtype) -> dict:
    """Cast to `dtype`, keeping the fp32 islands (time embedding/projection, modulation, head) in float32."""
    return loading.convert_dtype(sd, dtype, keep_fp32=keep_fp32)


def _file_dtype(sd: dict, source: str) -> torch.dtype:
    dt = sd["patch_embedding.weight"].dtype
    if dt in (torch.float32, torch.float16, torch.bfloat16):
        return dt
    log_once(logger, ("wan_dit.dtype", source), "%s: weights stored as %s; computing in bfloat16", source, dt)
    return torch.bfloat16


def wan_dit_from_state_dict(sd: dict, source: str = "state dict", dtype: Optional[torch.dtype] = None,
                            config: Optional[WanDiTConfig] = None) -> WanDiT:
    """Build a WanDiT from an (official, diffusers or prefixed) plain state dict; strict key/shape check.

    Quantized files (int8/fp8 codes + scales) load through `quant.load.wan_dit_from_state_dict`, which
    recognises them and uses `wan_dit_on_meta` below; here their scale tensors are unexpected keys."""
    sd = normalize_state_dict(sd, source)
    detected = detect_config(sd, source) if config is None else config
    dtype = dtype if dtype is not None else _file_dtype(sd, source)
    sd = _island_dtypes(sd, dtype)
    module = loading.build_and_load(lambda: WanDiT(detected), sd, source).requires_grad_(False)
    logger.info("%s: Wan DiT %s, %s", source, describe(detected), dtype)
    return module


def wan_dit_on_meta(sd: dict, source: str = "state dict", config: Optional[WanDiTConfig] = None,
                    meta: Optional[dict] = None) -> tuple[WanDiT, dict, str]:
    """`(WanDiT on the meta device, state dict without its key prefix, the prefix)` for a loader that fills
    the layers itself (quantized files: `quant.load`). Official key layout only; the config is `config`,
    else the file's `twinflow_config` metadata, else detected from tensor shapes."""
    if checkpoint_family(sd) != "wan_dit":
        raise _wrong_family_error(source, checkpoint_family(sd), sd.keys())
    sd, prefix = loading.strip_prefix(sd, "head.modulation", ("model.diffusion_model.", "diffusion_model."))
    if config is None:
        config = _config_from_meta(meta, source) if "twinflow_config" in (meta or {}) else detect_config(sd, source)
    with torch.device("meta"):
        module = WanDiT(config)
    return module, sd, prefix


def _float_dtype(layer: nn.Module, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """Input dtype for a layer: its weight's float dtype, or `fallback` for quantized (int8/fp8) layers."""
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.element_size() >= 2:
        return w.dtype
    return fallback


def _config_from_meta(meta: dict, source: str) -> WanDiTConfig:
    raw = meta.get("twinflow_config")
    if not raw:
        raise CheckpointError(f"{source}: quantized file without 'twinflow_config' metadata; pass a preset")
    data = json.loads(raw)
    data["patch_size"] = tuple(data.get("patch_size", (1, 2, 2)))
    return WanDiTConfig(**data)


def read_wan_dit_file(path_or_index) -> tuple[dict, dict]:
    """`(state_dict, metadata)` of a Wan DiT file, after a key check that names the family it holds instead."""
    path = Path(path_or_index)
    keys = checkpoint_keys(path) if path.is_file() else None
    if keys is not None:
        family = checkpoint_family(keys)
        if family not in ("wan_dit", "wan_dit_diffusers"):
            raise _wrong_family_error(str(path), family, keys)
    return loading.load_file(path)


def load_wan_dit(path_or_index, dtype: Optional[torch.dtype] = None, preset: Optional[str] = None) -> WanDiT:
    """Load a Wan DiT (T2V, I2V, FLF2V, TI2V) from a plain (unquantized) file; `quant.load.load_wan_dit`
    reads both kinds.

    Args:
        path_or_index: `.safetensors`/`.sft`, a weights-only `.pth`/`.pt`/`.ckpt`/`.bin`, or a shard index
            `*.index.json` (official, ComfyUI `model.diffusion_model.`-prefixed, or diffusers key layout).
        dtype: compute dtype (None keeps the file's; fp8 files compute in bf16). The time embedding,
            time projection, modulation tables and head stay float32 (the official fp32 islands).
        preset: force a preset ("wan2.1-1.3b", "wan2.1-14b", "tiny") instead of detecting from shapes;
            the file is still checked strictly against it.
    Returns:
        the `WanDiT` module in eval mode, with `.config`.
    Raises:
        CheckpointError (missing/corrupt/wrong-family file, key or shape mismatch), UnsupportedError (I2V).
    """
    sd, _ = read_wan_dit_file(path_or_index)
    config = get_config(preset) if preset else None
    return wan_dit_from_state_dict(sd, str(Path(path_or_index)), dtype=dtype, config=config)


def load_wan_dit_pair(high_noise, low_noise, dtype: Optional[torch.dtype] = None, loader=None) -> tuple[WanDiT, WanDiT]:
    """Load Wan2.2 A14B's two experts, `(high-noise, low-noise)`: two Wan 14B files (T2V or I2V) of one config.

    Each expert is an ordinary Wan 14B file (config detected from its tensors like any other); the pair is
    checked to match, so a T2V expert is never paired with an I2V one. `loader` reads one file
    (default `load_wan_dit`; pass `quant.load.load_wan_dit` to accept quantized files)."""
    loader = loader or load_wan_dit
    high = loader(high_noise, dtype=dtype)
    low = loader(low_noise, dtype=dtype)
    if high.config != low.config:
        raise CheckpointError(f"Wan2.2 experts do not match: {Path(high_noise).name} is {describe(high.config)}, "
                              f"{Path(low_noise).name} is {describe(low.config)}; pick the high- and low-noise files "
                              f"of one model (both T2V A14B or both I2V A14B)")
    return high, low


def describe(cfg: WanDiTConfig) -> str:
    """'wan2.2-i2v-a14b (i2v, 36 -> 16 channels, dim 5120, 40 layers)' for messages and logs."""
    clip = ", CLIP image features" if cfg.image_dim else ""
    return (f"{preset_name(cfg)} ({cfg.kind}{clip}, {cfg.in_dim} -> {cfg.out_dim} channels, dim {cfg.dim}, "
            f"{cfg.num_layers} layers)")


def random_wan_dit(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device="cpu", config: Optional[WanDiTConfig] = None) -> WanDiT:
    """Seeded random weights with a non-degenerate init for demos and tests (no zero-init head/gates).

    Linear/conv weights are Xavier-uniform, biases small normals, RMSNorm/LayerNorm weights near 1,
    modulation tables randn/sqrt(dim) (as the official init). Parameters are filled one at a time in
    `dtype` (fp32 islands stay fp32), so peak memory is about the model's size."""
    cfg = config or get_config(preset)
    with torch.device("meta"):
        module = WanDiT(cfg)
    gen = torch.Generator().manual_seed(int(seed) % (2 ** 64))
    sd = {}
    for name, p in module.named_parameters():
        shape = tuple(p.shape)
        if name.endswith("modulation"):
            v = torch.randn(shape, generator=gen) / cfg.dim ** 0.5
        elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or ".norm3.weight" in name:
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("norm_k_img.weight") or name in ("img_emb.proj.0.weight", "img_emb.proj.4.weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "img_emb.emb_pos":
            v = 0.02 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_out, fan_in = shape[0], math.prod(shape[1:])
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            v = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        sd[name] = v.to(torch.float32 if keep_fp32(name) else dtype).to(device)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def save_wan_dit(module: WanDiT, path, metadata: Optional[dict] = None) -> None:
    """Write the official-key state dict as safetensors, with the config in the metadata."""
    from safetensors.torch import save_file

    meta = {"twinflow_family": "wan_dit", "twinflow_config": module.config.to_json(), **(metadata or {})}
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)


def with_config(cfg: WanDiTConfig, **changes) -> WanDiTConfig:
    """A copy of a config with some fields changed (validated)."""
    return replace(cfg, **changes)


def make_denoiser(module: WanDiT, name: str = "", source: str = ""):
    """Wrap as the `TWINFLOW_MODEL` handle (family "wan_dit"; timestep = sigma * 1000, as the official code)."""
    from ..core.handles import Denoiser

    cfg = module.config
    return Denoiser(module=module, family="wan_dit", in_channels=cfg.in_dim, text_dim=cfg.text_dim,
                    name=name or preset_name(cfg), config=cfg, timestep_scale=1000.0,
                    info={"source": source, "preset": preset_name(cfg), **model_info(cfg)})


def frame_timesteps(timestep: torch.Tensor, denoise_mask: torch.Tensor) -> torch.Tensor:
    """Per-latent-frame timesteps (B, F) for TI2V from a denoise mask, as ComfyUI's WAN22 `process_timestep`:
    the mask's mean over channels, height and width per frame (1 = denoise, 0 = keep, e.g. the conditioning
    first frame) times each sample's timestep. Pass the result to `WanDiT.forward` as `timestep`."""
    if denoise_mask.ndim != 5:
        raise ValueError(f"denoise_mask must be (B, C, F, H, W) like the latent, got {tuple(denoise_mask.shape)}")
    t = torch.as_tensor(timestep, dtype=torch.float32, device=denoise_mask.device).reshape(-1, 1)  # (B or 1, 1)
    return denoise_mask.float().mean(dim=(1, 3, 4)) * t  # (B, F)


def model_info(cfg: WanDiTConfig) -> dict:
    """What a caller needs to know to condition and sample this model (also `Denoiser.info`):

    model_kind       't2v' | 'i2v' | 'ti2v' (see `WanDiTConfig`)
    clip_vision      True when forward needs `clip_fea` (Wan2.1 I2V/FLF2V); False for the Wan2.2 I2V experts
    flf2v            True for a first-last-frame model (clip_fea of 2 x 257 tokens)
    latent_channels  16 (Wan2.1 VAE) or 48 (Wan2.2 VAE): the noise/latent width; I2V models take 36 input
                     channels = latent 16 + mask 4 + image latent 16 (in `in_channels`)
    latent_format_comfy, sampling_shift_comfy: ComfyUI's latent format ('wan21'/'wan22') and
                     sampling_settings shift for this model (its supported_models entry)
    per_token_timestep  True for TI2V: forward accepts (B, L) / (B, F) timesteps (first-frame conditioning)
    """
    return {"model_kind": cfg.kind, "clip_vision": bool(cfg.image_dim), "flf2v": bool(cfg.image_pos_tokens),
            "latent_channels": cfg.latent_channels, "latent_format_comfy": COMFY_LATENT_FORMAT[cfg.latent_channels],
            "sampling_shift_comfy": COMFY_SAMPLING_SHIFT, "per_token_timestep": cfg.kind == "ti2v"}
