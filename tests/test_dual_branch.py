"""Dual-branch sampler: exact reductions to one branch, no wasted forwards, FFT split, CFG, refusals, nodes."""
import pytest
import torch
from torch import nn

from twinflow.core.errors import Interrupted
from twinflow.core.handles import Denoiser
from twinflow.core.progress import clear_interrupt, request_interrupt
from twinflow.sampling import fusion
from twinflow.sampling.dual import sample
from twinflow.sampling.gates import GateSchedule
from twinflow.sampling.guidance import Branch

SHAPE = (1, 4, 2, 6, 5)  # B, C, T, H, W (odd W on purpose: irfft sizes)


class PosteriorMean(nn.Module):
    """Closed-form velocity for data uniform over `points` under x = (1-s) x0 + s n; ignores text."""

    def __init__(self, points):
        super().__init__()
        self.register_buffer("points", points.reshape(points.shape[0], -1))
        self.calls = 0

    def forward(self, x, t, context):
        self.calls += 1
        s = (t / 1000.0).reshape(-1, 1)  # (B, 1)
        d2 = ((x.reshape(x.shape[0], 1, -1) - (1 - s)[:, :, None] * self.points[None]) ** 2).sum(-1)
        w = torch.softmax(-d2 / (2 * s * s), dim=1)
        x0 = (w @ self.points).reshape(x.shape)
        return (x - x0) / s.reshape(-1, 1, 1, 1, 1)


class TextVelocity(nn.Module):
    """v = a*x + mean of the context over tokens/width (per batch item): CFG is easy to compute by hand."""

    def __init__(self, a=0.3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.batches = []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        return self.a * x + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1) + 0.001 * t.reshape(-1, 1, 1, 1, 1)


def denoiser(module, channels=4, text_dim=None, name="m", fmt="none"):
    return Denoiser(module=module, family="dit", in_channels=channels, text_dim=text_dim, name=name,
                    info={"latent_format": fmt})


def points(seed, k=3):
    return torch.randn(k, *SHAPE[1:], generator=torch.Generator().manual_seed(seed)) * 1.5


def latent():
    return {"samples": torch.zeros(SHAPE)}


def run(sem, det=None, gate=None, **kw):
    args = dict(seed=5, steps=8, sampler="euler", scheduler="simple", shift=3.0)
    args.update(kw)
    return sample(Branch(sem, name="semantic"), latent(), detail=Branch(det, name="detail") if det else None,
                  gate=gate, **args)


@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "dpmpp_2m"])
def test_alpha_one_is_exactly_semantic_only(sampler):
    S, D = PosteriorMean(points(1)), PosteriorMean(points(2))
    single, _ = run(denoiser(S), sampler=sampler)
    S.calls = 0
    dual, rep = run(denoiser(S), denoiser(D), GateSchedule("constant", alpha=1.0, cutoff=0.3), sampler=sampler)
    assert torch.equal(single["samples"], dual["samples"])
    assert D.calls == 0 and rep.branches["detail"]["forwards"] == 0
    assert rep.branches["semantic"]["forwards"] == S.calls == 8


@pytest.mark.parametrize("sampler", ["euler", "uni_pc_bh2"])
def test_alpha_zero_no_cutoff_is_exactly_detail_only(sampler):
    S, D = PosteriorMean(points(1)), PosteriorMean(points(2))
    single, _ = run(denoiser(D), sampler=sampler)
    D.calls = 0
    dual, rep = run(denoiser(S), denoiser(D), GateSchedule("constant", alpha=0.0, cutoff=0.0), sampler=sampler)
    assert torch.equal(single["samples"], dual["samples"])
    assert S.calls == 0 and rep.branches["detail"]["forwards"] == 8


def test_steps_gate_runs_detail_only_at_listed_steps():
    S, D = PosteriorMean(points(1)), PosteriorMean(points(2))
    _, rep = run(denoiser(S), denoiser(D), GateSchedule("steps", alpha=0.5, fuse_steps=(3, 6, 9)), steps=10)
    assert S.calls == 10 and D.calls == 3
    assert [r for _, _, r in rep.alphas] == ["S+D" if i in (2, 5, 8) else "S" for i in range(10)]
    assert "detail" in rep.text() and "3 forwards" in rep.text()


def test_fused_prediction_feeds_the_solver():
    # with alpha = 0.5 and c = 0, one Euler step must move along the average of both velocities
    S, D = PosteriorMean(points(1)), PosteriorMean(points(2))
    out, _ = run(denoiser(S), denoiser(D), GateSchedule("constant", alpha=0.5), steps=1)
    noise = torch.randn(SHAPE, generator=torch.manual_seed(5))
    t = torch.full((1,), 1000.0)
    v = 0.5 * S(noise, t, None) + 0.5 * D(noise, t, None)
    assert torch.allclose(out["samples"], noise - v, atol=1e-5)  # sigma 1 -> 0


def test_euler_many_steps_lands_on_a_training_point():
    pts = points(3, k=4)
    out, _ = run(denoiser(PosteriorMean(pts)), steps=150)
    d = torch.cdist(out["samples"].reshape(1, -1), pts.reshape(4, -1))
    assert float(d.min()) < 0.05


def test_lp_plus_hp_is_identity():
    g = torch.Generator().manual_seed(0)
    for shape, over_time in [((2, 3, 5, 7, 9), False), ((1, 2, 3, 8, 6), True), ((1, 1, 1, 5, 5), False)]:
        x = torch.randn(shape, generator=g)
        for c in (0.05, 0.3, 0.9, 1.6):
            lo, hi = fusion.split(x, c, over_time=over_time)
            assert (lo + hi - x).abs().max() <= 1e-6
        assert lo.shape == x.shape


def test_fusion_keeps_semantic_low_band_and_blends_high_band():
    # DC (radius 0) is below any cutoff; the (H, W) checkerboard sits at radius sqrt(2), above cutoff 0.5
    H, W = 6, 8
    checker = ((torch.arange(H)[:, None] + torch.arange(W)[None]) % 2 * 2 - 1).float()
    v_s = 2.0 + 0.5 * checker.expand(1, 2, 3, H, W)
    v_d = -1.0 + 3.0 * checker.expand(1, 2, 3, H, W)
    a = 0.3
    got = fusion.fuse(v_s, v_d, a, cutoff=0.5)
    exp = 2.0 + (a * 0.5 + (1 - a) * 3.0) * checker
    assert torch.allclose(got, exp.expand_as(got), atol=1e-5)
    assert torch.equal(fusion.fuse(v_s, v_d, a, cutoff=0.0), a * v_s + (1 - a) * v_d)


@pytest.mark.parametrize("over_time", [False, True])
def test_fusion_matches_full_complex_fft(over_time):
    # independent: full complex FFT over the split dims, mask re-derived from the documented formula
    # (radius in units of Nyquist per axis, raised cosine of width 0.1 centred on the cutoff)
    g = torch.Generator().manual_seed(2)
    v_s, v_d = torch.randn(2, 3, 3, 5, 6, generator=g, dtype=torch.float64).unbind(0)
    v_s, v_d = v_s[None], v_d[None]
    dims = (-3, -2, -1) if over_time else (-2, -1)
    freqs = [torch.fft.fftfreq(v_s.shape[d], dtype=torch.float64) / 0.5 for d in dims]
    r = torch.sqrt(sum(f**2 for f in torch.meshgrid(*freqs, indexing="ij")))
    c, w, a = 0.45, 0.1, 0.25
    lp = torch.where(r <= c - w / 2, 1.0, torch.where(r >= c + w / 2, 0.0,
                                                       0.5 * (1 + torch.cos(torch.pi * (r - c + w / 2) / w))))
    spec = lambda x: torch.fft.fftn(x, dim=dims)
    exp = torch.fft.ifftn(lp * spec(v_s) + (1 - lp) * spec(a * v_s + (1 - a) * v_d), dim=dims).real
    got = fusion.fuse(v_s.float(), v_d.float(), a, c, width=w, over_time=over_time)
    assert torch.allclose(got.double(), exp, atol=1e-5)


def test_channel_mismatch_is_refused():
    S = denoiser(PosteriorMean(points(1)), channels=4)
    D = denoiser(PosteriorMean(points(2)), channels=16, name="wide")
    with pytest.raises(ValueError, match="do not share a latent space"):
        run(S, D, GateSchedule("constant", alpha=0.5))
    with pytest.raises(ValueError, match="latent has 4 channels"):
        sample(Branch(D), latent(), seed=0, steps=2)


def test_cfg_batched_equals_two_forwards_and_closed_form():
    ctx_p = torch.full((1, 3, 8), 0.5)
    ctx_n = torch.full((1, 3, 8), -0.25)
    pos, neg = [[ctx_p, {}]], [[ctx_n, {}]]
    outs = {}
    for mode in ("auto", "never"):
        m = TextVelocity()
        b = Branch(denoiser(m, text_dim=8), pos, neg, cfg=4.0, batch_cfg=mode)
        outs[mode], rep = sample(b, latent(), seed=1, steps=3, sampler="euler", scheduler="simple", shift=1.0)
        assert m.batches == ([2, 2, 2] if mode == "auto" else [1, 1, 1, 1, 1, 1])
    assert torch.allclose(outs["auto"]["samples"], outs["never"]["samples"], atol=1e-6)
    # v = a x + 0.001 t + (u + cfg (c - u)); one Euler step from sigma 1 to 0: x1 = noise - v
    b = Branch(denoiser(TextVelocity(), text_dim=8), pos, neg, cfg=4.0)
    one, _ = sample(b, latent(), seed=1, steps=1, sampler="euler", scheduler="simple", shift=1.0)
    noise = torch.randn(SHAPE, generator=torch.manual_seed(1))
    v = 0.3 * noise + 1.0 + (-0.25 + 4.0 * (0.5 + 0.25))
    assert torch.allclose(one["samples"], noise - v, atol=1e-5)


def test_cfg_needs_negative_and_matching_width():
    b = Branch(denoiser(TextVelocity(), text_dim=8), [[torch.zeros(1, 3, 8), {}]], None, cfg=3.0)
    with pytest.raises(ValueError, match="negative"):
        sample(b, latent(), seed=1, steps=2)
    b = Branch(denoiser(TextVelocity(), text_dim=8), [[torch.zeros(1, 3, 6), {}]], None, cfg=1.0)
    with pytest.raises(ValueError, match="width 6"):
        sample(b, latent(), seed=1, steps=2)


def test_denoise_starts_from_the_normalised_latent():
    # v = 0 keeps x: output = process_out(s0*noise + (1-s0)*process_in(latent)), ComfyUI's noise_scaling
    zero = Denoiser(module=nn.Identity(), family="dit", in_channels=16, info={"latent_format": "wan21"})
    zero.module.forward = lambda x, t, c: torch.zeros_like(x)
    lat = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    out, rep = sample(Branch(zero), {"samples": lat}, seed=9, steps=4, denoise=0.5, scheduler="simple", shift=1.0)
    s0 = rep.sigmas[0]
    from twinflow.sampling.noise import WAN21_MEAN, WAN21_STD
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    noise = torch.randn(lat.shape, generator=torch.manual_seed(9))
    exp = (s0 * noise + (1 - s0) * (lat - mean) / std) * std + mean
    assert abs(s0 - 0.5) < 0.01 and torch.allclose(out["samples"], exp, atol=1e-5)


def test_interrupt_between_steps():
    request_interrupt()
    try:
        with pytest.raises(Interrupted):
            run(denoiser(PosteriorMean(points(1))))
    finally:
        clear_interrupt()


def test_nodes_run_and_match_library():
    from twinflow.nodes.sampling import NODE_CLASS_MAPPINGS as N

    gate, plot = N["TwinFlowGateSchedule"]().build("steps", 0.5, 1.0, 0.0, "3,6,9", 0.875, "", 0.25, 10, 8.0)
    assert plot.shape == (1, 256, 512, 3) and 0 <= float(plot.min()) and float(plot.max()) <= 1
    S, D = denoiser(PosteriorMean(points(1))), denoiser(PosteriorMean(points(2)))
    lat = latent()
    out, report = N["TwinFlowDualBranchSampler"]().run(S, D, gate, lat, 5, 10, 1.0, 1.0, "euler", "simple", 3.0,
                                                         1.0, "HW")
    ref, _ = run(S, D, gate, steps=10)
    assert torch.equal(out["samples"], ref["samples"]) and out is not lat and lat["samples"].abs().sum() == 0
    assert "semantic" in report and "detail" in report
    single, _ = N["TwinFlowSampler"]().run(S, lat, 5, 10, 1.0, "euler", "simple", 3.0, 1.0)
    assert torch.equal(single["samples"], run(S, steps=10)[0]["samples"])
    for cls in N.values():  # every number widget has min/max/step
        for section in cls.INPUT_TYPES().values():
            for spec in section.values():
                if spec[0] in ("INT", "FLOAT"):
                    assert {"min", "max", "step"} <= set(spec[1])


def test_real_tiny_wan_dit_with_tiny_refiner():
    from twinflow.models import refiner, wan_dit, text
    from twinflow.models.wan_dit import make_denoiser as wan_denoiser

    S = wan_denoiser(wan_dit.random_wan_dit("tiny"), "wan tiny", "random:tiny")
    R = refiner.make_denoiser(*refiner.random_refiner("tiny"), name="refiner tiny")
    pos = text.conditioning(text.tiny_text_encode("a red fox", width=S.text_dim))
    neg = text.conditioning(text.tiny_text_encode("", width=S.text_dim))
    lat = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    gate = GateSchedule("steps", alpha=0.5, fuse_steps=(3, 6, 9), cutoff=0.3)
    args = dict(seed=3, steps=10, sampler="uni_pc", scheduler="simple", shift=8.0)
    out, rep = sample(Branch(S, pos, neg, 5.0), lat, detail=Branch(R, name="detail"), gate=gate, **args)
    assert out["samples"].shape == (1, 16, 1, 8, 8) and torch.isfinite(out["samples"]).all()
    assert rep.branches["semantic"]["forwards"] == 10 and rep.branches["semantic"]["items"] == 20  # CFG batched
    assert rep.branches["detail"]["forwards"] == 3
    one, _ = sample(Branch(S, pos, neg, 5.0), lat, detail=Branch(R, name="detail"),
                    gate=GateSchedule("constant", alpha=1.0), **args)
    single, _ = sample(Branch(S, pos, neg, 5.0), lat, **args)
    assert torch.equal(one["samples"], single["samples"]) and not torch.equal(one["samples"], out["samples"])
    # prompts of different lengths batched with Wan's zero padding == two separate forwards
    two, rep2 = sample(Branch(S, pos, neg, 5.0, batch_cfg="never"), lat, **args)
    assert rep2.branches["semantic"]["forwards"] == 20
    assert torch.allclose(two["samples"], single["samples"], atol=1e-4)


def test_dual_branch_workflow_through_the_headless_runner(tf_dirs):
    # API prompt: Empty Latent Video -> Dual-Branch Sampler (tiny Wan DiT + tiny refiner, steps gate 3,6,9) -> Save Latent
    from twinflow.runner.api import run_workflow

    prompt = {
        "1": {"class_type": "TwinFlowEmptyLatentVideo", "inputs": {"width": 64, "height": 64, "length": 1,
                                                                   "batch_size": 1}},
        "2": {"class_type": "TwinFlowLoadDiT", "inputs": {"ckpt_name": "random:tiny", "dtype": "default",
                                                          "preset": "auto", "seed": 0}},
        "3": {"class_type": "TwinFlowLoadRefiner", "inputs": {"refiner_name": "random:tiny", "dtype": "default",
                                                              "seed": 0}},
        "4": {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "a fox", "width": 4096, "pad_to": 0}},
        "5": {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "", "width": 4096, "pad_to": 0}},
        "6": {"class_type": "TwinFlowGateSchedule", "inputs": {
            "kind": "steps", "alpha": 0.5, "alpha_start": 1.0, "alpha_end": 0.0, "fuse_steps": "3,6,9",
            "boundary": 0.875, "values": "", "cutoff": 0.0, "preview_steps": 10, "preview_shift": 8.0}},
        "7": {"class_type": "TwinFlowDualBranchSampler", "inputs": {
            "semantic": ["2", 0], "detail": ["3", 0], "gate": ["6", 0], "latent": ["1", 0], "seed": 0, "steps": 10,
            "cfg_semantic": 5.0, "cfg_detail": 1.0, "sampler": "uni_pc", "scheduler": "simple", "shift": 8.0,
            "denoise": 1.0, "split": "HW", "positive": ["4", 0], "negative": ["5", 0]}},
        "8": {"class_type": "TwinFlowSaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "dual"}},
    }
    res = run_workflow(prompt, cache=False)
    out = res.results["7"][0][0]["samples"]
    assert out.shape == (1, 16, 1, 8, 8) and torch.isfinite(out).all()
    report = res.results["7"][1][0]
    assert "semantic" in report and "detail" in report and "3 forwards" in report


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dual_branch_on_cuda_matches_cpu():
    # models on the GPU, noise from the CPU generator (as ComfyUI): the same seed gives the same result
    S = PosteriorMean(points(1))
    D = PosteriorMean(points(2))
    gate = GateSchedule("steps", alpha=0.5, fuse_steps=(2, 4), cutoff=0.3)
    cpu, _ = run(denoiser(S), denoiser(D), gate, sampler="uni_pc")
    gpu, rep = run(denoiser(S.cuda()), denoiser(D.cuda()), gate, sampler="uni_pc")
    assert gpu["samples"].device.type == "cpu" and rep.branches["detail"]["forwards"] == 2
    assert torch.allclose(gpu["samples"], cpu["samples"], atol=1e-4)
