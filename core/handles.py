"""The objects that travel between nodes for denoisers (type `TWINFLOW_MODEL`).

Conventions every denoiser follows (Wan's flow matching, same as ComfyUI's `CONST` model sampling):
  x_sigma = (1 - sigma) * x0 + sigma * noise,   velocity v = noise - x0,
  module(x [B,C,T,H,W], timestep [B] = sigma * 1000, context [B,L,D] or None) -> v  [B,C,T,H,W]
  denoised x0 = x_sigma - sigma * v.
Image-to-video models take more (see `velocity`): channels joined to x (Wan I2V: mask + image latent), CLIP
vision tokens (`clip_fea`), and for Wan2.2 TI2V a timestep per frame (per token, as the model takes it).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Denoiser:
    """A velocity-predicting denoiser plus what samplers, quantize and compile need to know about it."""

    module: torch.nn.Module
    family: str  # "wan_dit" | "dit" | "refiner" | "comfy" (a wrapped ComfyUI MODEL)
    in_channels: int
    text_dim: Optional[int] = None  # width of the context it expects; None = ignores text
    name: str = ""
    config: Any = None
    timestep_scale: float = 1000.0  # timestep fed to the module = sigma * timestep_scale
    info: dict = field(default_factory=dict)  # free-form: quant recipe, compile status, source file

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, context: Optional[torch.Tensor], *,
                 concat: Optional[torch.Tensor] = None, clip_fea: Optional[torch.Tensor] = None,
                 frame_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict the flow velocity at noise level `sigma` ([B] or scalar) for latent `x`.

        `concat` (B, C', T, H, W) is joined to x on channels (ComfyUI's c_concat); `clip_fea` (B, N, D) goes to
        the module as `clip_fea`; `frame_weights` (B, T) scales the timestep per latent frame (ComfyUI's
        WAN22.process_timestep), handed to the module per token (each frame's value over its H*W/patch tokens)."""
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = (sigma * self.timestep_scale).to(torch.float32)
        kwargs = {}
        if frame_weights is not None:
            t = token_timesteps(t, frame_weights.to(device=t.device, dtype=torch.float32), x.shape,
                                getattr(self.config, "patch_size", (1, 1, 1)))
        if concat is not None:
            x = torch.cat([x, concat.to(device=x.device, dtype=x.dtype)], dim=1)
        if clip_fea is not None:
            if not _takes_keyword(self.module, "clip_fea"):
                from .errors import UnsupportedError

                raise UnsupportedError(f"model {self.name or self.family!r}: its {type(self.module).__name__} takes no "
                                       f"CLIP vision features (clip_fea), which this image-to-video model needs; a "
                                       f"compiled Wan I2V model with CLIP is not supported yet: run it uncompiled")
            kwargs["clip_fea"] = clip_fea.to(device=x.device, dtype=x.dtype)
        return self.module(x, t, context, **kwargs)

    def clone(self, **changes) -> "Denoiser":
        """A new handle sharing the module (modules are never mutated in place by nodes)."""
        new = copy.copy(self)
        new.info = dict(self.info)
        for k, v in changes.items():
            setattr(new, k, v)
        return new


def _takes_keyword(module: torch.nn.Module, name: str) -> bool:
    """Whether `module.forward` accepts keyword `name` (or **kwargs)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return True  # not introspectable: let the call decide
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def token_timesteps(t: torch.Tensor, frame_weights: torch.Tensor, shape, patch_size) -> torch.Tensor:
    """Timesteps (B,) scaled per latent frame (B, T) and spread to the model's tokens (B, L): tokens run frame by
    frame, H/ph * W/pw per frame (as ComfyUI's Wan repeats a frame's time embedding over its tokens)."""
    b, _, frames, h, w = shape
    pt, ph, pw = patch_size
    if frame_weights.shape != (b, frames) or pt != 1:
        raise ValueError(f"per-frame timesteps need weights of shape ({b}, {frames}) and a temporal patch of 1, got "
                         f"{tuple(frame_weights.shape)} and patch {tuple(patch_size)}")
    per_frame = frame_weights * t.view(b, 1)  # (B, T)
    return per_frame.repeat_interleave((h // ph) * (w // pw), dim=1)  # (B, T * H/ph * W/pw)


def enter_text_caches(stack: contextlib.ExitStack, *denoisers) -> None:
    """Enter `text_cache()` of each distinct denoiser module that has one (the Wan DiT) for a run.

    The prompts are fixed during a run, so steps after the first reuse the text embedding and every block's
    cross-attention K/V; the model checks each call's context and weights against the cached entry, so the
    result is unchanged. The stack leaves the cache (dropping it) on every exit, errors and interrupts too."""
    seen = set()
    for d in denoisers:
        module = getattr(d, "module", None)
        enter = getattr(module, "text_cache", None)
        if callable(enter) and id(module) not in seen:
            seen.add(id(module))
            stack.enter_context(enter())
