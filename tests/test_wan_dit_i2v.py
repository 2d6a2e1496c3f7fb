"""Wan image-to-video DiTs (Wan2.1 I2V/FLF2V with CLIP, Wan2.2 I2V A14B experts without) and Wan2.2 TI2V-5B
(48 channels, per-token timesteps): parity with diffusers' WanTransformer3DModel configured for them (weights
mapped by diffusers' own converter), config detection, real-config key tables, key layouts, expert pairs."""
import json

import pytest
import torch

from twinflow.core.errors import CheckpointError
from twinflow.models import wan_dit as W

from test_wan_dit import REF, _diffusers_model, _padded, _randomize, _rel, _save


def _model(preset, seed):
    model = _randomize(W.random_wan_dit(preset, seed=0), seed=seed)
    with torch.no_grad():  # _randomize scales 1-D weights without "norm" in the name small: make the
        for name in ("img_emb.proj.0.weight", "img_emb.proj.4.weight"):  # img_emb LayerNorms near 1 again
            if name in model.state_dict():
                model.get_parameter(name).add_(1.0)
    return model


def _i2v_x(b, t=3, h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(b, 16, t, h, w, generator=g), torch.rand(b, 4, t, h, w, generator=g).round(),
                      torch.randn(b, 16, t, h, w, generator=g)], dim=1)  # noise, mask, image latent


# --- I2V with CLIP (Wan2.1 I2V 480p/720p, FLF2V) ---

@pytest.mark.parametrize("fold", [True, False])
def test_i2v_matches_diffusers(fold):
    model = _model("i2v-tiny", seed=11)
    model.fold_text_padding = fold
    cfg = model.config
    assert (cfg.kind, cfg.in_dim, cfg.image_dim) == ("i2v", 36, 64)
    ref = _diffusers_model(cfg, model)
    x, t = _i2v_x(2), torch.tensor([999.0, 250.0])
    ctx, clip = torch.randn(2, 7, 4096), torch.randn(2, 257, 64)
    with torch.no_grad():
        expected = ref(x, t, _padded(ctx), encoder_hidden_states_image=clip, return_dict=False)[0]
        got = model(x, t, ctx, clip_fea=clip)
    assert got.shape == expected.shape == (2, 16, 3, 8, 10)
    assert _rel(got, expected) <= 1e-5
    with torch.no_grad():  # the image features really condition the output
        other = model(x, t, ctx, clip_fea=torch.randn(2, 257, 64))
    assert _rel(other, got) > 1e-3


def test_flf2v_matches_diffusers():
    model = _model("flf2v-tiny", seed=12)
    cfg = model.config
    assert cfg.image_pos_tokens == 10 and "img_emb.emb_pos" in model.state_dict()
    ref = _diffusers_model(cfg, model)
    x, t = _i2v_x(2, seed=1), torch.tensor([700.0, 300.0])
    ctx = torch.randn(2, 5, 4096)
    clip = torch.randn(2, 10, 64)  # first and last frame's features concatenated on tokens (ComfyUI's layout)
    with torch.no_grad():
        # diffusers takes the two images as a batch of 2*B, 5 tokens each, consecutive per sample
        expected = ref(x, t, _padded(ctx), encoder_hidden_states_image=clip.reshape(4, 5, 64), return_dict=False)[0]
        got = model(x, t, ctx, clip_fea=clip)
    assert _rel(got, expected) <= 1e-5


def test_i2v_needs_clip_features_and_checks_them():
    model = W.random_wan_dit("i2v-tiny", seed=0)
    x, t, ctx = _i2v_x(1), torch.tensor([500.0]), torch.randn(1, 3, 4096)
    with pytest.raises(ValueError, match="pass clip_fea.*CLIP vision"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="clip_fea must be"):
        model(x, t, ctx, clip_fea=torch.randn(1, 257, 1280))
    with pytest.raises(ValueError, match="noise 16 \\+ mask 4 \\+ image latent 16"):
        model(torch.randn(1, 16, 3, 8, 10), t, ctx, clip_fea=torch.randn(1, 257, 64))
    with torch.no_grad():  # a batch-1 clip_fea broadcasts over the batch
        a = model(_i2v_x(2), torch.tensor([500.0, 500.0]), ctx, clip_fea=torch.ones(1, 257, 64))
        b = model(_i2v_x(2), torch.tensor([500.0, 500.0]), ctx, clip_fea=torch.ones(2, 257, 64))
    assert _rel(a, b) < 1e-6  # (other GEMM sizes: float rounding only)


def test_i2v_text_cache_keeps_results():
    model = _model("i2v-tiny", seed=13)
    x, t, ctx, clip = _i2v_x(1), torch.tensor([400.0]), torch.randn(1, 4, 4096), torch.randn(1, 257, 64)
    clip2 = torch.randn(1, 257, 64)
    with torch.no_grad():
        want, want2 = model(x, t, ctx, clip_fea=clip), model(x, t, ctx, clip_fea=clip2)
        with model.text_cache():
            assert torch.equal(model(x, t, ctx, clip_fea=clip), want)
            assert torch.equal(model(x, t, ctx, clip_fea=clip2), want2)  # image K/V are never cached


@pytest.mark.parametrize("preset", ["i2v-tiny", "ti2v-tiny"])
def test_bf16_close_to_fp32_diffusers(preset):
    model = _model(preset, seed=18)
    cfg = model.config
    ref = _diffusers_model(cfg, model)
    low = W.wan_dit_from_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, "bf16 dict")
    assert low.patch_embedding.weight.dtype == torch.bfloat16 and low.head.head.weight.dtype == torch.float32
    x = _i2v_x(1, seed=4) if cfg.in_dim == 36 else torch.randn(1, 48, 3, 8, 10)
    t = torch.tensor([400.0]) if cfg.in_dim == 36 else _ti2v_t(1, (3, 4, 5), rest=(400.0,))
    ctx = torch.randn(1, 6, 4096)
    clip = torch.randn(1, 257, cfg.image_dim) if cfg.image_dim else None
    with torch.no_grad():
        extra = {} if clip is None else {"encoder_hidden_states_image": clip}
        expected = ref(x, t, _padded(ctx), return_dict=False, **extra)[0]
        got = low(x, t, ctx, clip_fea=clip)
    assert got.dtype == torch.float32 and _rel(got, expected) < 3e-2


# --- I2V without CLIP (the Wan2.2 I2V A14B experts) ---

def test_i2v_without_clip_matches_diffusers_and_ignores_clip_fea(caplog):
    model = _model("i2v-noclip-tiny", seed=14)
    cfg = model.config
    assert (cfg.kind, cfg.image_dim) == ("i2v", 0) and not any("img" in k for k in model.state_dict())
    ref = _diffusers_model(cfg, model)
    x, t, ctx = _i2v_x(1, seed=2), torch.tensor([875.0]), torch.randn(1, 6, 4096)
    with torch.no_grad():
        expected = ref(x, t, _padded(ctx), return_dict=False)[0]
        got = model(x, t, ctx)
        with caplog.at_level("INFO"):
            again = model(x, t, ctx, clip_fea=torch.randn(1, 257, 1280))
    assert _rel(got, expected) <= 1e-5
    assert torch.equal(again, got) and "does not use them" in caplog.text


# --- TI2V (Wan2.2 5B): 48 channels, per-token timesteps ---

def _ti2v_t(b, grid, first=0.0, rest=(900.0, 600.0)):
    """Per-token timesteps as diffusers' Wan2.2 TI2V pipeline builds them: the first latent frame (the
    conditioning image) at `first`, the others at the sample's t."""
    f, h, w = grid
    t = torch.tensor(rest[:b]).view(b, 1, 1).expand(b, f, h * w).clone()
    t[:, 0] = first
    return t.reshape(b, f * h * w)


def test_ti2v_matches_diffusers_with_per_token_timesteps():
    model = _model("ti2v-tiny", seed=15)
    cfg = model.config
    assert (cfg.kind, cfg.in_dim, cfg.out_dim, cfg.latent_channels) == ("ti2v", 48, 48, 48)
    ref = _diffusers_model(cfg, model)
    x, ctx = torch.randn(2, 48, 3, 8, 10), torch.randn(2, 7, 4096)
    grid = (3, 4, 5)
    t_tok = _ti2v_t(2, grid)
    with torch.no_grad():
        expected = ref(x, t_tok, _padded(ctx), return_dict=False)[0]
        got = model(x, t_tok, ctx)
        per_frame = model(x, t_tok.view(2, 3, 20)[..., 0], ctx)  # (B, F): ComfyUI's process_timestep layout
        flat = model(x, torch.tensor([900.0, 600.0]), ctx)
        flat_ref = ref(x, torch.tensor([900.0, 600.0]), _padded(ctx), return_dict=False)[0]
    assert got.shape == x.shape
    assert _rel(got, expected) <= 1e-5
    assert torch.equal(per_frame, got)  # the same values reduced to frames: the same computation
    assert _rel(flat, flat_ref) <= 1e-5
    assert _rel(flat, got) > 1e-3  # the first frame's timestep matters


def test_ti2v_timesteps_varying_inside_a_frame_and_constant_ones():
    model = _model("ti2v-tiny", seed=16)
    ref = _diffusers_model(model.config, model)
    x, ctx = torch.randn(1, 48, 2, 4, 6), torch.randn(1, 4, 4096)
    t_tok = torch.linspace(0.0, 999.0, 2 * 2 * 3).view(1, -1)  # every token its own timestep
    with torch.no_grad():
        got = model(x, t_tok, ctx)
        expected = ref(x, t_tok, _padded(ctx), return_dict=False)[0]
        const = model(x, torch.full((1, 12), 321.0), ctx)  # all tokens equal: exactly the (B,) path
        scalar = model(x, torch.tensor([321.0]), ctx)
    assert _rel(got, expected) <= 1e-5
    assert torch.equal(const, scalar)
    with pytest.raises(ValueError, match=r"\(1, 12\) one per patch token or \(1, 2\) one per latent frame"):
        model(x, torch.zeros(1, 5), ctx)


def test_t2v_with_per_frame_timesteps_matches_diffusers():
    """The per-token path is not TI2V-specific: a 16-channel model too (and the (B,) path is unchanged)."""
    model = _model("tiny", seed=17)
    ref = _diffusers_model(model.config, model)
    x, ctx = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 3, 4096)
    t_tok = _ti2v_t(2, (2, 2, 2), first=100.0)
    with torch.no_grad():
        assert _rel(model(x, t_tok, ctx), ref(x, t_tok, _padded(ctx), return_dict=False)[0]) <= 1e-5


# --- real configs: keys and shapes on the meta device against the reference tables ---

def _table(name):
    rows = [line.split("\t") for line in (REF / name).read_text().splitlines() if line.strip()]
    return {r[0]: tuple(json.loads(r[1].replace("(", "[").replace(",)", "]").replace(")", "]"))) for r in rows}


@pytest.mark.parametrize("preset,table,n,params", [
    ("wan2.1-i2v-14b", "wan21_i2v_14b_dit_keys.tsv", 1303, 16_394_878_784),
    ("wan2.2-ti2v-5b", "wan22_ti2v_5b_dit_keys.tsv", 825, 4_999_787_712),
])
def test_real_config_keys_and_shapes_match_reference_table(preset, table, n, params):
    want = _table(table)
    cfg = W.get_config(preset)
    with torch.device("meta"):
        sd = W.WanDiT(cfg).state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(want) == n and got == want
    assert sum(v.numel() for v in sd.values()) == params
    assert W.detect_config(sd) == cfg


def test_a14b_experts_and_flf2v_detect_from_shapes():
    for preset, kind, clip in (("wan2.2-i2v-a14b", "i2v", False), ("wan2.1-14b", "t2v", False),
                               ("wan2.1-flf2v-14b", "i2v", True)):
        cfg = W.get_config(preset)
        with torch.device("meta"):
            sd = W.WanDiT(cfg).state_dict()
        assert W.detect_config(sd) == cfg and (cfg.kind, bool(cfg.image_dim)) == (kind, clip)
    # the I2V expert is the 14B T2V model with 36 input channels: no image keys
    assert set(_table("wan21_i2v_14b_dit_keys.tsv")) - set(sd) == set()
    info = W.model_info(W.get_config("wan2.2-ti2v-5b"))
    assert info["latent_channels"] == 48 and info["latent_format_comfy"] == "wan22" and info["model_kind"] == "ti2v"


def test_image_key_map_matches_reference_and_inverts():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    rows = [line.split("\t") for line in (REF / "wan21_flf2v_dit_official_to_diffusers.tsv").read_text().splitlines()]
    with torch.device("meta"):
        sd = W.WanDiT(W.get_config("wan2.1-flf2v-14b")).state_dict()
    assert {r[0] for r in rows} == set(sd)
    converted = convert_wan_transformer_to_diffusers(dict(sd))
    for official, diff_name, shape in rows:
        assert list(W.from_diffusers_keys({diff_name: 0})) == [official], diff_name
        if official != "img_emb.emb_pos":  # diffusers' single-file converter has no rule for it
            assert converted[diff_name].shape == sd[official].shape
    assert set(W.from_diffusers_keys(converted)) == set(sd)


# --- files: ComfyUI prefix, diffusers layout, expert pairs ---

def _inputs(model, seed=3):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, 4, 6, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g) if cfg.image_dim else None
    return x, torch.tensor([500.0]), torch.randn(1, 3, 4096, generator=g), clip


def _out(model, seed=3):
    x, t, c, clip = _inputs(model, seed)
    with torch.no_grad():
        return model(x, t, c, clip_fea=clip)


@pytest.mark.parametrize("preset", ["i2v-tiny", "ti2v-tiny"])
def test_comfy_prefixed_and_diffusers_files_load(tmp_path, preset):
    model = W.random_wan_dit(preset, seed=4)
    sd = {"model.diffusion_model." + k: v.half() for k, v in model.state_dict().items()}
    loaded = W.load_wan_dit(_save(sd, tmp_path / "comfy.safetensors"), dtype=torch.float32)
    assert loaded.config == model.config
    assert _rel(_out(loaded), _out(model)) < 1e-2  # fp16 storage
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    dsd = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    loaded = W.load_wan_dit(_save(dsd, tmp_path / "diffusion_pytorch_model.safetensors"))
    assert loaded.config == model.config and _rel(_out(loaded), _out(model)) < 1e-6


def test_wan22_expert_pair_loads_and_mismatch_is_named(tmp_path):
    high, low = W.random_wan_dit("i2v-noclip-tiny", seed=1), W.random_wan_dit("i2v-noclip-tiny", seed=2)
    ph = _save({"model.diffusion_model." + k: v for k, v in high.state_dict().items()}, tmp_path / "high.safetensors")
    pl = _save({"model.diffusion_model." + k: v for k, v in low.state_dict().items()}, tmp_path / "low.safetensors")
    got_high, got_low = W.load_wan_dit_pair(ph, pl)
    assert got_high.config == got_low.config == W.get_config("i2v-noclip-tiny")
    assert _rel(_out(got_high), _out(high)) < 1e-6 and _rel(_out(got_low), _out(low)) < 1e-6
    assert _rel(_out(got_high), _out(got_low)) > 1e-2  # two different experts
    t2v = _save(W.random_wan_dit("tiny", seed=3).state_dict(), tmp_path / "t2v.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"do not match: high.safetensors is i2v-noclip-tiny \(i2v.*t2v.safetensors is tiny \(t2v"):
        W.load_wan_dit_pair(ph, t2v)


def test_quantized_i2v_file_loads_back(tmp_path):
    swap = pytest.importorskip("twinflow.quant.swap")
    qckpt = pytest.importorskip("twinflow.quant.checkpoint")
    from twinflow.quant.load import load_wan_dit

    model = W.random_wan_dit("i2v-tiny", seed=6)
    quantized, _ = swap.quantize_module(model, swap.Recipe(format="fp8_e4m3_weight_only"))
    path = tmp_path / "q.safetensors"
    qckpt.save_quantized(quantized, path, layout="comfy_scaled_fp8", prefix="model.diffusion_model.")
    loaded = load_wan_dit(path)
    assert loaded.config == model.config
    assert _rel(_out(loaded), _out(quantized)) < 1e-6


def test_frame_timesteps_follow_comfyui_process_timestep():
    """ComfyUI's WAN22.process_timestep, written out: mean(mask, dims (1, 3, 4)) * t per sample, (B, F)."""
    mask = torch.ones(2, 48, 3, 4, 6)
    mask[:, :, 0] = 0.0  # the conditioning first frame is kept
    mask[1, :, 2, :2] = 0.5  # a partial mask: the mean over the frame counts
    t = torch.tensor([900.0, 400.0])
    want = (torch.mean(mask, dim=(1, 3, 4), keepdim=True) * t.view(2, 1, 1, 1, 1)).reshape(2, -1)
    got = W.frame_timesteps(t, mask)
    assert got.shape == (2, 3) and torch.allclose(got, want, rtol=1e-6, atol=0)
    assert got[0].tolist() == [0.0, 900.0, 900.0]
    model = W.random_wan_dit("ti2v-tiny", seed=1)
    with torch.no_grad():  # the model takes them as they come
        assert model(torch.randn(2, 48, 3, 8, 12), got, torch.randn(1, 3, 4096)).shape == (2, 48, 3, 8, 12)


def test_compile_graph_refuses_clip_i2v_models():
    """The exported graph has no clip_fea input: compiling an I2V model with CLIP is refused, not run without it."""
    from twinflow.compiled.export import WanDiTGraph
    from twinflow.core.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="clip_fea"):
        WanDiTGraph(W.random_wan_dit("i2v-tiny"), (2, 8, 8))
    WanDiTGraph(W.random_wan_dit("i2v-noclip-tiny"), (2, 8, 8))  # 36 channels alone are fine
