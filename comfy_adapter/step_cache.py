"""TwinFlow's step cache on core MODELs, through ComfyUI's wrapper mechanism (as core's EasyCache node does).

`with_step_cache(model, config)` is the TwinFlow Step Cache node's one call:
  * a TWINFLOW_MODEL gets the config in `info["step_cache"]`; the TwinFlow samplers build one
    `sampling.step_cache.BranchCache` per branch from it;
  * a core MODEL is cloned, the config stored in `model_options["transformer_options"]` and three wrappers
    added: OUTER_SAMPLE (a fresh BranchCache per sampling run, the report logged at its end), CALC_COND_BATCH
    (a new model evaluation) and DIFFUSION_MODEL (the skip decision per forward, with the passes taken from
    `cond_or_uncond`). So core KSampler / SamplerCustomAdvanced, and TwinFlow's Dual-Branch Guider (each of its
    two models with its own cache), skip steps with the same policies; the TwinFlow Sampler given such a MODEL
    reads the config and caches at its own loop instead (the wrapper passes through when no run is active).

ComfyUI is imported only when a core MODEL is patched or sampled.
"""
from __future__ import annotations

import logging
import time

import torch

from ..core.handles import Denoiser
from ..sampling.step_cache import BranchCache, StepCacheConfig, text_lines
from .models import is_model_patcher

logger = logging.getLogger(__name__)

KEY = "twinflow_step_cache"  # the StepCacheConfig, in a patcher's transformer_options
RUN_KEY = "twinflow_step_cache_run"  # the BranchCache of the sampling run in progress


def with_step_cache(model, config: StepCacheConfig):
    """A copy of `model` (TWINFLOW_MODEL or core MODEL) that samples with `config`; `model` is not changed."""
    if not isinstance(config, StepCacheConfig):
        raise TypeError(f"expected a StepCacheConfig, got {type(config).__name__}")
    if isinstance(model, Denoiser):
        new = model.clone()
        new.info["step_cache"] = config
        return new
    if is_model_patcher(model):
        return patch_core_model(model, config)
    raise TypeError(f"TwinFlow Step Cache: expected a TWINFLOW_MODEL or a core MODEL, got {type(model).__name__}")


def patch_core_model(patcher, config: StepCacheConfig):
    """Clone a core ModelPatcher and add the step cache wrappers (also usable by hosts that run core samplers)."""
    import comfy.patcher_extension as pe

    m = patcher.clone()
    m.model_options.setdefault("transformer_options", {})[KEY] = config
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, _calc_cond_batch_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, _diffusion_model_wrapper)
    return m


def config_of(patcher):
    """The StepCacheConfig a core MODEL carries, or None."""
    return getattr(patcher, "model_options", {}).get("transformer_options", {}).get(KEY)


def start_run(transformer_options: dict, sigmas, model_sampling, diffusion_model, name: str):
    """Put a fresh BranchCache for this run into `transformer_options` (when it carries a config)."""
    config = transformer_options.get(KEY)
    if config is None:
        return None
    state = BranchCache(config, name, [float(s) for s in sigmas.reshape(-1)], model_sampling.percent_to_sigma,
                        diffusion_model)
    transformer_options[RUN_KEY] = state
    logger.info("TwinFlow step cache on %s: %s", name, config.describe())
    return state


def finish_run(state) -> dict:
    """Log the run's report line and return the summary."""
    if state is None:
        return {}
    d = state.summary(state.forward_seconds or None)
    for line in text_lines({state.branch: d}):
        logger.info("%s", line)
    return d


def _outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    orig = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    state = None
    try:
        to = guider.model_options.setdefault("transformer_options", {})
        dm = getattr(guider.model_patcher.model, "diffusion_model", None)
        name = getattr(guider, "twinflow_branch_name", "model")
        state = start_run(to, args[3], guider.model_patcher.get_model_object("model_sampling"), dm, name)
        return executor(*args, **kwargs)
    finally:
        finish_run(state)
        guider.model_options = orig


def _calc_cond_batch_wrapper(executor, *args, **kwargs):
    model_options = args[-1]
    state = model_options.get("transformer_options", {}).get(RUN_KEY)
    if state is not None:
        from .guider import step_index

        timestep = args[3] if len(args) > 4 else args[-2]
        sigma = float(timestep.reshape(-1)[0])
        state.begin(step_index(state.sigmas, sigma), sigma)
    return executor(*args, **kwargs)


def _diffusion_model_wrapper(executor, *args, **kwargs):
    x = args[0]
    to = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
    state = to.get(RUN_KEY) if isinstance(to, dict) else None
    if state is None or "cond_or_uncond" not in to:
        return executor(*args, **kwargs)
    chunks = list(to["cond_or_uncond"])
    passes = tuple("uncond" if c == 1 else "cond" for c in chunks)
    if len(set(passes)) != len(passes):  # several entries of one prompt in one batch: no per-pass residual
        return executor(*args, **kwargs)
    xs = dict(zip(passes, x.float().chunk(len(passes))))
    x_ref = xs[passes[0]]
    skip = state.plan(x_ref, passes)
    computed = {}
    if len(skip) < len(passes):  # a batch runs whole: passes the policy skips take the cached output anyway
        t0 = time.perf_counter()
        out = executor(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # honest forward time for the measured speed-up
        state.forward_seconds += time.perf_counter() - t0
        computed = {p: o.float() for p, o in zip(passes, out.chunk(len(passes))) if p not in skip}
        state.count_forwards(1)
    else:
        state.forwards_saved += 1
    outs = state.complete(x_ref, passes, computed, items_per_pass=x_ref.shape[0])
    return torch.cat([outs[p] for p in passes]).to(x.dtype)
