"""Detail refiner: a light, time-causal 3D U-Net that predicts flow velocity on Wan latents.

The detail branch of the dual-branch sampler. Read top to bottom: causal conv, per-position norm,
time embedding, residual block, U-Net, configs/presets, save/load.

Design (from the issue; no public weights exist, random init is seeded):
- input/output [B, 16, T, H, W] latents (Wan VAE space), timestep [B] = sigma * 1000; `context` is
  accepted for the Denoiser contract but not used (this refiner is not text-conditioned).
- time conditioning by scale/shift (FiLM) inside every residual block.
- causal in time like the Wan VAE: every conv pads 2 zero frames at the *front* of the time axis, norms
  are per position (RMS over channels, no statistics across frames), down/upsampling is spatial only.
  So output frame t depends only on input frames <= t, and `stream_state` lets a caller feed a video
  chunk by chunk (the cache holds the last frames each conv needs) with the same result.
- the config travels in the safetensors metadata (`twinflow.config`), never inferred from a file name.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import CheckpointError
from ..core.log import log_once
from ..fused import ops
from .loading import build_and_load, convert_dtype, load_file

logger = logging.getLogger(__name__)

FAMILY = "refiner"
META_FAMILY = "twinflow.family"
META_CONFIG = "twinflow.config"

# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d with (k_t - 1) zero frames padded in front (causal) and symmetric spatial padding.

    `cache` (a dict shared by one streaming pass) carries the last k_t - 1 input frames between chunks,
    replacing the zero frames, so chunked and whole-video outputs agree."""

    def __init__(self, c_in: int, c_out: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=(0, kernel[1] // 2, kernel[2] // 2))
        self.t_pad = kernel[0] - 1

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        if self.t_pad:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                prev = x.new_zeros(*x.shape[:2], self.t_pad, *x.shape[3:])
            x = torch.cat([prev.to(x.dtype), x], dim=2)  # (B, C, t_pad + T, H, W)
            if cache is not None:
                cache[self] = x[:, :, -self.t_pad:].detach()
        return super().forward(x)


class RMSNormCF(nn.Module):
    """Channel-first RMS norm per position (Wan VAE style): no statistics cross frames, so it stays causal."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        # fp32 island: the normalisation divides by a norm that can be tiny in half precision
        return ops.rms_norm_cf(x.float(), self.gamma.float(), silu=silu).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim] = concat(cos, sin) of t * P^(-i/(dim/2)), in fp32 (timesteps reach 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> FiLM(t) -> SiLU -> causal conv, plus a 1x1x1 skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1 = RMSNormCF(c_in)
        self.conv1 = CausalConv3d(c_in, c_out)
        self.time = nn.Linear(t_dim, 2 * c_out)
        self.norm2 = RMSNormCF(c_out)
        self.conv2 = CausalConv3d(c_out, c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cache: Optional[dict]) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True), cache)
        scale, shift = self.time(temb).float()[:, :, None, None, None].chunk(2, dim=1)  # (B, C, 1, 1, 1)
        h = (self.norm2(h).float() * (1 + scale) + shift).to(h.dtype)
        h = self.conv2(F.silu(h), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Spatial /2 by a strided causal conv (time is never downsampled, so frames stay aligned)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = CausalConv3d(c, c, stride=(1, 2, 2))

    def forward(self, x, cache):
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Spatial x2 nearest, then a causal conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = CausalConv3d(c, c)

    def forward(self, x, cache):
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"), cache)


# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefinerConfig:
    in_channels: int = 16
    widths: tuple = (64, 128, 176, 176)  # channels per level; level i works at 1/2^i spatial size
    blocks_per_level: int = 2  # residual blocks per level on the way down (up uses one more, for skips)
    mid_blocks: int = 2
    time_freq_dim: int = 256
    time_dim: int = 256

    def validate(self) -> "RefinerConfig":
        if not self.widths or any(int(w) <= 0 for w in self.widths):
            raise ValueError(f"refiner widths must be positive, got {self.widths}")
        if self.blocks_per_level < 1 or self.mid_blocks < 0 or self.in_channels < 1:
            raise ValueError(f"invalid refiner config {self}")
        if self.time_freq_dim % 2:
            raise ValueError(f"time_freq_dim must be even, got {self.time_freq_dim}")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "metadata") -> "RefinerConfig":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: refiner config metadata is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: refiner config metadata must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown refiner config fields {unknown}; known: {sorted(known)}")
        if "widths" in raw:
            raw["widths"] = tuple(raw["widths"])
        try:
            return cls(**raw).validate()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad refiner config in metadata: {e}") from None


PRESETS: dict[str, RefinerConfig] = {
    "default": RefinerConfig(),  # 37,462,880 parameters (tests/test_refiner.py)
    "tiny": RefinerConfig(widths=(16, 32), blocks_per_level=1, mid_blocks=1, time_freq_dim=32, time_dim=32),
}


class DetailRefiner(nn.Module):
    """Time-causal 3D U-Net velocity predictor: (x [B,C,T,H,W], timestep [B], context) -> [B,C,T,H,W]."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        cfg = config.validate()
        self.config = cfg
        w = [int(c) for c in cfg.widths]
        self.time_embed = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.time_dim), nn.SiLU(),
                                        nn.Linear(cfg.time_dim, cfg.time_dim))
        self.conv_in = CausalConv3d(cfg.in_channels, w[0])
        self.down = nn.ModuleList()
        skips = [w[0]]
        c = w[0]
        for i, width in enumerate(w):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                level.blocks.append(ResBlock(c, width, cfg.time_dim))
                c = width
                skips.append(c)
            if i < len(w) - 1:
                level.downsample = Downsample(c)
                skips.append(c)
            self.down.append(level)
        self.mid = nn.ModuleList(ResBlock(c, c, cfg.time_dim) for _ in range(cfg.mid_blocks))
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(w))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level + 1):
                level.blocks.append(ResBlock(c + skips.pop(), width, cfg.time_dim))
                c = width
            if i > 0:
                level.upsample = Upsample(c)
            self.up.append(level)
        assert not skips
        self.norm_out = RMSNormCF(c)
        self.conv_out = CausalConv3d(c, cfg.in_channels)

    @property
    def spatial_multiple(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: Optional[torch.Tensor] = None,
                stream_state: Optional[dict] = None) -> torch.Tensor:
        """Predict velocity. `stream_state`: pass the same dict for consecutive chunks of one video."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"refiner expects latents [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        if context is not None:
            log_once(logger, "refiner-context", "detail refiner: text context is ignored (the refiner is "
                     "conditioned on time only)")
        in_dtype = x.dtype
        dtype = self.conv_in.weight.dtype
        b, _, _, hgt, wid = x.shape
        m = self.spatial_multiple
        ph, pw = (-hgt) % m, (-wid) % m
        # replicate-pad H/W to a multiple of the U-Net's total stride; cropped at the end (time untouched)
        h = F.pad(x.to(dtype), (0, pw, 0, ph, 0, 0), mode="replicate") if (ph or pw) else x.to(dtype)
        t = torch.as_tensor(timestep, device=x.device).reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"expected {b} timesteps (one per sample), got {t.numel()}")
        temb = self.time_embed(timestep_embedding(t, cfg.time_freq_dim).to(dtype))  # (B, time_dim)
        temb_act = F.silu(temb)

        h = self.conv_in(h, stream_state)
        skips = [h]
        for level in self.down:
            for blk in level.blocks:
                h = blk(h, temb_act, stream_state)
                skips.append(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h, stream_state)
                skips.append(h)
        for blk in self.mid:
            h = blk(h, temb_act, stream_state)
        for level in self.up:
            for blk in level.blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), temb_act, stream_state)
            if hasattr(level, "upsample"):
                h = level.upsample(h, stream_state)
        h = self.conv_out(self.norm_out(h, silu=True), stream_state)
        return h[:, :, :, :hgt, :wid].to(in_dtype)


# ---------------------------------------------------------------------------------------------
# Presets, save, load
# ---------------------------------------------------------------------------------------------


def get_config(preset) -> RefinerConfig:
    if isinstance(preset, RefinerConfig):
        return preset.validate()
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown refiner preset {preset!r}; expected one of {sorted(PRESETS)}") from None


def random_refiner(preset="default", seed: int = 0, dtype: Optional[torch.dtype] = None
                   ) -> tuple[DetailRefiner, RefinerConfig]:
    """A seeded random refiner (PyTorch's default init); the global RNG state is left untouched."""
    cfg = get_config(preset)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DetailRefiner(cfg)
    finally:
        torch.random.set_rng_state(state)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), cfg


def save_refiner(model: DetailRefiner, path) -> None:
    """Save weights as safetensors with the config as JSON in the metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "pt", META_FAMILY: FAMILY, META_CONFIG: model.config.to_json()})


def load_refiner(path, dtype: Optional[torch.dtype] = None) -> tuple[DetailRefiner, RefinerConfig]:
    """Load a refiner saved by `save_refiner`; the config comes from the file's metadata, keys are checked strictly.

    Args:
        path: a `.safetensors` file written by `save_refiner` (or TwinFlow Save Refiner).
        dtype: cast floating weights (None keeps the file's dtype).
    Returns:
        (module in eval mode, its RefinerConfig).
    """
    sd, meta = load_file(path)
    family = meta.get(META_FAMILY)
    text = meta.get(META_CONFIG)
    if text is None:
        raise CheckpointError(
            f"{path}: no refiner config in the file metadata (key {META_CONFIG!r}"
            f"{'; the file has no metadata at all' if not meta else ''}). Refiner files must be safetensors "
            f"written by save_refiner / the TwinFlow Save Refiner node; the config is never guessed from the name.")
    if family not in (None, FAMILY):
        raise CheckpointError(f"{path}: metadata says this is a {family!r} file, not a {FAMILY!r}")
    cfg = RefinerConfig.from_json(text, str(path))
    sd = convert_dtype(sd, dtype)
    model = build_and_load(lambda: DetailRefiner(cfg), sd, str(path))
    return model, cfg


def make_denoiser(model: DetailRefiner, config: RefinerConfig, name: str = "", source: str = ""):
    """Wrap as the `TWINFLOW_MODEL` handle (family "refiner", no text)."""
    from ..core.handles import Denoiser

    return Denoiser(module=model, family=FAMILY, in_channels=config.in_channels, text_dim=None,
                    name=name or "refiner", config=config, info={"source": source, "config": asdict(config)})


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DetailRefiner", "RefinerConfig", "PRESETS", "CausalConv3d", "random_refiner", "save_refiner",
           "load_refiner", "make_denoiser", "get_config", "param_count"]
