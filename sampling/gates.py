"""Gate schedules (type `GATE_SCHEDULE`): a pure function (step, sigma, steps) -> (alpha, cutoff).

alpha in [0, 1] weighs the semantic branch against the detail branch in the high-frequency part of the
prediction; cutoff c is the radius (in units of Nyquist) below which the semantic branch is kept as is
(see `fusion.py`; c = 0: plain blend). Kinds:
  constant  alpha everywhere
  linear    alpha_start -> alpha_end over the steps; cosine: the same with a half-cosine ease
  steps     fuse only at the listed steps (counted from 1, as the progress bar; seed default 3,6,9) with
            `alpha` or the gate net; semantic only (alpha = 1) elsewhere
  boundary  semantic while sigma >= boundary, detail below (Wan2.2 A14B: 0.875 T2V, 0.9 I2V); with a `width`
            > 0 a soft blend instead: alpha falls linearly from 1 to 0 across boundary +- width/2 (both run there)
  learned   alpha = sigmoid(gate_net(sigma)), a small MLP on the timestep embedding (`GateNet`)
  list      explicit per-step alphas (one per step)
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

GATE_KINDS = ("constant", "linear", "cosine", "steps", "boundary", "learned", "list")
GATE_NET_KIND = "twinflow_gate_mlp"


# --------------------------------------------------------------------------------------------- gate net
@dataclass(frozen=True)
class GateNetConfig:
    freq_dim: int = 64  # sinusoidal timestep embedding width (Wan uses 256 for its DiT; a gate needs little)
    hidden: int = 32
    timestep_scale: float = 1000.0  # the net sees t = sigma * timestep_scale, as the denoisers do


GATE_NET_PRESETS = {"tiny": GateNetConfig(freq_dim=16, hidden=8), "default": GateNetConfig()}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of timesteps t [N] (cos half then sin half, as Wan's DiT)."""
    if dim % 2:
        raise ValueError(f"freq_dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]  # fp64: t*freq reaches 1000 rad, fp32 loses phase
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(torch.float32)


class GateNet(nn.Module):
    """logit(alpha) = MLP(embedding(sigma * 1000)); alpha = sigmoid(logit)."""

    def __init__(self, config: GateNetConfig = GateNetConfig()):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(config.freq_dim, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 1))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:  # sigma [N] -> logits [N]
        emb = timestep_embedding(sigma.reshape(-1) * self.config.timestep_scale, self.config.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype)).reshape(-1)

    @torch.no_grad()
    def alpha(self, sigma: float) -> float:
        return float(torch.sigmoid(self(torch.tensor([float(sigma)], device=self.mlp[0].weight.device)))[0])


def save_gate_net(net: GateNet, path, extra: Optional[dict] = None) -> None:
    """safetensors with the config (and fit diagnostics) as JSON in the metadata."""
    from safetensors.torch import save_file

    meta = {"twinflow_kind": GATE_NET_KIND, "config": json.dumps(asdict(net.config))}
    if extra:
        meta["fit"] = json.dumps(extra)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_gate_net(path) -> GateNet:
    """Load a gate net saved by `save_gate_net` / `twinflow fit-gate`; refuses other files clearly."""
    from ..core.errors import CheckpointError
    from ..models.loading import build_and_load, load_file

    sd, meta = load_file(path)
    if (meta or {}).get("twinflow_kind") != GATE_NET_KIND:
        raise CheckpointError(f"{path}: not a TwinFlow gate net (metadata twinflow_kind="
                              f"{(meta or {}).get('twinflow_kind')!r}, expected {GATE_NET_KIND!r}); "
                              f"make one with `twinflow fit-gate`")
    try:
        cfg = GateNetConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: gate net metadata 'config' is missing or malformed ({e})") from None
    net = build_and_load(lambda: GateNet(cfg), sd, str(path))
    return net.float().eval()


# ----------------------------------------------------------------------------------------- schedule
def parse_floats(text: str, what: str) -> tuple:
    """'0.5, 1 ,0' -> (0.5, 1.0, 0.0); clear error naming the widget otherwise."""
    items = [t for t in str(text).replace(";", ",").split(",") if t.strip()]
    try:
        return tuple(float(t) for t in items)
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def parse_steps(text: str, what: str = "fuse_steps") -> tuple:
    vals = parse_floats(text, what)
    if any(v != int(v) or v < 1 for v in vals):
        raise ValueError(f"{what}: expected step numbers counted from 1 (e.g. '3,6,9'), got {text!r}")
    return tuple(sorted({int(v) for v in vals}))


@dataclass(frozen=True)
class GateSchedule:
    kind: str = "constant"
    alpha: float = 1.0
    alpha_start: float = 1.0
    alpha_end: float = 0.0
    fuse_steps: tuple = (3, 6, 9)
    boundary: float = 0.875
    values: tuple = ()
    cutoff: float = 0.0
    gate_net: Optional[GateNet] = field(default=None, compare=False, repr=False)
    width: float = 0.0  # kind 'boundary': soft blend width in sigma (0 = hard switch)

    def __post_init__(self):
        if self.kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {self.kind!r}; expected one of {', '.join(GATE_KINDS)}")
        for name in ("alpha", "alpha_start", "alpha_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"gate {name} must be in [0, 1], got {v}")
        if any(not 0.0 <= v <= 1.0 for v in self.values):
            raise ValueError(f"gate values must all be in [0, 1], got {self.values}")
        if self.cutoff < 0:
            raise ValueError(f"gate cutoff must be >= 0, got {self.cutoff}")
        if not 0.0 <= self.width <= 1.0:
            raise ValueError(f"gate boundary width must be in [0, 1] (sigma units; 0 = hard switch), got {self.width}")
        if self.kind == "learned" and self.gate_net is None:
            raise ValueError("gate kind 'learned' needs a gate net (load one with TwinFlow Load Gate Net "
                             "or make one with `twinflow fit-gate`)")
        if self.kind == "list" and not self.values:
            raise ValueError("gate kind 'list' needs per-step values, e.g. '1,1,0.5,0.5'")

    def __call__(self, step: int, sigma: float, steps: int) -> tuple[float, float]:
        """(alpha, cutoff) at 0-based `step` of `steps`, noise level `sigma`."""
        k = self.kind
        if k == "constant":
            a = self.alpha
        elif k in ("linear", "cosine"):
            t = step / (steps - 1) if steps > 1 else 0.0
            if k == "cosine":
                t = 0.5 * (1.0 - math.cos(math.pi * t))
            a = self.alpha_start + (self.alpha_end - self.alpha_start) * t
        elif k == "steps":
            if step + 1 not in self.fuse_steps:
                return 1.0, self.cutoff  # semantic only
            a = self.gate_net.alpha(sigma) if self.gate_net is not None else self.alpha
        elif k == "boundary":
            if self.width > 0:  # soft: 1 above boundary + width/2, 0 below boundary - width/2, linear between
                a = 0.5 + (sigma - self.boundary) / self.width
            else:  # Wan2.2's rule: the high-noise expert while t >= boundary * 1000 (t = sigma * 1000)
                a = 1.0 if sigma >= self.boundary else 0.0
        elif k == "learned":
            a = self.gate_net.alpha(sigma)
        else:  # list
            if len(self.values) != steps:
                raise ValueError(f"gate kind 'list' has {len(self.values)} values but the sampler runs {steps} "
                                 f"steps; give exactly one value per step")
            a = self.values[step]
        return min(1.0, max(0.0, float(a))), float(self.cutoff)

    @property
    def hard_switch(self) -> bool:
        """A hard sigma boundary: every step runs exactly one branch (semantic above, detail below)."""
        return self.kind == "boundary" and self.width == 0.0 and self.cutoff == 0.0

    def switch_step(self, sigmas) -> int:
        """Kind 'boundary': the first 0-based step whose sigma is below the boundary (= steps if none is)."""
        steps = len(sigmas) - 1
        return next((i for i in range(steps) if float(sigmas[i]) < self.boundary), steps)

    def table(self, sigmas) -> list[tuple[float, float]]:
        """(alpha, cutoff) for every step of a sigma grid (len steps+1)."""
        steps = len(sigmas) - 1
        return [self(i, float(sigmas[i]), steps) for i in range(steps)]

    def describe(self) -> str:
        k = self.kind
        if k == "constant":
            s = f"alpha={self.alpha:g}"
        elif k in ("linear", "cosine"):
            s = f"alpha {self.alpha_start:g}->{self.alpha_end:g}"
        elif k == "steps":
            src = "gate net" if self.gate_net is not None else f"alpha={self.alpha:g}"
            s = f"fuse at steps {','.join(map(str, self.fuse_steps))} ({src})"
        elif k == "boundary":
            s = f"semantic while sigma >= {self.boundary:g}" + (
                f", soft blend over sigma {self.boundary - self.width / 2:g}..{self.boundary + self.width / 2:g}"
                if self.width > 0 else " (hard switch)")
        elif k == "learned":
            s = "alpha = sigmoid(gate_net(t))"
        else:
            s = f"{len(self.values)} values"
        return f"{k}: {s}, cutoff={self.cutoff:g}"


def plot_schedule(schedule: GateSchedule, sigmas, width: int = 512, height: int = 256) -> torch.Tensor:
    """IMAGE [1, height, width, 3] float 0..1: alpha (blue) and cutoff (orange, /1.5) and sigma (grey) per step."""
    from PIL import Image, ImageDraw

    steps = len(sigmas) - 1
    rows = schedule.table(sigmas)
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 36, width - 10, 20, height - 24
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    for frac, label in ((0.0, "0"), (0.5, ".5"), (1.0, "1")):
        y = bottom - frac * (bottom - top)
        d.line([left - 4, y, left, y], fill=(120, 120, 120))
        d.text((4, y - 6), label, fill=(60, 60, 60))

    def xy(i, v):
        x = left + (i / max(1, steps - 1)) * (right - left) if steps > 1 else (left + right) / 2
        return x, bottom - max(0.0, min(1.0, v)) * (bottom - top)

    series = [([float(sigmas[i]) for i in range(steps)], (150, 150, 150)),
              ([c / 1.5 for _, c in rows], (230, 120, 20)),
              ([a for a, _ in rows], (30, 90, 220))]
    for vals, color in series:
        pts = [xy(i, v) for i, v in enumerate(vals)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    d.text((left, 4), f"alpha (blue)  cutoff/1.5 (orange)  sigma (grey)  {steps} steps", fill=(40, 40, 40))
    d.text((left, bottom + 6), schedule.describe()[:80], fill=(40, 40, 40))
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (arr.float() / 255.0).unsqueeze(0)
