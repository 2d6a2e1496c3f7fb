"""Wan2.1 VAE: official layout, parity with diffusers' AutoencoderKLWan, causality, streaming, tiling,
memory planning, latent normalisation and safe loading of bad files."""
import copy
import logging
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from twinflow.core.errors import CheckpointError
from twinflow.models import wan_vae, wan_vae_bands, wan_vae_layout, wan_vae_plan, wan_vae_tiles
from twinflow.models.wan_vae import PRESETS, WanVAE, detect_config, load_wan_vae, random_wan_vae

REF = Path(__file__).resolve().parent / "fixtures" / "reference" / "wan21_vae_keys.tsv"  # vendored (README.md)

# Tiled decode vs untiled on the tiny preset (random weights), documented in docs/vae.md.
# (random tiny weights, 80x96 px frames, 64 px tiles, 32 px overlap; measured max 1.29-1.40, mean 0.11-0.12)
TILE_SEAM_MAX_ABS = 1.5
TILE_SEAM_MEAN_ABS = 0.15


def _reference_table():
    rows = [line.split("\t") for line in REF.read_text().splitlines() if line.strip()]
    return [(k, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())) for k, shape, *_ in rows]


@pytest.fixture(scope="module")
def tiny():
    return random_wan_vae("tiny", seed=1)


def _diffusers_twin(model: WanVAE):
    """diffusers' AutoencoderKLWan with the same weights, mapped by diffusers' own converter."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    c = model.cfg
    ref = diffusers.AutoencoderKLWan(base_dim=c.dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult),
                                     num_res_blocks=c.num_res_blocks,
                                     temperal_downsample=list(c.temporal_downsample)).eval()
    sd = {k: v.float() for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
    return ref


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return _diffusers_twin(tiny)


# ---------------------------------------------------------------------------------------------- layout
def test_real_config_keys_and_shapes_match_official_table():
    table = _reference_table()
    with torch.device("meta"):
        model = WanVAE(PRESETS["wan2.1"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(table) == 194
    assert ours == table  # same names, shapes and order as the official WanVAE_


def test_config_detected_from_reference_shapes():
    table = _reference_table()
    sd = {k: torch.empty(shape, device="meta") for k, shape in table}
    assert detect_config(sd) == PRESETS["wan2.1"]
    with torch.device("meta"):
        tiny_sd = WanVAE(PRESETS["tiny"]).state_dict()
    assert detect_config(tiny_sd) == PRESETS["tiny"]


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(tiny, tiny_ref, frames):
    x = torch.rand(1, 3, frames, 32, 40, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    ours = tiny.encode(x)
    with torch.inference_mode():
        ref = tiny_ref.encode(x).latent_dist.mode()
    assert ours.shape == ref.shape == (1, 16, 1 + (frames - 1) // 4, 4, 5)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("latents", [1, 2, 3])
def test_decode_matches_diffusers(tiny, tiny_ref, latents):
    z = torch.randn(1, 16, latents, 4, 5, generator=torch.Generator().manual_seed(latents))
    ours = tiny.decode(z)
    with torch.inference_mode():
        ref = tiny_ref.decode(z).sample
    assert ours.shape == ref.shape == (1, 3, 1 + 4 * (latents - 1), 32, 40)
    assert ref.abs().mean() > 0.05  # the check is not vacuous
    assert (ours - ref).abs().max().item() <= 1e-5


def test_winograd_convs_match_diffusers(tiny, tiny_ref, winograd_everywhere):
    # The decode and encode with every 3x3 conv by Winograd F(2x2, 3x3) (thresholds lowered so the tiny
    # widths take it; the real config takes it at >= 160 channels and >= 32x32 px) and the time pairs.
    z = torch.randn(1, 16, 3, 4, 5, generator=torch.Generator().manual_seed(7))
    x = torch.rand(1, 3, 9, 32, 40, generator=torch.Generator().manual_seed(8)) * 2 - 1
    got_d, got_e = tiny.decode(z, bands=1), tiny.encode(x, bands=1)
    assert winograd_everywhere  # the Winograd convs ran
    with torch.inference_mode():
        want_d, want_e = tiny_ref.decode(z).sample, tiny_ref.encode(x).latent_dist.mode()
    assert (got_d - want_d).abs().max().item() <= 1e-5
    assert (got_e - want_e).abs().max().item() <= 1e-5


def test_banded_decode_matches_diffusers(tiny, tiny_ref):
    # the default for tall frames (auto: here 3 exact row bands) against diffusers directly
    z = torch.randn(1, 16, 3, 30, 5, generator=torch.Generator().manual_seed(4))
    assert wan_vae_plan.auto_bands(tiny, z.shape) == 3
    ours = tiny.decode(z)
    with torch.inference_mode():
        ref = tiny_ref.decode(z).sample
    assert ours.shape == ref.shape == (1, 3, 9, 240, 40)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_real_config_small_decode_matches_diffusers():
    model = random_wan_vae("wan2.1", seed=3)
    ref = _diffusers_twin(model)
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = model.decode(z)
    with torch.inference_mode():
        expect = ref.decode(z).sample
    assert ours.shape == expect.shape == (1, 3, 5, 32, 32)
    assert (ours - expect).abs().max().item() <= 1e-5


def test_encode_drops_surplus_frames_like_comfyui(tiny, tiny_ref, caplog):
    x = torch.rand(1, 3, 7, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with caplog.at_level(logging.INFO, logger="twinflow.models.wan_vae"):
        ours = tiny.encode(x)
    assert "dropped" in caplog.text
    with torch.inference_mode():
        ref = tiny_ref.encode(x).latent_dist.mode()
    assert ours.shape == ref.shape == (1, 16, 2, 2, 2)
    assert torch.equal(ours, tiny.encode(x[:, :, :5]))
    assert (ours - ref).abs().max().item() <= 1e-5


def test_batch_of_two_equals_each_sample(tiny):
    z = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    both = tiny.decode(z)
    one = tiny.decode(z[1:])
    assert (both[1:] - one).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- causality
def test_encode_is_causal(tiny):
    x = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    full = tiny.encode(x)
    for k in (0, 1):
        prefix = tiny.encode(x[:, :, :1 + 4 * k])
        torch.testing.assert_close(prefix, full[:, :, :1 + k], rtol=0, atol=0)


def test_decode_is_causal(tiny):
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    full = tiny.decode(z)
    for k in (1, 2):
        prefix = tiny.decode(z[:, :, :k])
        torch.testing.assert_close(prefix, full[:, :, :1 + 4 * (k - 1)], rtol=0, atol=0)
    # a later latent never changes earlier frames, an earlier one does change later frames
    z2 = z.clone()
    z2[:, :, 0] += 1.0
    moved = tiny.decode(z2)
    assert (moved[:, :, 1:5] - full[:, :, 1:5]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- streaming
def test_streaming_equals_plain_decode(tiny):
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(6))
    plain = tiny.decode(z)
    streamed = dict(tiny.iter_decode(z))
    assert sorted(streamed) == list(range(9))
    assert torch.equal(torch.stack([streamed[i] for i in range(9)], dim=2), plain)
    seen = []
    out = torch.full_like(plain, float("nan"))
    res = tiny.decode(z, callback=lambda i, f: seen.append((i, f.clone())), out=out)
    assert res is out and torch.equal(out, plain)
    assert [i for i, _ in seen] == list(range(9))
    assert all(torch.equal(f, plain[:, :, i]) for i, f in seen)


def test_public_step_api_equals_encode_and_decode(tiny):
    # the streaming API the bands, tiles and compiled graphs use: one state, one frame per step
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(16))
    x = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(17)) * 2 - 1
    with torch.inference_mode():
        st = tiny.init_state()
        frames = [f.clone() for i in range(3) for f in tiny.decode_step(z[:, :, i], st, last=i == 2)]
        st = tiny.init_state()
        mus = [tiny.encode_step(x[:, :, i], st, last=i == 4) for i in range(5)]
    assert len(frames) == 9 and torch.equal(torch.stack(frames, 2), tiny.decode(z, bands=1))
    assert [m is None for m in mus] == [False, True, True, True, False]  # 1 frame, then 4 per latent
    assert torch.equal(torch.stack([mus[0], mus[4]], 2), tiny.encode(x, bands=1))


# ---------------------------------------------------------------------------------------------- tiling
def _ramp(n, ov, start, end):
    w = torch.ones(n, dtype=torch.float64)
    up = (torch.arange(ov, dtype=torch.float64) + 0.5) / ov
    if start:
        w[:ov] = up
    if end:
        w[n - ov:] = up.flip(0)
    return w


def test_tiled_decode_is_blend_of_independent_tiles(tiny):
    """Tiled == each tile decoded on its own (own causal cache across time), blended with linear ramps."""
    z = torch.randn(1, 16, 2, 6, 6, generator=torch.Generator().manual_seed(8))
    tiled = tiny.decode(z, tiling="on", tile=(4, 2))
    r = 8
    acc = torch.zeros(1, 3, 5, 6 * r, 6 * r, dtype=torch.float64)
    wsum = torch.zeros(6 * r, 6 * r, dtype=torch.float64)
    for y0 in (0, 2):  # tile starts for 6 latent px with tile 4: 0 and 6-4
        for x0 in (0, 2):
            part = tiny.decode(z[..., y0:y0 + 4, x0:x0 + 4]).double()
            wt = _ramp(4 * r, 2 * r, y0 > 0, y0 + 4 < 6)[:, None] * _ramp(4 * r, 2 * r, x0 > 0, x0 + 4 < 6)[None, :]
            acc[..., y0 * r:(y0 + 4) * r, x0 * r:(x0 + 4) * r] += part * wt
            wsum[y0 * r:(y0 + 4) * r, x0 * r:(x0 + 4) * r] += wt
    torch.testing.assert_close(tiled.double(), acc / wsum, rtol=0, atol=1e-5)
    # a tile as large as the latent is exactly the untiled decode
    assert torch.equal(tiny.decode(z[:, :, :1], tiling="on", tile=(6, 2)), tiny.decode(z[:, :, :1]))


def test_tiled_decode_seam_error_within_documented_tolerance(tiny):
    # Tiles change the context of every conv near a seam and of the global attention block in the
    # middle, so tiling is never exact (diffusers' neither); with random tiny weights it is large.
    # Measured values are in docs/vae.md.
    z = torch.randn(1, 16, 2, 10, 12, generator=torch.Generator().manual_seed(8))
    err = (tiny.decode(z, tiling="on", tile=(8, 4)) - tiny.decode(z)).abs()
    assert err.max().item() <= TILE_SEAM_MAX_ABS
    assert err.mean().item() <= TILE_SEAM_MEAN_ABS


def test_tile_grid_covers_everything():
    assert wan_vae_tiles.tile_starts(10, 16, 4) == [0]
    assert wan_vae_tiles.tile_starts(20, 8, 2) == [0, 6, 12]
    starts = wan_vae_tiles.tile_starts(33, 12, 3)
    assert starts[0] == 0 and starts[-1] + 12 == 33
    assert all(b - a <= 9 for a, b in zip(starts, starts[1:]))


def _no_work(monkeypatch, started: list) -> None:
    """Make any decode work (a progress bar in the model or an engine) fail the test."""
    for mod in (wan_vae, wan_vae_bands, wan_vae_tiles):
        monkeypatch.setattr(mod, "Progress", lambda *a, **k: started.append(1) or pytest.fail("work started"))


def test_memory_planning_tiles_or_refuses_up_front(tiny, monkeypatch, caplog):
    z = torch.randn(1, 16, 2, 16, 16, generator=torch.Generator().manual_seed(9))
    need = tiny.estimate_decode_bytes(z.shape)
    assert need > tiny.estimate_decode_bytes(z.shape, tile=8) > 0
    assert tiny.estimate_decode_bytes((1, 16, 3, 16, 16)) > need
    short = int(need * wan_vae_plan.ALLOC_MARGIN * 0.6)
    monkeypatch.setattr(wan_vae_plan, "available_memory", lambda device: short)
    started = []
    _no_work(monkeypatch, started)
    with pytest.raises(MemoryError, match=r"tile of \d+ px"):
        tiny.decode(z, tiling="off", bands=1)
    assert not started
    monkeypatch.undo()
    # auto bands: exact row bands are tried before tiles (and before refusing)
    monkeypatch.setattr(wan_vae_plan, "available_memory", lambda device: short)
    with caplog.at_level(logging.INFO, logger="twinflow.models.wan_vae_plan"):
        banded = tiny.decode(z, tiling="off")
    assert "exact row bands" in caplog.text
    monkeypatch.undo()
    torch.testing.assert_close(banded, tiny.decode(z, bands=1), rtol=0, atol=1e-5)
    caplog.clear()
    monkeypatch.setattr(wan_vae_plan, "available_memory", lambda device: short)
    with caplog.at_level(logging.INFO, logger="twinflow.models.wan_vae_plan"):
        out = tiny.decode(z, tiling="auto", bands=1)
    assert "tiling" in caplog.text
    assert out.shape == (1, 3, 5, 128, 128)
    with pytest.raises(MemoryError, match=r"tile of \d+ px would fit"):
        tiny.decode(z, tiling="on", tile=(16, 4))  # a custom tile that is still too big
    monkeypatch.setattr(wan_vae_plan, "available_memory", lambda device: 1000)
    with pytest.raises(MemoryError, match="smallest tile"):
        tiny.decode(z, tiling="auto")


def _count_banded_rows(monkeypatch) -> dict:
    """id(conv) -> output rows its banded steps (`wan_vae_bands.conv_rows`) produced, filled as they run."""
    rows_done = {}
    real = wan_vae_bands.conv_rows

    def counting(conv, pieces, pad, st, keep, norm):
        out = real(conv, pieces, pad, st, keep, norm)
        rows_done[id(conv)] = rows_done.get(id(conv), 0) + out.shape[2]
        return out

    monkeypatch.setattr(wan_vae_bands, "conv_rows", counting)
    return rows_done


def test_banded_decode_is_exact_and_computes_every_row_once(tiny, monkeypatch):
    # The layers after the last temporal upsampling are local in space, so bands that carry the rows
    # their 3x3 convs read across a band edge reproduce the whole-frame decode (float64: to 1e-12,
    # summation order only), and no conv computes a row twice or a row that is thrown away.
    vae = copy.deepcopy(tiny).double()
    assert wan_vae_bands.decode_halo(vae) == 6  # head + 6 convs at 4x -> 4 at 2x, + 6 convs -> 10 at 2x -> 6 at the split
    g = torch.Generator().manual_seed(21)
    # (2, 16, 2, 9, 7) x 4: 18 split rows -> bands of 4, 5, 9 rows (a last band no taller than the halo is merged)
    for shape, bands in (((1, 16, 3, 12, 6), 2), ((1, 16, 3, 12, 6), 3), ((2, 16, 2, 9, 7), 4), ((1, 16, 1, 7, 5), 2),
                         ((1, 16, 2, 13, 3), 5), ((1, 16, 2, 12, 5), 24)):  # the last: 1-row bands
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        ref = vae.decode(z, bands=1)
        assert (vae.decode(z, bands=bands) - ref).abs().max().item() < 1e-12, (shape, bands)
    assert wan_vae_bands.decode_band_rows(18, 4, 6) == [(0, 4), (4, 9), (9, 18)]
    assert wan_vae_bands.decode_band_rows(24, 1, 6) == [(0, 24)]
    # every output row of every banded conv exactly once per frame (whole frames: rows x frames)
    rows_done = _count_banded_rows(monkeypatch)
    z = torch.randn(1, 16, 2, 12, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vae.decode(z, bands=3), vae.decode(z, bands=1), rtol=0, atol=1e-12)
    head = vae.decoder.head[2]
    assert rows_done.pop(id(head)) == 5 * 96  # 5 frames of 96 rows
    convs = [m for layer in vae.decoder.upsamples[vae.decode_split()[0] + 1:] if isinstance(layer, wan_vae.ResidualBlock)
             for m in (layer.residual[2], layer.residual[6])]
    assert sorted(rows_done) == sorted(id(m) for m in convs)
    assert sorted(set(rows_done.values())) == [5 * 48, 5 * 96]  # 48-row convs at 2x, 96-row at 4x


def test_banded_decode_fp32_matches_and_auto_policy(tiny, monkeypatch):
    z = torch.randn(1, 16, 2, 10, 6, generator=torch.Generator().manual_seed(22))
    torch.testing.assert_close(tiny.decode(z, bands=3), tiny.decode(z, bands=1), rtol=0, atol=2e-6)
    # auto: bands of >= 3 x halo split rows (halo 6; split rows = 2 x latent rows), else whole frames
    assert wan_vae_plan.auto_bands(tiny, (1, 16, 2, 8, 6)) == 1
    assert wan_vae_plan.auto_bands(tiny, (1, 16, 2, 9, 6)) == 1
    assert wan_vae_plan.auto_bands(tiny, (1, 16, 2, 18, 6)) == 2
    assert wan_vae_plan.auto_bands(tiny, (1, 16, 2, 30, 6)) == 3
    # a long video: the kept front frames of a banded decode outweigh what the bands save -> whole frames
    long = (1, 16, 21, 30, 6)
    assert tiny.estimate_decode_bytes(long, bands=3) > tiny.estimate_decode_bytes(long)
    assert wan_vae_plan.auto_bands(tiny, long) == 1
    calls = []
    real = wan_vae_bands.decode_banded
    monkeypatch.setattr(wan_vae_bands, "decode_banded", lambda vae, z, b, out: calls.append(b) or real(vae, z, b, out))
    tall = torch.randn(1, 16, 1, 30, 2, generator=torch.Generator().manual_seed(23))
    tiny.decode(tall)
    assert calls == [3]
    tiny.decode(tall, callback=lambda i, f: None)  # a per-frame callback streams whole frames
    assert calls == [3]
    with pytest.raises(ValueError, match="callback needs bands=1"):
        tiny.decode(tall, bands=2, callback=lambda i, f: None)
    with pytest.raises(ValueError, match="bands must be"):
        tiny.decode(tall, bands=0)
    # a bf16 VAE given fp32 latents decodes them in its dtype, banded as whole
    bf16 = random_wan_vae("tiny", seed=1, dtype=torch.bfloat16)
    zb = z[:, :, :, :, :4]
    assert torch.equal(bf16.decode(zb, bands=2), bf16.decode(zb.bfloat16(), bands=2))


# Run in a fresh process: peak resident memory above the baseline (the kernel's high-water mark, reset
# through /proc/self/clear_refs after gc + malloc_trim) of a decode, next to the estimate.
def test_memory_estimate_against_measured_peak(tmp_path):
    # The planner divides the free memory by ALLOC_MARGIN because the process peak exceeds the live tensor
    # bytes the estimate counts (allocator fragmentation, oneDNN scratch). Bound: the measured peak RSS
    # above the baseline lies in [0.5, ALLOC_MARGIN] x the estimate, for whole frames and for row bands
    # (measured 1.1-1.4x here: 256 px, 5 frames, tiny preset, one thread).
    from vae_peak import decode_peaks

    for (_tile, bands), peak, estimate in decode_peaks(tmp_path, "wan_vae", "random_wan_vae", (1, 16, 2, 32, 32),
                                                       ((None, 1), (None, 3))):
        assert estimate > 16 * 2 ** 20, estimate  # large enough that tensors, not the interpreter, dominate
        assert 0.5 * estimate <= peak <= wan_vae_plan.ALLOC_MARGIN * estimate, (bands, peak, estimate)


# ---------------------------------------------------------------------------------------------- latents
def test_latent_normalisation_is_comfyui_wan21():
    # ComfyUI latent_formats.Wan21: process_in = (x - mean) * scale_factor / std, scale_factor 1.0
    mean = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]).view(1, 16, 1, 1, 1)
    std = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]).view(1, 16, 1, 1, 1)
    z = torch.randn(2, 16, 3, 4, 5)
    torch.testing.assert_close(wan_vae.normalize_latent(z), (z - mean) * 1.0 / std)
    torch.testing.assert_close(wan_vae.denormalize_latent(z), z * std / 1.0 + mean)
    torch.testing.assert_close(wan_vae.denormalize_latent(wan_vae.normalize_latent(z)), z)
    with pytest.raises(ValueError, match="16 channels"):
        wan_vae.normalize_latent(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------- loading
def _save_safetensors(sd, path, prefix=""):
    from safetensors.torch import save_file

    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("safetensors", "first_stage_model."),
                                        ("pth", ""), ("pth", "vae.")])
def test_load_formats_and_prefixes(tiny, tmp_path, fmt, prefix):
    sd = tiny.state_dict()
    path = tmp_path / f"vae.{fmt}"
    if fmt == "safetensors":
        _save_safetensors(sd, path, prefix)
    else:
        torch.save({prefix + k: v for k, v in sd.items()}, path)
    model = load_wan_vae(path)
    assert model.cfg == tiny.cfg and model.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sd.values()))
    if prefix == "vae.":
        z = torch.randn(1, 16, 2, 2, 2)
        assert torch.equal(model.decode(z), tiny.decode(z))


def test_load_keeps_or_converts_dtype(tiny, tmp_path):
    path = tmp_path / "vae_fp16.safetensors"
    _save_safetensors({k: v.half() for k, v in tiny.state_dict().items()}, path)
    assert load_wan_vae(path).dtype == torch.float16
    bf = load_wan_vae(path, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in bf.state_dict().values())
    out = bf.decode(torch.randn(1, 16, 2, 2, 2))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bf16_decode_close_to_fp32(tiny):
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    ref = tiny.decode(z)
    low = random_wan_vae("tiny", seed=1, dtype=torch.bfloat16).decode(z)
    assert (low.float() - ref).abs().mean().item() < 0.05


def test_truncated_safetensors_is_refused(tiny, tmp_path):
    path = tmp_path / "cut.safetensors"
    _save_safetensors(tiny.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_wan_vae(path)


def test_wrong_shapes_are_reported_with_file_and_key(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd["decoder.head.2.weight"] = torch.zeros(3, 8, 3, 3, 1)
    del sd["decoder.middle.1.proj.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    _save_safetensors(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(path)
    msg = str(err.value)
    for needle in ("bad.safetensors", "decoder.head.2.weight", "decoder.middle.1.proj.bias", "decoder.extra.weight"):
        assert needle in msg


def test_dit_checkpoint_is_refused_as_vae(tmp_path):
    sd = {"head.modulation": torch.zeros(1, 2, 8), "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
          "blocks.0.modulation": torch.zeros(1, 6, 8), "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2)}
    path = tmp_path / "wan_dit.safetensors"
    _save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match=r"wan_dit\.safetensors.*DiT"):
        load_wan_vae(path)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_pth_with_pickled_object_is_refused_and_not_executed(tiny, tmp_path):
    marker = tmp_path / "executed"
    _Payload.marker = str(marker)
    sd = dict(tiny.state_dict())
    sd["evil"] = _Payload()
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(sd, f)  # a legacy pickle holding an object
    torch.save(sd, tmp_path / "evil_zip.pth")
    marker.unlink(missing_ok=True)
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match=p.name):
            load_wan_vae(p)
    assert not marker.exists()


def test_wan22_vae_is_named(tmp_path):
    sd = {wan_vae.ANCHOR: torch.ones(8, 1, 1, 1), wan_vae.WAN22_KEY: torch.zeros(8, 8, 3, 3, 3)}
    path = tmp_path / "wan22.safetensors"
    _save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match="Wan2.2"):
        load_wan_vae(path)


def test_bad_inputs_are_clear(tiny):
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        tiny.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="overlap"):
        tiny.decode(torch.zeros(1, 16, 1, 4, 4), tiling="on", tile=(4, 3))


@pytest.mark.cuda
def test_cuda_decode_matches_cpu(tiny):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(12))
    gpu = random_wan_vae("tiny", seed=1, device="cuda")
    torch.testing.assert_close(gpu.decode(z).cpu(), tiny.decode(z), rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu.decode(z, tiling="on", tile=(2, 1)).cpu(),
                               tiny.decode(z, tiling="on", tile=(2, 1)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_subpixel_upsample_conv_equals_nearest_upsample_then_conv(layout):
    # the sub-pixel form of Resample's upsampling (NHWC on the CPU engine, NCHW as on CUDA)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), w, b, padding=1)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    out = wan_vae_layout.upsample2x_conv3x3(x, w, b, channels_last=layout == "nhwc")
    assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-12
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")


def test_band_upsampling_rows_equal_slices_of_the_whole_frame():
    # wan_vae_bands.up_rows: any output row window [lo, hi) (lo even) from just the low-res rows it reads
    g = torch.Generator().manual_seed(6)
    up = wan_vae.Resample(6, "upsample2d").double()
    with torch.no_grad():
        for p in up.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(1, 6, 9, 4, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = up.spatial(x, True)
        for lo, hi in ((0, 18), (0, 5), (4, 11), (6, 18), (10, 17), (16, 18), (2, 3)):
            a, b = max(0, lo // 2 - 1), min(9, hi // 2 + 1)
            pieces = [x[:, :, a:a + 1], x[:, :, a + 1:b]] if b - a > 1 else [x[:, :, a:b]]  # split like carried + own
            got = wan_vae_bands.up_rows(up, pieces, 9, lo, hi, True)
            assert (got - whole[:, :, lo:hi]).abs().max().item() < 1e-12, (lo, hi)


def test_banded_encode_is_exact_and_computes_every_row_once(tiny, monkeypatch):
    # The encoder's first stage (conv1, full-resolution blocks, first downsampling) is local in space;
    # bands carrying their edge rows reproduce the whole-frame encode (float64: summation order only),
    # and each conv computes each of its rows once.
    vae = copy.deepcopy(tiny).double()
    assert wan_vae_bands.encode_needs(vae) == {2: 0, 1: 1, 0: 3, "conv1": 5}
    g = torch.Generator().manual_seed(31)
    for shape, bands in (((1, 3, 9, 256, 24), 3), ((1, 3, 5, 256, 16), 2), ((2, 3, 5, 192, 16), 4),
                         ((1, 3, 1, 256, 8), 3), ((1, 3, 9, 128, 8), 8), ((1, 3, 5, 64, 8), 16)):
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
        ref = vae.encode(x, bands=1)
        assert (vae.encode(x, bands=bands) - ref).abs().max().item() < 1e-12, (shape, bands)
    # edges (split rows, 1/2 resolution) sit where the bands' full-resolution rows are equal: band 0
    # computes 6 rows past its end there, so [0, 86), [86, 170), [170, 256) at full resolution
    assert wan_vae_bands.encode_band_rows(vae, 128, 3) == [(0, 40), (40, 82), (82, 128)]
    assert wan_vae_bands.encode_band_rows(vae, 4, 3) == [(0, 4)]  # a last band within the reach is merged
    rows_done = _count_banded_rows(monkeypatch)
    x = torch.rand(1, 3, 5, 256, 16, generator=g, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(vae.encode(x, bands=3), vae.encode(x, bands=1), rtol=0, atol=1e-12)
    enc = vae.encoder
    banded = [enc.conv1] + [m for layer in enc.downsamples[:vae.encode_split()]
                            for m in (layer.residual[2], layer.residual[6])]
    assert rows_done == {id(m): 5 * 256 for m in banded}  # 5 frames x 256 rows, each exactly once


def test_banded_encode_matches_diffusers(tiny, tiny_ref):
    x = torch.rand(1, 3, 5, 256, 24, generator=torch.Generator().manual_seed(32)) * 2 - 1
    assert wan_vae_bands.encode_auto_bands(x.shape) == 2
    ours = tiny.encode(x)
    with torch.inference_mode():
        ref = tiny_ref.encode(x).latent_dist.mode()
    assert ours.shape == ref.shape == (1, 16, 2, 32, 3)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert wan_vae_bands.encode_auto_bands((1, 3, 5, 248, 24)) == 1  # below 256 px: whole frames
    with pytest.raises(ValueError, match="bands must be"):
        tiny.encode(x, bands=0)


def test_bands_share_one_ring_of_carried_rows_per_layer(tiny, recorded_bands):
    # A layer's carried rows live in one buffer of frames + 1 slots for all bands: band k writes frame n's
    # rows into the slot it read the previous band's frame n - 1 from. Exact with 5 bands (three of them
    # read and write the same ring) in float64.
    vae = copy.deepcopy(tiny).double()
    seen = recorded_bands
    z = torch.randn(1, 16, 3, 13, 4, generator=torch.Generator().manual_seed(43), dtype=torch.float64)
    out = vae.decode(z, bands=5)
    assert len(seen) == 5
    stored = [b.stored for b in seen[:-1]]
    assert seen[-1].stored is None
    frames, rings = 9, stored[0]["rings"]
    assert rings and all(s["rings"] == rings and all(s["rings"][k] is buf for k, buf in rings.items()) for s in stored)
    for k, s in enumerate(stored):
        for key, buf in rings.items():
            assert buf.shape[0] == frames + 1 and len(s[key]) == frames
            for n, (_, v) in enumerate(s[key]):
                assert v.data_ptr() == buf[(n - k) % (frames + 1)].data_ptr(), (k, key, n)
    assert (out - vae.decode(z, bands=1)).abs().max().item() < 1e-12


def test_banded_paths_in_the_nchw_layout(tiny, recorded_bands):
    # The CUDA engine keeps frames NCHW (row slices are then strided); run the same banded code in that
    # layout on the CPU (the model's `channels_last` setting): bands equal whole frames in float64.
    vae = copy.deepcopy(tiny).double()
    vae.channels_last = False
    assert vae.init_state().channels_last is False and tiny.init_state().channels_last is True  # CPU default
    g = torch.Generator().manual_seed(41)
    z = torch.randn(1, 16, 3, 12, 5, generator=g, dtype=torch.float64)
    seen = recorded_bands
    tiny.decode(z.float(), bands=3)
    cl = [buf for b in seen if b.stored for buf in b.stored["rings"].values()]
    seen.clear()
    assert (vae.decode(z, bands=3) - vae.decode(z, bands=1)).abs().max().item() < 1e-12
    nchw = [buf for b in seen if b.stored for buf in b.stored["rings"].values()]
    # the setting reaches the engine: its carried rows are allocated NCHW, the default's channels-last
    assert nchw and cl and all(b.is_contiguous() for b in nchw)
    assert all(b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous() for b in cl)
    x = torch.rand(1, 3, 5, 256, 16, generator=g, dtype=torch.float64) * 2 - 1
    assert (vae.encode(x, bands=3) - vae.encode(x, bands=1)).abs().max().item() < 1e-12
    vae_bf16 = copy.deepcopy(tiny).to(torch.bfloat16)  # low precision: the stacked-taps path
    vae_bf16.channels_last = False
    zb = z[:, :, :2, :10, :3].to(torch.bfloat16)
    torch.testing.assert_close(vae_bf16.decode(zb, bands=2).float(), vae_bf16.decode(zb, bands=1).float(),
                               rtol=0, atol=0.02)  # bf16 rounding of different summation orders only
