"""Quantization: primitives vs closed-form bounds, QuantLinear vs plain torch, layer selection, refusals,
the accuracy report recomputed with numpy, and checkpoints (TwinFlow + ComfyUI layouts written here by hand)."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from safetensors.torch import save_file

from twinflow.core.errors import CheckpointError, UnsupportedError
from twinflow.models import loading
from twinflow.models.wan_dit import WanDiT, random_wan_dit
from twinflow.models.wan_dit import make_denoiser as wan_denoiser
from twinflow.quant import primitives as P
from twinflow.quant.checkpoint import is_quantized, load_quantized_into, quantized_state_dict, save_quantized
from twinflow.quant.formats import FORMATS, QuantOptions, get_format
from twinflow.quant.linear import QuantLinear
from twinflow.quant.report import QuantAccuracyError, quantize_denoiser
from twinflow.quant.swap import Recipe, quantize_module, select_layers

SIGMAS = (0.9, 0.5, 0.1)
SEEDS = (0,)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return random_wan_dit("tiny", seed=3)


@pytest.fixture(scope="module")
def den(tiny):
    return wan_denoiser(tiny, "random:tiny", "test")


def _w(n=48, k=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[3] *= 20.0  # one loud row: per-channel scales must not let it swamp the others
    w[5] = 0.0  # an all-zero row must quantize to zeros, not NaN
    return w


# ---------------------------------------------------------------------------------------------- primitives

def test_int8_per_channel_round_trip_bound():
    w = _w()
    q, s = P.quantize_int8_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (48,)
    amax = w.abs().max(dim=1).values
    torch.testing.assert_close(s[amax > 0], amax[amax > 0] / 127)
    err = (w - q.float() * s[:, None]).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step per element
    assert q.abs().max() <= 127 and torch.equal(q[5], torch.zeros_like(q[5]))
    torch.testing.assert_close(P.dequantize_int8_weight(q, s), q.float() * s[:, None], rtol=0, atol=0)


def test_int8_group_round_trip_bound():
    w = _w()
    q, s = P.quantize_int8_weight(w, group_size=16)
    assert s.shape == (48, 5)
    g = w.reshape(48, 5, 16)
    torch.testing.assert_close(s, g.abs().amax(-1).clamp_min(1e-12) / 127)
    deq = (q.float().reshape(48, 5, 16) * s[..., None]).reshape(48, 80)
    assert ((w - deq).abs().reshape(48, 5, 16) <= s[..., None] / 2 + 1e-6).all()
    torch.testing.assert_close(P.dequantize_int8_weight(q, s), deq, rtol=0, atol=0)
    with pytest.raises(ValueError, match="group_size 7"):
        P.quantize_int8_weight(w, group_size=7)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_round_trip_bound(per_channel):
    w = _w()
    q, s = P.quantize_fp8_weight(w, per_channel=per_channel)
    assert q.dtype == torch.float8_e4m3fn
    if per_channel:
        assert s.shape == (48,)
        ss = s[:, None]
    else:
        assert s.shape == ()
        torch.testing.assert_close(s, w.abs().max() / 448)
        ss = s
    deq = q.float() * ss
    # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normals; subnormal step 2^-9 (half: 2^-10).
    bound = torch.maximum(w.abs() * 2 ** -4, ss * 2 ** -10 * torch.ones_like(w)) + 1e-7
    assert ((w - deq).abs() <= bound).all()
    torch.testing.assert_close(P.dequantize_fp8_weight(q, s), deq, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 33), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 16))
def test_round_trip_property(n, k, scale, seed):
    """Any shape and magnitude: int8 within half a step per row, fp8 within its half-ulp/subnormal bound."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = P.quantize_int8_weight(w)
    assert ((w - P.dequantize_int8_weight(q, s)).abs() <= s[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
    q8, s8 = P.quantize_fp8_weight(w, per_channel=True)
    err = (w - P.dequantize_fp8_weight(q8, s8)).abs()
    bound = torch.maximum(w.abs() * 2 ** -4, s8[:, None].expand_as(w) * 2 ** -10) * (1 + 1e-5)
    assert (err <= bound).all()


def test_bad_weight_inputs():
    with pytest.raises(ValueError, match="2-D"):
        P.quantize_int8_weight(torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        P.quantize_fp8_weight(torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown quantization format"):
        get_format("int4")


# ---------------------------------------------------------------------------------------------- QuantLinear

def _lin(k=80, n=48, seed=1):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(_w(n, k, seed))
    return lin


@pytest.mark.parametrize("fmt,opts,scale_of", [
    ("int8_weight_only", {"group_size": 0}, lambda q: q.weight_scale[:, None]),
    ("int8_weight_only", {"group_size": 16},
     lambda q: q.weight_scale.repeat_interleave(16, dim=1)),
    ("fp8_e4m3_weight_only", {"per_channel": False}, lambda q: q.weight_scale),
    ("fp8_e4m3_weight_only", {"per_channel": True}, lambda q: q.weight_scale[:, None]),
])
def test_weight_only_linear_equals_f_linear_of_dequantized(fmt, opts, scale_of):
    lin = _lin()
    q = QuantLinear.from_linear(lin, fmt, opts)
    x = torch.randn(2, 7, 80)
    w_deq = q.weight.float() * scale_of(q)  # dequantized here, independently of the format code
    torch.testing.assert_close(q(x), F.linear(x, w_deq, lin.bias), rtol=1e-6, atol=1e-6)
    assert torch.equal(lin.weight, _w(48, 80, 1))  # the source layer is untouched


def _int8_dynamic_reference(x, wq, ws, b, smooth=None):
    """y = round(x'/sx) * sx @ (wq * ws)^T + b in float64, sx = amax(row)/127, x' = x / smooth."""
    x = x.double().reshape(-1, x.shape[-1])
    if smooth is not None:
        x = x / smooth.double()
    sx = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
    xq = torch.clamp(torch.round(x / sx), -127, 127)
    return (xq @ wq.double().T) * sx * ws.double()[None, :] + b.double()


def test_int8_dynamic_matches_closed_form():
    lin = _lin()
    q = QuantLinear.from_linear(lin, "int8_dynamic", {})
    x = torch.randn(3, 5, 80)
    ref = _int8_dynamic_reference(x, q.weight, q.weight_scale, lin.bias).float().reshape(3, 5, 48)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    # and it approximates the fp32 layer
    y = lin(x)
    assert (q(x) - y).norm() / y.norm() < 0.02


def test_int8_dynamic_smoothquant():
    lin = _lin()
    x = torch.randn(64, 80)
    x[:, 7] *= 50.0  # an outlier activation channel, SmoothQuant's target
    amax = x.abs().amax(0)
    s = P.smoothquant_scale(amax, lin.weight, alpha=0.5)
    expect = amax.sqrt() / lin.weight.abs().amax(0).sqrt()
    torch.testing.assert_close(s, expect, rtol=1e-5, atol=0)
    q = QuantLinear.from_linear(lin, "int8_dynamic", {}, smooth=s)
    assert q.pre_quant_scale is not None and q.layer_opts["smoothquant"]
    ref = _int8_dynamic_reference(x, q.weight, q.weight_scale, lin.bias, smooth=s).float()
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    plain = QuantLinear.from_linear(lin, "int8_dynamic", {})
    y = lin(x)
    err_smooth = ((q(x) - y).norm() / y.norm()).item()
    err_plain = ((plain(x) - y).norm() / y.norm()).item()
    assert err_smooth < err_plain  # smoothing helps on outlier channels


def test_fp8_dynamic_math_on_cpu_kernel():
    """The W8A8 fp8 math (per-row activation and weight scales) vs dequantized operands in float64."""
    lin = _lin(k=64, n=32)
    w8, ws = P.quantize_fp8_weight(lin.weight, per_channel=True)
    x = torch.randn(9, 64)
    y = P.fp8_dynamic_linear(x, w8, ws, lin.bias)
    xq, xs = P.quantize_fp8_activation(x)
    ref = (xq.double() * xs.double()) @ (w8.double() * ws.double()[:, None]).T + lin.bias.double()
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)


def test_quantlinear_cast_keeps_storage_dtypes():
    q = QuantLinear.from_linear(_lin(), "fp8_e4m3_weight_only", {"per_channel": True})
    q2 = q.to(torch.bfloat16)
    assert q2.weight.dtype == torch.float8_e4m3fn and q2.weight_scale.dtype == torch.float32
    assert q2.bias.dtype == torch.bfloat16
    y = q2(torch.randn(2, 80, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- selection / swap

def test_default_selection_on_wan(tiny):
    names = select_layers(tiny)
    expected = [f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    expected += [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    assert sorted(names) == sorted(expected)
    for kept in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_projection.1", "head.head"):
        assert kept not in names


def test_include_exclude_patterns(tiny):
    assert select_layers(tiny, include="blocks.*.ffn.*") == ["blocks.0.ffn.0", "blocks.0.ffn.2",
                                                              "blocks.1.ffn.0", "blocks.1.ffn.2"]
    names = select_layers(tiny, exclude="*.cross_attn.*, blocks.1.*")
    assert names == ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v",
                     "blocks.0.self_attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2"]
    with pytest.raises(ValueError, match="no linear layer matches.*text_embedding.0"):
        select_layers(tiny, include="nothing.*")


def test_default_selection_on_adaln_dit():
    """The adaLN-Zero DiT (wrapped as a velocity denoiser): attention and MLP linears only."""
    from twinflow.models.dit import make_denoiser, random_adaln_dit

    model, cfg = random_adaln_dit("tiny", seed=0)
    den = make_denoiser(model, cfg, name="random:tiny")
    names = select_layers(den.module)
    leaves = sorted({n.split("blocks.")[1].split(".", 1)[1] for n in names})
    assert leaves == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"] and len(names) == 8
    q, rep = quantize_denoiser(den, Recipe("int8_weight_only"), sigmas=SIGMAS, seeds=SEEDS)
    assert rep.passed and len(rep.layers) == 8


def test_swap_never_mutates_input(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    qm, records = quantize_module(tiny, Recipe("int8_weight_only"))
    assert len(records) == 20 and isinstance(qm.get_submodule("blocks.0.ffn.0"), QuantLinear)
    assert type(tiny.get_submodule("blocks.0.ffn.0")) is torch.nn.Linear
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k
    # high-precision layers are shared, not copied
    assert qm.head.head.weight is tiny.head.head.weight
    with pytest.raises(ValueError, match="already quantized"):
        quantize_module(qm, Recipe("int8_weight_only"))


# ---------------------------------------------------------------------------------------------- refusals

def test_fp8_dynamic_refused_on_cpu_naming_device(den):
    with pytest.raises(UnsupportedError, match=r"compute capability >= 8.9.*on cpu"):
        quantize_denoiser(den, Recipe("fp8_e4m3_dynamic"), sigmas=SIGMAS, seeds=SEEDS)
    with pytest.raises(UnsupportedError, match="cpu"):
        FORMATS["fp8_e4m3_dynamic"].check_device("cpu")
    # a layer that reached the CPU anyway (built directly, or moved after quantizing) refuses in forward
    q = QuantLinear.from_linear(_lin(k=64, n=32), "fp8_e4m3_dynamic", {"per_channel": True})
    with pytest.raises(UnsupportedError, match="on cpu"):
        q(torch.randn(2, 64))


def test_threshold_refusal_names_worst_layers(den):
    recipe = Recipe("int8_dynamic")
    with pytest.raises(QuantAccuracyError) as ei:
        quantize_denoiser(den, recipe, min_cosine=0.99999999, sigmas=SIGMAS, seeds=SEEDS)
    err = ei.value
    worst = err.report.worst_layers(3)
    assert worst and all(w.name in str(err) for w in worst)
    assert "below the threshold 0.99999999" in str(err) and "force" in str(err)
    # the ranking is by the measured layer output error
    outs = [l.output_rel_l2 for l in err.report.layers]
    assert worst[0].output_rel_l2 == max(outs)
    q, rep = quantize_denoiser(den, recipe, min_cosine=0.99999999, force=True, sigmas=SIGMAS, seeds=SEEDS)
    assert "FORCED" in rep.to_text() and isinstance(q.module.blocks[0].ffn[0], QuantLinear)


def test_comfy_model_refused(den):
    with pytest.raises(UnsupportedError, match="ComfyUI MODEL"):
        quantize_denoiser(den.clone(family="comfy"), Recipe("int8_weight_only"), sigmas=SIGMAS, seeds=SEEDS)


def test_smoothquant_needs_int8_dynamic(tiny):
    with pytest.raises(ValueError, match="int8_dynamic only"):
        quantize_module(tiny, Recipe("int8_weight_only", QuantOptions(smoothquant_alpha=0.5)), act_amax={})


# ---------------------------------------------------------------------------------------------- report

def _np_metrics(a, b):
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    d = b - a
    return {"cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
            "rel_l2": float(np.linalg.norm(d) / np.linalg.norm(a)),
            "psnr_db": float(20 * np.log10(np.abs(a).max() / np.sqrt(np.mean(d ** 2)))),
            "max_abs": float(np.abs(d).max())}


def test_report_recomputed_independently(den, tiny):
    q, rep = quantize_denoiser(den, Recipe("fp8_e4m3_weight_only"), sigmas=SIGMAS, seeds=(5,))
    assert rep.passed and rep.min_cosine == 0.999
    # inputs per the documented rule: Generator(seed) -> latent randn, then context randn (16 tokens)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 2, 16, 16, generator=g)
    ctx = torch.randn(1, 16, tiny.config.text_dim, generator=g)
    with torch.no_grad():
        for p, s in zip(rep.probes, SIGMAS):
            t = torch.full((1,), s * 1000.0)
            ref = tiny(x, t, ctx).numpy()
            out = q.module(x, t, ctx).numpy()
            m = _np_metrics(ref, out)
            assert p["sigma"] == s and p["seed"] == 5
            for key in m:
                assert math.isclose(p[key], m[key], rel_tol=1e-6, abs_tol=1e-9), (key, p[key], m[key])
    # bytes: every tensor of the model, once
    before = sum(v.numel() * v.element_size() for v in tiny.state_dict().values())
    after = sum(v.numel() * v.element_size() for v in q.module.state_dict().values())
    assert rep.weight_bytes_before == before and rep.weight_bytes_after == after and after < before
    # per-layer weight rel-L2 with numpy from the stored codes
    for layer in rep.layers:
        qm = q.module.get_submodule(layer.name)
        w = tiny.get_submodule(layer.name).weight.detach().numpy().astype(np.float64)
        deq = qm.weight.float().numpy().astype(np.float64) * float(qm.weight_scale)
        assert math.isclose(layer.weight_rel_l2, np.linalg.norm(deq - w) / np.linalg.norm(w), rel_tol=1e-6)
    text = rep.to_text()
    for needle in ("weights:", "cosine", "psnr_dB", "max_abs", "blocks.0.ffn.0", "PASS", "not time"):
        assert needle in text
    assert q.info["quant"]["recipe"]["format"] == "fp8_e4m3_weight_only"
    assert "quant" not in den.info  # the input handle is untouched


def test_report_sigma_validation(den):
    with pytest.raises(ValueError, match="3-5 values"):
        quantize_denoiser(den, Recipe("int8_weight_only"), sigmas=(0.5, 0.1), seeds=SEEDS)


# ---------------------------------------------------------------------------------------------- checkpoints

def _velocity(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 5, module.config.text_dim, generator=g)
    with torch.no_grad():
        return module(x, torch.tensor([600.0]), ctx)


def _meta_wan(cfg):
    with torch.device("meta"):
        return WanDiT(cfg)


@pytest.mark.parametrize("fmt,opts", [("int8_weight_only", QuantOptions(group_size=64)),
                                      ("fp8_e4m3_weight_only", QuantOptions()),
                                      ("int8_dynamic", QuantOptions())])
def test_save_load_bit_exact(tiny, tmp_path, fmt, opts):
    qm, _ = quantize_module(tiny, Recipe(fmt, opts))
    path = save_quantized(qm, tmp_path / "q.safetensors", recipe=Recipe(fmt, opts).to_json())
    with pytest.raises(FileExistsError):
        save_quantized(qm, path)
    sd, meta = loading.load_file(path)
    assert is_quantized(meta, sd) and "twinflow_quant" in meta
    assert ("_quantization_metadata" in meta) == (fmt == "fp8_e4m3_weight_only")
    loaded = load_quantized_into(_meta_wan(tiny.config), sd, meta, str(path))
    a, b = qm.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # The tensors are bit-identical (above); the forward may still differ in the last bits because tensors
    # read from a file sit at other memory alignments, which changes the CPU BLAS kernels' summation order.
    torch.testing.assert_close(_velocity(qm), _velocity(loaded), rtol=1e-4, atol=1e-4)


def _comfy_fp8(w):
    """ComfyUI's per-tensor scaled fp8, re-derived: scale = amax/448, weight = (w / scale).to(e4m3fn)."""
    scale = w.float().abs().max() / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def _comfy_reference(tiny, w8s):
    """The plain model with ComfyUI's dequantized weights: weight.to(dtype) * scale_weight."""
    ref = random_wan_dit("tiny", seed=3)
    with torch.no_grad():
        for name, (w8, s) in w8s.items():
            ref.get_submodule(name).weight.copy_(w8.float() * s)
    return ref


@pytest.mark.parametrize("layout", ["legacy", "quant_metadata", "comfy_quant_tensor"])
def test_comfy_scaled_fp8_files_load(tiny, tmp_path, layout):
    prefix = "model.diffusion_model."
    sd = {prefix + k: v.clone() for k, v in tiny.state_dict().items()}
    names = select_layers(tiny)
    w8s = {}
    for n in names:
        w8, s = _comfy_fp8(tiny.get_submodule(n).weight.detach())
        w8s[n] = (w8, s)
        sd[f"{prefix}{n}.weight"] = w8
        if layout == "legacy":
            sd[f"{prefix}{n}.scale_weight"] = s
            sd[f"{prefix}{n}.scale_input"] = torch.ones(())
        else:
            sd[f"{prefix}{n}.weight_scale"] = s
            sd[f"{prefix}{n}.input_scale"] = torch.tensor(0.5)
    meta = {}
    if layout == "legacy":
        sd[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif layout == "quant_metadata":
        meta["_quantization_metadata"] = json.dumps(
            {"format_version": "1.0", "layers": {prefix + n: {"format": "float8_e4m3fn"} for n in names}})
    else:
        for n in names:
            sd[f"{prefix}{n}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                         dtype=torch.uint8)
    path = tmp_path / "wan_fp8_scaled.safetensors"
    save_file(sd, str(path), metadata=meta)
    fsd, fmeta = loading.load_file(path)
    assert is_quantized(fmeta, fsd)
    fsd, _ = loading.strip_prefix(fsd, "head.modulation", (prefix,))
    if layout == "legacy":
        fsd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # a loader keeps the marker
    loaded = load_quantized_into(_meta_wan(tiny.config), fsd, fmeta, str(path))
    assert isinstance(loaded.blocks[1].cross_attn.k, QuantLinear)
    assert loaded.blocks[1].cross_attn.k.weight.dtype == torch.float8_e4m3fn
    ref = _comfy_reference(tiny, w8s)
    v_ref = _velocity(ref)
    torch.testing.assert_close(_velocity(loaded), v_ref, rtol=1e-5, atol=1e-5)
    # and through the quant-level Wan DiT loader, which detects the layout; the model's own loader reads plain
    # files only and refuses this one, naming the scale tensors it does not know
    from twinflow.models import wan_dit
    from twinflow.quant.load import load_wan_dit

    via_loader = load_wan_dit(path)
    assert isinstance(via_loader.blocks[0].ffn[2], QuantLinear)
    torch.testing.assert_close(_velocity(via_loader), v_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="scale"):
        wan_dit.load_wan_dit(path)


def test_legacy_without_marker_and_dtype_casts(tiny):
    """A prefix-stripping loader may drop a top-level `scaled_fp8` marker; `scale_weight` alone suffices.
    `dtype` casts only the high-precision tensors; `keep_fp32` keeps the fp32 islands."""
    from twinflow.models.wan_dit import keep_fp32

    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    w8, s = _comfy_fp8(tiny.blocks[0].ffn[0].weight.detach())
    sd["blocks.0.ffn.0.weight"], sd["blocks.0.ffn.0.scale_weight"] = w8, s
    assert is_quantized({}, sd)
    loaded = load_quantized_into(_meta_wan(tiny.config), sd, None, "legacy", dtype=torch.bfloat16,
                                 keep_fp32=keep_fp32)
    q = loaded.blocks[0].ffn[0]
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16 and loaded.blocks[0].ffn[2].weight.dtype == torch.bfloat16
    assert loaded.time_embedding[0].weight.dtype == torch.float32 and loaded.head.head.weight.dtype == torch.float32
    torch.testing.assert_close(q.dequantized_weight(), w8.float() * s, rtol=0, atol=0)


def test_per_row_fp8_scales_from_other_tools(tiny):
    """`_quantization_metadata` files with one (bf16) scale per output row load as per-channel fp8."""
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    w = tiny.blocks[1].self_attn.v.weight.detach()
    s = (w.abs().amax(1) / 448).to(torch.bfloat16)
    sd["blocks.1.self_attn.v.weight"] = (w / s.float()[:, None]).to(torch.float8_e4m3fn)
    sd["blocks.1.self_attn.v.weight_scale"] = s[:, None]  # [N, 1]
    meta = {"_quantization_metadata": json.dumps({"layers": {"model.diffusion_model.blocks.1.self_attn.v":
                                                                 {"format": "float8_e4m3fn"}}})}
    loaded = load_quantized_into(_meta_wan(tiny.config), sd, meta)
    q = loaded.blocks[1].self_attn.v
    assert q.layer_opts["per_channel"] and q.weight_scale.shape == (256,) and q.weight_scale.dtype == torch.float32
    expect = sd["blocks.1.self_attn.v.weight"].float() * s.float()[:, None]
    torch.testing.assert_close(q.dequantized_weight(), expect, rtol=0, atol=0)


def test_writer_produces_comfy_layouts(tiny):
    qm, _ = quantize_module(tiny, Recipe("fp8_e4m3_weight_only"))
    sd, meta = quantized_state_dict(qm, layout="comfy_scaled_fp8", prefix="model.diffusion_model.")
    marker = sd["model.diffusion_model.scaled_fp8"]
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 2  # ComfyUI: 2 elements = weight-only matmul
    s = sd["model.diffusion_model.blocks.0.ffn.2.scale_weight"]
    assert s.dtype == torch.float32 and s.shape == ()
    w = tiny.blocks[0].ffn[2].weight.detach()
    w8, s_ref = _comfy_fp8(w)  # ComfyUI's own formula gives the same codes and scale
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert torch.equal(sd["model.diffusion_model.blocks.0.ffn.2.weight"].view(torch.uint8), w8.view(torch.uint8))
    assert "twinflow_quant" not in meta and not any(k.endswith(".weight_scale") for k in sd)
    sd2, meta2 = quantized_state_dict(qm, layout="comfy_quant_metadata")
    layers = json.loads(meta2["_quantization_metadata"])["layers"]
    assert layers["blocks.0.ffn.2"] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert len(layers) == 20
    q8, _ = quantize_module(tiny, Recipe("int8_weight_only"))
    with pytest.raises(ValueError, match="one fp32 scale per tensor.*int8_weight_only"):
        quantized_state_dict(q8, layout="comfy_scaled_fp8")


def test_unsupported_comfy_format_is_named(tiny):
    sd = dict(tiny.state_dict())
    meta = {"_quantization_metadata": json.dumps({"layers": {"blocks.0.ffn.0": {"format": "nvfp4"}}})}
    with pytest.raises(CheckpointError, match="blocks.0.ffn.0.*'nvfp4'"):
        load_quantized_into(_meta_wan(tiny.config), sd, meta)
    meta = {"_quantization_metadata": json.dumps({"layers": {"blocks.0.norm3": {"format": "float8_e4m3fn"}}})}
    with pytest.raises(CheckpointError, match="norm3.*not nn.Linear"):
        load_quantized_into(_meta_wan(tiny.config), sd, meta)


def test_missing_scale_reported(tiny):
    qm, _ = quantize_module(tiny, Recipe("int8_weight_only"))
    sd, meta = quantized_state_dict(qm)
    del sd["blocks.1.ffn.0.weight_scale"]
    with pytest.raises(CheckpointError, match="missing.*blocks.1.ffn.0.weight_scale"):
        load_quantized_into(_meta_wan(tiny.config), sd, meta)
    sd, meta = quantized_state_dict(qm)
    sd["blocks.0.ffn.2.weight"] = sd["blocks.0.ffn.2.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match="blocks.0.ffn.2.weight is torch.float8_e4m3fn.*stores torch.int8"):
        load_quantized_into(_meta_wan(tiny.config), sd, meta)
    with pytest.raises(CheckpointError, match="format_version"):
        load_quantized_into(_meta_wan(tiny.config), sd, {"twinflow_quant": json.dumps({"format_version": 99})})


# ---------------------------------------------------------------------------------------------- nodes

def test_nodes_quantize_and_save(den, tf_dirs):
    import shutil

    from twinflow.nodes.dit import TwinFlowLoadDiT
    from twinflow.nodes.quant import TwinFlowQuantizeModel, TwinFlowSaveQuantized
    from twinflow.quant.load import load_wan_dit

    out = TwinFlowQuantizeModel().quantize(den, format="int8_weight_only", report_sigmas="0.9, 0.5, 0.1")
    qmodel, text = out["result"]
    assert qmodel is not den and qmodel.module is not den.module and "worst cosine" in text
    assert out["ui"]["text"] == [text]
    assert type(den.module.blocks[0].ffn[0]) is torch.nn.Linear
    saver = TwinFlowSaveQuantized()
    p1 = saver.save(qmodel, "quant/tiny")["result"][0]
    p2 = saver.save(qmodel, "quant/tiny")["result"][0]
    assert p1 != p2 and str(tf_dirs["output"]) in p1
    loaded = load_wan_dit(p1)  # the quant-level loader hands the file to quant.checkpoint
    assert isinstance(loaded.blocks[0].ffn[0], QuantLinear)
    torch.testing.assert_close(_velocity(loaded), _velocity(qmodel.module), rtol=1e-4, atol=1e-4)
    (tf_dirs["models"] / "diffusion_models").mkdir()
    shutil.copy(p1, tf_dirs["models"] / "diffusion_models" / "q.safetensors")
    (node_model,) = TwinFlowLoadDiT().load("q.safetensors")  # the loader node reads it the same way
    assert node_model.family == "wan_dit" and isinstance(node_model.module.blocks[0].ffn[0], QuantLinear)
    torch.testing.assert_close(_velocity(node_model.module), _velocity(qmodel.module), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no quantized layers"):
        saver.save(den, "quant/plain")
    with pytest.raises(ValueError, match="fp8_scale applies to the fp8 formats"):
        TwinFlowQuantizeModel().quantize(den, format="int8_dynamic", fp8_scale="per_tensor")


def test_node_widgets_follow_conventions():
    from twinflow.nodes.quant import NODE_CLASS_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("TwinFlow") and cls.CATEGORY == "TwinFlow/quant" and cls.DESCRIPTION
        for name, (kind, opts) in cls.INPUT_TYPES()["required"].items():
            assert "tooltip" in opts, (node_id, name)
            if kind in ("INT", "FLOAT"):
                assert {"min", "max", "step", "default"} <= set(opts), (node_id, name)


def test_doctor_lines():
    from twinflow.quant import doctor_lines

    lines = doctor_lines()
    assert len(lines) == len(FORMATS)
    fp8 = [l for l in lines if "fp8_e4m3_dynamic" in l][0]
    if not torch.cuda.is_available():
        assert "unavailable" in fp8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_dynamic_on_gpu():
    lin = _lin(k=256, n=128).cuda().to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "fp8_e4m3_dynamic", {"per_channel": True})
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    y = q(x).float()
    ref = lin(x).float()
    assert (y - ref).norm() / ref.norm() < 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int_mm_padding_on_gpu_is_exact():
    """cuBLAS int8 GEMM needs M > 16 and K, N multiples of 8: odd shapes are zero-padded, exactly."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 20), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (12, 20), generator=g, dtype=torch.int8)
    out = P.int_mm(a.cuda(), b.cuda()).cpu()
    assert torch.equal(out, (a.long() @ b.long().T).int())
