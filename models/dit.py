"""adaLN-Zero DiT family: DiT-XL/2 (class-conditional images) and Open-Sora v1 DiT-XL/2 (video).

Read top to bottom: sin-cos tables, embedders, block, final layer, model, configs/presets, loading.
Weight names are exactly those of the original checkpoints (`facebookresearch/DiT` `DiT-XL-2-256x256.pt`,
Open-Sora v1 `DiT-XL-2` video), see tests/fixtures/reference/dit_xl2_256_keys.tsv and opensora_v1_dit_xl2_keys.tsv.

Calling convention (`core.handles.Denoiser`): `module(x, timestep, context)`.
- x: [B, C, H, W] (2D layout) or [B, C, T, H, W]. A 2D model given 5D input denoises every frame on its
  own (frames folded into the batch). Output has the input's rank and dtype.
- timestep: [B] float, the value fed to the sinusoidal embedder (Denoiser passes sigma * 1000).
- context: 2D layout: None (the CFG null class) or integer class labels [B]; 3D layout: None (the
  learned null caption `y_embedder.y_embedding`) or a pooled caption embedding [B, Cc] / [B, 1, Cc].
- With learned sigma (the released DiT-XL/2 has 2C output channels: prediction + variance) only the
  first C channels are returned.
The module returns the checkpoint's raw prediction. The released DiT-XL/2 and Open-Sora v1 weights predict
DDPM epsilon on a 1000-step linear-beta schedule, not flow velocity: `make_denoiser` therefore wraps the module
in `EpsToVelocity` by default (prediction="raw" skips it). The `tiny` presets are random either way.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import CheckpointError
from ..core.log import log_once
from ..fused import ops
from .loading import build_and_load, convert_dtype, load_file, strip_prefix

logger = logging.getLogger(__name__)

LAYOUT_2D = "dit-xl2-2d"
LAYOUT_3D = "opensora-v1-3d"
LAYOUTS = (LAYOUT_2D, LAYOUT_3D)

# ---------------------------------------------------------------------------------------------
# Fixed sin-cos tables (computed once per grid in float64 as the originals do with numpy, stored fp32)
# ---------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] = concat(sin(pos*w), cos(pos*w)), w_i = 10000^(-i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h*grid_w, dim] for tokens in row-major (h, w) order.

    As in DiT/MAE, the first half of the width encodes the *column* (w) index and the second half the
    row (h) index (their meshgrid puts w first)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's frequency embedding: [B] -> [B, dim] = concat(cos(t*f), sin(t*f)), f_i = P^(-i/(dim/2)).

    fp32 island: timesteps reach 1000, so half precision would lose the high frequencies. Note
    diffusers' DiT port divides by (dim/2 - 1) instead (`downscale_freq_shift=1`); we keep the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies -> MLP(SiLU) -> [B, D]."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = timestep_embedding(t, self.freq_dim)
        return self.mlp(f.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]; row `num_classes` is the classifier-free-guidance null class."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(
                "this DiT is class-conditional: context must be None (null class) or integer class labels [B], "
                f"got a {labels.dtype} tensor of shape {tuple(labels.shape)} (text conditioning does not apply)")
        labels = labels.reshape(-1).to(device=device, dtype=torch.long)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch}")
        if int(labels.min()) < 0 or int(labels.max()) > self.num_classes:
            raise ValueError(f"class labels must be in 0..{self.num_classes} ({self.num_classes} = null class), "
                             f"got {labels.tolist()}")
        return self.embedding_table(labels)  # (B, D)


class Mlp(nn.Module):
    """timm-style MLP with GELU(tanh), names `fc1`/`fc2` as in the checkpoints."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Open-Sora v1: a pooled caption embedding [B, Cc] -> MLP -> [B, D]; `y_embedding` is the null caption."""

    def __init__(self, caption_channels: int, hidden: int, token_num: int = 1):
        super().__init__()
        self.caption_channels = caption_channels
        self.y_embedding = nn.Parameter(torch.zeros(token_num, caption_channels))
        self.y_proj = Mlp(caption_channels, hidden, hidden)

    def forward(self, caption: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        cc = self.caption_channels
        if caption is None:
            caption = self.y_embedding[:1].expand(batch, cc)
        else:
            if caption.ndim >= 2 and caption.shape[-1] == cc and math.prod(caption.shape[1:-1]) == 1:
                caption = caption.reshape(caption.shape[0], cc)
            else:
                raise ValueError(
                    f"Open-Sora v1 DiT takes one pooled caption embedding per sample, shape [B, {cc}] or "
                    f"[B, 1, {cc}]; got {tuple(caption.shape)}. Token sequences (e.g. umT5 [B, L, 4096]) "
                    f"are for the Wan DiT; pool them with an encoder of width {cc} first.")
            if caption.shape[0] == 1 and batch > 1:
                caption = caption.expand(batch, cc)
            if caption.shape[0] != batch:
                raise ValueError(f"caption batch {caption.shape[0]} does not match latent batch {batch}")
        return self.y_proj(caption.to(self.y_proj.fc1.weight.dtype))  # (B, D)


# ---------------------------------------------------------------------------------------------
# Transformer block and final layer
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: qkv rows = [q; k; v])."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c -> (shift, scale, gate) x 2 modulating attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, mlp_hidden, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Modulation and residuals in fp32 (fused.ops): the gates multiply large activations.
        mod = self.adaLN_modulation(c).float().unsqueeze(1)  # (B, 1, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        h = ops.ln_modulate(x, shift_a, scale_a, eps=1e-6).to(x.dtype)
        x = ops.gated_residual(x, gate_a, self.attn(h))
        h = ops.ln_modulate(x, shift_m, scale_m, eps=1e-6).to(x.dtype)
        return ops.gated_residual(x, gate_m, self.mlp(h))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch pixels."""

    def __init__(self, dim: int, patch_numel: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_numel * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).float().unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(ops.ln_modulate(x, shift, scale, eps=1e-6).to(x.dtype))


# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaLNDiTConfig:
    layout: str = LAYOUT_2D  # "dit-xl2-2d" (label-conditional images) | "opensora-v1-3d" (video, caption)
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: tuple = (2, 2)  # (p, p) for 2D, (pt, p, p) for 3D
    input_size: tuple = (32, 32)  # native latent grid: (H, W) or (T, H, W); pos tables are built for it
    learn_sigma: bool = True  # output 2C channels (prediction + variance); we return the first C
    num_classes: int = 1000  # 2D only
    caption_channels: int = 512  # 3D only (Open-Sora v1: pooled CLIP text embedding)
    caption_tokens: int = 1

    @property
    def is_3d(self) -> bool:
        return self.layout == LAYOUT_3D

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> "AdaLNDiTConfig":
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown adaLN DiT layout {self.layout!r}; expected one of {LAYOUTS}")
        nd = 3 if self.is_3d else 2
        if len(self.patch_size) != nd or len(self.input_size) != nd:
            raise ValueError(f"{self.layout}: patch_size and input_size need {nd} entries, got "
                             f"{self.patch_size} / {self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for n, p in zip(self.input_size, self.patch_size):
            if n % p:
                raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        return self


PRESETS: dict[str, AdaLNDiTConfig] = {
    # facebookresearch/DiT DiT-XL/2 at 256x256 (latent 32x32, SD VAE with 4 channels).
    "dit-xl2-256": AdaLNDiTConfig(),
    # Open-Sora v1.0 DiT-XL/2 video baseline: 16x32x32 latents, pooled 512-d CLIP caption.
    "opensora-v1-xl2": AdaLNDiTConfig(layout=LAYOUT_3D, patch_size=(1, 2, 2), input_size=(16, 32, 32)),
    "tiny": AdaLNDiTConfig(hidden_size=64, depth=2, num_heads=4, input_size=(8, 8), num_classes=10),
    "tiny-3d": AdaLNDiTConfig(layout=LAYOUT_3D, hidden_size=64, depth=2, num_heads=4, patch_size=(1, 2, 2),
                              input_size=(4, 8, 8), caption_channels=32),
}


class AdaLNDiT(nn.Module):
    """The adaLN-Zero DiT (2D DiT-XL/2 layout or Open-Sora v1 3D layout)."""

    def __init__(self, config: AdaLNDiTConfig):
        super().__init__()
        cfg = config.validate()
        self.config = cfg
        d = cfg.hidden_size
        grid = [n // p for n, p in zip(cfg.input_size, cfg.patch_size)]
        if cfg.is_3d:
            self.register_buffer("pos_embed_spatial", sincos_2d(d, grid[1], grid[2]).float()[None])
            self.register_buffer("pos_embed_temporal", sincos_1d(d, torch.arange(grid[0])).float()[None])
            self.x_embedder = _PatchEmbed(nn.Conv3d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size))
            self.y_embedder = CaptionEmbedder(cfg.caption_channels, d, cfg.caption_tokens)
        else:
            self.register_buffer("pos_embed", sincos_2d(d, grid[0], grid[1]).float()[None])
            self.x_embedder = _PatchEmbed(nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size))
            self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.t_embedder = TimestepEmbedder(d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, math.prod(cfg.patch_size), cfg.out_channels)
        self._pos_cache: dict = {}

    # -- position tables ------------------------------------------------------------------------
    def _pos(self, grid: tuple, dtype, device) -> torch.Tensor:
        """[1, N, D] position embedding for a token grid; the stored table when the grid is native."""
        cfg = self.config
        native = tuple(n // p for n, p in zip(cfg.input_size, cfg.patch_size))
        d = cfg.hidden_size
        if not cfg.is_3d:
            if grid == native:
                return self.pos_embed.to(dtype)
            table = self._table(("2d", grid), lambda: sincos_2d(d, *grid)[None], native, grid)
            return table.to(device, dtype)
        t, h, w = grid
        if (h, w) == native[1:]:
            spatial = self.pos_embed_spatial  # (1, S, D)
        else:
            spatial = self._table(("2d", (h, w)), lambda: sincos_2d(d, h, w)[None], native, grid).to(device)
        if t <= native[0]:
            temporal = self.pos_embed_temporal[:, :t]  # 1D sin-cos of arange(t) is a prefix of the table
        else:
            temporal = self._table(("1d", t), lambda: sincos_1d(d, torch.arange(t))[None], native, grid).to(device)
        # token order (t, h, w): every frame gets spatial[s] + temporal[t]
        pos = spatial[:, None, :, :] + temporal[:, :, None, :]  # (1, T, S, D)
        return pos.flatten(1, 2).to(dtype)

    def _table(self, key, make, native, grid) -> torch.Tensor:
        if key not in self._pos_cache:
            log_once(logger, ("dit-pos", native, grid),
                     "adaLN DiT: latent token grid %s differs from the checkpoint's native grid %s; computing "
                     "sin-cos positions for it (plain integer positions, as the original code would)", grid, native)
            self._pos_cache[key] = make().float()
        return self._pos_cache[key]

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        in_dtype = x.dtype
        frames = None
        if cfg.is_3d:
            if x.ndim != 5:
                raise ValueError(f"Open-Sora v1 DiT expects latents [B, C, T, H, W], got {tuple(x.shape)}")
        elif x.ndim == 5:  # a 2D model on video: denoise every frame independently
            b5, c5, frames = x.shape[:3]
            x = x.permute(0, 2, 1, 3, 4).reshape(b5 * frames, c5, *x.shape[3:])
            timestep = _per_sample(timestep, b5).repeat_interleave(frames)
            cond = class_labels if class_labels is not None else context
            if cond is not None and not cond.is_floating_point():
                class_labels = _per_sample(cond.reshape(-1), b5).repeat_interleave(frames)
                context = None
        elif x.ndim != 4:
            raise ValueError(f"DiT-XL/2 layout expects latents [B, C, H, W] or [B, C, T, H, W], got {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT expects {cfg.in_channels} latent channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        for n, p in zip(x.shape[2:], cfg.patch_size):
            if n % p:
                raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch size {cfg.patch_size}")
        b = x.shape[0]
        wdtype = self.x_embedder.proj.weight.dtype
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))

        h = self.x_embedder(x.to(wdtype))  # (B, N, D), tokens in (t,) h, w order
        h = h + self._pos(grid, wdtype, h.device)
        c = self.t_embedder(_per_sample(timestep, b).to(h.device))  # (B, D)
        if cfg.is_3d:
            if class_labels is not None:
                raise TypeError("Open-Sora v1 DiT is caption-conditioned; class_labels do not apply")
            c = c + self.y_embedder(context, b)
        else:
            c = c + self.y_embedder(class_labels if class_labels is not None else context, b, h.device)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, N, prod(p) * Cout)
        out = _unpatchify(h, grid, cfg.patch_size, cfg.out_channels)[:, : cfg.in_channels]
        if frames is not None:
            out = out.reshape(-1, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return out.to(in_dtype)


class _PatchEmbed(nn.Module):
    """Non-overlapping patch conv (key `x_embedder.proj`), flattened to tokens."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    t = torch.as_tensor(t).reshape(-1)
    if t.numel() == 1 and batch > 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"expected {batch} timesteps (one per sample), got {t.numel()}")
    return t


def _unpatchify(h: torch.Tensor, grid: tuple, patch: tuple, c: int) -> torch.Tensor:
    """[B, N, prod(p)*C] with per-token layout (p..., C) -> [B, C, n*p ...]."""
    b = h.shape[0]
    nd = len(grid)
    x = h.reshape(b, *grid, *patch, c)
    # (B, g0.., p0.., C) -> (B, C, g0, p0, g1, p1, ...)
    perm = [0, 2 * nd + 1] + [i for k in range(nd) for i in (1 + k, 1 + nd + k)]
    x = x.permute(*perm)
    return x.reshape(b, c, *[g * p for g, p in zip(grid, patch)])


# ---------------------------------------------------------------------------------------------
# Init, presets, detection, loading
# ---------------------------------------------------------------------------------------------


def init_weights(model: AdaLNDiT, zero_init: bool = True) -> AdaLNDiT:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings; adaLN-Zero zeroes every modulation and
    the output layer so each block starts as the identity (the output is then exactly 0)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)
    if isinstance(model.y_embedder, LabelEmbedder):
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    else:
        nn.init.normal_(model.y_embedder.y_embedding, std=model.config.caption_channels ** -0.5)
    if zero_init:
        for block in model.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for lin in (model.final_layer.adaLN_modulation[1], model.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
    return model


def get_config(preset) -> AdaLNDiTConfig:
    if isinstance(preset, AdaLNDiTConfig):
        return preset.validate()
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown adaLN DiT preset {preset!r}; expected one of {sorted(PRESETS)}") from None


def random_adaln_dit(preset="tiny", seed: int = 0, dtype: Optional[torch.dtype] = None,
                     zero_init: bool = False) -> tuple[AdaLNDiT, AdaLNDiTConfig]:
    """A seeded random model of a preset (demos/CI). `zero_init=False` keeps the adaLN/final layers random
    too, so the output is not identically zero (True gives the training-start state)."""
    cfg = get_config(preset)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = init_weights(AdaLNDiT(cfg), zero_init=zero_init)
        if not zero_init:  # small random modulation/output weights instead of zeros
            for lin in [blk.adaLN_modulation[1] for blk in model.blocks] + \
                       [model.final_layer.adaLN_modulation[1], model.final_layer.linear]:
                nn.init.normal_(lin.weight, std=0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    if dtype is not None:
        model = model.to(dtype)
        for name, buf in list(model.named_buffers()):  # position tables stay fp32, as when loading a file
            if name.startswith("pos_embed"):
                setattr(model, name, buf.float())
    return model.eval(), cfg


_ANCHOR = "x_embedder.proj.weight"
_PREFIXES = ("model.diffusion_model.", "model.", "module.", "net.", "ema.")


def detect_adaln_layout(sd) -> Optional[str]:
    """"dit-xl2-2d" / "opensora-v1-3d" for an adaLN DiT state dict (prefixes allowed), else None."""
    keys = list(sd.keys())

    def has(suffix):
        return any(k.endswith(suffix) for k in keys)

    if not (has(_ANCHOR) and has("blocks.0.adaLN_modulation.1.weight") and has("final_layer.adaLN_modulation.1.weight")):
        return None
    if has("pos_embed_temporal") and has("y_embedder.y_proj.fc1.weight"):
        return LAYOUT_3D
    if has("y_embedder.embedding_table.weight"):
        return LAYOUT_2D
    return None


def _heads_for(hidden: int) -> int:
    # The published DiT sizes: S/B/L use 64-wide heads; XL (1152) uses 16 heads of 72.
    return 16 if hidden == 1152 else max(1, hidden // 64)


def config_from_state_dict(sd: dict, source: str = "checkpoint", num_heads: Optional[int] = None,
                           metadata: Optional[dict] = None) -> AdaLNDiTConfig:
    """Derive the config from tensor shapes (heads are not in the shapes: metadata, argument, or DiT's sizes)."""
    layout = detect_adaln_layout(sd)
    if layout is None:
        raise CheckpointError(
            f"{source}: not an adaLN-Zero DiT checkpoint (needs {_ANCHOR}, blocks.0.adaLN_modulation.1.weight, "
            f"final_layer.adaLN_modulation.1.weight and a y_embedder); for Wan2.1 files use the Wan DiT loader")

    def need(key):
        if key not in sd:
            raise CheckpointError(f"{source}: missing key {key!r} needed to infer the {layout} config")
        return sd[key]

    w = need(_ANCHOR)
    hidden, in_ch = int(w.shape[0]), int(w.shape[1])
    patch = tuple(int(s) for s in w.shape[2:])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_ratio = need("blocks.0.mlp.fc1.weight").shape[0] / hidden
    out = need("final_layer.linear.weight").shape[0] // math.prod(patch)
    if out not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: final_layer.linear outputs {out} channels per pixel, expected "
                              f"{in_ch} or {2 * in_ch} for {in_ch} input channels")
    meta_heads = (metadata or {}).get("num_heads")
    if num_heads is None and meta_heads is not None:
        try:
            num_heads = int(meta_heads)
        except ValueError:
            raise CheckpointError(f"{source}: metadata num_heads={meta_heads!r} is not an integer") from None
    if num_heads is None:
        num_heads = _heads_for(hidden)
        if hidden % num_heads:
            num_heads = 1
        log_once(logger, ("dit-heads", hidden), "adaLN DiT: head count not stored in the file; using %d heads for "
                 "hidden size %d (DiT's published sizes)", num_heads, hidden)
    kw = dict(in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
              patch_size=patch, learn_sigma=(out == 2 * in_ch))
    if layout == LAYOUT_2D:
        n = need("pos_embed").shape[1]
        g = math.isqrt(n)
        if g * g != n:
            raise CheckpointError(f"{source}: pos_embed has {n} tokens, not a square grid")
        return AdaLNDiTConfig(layout=layout, input_size=(g * patch[0], g * patch[1]),
                              num_classes=need("y_embedder.embedding_table.weight").shape[0] - 1, **kw).validate()
    s = need("pos_embed_spatial").shape[1]
    g = math.isqrt(s)
    if g * g != s:
        raise CheckpointError(f"{source}: pos_embed_spatial has {s} tokens, not a square grid")
    t = need("pos_embed_temporal").shape[1]
    ye = need("y_embedder.y_embedding")
    return AdaLNDiTConfig(layout=layout, input_size=(t * patch[0], g * patch[1], g * patch[2]),
                          caption_channels=int(ye.shape[-1]), caption_tokens=int(ye.shape[0]), **kw).validate()


def load_adaln_dit(path, dtype: Optional[torch.dtype] = None, num_heads: Optional[int] = None
                   ) -> tuple[AdaLNDiT, AdaLNDiTConfig]:
    """Load a DiT-XL/2 or Open-Sora v1 DiT checkpoint (safetensors, weights-only .pt/.pth, or a shard index).

    Args:
        path: the file. Prefixes such as `model.diffusion_model.`, `module.`, `ema.` are stripped.
        dtype: cast floating weights (None keeps the file's dtype); position tables stay fp32.
        num_heads: override the head count (it cannot be derived from tensor shapes).
    Returns:
        (module in eval mode, its AdaLNDiTConfig).
    """
    sd, meta = load_file(path)
    try:
        sd, prefix = strip_prefix(sd, _ANCHOR, _PREFIXES)
    except KeyError:
        raise CheckpointError(f"{path}: not an adaLN-Zero DiT checkpoint: no {_ANCHOR!r} key under any prefix "
                              f"(first keys: {', '.join(list(sd)[:5])})") from None
    if prefix:
        log_once(logger, ("dit-prefix", prefix), "adaLN DiT: stripped key prefix %r", prefix)
    cfg = config_from_state_dict(sd, str(path), num_heads=num_heads, metadata=meta)
    sd = convert_dtype(sd, dtype, keep_fp32=lambda k: k.startswith("pos_embed"))
    model = build_and_load(lambda: AdaLNDiT(cfg), sd, str(path))
    logger.info("loaded adaLN DiT %s from %s (%s, %d blocks, hidden %d)", cfg.layout, path,
                next(iter(sd.values())).dtype, cfg.depth, cfg.hidden_size)
    return model, cfg


def save_adaln_dit(model: AdaLNDiT, path) -> None:
    """Save as safetensors with the head count in the metadata (the one thing shapes do not tell)."""
    from safetensors.torch import save_file

    cfg = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "pt", "twinflow.family": "adaln_dit", "layout": cfg.layout,
                                       "num_heads": str(cfg.num_heads)})


# ---------------------------------------------------------------------------------------------
# Epsilon (DDPM) -> flow velocity
# ---------------------------------------------------------------------------------------------


def ddpm_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_k = prod_{i<=k} (1 - beta_i), linear betas: the schedule DiT-XL/2 and Open-Sora v1 trained with."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class EpsToVelocity(nn.Module):
    """Run an epsilon-predicting DDPM model under the flow-matching contract of `core.handles.Denoiser`.

    The flow state x = (1-s) x0 + s n equals the VP state x_t = a x0 + b n scaled by 1/c, with
    c = 1/sqrt((1-s)^2 + s^2), a = c (1-s), b = c s. The model sees c*x at the fractional DDPM step tau with
    abar(tau) = a^2 (log abar interpolated between integer steps); then x0 = (c x - b eps)/a and v = eps - x0.
    Beyond the table's ends (s near 0 or 1) tau is clamped to 0 / steps-1 and a, b taken from there.
    """

    def __init__(self, inner: nn.Module, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.inner = inner
        self.steps = steps
        self.register_buffer("log_abar", ddpm_linear_alphas_cumprod(steps, beta_start, beta_end).log(),
                             persistent=False)

    @property
    def config(self):
        return getattr(self.inner, "config", None)

    def vp_step(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow sigma [B] -> (tau, c, a, b) [B] in float64 (schedule math is cheap; keep it exact)."""
        s = sigma.to(torch.float64).clamp(0.0, 1.0)
        c = 1.0 / torch.sqrt((1 - s) ** 2 + s ** 2)
        target = torch.log(((1 - s) * c) ** 2).clamp(max=0.0)  # log abar wanted
        table = self.log_abar.to(s.device)  # decreasing in k
        k = torch.searchsorted(-table, -target).clamp(1, self.steps - 1)  # first k with table[k] <= target
        lo, hi = table[k - 1], table[k]
        frac = ((lo - target) / (lo - hi)).clamp(0.0, 1.0)
        tau = (k - 1).to(torch.float64) + frac
        tau = torch.where(target >= table[0], torch.zeros_like(tau), tau)
        log_abar = torch.lerp(lo, hi, frac)
        log_abar = torch.where(target >= table[0], table[0].expand_as(lo), log_abar)
        a = torch.exp(0.5 * log_abar)
        b = torch.sqrt(1 - a ** 2)
        return tau, c, a, b

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = _per_sample(timestep, x.shape[0]).to(x.device).to(torch.float64) / 1000.0
        tau, c, a, b = self.vp_step(sigma)
        shape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.float()
        eps = self.inner((xf * c.float().view(shape)).to(x.dtype), tau.float(), context).float()
        x0 = (xf * c.float().view(shape) - b.float().view(shape) * eps) / a.float().view(shape)
        return (eps - x0).to(x.dtype)


def make_denoiser(model: AdaLNDiT, config: AdaLNDiTConfig, name: str = "", source: str = "",
                  prediction: str = "eps-ddpm-linear"):
    """Wrap as the `TWINFLOW_MODEL` handle (family "dit").

    prediction: "eps-ddpm-linear" (default: the released DiT-XL/2 and Open-Sora v1 weights predict DDPM epsilon
    on a 1000-step linear-beta schedule; the wrapper turns that into flow velocity) or "raw" (the module's own
    output, for checkpoints trained with flow matching).
    """
    from ..core.handles import Denoiser

    if prediction == "eps-ddpm-linear":
        module = EpsToVelocity(model)
    elif prediction == "raw":
        module = model
    else:
        raise ValueError(f"unknown prediction {prediction!r}; expected 'eps-ddpm-linear' or 'raw'")
    log_once(logger, ("dit-prediction", prediction), "adaLN DiT denoiser: prediction=%s", prediction)
    return Denoiser(module=module, family="dit", in_channels=config.in_channels,
                    text_dim=config.caption_channels if config.is_3d else None, name=name or config.layout,
                    config=config, info={"source": source, "layout": config.layout, "config": asdict(config),
                                         "prediction": prediction})


__all__ = ["AdaLNDiT", "AdaLNDiTConfig", "PRESETS", "LAYOUT_2D", "LAYOUT_3D", "detect_adaln_layout",
           "config_from_state_dict", "load_adaln_dit", "save_adaln_dit", "random_adaln_dit", "init_weights", "make_denoiser", "EpsToVelocity",
           "ddpm_linear_alphas_cumprod",
           "sincos_1d", "sincos_2d", "timestep_embedding", "get_config"]
