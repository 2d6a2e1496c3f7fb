"""Image-to-video conditioning (WanImageToVideo, Wan22ImageToVideoLatent, TwinFlow Image to Video) and how the
samplers feed it to the model, against ComfyUI 0.3.64's formulas written out here (comfy_extras/nodes_wan.py,
comfy/model_base.py WAN21.concat_cond / WAN22.process_timestep, comfy/samplers.py KSamplerX0Inpaint). No ComfyUI
needed: a recording fake model shows exactly what the model receives, and the sampled latents are compared with
a reference Euler loop that builds the inputs the way ComfyUI does.
"""
from types import SimpleNamespace

import logging

import pytest
import torch
import torch.nn.functional as F

from twinflow.core.handles import Denoiser
from twinflow.sampling.noise import WAN21_MEAN, WAN21_STD, WAN22_MEAN, WAN22_STD

MEAN16, STD16 = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1), torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
MEAN48, STD48 = torch.tensor(WAN22_MEAN).view(1, 48, 1, 1, 1), torch.tensor(WAN22_STD).view(1, 48, 1, 1, 1)
TEXT = 8


def _core(name):
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]()


def fake_encode(z: int, ratio: int):
    """A deterministic stand-in for VAE.encode: pixels [N,H,W,3] -> (1, z, 1+(N-1)//4, H/r, W/r)."""
    w = torch.linspace(-1, 1, 3 * z).view(z, 3)
    calls = []

    def encode(pixels):
        calls.append(pixels.clone())
        n = pixels.shape[0]
        v = pixels.movedim(-1, 0).unsqueeze(0) * 2 - 1  # (1, 3, N, H, W)
        first, rest = v[:, :, :1], v[:, :, 1:]
        groups = [first] + ([rest.reshape(1, 3, (n - 1) // 4, 4, *v.shape[-2:]).mean(3)] if n > 1 else [])
        v = torch.cat(groups, 2)
        v = F.avg_pool3d(v, (1, ratio, ratio))
        return torch.einsum("zc,bcthw->bzthw", w, v) + 0.3

    encode.calls = calls
    return encode


class ClipOut(SimpleNamespace):
    pass


def _cond(seed, length=5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, TEXT, generator=g), {"pooled_output": None}]]


# ------------------------------------------------------------------------------------------------ the nodes


def test_wan_image_to_video_is_comfyuis_formula(monkeypatch):
    """Start image 40x24 (other aspect ratio) -> 32x32 x 9 frames: ComfyUI centre-crops to 24x24 (x offset
    round((40 - 24)/2) = 8), resizes bilinearly, pads with 0.5 grey, encodes all 9 frames, masks the first
    latent frame; the same values go on both conditionings; the inputs are not mutated."""
    from twinflow.nodes import core_wan

    enc = fake_encode(16, 8)
    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: enc)
    img = torch.rand(1, 24, 40, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = _cond(1), _cond(2, 7)
    cvo = ClipOut(penultimate_hidden_states=torch.randn(1, 5, 1280))
    p, n, lat = _core("WanImageToVideo").execute(pos, neg, object(), 32, 32, 9, 2, start_image=img,
                                                 clip_vision_output=cvo)
    assert lat["samples"].shape == (2, 16, 3, 4, 4) and not lat["samples"].any() and set(lat) == {"samples"}
    ref_start = F.interpolate(img.movedim(-1, 1)[:, :, :, 8:32], size=(32, 32), mode="bilinear").movedim(1, -1)
    ref_pixels = torch.full((9, 32, 32, 3), 0.5)
    ref_pixels[:1] = ref_start
    torch.testing.assert_close(enc.calls[0], ref_pixels, rtol=0, atol=0)
    ref_mask = torch.ones(1, 1, 3, 4, 4)
    ref_mask[:, :, :1] = 0
    for out, src in ((p, pos), (n, neg)):
        assert torch.equal(out[0][0], src[0][0]) and set(src[0][1]) == {"pooled_output"}
        d = out[0][1]
        assert torch.equal(d["concat_latent_image"], enc(ref_pixels)) and torch.equal(d["concat_mask"], ref_mask)
        assert d["clip_vision_output"] is cvo and d["pooled_output"] is None
    # 5 start frames cover latent frames 0 and 1 (ComfyUI: mask[:, :, :((5 - 1) // 4) + 1] = 0)
    p, _, _ = _core("WanImageToVideo").execute(pos, neg, object(), 32, 32, 9, 1, start_image=img.repeat(5, 1, 1, 1))
    assert p[0][1]["concat_mask"][0, 0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert "clip_vision_output" not in p[0][1]
    # no start image, no clip: the conditioning passes through unchanged
    p, n, lat = _core("WanImageToVideo").execute(pos, neg, object(), 32, 32, 9, 1)
    assert p == [[pos[0][0], pos[0][1]]] and lat["samples"].shape == (1, 16, 3, 4, 4)


def test_wan22_image_to_video_latent_is_comfyuis_formula(monkeypatch):
    from twinflow.nodes import core_wan

    enc = fake_encode(48, 16)
    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: enc)
    node = _core("Wan22ImageToVideoLatent")
    (lat,) = node.execute(object(), 64, 32, 9, 3)  # no start image: ComfyUI ignores batch_size
    assert set(lat) == {"samples"} and lat["samples"].shape == (1, 48, 3, 2, 4) and not lat["samples"].any()
    img = torch.rand(1, 32, 64, 3, generator=torch.Generator().manual_seed(3))
    (lat,) = node.execute(object(), 64, 32, 9, 2, start_image=img)
    given = enc(img)  # same size: the resize is exact
    ref = torch.zeros(1, 48, 3, 2, 4)
    ref[:, :, :1] = given
    mask = torch.ones(1, 1, 3, 2, 4)
    mask[:, :, :1] = 0
    ref = (ref * STD48 + MEAN48) * mask + ref * (1 - mask)  # Wan22.process_out where the mask denoises
    torch.testing.assert_close(lat["samples"], ref.repeat(2, 1, 1, 1, 1), rtol=0, atol=1e-6)
    assert torch.equal(lat["noise_mask"], mask.repeat(2, 1, 1, 1, 1))


def test_wan22_latent_refuses_a_wan21_vae(monkeypatch):
    from twinflow.nodes import core_wan

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(16, 8))
    with pytest.raises(ValueError, match="Wan2.2 VAE"):
        _core("Wan22ImageToVideoLatent").execute(object(), 64, 32, 5, 1, start_image=torch.rand(1, 32, 64, 3))


def test_core_nodes_registered_with_comfyuis_inputs():
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    wan = NODE_CLASS_MAPPINGS["WanImageToVideo"].INPUT_TYPES()
    assert list(wan["required"]) == ["positive", "negative", "vae", "width", "height", "length", "batch_size"]
    assert list(wan["optional"]) == ["clip_vision_output", "start_image"]
    assert [wan["required"][k][1]["default"] for k in ("width", "height", "length", "batch_size")] == [832, 480, 81, 1]
    assert NODE_CLASS_MAPPINGS["WanImageToVideo"].RETURN_TYPES == ("CONDITIONING", "CONDITIONING", "LATENT")
    w22 = NODE_CLASS_MAPPINGS["Wan22ImageToVideoLatent"].INPUT_TYPES()
    assert [w22["required"][k][1]["default"] for k in ("width", "height", "length", "batch_size")] == [1280, 704, 49, 1]
    assert w22["required"]["width"][1]["step"] == 32 and list(w22["optional"]) == ["start_image"]


# ----------------------------------------------------------------------------------- what the model receives


class Recorder(torch.nn.Module):
    """A velocity 'model' that depends on every input it gets, and records each call."""

    def __init__(self, latent_channels: int):
        super().__init__()
        self.c = latent_channels
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t, context, clip_fea=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(),
                           "clip_fea": None if clip_fea is None else clip_fea.clone()})
        return reference_velocity(x, t, context, clip_fea, self.c, self.w)


def reference_velocity(x, t, context, clip_fea, c, w=0.5):
    b = x.shape[0]
    extra = x[:, c:].mean(1, keepdim=True) if x.shape[1] > c else torch.zeros(())
    tt = t.view(b, -1)
    per_frame = tt.view(b, x.shape[2], -1)[..., 0] if tt.shape[1] > 1 else tt.expand(b, x.shape[2])
    v = w * x[:, :c] + 0.2 * torch.tanh(extra) + 1e-3 * per_frame.view(b, 1, -1, 1, 1)
    v = v + context.mean(dim=(1, 2)).view(b, 1, 1, 1, 1)
    if clip_fea is not None:
        v = v + 0.1 * clip_fea.mean(dim=(1, 2)).view(b, 1, 1, 1, 1)
    return v


def i2v_model(clip: bool = True, shift: float = 5.0) -> Denoiser:
    return Denoiser(module=Recorder(16), family="wan_dit", in_channels=36, text_dim=TEXT, name="fake-i2v",
                    config=SimpleNamespace(patch_size=(1, 2, 2)),
                    info={"latent_channels": 16, "clip_vision": clip, "sampling_shift": shift,
                          "latent_format": "wan21"})


def ti2v_model(shift: float = 5.0) -> Denoiser:
    return Denoiser(module=Recorder(48), family="wan_dit", in_channels=48, text_dim=TEXT, name="fake-ti2v",
                    config=SimpleNamespace(patch_size=(1, 2, 2)),
                    info={"latent_channels": 48, "clip_vision": False, "sampling_shift": shift,
                          "latent_format": "wan22"})


def _euler_sigmas(steps, shift):
    from twinflow.sampling.ksampler import advanced_sigmas

    return advanced_sigmas("simple", steps, shift, "euler")


def _comfy_noise(shape, seed):
    return torch.randn(shape, generator=torch.manual_seed(seed))  # comfy.sample.prepare_noise


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_ksampler_builds_the_i2v_input_as_comfyui(monkeypatch, cfg):
    """WanImageToVideo -> KSampler (euler): the model sees cat(noise, 4 x (1 - mask), process_in(image latent)),
    clip_fea = penultimate_hidden_states for positive and negative, both as one CFG batch of 2; the sampled
    latent equals a reference Euler loop with ComfyUI's input building and CFG on x0."""
    from twinflow.nodes import core_wan

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(16, 8))
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    cvo = ClipOut(penultimate_hidden_states=torch.randn(1, 5, 1280, generator=torch.Generator().manual_seed(5)))
    pos, neg = _cond(1), _cond(2)
    p, n, lat = _core("WanImageToVideo").execute(pos, neg, object(), 32, 32, 9, 1, start_image=img,
                                                 clip_vision_output=cvo)
    model = i2v_model()
    (out,) = _core("KSampler").sample(model, 7, 3, cfg, "euler", "simple", p, n, lat, 1.0)

    concat = p[0][1]["concat_latent_image"]
    mask = p[0][1]["concat_mask"]
    ref_extra = torch.cat([(1 - mask).repeat(1, 4, 1, 1, 1), (concat - MEAN16) / STD16], 1)  # (1, 20, 3, 4, 4)
    calls = model.module.calls
    assert len(calls) == 3
    for c in calls:
        b = 2 if cfg != 1 else 1
        assert c["x"].shape == (b, 36, 3, 4, 4)
        torch.testing.assert_close(c["x"][:, 16:], ref_extra.expand(b, -1, -1, -1, -1), rtol=1e-6, atol=1e-6)
        assert torch.equal(c["clip_fea"], cvo.penultimate_hidden_states.expand(b, -1, -1))
        assert torch.equal(c["context"][0], pos[0][0][0])
        if b == 2:
            assert torch.equal(c["context"][1], neg[0][0][0])

    sigmas = _euler_sigmas(3, 5.0)
    x = sigmas[0] * _comfy_noise((1, 16, 3, 4, 4), 7)
    clip = cvo.penultimate_hidden_states
    for i in range(3):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        xc = torch.cat([x, ref_extra], 1)
        t = torch.full((1,), s * 1000.0)
        den_c = x - s * reference_velocity(xc, t, pos[0][0], clip, 16)
        den_u = x - s * reference_velocity(xc, t, neg[0][0], clip, 16)
        den = den_u + (den_c - den_u) * cfg if cfg != 1 else den_c
        x = x + (x - den) / s * (s1 - s)
    torch.testing.assert_close(out["samples"], x * STD16 + MEAN16, rtol=1e-5, atol=1e-5)


def test_ti2v_noise_mask_and_per_token_timestep_as_comfyui(monkeypatch):
    """Wan22ImageToVideoLatent with a start image -> KSampler (euler, cfg 2): before each call the first latent
    frame is set to the clean image latent (WAN22.scale_latent_inpaint), the prediction there is replaced by it
    (KSamplerX0Inpaint), and the timestep is 0 on the first frame's tokens and sigma*1000 on the others
    (WAN22.process_timestep, spread over H/2 * W/2 tokens per frame)."""
    from twinflow.nodes import core_wan

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(48, 16))
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    (lat,) = _core("Wan22ImageToVideoLatent").execute(object(), 64, 64, 9, 1, start_image=img)
    model = ti2v_model()
    pos, neg = _cond(1), _cond(2)
    (out,) = _core("KSampler").sample(model, 11, 3, 2.0, "euler", "simple", pos, neg, lat, 1.0)

    sigmas = _euler_sigmas(3, 5.0)
    lat_in = (lat["samples"] - MEAN48) / STD48  # non-empty latent: process_in
    m = lat["noise_mask"].repeat(1, 48, 1, 1, 1)
    noise = _comfy_noise(lat["samples"].shape, 11)
    x = sigmas[0] * noise + (1 - sigmas[0]) * lat_in
    calls = model.module.calls
    for i in range(3):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        xi = x * m + lat_in * (1 - m)
        t = (torch.mean(m, dim=(1, 3, 4)) * s * 1000.0).repeat_interleave(2 * 2, dim=1)  # (1, T * tokens/frame)
        assert calls[i]["t"].shape == (2, 12) and torch.equal(calls[i]["t"], t.expand(2, -1))
        assert calls[i]["t"][0, :4].abs().max() == 0 and calls[i]["x"].shape == (2, 48, 3, 4, 4)
        den_c = xi - s * reference_velocity(xi, t, pos[0][0], None, 48)
        den_u = xi - s * reference_velocity(xi, t, neg[0][0], None, 48)
        den = den_u + (den_c - den_u) * 2.0
        den = den * m + lat_in * (1 - m)
        x = x + (x - den) / s * (s1 - s)
    torch.testing.assert_close(out["samples"], x * STD48 + MEAN48, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["samples"][:, :, :1], lat["samples"][:, :, :1], rtol=0, atol=1e-5)


def test_ti2v_without_start_image_runs_a_plain_timestep(monkeypatch):
    from twinflow.nodes import core_wan

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(48, 16))
    (lat,) = _core("Wan22ImageToVideoLatent").execute(object(), 64, 64, 5, 1)
    model = ti2v_model()
    _core("KSampler").sample(model, 1, 2, 1.0, "euler", "simple", _cond(1), _cond(2), lat, 1.0)
    assert all(c["t"].shape == (1,) for c in model.module.calls)


# -------------------------------------------------------------------------------------------- clear errors


def _i2v_inputs(monkeypatch, clip=True):
    from twinflow.nodes import core_wan

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(16, 8))
    cvo = ClipOut(penultimate_hidden_states=torch.randn(1, 5, 1280)) if clip else None
    return _core("WanImageToVideo").execute(_cond(1), _cond(2), object(), 32, 32, 5, 1,
                                            start_image=torch.rand(1, 32, 32, 3), clip_vision_output=cvo)


def test_errors_name_the_missing_or_unusable_conditioning(monkeypatch):
    ks = _core("KSampler")
    empty = {"samples": torch.zeros(1, 16, 2, 4, 4)}
    # an I2V model given text-only conditioning
    with pytest.raises(ValueError, match="no start image.*start_image to WanImageToVideo"):
        ks.sample(i2v_model(), 1, 1, 2.0, "euler", "simple", _cond(1), _cond(2), empty, 1.0)
    # a text-to-video model given a start image
    p, n, lat = _i2v_inputs(monkeypatch, clip=False)
    t2v = Denoiser(module=Recorder(16), family="wan_dit", in_channels=16, text_dim=TEXT,
                   info={"sampling_shift": 5.0, "latent_format": "wan21"})
    with pytest.raises(ValueError, match="carries a start image.*takes none"):
        ks.sample(t2v, 1, 1, 2.0, "euler", "simple", p, n, lat, 1.0)
    # Wan2.1 I2V without its CLIP vision output
    p, n, lat = _i2v_inputs(monkeypatch, clip=False)
    with pytest.raises(ValueError, match="needs a CLIP vision output"):
        ks.sample(i2v_model(clip=True), 1, 1, 2.0, "euler", "simple", p, n, lat, 1.0)
    # the negative conditioning without the image (a hand-made graph) is refused too
    with pytest.raises(ValueError, match="negative.*no start image"):
        ks.sample(i2v_model(clip=False), 1, 1, 2.0, "euler", "simple", p, _cond(2), lat, 1.0)


# ------------------------------------------------------------------------ TwinFlow node and TwinFlow samplers


def test_twinflow_image_to_video_and_sampler_match_the_core_path():
    """TwinFlow Image to Video (Wan2.1 VAE) gives WanImageToVideo's outputs; TwinFlow Sampler on a real tiny Wan
    DiT with 36 input channels gives core KSampler's latent (same seed, cfg, euler, shift)."""
    from twinflow.models import wan_dit, wan_vae
    from twinflow.nodes.sampling import TwinFlowSampler
    from twinflow.nodes.vae import TwinFlowImageToVideo

    vae = wan_vae.random_wan_vae("tiny", seed=3)
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(8))
    pos, neg = _cond(1), _cond(2)
    args = (32, 32, 5, 1)
    p1, n1, l1 = _core("WanImageToVideo").execute(pos, neg, vae, *args, start_image=img)
    p2, n2, l2 = TwinFlowImageToVideo().build(vae, img, *args, positive=pos, negative=neg)
    assert torch.equal(l1["samples"], l2["samples"])
    for a, b in ((p1, p2), (n1, n2)):
        assert torch.equal(a[0][1]["concat_latent_image"], b[0][1]["concat_latent_image"])
        assert torch.equal(a[0][1]["concat_mask"], b[0][1]["concat_mask"])

    cfg = wan_dit.with_config(wan_dit.get_config("tiny"), in_dim=36, text_dim=TEXT)
    model = wan_dit.make_denoiser(wan_dit.random_wan_dit(config=cfg, seed=2), "tiny-i2v")
    model.info.update(latent_channels=16, clip_vision=False, sampling_shift=5.0, latent_format="wan21")
    (core_out,) = _core("KSampler").sample(model, 5, 2, 3.0, "euler", "simple", p1, n1, l1, 1.0)
    tf_out, report = TwinFlowSampler().run(model, l2, 5, 2, 3.0, "euler", "simple", 0.0, 1.0, positive=p2,
                                           negative=n2)
    torch.testing.assert_close(tf_out["samples"], core_out["samples"], rtol=1e-5, atol=1e-6)


def test_twinflow_image_to_video_wan22_branch(monkeypatch):
    """With a 48-channel VAE the TwinFlow node is Wan22ImageToVideoLatent (conditioning passed through)."""
    from twinflow.nodes import vae as vae_nodes

    enc = fake_encode(48, 16)

    class FakeVAE:
        cfg = SimpleNamespace(z_dim=48, spatial_ratio=16)

        def encode(self, video):  # (1, 3, N, H, W) in -1..1
            return enc((video[0].movedim(0, -1) + 1) / 2)

    monkeypatch.setattr(vae_nodes, "as_vae", lambda v: v)
    img = torch.rand(1, 32, 64, 3, generator=torch.Generator().manual_seed(9))
    pos = _cond(1)
    p, n, lat = vae_nodes.TwinFlowImageToVideo().build(FakeVAE(), img, 64, 32, 9, 2, positive=pos)
    assert p is pos and n is None
    from twinflow.sampling.image_cond import wan22_image_to_video_latent

    ref = wan22_image_to_video_latent(enc, 64, 32, 9, 2, img)
    torch.testing.assert_close(lat["samples"], ref["samples"], rtol=0, atol=1e-6)
    assert torch.equal(lat["noise_mask"], ref["noise_mask"])
    with pytest.raises(ValueError, match="no CLIP vision"):
        vae_nodes.TwinFlowImageToVideo().build(FakeVAE(), img, 64, 32, 9, 2, positive=pos,
                                               clip_vision_output=ClipOut(penultimate_hidden_states=torch.zeros(1)))


# ------------------------------------------------------------------------ the templates, headless, end to end

TEMPLATES = {  # template -> (overrides, the VAEDecode node)
    "image_to_video_wan.json": (["50.width=32", "50.height=32", "50.length=5", "3.steps=2"], "8"),
    "video_wan2_2_14B_i2v.json": (["98.width=32", "98.height=32", "98.length=5"], "87"),
    "video_wan2_2_5B_ti2v.json": (["55.width=64", "55.height=64", "55.length=5", "3.steps=2"], "8"),
}


@pytest.fixture(scope="module")
def i2v_files(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    from twinflow.models import clip_vision

    spec = importlib.util.spec_from_file_location("i2v_files", Path(__file__).parent / "fixtures" / "i2v_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("i2v")
    mod.write_i2v_models(root / "models", clip_cfg=clip_vision.PRESETS["tiny"])
    mod.write_images(root / "input")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_i2v_templates_run_headless_unchanged(i2v_files, template, tmp_path, capsys):
    """`twinflow run` on ComfyUI's three image-to-video templates as shipped (tiny random files, widgets for
    size/steps only): exit 0 and decoded frames of the requested size (the ComfyUI comparison is in
    tests/test_comfyui_i2v_oracle.py)."""
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("av")
    import importlib.util
    import json
    from pathlib import Path

    from twinflow.runner.api import Runner

    spec = importlib.util.spec_from_file_location("core_files", Path(__file__).parent / "fixtures" / "core_files.py")
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    from twinflow.core import paths

    overrides, decode = TEMPLATES[template]
    wf = tmp_path / template
    wf.write_text(json.dumps(cf.template(template)))
    with paths.using(input_dir=i2v_files / "input"):
        res = Runner().run(str(wf), overrides=overrides, output_dir=tmp_path / "out", models_dir=i2v_files / "models")
    frames = res.results[decode][0][0]
    size = 64 if "ti2v" in template else 32
    assert frames.shape == (5, size, size, 3) and torch.isfinite(frames).all()
    assert list((tmp_path / "out" / "video").glob("ComfyUI_*_.mp4"))


def test_plan_follows_the_i2v_templates_shapes():
    """`twinflow plan`: WanImageToVideo passes the conditioning on (cfg 6 -> the CFG batch of 2) with a 16-channel
    latent at /8; Wan22ImageToVideoLatent gives 48 channels at /16, batch 1 without its (bypassed) start image."""
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    import importlib.util
    from pathlib import Path

    from twinflow.runner.api import Runner, apply_overrides
    from twinflow.runner.plan import plan_workflow

    spec = importlib.util.spec_from_file_location("core_files", Path(__file__).parent / "fixtures" / "core_files.py")
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    r = Runner()

    def shapes(template, overrides):
        prompt = apply_overrides(r.load(cf.template(template)).prompt, overrides, r.registry)
        return {p["model_node"]: p["shapes"] for p in plan_workflow(prompt)}

    assert shapes("image_to_video_wan.json", TEMPLATES["image_to_video_wan.json"][0])["37"] == \
        [(1, 16, 2, 4, 4), (2, 16, 2, 4, 4)]
    i2v = shapes("video_wan2_2_14B_i2v.json", TEMPLATES["video_wan2_2_14B_i2v.json"][0])
    assert i2v["95"] == i2v["96"] == [(1, 16, 2, 4, 4)]  # cfg 1
    ti2v = shapes("video_wan2_2_5B_ti2v.json", ["55.width=64", "55.height=64", "55.length=5", "55.batch_size=3"])
    assert ti2v["37"] == [(1, 48, 2, 4, 4), (2, 48, 2, 4, 4)] and ti2v["39"] == [(1, 48, 2, 4, 4)]


def test_dual_branch_with_two_i2v_experts_equals_the_two_stage_split(monkeypatch):
    """TwinFlow Dual-Branch Sampler with two I2V experts and a hard switch after step 2 (gate list 1,1,0,0) gives
    the latent of the template's KSamplerAdvanced split (0-2 with leftover noise, then 2-4 without new noise):
    each branch builds its own image inputs from the shared conditioning. Each expert runs only its steps."""
    from twinflow.nodes import core_wan
    from twinflow.nodes.sampling import TwinFlowDualBranchSampler
    from twinflow.sampling.gates import GateSchedule

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(16, 8))
    p, n, lat = _core("WanImageToVideo").execute(_cond(1), _cond(2), object(), 32, 32, 5, 1,
                                                 start_image=torch.rand(1, 32, 32, 3))
    high, low = i2v_model(clip=False), i2v_model(clip=False)
    low.module.w.data.fill_(0.3)
    ksa = _core("KSamplerAdvanced")
    (mid,) = ksa.sample(high, "enable", 9, 4, 3.0, "euler", "simple", p, n, lat, 0, 2, "enable")
    (ref,) = ksa.sample(low, "disable", 0, 4, 3.0, "euler", "simple", p, n, mid, 2, 4, "disable")
    high.module.calls.clear()
    low.module.calls.clear()
    out, _ = TwinFlowDualBranchSampler().run(high, low, GateSchedule(kind="list", values=(1.0, 1.0, 0.0, 0.0)), lat,
                                             9, 4, 3.0, 3.0, "euler", "simple", 0.0, 1.0, "HW", positive=p,
                                             negative=n)
    torch.testing.assert_close(out["samples"], ref["samples"], rtol=1e-5, atol=1e-5)
    assert len(high.module.calls) == 2 and len(low.module.calls) == 2
    assert all(c["x"].shape[1] == 36 for c in high.module.calls + low.module.calls)


def test_twinflow_sampler_honours_the_ti2v_noise_mask_as_ksampler(monkeypatch):
    """The TwinFlow samplers' loop (sampling/dual.py) keeps the start frame and gives the per-frame timestep exactly
    as the core KSampler path, which the reference loop above checks against ComfyUI's formulas."""
    from twinflow.nodes import core_wan
    from twinflow.nodes.sampling import TwinFlowSampler

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(48, 16))
    (lat,) = _core("Wan22ImageToVideoLatent").execute(object(), 64, 64, 9, 1, start_image=torch.rand(1, 64, 64, 3))
    model = ti2v_model()
    (ref,) = _core("KSampler").sample(model, 3, 3, 2.0, "uni_pc", "simple", _cond(1), _cond(2), lat, 1.0)
    calls_ks = [c["t"] for c in model.module.calls]
    model.module.calls.clear()
    out, _ = TwinFlowSampler().run(model, lat, 3, 3, 2.0, "uni_pc", "simple", 0.0, 1.0, positive=_cond(1),
                                   negative=_cond(2))
    torch.testing.assert_close(out["samples"], ref["samples"], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, c["t"]) for a, c in zip(calls_ks, model.module.calls))


def test_a_module_without_clip_fea_is_refused_by_name(monkeypatch):
    """A Wan2.1 I2V model whose module takes no clip_fea (a compiled graph) is refused, never run without it."""
    from twinflow.core.errors import UnsupportedError

    class NoClip(torch.nn.Module):
        def forward(self, x, t, context):
            return x[:, :16]

    p, n, lat = _i2v_inputs(monkeypatch, clip=True)
    model = i2v_model(clip=True)
    model.module = NoClip()
    with pytest.raises(UnsupportedError, match="NoClip takes no CLIP vision features"):
        _core("KSampler").sample(model, 1, 1, 2.0, "euler", "simple", p, n, lat, 1.0)


def test_sampler_custom_advanced_takes_the_image_conditioning_as_ksampler(monkeypatch):
    """CFGGuider + SamplerCustomAdvanced on WanImageToVideo's outputs give KSampler's latent (same inputs built)."""
    from twinflow.nodes import core_wan

    monkeypatch.setattr(core_wan, "vae_encoder", lambda vae, where: fake_encode(16, 8))
    cvo = ClipOut(penultimate_hidden_states=torch.randn(1, 5, 1280, generator=torch.Generator().manual_seed(7)))
    p, n, lat = _core("WanImageToVideo").execute(_cond(1), _cond(2), object(), 32, 32, 5, 1,
                                                 start_image=torch.rand(1, 32, 32, 3), clip_vision_output=cvo)
    model = i2v_model()
    (ref,) = _core("KSampler").sample(model, 4, 3, 2.5, "euler", "simple", p, n, lat, 1.0)
    (guider,) = _core("CFGGuider").get_guider(model, p, n, 2.5)
    (sigmas,) = _core("BasicScheduler").get_sigmas(model, "simple", 3, 1.0)
    out, _ = _core("SamplerCustomAdvanced").sample(_core("RandomNoise").get_noise(4)[0], guider,
                                                   _core("KSamplerSelect").get_sampler("euler")[0], sigmas, lat)
    torch.testing.assert_close(out["samples"], ref["samples"], rtol=1e-6, atol=1e-6)


def test_clip_vision_on_a_model_without_image_embedding_is_ignored_and_said(monkeypatch, caplog):
    """A Wan2.2 I2V expert behind WanImageToVideo with CLIP vision wired runs in ComfyUI (its Wan model drops
    clip_fea without an image embedding): the same graph runs here, equal to the run without CLIP vision, and
    a warning says the output was ignored (once)."""
    from twinflow.core.log import forget_once

    forget_once("image_cond.clip_unused")
    ks = _core("KSampler")
    outs = {}
    p1, n1, lat = _i2v_inputs(monkeypatch, clip=True)
    assert all("clip_vision_output" in c[1] for c in p1 + n1)
    p0, n0 = ([[t, {k: v for k, v in d.items() if k != "clip_vision_output"}] for t, d in c] for c in (p1, n1))
    for clip, p, n in ((False, p0, n0), (True, p1, n1)):
        model = i2v_model(clip=False)
        with caplog.at_level(logging.WARNING, logger="twinflow"):
            (outs[clip],) = ks.sample(model, 3, 2, 2.0, "euler", "simple", p, n, lat, 1.0)
        assert all(c["clip_fea"] is None for c in model.module.calls)
    assert torch.equal(outs[True]["samples"], outs[False]["samples"])
    said = [r for r in caplog.records if "has no image embedding" in r.getMessage()]
    assert len(said) == 1 and "ignored, as ComfyUI does" in said[0].getMessage()
