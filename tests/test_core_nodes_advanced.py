"""The second half of the headless core node set: KSamplerAdvanced, SamplerCustomAdvanced and its parts,
LoraLoaderModelOnly (every key layout), UNETLoader fp8 modes and ComfyUI fp8_scaled files, VAEEncode,
VAEDecodeTiled, SaveAnimatedWEBP, PreviewImage, LoadImage, and ComfyUI's `video_wan2_2_14B_t2v.json` run
unchanged. ComfyUI's formulas are written out here; no ComfyUI needed.
"""
import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from twinflow.core import paths

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("core_files", FIX / "core_files.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

pytest.importorskip("sentencepiece")

WAN21_MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                           0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]).view(1, -1, 1, 1, 1)
WAN21_STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                          3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]).view(1, -1, 1, 1, 1)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models22")
    cf.write_t2v_22_models(root)
    return root


@pytest.fixture
def models(model_files, tf_dirs):
    paths.set_models_dir(model_files)
    yield model_files


def _core(name):
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]()


def _model(name=None):
    return _core("UNETLoader").load_unet(name or cf.T2V_FILES["unet"], "default")[0]


def _conds(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(1, 512, d, generator=g) * (torch.arange(512) < 9).view(1, -1, 1)
    neg = torch.randn(1, 512, d, generator=g) * (torch.arange(512) < 5).view(1, -1, 1)
    return [[pos, {}]], [[neg, {}]]


def _simple(shift, steps):
    """ComfyUI: ModelSamplingDiscreteFlow table + `simple`."""
    s = torch.arange(1, 1001, 1) / 1000
    table = shift * s / (1 + (shift - 1) * s)
    ss = len(table) / steps
    return torch.FloatTensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def _euler_flow(dit, x, sigmas, pos, neg, cfg):
    """ComfyUI's sample_euler on a CONST model with cfg_function, from noise-scaled x to x at sigmas[-1]."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        t = torch.full((x.shape[0],), float(s) * 1000.0)
        dc = x - s * dit(x, t, pos)
        du = x - s * dit(x, t, neg)
        den = du + (dc - du) * cfg
        x = x + (x - den) / s * (sigmas[i + 1] - s)
    return x


# ------------------------------------------------------------------------------------ KSamplerAdvanced


def test_ksampler_advanced_two_stage_split_matches_comfyui(models):
    hi = _core("ModelSamplingSD3").patch(_model(cf.T2V_22_FILES["high"]), 5.0)[0]
    lo = _core("ModelSamplingSD3").patch(_model(cf.T2V_22_FILES["low"]), 5.0)[0]
    pos, neg = _conds(hi.config.text_dim)
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(32, 32, 5, 1)
    adv = _core("KSamplerAdvanced")
    (mid,) = adv.sample(hi, "enable", 7, 4, 3.0, "euler", "simple", pos, neg, lat, 0, 2, "enable")
    (out,) = adv.sample(lo, "disable", 0, 4, 3.0, "euler", "simple", pos, neg, mid, 2, 10000, "disable")

    sig = _simple(5.0, 4)
    noise = torch.randn(lat["samples"].shape, generator=torch.manual_seed(7))
    with torch.no_grad():
        # stage 1: sigmas[:3] (leftover noise kept), noise added; inverse_noise_scaling divides by 1 - sigma_last
        s1 = sig[:3]
        x = s1[0] * noise
        x = _euler_flow(hi.module, x, s1, pos[0][0], neg[0][0], 3.0) / (1.0 - s1[-1])
        ref_mid = x * WAN21_STD + WAN21_MEAN
        # stage 2: sigmas[2:], no noise: x = (1 - sigma0) * process_in(latent)
        s2 = sig[2:]
        x = (1.0 - s2[0]) * ((ref_mid - WAN21_MEAN) / WAN21_STD)
        x = _euler_flow(lo.module, x, s2, pos[0][0], neg[0][0], 3.0)
        ref = x * WAN21_STD + WAN21_MEAN
    for got, want in ((mid["samples"], ref_mid), (out["samples"], ref)):
        assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_ksampler_advanced_split_with_one_model_equals_ksampler(models):
    m = _model()
    pos, neg = _conds(m.config.text_dim, seed=3)
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(16, 32, 1, 1)
    (full,) = _core("KSampler").sample(m, 11, 4, 2.5, "dpmpp_2m", "simple", pos, neg, lat, 1.0)
    adv = _core("KSamplerAdvanced")
    (a,) = adv.sample(m, "enable", 11, 4, 2.5, "dpmpp_2m", "simple", pos, neg, lat, 0, 4, "disable")
    torch.testing.assert_close(a["samples"], full["samples"])  # start 0 / end >= steps is the plain KSampler
    (mid,) = adv.sample(m, "enable", 11, 4, 2.5, "euler", "simple", pos, neg, lat, 0, 1, "enable")
    (b,) = adv.sample(m, "disable", 0, 4, 2.5, "euler", "simple", pos, neg, mid, 1, 10000, "disable")
    (e,) = _core("KSampler").sample(m, 11, 4, 2.5, "euler", "simple", pos, neg, lat, 1.0)
    assert (b["samples"] - e["samples"]).abs().max() / e["samples"].abs().max() < 1e-5  # euler is memoryless
    (same,) = adv.sample(m, "enable", 11, 4, 2.5, "euler", "simple", pos, neg, mid, 4, 10000, "disable")
    assert same["samples"] is mid["samples"]  # start_at_step past the end: the latent comes back as it was


def test_ksampler_advanced_end_without_leftover_noise_ends_at_zero(models, monkeypatch):
    from twinflow.sampling import solvers

    seen = {}
    real = solvers.SOLVERS["euler"]

    def spy(model, x, sigmas, on_step=None):
        seen["s"] = sigmas.clone()
        return real(model, x, sigmas, on_step)

    monkeypatch.setitem(solvers.SOLVERS, "euler", spy)
    m = _model()
    pos, neg = _conds(m.config.text_dim)
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(16, 16, 1, 1)
    _core("KSamplerAdvanced").sample(m, "enable", 1, 6, 1.0, "euler", "simple", pos, neg, lat, 1, 3, "disable")
    # ComfyUI: sigmas[:last_step+1] with the last set to 0 (force_full_denoise), then sigmas[start_step:]
    want = _simple(8.0, 6)[:4].clone()
    want[-1] = 0.0
    torch.testing.assert_close(seen["s"], want[1:])


# ----------------------------------------------------------------------------- SamplerCustomAdvanced


def test_sampler_custom_advanced_equals_ksampler(models):
    m = _model()
    pos, neg = _conds(m.config.text_dim, seed=5)
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(32, 32, 5, 1)
    (noise,) = _core("RandomNoise").get_noise(21)
    (guider,) = _core("CFGGuider").get_guider(m, pos, neg, 3.5)
    (sampler,) = _core("KSamplerSelect").get_sampler("euler")
    (sigmas,) = _core("BasicScheduler").get_sigmas(m, "simple", 3, 1.0)
    out, den = _core("SamplerCustomAdvanced").sample(noise, guider, sampler, sigmas, lat)
    (ref,) = _core("KSampler").sample(m, 21, 3, 3.5, "euler", "simple", pos, neg, lat, 1.0)
    torch.testing.assert_close(out["samples"], ref["samples"])
    # euler's last step lands on sigma 0, so the output is the last step's x0 prediction
    torch.testing.assert_close(den["samples"], out["samples"], rtol=1e-5, atol=1e-5)


def test_basic_scheduler_denoise_and_basic_guider(models):
    m = _core("ModelSamplingSD3").patch(_model(), 3.0)[0]
    (s,) = _core("BasicScheduler").get_sigmas(m, "simple", 4, 0.5)
    # ComfyUI: total = int(steps / denoise), keep the last steps + 1
    torch.testing.assert_close(s, _simple(3.0, 8)[-5:])
    assert len(_core("BasicScheduler").get_sigmas(m, "simple", 4, 0.0)[0]) == 0
    pos, neg = _conds(m.config.text_dim)
    (lat,) = _core("EmptyHunyuanLatentVideo").generate(16, 16, 1, 1)
    (sampler,) = _core("KSamplerSelect").get_sampler("euler")
    (noise,) = _core("RandomNoise").get_noise(3)
    (g1,) = _core("BasicGuider").get_guider(m, pos)
    (g2,) = _core("CFGGuider").get_guider(m, pos, neg, 1.0)
    a, _ = _core("SamplerCustomAdvanced").sample(noise, g1, sampler, s, lat)
    b, _ = _core("SamplerCustomAdvanced").sample(noise, g2, sampler, s, lat)
    torch.testing.assert_close(a["samples"], b["samples"])  # cfg 1 runs the positive prompt only


def test_disable_noise_is_zero_noise(models):
    (n,) = _core("DisableNoise").get_noise()
    lat = {"samples": torch.ones(1, 16, 1, 2, 2)}
    assert torch.count_nonzero(n.generate(lat)) == 0
    (r,) = _core("RandomNoise").get_noise(9)
    torch.testing.assert_close(r.generate(lat), torch.randn(1, 16, 1, 2, 2, generator=torch.manual_seed(9)))


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("layout", ["comfy", "peft", "kohya", "diffusers"])
def test_lora_loader_merges_every_layout(models, layout, tmp_path):
    from safetensors.torch import save_file

    base = _model()
    sd = {k: v.clone() for k, v in base.module.state_dict().items()}
    lora = cf.lora_state_dict(sd, layout=layout, with_diff=layout == "comfy")
    (models / "loras" / "x.safetensors").unlink(missing_ok=True)
    save_file(lora, str(models / "loras" / "x.safetensors"))
    (patched,) = _core("LoraLoaderModelOnly").load_lora_model_only(base, "x.safetensors", 0.7)
    got = patched.module.state_dict()
    alpha = 2.0 if layout in ("comfy", "kohya") else None
    n = 0
    for k, w in sd.items():
        if k.startswith("blocks.") and k.endswith(cf.DIT_LINEARS):
            n += 1
            up = next(v for kk, v in lora.items() if kk.endswith(("lora_up.weight", "lora_B.weight")) and _same(kk, k))
            down = next(v for kk, v in lora.items() if kk.endswith(("lora_down.weight", "lora_A.weight")) and _same(kk, k))
            scale = alpha / down.shape[0] if alpha is not None else 1.0  # alpha / rank, 1 without alpha
            torch.testing.assert_close(got[k], w + 0.7 * scale * (up @ down))
    assert n == 2 * 10  # q, k, v, o of both attentions + the two FFN linears, per block
    if layout == "comfy":
        for k in ("blocks.0.norm3.weight", "blocks.0.norm3.bias"):
            suffix = ".diff" if k.endswith("weight") else ".diff_b"
            torch.testing.assert_close(got[k], sd[k] + 0.7 * lora["diffusion_model.blocks.0.norm3" + suffix])
    torch.testing.assert_close(base.module.state_dict()["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"])
    assert _core("LoraLoaderModelOnly").load_lora_model_only(base, "x.safetensors", 0.0)[0] is base


def _same(lora_key: str, weight_key: str) -> bool:
    layer = weight_key[: -len(".weight")]
    kohya = "lora_unet_" + layer.replace(".", "_")
    diff = layer
    for a, b in (("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
                 ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
                 ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"), ("ffn.0", "ffn.net.0.proj"),
                 ("ffn.2", "ffn.net.2")):
        diff = diff.replace("." + a, "." + b)
    base = lora_key.rsplit(".lora_", 1)[0]
    return base in (f"diffusion_model.{layer}", kohya, f"transformer.{diff}")


def test_lora_on_fp8_scaled_model_and_bad_files(models, caplog):
    from safetensors.torch import load_file, save_file

    from twinflow.quant.linear import QuantLinear

    m = _model(cf.T2V_22_FILES["high"])
    q = m.module.blocks[0].self_attn.q
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.float8_e4m3fn
    lora = load_file(str(models / "loras" / cf.T2V_22_FILES["lora_high"]))
    orig = q.weight.view(torch.uint8).clone()
    (p,) = _core("LoraLoaderModelOnly").load_lora_model_only(m, cf.T2V_22_FILES["lora_high"], 1.0)
    up, down = lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    # ComfyUI (model_patcher.patch_weight_to_device + scaled_fp8_ops.set_weight): merge on weight * scale in fp32,
    # then store (merged / scale) back in fp8 with stochastic rounding: each value lands on one of its two fp8
    # neighbours, so it is within one fp8 step of the exact merge and the scale is unchanged
    s = q.weight_scale
    want = ((q.weight.float() * s + (1.0 * (2.0 / down.shape[0])) * (up @ down)) / s).clamp(-448, 448)  # saturates
    pq = p.module.blocks[0].self_attn.q
    assert isinstance(pq, QuantLinear) and pq.weight.dtype == torch.float8_e4m3fn and pq.weight_scale is q.weight_scale
    lo = want.to(torch.float8_e4m3fn).float()
    step = torch.where(want.abs() < 2 ** -6, torch.full_like(want, 2 ** -9), 2.0 ** (torch.floor(torch.log2(want.abs())) - 3))
    assert ((pq.weight.float() - want).abs() <= step * 1.0001).all()
    assert not torch.equal(pq.weight.float(), lo)  # rounded stochastically, not to nearest
    assert isinstance(m.module.blocks[0].self_attn.q, QuantLinear)  # the loaded model is untouched
    assert torch.equal(m.module.blocks[0].self_attn.q.weight.view(torch.uint8), orig)

    save_file({"foo.lora_up.weight": torch.zeros(2, 2), "foo.lora_down.weight": torch.zeros(2, 2)},
              str(models / "loras" / "bad.safetensors"))
    with pytest.raises(Exception, match="none of its 2 keys names a layer"):
        _core("LoraLoaderModelOnly").load_lora_model_only(m, "bad.safetensors", 1.0)
    extra = {**lora, "diffusion_model.nope.lora_up.weight": torch.zeros(1)}
    save_file(extra, str(models / "loras" / "extra.safetensors"))
    with caplog.at_level(logging.WARNING):
        _core("LoraLoaderModelOnly").load_lora_model_only(m, "extra.safetensors", 1.0)
    assert "match no layer" in caplog.text and "diffusion_model.nope" in caplog.text


# ----------------------------------------------------------------------------------------- UNETLoader fp8


@pytest.mark.parametrize("mode,dtype", [("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e4m3fn_fast", torch.float8_e4m3fn),
                                        ("fp8_e5m2", torch.float8_e5m2)])
def test_unet_loader_fp8_weight_dtype(models, mode, dtype):
    ref = _model()
    (m,) = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], mode)
    lin = m.module.blocks[0].ffn[0]
    assert lin.weight.dtype == dtype
    # ComfyUI casts the weight to fp8 (no scale) and computes in the input dtype
    w = ref.module.blocks[0].ffn[0].weight
    torch.testing.assert_close(lin.dequantized_weight(torch.float32), w.to(dtype).float())
    x = torch.randn(1, 16, 1, 4, 4)
    t = torch.tensor([500.0])
    c = torch.randn(1, 7, ref.config.text_dim)
    a, b = ref.module(x, t, c), m.module(x, t, c)
    assert (a - b).norm() / a.norm() < 0.15


# ComfyUI 0.3.64's storage rules for a Wan model, restated from its sources (not from TwinFlow's code):
# comfy/sd.py load_diffusion_model_state_dict: UNETLoader's fp8 weight_dtype becomes model_options["dtype"], the
# unet dtype; comfy/ldm/wan/model.py builds every layer with that dtype (operations.Linear, the q/k
# operations.RMSNorm, the affine norm3 operations.LayerNorm, the `modulation` nn.Parameters of blocks and head;
# norm1/norm2/head.norm have no parameters) except the patch embedding Conv3d, created with dtype=float32.
# An fp8_scaled file: comfy.ops.scaled_fp8_ops overrides every Linear's dtype with the file's fp8 dtype; the
# other layers get the unet dtype (float32 on the CPU for 'default').
_COMFY_LINEAR = re.compile(r"^(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|"
                           r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|head\.head)\.(weight|bias)$")
_COMFY_OTHER = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn)\.norm_[qk]\.weight|blocks\.\d+\.norm3\.(weight|bias)|"
                          r"blocks\.\d+\.modulation|head\.modulation)$")
_COMFY_FP32 = re.compile(r"^patch_embedding\.(weight|bias)$")


def _comfy_table(keys, linear_dtype, other_dtype):
    table = {}
    for k in keys:
        if _COMFY_FP32.match(k):
            table[k] = torch.float32
        elif _COMFY_LINEAR.match(k):
            table[k] = linear_dtype
        elif _COMFY_OTHER.match(k):
            table[k] = other_dtype
        else:
            raise AssertionError(f"{k}: not a parameter of ComfyUI's WanModel")
    return table


@pytest.mark.parametrize("file,mode", [("unet", "fp8_e4m3fn"), ("unet", "fp8_e5m2"), ("unet", "fp8_e4m3fn_fast"),
                                       ("unet", "default"), ("low", "default"), ("low", "fp8_e5m2")])
def test_unet_loader_parameter_dtypes_match_comfyuis_table(models, file, mode):
    from safetensors.torch import load_file

    from twinflow.quant.storage import storage_dtypes

    name = cf.T2V_FILES["unet"] if file == "unet" else cf.T2V_22_FILES[file]
    (m,) = _core("UNETLoader").load_unet(name, mode)
    got = storage_dtypes(m.module)
    mode_dtype = {"default": torch.float32, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                  "fp8_e5m2": torch.float8_e5m2}[mode]
    sd = load_file(str(models / "diffusion_models" / name))
    file_fp8 = sd["scaled_fp8"].dtype if "scaled_fp8" in sd else None
    want = _comfy_table(got, file_fp8 or mode_dtype, mode_dtype)
    assert len([k for k in want if _COMFY_OTHER.match(k)]) >= 6
    assert got == want
    # the stored values: each tensor the file's (dequantized) value rounded to its storage dtype
    ref = {k: v for k, v in _model(name).module.state_dict().items()}
    params = dict(m.module.named_parameters())
    params.update(dict(m.module.named_buffers()))
    for k, dt in want.items():
        t = params[k]
        if dt == torch.float32:
            assert torch.equal(t.float(), ref[k].float()), k
        elif t.dtype == dt:  # an fp8 tensor: the nearest fp8 value of the float32 one (a file's scaled layers as stored)
            if k[:-len("weight")] + "scale_weight" not in sd:
                assert torch.equal(t.view(torch.uint8), ref[k].float().to(dt).view(torch.uint8)), k
        else:  # a Linear's bias held in the compute dtype: fp8 values
            assert torch.equal(t, t.to(dt).to(t.dtype)) and torch.equal(t, ref[k].float().to(dt).float()), k


def test_lora_on_fp8_norm_weights_rounds_stochastically(models):
    from twinflow.quant.lora import apply_lora
    from twinflow.quant.storage import comfy_key_seed, stochastic_round_fp8

    (m,) = _core("UNETLoader").load_unet(cf.T2V_FILES["unet"], "fp8_e4m3fn")
    norm = m.module.blocks[0].self_attn.norm_q
    g = torch.Generator().manual_seed(3)
    diff = torch.randn(norm.weight.shape, generator=g) * 0.01
    out = apply_lora(m.module, {"diffusion_model.blocks.0.self_attn.norm_q.diff": diff}, 0.5)
    w = out.blocks[0].self_attn.norm_q.weight
    # ComfyUI's patcher: merged in float32, stored back with stochastic_rounding(seed=string_to_seed(key))
    want = stochastic_round_fp8(norm.weight.float() + 0.5 * diff, torch.float8_e4m3fn,
                                comfy_key_seed("diffusion_model.blocks.0.self_attn.norm_q.weight"))
    assert w.dtype == torch.float8_e4m3fn and torch.equal(w.view(torch.uint8), want.view(torch.uint8))
    assert norm.weight.dtype == torch.float8_e4m3fn  # the loaded model is untouched


def test_unet_loader_fp8_scaled_file_computes_dequantized(models):
    from safetensors.torch import load_file

    from twinflow.models import wan_dit

    (m,) = _core("UNETLoader").load_unet(cf.T2V_22_FILES["low"], "default")
    sd = load_file(str(models / "diffusion_models" / cf.T2V_22_FILES["low"]))
    deq = {k: (v.float() * sd[k[: -len("weight")] + "scale_weight"]) if (k[: -len("weight")] + "scale_weight") in sd else v
           for k, v in sd.items() if not k.endswith("scale_weight") and k != "scaled_fp8"}
    ref = wan_dit.wan_dit_from_state_dict(deq, dtype=torch.float32)
    # ComfyUI (comfy.ops.scaled_fp8_ops): every Linear of the model is created in fp8, so loading rounds the
    # weights of the file's unscaled Linears (scale 1) and every Linear's bias to the nearest fp8 value
    scaled = {k[: -len(".scale_weight")] for k in sd if k.endswith(".scale_weight")}
    n_unscaled = 0
    with torch.no_grad():
        for name, lin in ref.named_modules():
            if isinstance(lin, torch.nn.Linear):
                if name not in scaled:
                    n_unscaled += 1
                    lin.weight.copy_(lin.weight.to(torch.float8_e4m3fn).float())
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias.to(torch.float8_e4m3fn).float())
    assert n_unscaled >= 5  # text/time embeddings, time projection, head
    x = torch.randn(1, 16, 1, 4, 4)
    t = torch.tensor([300.0])
    c = torch.randn(1, 7, ref.config.text_dim)
    y, r = m.module(x, t, c), ref(x, t, c)
    assert (y - r).abs().max() / r.abs().max() < 1e-5


# -------------------------------------------------------------------------------------------- images/VAE


def test_vae_encode_crops_like_comfyui_and_decode_tiled(models):
    vae, = _core("VAELoader").load_vae(cf.T2V_FILES["vae"])
    px = torch.rand(5, 19, 27, 3)
    (lat,) = _core("VAEEncode").encode(vae, px)
    # ComfyUI: crop to multiples of 8, centred ((19 % 8) // 2 = 1, (27 % 8) // 2 = 1), [-1, 1], (1, 3, T, H, W)
    crop = px[:, 1:17, 1:25]
    with torch.no_grad():
        ref = vae.encode(crop.movedim(-1, 0).unsqueeze(0) * 2 - 1)
    torch.testing.assert_close(lat["samples"], ref)
    assert lat["samples"].shape == (1, 16, 2, 2, 3)
    (a,) = _core("VAEDecode").decode(vae, lat)
    (b,) = _core("VAEDecodeTiled").decode(vae, lat, 256, 64, 64, 8)
    torch.testing.assert_close(a, b)


def test_comfy_tile_params_and_positions_follow_comfyuis_formulas():
    from twinflow.models.wan_vae_tiles import comfy_positions, comfy_tile_params

    # ComfyUI VAEDecodeTiled.decode + VAE.decode_tiled for Wan (8x spatial, 4x temporal), worked by hand:
    # defaults 512/64/64/8 -> 64 latent px, overlap 8; 16 latent frames, overlap max(1, min(8, 8 // 4)) = 2
    assert comfy_tile_params(512, 64, 64, 8) == ((16, 64, 64), (2, 8, 8))
    # overlap 32 > 64/4 -> 16 px = 2 latent; temporal 8 >= 2*4 -> 8 // 4 = 2 frames, overlap min(1, 1) = 1
    assert comfy_tile_params(64, 32, 8, 4) == ((2, 8, 8), (1, 2, 2))
    # temporal_overlap 8 > 12/2 -> halved to 4 -> 4 // 4 = 1; overlap 0 stays 0
    assert comfy_tile_params(256, 0, 12, 8) == ((3, 32, 32), (1, 0, 0))
    # tiled_scale_multidim: range(0, n - o, k - o), clamped to n - o, cut at the end
    assert comfy_positions(10, 8, 2) == [(0, 8), (6, 4)]
    assert comfy_positions(3, 2, 1) == [(0, 2), (1, 2)]
    assert comfy_positions(4, 2, 1) == [(0, 2), (1, 2), (2, 2)]
    assert comfy_positions(8, 8, 2) == [(0, 8)]
    assert comfy_positions(20, 8, 0) == [(0, 8), (8, 8), (16, 4)]


def _tiled_scale_multidim_restated(s, fn, tile, overlap, frames):
    """comfy/utils.py tiled_scale_multidim for one batch item, decode direction, Wan's index formulas (4, 8, 8)
    and upscale amounts (4n-3, 8, 8), written as ComfyUI writes it: a full-size mask multiplied slice by slice."""
    import itertools

    up = (frames, lambda n: 8 * n, lambda n: 8 * n)
    idx = (4, 8, 8)
    size = [up[d](s.shape[d + 2]) for d in range(3)]
    out = torch.zeros([1, 3] + size)
    div = torch.zeros([1, 3] + size)
    positions = [range(0, s.shape[d + 2] - overlap[d], tile[d] - overlap[d]) if s.shape[d + 2] > tile[d] else [0]
                 for d in range(3)]
    for it in itertools.product(*positions):
        s_in, at = s, []
        for d in range(3):
            pos = max(0, min(s.shape[d + 2] - overlap[d], it[d]))
            s_in = s_in.narrow(d + 2, pos, min(tile[d], s.shape[d + 2] - pos))
            at.append(idx[d] * pos)
        ps = fn(s_in)
        mask = torch.ones_like(ps)
        for d in range(2, 5):
            feather = up[d - 2](overlap[d - 2])
            if feather >= mask.shape[d]:
                continue
            for t in range(feather):
                a = (t + 1) / feather
                mask.narrow(d, t, 1).mul_(a)
                mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
        o, od = out, div
        for d in range(3):
            o, od = o.narrow(d + 2, at[d], mask.shape[d + 2]), od.narrow(d + 2, at[d], mask.shape[d + 2])
        o.add_(ps * mask)
        od.add_(mask)
    return out / div


def test_vae_decode_tiled_blends_comfyuis_tiles(models):
    vae, = _core("VAELoader").load_vae(cf.T2V_FILES["vae"])
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 16, 4, 10, 9, generator=g)
    (img,) = _core("VAEDecodeTiled").decode(vae, {"samples": z}, 64, 32, 8, 4)  # tiles (2, 8, 8), overlap (1, 2, 2)
    assert img.shape == (2 * 13, 80, 72, 3)
    with torch.no_grad():
        exact = vae.decode(z, tiling="off").float()
        with vae.raw_output():  # ComfyUI's Wan VAE returns unclamped values; process_output clamps after blending
            fn = lambda a: vae.decode(a, tiling="off").float()  # noqa: E731
            want = torch.cat([_tiled_scale_multidim_restated(z[i:i + 1], fn, (2, 8, 8), (1, 2, 2),
                                                             lambda n: max(0, 4 * n - 3)) for i in range(2)])
            assert fn(z).abs().max() > 1  # (so the clamp matters here)
    want = ((want + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).reshape(-1, 80, 72, 3)
    torch.testing.assert_close(img, want, rtol=0, atol=1e-6)
    exact = ((exact + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).reshape(-1, 80, 72, 3)
    assert (img - exact).abs().max() > 1e-3  # blended tiles, not the untiled decode (TwinFlow VAE Decode's)


def test_save_animated_webp_preview_and_load_image(tf_dirs):
    from PIL import Image

    ui = _core("SaveAnimatedWEBP").save_images(torch.rand(3, 8, 8, 3), 6.0, "ComfyUI", True, 80, "default")
    (e,) = ui["ui"]["images"]
    assert e["filename"] == "ComfyUI_00001_.webp" and ui["ui"]["animated"] == (True,)
    assert Image.open(tf_dirs["output"] / e["filename"]).n_frames == 3
    ui = _core("PreviewImage").save_images(torch.rand(2, 8, 8, 3))
    entries = ui["ui"]["images"]
    assert [x["type"] for x in entries] == ["temp", "temp"]
    assert all(x["filename"].startswith("ComfyUI_temp_") and x["filename"].endswith("_00001_.png") or
               x["filename"].endswith("_00002_.png") for x in entries)
    assert all((paths.temp_dir() / x["filename"]).is_file() for x in entries)
    rgba = (torch.rand(6, 7, 4) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgba, "RGBA").save(tf_dirs["input"] / "a.png")
    assert _core("LoadImage").VALIDATE_INPUTS("a.png") is True
    img, mask = _core("LoadImage").load_image("a.png")
    assert img.shape == (1, 6, 7, 3) and mask.shape == (1, 6, 7)
    # ComfyUI: IMAGE = rgb / 255, MASK = 1 - alpha / 255
    torch.testing.assert_close(img[0], torch.from_numpy(rgba[..., :3]).float() / 255)
    torch.testing.assert_close(mask[0], 1 - torch.from_numpy(rgba[..., 3]).float() / 255)


# --------------------------------------------------------------------------- Wan2.2 template end to end


def test_video_wan2_2_14B_t2v_template_runs_headless(model_files, tmp_path):
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    pytest.importorskip("av")
    from twinflow.runner.api import Runner

    ui = cf.template("video_wan2_2_14B_t2v.json")
    bypassed = {str(n["id"]) for n in ui["nodes"] if n.get("mode") == 4}
    assert bypassed and any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"])
    res = Runner().run(ui, overrides=["74.width=32", "74.height=32", "74.length=5"], output_dir=tmp_path / "out",
                       models_dir=model_files)
    assert not bypassed & set(res.executed)  # the bypassed group (mode 4) does not run
    assert {"83", "85", "81", "78", "80"} <= set(res.executed)
    (mp4,) = res.files()
    assert mp4.name == "ComfyUI_00001_.mp4" and mp4.parent.name == "video"
    import av

    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
    assert json.loads(json.dumps(res["80"]))["animated"] == [True]


def test_stochastic_round_fp8_is_unbiased_and_seeded():
    import zlib

    from twinflow.quant import storage

    x = torch.full((256, 256), 1.0 + 1.0 / 32)  # a quarter of the way from 1 to the next e4m3 value (1.125)
    r = storage.stochastic_round_fp8(x, torch.float8_e4m3fn, seed=3).float()
    assert set(r.unique().tolist()) == {1.0, 1.125}
    assert abs(r.mean().item() - x[0, 0].item()) < 2e-3  # unbiased: E[round(x)] = x
    torch.testing.assert_close(r, storage.stochastic_round_fp8(x, torch.float8_e4m3fn, seed=3).float(), rtol=0, atol=0)
    assert not torch.equal(r, storage.stochastic_round_fp8(x, torch.float8_e4m3fn, seed=4).float())
    exact = torch.tensor([[0.0, -2.0, 448.0, 2 ** -9, -3.5]])  # representable values stay put
    assert torch.equal(storage.stochastic_round_fp8(exact, torch.float8_e4m3fn, seed=1).float(), exact)
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    assert storage.comfy_key_seed(key) == zlib.crc32(key.encode())  # ComfyUI's string_to_seed is CRC-32
    assert storage.comfy_key_seed("blöck") == storage._crc_chars("blöck") != zlib.crc32("blöck".encode())
