"""Step caching: skip a denoiser forward when its output would barely change, and reuse the cached one.

A sampler consults one `BranchCache` per branch (semantic / detail, later the two Wan2.2 experts), so one
branch's skips never use another branch's history. Per model evaluation:

    cache.begin(step, sigma)
    for each forward group (the cond+uncond batch, or each pass alone):
        skip = cache.plan(x, passes)             # passes the policy skips at this evaluation
        out  = cache.complete(x, passes, {p: v}) # v for the computed passes -> v for every pass of the group

A skipped pass returns x + (v_prev - x_prev): the output-minus-input residual of the pass's last computed
evaluation (EasyCache's reuse rule; TeaCache and MagCache reuse the residual of the transformer blocks inside
the model, which would still run the head; at the sampler level the whole forward is saved).

Policies (the criterion each publishes; `threshold` 0 disables skipping, so the result is the uncached one):
  * easycache — ComfyUI core's `EasyCache` node (comfy_extras/nodes_easycache.py, ComfyUI 0.3.64), itself from
    H-EmbodVis/EasyCache. k = |dv|/|dx| from the last two computed evaluations (mean absolute change of the
    8x-subsampled output and input); each evaluation adds k*|x - x_prev| / mean|v_prev| to an accumulator and
    skips while it stays below the threshold (reset to 0 on a computed one). Decided on one pass for all
    passes, the negative prompt's when CFG runs (core decides on the first entry of ComfyUI's batch, which is
    the uncond); the norm is taken over the whole deciding forward. Window: core's start/end percent
    (0.15/0.95) mapped to sigma through the flow shift (ComfyUI `percent_to_sigma`).
  * magcache — Zehong-Ma/MagCache (Wan2.1): per pass, the product of the calibrated magnitude ratios since the
    last computed step, err += |1 - product|, skip while err < threshold and at most K consecutive skips;
    the first 20% of the calls always computed.
  * teacache — ali-vilab/TeaCache (Wan2.1): per pass, acc += poly(rel_l1(e_t, e_prev)) on the timestep
    embedding (e, or e0 with `ret_steps`), skip while acc < threshold; the first and last steps computed.
MagCache and TeaCache need the model's calibration (published for Wan2.1 T2V 1.3B and 14B only).

The cached residuals live beside the latent (`compute`), in CPU memory (`offload`) or on a named device; a device
the machine lacks is refused when the run starts (`cache_device`).

Counting: a call "pass" is one prompt's forward (cond, uncond). A step of a branch is skipped when every pass
of it is; forwards saved count latents not pushed through the model (a CFG batch of 2B is 2).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ..core.log import log_once

logger = logging.getLogger(__name__)

POLICIES = ("easycache", "magcache", "teacache")
WINDOW_UNITS = ("percent", "step", "sigma")
CACHE_DEVICES = ("compute", "offload")
CALIBRATIONS = ("auto", "wan2.1-1.3b", "wan2.1-14b")

# ---------------------------------------------------------------------------------------------------------
# Published calibration data (numbers copied as published, with their source)
# ---------------------------------------------------------------------------------------------------------

# MagCache magnitude ratios, Wan2.1 T2V, 50 steps x (cond, uncond) interleaved, the first step padded with 1.0.
# Source: github.com/Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py (`mag_ratios` for 'T2V-1.3B' and
# 'T2V-14B'), commit 1a66b6d22a99ed5cb6685dac63bd340bee87f92f. Defaults there: --magcache_thresh 0.12,
# --magcache_K 2, --retention_ratio 0.2; other step counts use nearest interpolation per pass (as there).
MAGCACHE_RATIOS = {
    "wan2.1-1.3b": (1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634,
                    0.99685, 0.99567, 0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506,
                    0.99535, 0.99531, 0.99552, 0.99549, 0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518,
                    0.99514, 0.99484, 0.99478, 0.99481, 0.99479, 0.99415, 0.99413, 0.99419, 0.99416, 0.99396,
                    0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304, 0.9927, 0.9927, 0.99228, 0.99226,
                    0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003, 0.98944, 0.98942,
                    0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359,
                    0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002,
                    0.96538, 0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414,
                    0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939),
    "wan2.1-14b": (1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966,
                   0.99658, 0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545,
                   0.99468, 0.99465, 0.99438, 0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517,
                   0.99516, 0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418, 0.99416, 0.99271,
                   0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216, 0.99217, 0.99163,
                   0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866, 0.98772, 0.9877,
                   0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173, 0.98037,
                   0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349,
                   0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693,
                   0.90678, 0.8796, 0.87945, 0.86111, 0.86189),
}

# TeaCache polynomial rescale coefficients (numpy.poly1d order, highest power first), Wan2.1 T2V.
# Source: github.com/ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py, commit
# 7c10efc4702c6b619f47805f7abe4a7a08085aa0: "e" = timestep embedding (default; ret_steps = 1 step, last step
# always computed), "e0" = projected embedding (--use_ret_steps; ret_steps = 5 steps). Script default
# --teacache_thresh 0.2; its README suggests 0.08 (1.3B) and 0.2 (14B).
TEACACHE_COEFFICIENTS = {
    ("wan2.1-1.3b", "e"): (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    ("wan2.1-14b", "e"): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("wan2.1-1.3b", "e0"): (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    ("wan2.1-14b", "e0"): (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
}

# Defaults per policy: threshold, window, consecutive-skip cap (0 = none). EasyCache: core's node
# (reuse_threshold 0.2, start_percent 0.15, end_percent 0.95); MagCache/TeaCache: the authors' scripts.
DEFAULTS = {
    "easycache": {"threshold": 0.2, "start": 0.15, "end": 0.95, "max_skips": 0},
    "magcache": {"threshold": 0.12, "start": None, "end": None, "max_skips": 2},
    "teacache": {"threshold": 0.2, "start": None, "end": None, "max_skips": 0},
}


@dataclass(frozen=True)
class StepCacheConfig:
    """What to cache and when; immutable, so one config can be attached to many models."""

    policy: str
    threshold: float
    start: Optional[float] = None  # window start (unit below); None = the policy's own rule only
    end: Optional[float] = None
    window: str = "percent"  # percent of the schedule (ComfyUI percent_to_sigma) | step (0-based, inclusive) | sigma
    max_skips: int = 0  # cap on consecutive skipped evaluations of a pass; 0 = none (MagCache's K)
    cache_device: str = "compute"  # compute = the latent's device; offload = CPU memory; or a device (cuda:1)
    calibration: str = "auto"  # magcache/teacache: auto (from the model's shape) | wan2.1-1.3b | wan2.1-14b
    ret_steps: bool = False  # teacache: the authors' --use_ret_steps variant (e0, first 5 steps computed)
    retention: float = 0.2  # magcache: fraction of the calls always computed first (the authors' retention_ratio)
    match_core: bool = False  # easycache: reproduce ComfyUI 0.3.64's skipped-step output (see _core_skip_output)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown step cache policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"step cache threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.window not in WINDOW_UNITS:
            raise ValueError(f"step cache window unit must be one of {', '.join(WINDOW_UNITS)}, got {self.window!r}")
        for k in ("start", "end"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"step cache {k} must be a number or None, got {v!r}")
        if self.window == "percent":
            for k in ("start", "end"):
                v = getattr(self, k)
                if v is not None and not 0.0 <= v <= 1.0:
                    raise ValueError(f"step cache {k} is a percent of the schedule in [0, 1], got {v}")
        if not (isinstance(self.max_skips, int) and self.max_skips >= 0):
            raise ValueError(f"step cache max_skips must be an integer >= 0 (0 = no cap), got {self.max_skips!r}")
        if self.cache_device not in CACHE_DEVICES:
            try:
                dev = torch.device(self.cache_device)
            except (RuntimeError, TypeError):
                dev = None
            if dev is None or dev.type == "meta":
                raise ValueError(f"step cache device must be 'compute' (the latent's device), 'offload' (CPU "
                                 f"memory) or a torch device such as cpu / cuda:1, got {self.cache_device!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"step cache calibration must be one of {', '.join(CALIBRATIONS)}, got "
                             f"{self.calibration!r}")
        if not 0.0 <= self.retention <= 1.0:
            raise ValueError(f"magcache retention must be in [0, 1], got {self.retention}")

    def describe(self) -> str:
        parts = [f"{self.policy} {self.threshold:g}"]
        if self.start is not None or self.end is not None:
            s = "-" if self.start is None else f"{self.start:g}"
            e = "-" if self.end is None else f"{self.end:g}"
            parts.append(f"window {s}..{e} ({self.window})")
        if self.max_skips:
            parts.append(f"max {self.max_skips} consecutive skips")
        if self.policy in ("magcache", "teacache"):
            parts.append(f"calibration {self.calibration}")
        if self.policy == "teacache" and self.ret_steps:
            parts.append("ret_steps")
        if self.policy == "magcache" and self.retention != 0.2:
            parts.append(f"retention {self.retention:g}")
        if self.cache_device == "offload":
            parts.append("cache offloaded to CPU")
        elif self.cache_device != "compute":
            parts.append(f"cache on {self.cache_device}")
        if self.match_core:
            parts.append("core-compatible skip output")
        return ", ".join(parts)


def make_config(policy: str, threshold: Optional[float] = None, **kw) -> StepCacheConfig:
    """A config with the policy's published defaults for whatever is not given."""
    if policy not in DEFAULTS:
        raise ValueError(f"unknown step cache policy {policy!r}; expected one of {', '.join(POLICIES)}")
    d = dict(DEFAULTS[policy])
    if kw.get("window", "percent") != "percent":  # the default window is in percent: not a step or sigma bound
        d["start"] = d["end"] = None
    if threshold is not None:
        d["threshold"] = threshold
    d.update(kw)
    return StepCacheConfig(policy=policy, **d)


_SPEC_KEYS = {"start": float, "end": float, "window": str, "max_skips": int, "device": str, "calibration": str,
              "ret_steps": bool, "retention": float, "match_core": bool}


def parse_spec(text: str) -> Optional[StepCacheConfig]:
    """`easycache:0.2`, `magcache:0.12,max_skips=2`, `teacache:0.08,calibration=wan2.1-1.3b,start=0.1` -> config;
    `none`/`off` -> None. Keys: start, end, window, max_skips, device (compute|offload), calibration, ret_steps,
    retention, match_core."""
    text = (text or "").strip()
    if text.lower() in ("none", "off"):
        return None
    head, _, rest = text.partition(",")
    policy, _, thr = head.partition(":")
    policy = policy.strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"step cache {text!r}: unknown policy {policy!r}; expected one of {', '.join(POLICIES)} "
                         f"(e.g. easycache:0.2) or none")
    kw: dict = {}
    try:
        threshold = float(thr) if thr.strip() else None
    except ValueError:
        raise ValueError(f"step cache {text!r}: threshold {thr!r} is not a number (e.g. {policy}:0.2)") from None
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in _SPEC_KEYS:
            raise ValueError(f"step cache {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(_SPEC_KEYS)}")
        typ = _SPEC_KEYS[key]
        val = val.strip()
        try:
            if typ is bool:
                if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                v = val.lower() in ("1", "true", "yes")
            elif key in ("start", "end") and val.lower() in ("none", ""):
                v = None
            else:
                v = typ(val)
        except ValueError:
            raise ValueError(f"step cache {text!r}: {key}={val!r} is not a valid {typ.__name__}") from None
        kw["cache_device" if key == "device" else key] = v
    return make_config(policy, threshold, **kw)


# ---------------------------------------------------------------------------------------------------------
# Run-level override (the CLI's --step-cache): applies to every sampler of a run
# ---------------------------------------------------------------------------------------------------------

OFF = "off"
_override: list = []  # stack of _OverrideUse


class _OverrideUse:
    """What `run_override` yields: how many sampler branches took the override (falsy when none did)."""

    def __init__(self, config):
        self.config = config
        self.branches: list = []

    def __bool__(self) -> bool:
        return bool(self.branches)


@contextlib.contextmanager
def run_override(config):
    """Within the block every TwinFlow sampler uses `config` (a StepCacheConfig, or OFF for no caching) on every
    branch, instead of what its models carry; None leaves the models' own settings. Yields a record that is
    falsy when no sampler branch consulted it (the CLI says so). Hosts that run core samplers read
    `current_override()`."""
    if config is not None and config != OFF and not isinstance(config, StepCacheConfig):
        raise TypeError(f"run_override takes a StepCacheConfig or step_cache.OFF, got {type(config).__name__}")
    use = _OverrideUse(config)
    if config is None:
        yield use
        return
    _override.append(use)
    try:
        yield use
    finally:
        _override.pop()


def current_override():
    """The innermost run-level override: a StepCacheConfig, OFF, or None (none set)."""
    return _override[-1].config if _override else None


def config_for(denoiser, branch: str = "") -> Optional[StepCacheConfig]:
    """The config a sampler uses for this denoiser: the run override if set, else the one it carries."""
    own = getattr(denoiser, "info", {}).get("step_cache")
    ov = current_override()
    if ov is None:
        return own
    _override[-1].branches.append(branch or "model")
    if own is not None and own != ov:
        log_once(logger, ("step_cache_override", id(denoiser), branch), "step cache: the run's --step-cache (%s) "
                 "replaces the %s branch's own setting (%s)", "off" if ov == OFF else ov.describe(), branch or "model",
                 own.describe())
    return None if ov == OFF else ov


# ---------------------------------------------------------------------------------------------------------
# Model introspection for magcache / teacache (duck-typed: our WanDiT, or a host's Wan model via time_source())
# ---------------------------------------------------------------------------------------------------------

def _wan_core(denoiser):
    m = getattr(denoiser, "module", denoiser)
    src = getattr(m, "time_source", None)
    m = src() if callable(src) else m
    if all(hasattr(m, a) for a in ("time_embedding", "time_projection", "blocks")):
        return m
    return None


def detect_calibration(denoiser) -> Optional[str]:
    """'wan2.1-1.3b' / 'wan2.1-14b' from the model's width and depth, or None when it is neither."""
    m = _wan_core(denoiser)
    if m is None:
        return None
    dim, layers = int(m.time_embedding[0].out_features), len(m.blocks)
    return {(1536, 30): "wan2.1-1.3b", (5120, 40): "wan2.1-14b"}.get((dim, layers))


def _resolve_calibration(config: StepCacheConfig, denoiser, branch: str) -> str:
    if config.calibration != "auto":
        return config.calibration
    found = detect_calibration(denoiser) if denoiser is not None else None
    if found is None:
        from ..core.errors import UnsupportedError

        raise UnsupportedError(
            f"{branch or 'model'} branch: {config.policy} needs calibration data, published only for Wan2.1 T2V 1.3B "
            f"(dim 1536, 30 blocks) and 14B (dim 5120, 40 blocks), and this model is neither; use easycache "
            f"(calibration-free), or set calibration=wan2.1-1.3b / wan2.1-14b to use those numbers anyway")
    return found


def wan_time_signal(denoiser, sigma: float, kind: str) -> torch.Tensor:
    """Wan's timestep embedding e (kind 'e') or its projection e0 ('e0') at timestep sigma*1000, float32."""
    from ..models.wan_dit import sinusoidal_embedding

    m = _wan_core(denoiser)
    if m is None:
        from ..core.errors import UnsupportedError

        raise UnsupportedError("teacache needs a Wan DiT's time embedding (time_embedding / time_projection); "
                               "this model has none: use easycache")
    lin = m.time_embedding[0]
    dev = lin.weight.device
    t = torch.tensor([float(sigma) * 1000.0], device=dev)
    with torch.no_grad():
        s = sinusoidal_embedding(t, int(lin.in_features)).to(lin.weight.dtype)
        e = m.time_embedding(s).float()
        if kind == "e":
            return e
        return m.time_projection(e.to(lin.weight.dtype)).float()


def nearest_interp(values, n: int) -> list:
    """The authors' nearest-neighbour resampling of a per-step table to n steps."""
    if n == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (n - 1)
    return [values[int(round(i * scale))] for i in range(n)]  # numpy.round = round-half-even, as Python's round


def percent_to_sigma_flow(shift: float) -> Callable[[float], float]:
    """ComfyUI `ModelSamplingDiscreteFlow.percent_to_sigma` for a flow shift."""
    def f(p: float) -> float:
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        t = 1.0 - p
        return shift * t / (1 + (shift - 1) * t)
    return f


# ---------------------------------------------------------------------------------------------------------
# The policies: per-branch state, decisions per pass
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PassStats:
    evaluations: int = 0
    skipped: int = 0
    skipped_steps: list = field(default_factory=list)


class _Policy:
    """Base: the decision for a pass at the current evaluation; `record` sees computed outputs."""

    def __init__(self, cache: "BranchCache"):
        self.c = cache

    def decide(self, x: torch.Tensor, passes: tuple) -> set:
        return set()

    def record(self, x: torch.Tensor, passes: tuple, computed: dict) -> None:
        pass


class _EasyCache(_Policy):
    """ComfyUI core's EasyCache criterion (see the module docstring)."""

    def __init__(self, cache):
        super().__init__(cache)
        self.k = None  # relative transformation rate |dv| / |dx|
        self.cum = 0.0
        self.x_prev = None  # subsampled input of the deciding pass at its last computed evaluation
        self.out_prev = None
        self.norm_prev = None  # mean |output| of the last computed deciding forward
        self.decider: Optional[str] = None
        self._eval_skip: Optional[bool] = None  # this evaluation's decision, once the decider was seen
        self._input_change = None
        self._tracking = False

    def sub(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., ::8, ::8]

    def new_evaluation(self):
        self._eval_skip = None
        self._input_change = None
        self._tracking = False

    def decide(self, x, passes):
        c = self.c
        if not c.in_window:
            return set()
        if self._eval_skip is not None:  # decided by an earlier forward of this evaluation
            return set(passes) if self._eval_skip else set()
        if self.decider is None:
            self.decider = "uncond" if "uncond" in passes else passes[0]
        if self.decider not in passes:
            return set()
        self._tracking = True
        if self.x_prev is not None:
            self._input_change = (self.sub(x) - self.x_prev).flatten().abs().mean()
        if self.norm_prev is not None and self.k is not None:
            self.cum = self.cum + (self.k * self._input_change) / self.norm_prev
            if self.cum < c.config.threshold and not c.capped(passes):
                self._eval_skip = True
                return set(passes)
            self.cum = 0.0
        self._eval_skip = False
        return set()

    def record(self, x, passes, computed):
        if not self._tracking or self.decider not in computed:
            return
        out = computed[self.decider]
        if self.norm_prev is not None:
            out_change = (self.sub(out) - self.out_prev).flatten().abs().mean()
            if self._input_change is not None:
                self.k = out_change / self._input_change
        self.x_prev = self.sub(x).clone()
        self.out_prev = self.sub(out).clone()
        # the mean over the whole deciding forward (core: every entry of the batch it ran)
        outs = [computed[p] for p in passes if p in computed]
        self.norm_prev = (torch.cat(outs) if len(outs) > 1 else out).flatten().abs().mean()
        self._tracking = False


class _MagCache(_Policy):
    """Zehong-Ma/MagCache's criterion with its published Wan2.1 ratios."""

    def __init__(self, cache, calibration: str):
        super().__init__(cache)
        table = MAGCACHE_RATIOS[calibration]
        n = cache.steps
        per = [list(table[p::2]) for p in (0, 1)]  # cond, uncond
        if len(table) != 2 * n:
            per = [nearest_interp(v, n) for v in per]
        self.ratios = {"cond": per[0], "uncond": per[1]}
        self.retain = int(2 * n * cache.config.retention)  # calls counted as the authors do: 2*step + pass
        self.state = {}

    def decide(self, x, passes):
        c = self.c
        out = set()
        for p in passes:
            st = self.state.setdefault(p, {"ratio": 1.0, "steps": 0, "err": 0.0, "last": None})
            last, st["last"] = st["last"], c.step
            call = 2 * c.step + (1 if p == "uncond" else 0)
            if call < self.retain or not c.in_window or not c.has_residual(p):
                st.update(ratio=1.0, steps=0, err=0.0)
                continue
            first = c.step if last is None else last + 1  # steps this branch did not evaluate still count
            for s in range(first, c.step + 1):
                st["ratio"] *= self.ratios[p][s]
            st["steps"] += 1
            st["err"] += abs(1.0 - st["ratio"])
            k = c.config.max_skips
            if c.config.threshold > 0 and st["err"] < c.config.threshold and (k == 0 or st["steps"] <= k):
                out.add(p)
            else:
                st.update(ratio=1.0, steps=0, err=0.0)
        return out


class _TeaCache(_Policy):
    """ali-vilab/TeaCache's criterion with its published Wan2.1 coefficients."""

    def __init__(self, cache, calibration: str, denoiser):
        super().__init__(cache)
        self.kind = "e0" if cache.config.ret_steps else "e"
        self.coef = TEACACHE_COEFFICIENTS[(calibration, self.kind)]
        n = cache.steps
        # authors' call counter 2*step + pass: ret_steps 5*2 / 1*2 calls, cutoff 2n / 2n - 2 calls
        self.ret, self.cutoff = (10, 2 * n) if cache.config.ret_steps else (2, 2 * n - 2)
        self.signal = (lambda sigma: wan_time_signal(denoiser, sigma, self.kind)) if denoiser is not None else None
        self.state = {}
        self._sig = None

    def poly(self, v: float) -> float:
        out = 0.0
        for a in self.coef:  # Horner, highest power first (numpy.poly1d)
            out = out * v + a
        return out

    def new_evaluation(self):
        self._sig = None

    def decide(self, x, passes):
        c = self.c
        if self._sig is None:
            self._sig = self.signal(c.sigma)
        e = self._sig
        out = set()
        for p in passes:
            st = self.state.setdefault(p, {"acc": 0.0, "prev": None})
            call = 2 * c.step + (1 if p == "uncond" else 0)
            if call < self.ret or call >= self.cutoff or st["prev"] is None or not c.in_window \
                    or not c.has_residual(p):
                st["acc"] = 0.0
            else:
                rel = float((e - st["prev"]).abs().mean() / st["prev"].abs().mean())
                st["acc"] += self.poly(rel)
                if c.config.threshold > 0 and st["acc"] < c.config.threshold and not c.capped((p,)):
                    out.add(p)
                else:
                    st["acc"] = 0.0
            st["prev"] = e
        return out


# ---------------------------------------------------------------------------------------------------------
# BranchCache: the object a sampler consults
# ---------------------------------------------------------------------------------------------------------

class BranchCache:
    """One branch's cache for one run: the policy's state, the residuals per pass, and the counts.

    `sigmas` is the run's grid (steps + 1 values); `percent_to_sigma` maps the percent window (ComfyUI's
    `model_sampling.percent_to_sigma`, or `percent_to_sigma_flow(shift)`); `denoiser` is the branch's model
    (magcache/teacache read its shape and time embedding)."""

    def __init__(self, config: StepCacheConfig, branch: str, sigmas, percent_to_sigma: Callable[[float], float],
                 denoiser=None):
        self.config = config
        self.branch = branch
        self.sigmas = [float(s) for s in sigmas]
        self.steps = max(1, len(self.sigmas) - 1)
        self.step, self.sigma, self.in_window = 0, 0.0, False
        if config.window == "percent":
            # compared in float32, as ComfyUI compares its float32 sigma tensor with the Python bound
            self._start = 1.0e9 if config.start is None else _f32(percent_to_sigma(config.start))
            self._end = -1.0 if config.end is None else _f32(percent_to_sigma(config.end))
        self.residuals: dict = {}
        self.run_skips: dict = {}  # pass -> consecutive skips so far
        self.passes: dict = {}  # pass -> PassStats
        self.items_computed = 0
        self.items_saved = 0
        self.forwards_computed = 0
        self.forwards_saved = 0
        self.overhead = 0.0
        self.forward_seconds = 0.0  # hosts that time the forwards themselves (comfy_adapter) add them here
        self.calibration = None
        if config.policy == "easycache":
            self.policy: _Policy = _EasyCache(self)
        else:
            self.calibration = _resolve_calibration(config, denoiser, branch)
            self.policy = _MagCache(self, self.calibration) if config.policy == "magcache" else \
                _TeaCache(self, self.calibration, denoiser)
        self._step_passes: dict = {}
        self._device = cache_device(config.cache_device)
        self._device_checked = False

    # -- window / state queries used by the policies
    def _window(self, step: int, sigma: float) -> bool:
        c = self.config
        if c.window == "percent":
            return self._end < sigma <= self._start
        if c.window == "sigma":
            return (c.start is None or sigma <= c.start) and (c.end is None or sigma > c.end)
        last = self.steps - 1
        end = last if c.end is None or c.end < 0 else c.end
        return (c.start is None or step >= c.start) and step <= end

    def has_residual(self, p: str) -> bool:
        return p in self.residuals

    def capped(self, passes) -> bool:
        k = self.config.max_skips
        return k > 0 and any(self.run_skips.get(p, 0) >= k for p in passes)

    # -- the sampler's calls
    def begin(self, step: int, sigma: float) -> None:
        """Start a model evaluation at step `step` (0-based) and noise level `sigma`."""
        self.step, self.sigma = int(step), _f32(sigma)
        self.in_window = self._window(self.step, self.sigma)
        self._step_passes = {}
        nev = getattr(self.policy, "new_evaluation", None)
        if nev is not None:
            nev()

    def plan(self, x: torch.Tensor, passes) -> set:
        """The passes (of one forward group) to skip at this evaluation; the rest must be computed."""
        t0 = time.perf_counter()
        passes = tuple(passes)
        if self.config.threshold <= 0:
            skip = set()
        else:
            skip = {p for p in self.policy.decide(x, passes) if p in self.residuals}
        for p in passes:
            st = self.passes.setdefault(p, PassStats())
            st.evaluations += 1
            self._step_passes[p] = p in skip
            if p in skip:
                st.skipped += 1
                st.skipped_steps.append(self.step)
                self.run_skips[p] = self.run_skips.get(p, 0) + 1
            else:
                self.run_skips[p] = 0
        self.overhead += time.perf_counter() - t0
        return skip

    def complete(self, x: torch.Tensor, passes, computed: dict, *, items_per_pass: int = 0,
                 forwards_saved: int = 0) -> dict:
        """Record the computed outputs (velocity, float32) and return an output for every pass of the group."""
        t0 = time.perf_counter()
        passes = tuple(passes)
        self.policy.record(x, passes, computed)
        out = {}
        for p in passes:
            if p in computed:
                v = computed[p]
                r = v - x  # the pass's output-minus-input residual, reused on skipped evaluations
                if self._device is not None:
                    if not self._device_checked:
                        self._note_device(r.device)
                    r = r.to(self._device)
                self.residuals[p] = r
                out[p] = v
            else:
                out[p] = self._skip_output(x, p, passes)
        self.items_saved += items_per_pass * (len(passes) - len(computed))
        self.items_computed += items_per_pass * len(computed)
        self.forwards_saved += forwards_saved
        self.overhead += time.perf_counter() - t0
        return out

    def _note_device(self, compute: torch.device) -> None:
        """Say once when the offload target is the compute device itself (nothing is moved: no silent no-op)."""
        self._device_checked = True
        same = compute.type == self._device.type and (compute.index or 0) == (self._device.index or 0)
        if same:
            log_once(logger, ("step_cache_same_device", str(compute)), "step cache: cache_device %s is the device "
                     "the latent is on already; the cached outputs stay there (offloading saves memory only when "
                     "sampling on a GPU)", self.config.cache_device)

    def _skip_output(self, x: torch.Tensor, p: str, group: tuple) -> torch.Tensor:
        r = self.residuals[p].to(x.device)
        if self.config.match_core and self.sigma > 0:
            if len(group) > 1:  # core adds every batch entry's cached residual to the whole batch (see below)
                r = sum(self.residuals[q].to(x.device) for q in group)
            return _core_skip_output(x, r, self.sigma)
        return x + r

    def count_forwards(self, n: int) -> None:
        self.forwards_computed += n

    # -- the report
    def summary(self, forward_seconds: Optional[float] = None) -> dict:
        evals = {p: s.evaluations for p, s in self.passes.items()}
        steps_all = sorted({s for st in self.passes.values() for s in st.skipped_steps})
        skipped_steps = [s for s in steps_all if all(s in st.skipped_steps for st in self.passes.values())]
        n_eval = max(evals.values()) if evals else 0
        total = self.items_computed + self.items_saved
        est = total / self.items_computed if self.items_computed else 1.0
        d = {"policy": self.config.policy, "config": self.config.describe(), "calibration": self.calibration,
             "evaluations": n_eval, "computed": n_eval - len(skipped_steps), "skipped": len(skipped_steps),
             "skipped_steps": [s + 1 for s in skipped_steps],
             "passes": {p: {"evaluations": s.evaluations, "skipped": s.skipped} for p, s in self.passes.items()},
             "forwards_saved": self.forwards_saved, "latents_saved": self.items_saved,
             "estimated_speedup": round(est, 3), "overhead_seconds": round(self.overhead, 4)}
        if forward_seconds is not None and self.items_computed:
            per = forward_seconds / self.items_computed
            actual = forward_seconds + self.overhead
            d["measured_speedup"] = round((forward_seconds + per * self.items_saved) / actual, 3) if actual > 0 else 1.0
        return d


def cache_device(name: str) -> Optional[torch.device]:
    """The device the cached outputs live on: None for `compute` (beside the latent), CPU for `offload`, else the
    named device, refused with a clear error when this machine does not have it."""
    if name == "compute":
        return None
    dev = torch.device("cpu" if name == "offload" else name)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise ValueError(f"step cache device {name!r} is not available: this machine has {n} CUDA device(s); "
                             f"use compute, offload (CPU memory) or an existing cuda:N")
    elif dev.type != "cpu":
        ok = getattr(torch, dev.type, None)
        if ok is None or not getattr(ok, "is_available", lambda: False)():
            raise ValueError(f"step cache device {name!r} is not available on this machine; use compute, offload "
                             f"(CPU memory) or cpu")
    return dev


def _f32(v: float) -> float:
    return float(torch.tensor(float(v), dtype=torch.float32))


def _core_skip_output(x: torch.Tensor, r: torch.Tensor, sigma: float) -> torch.Tensor:
    """The velocity that gives core EasyCache's skipped-step prediction on a flow (CONST) model.

    In ComfyUI 0.3.64 the skip adds the cached residual to the diffusion model's input in place; for CONST models
    that input is the very tensor `apply_model` later uses as x in x0 = x - sigma*v, so a skipped step predicts
    x0 = (1 - sigma)(x + r) instead of x - sigma(x + r). As a velocity: v = (x - (1 - sigma)(x + r)) / sigma.
    With CFG's cond and uncond in one batch, core's `apply_cache_diff` adds each entry's residual to the whole
    batch (`x += diff` per uuid, broadcast), so every entry gets x + r_cond + r_uncond: the caller passes that sum."""
    return (x - (1.0 - sigma) * (x + r)) / sigma


def text_lines(caches: dict) -> list[str]:
    """Report lines, one per branch: policy, computed/skipped steps, forwards saved, speed-ups."""
    lines = []
    if all(d is None for d in caches.values()):
        return lines
    for name, d in caches.items():
        if d is None:
            lines.append(f"step cache {name}: off")
            continue
        steps = ",".join(str(s) for s in d["skipped_steps"]) or "none"
        meas = f", measured {d['measured_speedup']:.2f}x" if "measured_speedup" in d else ""
        lines.append(f"step cache {name}: {d['config']}: {d['computed']} of {d['evaluations']} steps computed, "
                     f"{d['skipped']} skipped (steps {steps}); {d['forwards_saved']} forwards / "
                     f"{d['latents_saved']} latents saved; speed-up estimated {d['estimated_speedup']:.2f}x{meas}; "
                     f"policy overhead {d['overhead_seconds']:.4f} s")
        partial = {p: s for p, s in d["passes"].items() if s["skipped"] and s["skipped"] != d["skipped"]}
        if partial:
            order = sorted(d["passes"], key=lambda p: (p != "cond", p != "uncond", p))  # cond, uncond, others
            lines.append("  per pass: " + ", ".join(f"{p} skipped {d['passes'][p]['skipped']}/"
                                                   f"{d['passes'][p]['evaluations']}" for p in order))
    return lines


def with_config(config: StepCacheConfig, **changes) -> StepCacheConfig:
    return replace(config, **changes)
