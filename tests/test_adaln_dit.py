"""adaLN-Zero DiT family: exact checkpoint layouts, parity with diffusers' DiTTransformer2DModel, loading.

Oracle: diffusers (test-only extra) with our random weights mapped by the key map of diffusers' own
`scripts/convert_dit_to_diffusers.py` (re-implemented below, it is the oracle side).
"""
from pathlib import Path

import pytest
import torch

from twinflow.core.errors import CheckpointError
from twinflow.models import dit as D

REF = Path(__file__).resolve().parent / "fixtures" / "reference"  # vendored tables (see its README.md)


def _tsv(name):
    path = REF / name
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            k, shape = line.split("\t")
            out[k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("preset,table,layout", [
    ("dit-xl2-256", "dit_xl2_256_keys.tsv", D.LAYOUT_2D),
    ("opensora-v1-xl2", "opensora_v1_dit_xl2_keys.tsv", D.LAYOUT_3D),
])
def test_real_layouts_on_meta(preset, table, layout):
    ref = _tsv(table)
    with torch.device("meta"):
        model = D.AdaLNDiT(D.PRESETS[preset])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    meta_sd = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert D.detect_adaln_layout(meta_sd) == layout
    assert D.detect_adaln_layout({"model.diffusion_model." + k: v for k, v in meta_sd.items()}) == layout
    assert D.config_from_state_dict(meta_sd) == D.PRESETS[preset]


def test_detect_rejects_other_families():
    wan = {"patch_embedding.weight": torch.zeros(1), "head.modulation": torch.zeros(1),
           "blocks.0.self_attn.q.weight": torch.zeros(1)}
    assert D.detect_adaln_layout(wan) is None
    with pytest.raises(CheckpointError, match="not an adaLN-Zero DiT"):
        D.config_from_state_dict(wan, "wan.safetensors")


# ---------------------------------------------------------------------------------------------- tables


def test_sincos_tables_match_diffusers():
    emb = pytest.importorskip("diffusers.models.embeddings")
    ref = emb.get_2d_sincos_pos_embed(32, 6, base_size=6, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(D.sincos_2d(32, 6, 6).float(), ref.float(), rtol=0, atol=1e-6)
    # non-square: diffusers rescales positions to base_size, so build its grid from plain integers
    grid = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(3.0), indexing="xy")).reshape(2, 1, 3, 5)
    ref = emb.get_2d_sincos_pos_embed_from_grid(32, grid, output_type="pt")
    torch.testing.assert_close(D.sincos_2d(32, 3, 5).float(), ref.float(), rtol=0, atol=1e-6)
    ours1 = D.sincos_1d(32, torch.arange(7))
    ref1 = emb.get_1d_sincos_pos_embed_from_grid(32, torch.arange(7).float(), output_type="pt")
    torch.testing.assert_close(ours1.float(), ref1.float(), rtol=0, atol=1e-6)
    t = torch.tensor([0.0, 1.5, 999.0])
    ref_t = emb.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(D.timestep_embedding(t, 256), ref_t, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- diffusers parity


def _randomize(model, seed=1):
    """Random non-zero weights everywhere (adaLN-Zero would make the output trivially 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "embedding_table" in name else 0.15))
    return model


def _to_diffusers(sd, depth):
    """The DiT -> diffusers key map of diffusers' scripts/convert_dit_to_diffusers.py."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[t + "norm1.emb.timestep_embedder.linear_1.weight"] = sd["t_embedder.mlp.0.weight"]
        out[t + "norm1.emb.timestep_embedder.linear_1.bias"] = sd["t_embedder.mlp.0.bias"]
        out[t + "norm1.emb.timestep_embedder.linear_2.weight"] = sd["t_embedder.mlp.2.weight"]
        out[t + "norm1.emb.timestep_embedder.linear_2.bias"] = sd["t_embedder.mlp.2.bias"]
        out[t + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out[t + "norm1.linear.weight"] = sd[b + "adaLN_modulation.1.weight"]
        out[t + "norm1.linear.bias"] = sd[b + "adaLN_modulation.1.bias"]
        for name, w, bias in zip("qkv", sd[b + "attn.qkv.weight"].chunk(3, 0), sd[b + "attn.qkv.bias"].chunk(3, 0)):
            out[t + f"attn1.to_{name}.weight"], out[t + f"attn1.to_{name}.bias"] = w, bias
        out[t + "attn1.to_out.0.weight"] = sd[b + "attn.proj.weight"]
        out[t + "attn1.to_out.0.bias"] = sd[b + "attn.proj.bias"]
        out[t + "ff.net.0.proj.weight"] = sd[b + "mlp.fc1.weight"]
        out[t + "ff.net.0.proj.bias"] = sd[b + "mlp.fc1.bias"]
        out[t + "ff.net.2.weight"] = sd[b + "mlp.fc2.weight"]
        out[t + "ff.net.2.bias"] = sd[b + "mlp.fc2.bias"]
    return out


def _diffusers_dit(cfg, sample_size, num_classes):
    diffusers = pytest.importorskip("diffusers")
    dm = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=sample_size, patch_size=cfg.patch_size[-1], num_embeds_ada_norm=num_classes,
        # The original DiT uses eps 1e-6 in every LayerNorm; diffusers' default for norm3 is 1e-5.
        norm_eps=1e-6).eval()
    for blk in dm.transformer_blocks:
        # diffusers' DiT port divides the frequency exponent by (half - 1); the original DiT (and the
        # released weights) by half. Align the oracle to the original before comparing.
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    return dm


def test_2d_parity_with_diffusers():
    cfg = D.PRESETS["tiny"]
    ours = _randomize(D.init_weights(D.AdaLNDiT(cfg))).eval()
    dm = _diffusers_dit(cfg, cfg.input_size[0], cfg.num_classes)
    dm.load_state_dict(_to_diffusers(ours.state_dict(), cfg.depth), strict=True)
    torch.testing.assert_close(dm.pos_embed.pos_embed, ours.pos_embed, rtol=0, atol=1e-6)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 371.25, 999.0])
    labels = torch.tensor([3, cfg.num_classes, 7])  # incl. the CFG null class
    with torch.no_grad():
        ref = dm(x, timestep=t, class_labels=labels).sample  # (B, 2C, H, W)
        out = ours(x, t, labels)
        out_none = ours(x, t, None)
        ref_none = dm(x, timestep=t, class_labels=torch.full((3,), cfg.num_classes)).sample
    assert out.shape == (3, 4, 8, 8) and ref.shape == (3, 8, 8, 8)
    assert ref[:, :4].abs().max() > 0.1
    assert _rel(out, ref[:, :4]) <= 1e-5
    assert _rel(out_none, ref_none[:, :4]) <= 1e-5


def test_3d_parity_with_diffusers_by_tiling_frames():
    """Open-Sora v1 layout vs diffusers' 2D DiT: attention is permutation-equivariant, so a video whose
    frames are laid side by side as one image gives the same per-token result, provided every token
    carries its (t, h, w) position embedding and the same conditioning vector."""
    cfg = D.PRESETS["tiny-3d"]  # T=4 frames native; use T=2, H=8, W=4 -> a 8x8 image
    ours = _randomize(D.init_weights(D.AdaLNDiT(cfg))).eval()
    b, T, H, W, p = 2, 2, 8, 4, 2
    x = torch.randn(b, 4, T, H, W)
    t = torch.tensor([10.0, 800.0])
    cap = torch.randn(b, 1, cfg.caption_channels)
    sd = ours.state_dict()
    # oracle side: the caption MLP in plain torch, placed as class rows 0..b-1 of diffusers' label table
    y = torch.nn.functional.gelu(torch.nn.functional.linear(cap[:, 0], sd["y_embedder.y_proj.fc1.weight"],
                                                            sd["y_embedder.y_proj.fc1.bias"]), approximate="tanh")
    y = torch.nn.functional.linear(y, sd["y_embedder.y_proj.fc2.weight"], sd["y_embedder.y_proj.fc2.bias"])
    table = torch.zeros(b + 1, cfg.hidden_size)
    table[:b] = y
    sd2 = {**sd, "x_embedder.proj.weight": sd["x_embedder.proj.weight"][:, :, 0],
           "y_embedder.embedding_table.weight": table}
    dm = _diffusers_dit(cfg, H, b)
    dm.load_state_dict(_to_diffusers(sd2, cfg.depth), strict=True)
    # position of token (h, t, w) in the tiled image = spatial(h, w) + temporal(t), from the reference tables
    spatial = D.sincos_2d(cfg.hidden_size, H // p, W // p).float().reshape(H // p, W // p, -1)
    temporal = D.sincos_1d(cfg.hidden_size, torch.arange(T)).float()
    pos = spatial[:, None, :, :] + temporal[None, :, None, :]  # (h, t, w, D)
    dm.pos_embed.pos_embed = pos.reshape(1, -1, cfg.hidden_size)
    tiled = x.permute(0, 1, 3, 2, 4).reshape(b, 4, H, T * W)  # frames side by side along width
    with torch.no_grad():
        ref = dm(tiled, timestep=t, class_labels=torch.arange(b)).sample[:, :4]
        out = ours(x, t, cap)
    ref = ref.reshape(b, 4, H, T, W).permute(0, 1, 3, 2, 4)
    assert _rel(out, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- behaviour


def test_adaln_zero_init_is_identity_and_zero_output():
    torch.manual_seed(0)
    model = D.init_weights(D.AdaLNDiT(D.PRESETS["tiny"]), zero_init=True).eval()
    h = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model.blocks[0](h, c), h)
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([5.0, 6.0]), None)
    assert torch.count_nonzero(out) == 0


def test_2d_model_on_video_matches_per_frame():
    model, cfg = D.random_adaln_dit("tiny", seed=3)
    x = torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([100.0, 700.0])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t, labels)
        frames = [model(x[:, :, i], t, labels) for i in range(3)]
    torch.testing.assert_close(out, torch.stack(frames, 2), rtol=1e-5, atol=1e-6)


def test_3d_native_grid_uses_stored_tables_and_other_grids_recompute():
    model, cfg = D.random_adaln_dit("tiny-3d", seed=2)
    grid = (2, 3, 5)  # fewer frames and a non-native spatial grid
    pos = model._pos(grid, torch.float32, "cpu").reshape(2, 15, -1)
    ref = D.sincos_2d(64, 3, 5).float()[None] + D.sincos_1d(64, torch.arange(2)).float()[:, None]
    torch.testing.assert_close(pos, ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        model.pos_embed_spatial.add_(1.0)  # the stored table is what a native grid uses
    pos2 = model._pos((1, 4, 4), torch.float32, "cpu")
    assert (pos2[0] - D.sincos_2d(64, 4, 4).float() - D.sincos_1d(64, torch.arange(1)).float()).mean() > 0.99


def test_bad_context_errors():
    m2, _ = D.random_adaln_dit("tiny")
    with pytest.raises(TypeError, match="class-conditional"):
        m2(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 7, 64))
    with pytest.raises(ValueError, match="class labels must be in"):
        m2(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.tensor([99]))
    with pytest.raises(ValueError, match="not divisible"):
        m2(torch.randn(1, 4, 7, 8), torch.tensor([1.0]), None)
    m3, _ = D.random_adaln_dit("tiny-3d")
    with pytest.raises(ValueError, match="one pooled caption"):
        m3(torch.randn(1, 4, 2, 8, 8), torch.tensor([1.0]), torch.randn(1, 5, 32))


# ---------------------------------------------------------------------------------------------- loading


def test_load_prefixed_safetensors_pt_and_fp16(tmp_path):
    from safetensors.torch import save_file

    model, cfg = D.random_adaln_dit("tiny-3d", seed=4)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    x, t, cap = torch.randn(1, 4, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 32)
    with torch.no_grad():
        ref = model(x, t, cap)
    heads = {"num_heads": "4"}  # not derivable from shapes: metadata, argument, or DiT's published sizes
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "a.safetensors"), heads)
    torch.save({"model": sd}, tmp_path / "b.pt")
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "c.safetensors"), heads)
    D.save_adaln_dit(model, tmp_path / "d.safetensors")
    for name in ("a.safetensors", "b.pt", "d.safetensors"):
        loaded, lcfg = D.load_adaln_dit(tmp_path / name, num_heads=4 if name.endswith(".pt") else None)
        assert lcfg == cfg
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t, cap), ref, rtol=1e-5, atol=1e-6)
    half, _ = D.load_adaln_dit(tmp_path / "c.safetensors")
    assert half.blocks[0].attn.qkv.weight.dtype == torch.float16
    with torch.no_grad():
        out = half(x, t, cap)
    assert out.dtype == torch.float32 and _rel(out, ref) < 5e-2
    bf, _ = D.load_adaln_dit(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    assert bf.final_layer.linear.weight.dtype == torch.bfloat16
    assert bf.pos_embed_spatial.dtype == torch.float32  # position tables stay fp32 when casting
    with torch.no_grad():
        assert _rel(bf(x, t, cap), ref) < 5e-2


def test_bad_files(tmp_path):
    from safetensors.torch import save_file

    model, _ = D.random_adaln_dit("tiny", seed=5)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    save_file(broken, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): blocks.1.mlp.fc2.bias"):
        D.load_adaln_dit(tmp_path / "missing.safetensors")
    save_file({"encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3), "decoder.head.2.bias": torch.zeros(3)},
              str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not an adaLN-Zero DiT"):
        D.load_adaln_dit(tmp_path / "vae.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "missing.safetensors").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        D.load_adaln_dit(tmp_path / "trunc.safetensors")


def test_make_denoiser_velocity_call():
    model, cfg = D.random_adaln_dit("tiny-3d", seed=6)
    den = D.make_denoiser(model, cfg, name="x")
    assert den.family == "dit" and den.in_channels == 4 and den.text_dim == 32
    with torch.no_grad():
        v = den.velocity(torch.randn(1, 4, 2, 8, 8), torch.tensor(0.5), torch.randn(1, 1, 32))
    assert v.shape == (1, 4, 2, 8, 8) and torch.isfinite(v).all()


# ---------------------------------------------------------------------------------------------- eps -> velocity


def test_ddpm_schedule_matches_diffusers_and_vp_step_inverts_it():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    abar = D.ddpm_linear_alphas_cumprod()
    torch.testing.assert_close(abar, ref, rtol=1e-6, atol=0)
    wrap = D.EpsToVelocity(torch.nn.Identity())
    k = torch.tensor([0, 1, 17, 500, 998, 999])
    a, b = abar[k].sqrt(), (1 - abar[k]).sqrt()  # (float64; diffusers' table is float32)
    sigma = b / (a + b)  # the flow sigma whose scaled state is the VP state of step k
    tau, c, a2, b2 = wrap.vp_step(sigma)
    torch.testing.assert_close(tau, k.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(a2, a, rtol=1e-9, atol=0)


def test_eps_to_velocity_closed_form():
    """An oracle epsilon model that returns the true noise gives the true velocity n - x0 exactly."""
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([0.05, 0.5, 0.93], dtype=torch.float64)
    xs = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    seen = {}

    class Oracle(torch.nn.Module):
        def forward(self, x_in, tau, context):
            seen["x_in"], seen["tau"] = x_in, tau
            return noise.float()

    wrap = D.EpsToVelocity(Oracle())
    v = wrap(xs.float(), (sigma * 1000).float(), None)
    torch.testing.assert_close(v.double(), noise - x0, rtol=1e-4, atol=1e-4)
    abar = D.ddpm_linear_alphas_cumprod()
    a = torch.sqrt(torch.exp(torch.lerp(abar.log()[seen["tau"].floor().long()],
                                        abar.log()[seen["tau"].floor().long() + 1], seen["tau"].double().frac())))
    b = torch.sqrt(1 - a ** 2)
    # the inner model saw the VP state a*x0 + b*n at its fractional step
    torch.testing.assert_close(seen["x_in"].double(), a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * noise,
                               rtol=1e-4, atol=1e-4)


def test_make_denoiser_prediction_modes():
    model, cfg = D.random_adaln_dit("tiny", seed=7)
    raw = D.make_denoiser(model, cfg, prediction="raw")
    eps = D.make_denoiser(model, cfg)
    assert raw.module is model and isinstance(eps.module, D.EpsToVelocity) and eps.info["prediction"] == "eps-ddpm-linear"
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        v = eps.velocity(x, torch.tensor(1.0), None)  # sigma = 1 lies beyond the schedule: clamped, finite
    assert torch.isfinite(v).all()
    with pytest.raises(ValueError, match="unknown prediction"):
        D.make_denoiser(model, cfg, prediction="v")
