"""ComfyUI's core Wan node set run headless: each node's semantics against ComfyUI's formulas (written out
here) or an independent implementation (transformers' UMT5 for the text encoder), and ComfyUI's
`text_to_video_wan.json` template run unchanged by `twinflow run`.

No ComfyUI needed; the template comes from the `comfyui-workflow-templates` package (test extra), and the
end-to-end test skips with a reason when it is not installed.
"""
import importlib.util
import json
import logging
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from twinflow.core import paths
from twinflow.models import umt5

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("core_files", FIX / "core_files.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

pytest.importorskip("sentencepiece")

WAN21_MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                           0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])
WAN21_STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                          3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cf.write_t2v_models(root)
    return root


@pytest.fixture
def models(model_files, tf_dirs):
    paths.set_models_dir(model_files)
    yield model_files


def _core(name):
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]()


# --------------------------------------------------------------------------------------- umT5 encoder


def _hf_umt5(sd: dict, cfg: umt5.UMT5Config):
    """transformers' UMT5 encoder with the same weights (fp8 dequantized as weight * scale_weight)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                                     num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = transformers.UMT5EncoderModel(hf_cfg).eval()
    weights = {}
    for k, v in sd.items():
        if k in ("spiece_model", "scaled_fp8") or k.endswith("scale_weight"):
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight")
        weights[k] = v.float() * scale.float() if scale is not None else v.float()
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not [m for m in missing if "embed_tokens" not in m], (missing, unexpected)
    return model


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8_scaled"])
def test_umt5_matches_transformers(fp8):
    cfg = umt5.PRESETS["tiny"]
    sd = cf.umt5_state_dict(cfg, fp8=fp8, with_tokenizer=False)
    ours = umt5.encoder_from_state_dict(dict(sd))
    assert ours.cfg == cfg  # read from the tensor shapes
    hf = _hf_umt5(sd, cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # a padded prompt: padded keys are masked out
    ids[1, 25:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(ids, mask)
    valid = mask.bool()
    err = (got[valid] - ref[valid]).abs().max() / ref[valid].abs().max()
    assert err < 1e-5, err


def test_umt5_fp8_file_keeps_fp8_weights():
    cfg = umt5.PRESETS["tiny"]
    enc = umt5.encoder_from_state_dict(cf.umt5_state_dict(cfg, fp8=True, with_tokenizer=False))
    q = enc.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight is not None


def test_umt5_bad_file_names_key():
    with pytest.raises(Exception, match="missing key 'shared.weight'"):
        umt5.encoder_from_state_dict({"foo": torch.zeros(2)}, "x.safetensors")
    cfg = umt5.PRESETS["tiny"]
    sd = cf.umt5_state_dict(cfg, with_tokenizer=False)
    sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(3, 3)
    with pytest.raises(Exception, match="wrong shapes.*block.1.layer.1.DenseReluDense.wo"):
        umt5.encoder_from_state_dict(sd, "x.safetensors")


def test_prompt_weights_follow_comfyui():
    # ComfyUI's token_weights: (a) multiplies by 1.1, (a:w) sets w, nesting multiplies, \( is literal
    assert umt5.parse_weights("a (fox:1.5) runs") == [("a ", 1.0), ("fox", 1.5), (" runs", 1.0)]
    assert umt5.parse_weights("((snow))") == [("snow", pytest.approx(1.21))]
    assert umt5.parse_weights(r"a \(b\) c") == [("a (b) c", 1.0)]
    assert umt5.parse_weights("(x:bad)") == [("x:bad", pytest.approx(1.1))]


def _text_model(sd):
    return umt5.UMT5TextModel(umt5.encoder_from_state_dict(dict(sd)), umt5.Tokenizer(cf.spiece_proto()), "t")


def test_clip_text_encode_comfyui_tokens_mask_and_padding():
    import sentencepiece as spm

    cfg = umt5.PRESETS["tiny"]
    sd = cf.umt5_state_dict(cfg, with_tokenizer=False)
    clip = _text_model(sd)
    sp = spm.SentencePieceProcessor(model_proto=cf.spiece_proto(), add_eos=True)
    text = "a fox moving quickly"
    # ComfyUI: the segment's ids without the processor's </s>, then end token 1, then pad 0 up to 512
    ids = sp.encode(text)[:-1] + [1]
    n = len(ids)
    ids = ids + [0] * (512 - n)
    assert [t for t, _ in clip.tokenize(text)] == ids
    (cond,), = _core("CLIPTextEncode").encode(clip, text)
    z, extra = cond
    assert z.shape == (1, 512, cfg.d_model) and extra == {"pooled_output": None}
    mask = torch.zeros(1, 512, dtype=torch.long)
    mask[:, :n] = 1  # up to and including the end token
    with torch.no_grad():
        ref = _hf_umt5(sd, cfg)(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state
    assert torch.count_nonzero(z[:, n:]) == 0
    assert (z[:, :n] - ref[:, :n]).abs().max() / ref[:, :n].abs().max() < 1e-5


def test_clip_text_encode_weighted_prompt():
    cfg = umt5.PRESETS["tiny"]
    clip = _text_model(cf.umt5_state_dict(cfg, with_tokenizer=False))
    pairs = clip.tokenize("a (fox:1.5)")
    w = torch.tensor([w for _, w in pairs])[None, :, None]
    plain = clip._run([t for t, _ in pairs])
    empty = clip._run([1] + [0] * (len(pairs) - 1))  # ComfyUI's gen_empty_tokens: end, then pad
    expected = torch.where(w != 1.0, (plain - empty) * w + empty, plain)  # z = (z - z_empty) * w + z_empty
    assert (w != 1.0).any()
    torch.testing.assert_close(clip.encode("a (fox:1.5)"), expected)


def test_clip_loader_reads_tokenizer_from_file_and_errors_without(models, tmp_path):
    clip, = _core("CLIPLoader").load_clip(cf.T2V_FILES["clip"], "wan")
    assert clip.tokenizer is not None and clip.width == umt5.PRESETS["tiny"].d_model
    from safetensors.torch import save_file

    save_file(cf.umt5_state_dict(umt5.PRESETS["tiny"], with_tokenizer=False),
              str(models / "text_encoders" / "no_tok.safetensors"))
    clip, = _core("CLIPLoader").load_clip("no_tok.safetensors", "wan")
    with pytest.raises(Exception, match="no 'spiece_model' entry"):
        _core("CLIPTextEncode").encode(clip, "a fox")


def test_conditioning_zero_out():
    t = torch.randn(1, 7, 4)
    pooled = torch.randn(1, 4)
    cond = [[t, {"pooled_output": pooled, "x": 1}]]
    (out,), = [_core("ConditioningZeroOut").zero_out(cond)]
    assert torch.equal(out[0][0], torch.zeros_like(t)) and torch.equal(out[0][1]["pooled_output"], torch.zeros(1, 4))
    assert out[0][1]["x"] == 1 and cond[0][1]["pooled_output"] is pooled and torch.count_nonzero(t) > 0


# ------------------------------------------------------------------------------------- latent + sampling


@pytest.mark.parametrize("w,h,length,batch", [(848, 480, 25, 1), (64, 48, 5, 2), (16, 16, 1, 1), (32, 48, 8, 1)])
def test_empty_hunyuan_latent_video(w, h, length, batch):
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(w, h, length, batch)
    # ComfyUI: zeros [batch, 16, ((length - 1) // 4) + 1, height // 8, width // 8]
    assert lat["samples"].shape == (batch, 16, (length - 1) // 4 + 1, h // 8, w // 8)
    assert torch.count_nonzero(lat["samples"]) == 0


def _comfy_sigmas_simple(shift: float, steps: int) -> torch.Tensor:
    """ComfyUI: ModelSamplingDiscreteFlow's 1000-entry table + the `simple` scheduler."""
    t = (torch.arange(1, 1001, 1) / 1000) * 1000
    s = t / 1000
    table = shift * s / (1 + (shift - 1) * s)
    ss = len(table) / steps
    return torch.FloatTensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def _comfy_euler_ksampler(dit, seed, steps, cfg, shift, pos, neg, latent):
    """ComfyUI's common_ksampler with euler/simple on a flow (CONST) Wan model, written out."""
    sigmas = _comfy_sigmas_simple(shift, steps)
    noise = torch.randn(latent.size(), dtype=latent.dtype, generator=torch.manual_seed(seed), device="cpu")
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent  # CONST.noise_scaling (empty latent: no process_in)
    for i in range(steps):
        s = sigmas[i]
        t = torch.full((x.shape[0],), float(s) * 1000.0)
        den_c = x - s * dit(x, t, pos)  # calculate_denoised: x - v * sigma
        den_u = x - s * dit(x, t, neg)
        den = den_u + (den_c - den_u) * cfg  # cfg_function
        x = x + (x - den) / s * (sigmas[i + 1] - s)  # sample_euler (no churn)
    x = x / (1.0 - sigmas[-1])  # CONST.inverse_noise_scaling
    return x * WAN21_STD.view(1, -1, 1, 1, 1) + WAN21_MEAN.view(1, -1, 1, 1, 1)  # Wan21.process_out


def test_ksampler_euler_matches_comfyui_formulas(models):
    torch.manual_seed(123)  # the sampler must not depend on (or change) the global RNG
    model, = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], "default")
    assert model.info["sampling_shift"] == 8.0  # WAN21_T2V default
    patched, = _core("ModelSamplingSD3").patch(model, 5.0)
    assert model.info["sampling_shift"] == 8.0 and patched.info["sampling_shift"] == 5.0
    d = model.config.text_dim
    pos = torch.randn(1, 512, d) * (torch.arange(512) < 9).view(1, -1, 1)
    neg = torch.randn(1, 512, d) * (torch.arange(512) < 5).view(1, -1, 1)
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(64, 48, 5, 1)
    (out,) = _core("KSampler").sample(patched, 42, 3, 4.0, "euler", "simple", [[pos, {}]], [[neg, {}]], lat, 1.0)
    with torch.no_grad():
        ref = _comfy_euler_ksampler(model.module, 42, 3, 4.0, 5.0, pos, neg, lat["samples"])
    err = (out["samples"] - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err
    assert torch.count_nonzero(lat["samples"]) == 0  # input not mutated


def test_twinflow_sampler_shift_from_model_follows_model_sampling_sd3(models, caplog):
    """TwinFlow Sampler with shift 0 ("from the model") samples on the ModelSamplingSD3 patch's grid, as core
    KSampler does; an explicit shift that disagrees with the patch wins and says so once in the log."""
    from twinflow.core.log import forget_once
    from twinflow.nodes.sampling import TwinFlowSampler

    model, = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], "default")
    pos = [[torch.randn(1, 512, model.config.text_dim) * (torch.arange(512) < 9).view(1, -1, 1), {}]]
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(64, 48, 5, 1)
    outs = {}
    for shift in (3.0, 8.0):
        patched, = _core("ModelSamplingSD3").patch(model, shift)
        (ours, _) = TwinFlowSampler().run(patched, lat, 42, 3, 1.0, "euler", "simple", 0.0, 1.0, positive=pos)
        (core,) = _core("KSampler").sample(patched, 42, 3, 1.0, "euler", "simple", pos, pos, lat, 1.0)
        torch.testing.assert_close(ours["samples"], core["samples"], rtol=1e-5, atol=1e-5)
        outs[shift] = ours["samples"]
    assert (outs[3.0] - outs[8.0]).abs().max() > 1e-2
    forget_once()
    patched, = _core("ModelSamplingSD3").patch(model, 3.0)
    with caplog.at_level(logging.INFO, logger="twinflow.nodes.sampling"):
        (ours, _) = TwinFlowSampler().run(patched, lat, 42, 3, 1.0, "euler", "simple", 8.0, 1.0, positive=pos)
    torch.testing.assert_close(ours["samples"], outs[8.0])
    said = [r.getMessage() for r in caplog.records if "overrides the model's sampling shift" in r.getMessage()]
    assert len(said) == 1 and "(8)" in said[0] and " 3 " in said[0] and "ModelSamplingSD3" in said[0], said


def test_resolve_shift_between_widget_and_models(caplog):
    """Widget 0: the first model's shift (8 when no model carries one); two models that disagree are logged; a
    negative widget is refused."""
    from types import SimpleNamespace

    from twinflow.core.log import forget_once
    from twinflow.nodes.sampling import resolve_shift

    forget_once()
    a = SimpleNamespace(info={"sampling_shift": 3.0, "sampling_shift_source": "ModelSamplingSD3 patch"})
    b = SimpleNamespace(info={"sampling_shift": 5.0})
    bare = SimpleNamespace(info={})
    with caplog.at_level(logging.INFO, logger="twinflow.nodes.sampling"):
        assert resolve_shift(0.0, a, b) == 3.0
        assert resolve_shift(0.0, bare) == 8.0
        assert resolve_shift(0.0, bare, b) == 5.0
        assert resolve_shift(6.0, a) == 6.0
    text = caplog.text
    assert "shifts differ (3 and 5)" in text and "carries no sampling shift" in text and "overrides" in text
    with pytest.raises(ValueError, match="shift"):
        resolve_shift(-1.0, a)


def test_ksampler_uni_pc_drops_penultimate_sigma(models, monkeypatch):
    from twinflow.sampling import solvers

    seen = {}
    real = solvers.SOLVERS["uni_pc"]

    def spy(model, x, sigmas, on_step=None, **kw):
        seen["sigmas"] = sigmas.clone()
        return real(model, x, sigmas, on_step, **kw)

    monkeypatch.setitem(solvers.SOLVERS, "uni_pc", spy)
    model, = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], "default")
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(32, 32, 1, 1)
    ctx = [[torch.randn(1, 512, model.config.text_dim), {}]]
    _core("KSampler").sample(model, 1, 4, 1.0, "uni_pc", "simple", ctx, ctx, lat, 1.0)
    # ComfyUI: DISCARD_PENULTIMATE_SIGMA_SAMPLERS compute steps+1 sigmas and drop the second to last
    full = _comfy_sigmas_simple(8.0, 5)
    torch.testing.assert_close(seen["sigmas"], torch.cat([full[:-2], full[-1:]]))


def test_ksampler_noise_mask_keeps_the_known_region(models):
    """A LATENT noise_mask (0 = keep) is honoured as ComfyUI's KSamplerX0Inpaint: with euler down to sigma 0 the
    kept frame ends at the input latent, the rest is sampled; an all-ones mask changes nothing."""
    model, = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], "default")
    ctx = [[torch.randn(1, 8, model.config.text_dim, generator=torch.Generator().manual_seed(0)), {}]]
    samples = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 1, 2, 4, 4)
    mask[:, :, 0] = 0.0
    ks = _core("KSampler")
    out, = ks.sample(model, 1, 3, 1.0, "euler", "simple", ctx, ctx, {"samples": samples, "noise_mask": mask})
    torch.testing.assert_close(out["samples"][:, :, 0], samples[:, :, 0], rtol=0, atol=1e-5)
    assert (out["samples"][:, :, 1] - samples[:, :, 1]).abs().max() > 0.1
    plain, = ks.sample(model, 1, 3, 1.0, "euler", "simple", ctx, ctx, {"samples": samples})
    ones, = ks.sample(model, 1, 3, 1.0, "euler", "simple", ctx, ctx,
                      {"samples": samples, "noise_mask": torch.ones(1, 1, 2, 4, 4)})
    assert torch.equal(plain["samples"], ones["samples"])


# ------------------------------------------------------------------------------------------ decode + save


def test_vae_decode_is_comfyui_image_layout(models):
    vae, = _core("VAELoader").load_vae(cf.T2V_FILES["vae"])
    z = torch.randn(2, 16, 2, 3, 4)
    (images,) = _core("VAEDecode").decode(vae, {"samples": z})
    with torch.no_grad():
        video = vae.decode(z)  # [B, 3, T, H, W] in [-1, 1]
    # ComfyUI: process_output = clamp((x + 1) / 2, 0, 1), channels last, batches combined on dim 0
    ref = ((video + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 4, 1).reshape(-1, 24, 32, 3)
    assert images.shape == (2 * 5, 24, 32, 3)
    torch.testing.assert_close(images, ref)


def test_create_video_and_save_video(tf_dirs):
    av = pytest.importorskip("av")
    frames = torch.rand(5, 48, 64, 3)
    (video,) = _core("CreateVideo").execute(frames, 16.0)
    assert video.frame_rate == Fraction(16) and video.get_dimensions() == (64, 48)
    ui = _core("SaveVideo").execute(video, "video/ComfyUI", "auto", "auto", prompt={"1": {}})
    assert ui["ui"]["animated"] == (True,)
    entry, = ui["ui"]["images"]
    assert entry == {"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}
    with av.open(str(tf_dirs["output"] / "video" / entry["filename"])) as c:
        s = c.streams.video[0]
        assert (s.average_rate, s.width, s.height) == (16, 64, 48)
        assert sum(1 for _ in c.decode(video=0)) == 5
        assert json.loads(c.metadata["prompt"]) == {"1": {}}


def test_save_image_names_like_comfyui(tf_dirs):
    ui = _core("SaveImage").save_images(torch.rand(2, 8, 8, 3), "ComfyUI")
    assert [e["filename"] for e in ui["ui"]["images"]] == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]


# ----------------------------------------------------------------------------------- registry + messages


def test_core_nodes_only_in_the_headless_registry():
    import twinflow
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS as CORE
    from twinflow.runner.api import default_registry
    from twinflow.runner.core_nodes import CORE_NODES

    assert set(CORE) <= CORE_NODES  # ComfyUI's class names
    assert not set(CORE) & set(twinflow.NODE_CLASS_MAPPINGS)  # inside ComfyUI, ComfyUI provides them
    assert set(CORE) <= set(default_registry())


def test_core_node_outside_the_set_is_refused_with_a_hint():
    from twinflow.runner.api import default_registry
    from twinflow.runner.core_nodes import unknown_class_hint

    from twinflow.runner.core_nodes import CORE_NODES, TWINFLOW_EQUIVALENTS

    reg = default_registry()
    msg = unknown_class_hint("SaveLatent", reg)
    assert "'SaveLatent' is a ComfyUI core node" in msg and "TwinFlowSaveLatent" in msg
    msg = unknown_class_hint("StyleModelLoader", reg)
    assert "needs the ComfyUI host" in msg and "StyleModelLoader" in msg
    for core, twin in TWINFLOW_EQUIVALENTS.items():  # only nodes outside the set, only real TwinFlow nodes
        assert core in CORE_NODES and core not in reg and twin.split()[0] in reg, core


def test_workflow_with_a_core_node_outside_the_set_is_refused_naming_the_node(tmp_path):
    from twinflow.core.errors import WorkflowError
    from twinflow.runner.api import Runner

    prompt = {"5": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "x.safetensors"}},
              "6": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "a"}},
              "7": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 16, "height": 16, "length": 1,
                                                                        "batch_size": 1}}}
    with pytest.raises(Exception) as e:
        Runner().run(prompt, output_dir=tmp_path)
    text = str(e.value) + json.dumps(getattr(e.value, "to_json", lambda: {})(), default=str)
    assert "SaveLatent" in text and "TwinFlowSaveLatent" in text


# ------------------------------------------------------------------------------ the template, end to end


def test_text_to_video_wan_template_runs_headless(model_files, tmp_path, capsys):
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    pytest.importorskip("av")
    from twinflow.runner import cli

    wf = tmp_path / "text_to_video_wan.json"
    wf.write_text(json.dumps(cf.template("text_to_video_wan.json")))
    out = tmp_path / "out"
    code = cli.main(["run", str(wf), "--models-dir", str(model_files), "--output-dir", str(out), "--no-progress",
                     "--set", "40.width=64", "--set", "40.height=48", "--set", "40.length=5", "--set", "3.steps=2"])
    _, err = capsys.readouterr()
    assert code == 0, err
    import av

    (mp4,) = list((out / "video").glob("ComfyUI_*_.mp4"))
    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.average_rate) == (64, 48, 16)
        assert sum(1 for _ in c.decode(video=0)) == 5


# ------------------------------------------------------------------------------- step caching (issue 18)
def _counting(model) -> list:
    """Count the DiT module's forwards (one per call, a batched CFG pair counts once)."""
    calls, real = [], model.module.forward
    model.module.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    return calls


def _ks(model, lat, d, steps=8):
    pos = torch.randn(1, 512, d, generator=torch.Generator().manual_seed(1)) * (torch.arange(512) < 9).view(1, -1, 1)
    neg = torch.randn(1, 512, d, generator=torch.Generator().manual_seed(2)) * (torch.arange(512) < 5).view(1, -1, 1)
    (out,) = _core("KSampler").sample(model, 42, steps, 4.0, "euler", "simple", [[pos, {}]], [[neg, {}]], lat, 1.0)
    return out["samples"]


def test_ksampler_step_cache_off_is_bit_identical_and_skips_cost_no_forward(models, caplog):
    # `twinflow run --step-cache` reaches the core KSampler: threshold 0 changes nothing (same bits, same forwards);
    # a threshold that skips saves exactly the forwards of the skipped steps, and the log says which.
    import logging

    from twinflow.sampling import step_cache

    model, = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], "default")
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(64, 48, 5, 1)
    d = model.config.text_dim
    calls = _counting(model)
    plain = _ks(model, lat, d)
    n_plain = len(calls)
    assert n_plain > 0
    calls.clear()
    with step_cache.run_override(step_cache.parse_spec("easycache:0")) as used:
        off = _ks(model, lat, d)
    assert used and torch.equal(off, plain) and len(calls) == n_plain
    calls.clear()
    with caplog.at_level(logging.INFO, logger="twinflow.sampling.ksampler"), \
            step_cache.run_override(step_cache.parse_spec("magcache:10,calibration=wan2.1-1.3b,start=0,end=1,max_skips=3")):
        cached = _ks(model, lat, d)
    line = next(r.getMessage() for r in caplog.records if "step cache" in r.getMessage())
    skipped = int(line.split(" skipped (")[0].rsplit(" ", 1)[1])
    assert skipped > 0 and line.startswith("KSampler: step cache KSampler: magcache")
    saved = int(re.search(r"; (\d+) forwards / ", line).group(1))
    assert saved > 0 and len(calls) == n_plain - saved and not torch.equal(cached, plain)
