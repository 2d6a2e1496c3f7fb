"""A procedural video data set: seeded clips of moving, spinning, textured shapes over textured backgrounds.

The training and quality fixture for the `trained:tiny` models (tools/train_fixtures.py,
benchmarks/quality.py). Nothing is stored: clip `seed` is drawn from its own `torch.Generator`, so the same
seed gives the same clip (and caption) in every process. Splits are disjoint seed ranges (`split_seeds`).

Each clip: one shape (circle / square / triangle) with a colour and a fine surface texture (stripes,
checks or dots of 3-5 px period, rotating with the shape) that moves in one direction and spins, over a
background of a base colour modulated by a coarse and a fine grating (period ~3 px), seen by a camera that
pans (the background shifts, the shape's screen motion is its own minus the pan). Edges are anti-aliased
over one pixel. The fine gratings and textures put real energy near the Nyquist frequency: the part a
detail branch has to get right.

The caption names every categorical choice, e.g. "a red striped square moving left spinning clockwise on a
teal background camera panning up"; the continuous draws (position, size, speed, texture phase and
orientation) vary between clips with one caption.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.90, 0.15, 0.12), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.95, 0.85, 0.15), "white": (0.95, 0.95, 0.95), "purple": (0.60, 0.20, 0.80)}
TEXTURES = ("striped", "checkered", "dotted")
MOTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPINS = {"clockwise": 1.0, "anticlockwise": -1.0}
BACKGROUNDS = {"grey": (0.45, 0.45, 0.45), "sand": (0.70, 0.60, 0.40), "teal": (0.15, 0.45, 0.45)}
PANS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# Seed ranges of the splits: disjoint, so a held-out clip is never a training clip.
SPLIT_BASE = {"train": 0, "heldout": 1_000_000_000}
ATTRIBUTES = ("shape", "colour", "texture", "motion", "spin", "background", "pan")


@dataclass(frozen=True)
class Clip:
    video: torch.Tensor  # [3, T, H, W] float32 in [-1, 1]
    caption: str
    attrs: dict  # the categorical choices (ATTRIBUTES -> word)
    seed: int


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Clip seeds `start .. start+n-1` of a split ("train" or "heldout")."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BASE)}")
    return [SPLIT_BASE[split] + start + i for i in range(n)]


def caption(attrs: dict) -> str:
    return (f"a {attrs['colour']} {attrs['texture']} {attrs['shape']} moving {attrs['motion']} spinning "
            f"{attrs['spin']} on a {attrs['background']} background camera panning {attrs['pan']}")


def _choice(gen: torch.Generator, options) -> str:
    keys = list(options)
    return keys[int(torch.randint(len(keys), (), generator=gen))]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def draw_attrs(seed: int) -> dict:
    """The categorical choices of clip `seed` (its caption), without rendering it."""
    gen = torch.Generator().manual_seed(int(seed))
    return {"shape": _choice(gen, SHAPES), "colour": _choice(gen, COLOURS), "texture": _choice(gen, TEXTURES),
            "motion": _choice(gen, MOTIONS), "spin": _choice(gen, SPINS), "background": _choice(gen, BACKGROUNDS),
            "pan": _choice(gen, PANS)}


def _grating(x: torch.Tensor, y: torch.Tensor, period: float, angle: float, phase: float) -> torch.Tensor:
    return torch.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor, size: float) -> torch.Tensor:
    """Signed distance (px, negative inside) in the shape's own frame."""
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - size
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.85 * size
    # equilateral triangle: the largest of three half-plane distances (normals 120 degrees apart)
    d = None
    for k in range(3):
        a = math.pi / 2 + 2 * math.pi * k / 3
        dk = u * math.cos(a) + v * math.sin(a) - 0.55 * size
        d = dk if d is None else torch.maximum(d, dk)
    return d


def _texture(kind: str, u: torch.Tensor, v: torch.Tensor, period: float, phase: float) -> torch.Tensor:
    """Surface pattern in [0, 1] in the shape's frame (it turns with the shape)."""
    if kind == "striped":
        return 0.5 + 0.5 * torch.sin(2 * math.pi * u / period + phase)
    if kind == "checkered":
        s = torch.sin(2 * math.pi * u / period + phase) * torch.sin(2 * math.pi * v / period + phase)
        return 0.5 + 0.5 * torch.tanh(4 * s)
    # dotted: a lattice of soft dots
    cu = torch.cos(2 * math.pi * u / period + phase)
    cv = torch.cos(2 * math.pi * v / period + phase)
    return ((cu + cv) / 2).clamp_min(0) ** 2


def make_clip(seed: int, frames: int = 9, size: int = 64, attrs: Optional[dict] = None) -> Clip:
    """Render clip `seed`: video [3, frames, size, size] in [-1, 1] and its caption.

    `attrs` overrides some categorical choices (e.g. a fixed caption for gate fitting); the continuous
    draws still come from `seed`."""
    if frames < 1 or size < 8:
        raise ValueError(f"a clip needs frames >= 1 and size >= 8, got frames={frames}, size={size}")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = draw_attrs(seed)
    for _ in range(len(ATTRIBUTES)):  # keep the stream position independent of the override
        torch.randint(2, (), generator=gen)
    if attrs:
        unknown = sorted(set(attrs) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown clip attributes {unknown}; expected some of {ATTRIBUTES}")
        chosen = {**chosen, **attrs}
    s = size / 64.0  # every length below is for 64 px and scales with the frame
    shape_size = _uniform(gen, 9.0, 15.0) * s
    speed = _uniform(gen, 1.0, 2.5) * s
    pan_speed = _uniform(gen, 0.5, 1.5) * s
    omega = SPINS[chosen["spin"]] * _uniform(gen, 0.10, 0.25)
    theta0 = _uniform(gen, 0.0, 2 * math.pi)
    # start so that the shape stays inside the frame over the clip (screen motion = own - pan)
    dx, dy = MOTIONS[chosen["motion"]]
    px, py = PANS[chosen["pan"]]
    vx, vy = dx * speed - px * pan_speed, dy * speed - py * pan_speed
    margin = shape_size + 2
    x0 = _uniform(gen, margin, size - margin) - vx * (frames - 1) / 2
    y0 = _uniform(gen, margin, size - margin) - vy * (frames - 1) / 2
    tex_period = _uniform(gen, 3.0, 5.0) * s
    tex_phase = _uniform(gen, 0.0, 2 * math.pi)
    fine_period, fine_angle = _uniform(gen, 2.6, 3.6) * s, _uniform(gen, 0.0, math.pi)
    coarse_period, coarse_angle = _uniform(gen, 10.0, 18.0) * s, _uniform(gen, 0.0, math.pi)
    ph1, ph2 = _uniform(gen, 0.0, 2 * math.pi), _uniform(gen, 0.0, 2 * math.pi)
    shade = _uniform(gen, 0.85, 1.15)

    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")  # (H, W)
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]  # (T, 1, 1)
    # background in world coordinates: the camera at (px, py) * pan_speed * t
    wx, wy = xx + px * pan_speed * t, yy + py * pan_speed * t  # (T, H, W)
    bg_mod = (0.72 + 0.14 * _grating(wx, wy, coarse_period, coarse_angle, ph1)
              + 0.14 * _grating(wx, wy, fine_period, fine_angle, ph2))
    bg = torch.tensor(BACKGROUNDS[chosen["background"]])[:, None, None, None] * shade * bg_mod  # (3, T, H, W)
    # the shape in its own rotating frame
    cx, cy = x0 + vx * t, y0 + vy * t
    theta = theta0 + omega * t
    rx, ry = xx - cx, yy - cy
    cos, sin = torch.cos(theta), torch.sin(theta)
    u, v = cos * rx + sin * ry, -sin * rx + cos * ry
    mask = (0.5 - _sdf(chosen["shape"], u, v, shape_size)).clamp(0.0, 1.0)  # 1 px anti-aliased edge
    tex = _texture(chosen["texture"], u, v, tex_period, tex_phase)
    fg = torch.tensor(COLOURS[chosen["colour"]])[:, None, None, None] * (0.55 + 0.45 * tex)
    video = bg * (1 - mask) + fg * mask  # (3, T, H, W) in [0, ~1.15]
    video = (video.clamp(0.0, 1.0) * 2 - 1).contiguous()
    return Clip(video=video, caption=caption(chosen), attrs=chosen, seed=int(seed))


def make_batch(seeds: Sequence[int], frames: int = 9, size: int = 64,
               attrs: Optional[dict] = None) -> tuple[torch.Tensor, list[str]]:
    """Clips of `seeds` stacked: (video [B, 3, T, H, W], captions)."""
    clips = [make_clip(s, frames, size, attrs) for s in seeds]
    return torch.stack([c.video for c in clips]), [c.caption for c in clips]


def vocabulary() -> list[str]:
    """Every word a caption can contain (for checks that the text encoder tells them apart)."""
    words = {"a", "moving", "spinning", "on", "background", "camera", "panning"}
    for table in (SHAPES, COLOURS, TEXTURES, MOTIONS, SPINS, BACKGROUNDS, PANS):
        words.update(table)
    return sorted(words)


__all__ = ["Clip", "make_clip", "make_batch", "split_seeds", "caption", "draw_attrs", "vocabulary", "SHAPES",
           "COLOURS", "TEXTURES", "MOTIONS", "SPINS", "BACKGROUNDS", "PANS", "SPLIT_BASE", "ATTRIBUTES"]
