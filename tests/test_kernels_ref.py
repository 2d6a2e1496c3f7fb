"""The torch references (`<op>_ref`, the spec of every kernel) against independent plain-PyTorch
compositions computed in float64 (nn.LayerNorm, F.rms_norm, complex multiplication, explicit
formulas), over odd shapes and fp32/fp16/bf16; the CPU dispatcher (bit-identical to the references,
reasons logged once); the custom ops under torch.export and one inductor compile.
"""
import logging
import math

import pytest
import torch

from twinflow.core.log import forget_once
from twinflow.fused import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROW_SHAPES = [(1, 1, 1), (2, 3, 7), (1, 5, 33), (3, 2, 64), (2, 1, 130)]


def ulp(dtype):
    return torch.finfo(dtype).eps


def close(actual, expected, dtype, ulps=1.0, extra_atol=0.0, mag=None):
    """|a - e| <= ulps * eps(dtype) * (m + max m/64) + extra_atol in float64, m = |e| (or the
    operands' magnitude `mag` where a sum may cancel)."""
    a, e = actual.double(), expected.double()
    m = e.abs() if mag is None else mag.double().abs()
    tol = ulps * ulp(dtype) * (m + m.max() / 64) + extra_atol
    bad = (a - e).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} off; max err {(a - e).abs().max().item():.3g}"


def rand(shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)


@pytest.fixture(autouse=True)
def _mode_auto():
    ops.set_mode("auto")
    yield
    ops.set_mode("auto")


# ---------------------------------------------------------------------------------------------
# <op>_ref against independent compositions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_ln_modulate_ref(shape, dtype):
    b, l, d = shape
    x = rand(shape, dtype, 3.0, 5.0)  # a large mean: the variance must not cancel
    shift, scale = rand((b, 1, d), dtype), rand((b, 1, d), dtype, 0.5)
    ln = torch.nn.LayerNorm(d, eps=1e-6, elementwise_affine=False, dtype=torch.float64)
    want = ln(x.double()) * (1 + scale.double()) + shift.double()
    got = ops.ln_modulate_ref(x, shift, scale, 1e-6)
    assert got.dtype == torch.float32 and got.shape == shape
    close(got, want, torch.float32, ulps=64)


def test_ln_modulate_ref_per_frame_modulation():
    b, f, s, d = 2, 3, 4, 16
    x = rand((b, f, s, d), torch.bfloat16)
    shift, scale = rand((b, f, 1, d), torch.float32), rand((b, f, 1, d), torch.float32)
    got = ops.ln_modulate_ref(x, shift, scale)
    for fi in range(f):  # frame by frame with per-sample modulation: the same thing
        want = ops.ln_modulate_ref(x[:, fi], shift[:, fi], scale[:, fi])
        torch.testing.assert_close(got[:, fi], want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_gated_residual_and_fused_ref(shape, dtype):
    b, l, d = shape
    x, y = rand(shape, dtype, 4.0), rand(shape, dtype)
    gate, shift, scale = rand((b, 1, d), torch.float32), rand((b, 1, d), torch.float32), rand((b, 1, d), torch.float32)
    want_x = torch.addcmul(x.double(), y.double(), gate.double())
    got_x = ops.gated_residual_ref(x, gate, y)
    assert got_x.dtype == dtype
    # One rounding to dtype, after fp32 roundings of the product and the sum (relative to the operands).
    close(got_x, want_x, dtype, ulps=1.0 if dtype != torch.float32 else 2.0,
          mag=x.double().abs() + (y.double() * gate.double()).abs())

    fx, fy = ops.gated_residual_ln_modulate_ref(x, gate, y, shift, scale, 1e-6)
    assert torch.equal(fx, got_x)
    ln = torch.nn.LayerNorm(d, eps=1e-6, elementwise_affine=False, dtype=torch.float64)
    # The LN sees x' as stored (rounded to dtype), as the next block would.
    close(fy, ln(fx.double()) * (1 + scale.double()) + shift.double(), torch.float32, ulps=64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES + [(2, 5, 3, 128)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_ref(shape, dtype, with_weight):
    d = shape[-1]
    x = rand(shape, dtype, 2.0)
    w = rand((d,), dtype) if with_weight else None
    want = torch.nn.functional.rms_norm(x.double(), (d,), None if w is None else w.double(), eps=1e-6)
    got = ops.rms_norm_ref(x, w, 1e-6)
    assert got.dtype == dtype
    close(got, want, dtype, ulps=2.0, extra_atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 2, 5, 7), (2, 16, 1, 3, 4), (2, 5, 9, 11)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])  # no bias = the fused F.rms_norm path the VAE takes
@pytest.mark.parametrize("channels_last", [False, True])
def test_rms_norm_cf_ref(shape, dtype, silu, with_bias, channels_last):
    c = shape[1]
    x = rand(shape, dtype, 2.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    x[0, :, ..., 0] = 0.0  # all-zero channel vectors: F.normalize gives 0, so must the reference
    gshape = (c,) + (1,) * (len(shape) - 2)
    gamma, bias = rand(gshape, dtype), (rand(gshape, dtype, 0.1) if with_bias else None)
    xd = x.double()
    y = xd / torch.linalg.vector_norm(xd, dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(c)
    y = y * gamma.double() + (bias.double() if with_bias else 0.0)
    if silu:
        y = y * torch.sigmoid(y)
    got = ops.rms_norm_cf_ref(x, gamma, bias, silu=silu)
    assert got.dtype == dtype
    # The reference computes in x's dtype, rounding after each of ~5 ops.
    close(got, y, dtype, ulps=6.0, extra_atol=1e-6)


def _wan_angles(l_f, l_h, l_w, dh=128):
    """Wan's 3D RoPE angles for a (l_f, l_h, l_w) token grid: head dim split 44/42/42 (pairs)."""
    half = dh // 2
    parts = (half - 2 * (half // 3), half // 3, half // 3)  # 22, 21, 21 pairs = 44/42/42 dims
    out = []
    for n, size in zip(parts, (l_f, l_h, l_w)):
        inv = 1.0 / (10000 ** (torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n)))
        out.append(torch.outer(torch.arange(size, dtype=torch.float64), inv))
    f, h, w = out
    grid = torch.cat([f[:, None, None].expand(l_f, l_h, l_w, -1), h[None, :, None].expand(l_f, l_h, l_w, -1),
                      w[None, None, :].expand(l_f, l_h, l_w, -1)], dim=-1)
    return grid.reshape(l_f * l_h * l_w, half)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["2d", "4d"])
def test_rope_apply_ref_is_complex_multiplication(dtype, tables):
    b, h, dh = 2, 3, 128
    ang = _wan_angles(2, 3, 5, dh)  # L = 30
    l = ang.shape[0]
    x = rand((b, l, h, dh), dtype)
    cos, sin = ang.cos().float(), ang.sin().float()
    if tables == "4d":
        cos, sin = cos[None, :, None].expand(b, l, 1, dh // 2).contiguous(), sin[None, :, None].expand(b, l, 1, dh // 2).contiguous()
    # The official form: view pairs as complex numbers and multiply by e^{i*angle}.
    xc = torch.view_as_complex(x.double().reshape(b, l, h, dh // 2, 2).contiguous())
    rot = torch.complex(ang.cos(), ang.sin())[None, :, None, :]
    want = torch.view_as_real(xc * rot).reshape(b, l, h, dh)
    got = ops.rope_apply_ref(x, cos, sin)
    assert got.dtype == dtype
    close(got, want, dtype, ulps=1.0, extra_atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 4, 33)])
def test_quantize_int8_ref(shape, dtype):
    x = rand(shape, dtype, 3.0)
    q, scale = ops.quantize_int8_per_token_ref(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    amax = x.double().abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(scale.double(), amax / 127, rtol=2e-7, atol=0)
    # Round-to-nearest: dequantization error at most half a step; the max element maps to +-127.
    assert ((q.double() * scale.double() - x.double()).abs() <= scale.double() / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(dim=-1) == 127).all()


def test_quantize_int8_ref_closed_form():
    x = torch.tensor([[1.0, -2.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = ops.quantize_int8_per_token_ref(x)
    # 127/4 * [1, -2, 4] = [31.75, -63.5, 127] -> round half to even: 32, -64, 127.
    assert q.tolist() == [[32, -64, 127, 0], [0, 0, 0, 0]]
    assert scale[1].item() == pytest.approx(1e-8 / 127, rel=1e-6)  # eps keeps an all-zero row finite


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "silu"])
def test_int8_gemm_epilogue_ref(out_dtype, activation):
    m, n = 5, 7
    acc = torch.randint(-40000, 40000, (m, n), dtype=torch.int32)
    a_scale, w_scale, bias = torch.rand(m, 1) * 1e-3, torch.rand(n) * 1e-2, torch.randn(n)
    y = acc.double() * a_scale.double() * w_scale.double()[None] + bias.double()
    if activation == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    elif activation == "silu":
        y = y / (1 + torch.exp(-y))
    got = ops.int8_gemm_epilogue_ref(acc, a_scale, w_scale, bias, activation, out_dtype)
    assert got.dtype == out_dtype
    close(got, y, out_dtype, ulps=1.0, extra_atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.int8_gemm_epilogue_ref(acc, a_scale, w_scale, bias, "relu")


# ---------------------------------------------------------------------------------------------
# The dispatcher on the CPU: exactly the reference, with the reason said once
# ---------------------------------------------------------------------------------------------

def _all_op_calls(dtype=torch.bfloat16):
    b, l, d = 2, 5, 24
    x, y = rand((b, l, d), dtype), rand((b, l, d), dtype)
    m = [rand((b, 1, d), torch.float32) for _ in range(3)]
    v = rand((1, 8, 2, 3, 4), dtype)
    g = rand((8, 1, 1, 1), dtype)
    r = rand((1, 6, 2, 8), dtype)
    cs = torch.rand(6, 4)
    acc = torch.randint(-1000, 1000, (3, 8), dtype=torch.int32)
    return {
        "ln_modulate": (x, m[0], m[1], 1e-6),
        "gated_residual": (x, m[2], y),
        "gated_residual_ln_modulate": (x, m[2], y, m[0], m[1], 1e-6),
        "rms_norm": (x, rand((d,), dtype), 1e-6),
        "rms_norm_cf": (v, g, None, True, 1e-12),
        "rope_apply": (r, cs, cs.flip(0)),
        "quantize_int8_per_token": (x, 1e-8),
        "int8_gemm_epilogue": (acc, torch.rand(3, 1), torch.rand(8), torch.randn(8), "gelu_tanh", torch.bfloat16),
    }


def _equal(a, b):
    if isinstance(a, tuple):
        return all(_equal(p, q) for p, q in zip(a, b))
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_cpu_dispatch_is_bit_identical_to_reference(mode):
    ops.set_mode(mode)
    for op, args in _all_op_calls().items():
        got = getattr(ops, op)(*args)
        assert _equal(got, getattr(ops, f"{op}_ref")(*args)), op
        path, reason = ops.op_status()[op]
        assert path == "torch" and reason
        if mode == "torch":
            assert reason == "kernel mode is 'torch'"
        # The custom op (what traced graphs hold on the kernel path) runs the reference on the CPU too.
        assert _equal(getattr(torch.ops.twinflow, op)(*args), got), op


def test_fallback_reason_logged_once(caplog):
    forget_once("twinflow.fused")
    x, s = rand((1, 2, 8), torch.float32), rand((1, 1, 8), torch.float32)
    with caplog.at_level(logging.INFO, logger="twinflow.fused.ops"):
        for _ in range(3):
            ops.ln_modulate(x, s, s)
    msgs = [r.getMessage() for r in caplog.records if "ln_modulate" in r.getMessage()]
    assert len(msgs) == 1 and "torch reference" in msgs[0]


def test_set_mode_validates():
    with pytest.raises(ValueError, match="auto, cupy, torch"):
        ops.set_mode("fast")
    ops.set_mode("cupy")
    assert ops.get_mode() == "cupy"


def test_doctor_lines_name_every_op():
    from twinflow.fused import doctor_lines

    lines = doctor_lines()
    assert lines[0].startswith("fused kernels: mode")
    for op in ops.OPS:
        assert any(f"fused kernels: {op}:" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Custom ops in traced graphs
# ---------------------------------------------------------------------------------------------

def test_custom_ops_fake_impls_match_real():
    for op, args in _all_op_calls(torch.float16).items():
        torch.library.opcheck(getattr(torch.ops.twinflow, op).default, args,
                              test_utils=("test_schema", "test_faketensor"))


class _Block(torch.nn.Module):
    """A DiT-block-shaped use of the custom ops: modulate, gated residual + next modulate, q norm, RoPE."""

    def forward(self, x, e, y, cos, sin):
        shift, scale, gate = e.chunk(3, dim=1)
        h = torch.ops.twinflow.ln_modulate(x, shift, scale, 1e-6)
        x2, h2 = torch.ops.twinflow.gated_residual_ln_modulate(x, gate, y, shift, scale, 1e-6)
        q = torch.ops.twinflow.rms_norm(h2.to(x.dtype), None, 1e-6).unflatten(-1, (2, 8))
        return h, x2, torch.ops.twinflow.rope_apply(q, cos, sin)


def _block_inputs():
    b, l, d = 2, 6, 16
    return (rand((b, l, d), torch.float32), rand((b, 3, d), torch.float32), rand((b, l, d), torch.float32),
            torch.rand(l, 4), torch.rand(l, 4))


def test_export_keeps_one_node_per_custom_op():
    m, args = _Block(), _block_inputs()
    ep = torch.export.export(m, args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    for op in ("ln_modulate", "gated_residual_ln_modulate", "rms_norm", "rope_apply"):
        assert sum(t == f"twinflow.{op}.default" for t in targets) == 1, targets
    for a, b in zip(ep.module()(*args), m(*args)):
        assert torch.equal(a, b)


def test_public_ops_export_on_cpu_as_plain_aten():
    def f(x, s, w):
        return ops.rms_norm(ops.gated_residual(x, s, x), w) + ops.ln_modulate(x, s, s)

    class M(torch.nn.Module):
        def forward(self, x, s, w):
            return f(x, s, w)

    args = (rand((2, 3, 8), torch.float32), rand((2, 1, 8), torch.float32), rand((8,), torch.float32))
    ep = torch.export.export(M(), args)
    assert not any("twinflow" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(*args), f(*args))


def test_one_inductor_compile_of_public_and_custom_ops():
    torch._dynamo.reset()

    def f(x, e, y, cos, sin):
        h, x2, q = _Block()(x, e, y, cos, sin)
        # The public dispatcher traces without graph breaks (fullgraph) and picks the reference here.
        return h, x2, q, ops.ln_modulate(x2, e[:, :1], e[:, 1:2])

    args = _block_inputs()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    for got, want in zip(compiled(*args), f(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A second call with new values of the same shapes reuses the graph (the dispatcher's choice
    # is a trace-time constant, so it adds no guard that fails).
    args2 = _block_inputs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for got, want in zip(compiled(*args2), f(*args2)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_second_import_under_another_name_reuses_the_ops(tmp_path):
    """ComfyUI imports the pack under a path-derived module name; tests import `twinflow`. Both in
    one process must not collide on the `twinflow::` custom-op names."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(ops.__file__).resolve().parents[1]
    code = (
        "import importlib.util, sys, torch\n"
        "import twinflow.fused.ops as a\n"
        f"spec = importlib.util.spec_from_file_location('tf_copy', {str(root / '__init__.py')!r},"
        f" submodule_search_locations=[{str(root)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['tf_copy'] = m; spec.loader.exec_module(m)\n"
        "import importlib; b = importlib.import_module('tf_copy.fused.ops')\n"
        "assert a is not b\n"
        "x = torch.randn(2, 3, 8); s = torch.randn(2, 1, 8)\n"
        "assert torch.equal(b.ln_modulate(x, s, s), a.ln_modulate_ref(x, s, s))\n"
        "assert torch.equal(torch.ops.twinflow.ln_modulate(x, s, s, 1e-6), a.ln_modulate_ref(x, s, s))\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_rms_norm_cf_ref_out_writes_in_place_and_refuses_what_it_cannot_write():
    x = rand((1, 6, 3, 4), torch.float32, 2.0).contiguous(memory_format=torch.channels_last)
    gamma = rand((6, 1, 1), torch.float32)
    out = torch.empty_like(x)
    got = ops.rms_norm_cf_ref(x, gamma, None, silu=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, ops.rms_norm_cf_ref(x, gamma, None, silu=True))
    with pytest.raises(ValueError, match="out="):
        ops.rms_norm_cf_ref(x, gamma, gamma, out=out)  # a bias cannot be fused into the out= path
    with pytest.raises(ValueError, match="out="):
        ops.rms_norm_cf_ref(x, gamma, None, out=torch.empty(1, 6, 3, 5))
