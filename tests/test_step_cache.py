"""Step caching (sampling/step_cache.py): off means uncached to the bit, the published criteria, per-branch state.

Oracles: the uncached sampler (threshold 0 / an empty window), ComfyUI core's EasyCache criterion written out
again below as a plain Euler loop, and closed-form skip patterns for MagCache / TeaCache on synthetic ratio and
embedding sequences (the criteria depend only on those, never on the model's output).
"""
import math

import numpy as np
import pytest
import torch

from twinflow.core.errors import UnsupportedError
from twinflow.sampling import step_cache as sc
from twinflow.sampling.dual import sample
from twinflow.sampling.gates import GateSchedule
from twinflow.sampling.guidance import Branch
from twinflow.sampling.schedules import sampler_sigmas

from test_dual_branch import PosteriorMean, TextVelocity, denoiser, latent, points

STEPS = 20


def cached(module, config, **kw):
    d = denoiser(module, **kw)
    if config is not None:
        d.info["step_cache"] = config
    return d


def run1(d, steps=STEPS, sampler="euler", **kw):
    return sample(Branch(d, name="semantic", **kw.pop("branch", {})), latent(), seed=5, steps=steps,
                  sampler=sampler, scheduler="simple", shift=3.0, **kw)


def tiny_wan():
    from twinflow.models.wan_dit import random_wan_dit
    from twinflow.models.wan_dit import make_denoiser

    return make_denoiser(random_wan_dit("tiny", seed=0), "tiny", "test")


# ------------------------------------------------------------------------------------------------ off = uncached
@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "dpmpp_2m"])
@pytest.mark.parametrize("config", [
    sc.make_config("easycache", 0.0),
    sc.make_config("magcache", 0.0, calibration="wan2.1-1.3b"),
    sc.make_config("easycache", 5.0, start=1.0, end=1.0),  # percent window holding no sigma
    sc.make_config("easycache", 5.0, window="step", start=STEPS, end=None),  # step window past the last step
    sc.make_config("magcache", 5.0, window="sigma", start=-1.0, calibration="wan2.1-14b"),
], ids=["easy-thr0", "mag-thr0", "easy-empty-percent", "easy-empty-steps", "mag-empty-sigma"])
def test_off_is_bit_identical_with_no_extra_forward(sampler, config):
    ref_m, m = PosteriorMean(points(1)), PosteriorMean(points(1))
    ref, _ = run1(denoiser(ref_m), sampler=sampler)
    out, rep = run1(cached(m, config), sampler=sampler)
    assert torch.equal(out["samples"], ref["samples"])
    assert m.calls == ref_m.calls == STEPS
    assert rep.cache["semantic"]["skipped"] == 0 and rep.cache["semantic"]["forwards_saved"] == 0


def test_teacache_threshold_zero_is_bit_identical_on_a_wan_dit():
    d_ref, d = tiny_wan(), tiny_wan()
    d.info["step_cache"] = sc.make_config("teacache", 0.0, calibration="wan2.1-1.3b")
    lat = {"samples": torch.zeros(1, 16, 2, 4, 4)}
    ctx = [[torch.randn(1, 7, d.text_dim, generator=torch.Generator().manual_seed(0)), {}]]
    a, _ = sample(Branch(d_ref, ctx), lat, seed=1, steps=6, sampler="euler", scheduler="simple", shift=8.0)
    b, rep = sample(Branch(d, ctx), lat, seed=1, steps=6, sampler="euler", scheduler="simple", shift=8.0)
    assert torch.equal(a["samples"], b["samples"]) and rep.branches["semantic"]["forwards"] == 6


def test_cfg_threshold_zero_keeps_the_batched_forward():
    ctx_p = [[torch.full((1, 3, 4), 0.5), {}]]
    ctx_n = [[torch.full((1, 3, 4), -0.5), {}]]
    ref_m, m = TextVelocity(), TextVelocity()
    kw = {"branch": {"positive": ctx_p, "negative": ctx_n, "cfg": 4.0}}
    ref, _ = run1(denoiser(ref_m, text_dim=4), **dict(kw))
    out, _ = run1(cached(m, sc.make_config("easycache", 0.0), text_dim=4), **dict(kw))
    assert torch.equal(out["samples"], ref["samples"]) and m.batches == ref_m.batches == [2] * STEPS


# ----------------------------------------------------------------------------------- easycache = core's formula
def easycache_reference(model, x, sigmas, thr, start_t, end_t):
    """ComfyUI core EasyCache (nodes_easycache.py) on one pass, written out: returns (x, skipped steps)."""
    k = cum = x_prev = o_prev = norm = None
    cum, skipped, diff = 0.0, [], None
    sub = lambda t: t[..., ::8, ::8]
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        v = None
        if s > end_t:
            tracking = s <= start_t
            dx = None
            if tracking and x_prev is not None:
                dx = (sub(x) - x_prev).abs().mean()
            if tracking and norm is not None and k is not None:
                cum = cum + k * dx / norm
                if cum < thr:
                    v = x + diff
                    skipped.append(i)
                else:
                    cum = 0.0
            if v is None:
                v = model(x, s)
                if tracking and norm is not None:
                    dv = (sub(v) - o_prev).abs().mean()
                    if dx is not None:
                        k = dv / dx
                diff = v - x
                if tracking:
                    x_prev, o_prev, norm = sub(x).clone(), sub(v).clone(), v.abs().mean()
        else:
            v = model(x, s)
        x = x + v * (float(sigmas[i + 1]) - s)  # Euler on the flow ODE
    return x, skipped


@pytest.mark.parametrize("thr", [0.05, 0.2, 0.6])
def test_easycache_follows_core_criterion(thr):
    m = PosteriorMean(points(3))
    shift = 3.0
    sigmas = sampler_sigmas("simple", STEPS, shift, "euler", 1.0)
    noise = torch.randn(1, 4, 2, 6, 5, generator=torch.Generator().manual_seed(9))
    to_sigma = lambda p: shift * (1 - p) / (1 + (shift - 1) * (1 - p))
    start_t, end_t = (float(torch.tensor(to_sigma(p), dtype=torch.float32)) for p in (0.15, 0.95))
    vel = lambda x, s: m(x, torch.full((1,), s * 1000.0), None)
    ref_x, ref_skips = easycache_reference(vel, noise * float(sigmas[0]), sigmas, thr, start_t, end_t)
    m.calls = 0
    out, rep = sample(Branch(cached(m, sc.make_config("easycache", thr))), latent(), seed=5, steps=STEPS,
                      sampler="euler", scheduler="simple", shift=shift, noise=noise)
    assert rep.cache["semantic"]["skipped_steps"] == [i + 1 for i in ref_skips]
    assert m.calls == STEPS - len(ref_skips)
    torch.testing.assert_close(out["samples"], ref_x, rtol=1e-5, atol=1e-6)
    if thr == 0.6:
        assert ref_skips  # the case must exercise skipping


def test_easycache_decides_on_the_uncond_pass_and_caps_consecutive_skips():
    ctx_p, ctx_n = [[torch.full((1, 3, 4), 0.5), {}]], [[torch.full((1, 3, 4), -0.5), {}]]
    m = TextVelocity(a=0.01)
    kw = {"branch": {"positive": ctx_p, "negative": ctx_n, "cfg": 3.0}}
    _, rep = run1(cached(m, sc.make_config("easycache", 3.0, max_skips=2), text_dim=4), **kw)
    c = rep.cache["semantic"]
    assert c["passes"]["cond"]["skipped"] == c["passes"]["uncond"]["skipped"] == c["skipped"] > 0
    steps = c["skipped_steps"]
    assert all(not (s in steps and s + 1 in steps and s + 2 in steps) for s in steps)  # never 3 in a row
    assert c["forwards_saved"] == c["skipped"] and m.batches.count(2) == STEPS - c["skipped"]


# ------------------------------------------------------------------------------ magcache / teacache criteria
def drive(cache, steps, passes=("cond", "uncond"), only=None):
    """Run a BranchCache over `steps` evaluations with dummy tensors; returns {pass: skipped steps}."""
    x = torch.zeros(1, 2, 1, 4, 4)
    for i in range(steps):
        if only is not None and i not in only:
            continue
        cache.begin(i, 1.0 - i / steps)
        skip = cache.plan(x, passes)
        cache.complete(x, passes, {p: x + i for p in passes if p not in skip}, items_per_pass=1)
    return {p: [s for s in cache.passes[p].skipped_steps] for p in passes}


def test_magcache_closed_form_on_constant_ratios(monkeypatch):
    """ratio r everywhere: j candidate skips in a row cost sum_{m<=j} |1 - r^m|; r = 0.99, thr 0.05 allows 2."""
    steps, r = 50, 0.99
    monkeypatch.setitem(sc.MAGCACHE_RATIOS, "wan2.1-1.3b", (1.0,) * 2 + (r,) * (2 * steps - 2))
    cost = lambda j: sum(abs(1 - r ** m) for m in range(1, j + 1))
    run_len = max(j for j in range(10) if cost(j) < 0.05)
    assert run_len == 2
    for k, expect_run in ((0, run_len), (1, 1), (2, 2)):
        cache = sc.BranchCache(sc.make_config("magcache", 0.05, max_skips=k, calibration="wan2.1-1.3b"), "s",
                               [0.0] * (steps + 1), lambda p: p)
        got = drive(cache, steps)
        retain = int(2 * steps * 0.2) // 2  # calls 2i+p < 20 -> steps 0..9 always computed
        expect, i = [], retain
        while i < steps:  # from the first eligible step: expect_run skips, one compute, ...
            expect += list(range(i, min(i + expect_run, steps)))
            i += expect_run + 1
        assert got["cond"] == got["uncond"] == expect, (k, got["cond"][:8], expect[:8])


def test_magcache_published_table_first_decisions():
    """With the published 1.3B table at 50 steps: steps 0-9 are retained (computed); step 10 compares
    |1 - r(10)| with the threshold, r(10) for cond being the published 0.99511 (index 20 = 2*10 + 0)."""
    assert sc.MAGCACHE_RATIOS["wan2.1-1.3b"][20] == 0.99511 and len(sc.MAGCACHE_RATIOS["wan2.1-14b"]) == 100
    r10 = sc.MAGCACHE_RATIOS["wan2.1-1.3b"][20]
    for thr, skip in ((abs(1 - r10) * 1.01, True), (abs(1 - r10) * 0.99, False)):
        cache = sc.BranchCache(sc.make_config("magcache", thr, calibration="wan2.1-1.3b"), "s", [0.0] * 51,
                               lambda p: p)
        got = drive(cache, 11, passes=("cond",))
        assert got["cond"] == ([10] if skip else [])


def test_magcache_interpolates_per_pass_like_the_authors():
    got = sc.nearest_interp(list(range(50)), 20)
    idx = np.round(np.arange(20) * (49 / 19)).astype(int)  # numpy, as the authors' nearest_interp
    assert got == idx.tolist()


def test_teacache_closed_form_on_a_geometric_embedding(monkeypatch):
    """e_i = (1+rho)^i: rel_l1 = rho every step, acc grows by poly(rho); skips in a row = ceil(thr/poly) - 1."""
    steps, rho = 20, 0.02
    coef = sc.TEACACHE_COEFFICIENTS[("wan2.1-1.3b", "e")]
    inc = float(np.polyval(coef, rho))
    assert inc > 0
    thr = 3.5 * inc
    run_len = math.ceil(thr / inc) - 1  # acc = j*inc < thr for j <= 3
    cache = sc.BranchCache(sc.make_config("teacache", thr, calibration="wan2.1-1.3b"), "s", [0.0] * (steps + 1),
                           lambda p: p)
    base = torch.ones(8)
    monkeypatch.setattr(cache.policy, "signal", lambda sigma: base * (1 + rho) ** round((1 - sigma) * steps))
    got = drive(cache, steps)
    expect, i = [], 1  # step 0 computed (ret_steps: 1 step), the last always (cutoff); skips start at step 1
    while i < steps - 1:
        expect += [s for s in range(i, i + run_len) if s < steps - 1]
        i += run_len + 1
    assert got["cond"] == got["uncond"] == expect


def test_teacache_reads_the_wan_time_embedding():
    d = tiny_wan()
    e = sc.wan_time_signal(d, 0.5, "e")
    e0 = sc.wan_time_signal(d, 0.5, "e0")
    m = d.module
    from twinflow.models.wan_dit import sinusoidal_embedding

    ref = m.time_embedding(sinusoidal_embedding(torch.tensor([500.0]), m.config.freq_dim))
    torch.testing.assert_close(e, ref)
    torch.testing.assert_close(e0, m.time_projection(ref))


def test_calibration_auto_refuses_an_uncalibrated_model():
    with pytest.raises(UnsupportedError, match="published only for Wan2.1"):
        sc.BranchCache(sc.make_config("magcache"), "semantic", [1.0, 0.0], lambda p: p, tiny_wan())
    with pytest.raises(UnsupportedError, match="easycache"):
        sc.BranchCache(sc.make_config("teacache", calibration="wan2.1-1.3b"), "s", [1.0, 0.5, 0.0], lambda p: p,
                       denoiser(PosteriorMean(points(1)))).policy.signal(0.5)


# ------------------------------------------------------------------------------------------------ dual branch
def test_dual_branch_decides_and_counts_per_branch():
    S, D = PosteriorMean(points(1)), PosteriorMean(points(2))
    gate = GateSchedule("constant", alpha=0.5, cutoff=0.0)
    sem = cached(S, sc.make_config("easycache", 0.0), name="S")
    det = cached(D, sc.make_config("easycache", 0.6, start=0.0), name="D")
    _, rep = sample(Branch(sem, name="semantic"), latent(), detail=Branch(det, name="detail"), gate=gate, seed=5,
                    steps=STEPS, sampler="euler", scheduler="simple", shift=3.0)
    cs, cd = rep.cache["semantic"], rep.cache["detail"]
    assert cs["skipped"] == 0 and S.calls == STEPS
    assert cd["skipped"] > 0 and D.calls == STEPS - cd["skipped"]  # a skipped detail step: no detail forward
    assert rep.branches["detail"]["forwards"] == D.calls
    assert "step cache detail:" in rep.text() and "step cache semantic:" in rep.text()


def test_dual_branch_history_is_per_branch():
    """The detail branch's decisions with a semantic branch beside it equal its decisions alone at alpha 0."""
    cfg = sc.make_config("easycache", 0.6, start=0.0)
    D1, D2 = PosteriorMean(points(2)), PosteriorMean(points(2))
    S = PosteriorMean(points(1))
    gate0 = GateSchedule("constant", alpha=0.0, cutoff=0.0)
    _, rep_dual = sample(Branch(cached(S, cfg)), latent(), detail=Branch(cached(D1, cfg), name="detail"),
                         gate=gate0, seed=5, steps=STEPS, sampler="euler", scheduler="simple", shift=3.0)
    _, rep_one = run1(cached(D2, cfg))
    assert S.calls == 0
    assert rep_dual.cache["detail"]["skipped_steps"] == rep_one.cache["semantic"]["skipped_steps"]


# ------------------------------------------------------------------------------------ config, override, node
def test_parse_spec_and_errors():
    c = sc.parse_spec("magcache:0.1,max_skips=3,device=offload,start=0.2,window=step")
    assert (c.policy, c.threshold, c.max_skips, c.cache_device, c.start, c.window) == \
        ("magcache", 0.1, 3, "offload", 0.2, "step")
    assert sc.parse_spec("easycache:0.2") == sc.make_config("easycache", 0.2)
    assert sc.parse_spec("none") is None
    for bad, msg in (("lazy:0.2", "unknown policy"), ("easycache:x", "not a number"),
                     ("easycache:0.2,foo=1", "KEY=VALUE"), ("easycache:-1", ">= 0"),
                     ("easycache:0.2,start=2", "percent")):
        with pytest.raises(ValueError, match=msg):
            sc.parse_spec(bad)


def test_run_override_replaces_and_disables():
    m = PosteriorMean(points(1))
    d = cached(m, sc.make_config("easycache", 0.6, start=0.0))
    with sc.run_override(sc.OFF):
        _, rep = run1(d)
    assert m.calls == STEPS and not rep.cache["semantic"]
    m.calls = 0
    with sc.run_override(sc.make_config("easycache", 0.6, start=0.0)):
        _, rep = run1(denoiser(m))
    assert rep.cache["semantic"]["skipped"] > 0 and m.calls < STEPS


def test_offload_keeps_residuals_on_cpu_and_gives_the_same_result():
    a, b = PosteriorMean(points(1)), PosteriorMean(points(1))
    ra, _ = run1(cached(a, sc.make_config("easycache", 0.6)))
    rb, _ = run1(cached(b, sc.make_config("easycache", 0.6, cache_device="offload")))
    assert torch.equal(ra["samples"], rb["samples"])


def test_core_compatible_skip_output_formula():
    x, r, s = torch.randn(3), torch.randn(3), 0.4
    v = sc._core_skip_output(x, r, s)
    torch.testing.assert_close(x - s * v, (1 - s) * (x + r))


def test_core_compatible_cfg_batch_adds_both_residuals():
    """ComfyUI 0.3.64 EasyCache.apply_cache_diff on a batched cond+uncond (B = 1): `x += diff[uuid]` for each uuid on
    the whole batch, then (flow model) x0 = x_mod - sigma * x_mod. Written out here on two entries."""
    cache = sc.BranchCache(sc.make_config("easycache", 0.2, match_core=True), "s", [1.0, 0.4, 0.0], lambda p: p)
    x = torch.randn(1, 2, 1, 2, 2)
    r = {"cond": torch.randn_like(x), "uncond": torch.randn_like(x)}
    cache.residuals.update(r)
    cache.begin(1, 0.4)
    out = cache.complete(x, ("uncond", "cond"), {}, items_per_pass=1)
    batch = torch.cat([x, x])
    for uuid in ("uncond", "cond"):  # core's loop, broadcasting each [1, ...] diff over the batch of 2
        batch += r[uuid]
    x0_core = batch - 0.4 * batch
    for i, p in enumerate(("uncond", "cond")):
        torch.testing.assert_close(x - 0.4 * out[p], x0_core[i:i + 1])


def test_node_clones_and_attaches():
    from twinflow.nodes.sampling import TwinFlowStepCache

    d = denoiser(PosteriorMean(points(1)))
    (out,) = TwinFlowStepCache().apply(d, "magcache", 0.1, 0.0, -1.0, "step", -1, "offload", "wan2.1-14b")
    assert "step_cache" not in d.info and out.module is d.module
    c = out.info["step_cache"]
    assert (c.policy, c.max_skips, c.end, c.window, c.cache_device) == ("magcache", 2, None, "step", "offload")
    with pytest.raises(TypeError, match="TWINFLOW_MODEL"):
        TwinFlowStepCache().apply(object(), "easycache", 0.2, 0.15, 0.95, "percent", -1, "compute", "auto")


# ------------------------------------------------------------------------------------------ windows, cap, device
def flow_sigma(p, shift):
    """ComfyUI ModelSamplingDiscreteFlow.percent_to_sigma written out (t = 1 - p, then the flow shift)."""
    t = 1.0 - p
    return shift * t / (1 + (shift - 1) * t)


def always_skip_magcache(monkeypatch, **kw):
    """MagCache with every ratio 1 (error 0: skips wherever the window and a cached output allow), no retention."""
    monkeypatch.setitem(sc.MAGCACHE_RATIOS, "wan2.1-1.3b", (1.0,) * (2 * STEPS))
    return sc.make_config("magcache", 0.5, calibration="wan2.1-1.3b", retention=0.0, **{"max_skips": 0, **kw})


def test_windows_in_steps_sigma_and_percent_select_the_skipped_steps(monkeypatch):
    sig = [float(s) for s in sampler_sigmas("simple", STEPS, 3.0, "euler", 1.0)]
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))
    cases = [
        (dict(window="step", start=5, end=9), list(range(5, 10))),  # inclusive, 0-based
        (dict(window="step", start=17, end=None), [17, 18, 19]),  # open end = last step
        (dict(window="sigma", start=sig[4], end=sig[12]), list(range(4, 12))),  # end < sigma <= start
        (dict(window="percent", start=0.3, end=0.6),
         [i for i in range(STEPS) if f32(flow_sigma(0.6, 3.0)) < f32(sig[i]) <= f32(flow_sigma(0.3, 3.0))]),
    ]
    for kw, expect in cases:
        cfg = always_skip_magcache(monkeypatch, **kw)
        cache = sc.BranchCache(cfg, "s", sig, sc.percent_to_sigma_flow(3.0))
        x = torch.zeros(1, 2, 1, 4, 4)
        for i in range(STEPS):
            cache.begin(i, sig[i])
            skip = cache.plan(x, ("cond",))
            cache.complete(x, ("cond",), {} if skip else {"cond": x + i}, items_per_pass=1)
        assert expect and cache.passes["cond"].skipped_steps == expect, (kw, cache.passes["cond"].skipped_steps)


def test_step_window_in_the_sampler_costs_exactly_the_computed_forwards():
    """easycache, threshold far above any change, window steps 5..9: core's rule tracks only inside the window, so
    steps 5 and 6 compute (first output, then the rate k) and 7, 8, 9 reuse; every other step computes."""
    m = PosteriorMean(points(1))
    out, rep = run1(cached(m, sc.make_config("easycache", 100.0, window="step", start=5, end=9)))
    c = rep.cache["semantic"]
    assert c["skipped_steps"] == [8, 9, 10] and m.calls == STEPS - 3 == c["computed"]
    assert rep.branches["semantic"]["forwards"] == m.calls and c["forwards_saved"] == 3


def test_teacache_caps_consecutive_skips(monkeypatch):
    """The geometric embedding of the closed-form test, a threshold allowing 3 in a row, cap 1: skip, compute, ..."""
    steps, rho = 20, 0.02
    inc = float(np.polyval(sc.TEACACHE_COEFFICIENTS[("wan2.1-1.3b", "e")], rho))
    cache = sc.BranchCache(sc.make_config("teacache", 3.5 * inc, calibration="wan2.1-1.3b", max_skips=1), "s",
                           [0.0] * (steps + 1), lambda p: p)
    base = torch.ones(8)
    monkeypatch.setattr(cache.policy, "signal", lambda sigma: base * (1 + rho) ** round((1 - sigma) * steps))
    got = drive(cache, steps)
    assert got["cond"] == got["uncond"] == list(range(1, steps - 1, 2))


@pytest.mark.parametrize("config", [
    sc.make_config("teacache", 0.0, calibration="wan2.1-1.3b"),
    sc.make_config("teacache", 5.0, calibration="wan2.1-1.3b", window="step", start=6),
    sc.make_config("teacache", 5.0, calibration="wan2.1-14b", ret_steps=True, window="sigma", end=2.0),
], ids=["thr0", "empty-steps", "empty-sigma"])
def test_teacache_off_is_bit_identical_on_a_wan_dit(config):
    d_ref, d = tiny_wan(), tiny_wan()
    d.info["step_cache"] = config
    lat = {"samples": torch.zeros(1, 16, 2, 4, 4)}
    ctx = [[torch.randn(1, 7, d.text_dim, generator=torch.Generator().manual_seed(0)), {}]]
    a, rep_a = sample(Branch(d_ref, ctx), lat, seed=1, steps=6, sampler="euler", scheduler="simple", shift=8.0)
    b, rep = sample(Branch(d, ctx), lat, seed=1, steps=6, sampler="euler", scheduler="simple", shift=8.0)
    assert torch.equal(a["samples"], b["samples"])
    assert rep.branches["semantic"]["forwards"] == rep_a.branches["semantic"]["forwards"] == 6
    assert rep.cache["semantic"]["skipped"] == 0


def test_cache_device_is_validated_honoured_and_refused_when_absent(caplog):
    from twinflow.core.log import forget_once

    with pytest.raises(ValueError, match="compute.*offload.*torch device"):
        sc.parse_spec("easycache:0.2,device=gpu0")
    missing = sc.parse_spec("easycache:0.2,device=cuda:99")  # a well-formed name: refused when a run starts
    with pytest.raises(ValueError, match="'cuda:99' is not available.*offload"):
        sc.BranchCache(missing, "semantic", [1.0, 0.5, 0.0], lambda p: p)
    forget_once("step_cache_same_device")
    for name in ("offload", "cpu"):
        cache = sc.BranchCache(sc.make_config("easycache", 0.2, cache_device=name), "s", [1.0, 0.5, 0.0],
                               lambda p: p)
        with caplog.at_level("INFO", logger="twinflow"):
            drive(cache, 2, passes=("cond",))
        assert cache.residuals["cond"].device == torch.device("cpu")
    # on a CPU-only run the offload target is where the latent already is: said once, not silently a no-op
    assert sum("is the device the latent is on already" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_moves_the_cached_outputs_off_the_gpu():
    m = PosteriorMean(points(1)).cuda()
    d = cached(m, sc.make_config("easycache", 0.6, cache_device="offload"))
    ref, _ = run1(cached(PosteriorMean(points(1)).cuda(), sc.make_config("easycache", 0.6)))
    seen = []
    orig = sc.BranchCache.complete

    def spy(self, x, passes, computed, **kw):
        out = orig(self, x, passes, computed, **kw)
        seen.extend((x.device.type, r.device.type) for r in self.residuals.values())
        return out

    sc.BranchCache.complete = spy
    try:
        out, rep = run1(d)
    finally:
        sc.BranchCache.complete = orig
    assert seen and all(s == ("cuda", "cpu") for s in seen) and rep.cache["semantic"]["skipped"] > 0
    torch.testing.assert_close(out["samples"], ref["samples"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- CFG passes (as the authors do)
@pytest.mark.parametrize("batch_cfg", ["auto", "never"])
def test_magcache_decides_cond_and_uncond_separately_and_skipped_passes_cost_no_forward(monkeypatch, batch_cfg):
    """cond ratios 1 (error 0: skip), uncond ratios 0.5 (error 0.5 > threshold: never). Retention 0.2 of 2*20
    calls keeps steps 0-3; then K = 2: cond skips two, computes one (4,5 skip, 6 computes, 7,8 skip, ...)."""
    monkeypatch.setitem(sc.MAGCACHE_RATIOS, "wan2.1-1.3b", (1.0, 0.5) * STEPS)
    cond_skips = [i for i in range(4, STEPS) if (i - 4) % 3 != 2]
    ctx_p, ctx_n = [[torch.full((1, 3, 4), 0.5), {}]], [[torch.full((1, 3, 4), -0.5), {}]]
    m = TextVelocity()
    cfg = sc.make_config("magcache", 0.12, calibration="wan2.1-1.3b")
    _, rep = run1(cached(m, cfg, text_dim=4), branch={"positive": ctx_p, "negative": ctx_n, "cfg": 3.0,
                                                      "batch_cfg": batch_cfg})
    c = rep.cache["semantic"]
    assert c["passes"]["uncond"]["skipped"] == 0 and c["passes"]["cond"]["skipped"] == len(cond_skips)
    assert c["skipped"] == 0  # a step is skipped only when all its passes are
    assert c["latents_saved"] == len(cond_skips)
    if batch_cfg == "auto":  # one batch of 2, or the uncond alone where cond is skipped
        assert m.batches == [1 if i in cond_skips else 2 for i in range(STEPS)] and c["forwards_saved"] == 0
    else:
        assert len(m.batches) == 2 * STEPS - len(cond_skips) and c["forwards_saved"] == len(cond_skips)
    assert "per pass: cond skipped 11/20, uncond skipped 0/20" in rep.text()


# ------------------------------------------------------------------------------------------------ the report
def test_report_lines_carry_the_counts_the_models_saw(caplog):
    import re

    m = PosteriorMean(points(1))
    cfg = sc.make_config("easycache", 100.0, window="step", start=5, end=9)
    with caplog.at_level("INFO", logger="twinflow"):
        _, rep = run1(cached(m, cfg))
    (line,) = [ln for ln in rep.text().splitlines() if ln.startswith("step cache semantic:")]
    assert line.startswith("step cache semantic: easycache 100, window 5..9 (step): ")
    got = re.search(r"(\d+) of (\d+) steps computed, (\d+) skipped \(steps ([\d,]+)\); (\d+) forwards / (\d+) latents "
                    r"saved; speed-up estimated ([\d.]+)x, measured ([\d.]+)x", line)
    assert got, line
    computed, total, skipped, steps, fwd, lat, est, meas = got.groups()
    assert (int(computed), int(total), int(skipped)) == (m.calls, STEPS, STEPS - m.calls)
    assert steps == "8,9,10" and int(fwd) == int(lat) == STEPS - m.calls
    assert float(est) == pytest.approx(STEPS / m.calls, abs=0.005)
    assert float(meas) > 0  # a timing (forward time per latent vs the policy's own cost): present, not asserted
    assert any(line in r.getMessage() for r in caplog.records)  # the log says what the STRING output says


# ------------------------------------------------------------------------------------------------ the CLI
def _cli_prompt(tmp_path):
    import json

    prompt = {
        "1": {"class_type": "TwinFlowEmptyLatentVideo", "inputs": {"width": 32, "height": 32, "length": 1,
                                                                   "batch_size": 1}},
        "2": {"class_type": "TwinFlowLoadDiT", "inputs": {"ckpt_name": "random:tiny", "dtype": "default",
                                                          "preset": "auto", "seed": 0}},
        "4": {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "a fox", "width": 4096, "pad_to": 0}},
        "7": {"class_type": "TwinFlowSampler", "inputs": {
            "model": ["2", 0], "latent": ["1", 0], "seed": 0, "steps": 8, "cfg": 1.0, "sampler": "euler",
            "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["4", 0]}},
        "8": {"class_type": "TwinFlowSaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "sc"}},
    }
    f = tmp_path / "wf.api.json"
    f.write_text(json.dumps(prompt))
    return f


def test_cli_step_cache_applies_to_the_sampler(tf_dirs, tmp_path, caplog, capsys):
    from twinflow.runner import cli

    f = _cli_prompt(tmp_path)
    with caplog.at_level("INFO", logger="twinflow"):
        code = cli.main(["-v", "run", str(f), "--no-progress", "--output-dir", str(tmp_path / "o"),
                         "--step-cache", "easycache:100,window=step,start=2,end=5"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    lines = [r.getMessage() for r in caplog.records if "step cache semantic:" in r.getMessage()]
    # tracking starts at step 2: 2 and 3 compute, 4 and 5 reuse (1-based 5,6)
    assert lines and "6 of 8 steps computed, 2 skipped (steps 5,6)" in lines[-1], lines


@pytest.mark.parametrize("spec, fragment", [
    ("nonsense:x", "unknown policy 'nonsense'"), ("easycache:-0.5", "threshold must be a finite number >= 0"),
    ("easycache:0.2,max_skips=two", "max_skips='two' is not a valid int"),
])
def test_cli_bad_step_cache_is_one_line_error(tf_dirs, tmp_path, capsys, spec, fragment):
    from twinflow.runner import cli

    code = cli.main(["run", str(_cli_prompt(tmp_path)), "--no-progress", "--step-cache", spec])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "usage:" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --step-cache: ") and fragment in line, line


def test_cli_step_cache_with_no_sampler_says_so(tf_dirs, tmp_path, caplog):
    import json

    from twinflow.runner import cli

    prompt = {"1": {"class_type": "TwinFlowEmptyLatentVideo", "inputs": {"width": 32, "height": 32, "length": 1,
                                                                         "batch_size": 1}},
              "8": {"class_type": "TwinFlowSaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "e"}}}
    f = tmp_path / "empty.api.json"
    f.write_text(json.dumps(prompt))
    with caplog.at_level("INFO", logger="twinflow"):
        code = cli.main(["run", str(f), "--no-progress", "--output-dir", str(tmp_path / "o"),
                         "--step-cache", "easycache:0.2"])
    assert code == 0
    assert any("no sampler ran" in r.getMessage() for r in caplog.records)


def test_a_step_or_sigma_window_does_not_inherit_the_percent_defaults():
    c = sc.parse_spec("easycache:0.2,window=step")
    assert (c.start, c.end) == (None, None)  # not 0.15..0.95 read as step indices (which would hold no step)
    assert sc.parse_spec("easycache:0.2").start == 0.15
