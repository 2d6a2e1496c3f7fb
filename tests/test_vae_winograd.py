"""Winograd in the Wan VAEs: F(2x2, 3x3) in space (`wan_vae_winograd.conv3x3`) against `F.conv2d`, and the
F(2,3)-over-time frame pairs of `CausalConv3d` against the plain 3-tap path (float64: the algebra is exact,
only summation order differs). Parity of both paths with diffusers is in test_wan_vae.py / test_wan22_vae.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

from twinflow.models import wan_vae_winograd
from twinflow.models.wan22_vae import random_wan22_vae
from twinflow.models.wan_vae import CausalConv3d, CausalState, random_wan_vae


@pytest.mark.parametrize("chunk", [None, 64])  # 64 elements: several kernel parts and runs of block rows
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape,padding", [((1, 8, 5, 7, 9), 1), ((2, 6, 4, 8, 8), (0, 1)), ((1, 3, 3, 5, 6), (0, 1)),
                                           ((1, 16, 16, 4, 4), 1), ((1, 4, 4, 3, 3), 0), ((1, 5, 7, 2, 2), 1)])
def test_conv3x3_equals_conv2d(shape, padding, dtype, tol, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(wan_vae_winograd, "CHUNK_ELEMENTS", chunk)
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
    k = torch.randn(o, c, 3, 3, dtype=dtype, generator=g) / 3
    b = torch.randn(o, dtype=dtype, generator=g)
    ws = {}
    for bias in (None, b):
        want = F.conv2d(x, k, bias, padding=padding)
        got = wan_vae_winograd.conv3x3(x, k, bias, padding, ws)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    assert set(ws) == {"kernel", "kernel_row", "padded", "input", "product"}  # kept for the next call
    # a causal conv's time-pair kernel (g0 + g2 +- g1) / 2, formed row by row inside the kernel transform,
    # gives exactly what its dense kernel gives (same sums), and a direct conv gets the dense kernel
    taps = torch.randn(o, c, 3, 3, 3, dtype=dtype, generator=g)
    for sign in (1.0, -1.0):
        pair = wan_vae_winograd.TapSum(taps, sign)
        dense = (taps[:, :, 0] + taps[:, :, 2] + sign * taps[:, :, 1]) / 2
        assert torch.equal(wan_vae_winograd.kernel(pair), pair.dense()) and pair.shape == dense.shape
        torch.testing.assert_close(pair.dense(), dense, rtol=0, atol=4 * torch.finfo(dtype).eps * dense.abs().max().item())
        got = wan_vae_winograd.conv3x3(x, pair, b, padding, ws)
        assert torch.equal(got, wan_vae_winograd.conv3x3(x, pair.dense(), b, padding, ws))


def test_conv3x3_scratch_is_reused_and_never_aliases_the_output():
    ws = {}
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    k = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    y1 = wan_vae_winograd.conv3x3(x, k, None, 1, ws)
    kept = {name: t.data_ptr() for name, t in ws.items()}
    small = wan_vae_winograd.conv3x3(x[:, :, :4, :4], k, None, 1, ws)  # a smaller call reuses the buffers
    assert {name: t.data_ptr() for name, t in ws.items()} == kept
    y2 = wan_vae_winograd.conv3x3(x, k, None, 1, ws)
    assert torch.equal(y1, y2)  # the first output was not overwritten by the calls after it
    assert torch.allclose(small, F.conv2d(x[:, :, :4, :4], k, padding=1), atol=1e-12)


@pytest.fixture(scope="module")
def models():
    return {"wan2.1": random_wan_vae("tiny", seed=4).double(), "wan2.2": random_wan22_vae("tiny", seed=4).double()}


def _without_pairs(vae):
    plain = copy.deepcopy(vae)
    for m in plain.modules():
        if isinstance(m, CausalConv3d):
            m.pairs = False
    return plain


def _count_convs(monkeypatch) -> dict:
    """Multiply-adds of the causal convs' 2-D convs (`macs`), and how many pair steps ran."""
    counts = {"macs": 0, "pair": 0, "partial_pair": 0}
    real_conv, real_pair, real_partial = CausalConv3d.conv2d, CausalConv3d.pair_step, CausalConv3d.partial_pair_step

    def conv2d(self, x, w, *a, **k):
        y = real_conv(self, x, w, *a, **k)
        counts["macs"] += y.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        return y

    def pair_step(self, *a, **k):
        counts["pair"] += 1
        return real_pair(self, *a, **k)

    def partial_pair_step(self, *a, **k):
        counts["partial_pair"] += 1
        return real_partial(self, *a, **k)

    monkeypatch.setattr(CausalConv3d, "conv2d", conv2d)
    monkeypatch.setattr(CausalConv3d, "pair_step", pair_step)
    monkeypatch.setattr(CausalConv3d, "partial_pair_step", partial_pair_step)
    return counts


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2"])
def test_time_pairs_equal_plain_taps_with_fewer_convs(models, family, monkeypatch):
    vae = models[family]
    plain = _without_pairs(vae)
    z = torch.randn(1, vae.cfg.z_dim, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = vae.cfg.spatial_ratio
    x = torch.rand(1, 3, 9, 2 * r, 3 * r, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(2)) * 2 - 1
    counts = _count_convs(monkeypatch)
    with torch.inference_mode():
        want_d, want_e = plain.decode(z, bands=1), plain.encode(x, bands=1)
        plain_macs = counts["macs"]
        assert counts["pair"] == counts["partial_pair"] == 0
        counts["macs"] = 0
        got_d, got_e = vae.decode(z, bands=1), vae.encode(x, bands=1)
    assert counts["pair"] > 0
    assert (family == "wan2.2") == (counts["partial_pair"] > 0)  # Wan2.2's narrowing stage convs pair too
    assert counts["macs"] < 0.85 * plain_macs
    assert (got_d - want_d).abs().max().item() <= 1e-12
    assert (got_e - want_e).abs().max().item() <= 1e-12


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2"])
def test_time_pairs_in_row_bands_equal_plain_taps(models, family):
    vae = models[family]
    z = torch.randn(1, vae.cfg.z_dim, 3, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = _without_pairs(vae).decode(z, bands=1)
        got = vae.decode(z, bands=3)
    assert (got - want).abs().max().item() <= 1e-12


def test_one_pair_costs_four_frame_convs():
    # A conv in isolation (fp32): frames 0..4 -> 1 conv (first frame: one tap), A at 1 (d0 = 0: 3 convs),
    # B at 2 (1), A at 3 (3), B at 4 (1) = 9 convs; the plain taps need 1 + 2 + 3 + 3 + 3 = 12.
    conv = CausalConv3d(3, 4, 3, padding=1)
    conv.pairs = True
    frames = [torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    calls = []
    real = conv.conv2d
    conv.conv2d = lambda *a: calls.append(1) or real(*a)
    with torch.inference_mode():
        st = CausalState()
        got = [conv.step(f.clone(), st) for f in frames]
        assert len(calls) == 9
        conv.pairs = False
        st = CausalState()
        want = [conv.step(f.clone(), st) for f in frames]
    assert len(calls) == 9 + 12
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_time_pairs_stay_off_with_autograd_and_in_low_precision():
    # Training differentiates through the steps: the pair path writes into the state's frames, so it only
    # runs in inference; bf16 keeps its single stacked conv (fp32 accumulation).
    conv = CausalConv3d(3, 4, 3, padding=1)
    conv.pairs = True
    frames = [torch.randn(1, 3, 5, 5, requires_grad=True) for _ in range(3)]
    st = CausalState()
    out = sum(conv.step(f * 1.0, st).sum() for f in frames)
    out.backward()
    assert all(f.grad is not None for f in frames)
    s = [None, torch.zeros(1, 3, 5, 5, dtype=torch.bfloat16)]
    with torch.inference_mode():
        assert not conv.pairs_apply(torch.zeros(1, 3, 5, 5, dtype=torch.bfloat16), s)
        assert conv.pairs_apply(torch.zeros(1, 3, 5, 5), [None, torch.zeros(1, 3, 5, 5)])


def test_pending_pair_at_a_chunk_boundary_is_refused():
    # The compiled steps carry two frames per conv; a pair conv on a level with one frame per chunk would
    # leave B's partial sum behind, so `flat` refuses instead of dropping it.
    conv = CausalConv3d(3, 4, 3, padding=1).double()
    conv.pairs = True
    st = CausalState()
    with torch.inference_mode():
        for i in range(2):  # frame 0, then A
            conv.step(torch.randn(1, 3, 4, 4, dtype=torch.float64), st)
    with pytest.raises(RuntimeError, match="pending sum at a chunk boundary"):
        st.flat([conv], lambda i, j: torch.zeros(1))


def test_wide_convs_take_winograd_only_where_it_pays(monkeypatch):
    calls = []
    monkeypatch.setattr(wan_vae_winograd, "conv3x3", lambda *a: calls.append(a[0].shape) or F.conv2d(*a[:3], padding=a[3]))
    c = wan_vae_winograd.MIN_CHANNELS
    conv = CausalConv3d(c, 8, 3, padding=1)
    w = conv.weight[:, :, 0]
    with torch.inference_mode():
        conv.conv2d(torch.randn(1, c, 32, 32), w, None, 1, {})      # wide and big enough
        conv.conv2d(torch.randn(1, c, 16, 16), w, None, 1, {})      # too few pixels
        conv.conv2d(torch.randn(1, c - 1, 32, 32), w[:, :c - 1], None, 1, {})  # too narrow
        conv.conv2d(torch.randn(1, c, 32, 32).bfloat16(), w.bfloat16(), None, 1, {})  # low precision
    conv.conv2d(torch.randn(1, c, 32, 32), w, None, 1, {})  # autograd on: direct
    assert calls == [torch.Size([1, c, 32, 32])]
