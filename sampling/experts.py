"""Wan2.2 A14B's two experts as a preset of the dual-branch sampler.

Wan2.2 A14B is two Wan 14B DiTs over one latent: the high-noise expert (layout, motion) runs while the
timestep t = sigma * 1000 is at or above `boundary * 1000`, the low-noise expert (detail) below it; each has
its own CFG scale, and one UniPC solver runs across the switch (Wan-Video/Wan2.2 `wan/text2video.py`,
`_prepare_model_for_timestep`: `t >= boundary * num_train_timesteps` -> high noise). In TwinFlow's terms:
semantic = high-noise expert, detail = low-noise expert, gate = `GateSchedule("boundary", boundary)` (hard: one
expert per step, no wasted forwards; or a soft blend of `width` in sigma across the boundary).

ComfyUI's Wan2.2 templates run the same two models as two KSamplerAdvanced passes (the first with leftover
noise up to step k, the second from step k): each pass has its own solver (history restarts at k) and its own
model shift. `handoff="restart"` (and per-branch shifts) reproduce that; `handoff="continue"` is Wan2.2's own
single solver.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

HANDOFFS = ("continue", "restart")


@dataclass(frozen=True)
class ExpertPreset:
    """Published sampling settings of a two-expert model (cfg/shift per expert: high = semantic, low = detail)."""

    boundary: float  # fraction of the timestep scale: the high-noise expert while sigma >= boundary
    steps: int
    cfg_high: float
    cfg_low: float
    shift_high: float
    shift_low: float
    sampler: str = "uni_pc"
    scheduler: str = "wan_unipc"  # Wan's own FlowUniPCMultistepScheduler grid (schedules.wan_unipc)
    handoff: str = "continue"  # Wan2.2's generate runs one solver across the switch
    source: str = ""


# Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py and wan_i2v_A14B.py (commit 42bf4cf): boundary, sample_steps,
# sample_shift (one shift for the whole schedule: both experts get it) and sample_guide_scale = (low, high).
PRESETS = {
    "wan22_t2v_a14b": ExpertPreset(boundary=0.875, steps=40, cfg_high=4.0, cfg_low=3.0, shift_high=12.0,
                                   shift_low=12.0, source="Wan2.2 wan/configs/wan_t2v_A14B.py"),
    "wan22_i2v_a14b": ExpertPreset(boundary=0.900, steps=40, cfg_high=3.5, cfg_low=3.5, shift_high=5.0,
                                   shift_low=5.0, source="Wan2.2 wan/configs/wan_i2v_A14B.py"),
}

# ComfyUI's template file names for the T2V experts (fp8_scaled repackage), for docs and error messages
COMFY_T2V_FILES = {"high": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                   "low": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"}


@dataclass(frozen=True)
class ExpertSettings:
    """The settings one run uses: the preset's values with the caller's overrides; `sources` says which is which."""

    preset: str
    boundary: float
    width: float
    steps: int
    cfg_high: float
    cfg_low: float
    shift_high: float
    shift_low: float
    sampler: str
    scheduler: str
    handoff: str
    sources: tuple  # ((field, "preset" | "set"), ...)

    def describe(self) -> str:
        src = dict(self.sources)
        tag = lambda f: "" if src.get(f) == "preset" else " (set)"
        return (f"preset {self.preset} ({PRESETS[self.preset].source}; '(set)' = overridden): boundary "
                f"{self.boundary:g}{tag('boundary')}, blend width {self.width:g}{tag('width')}, steps "
                f"{self.steps}{tag('steps')}, cfg high {self.cfg_high:g}{tag('cfg_high')} / low "
                f"{self.cfg_low:g}{tag('cfg_low')}, shift high {self.shift_high:g}{tag('shift_high')} / low "
                f"{self.shift_low:g}{tag('shift_low')}, {self.sampler}{tag('sampler')} / "
                f"{self.scheduler}{tag('scheduler')}, handoff {self.handoff}{tag('handoff')}")


def resolve(preset: str, *, boundary: Optional[float] = None, width: float = 0.0, steps: Optional[int] = None,
            cfg_high: Optional[float] = None, cfg_low: Optional[float] = None, shift_high: Optional[float] = None,
            shift_low: Optional[float] = None, sampler: Optional[str] = None, scheduler: Optional[str] = None,
            handoff: Optional[str] = None) -> ExpertSettings:
    """The preset's published values, each replaced by the argument given (None = the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown expert preset {preset!r}; expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    given = dict(boundary=boundary, steps=steps, cfg_high=cfg_high, cfg_low=cfg_low, shift_high=shift_high,
                 shift_low=shift_low, sampler=sampler, scheduler=scheduler, handoff=handoff)
    values, sources = {}, []
    for f in fields(ExpertPreset):
        if f.name == "source":
            continue
        v = given[f.name]
        values[f.name] = getattr(p, f.name) if v is None else v
        sources.append((f.name, "preset" if v is None else "set"))
    sources.append(("width", "preset" if width == 0.0 else "set"))
    s = ExpertSettings(preset=preset, width=float(width), sources=tuple(sources), **values)
    if not 0.0 < s.boundary < 1.0:
        raise ValueError(f"expert boundary must be in (0, 1) (a fraction of the timestep scale), got {s.boundary}")
    if s.handoff not in HANDOFFS:
        raise ValueError(f"handoff must be one of {', '.join(HANDOFFS)}, got {s.handoff!r}")
    for name in ("shift_high", "shift_low"):
        if not getattr(s, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(s, name)}")
    return s
