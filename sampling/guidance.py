"""One branch of a sampler: a denoiser, its conditioning and its classifier-free guidance.

CFG in velocity space, v = v_u + cfg * (v_c - v_u), is the same as ComfyUI's CFG on the x0 prediction
(x0 = x - sigma*v is affine in v). cfg == 1 runs the positive prompt only. With cfg != 1 the positive and
negative contexts go through the model as one batch of 2B when their shapes match ("auto"); a CUDA
out-of-memory error in that batch switches this branch to two separate forwards (logged once).
Several CONDITIONING entries are averaged, as ComfyUI does for conditionings without areas.
Image conditioning on an entry (`concat_latent_image`, `concat_mask`, `clip_vision_output`; from WanImageToVideo)
becomes that entry's model inputs as ComfyUI builds them (`image_cond.model_cond`), once per run; a LATENT
noise mask adds the per-frame timestep of Wan2.2 TI2V (`prepare(..., denoise_mask=)`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.handles import Denoiser
from ..core.log import log_once
from .image_cond import ModelCond, frame_timesteps, frame_weights, image_channels, model_cond, repeat_to_batch_size
from .step_cache import BranchCache

logger = logging.getLogger(__name__)


def _contexts(cond, branch: str, which: str, text_dim: int, batch: int) -> list[tuple]:
    """(context [B, L, D], extras dict) per entry of a CONDITIONING list, checked against the model's text width."""
    if not isinstance(cond, (list, tuple)) or not cond:
        raise TypeError(f"{branch} branch {which}: expected a CONDITIONING (a list of [tensor, dict] pairs), "
                        f"got {type(cond).__name__}")
    out = []
    for k, entry in enumerate(cond):
        t = entry[0] if isinstance(entry, (list, tuple)) else None
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise TypeError(f"{branch} branch {which}[{k}]: expected a context tensor [B, L, D], got "
                            f"{getattr(t, 'shape', type(t).__name__)}")
        if t.shape[-1] != text_dim:
            raise ValueError(f"{branch} branch {which}: the text encoder gives width {t.shape[-1]} but the model "
                             f"expects {text_dim}; connect the matching text encoder for this model (dual-branch sampler: "
                             f"positive_detail / negative_detail feed the detail branch its own prompt)")
        if t.shape[0] not in (1, batch):
            raise ValueError(f"{branch} branch {which}: conditioning batch {t.shape[0]} does not match the latent "
                             f"batch {batch}; use a batch-1 prompt or one per latent")
        extras = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        out.append((t, extras))
    return out


def _to_batch(t: torch.Tensor, b: int) -> torch.Tensor:
    return repeat_to_batch_size(t, b)


def _cat_conds(pair, b: int) -> ModelCond:
    """One ModelCond for the batch [cond rows; uncond rows] (each entry brought to batch b first)."""
    def rows(t, expand_ctx=False):
        if t is None:
            return None
        if expand_ctx:
            return t.expand(b, -1, -1)
        return _to_batch(t, b)

    p, n = pair
    ctx = torch.cat([rows(p.context, True), rows(n.context, True)]) if p.context is not None else None
    concat = torch.cat([rows(p.concat), rows(n.concat)]) if p.concat is not None else None
    clip = torch.cat([rows(p.clip_fea), rows(n.clip_fea)]) if p.clip_fea is not None else None
    return ModelCond(ctx, concat, clip)


@dataclass
class BranchStats:
    forwards: int = 0  # module calls
    items: int = 0  # latents pushed through the module (a batched CFG call counts 2B)
    seconds: float = 0.0


@dataclass
class Branch:
    """A denoiser with its prompts and guidance scale; `velocity(x, sigma)` applies CFG."""

    denoiser: Denoiser
    positive: Optional[list] = None
    negative: Optional[list] = None
    cfg: float = 1.0
    name: str = "semantic"
    batch_cfg: str = "auto"  # "auto" | "never"
    stats: BranchStats = field(default_factory=BranchStats)
    cache: Optional[BranchCache] = None  # this run's step cache (sampling/step_cache.py), set by the sampler

    def __post_init__(self):
        if not isinstance(self.denoiser, Denoiser):
            raise TypeError(f"{self.name} branch: expected a TWINFLOW_MODEL (core.handles.Denoiser), got "
                            f"{type(self.denoiser).__name__}")
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"{self.name} branch: cfg must be a finite number >= 0, got {self.cfg}")
        if self.batch_cfg not in ("auto", "never"):
            raise ValueError(f"batch_cfg must be 'auto' or 'never', got {self.batch_cfg!r}")

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.info.get("latent_channels", self.denoiser.in_channels))

    def prepare(self, batch: int, latent_shape=None, denoise_mask: Optional[torch.Tensor] = None) -> None:
        """Resolve contexts once per run (checked against the model and the latent batch). With `latent_shape`
        the image conditioning of each entry is built for that latent (ComfyUI's process_conds); `denoise_mask`
        is the LATENT's noise mask prepared to the latent's shape (`image_cond.prepare_denoise_mask`)."""
        d = self.denoiser
        self.stats = BranchStats()
        self._guided = not math.isclose(self.cfg, 1.0)
        self._frame_weights = None
        if denoise_mask is not None and d.family == "comfy":
            raise ValueError(f"{self.name} branch: the latent carries a noise_mask and the model is a core MODEL run "
                             f"through ComfyUI's apply_model, which the TwinFlow samplers cannot hand the mask to "
                             f"(Wan2.2 TI2V's per-frame timestep); sample it with core KSampler, or load the model "
                             f"with TwinFlow Load DiT")
        if denoise_mask is not None and frame_timesteps(d):
            self._frame_weights = frame_weights(denoise_mask.to(d.device))  # (B, T)
        if d.text_dim is None:
            self._pos, self._neg = [ModelCond(None)], [ModelCond(None)]
            if self._guided:
                log_once(logger, ("cfg_no_text", d.name, self.name), "%s branch (%s) ignores text: cfg %.3g has "
                         "no effect, running one forward per step", self.name, d.name or d.family, self.cfg)
            self._guided = False
            self._check_image_inputs(latent_shape)
            return
        if self.positive is None:
            raise ValueError(f"{self.name} branch: the model {d.name or d.family!r} needs text; connect a positive "
                             f"conditioning")
        self._pos = self._model_conds(self.positive, "positive", batch, latent_shape, denoise_mask)
        self._neg = None
        if self._guided:
            if self.negative is None:
                raise ValueError(f"{self.name} branch: cfg {self.cfg:g} needs a negative conditioning; connect one "
                                 f"or set cfg to 1")
            self._neg = self._model_conds(self.negative, "negative", batch, latent_shape, denoise_mask)
        self._batched = self.batch_cfg == "auto"

    def _model_conds(self, cond, which: str, batch: int, latent_shape, denoise_mask) -> list[ModelCond]:
        d = self.denoiser
        entries = _contexts(cond, self.name, which, d.text_dim, batch)
        if latent_shape is None:  # a caller that only evaluates text-to-video models (gate fitting, reports)
            self._check_image_inputs(None)
            return [ModelCond(t) for t, _ in entries]
        where = f"{self.name} branch {which}"
        return [model_cond(d, t, extras, tuple(latent_shape), denoise_mask, d.device, where) for t, extras in entries]

    def _check_image_inputs(self, latent_shape) -> None:
        """A model that needs image inputs gets them through conditioning entries; without any, say so."""
        d = self.denoiser
        if image_channels(d) > 0:
            what = "has no conditioning" if d.text_dim is None else "was given no latent shape"
            raise ValueError(f"{self.name} branch: the model {d.name or d.family!r} is an image-to-video model "
                             f"({d.in_channels} input channels) but {what}; connect WanImageToVideo's conditioning")

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: ModelCond) -> torch.Tensor:
        d = self.denoiser
        b = x.shape[0]
        ctx = cond.context
        if ctx is not None:
            ctx = ctx.to(device=d.device, dtype=d.dtype)
            if ctx.shape[0] != b:
                ctx = ctx.expand(b, -1, -1)
        concat, clip_fea, fw = cond.concat, cond.clip_fea, self._frame_weights
        if concat is not None and concat.shape[0] != b:
            concat = concat.repeat(b // concat.shape[0], 1, 1, 1, 1)  # a CFG batch: the entry's rows, repeated
        if clip_fea is not None and clip_fea.shape[0] != b:
            clip_fea = _to_batch(clip_fea, b)
        if fw is not None and fw.shape[0] != b:
            fw = fw.repeat(b // fw.shape[0], 1)
        self.stats.forwards += 1
        self.stats.items += b
        v = d.velocity(x.to(device=d.device, dtype=d.dtype), sigma.to(d.device), ctx, concat=concat,
                       clip_fea=clip_fea, frame_weights=fw)
        return v.to(device=x.device, dtype=torch.float32)

    def _mean(self, x, sigma, conds) -> torch.Tensor:
        out = self._forward(x, sigma, conds[0])
        for c in conds[1:]:
            out = out + self._forward(x, sigma, c)
        return out / len(conds) if len(conds) > 1 else out

    def _batch_pair(self):
        """(pos, neg) entries batchable as one 2B forward, or None (then two forwards, logged once)."""
        if len(self._pos) != 1 or len(self._neg) != 1:
            return None
        pc, nc = self._pos[0], self._neg[0]
        if pc.batch_key() != nc.batch_key():
            return None  # different image inputs: ComfyUI runs them apart as well
        pair = self._context_pair(pc.context, nc.context)
        if pair is None:
            return None
        return ModelCond(pair[0], pc.concat, pc.clip_fea), ModelCond(pair[1], nc.concat, nc.clip_fea)

    def _context_pair(self, p, n):
        """(pos, neg) contexts of one shape, or None."""
        if p.shape[0] != n.shape[0]:
            p, n = p.expand(max(p.shape[0], n.shape[0]), -1, -1), n.expand(max(p.shape[0], n.shape[0]), -1, -1)
        if p.shape == n.shape:
            return p, n
        if self.denoiser.family == "wan_dit":
            # Wan zero-pads every prompt to text_len (512) itself, so padding the shorter one with zeros to the
            # longer length changes nothing and lets cond+uncond share one forward.
            L = max(p.shape[1], n.shape[1])
            pad = lambda c: torch.cat([c, c.new_zeros(c.shape[0], L - c.shape[1], c.shape[2])], 1)
            return pad(p), pad(n)
        log_once(logger, ("cfg_lengths", self.name), "%s branch: positive and negative prompts have different "
                 "lengths (%d, %d) and the model does not pad text; running them as two forwards", self.name,
                 p.shape[1], n.shape[1])
        return None

    def _forward_count(self) -> int:
        """Forwards one uncached evaluation makes (a batched CFG pair is one)."""
        if not self._guided:
            return len(self._pos)
        if self._batched and self._batch_pair() is not None:
            return 1
        return len(self._pos) + len(self._neg)

    def _passes(self, x: torch.Tensor, s: torch.Tensor, need: tuple) -> dict:
        """Velocities of the passes in `need` ("cond", "uncond"): one batched forward for both when possible."""
        if need == ("cond", "uncond"):
            pair = self._batch_pair() if self._batched else None
            if pair is not None:
                b = x.shape[0]
                try:
                    both = self._forward(torch.cat([x, x]), torch.cat([s, s]), _cat_conds(pair, b))
                    return {"cond": both[:b], "uncond": both[b:]}
                except torch.cuda.OutOfMemoryError:
                    self._batched = False
                    log_once(logger, ("cfg_unbatched", self.name), "%s branch: out of memory with cond+uncond "
                             "batched; running them as two forwards from now on", self.name, level=logging.WARNING)
        return {p: self._mean(x, s, self._pos if p == "cond" else self._neg) for p in need}

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, sigma: float, step: Optional[int] = None) -> torch.Tensor:
        """CFG-guided velocity at `sigma` for latent x [B, C, T, H, W] (float32 out).

        With a step cache attached (`self.cache`, set by the sampler) and `step` given, the cache decides per
        pass whether to skip the forward; a skipped pass costs no forward."""
        t0 = time.perf_counter()
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        passes = ("cond", "uncond") if self._guided else ("cond",)
        cache = self.cache if step is not None else None
        if cache is None:
            outs = self._passes(x, s, passes)
        else:
            cache.begin(step, float(sigma))
            n_uncached = self._forward_count()
            before = self.stats.forwards
            batched = self._guided and self._batched and self._batch_pair() is not None
            groups = [passes] if (batched or not self._guided) else [("uncond",), ("cond",)]
            outs = {}
            for g in groups:
                skip = cache.plan(x, g)
                need = tuple(p for p in g if p not in skip)
                computed = self._passes(x, s, need) if need else {}
                outs.update(cache.complete(x, g, computed, items_per_pass=x.shape[0]))
            made = self.stats.forwards - before
            cache.count_forwards(made)
            cache.forwards_saved += max(0, n_uncached - made)
        combine = getattr(self.denoiser.module, "combine_guidance", None)
        if combine is not None:
            # the model's host owns the CFG combination (inside ComfyUI: the core MODEL's sampler_cfg_function and
            # post-CFG patches, comfy_adapter/models.py); `uncond` is None when cfg is 1 and no negative ran
            v = combine(x, s, outs["cond"], outs.get("uncond"), self.cfg, self.positive,
                        self.negative if self._guided else None)
        elif self._guided:
            v = outs["uncond"] + self.cfg * (outs["cond"] - outs["uncond"])
        else:
            v = outs["cond"]
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # honest per-branch times
        self.stats.seconds += time.perf_counter() - t0
        return v
