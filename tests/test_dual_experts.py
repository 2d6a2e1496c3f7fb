"""Wan2.2 A14B's two experts as a dual-branch preset (`sampling/experts.py`, `TwinFlowDualExpertSampler`).

Oracles: ComfyUI's two-KSamplerAdvanced template built headless with TwinFlow's core nodes (the high-noise model
up to step k with leftover noise, the low-noise model from k without new noise), and Wan2.2's own expert rule
(`t >= boundary * 1000` -> high-noise model, t from its FlowUniPCMultistepScheduler grid) re-derived here.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from twinflow.core.handles import Denoiser
from twinflow.sampling.dual import sample
from twinflow.sampling.experts import PRESETS, resolve
from twinflow.sampling.gates import GateSchedule
from twinflow.sampling.guidance import Branch

SHAPE = (1, 16, 2, 8, 8)


def _core(name):
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="module")
def experts():
    """Two tiny random Wan DiTs with different weights (high = seed 10, low = seed 11) and a prompt pair."""
    from twinflow.models import text, wan_dit

    hi = wan_dit.make_denoiser(wan_dit.random_wan_dit("tiny", seed=10), "high tiny", "random:tiny")
    lo = wan_dit.make_denoiser(wan_dit.random_wan_dit("tiny", seed=11), "low tiny", "random:tiny")
    pos = text.conditioning(text.tiny_text_encode("a red fox in the snow", width=hi.text_dim))
    neg = text.conditioning(text.tiny_text_encode("blurry", width=hi.text_dim))
    return hi, lo, pos, neg


def _simple_grid(shift, steps, sampler):
    """ComfyUI's `simple` sigmas on ModelSamplingDiscreteFlow's float32 table; UniPC drops the penultimate."""
    n = steps + 1 if sampler.startswith("uni_pc") else steps
    s = torch.arange(1, 1001, 1) / 1000
    table = shift * s / (1 + (shift - 1) * s)
    sig = [float(table[-(1 + int(x * len(table) / n))]) for x in range(n)] + [0.0]
    return sig[:-2] + sig[-1:] if n != steps else sig


def _boundary_at(shift, steps, sampler, k):
    """A boundary between the high model's sigma_{k-1} and sigma_k: the switch lands on step k (0-based)."""
    sig = _simple_grid(shift, steps, sampler)
    return 0.5 * (sig[k - 1] + sig[k])


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *a, **kw):
        self.calls += 1
        return self.inner(*a, **kw)


def _counted(den: Denoiser) -> Denoiser:
    c = den.clone()
    c.module = Counting(den.module)
    return c


@pytest.mark.parametrize("sampler,handoff,shift_hi,shift_lo", [
    ("euler", "continue", 5.0, 5.0),  # euler is memoryless: one solver across the switch is the template too
    ("euler", "restart", 8.0, 3.0),  # each pass on its own model's grid (ModelSamplingSD3 per model)
    ("uni_pc", "restart", 5.0, 5.0),  # multistep: the template restarts the history at the switch
    ("dpmpp_2m", "restart", 12.0, 5.0),
])
def test_hard_boundary_equals_the_two_ksampler_advanced_template(experts, sampler, handoff, shift_hi, shift_lo):
    hi, lo, pos, neg = experts
    steps, k, seed, cfg_hi, cfg_lo = 6, 2, 7, 4.0, 3.0
    hi_m = _core("ModelSamplingSD3").patch(_counted(hi), shift_hi)[0]
    lo_m = _core("ModelSamplingSD3").patch(_counted(lo), shift_lo)[0]
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(16, 16, 5, 1)

    # ComfyUI's Wan2.2 template: KSamplerAdvanced (high) 0..k with leftover noise, then (low) k..end, no noise
    adv = _core("KSamplerAdvanced")
    (mid,) = adv.sample(hi_m, "enable", seed, steps, cfg_hi, sampler, "simple", pos, neg, lat, 0, k, "enable")
    (ref,) = adv.sample(lo_m, "disable", 0, steps, cfg_lo, sampler, "simple", pos, neg, mid, k, 10000, "disable")

    hi_m.module.calls = lo_m.module.calls = 0
    gate = GateSchedule("boundary", boundary=_boundary_at(shift_hi, steps, sampler, k))
    out, rep = sample(Branch(hi_m, pos, neg, cfg_hi, name="semantic"), lat, seed=seed, steps=steps, sampler=sampler,
                      scheduler="simple", shift=shift_hi, detail=Branch(lo_m, pos, neg, cfg_lo, name="detail"),
                      gate=gate, shift_detail=shift_lo, handoff=handoff)
    # each expert runs only on its side of the boundary: one (CFG-batched) forward per step, none wasted
    assert hi_m.module.calls == k and lo_m.module.calls == steps - k
    assert rep.branches["semantic"]["forwards"] == k and rep.branches["detail"]["forwards"] == steps - k
    assert [r for _, _, r in rep.alphas] == ["S"] * k + ["D"] * (steps - k)
    if handoff == "restart":
        # bit-exact: 'restart' runs two solvers and hands the latent over as ComfyUI's passes do, op for op
        # (x / (1 - sigma_k), de-normalise; normalise, * (1 - sigma_k') on the second model's grid)
        assert torch.equal(out["samples"], ref["samples"])
    else:
        # 'continue' (one solver, Wan2.2's loop) hands x over untouched; the template rounds it through that
        # float32 de-/re-normalisation, so the two agree to rounding only (9.1e-7 here)
        err = float((out["samples"] - ref["samples"]).abs().max() / ref["samples"].abs().max())
        assert err <= 1e-6, err


def test_uni_pc_continue_keeps_one_history_across_the_switch(experts):
    # Wan2.2's own loop (handoff 'continue') is not the template's restarted solver: the results differ
    hi, lo, pos, neg = experts
    lat = {"samples": torch.zeros(SHAPE)}
    gate = GateSchedule("boundary", boundary=_boundary_at(5.0, 6, "uni_pc", 3))
    args = dict(seed=1, steps=6, sampler="uni_pc", scheduler="simple", shift=5.0, gate=gate)
    a, ra = sample(Branch(hi, pos, neg, 4.0), lat, detail=Branch(lo, pos, neg, 3.0, name="detail"), **args)
    b, rb = sample(Branch(hi, pos, neg, 4.0), lat, detail=Branch(lo, pos, neg, 3.0, name="detail"),
                   handoff="restart", **args)
    assert [r for _, _, r in ra.alphas] == [r for _, _, r in rb.alphas] == ["S"] * 3 + ["D"] * 3
    assert not torch.allclose(a["samples"], b["samples"], atol=1e-4)
    assert "handoff restart at step 4" in rb.gate and "handoff" not in ra.gate


def test_per_branch_shift_needs_a_hard_switch_and_restart(experts):
    hi, lo, pos, neg = experts
    lat = {"samples": torch.zeros(SHAPE)}
    s, d = Branch(hi, pos, neg, 4.0), Branch(lo, pos, neg, 3.0, name="detail")
    with pytest.raises(ValueError, match="set handoff to 'restart'"):
        sample(s, lat, seed=1, steps=4, detail=d, gate=GateSchedule("boundary", boundary=0.9), shift=5.0,
               shift_detail=3.0)
    with pytest.raises(ValueError, match="need a hard boundary gate"):
        sample(s, lat, seed=1, steps=4, detail=d, gate=GateSchedule("boundary", boundary=0.9, width=0.1), shift=5.0,
               shift_detail=3.0, handoff="restart")


# ----------------------------------------------------------------------- the boundary -> step rule of Wan2.2


def _wan22_high_noise_steps(steps, shift, boundary):
    """Wan2.2 generate(): FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift), int64 timesteps,
    `t >= boundary * num_train_timesteps` selects the high-noise model (written out from wan/utils/fm_solvers_unipc.py
    and wan/text2video.py)."""
    n_train = 1000
    alphas = np.linspace(1, 1 / n_train, n_train)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)  # shift 1 at construction
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sig = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    timesteps = torch.from_numpy(sig * n_train).to(torch.int64)
    return [int(t) >= boundary * n_train for t in timesteps]


class ZeroVelocity(nn.Module):
    def forward(self, x, t, context):
        return torch.zeros_like(x)


@pytest.mark.parametrize("preset", ["wan22_t2v_a14b", "wan22_i2v_a14b"])
@pytest.mark.parametrize("steps,shift", [(40, None), (20, None), (30, 8.0), (10, 3.0), (50, 5.0), (7, 12.0)])
def test_boundary_step_follows_wan22_rule(preset, steps, shift):
    p = PRESETS[preset]
    shift = p.shift_high if shift is None else shift
    want = _wan22_high_noise_steps(steps, shift, p.boundary)
    assert any(want) and not all(want)  # the cases really switch somewhere
    den = lambda: Denoiser(module=ZeroVelocity(), family="dit", in_channels=4, info={"latent_format": "none"})
    for handoff in ("continue", "restart"):
        _, rep = sample(Branch(den()), {"samples": torch.zeros(1, 4, 1, 2, 2)}, seed=0, steps=steps, sampler="uni_pc",
                        scheduler="wan_unipc", shift=shift, detail=Branch(den(), name="detail"),
                        gate=GateSchedule("boundary", boundary=p.boundary), handoff=handoff)
        assert [r == "S" for _, _, r in rep.alphas] == want, (handoff, rep.alphas)


# ------------------------------------------------------------------------------- preset values and the node


def test_presets_are_wan22_published_values():
    # Wan-Video/Wan2.2 wan/configs: t2v boundary 0.875, shift 12, guide (3.0 low, 4.0 high); i2v 0.900, 5, (3.5, 3.5)
    t, i = PRESETS["wan22_t2v_a14b"], PRESETS["wan22_i2v_a14b"]
    assert (t.boundary, t.steps, t.shift_high, t.shift_low, t.cfg_high, t.cfg_low) == (0.875, 40, 12.0, 12.0, 4.0, 3.0)
    assert (i.boundary, i.steps, i.shift_high, i.shift_low, i.cfg_high, i.cfg_low) == (0.9, 40, 5.0, 5.0, 3.5, 3.5)
    s = resolve("wan22_t2v_a14b", cfg_low=2.5, width=0.05)
    assert (s.cfg_low, s.cfg_high, s.width, s.steps) == (2.5, 4.0, 0.05, 40)
    text = s.describe()
    assert "cfg high 4 / low 2.5 (set)" in text and "blend width 0.05 (set)" in text and "boundary 0.875," in text
    with pytest.raises(ValueError, match="unknown expert preset"):
        resolve("wan22_ti2v_5b")


def test_soft_blend_runs_both_experts_only_inside_the_band():
    g = GateSchedule("boundary", boundary=0.875, width=0.1)
    assert g(0, 0.95, 10) == (1.0, 0.0) and g(0, 0.80, 10) == (0.0, 0.0)
    assert math.isclose(g(0, 0.875, 10)[0], 0.5) and math.isclose(g(0, 0.9, 10)[0], 0.75)
    den = lambda: Denoiser(module=ZeroVelocity(), family="dit", in_channels=4, info={"latent_format": "none"})
    s, d = Branch(den()), Branch(den(), name="detail")
    _, rep = sample(s, {"samples": torch.zeros(1, 4, 1, 2, 2)}, seed=0, steps=20, sampler="euler",
                    scheduler="simple", shift=5.0, detail=d, gate=g)
    both = [i for i, (_, _, r) in enumerate(rep.alphas) if r == "S+D"]
    inside = [i for i in range(20) if abs(rep.sigmas[i] - 0.875) < 0.05]
    assert both == inside and both  # both experts run inside boundary +- width/2, one expert elsewhere
    assert rep.branches["semantic"]["forwards"] == sum(r != "D" for _, _, r in rep.alphas)
    assert rep.branches["detail"]["forwards"] == sum(r != "S" for _, _, r in rep.alphas)


def test_node_uses_preset_defaults_and_overrides(experts):
    from twinflow.nodes.sampling import NODE_CLASS_MAPPINGS as N

    hi, lo, pos, neg = experts
    node = N["TwinFlowDualExpertSampler"]()
    lat = {"samples": torch.zeros(SHAPE)}
    # steps 6 set; everything else from the preset (uni_pc / wan_unipc, shift 12, cfg 4 / 3, boundary 0.875)
    out, report = node.run(hi, lo, lat, "wan22_t2v_a14b", 3, 6, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, "preset", "preset",
                           "preset", 1.0, positive=pos, negative=neg)
    p = PRESETS["wan22_t2v_a14b"]
    ref, rep = sample(Branch(hi, pos, neg, p.cfg_high), lat, seed=3, steps=6, sampler="uni_pc",
                      scheduler="wan_unipc", shift=12.0, detail=Branch(lo, pos, neg, p.cfg_low, name="detail"),
                      gate=GateSchedule("boundary", boundary=0.875))
    assert torch.equal(out["samples"], ref["samples"])
    assert "preset wan22_t2v_a14b" in report and "steps 6 (set)" in report and "cfg high 4 / low 3," in report
    assert "semantic = high-noise expert" in report
    k = sum(r == "S" for _, _, r in rep.alphas)
    assert f"semantic (high tiny): {k} forwards" in report and f"detail (low tiny): {6 - k} forwards" in report
    # overrides: per-expert cfg, shifts (needs restart), boundary, sampler/scheduler
    out2, report2 = node.run(hi, lo, lat, "wan22_t2v_a14b", 3, 6, 5.0, 2.0, 8.0, 3.0, 0.95, 0.0, "euler", "simple",
                             "restart", 1.0, positive=pos, negative=neg)
    ref2, _ = sample(Branch(hi, pos, neg, 5.0), lat, seed=3, steps=6, sampler="euler", scheduler="simple", shift=8.0,
                     detail=Branch(lo, pos, neg, 2.0, name="detail"), gate=GateSchedule("boundary", boundary=0.95),
                     shift_detail=3.0, handoff="restart")
    assert torch.equal(out2["samples"], ref2["samples"])
    assert "boundary 0.95 (set)" in report2 and "shift high 8 (set) / low 3 (set)" in report2


@pytest.mark.parametrize("boundary,ran", [(0.9, "D"), (0.001, "S")])
def test_restart_with_the_switch_outside_the_schedule_runs_one_expert(boundary, ran):
    # denoise 0.5 starts at sigma ~0.83 (shift 5): a boundary of 0.9 is above it (only the low-noise expert runs),
    # one of 0.001 below every sigma (only the high-noise expert)
    den = lambda: Denoiser(module=ZeroVelocity(), family="dit", in_channels=4, info={"latent_format": "none"})
    s, d = Branch(den()), Branch(den(), name="detail")
    _, rep = sample(s, {"samples": torch.zeros(1, 4, 1, 2, 2)}, seed=0, steps=5, sampler="euler", scheduler="simple",
                    shift=5.0, denoise=0.5, detail=d, gate=GateSchedule("boundary", boundary=boundary),
                    shift_detail=3.0, handoff="restart")
    assert [r for _, _, r in rep.alphas] == [ran] * 5
    assert rep.branches["semantic" if ran == "S" else "detail"]["forwards"] == 5
    assert rep.branches["detail" if ran == "S" else "semantic"]["forwards"] == 0
    assert "only the " + ("semantic" if ran == "S" else "detail") + " branch has steps" in rep.gate
    # the run starts on the grid of the expert that runs: sigma 0.5 shifted by 5 (high) or 3 (low)
    shift = 5.0 if ran == "S" else 3.0
    assert rep.sigmas[0] == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5), abs=2e-3)


def test_bad_blend_width_and_handoff_are_refused():
    with pytest.raises(ValueError, match="boundary width must be in"):
        GateSchedule("boundary", boundary=0.9, width=1.5)
    with pytest.raises(ValueError, match="handoff must be one of"):
        resolve("wan22_i2v_a14b", handoff="swap")
    with pytest.raises(ValueError, match="expert boundary must be in"):
        resolve("wan22_i2v_a14b", boundary=1.0)
