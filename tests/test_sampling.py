"""Sigma schedules, noise and solvers against ComfyUI's formulas (re-derived here) and closed-form flows."""
import math

import numpy as np
import pytest
import torch

from twinflow.sampling import schedules, solvers
from twinflow.sampling.noise import LatentFormat, prepare_noise


# ----------------------------------------------------------------- ComfyUI's formulas, written out (float64)
def comfy_table(shift):
    # ModelSamplingDiscreteFlow: sigmas = time_snr_shift(shift, (arange(1..1000)/1000*1000)/1000)
    t = np.arange(1, 1001) / 1000.0
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def comfy_simple(shift, steps):
    s = comfy_table(shift)
    ss = len(s) / steps
    return [float(s[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def comfy_normal(shift, steps):
    s = comfy_table(shift)
    start, end = s[-1] * 1000, s[0] * 1000
    ts = np.linspace(start, end, steps)  # sigma(end) > 1e-5 for flow tables, so append zero
    f = lambda t: t / 1000 if shift == 1.0 else shift * (t / 1000) / (1 + (shift - 1) * (t / 1000))
    return [float(f(t)) for t in ts] + [0.0]


def comfy_sgm_uniform(shift, steps):
    s = comfy_table(shift)
    ts = np.linspace(s[-1] * 1000, s[0] * 1000, steps + 1)[:-1]
    f = lambda t: t / 1000 if shift == 1.0 else shift * (t / 1000) / (1 + (shift - 1) * (t / 1000))
    return [float(f(t)) for t in ts] + [0.0]


def betainc_series(x, a, b):
    # I_x(a,b) = x^a (1-x)^b / (a B(a,b)) * 2F1(a+b, 1; a+1; x)   (power series, x <= 1/2; symmetry above)
    if x > 0.5:
        return 1.0 - betainc_series(1.0 - x, b, a)
    if x <= 0:
        return 0.0
    term, total, n = 1.0, 1.0, 0
    while abs(term) > 1e-17:
        term *= (a + b + n) * x / (a + 1 + n)
        total += term
        n += 1
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp(a * math.log(x) + b * math.log1p(-x) - lbeta) * total / a


def ppf_series(q, a, b):
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if betainc_series(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def comfy_beta(shift, steps, a=0.6, b=0.6):
    s = comfy_table(shift)
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(np.array([ppf_series(q, a, b) if 0 < q < 1 else float(q >= 1) for q in ts]) * 999)
    out, last = [], -1
    for t in ts:
        if t != last:
            out.append(float(s[int(t)]))
        last = t
    return out + [0.0]


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.5])
@pytest.mark.parametrize("steps", [1, 3, 4, 10, 20, 30, 50])
@pytest.mark.parametrize("name,ref", [("simple", comfy_simple), ("normal", comfy_normal), ("beta", comfy_beta),
                                      ("sgm_uniform", comfy_sgm_uniform)])
def test_sigmas_match_comfyui_formulas(shift, steps, name, ref):
    got = schedules.calculate_sigmas(name, steps, shift)
    exp = ref(shift, steps)
    assert got.dtype == torch.float32 and len(got) == len(exp)
    assert np.abs(got.double().numpy() - np.array(exp)).max() <= 1e-6


def test_published_value_wan_simple_3_steps():
    # comfy.samplers.calculate_sigmas(model_sampling(shift 8), "simple", 3) -> [1.0, 0.941, 0.800, 0.0]
    got = schedules.calculate_sigmas("simple", 3, 8.0)
    assert torch.allclose(got, torch.tensor([1.0, 0.9413, 0.8005, 0.0]), atol=1e-4)


def test_ksampler_discard_penultimate_and_denoise():
    # ComfyUI KSampler: uni_pc samplers compute steps+1 sigmas and drop the penultimate one
    full = comfy_simple(5.0, 11)
    exp = full[:-2] + full[-1:]
    got = schedules.sampler_sigmas("simple", 10, 5.0, sampler="uni_pc")
    assert np.abs(got.double().numpy() - np.array(exp)).max() <= 1e-6
    # denoise 0.5: grid for int(10/0.5)=20 steps, last 11 kept
    got = schedules.sampler_sigmas("simple", 10, 5.0, sampler="euler", denoise=0.5)
    assert np.abs(got.double().numpy() - np.array(comfy_simple(5.0, 20)[-11:])).max() <= 1e-6
    assert len(schedules.sampler_sigmas("simple", 10, 5.0, denoise=0.0)) == 0


def test_wan_unipc_grid_matches_official_formula():
    # FlowUniPCMultistepScheduler(shift=1).set_timesteps(n, shift=s): sigma_max = 1 - 1/1000 (the shift-1 table
    # built from 1 - linspace(1, 1/1000, 1000)), sigma_min = 0, linspace(max, min, n+1)[:-1], shifted, + [0]
    for n, s in [(10, 5.0), (50, 5.0), (30, 3.0), (7, 1.0)]:
        train = 1.0 - np.linspace(1, 1 / 1000, 1000)[::-1]
        base = np.linspace(train[0], train[-1], n + 1)[:-1]
        exp = np.append(s * base / (1 + (s - 1) * base), 0.0)
        got = schedules.calculate_sigmas("wan_unipc", n, s)
        assert len(got) == n + 1 and np.abs(got.double().numpy() - exp).max() <= 1e-6


def test_bad_scheduler_and_steps():
    with pytest.raises(ValueError, match="unknown scheduler"):
        schedules.calculate_sigmas("karras2", 10, 1.0)
    with pytest.raises(ValueError, match="steps"):
        schedules.calculate_sigmas("simple", 0, 1.0)
    with pytest.raises(ValueError, match="shift"):
        schedules.calculate_sigmas("simple", 4, -1.0)


# ------------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("seed", [0, 1, 42, 123456789, 2**63 + 5])
def test_noise_matches_comfyui(seed):
    latent = torch.zeros(2, 16, 3, 6, 5)
    generator = torch.manual_seed(seed)  # comfy.sample.prepare_noise, no batch_index
    exp = torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    assert torch.equal(prepare_noise(latent, seed), exp)


def test_noise_batch_index_matches_comfyui():
    latent = torch.zeros(3, 4, 2, 3, 3)
    inds = [4, 1, 4]
    generator = torch.manual_seed(7)
    uniq, inverse = np.unique(inds, return_inverse=True)
    noises = []
    for i in range(uniq[-1] + 1):
        n = torch.randn([1] + list(latent.size())[1:], generator=generator, device="cpu")
        if i in uniq:
            noises.append(n)
    exp = torch.cat([noises[i] for i in inverse], 0)
    assert torch.equal(prepare_noise(latent, 7, inds), exp)
    with pytest.raises(ValueError, match="seed"):
        prepare_noise(latent, -1)


def test_latent_format_roundtrip_and_comfy_values():
    fmt = LatentFormat("wan21")
    z = torch.randn(1, 16, 2, 3, 3)
    # ComfyUI latent_formats.Wan21: process_in = (z - mean) * 1.0 / std; channel 0: mean -0.7571, std 2.8184
    assert torch.allclose(fmt.process_in(z)[:, 0], (z[:, 0] + 0.7571) / 2.8184)
    assert torch.allclose(fmt.process_out(fmt.process_in(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="16 channels"):
        fmt.process_in(torch.zeros(1, 4, 1, 2, 2))


# ------------------------------------------------------------------------------- solvers on closed forms
def gaussian_setup(mu=0.7, tau=0.5, shape=(2, 3, 1, 4, 4), seed=3):
    """Data x0 ~ N(mu, tau^2): posterior mean is affine in x; the exact flow ODE maps noise n to mu + tau*n."""
    n = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def model(x, i, sigmas):
        s = float(sigmas[i])
        var = (1 - s) ** 2 * tau**2 + s**2
        return mu + (1 - s) * tau**2 / var * (x - (1 - s) * mu)

    return n, model, mu + tau * n


def exact_at(n, s, mu=0.7, tau=0.5):
    return (1 - s) * mu + math.sqrt((1 - s) ** 2 * tau**2 + s**2) * n


@pytest.mark.parametrize("name,tol,min_rate", [("euler", 6e-2, 1.8), ("dpmpp_2m", 1e-2, 3.5),
                                                ("uni_pc", 3e-3, 1.8), ("uni_pc_bh2", 3e-3, 2.5)])
def test_solvers_converge_on_gaussian_flow(name, tol, min_rate):
    # uniform grid from 1 to 0.05: the exact flow solution is known there; errors shrink at the solver's order
    n, model, _ = gaussian_setup()
    errs = []
    for steps in (20, 40):
        sig = torch.linspace(1.0, 0.05, steps + 1, dtype=torch.float64)
        calls = []
        out = solvers.get_solver(name)(lambda x, i: (calls.append(i), model(x, i, sig))[1], n.clone(), sig)
        assert calls == list(range(steps))  # one model call per step, in order
        errs.append(float((out - exact_at(n, 0.05)).abs().max()))
    assert errs[1] < tol and errs[0] / errs[1] > min_rate, errs


def comfy_unipc_vp(model, x, sigmas, variant):
    """ComfyUI's sample_unipc re-derived: VP coordinates y = x/sqrt(1+s^2), lambda = -log s, eps-model wrapper,
    last sigma 0 -> 0.001, result / alpha(0.001), then KSAMPLER's inverse_noise_scaling / (1 - 0.001)."""
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    alpha = lambda s: 1 / torch.sqrt(1 + s * s)
    std = lambda s: s / torch.sqrt(1 + s * s)
    lam = lambda s: -torch.log(s)
    data = lambda y, i: model(y * torch.sqrt(1 + ts[i] ** 2), i)  # x0 from eps = (x - x0)/s, as ComfyUI
    y = x / torch.sqrt(1 + ts[0] ** 2)
    steps = len(ts) - 1
    order = min(3, steps - 1)

    def update(y, M, T, ti, p, corrector):
        t, s0 = ts[ti], T[-1]
        h = lam(t) - lam(s0)
        rks = [(lam(T[-(k + 1)]) - lam(s0)) / h for k in range(1, p)]
        D1 = [(M[-(k + 1)] - M[-1]) / rk for k, rk in zip(range(1, p), rks)]
        rks = torch.stack(rks + [torch.ones((), dtype=ts.dtype)])
        hh = -h
        hphi1 = torch.expm1(hh)
        hphik, fac = hphi1 / hh - 1, 1
        Bh = hh if variant == "bh1" else torch.expm1(hh)
        R, b = [], []
        for k in range(1, p + 1):
            R.append(rks ** (k - 1))
            b.append(hphik * fac / Bh)
            fac *= k + 1
            hphik = hphik / hh - 1 / fac
        R, b = torch.stack(R), torch.stack(b)
        base = std(t) / std(s0) * y - alpha(t) * hphi1 * M[-1]
        yt = base
        if D1:
            rp = torch.tensor([0.5], dtype=ts.dtype) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            yt = base - alpha(t) * Bh * sum(r * d for r, d in zip(rp, D1))
        mt = None
        if corrector:
            rc = torch.tensor([0.5], dtype=ts.dtype) if p == 1 else torch.linalg.solve(R, b)
            mt = data(yt, ti)
            cr = sum(r * d for r, d in zip(rc[:-1], D1)) if D1 else 0
            yt = base - alpha(t) * Bh * (cr + rc[-1] * (mt - M[-1]))
        return yt, mt

    M, T = [data(y, 0)], [ts[0]]
    for si in range(1, steps):
        if si < order:
            y, m = update(y, M, T, si, si, True)
            M.append(m)
            T.append(ts[si])
        else:
            for st in range(si, si + 1 + int(si == steps - 1)):
                y, m = update(y, M, T, st, min(order, steps + 1 - st), st != steps)
                for k in range(order - 1):
                    T[k], M[k] = T[k + 1], M[k + 1]
                T[-1] = ts[st]
                if st < steps:
                    M[-1] = m
    return y / alpha(ts[-1]) / (1 - ts[-1])


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [2, 3, 5, 12])
def test_unipc_matches_comfyui_vp_form(variant, steps):
    n, model, _ = gaussian_setup()
    sig = schedules.sampler_sigmas("simple", steps, 5.0, sampler="uni_pc").double()
    ours = solvers.uni_pc(lambda x, i: model(x, i, sig), n * float(sig[0]), sig, variant=variant)
    ref = comfy_unipc_vp(lambda x, i: model(x, i, sig), n * float(sig[0]), sig, variant)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=1e-10)


def test_dpmpp_2m_matches_comfyui_k_diffusion_form():
    # k-diffusion sample_dpmpp_2m re-derived: t = -log sigma, x = (s'/s) x - expm1(-h) * D'
    n, model, _ = gaussian_setup()
    sig = schedules.sampler_sigmas("normal", 9, 3.0).double()
    x, old = n.clone(), None
    for i in range(len(sig) - 1):
        d = model(x, i, sig)
        t, tn = -torch.log(sig[i]), -torch.log(sig[i + 1])
        h = tn - t
        if old is None or sig[i + 1] == 0:
            x = (torch.exp(-tn) / torch.exp(-t)) * x - torch.expm1(-h) * d
        else:
            r = (t + torch.log(sig[i - 1])) / h
            x = (torch.exp(-tn) / torch.exp(-t)) * x - torch.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    ours = solvers.dpmpp_2m(lambda x, i: model(x, i, sig), n.clone(), sig)
    assert torch.allclose(ours, x, atol=1e-10)


def posterior_mean_model(points):
    """E[x0 | x_sigma] for x0 uniform over `points` [K, ...] under x = (1-s) x0 + s n."""
    flat = points.reshape(points.shape[0], -1)

    def denoise(x, s):
        d2 = ((x.reshape(x.shape[0], 1, -1) - (1 - s) * flat[None]) ** 2).sum(-1)  # (B, K)
        w = torch.softmax(-d2 / (2 * s * s), dim=1)
        return (w @ flat).reshape(x.shape)

    return denoise


@pytest.mark.parametrize("name,steps", [("euler", 200), ("dpmpp_2m", 40), ("uni_pc", 40), ("uni_pc_bh2", 40)])
def test_solvers_land_on_a_training_point(name, steps):
    g = torch.Generator().manual_seed(11)
    points = torch.randn(4, 2, 1, 3, 3, generator=g, dtype=torch.float64) * 2
    denoise = posterior_mean_model(points)
    x = torch.randn(3, 2, 1, 3, 3, generator=g, dtype=torch.float64)
    sig = schedules.sampler_sigmas("simple", steps, 3.0, sampler=name).double()
    out = solvers.get_solver(name)(lambda x, i: denoise(x, float(sig[i])), x * float(sig[0]), sig)
    d = torch.cdist(out.reshape(3, -1), points.reshape(4, -1))  # (3, 4)
    assert float(d.min(dim=1).values.max()) < 0.05, d


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        solvers.get_solver("heun3")


def test_uni_pc_refuses_a_schedule_with_equal_sigmas():
    # 1000 simple steps at shift 8 repeat a sigma in float32: UniPC's log-sigma step would divide by zero
    sig = schedules.sampler_sigmas("simple", 1000, 8.0, sampler="uni_pc")
    assert any(float(a) <= float(b) for a, b in zip(sig[:-1], sig[1:]))  # the case this guards (checked, not assumed)
    calls = []
    with pytest.raises(ValueError, match=r"uni_pc: sigmas \d+ and \d+ of the schedule are not decreasing"):
        solvers.uni_pc(lambda x, i: calls.append(i) or x, torch.zeros(1, 16, 1, 2, 2), sig)
    assert not calls  # refused before the first model call
    torch.manual_seed(0)
    x = torch.randn(1, 16, 1, 2, 2)
    ok = schedules.sampler_sigmas("simple", 20, 8.0, sampler="uni_pc")
    assert torch.isfinite(solvers.uni_pc(lambda y, i: 0.5 * y, x, ok)).all()
