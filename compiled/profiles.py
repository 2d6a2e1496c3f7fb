"""Compile profiles from what a workflow knows: widget ranges, latent shapes, the shapes a plan saw.

Shape math only (no graph walking, no nodes): the compile nodes and the runner's compile plan
(`runner/plan.py`) both build their profiles here, so a plan shows exactly what a node would build.
Sizes: widgets are in pixels and video frames (1+4k), profiles in latent units (÷8, (frames-1)/4+1).
"""
from __future__ import annotations

from .export import Profile, Range

DEFAULT_TEXT = Range(1, 64, 512)  # real umT5 tokens; unknown until the text encoder runs
ONE = Range(1, 1, 1)
KINDS = ("dit", "vae")


def _latent_frames(frames: int) -> int:
    return (int(frames) - 1) // 4 + 1


def custom_profile(kind: str, widgets: dict) -> Profile:
    """The profile of a compile node's `custom` ranges: `{min,opt,max}_{batch,frames,height,width}` widgets.

    The DiT patchifies by 2, so its latent height/width round down to even; the VAE decode step sees one
    latent frame and no text. Raises ValueError naming the axis when min <= opt <= max does not hold."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")

    def r(name, div=1):
        lo, opt, hi = (int(widgets[f"{k}_{name}"]) for k in ("min", "opt", "max"))
        if not lo <= opt <= hi:
            raise ValueError(f"custom profile {name}: need min <= opt <= max, got {lo}, {opt}, {hi}")
        return Range(max(1, lo // div), max(1, opt // div), max(1, hi // div))

    frames = Range(*(_latent_frames(widgets[f"{k}_frames"]) for k in ("min", "opt", "max")))
    h, w = r("height", 8), r("width", 8)
    if kind == "dit":
        h = Range(*(max(2, v - v % 2) for v in (h.min, h.opt, h.max)))
        w = Range(*(max(2, v - v % 2) for v in (w.min, w.opt, w.max)))
    return Profile(batch=r("batch"), frames=frames if kind == "dit" else ONE, height=h, width=w,
                   text=DEFAULT_TEXT if kind == "dit" else ONE)


def latent_profile(kind: str, shape: tuple) -> Profile:
    """The profile for one latent `(B, C, T, h, w)`: the DiT covers B..2B (CFG runs cond+uncond as one
    batch), the VAE decode exactly B; every other axis is static."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    b, _, t, h, w = (int(s) for s in shape)
    if kind == "dit":
        return Profile(batch=Range(b, b, 2 * b), frames=Range(t, t, t), height=Range(h, h, h),
                       width=Range(w, w, w), text=DEFAULT_TEXT)
    return Profile(batch=Range(b, b, b), frames=ONE, height=Range(h, h, h), width=Range(w, w, w), text=ONE)


def shapes_profile(shapes: list, kind: str) -> Profile:
    """The profile covering every latent shape a sub-graph sees (opt = the first, i.e. the main call).

    kind "denoiser" keeps the frames axis and the text range; "vae_decode" has one frame and no text."""
    bs, ts, hs, ws = zip(*[(s[0], s[2], s[3], s[4]) for s in shapes])

    def r(vals):
        return Range(min(vals), vals[0], max(vals))

    if kind == "denoiser":
        return Profile(batch=r(bs), frames=r(ts), height=r(hs), width=r(ws), text=DEFAULT_TEXT)
    return Profile(batch=r(bs), frames=ONE, height=r(hs), width=r(ws), text=ONE)


def profile_widgets(profile: Profile) -> dict:
    """The compile node's `custom` widgets (pixels, video frames) for a profile: `custom_profile`'s inverse."""
    out = {}
    for k in ("min", "opt", "max"):
        b, f, h, w = (getattr(getattr(profile, a), k) for a in ("batch", "frames", "height", "width"))
        out.update({f"{k}_batch": b, f"{k}_frames": 1 + 4 * (f - 1), f"{k}_height": h * 8, f"{k}_width": w * 8})
    return out


def meta_module(kind: str, preset: str):
    """A random preset's module on the meta device (its layout, for cache keys and estimates; no memory)."""
    import torch

    with torch.device("meta"):
        if kind == "dit":
            from ..models.wan_dit import WanDiT, get_config
            return WanDiT(get_config(preset))
        from ..models import wan22_vae
        from ..models.wan_vae import PRESETS, WanVAE
        if preset in wan22_vae.RANDOM_NAMES:
            return wan22_vae.Wan22VAE(wan22_vae.PRESETS[wan22_vae.RANDOM_NAMES[preset]])
        return WanVAE(PRESETS[preset])


def estimates(module, kind: str, backend: str, profile: Profile) -> dict:
    """Rough build time (s) and peak memory (bytes): order-of-magnitude guidance, not measurements.

    kind "denoiser" or "vae"; empty for eager or an unknown module."""
    if module is None or backend == "eager":
        return {}
    n_params = sum(p.numel() for p in module.parameters())
    layers = getattr(getattr(module, "config", None), "num_layers", 8)
    dynamic = sum(not getattr(profile, a).static for a in ("batch", "frames", "height", "width"))
    per = {"inductor": (20.0, 1.5), "tensorrt": (60.0, 8.0)}.get(backend, (0.0, 0.0))
    build_s = per[0] + per[1] * layers * (1 + 0.25 * dynamic)
    weight_bytes = 2 * n_params if backend == "tensorrt" else 4 * n_params
    if kind == "denoiser":
        tokens = profile.batch.max * profile.frames.max * (profile.height.max // 2) * (profile.width.max // 2)
        dim = getattr(module.config, "dim", 1024)
        act = tokens * dim * 4 * 8
    else:
        act = profile.batch.max * profile.height.max * profile.width.max * 64 * 96 * 4 * 8
    return {"build_s": round(build_s), "memory_bytes": int(weight_bytes * (2 if backend == "tensorrt" else 1) + act)}


def cache_state(module, kind: str, profile: Profile, backend: str, cache=None) -> str:
    """"hit" when every artifact a compile of `module` (kind "dit" | "vae") with this profile and backend
    needs is in the cache, else "miss"."""
    from .cache import ArtifactCache
    from .runtime import artifact_key

    c = cache or ArtifactCache()
    parts = ["dit"] if kind == "dit" else ["vae-decode-first", "vae-decode-rest"]
    fam = "wan_dit" if kind == "dit" else "wan_vae"
    keys = [artifact_key(module, fam, profile, backend, None, None, p)[0] for p in parts]
    return "hit" if all(c.contains(k) for k in keys) else "miss"

