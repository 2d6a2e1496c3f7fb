"""The CuPy kernels on a GPU: parity against an fp32 reference (error at most twice that of
`<op>_ref` run in the same low precision, plus a small atol), D in {64, 1536, 5120, odd}, rows from
1 to 32,760, NaN/Inf propagation, non-default streams, CUDA graph capture, determinism.
Skipped without CUDA + CuPy; run them whenever a GPU is available.
"""
import pytest
import torch

from twinflow.fused import _runtime, int8, norm, ops, rope, vae_norm

pytestmark = [pytest.mark.cuda, pytest.mark.cupy]


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    _runtime.reset_probe()
    return _runtime.unavailable_reason()


_REASON = _skip_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=f"CuPy kernels unavailable: {_REASON}"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, D): odd D takes the scalar variant; 32,760 rows is one Wan 480p clip (21 x 30 x 52).
ROWS_D = [(1, 64), (7, 1001), (333, 1536), (32760, 5120), (5, 4099), (2, 1)]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _cupy_mode():
    ops.set_mode("cupy")
    yield
    ops.set_mode("auto")


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_parity(kernel_out, ref_lp_out, ref_fp32_out, atol):
    """error(kernel) <= 2 * error(reference in low precision) + atol, both against fp32."""
    ek, er = _err(kernel_out, ref_fp32_out), _err(ref_lp_out, ref_fp32_out)
    assert ek <= 2 * er + atol, f"kernel error {ek:.3g} vs reference error {er:.3g} (+{atol:.3g})"


def _f32(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _atol(out):
    # fp32 accumulation order, FMA contraction and rsqrtf/expf/tanhf differ from torch's: a few
    # fp32 ulps of the output's magnitude (~4e-6 relative).
    return 32 * torch.finfo(torch.float32).eps * (1 + out.double().abs().max().item())


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", ROWS_D)
def test_ln_modulate_and_fused_parity(rows, d, dtype):
    x, y = _rand(1, rows, d, dtype=dtype, scale=4.0), _rand(1, rows, d, dtype=dtype)
    shift, scale, gate = (_rand(1, 1, d) for _ in range(3))
    got = norm.ln_modulate_launch(x, shift, scale, 1e-6)
    want = ops.ln_modulate_ref(*_f32((x, shift, scale)), 1e-6)
    assert_parity(got, ops.ln_modulate_ref(x, shift, scale, 1e-6), want, _atol(want))

    gx, gy = norm.gated_residual_ln_modulate_launch(x, gate, y, shift, scale, 1e-6)
    rx, ry = ops.gated_residual_ln_modulate_ref(x, gate, y, shift, scale, 1e-6)
    wx = ops.gated_residual_ref(*_f32((x, gate, y)))
    assert_parity(gx, rx, wx, _atol(wx))
    # The LN reads x' as stored; its reference is the fp32 LN of the same rounded x'.
    wy = ops.ln_modulate_ref(gx.float(), shift, scale, 1e-6)
    assert_parity(gy, ry, wy, _atol(wy))

    gr = norm.gated_residual_launch(x, gate, y)
    assert torch.equal(gr, gx)  # same formula, same rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", ROWS_D)
def test_rms_norm_parity(rows, d, dtype):
    x, w = _rand(rows, d, dtype=dtype, scale=3.0), _rand(d, dtype=dtype)
    want = ops.rms_norm_ref(x.float(), w.float())
    assert_parity(norm.rms_norm_launch(x, w), ops.rms_norm_ref(x, w), want, _atol(want))
    want = ops.rms_norm_ref(x.float(), None)
    assert_parity(norm.rms_norm_launch(x, None), ops.rms_norm_ref(x, None), want, _atol(want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96, 3, 32, 32), (2, 384, 1, 9, 13), (1, 16, 5, 7)])
@pytest.mark.parametrize("silu", [False, True])
def test_rms_norm_cf_parity(shape, dtype, silu):
    c = shape[1]
    x = _rand(*shape, dtype=dtype, scale=2.0)
    g = _rand(c, *([1] * (len(shape) - 2)), dtype=dtype)
    b = _rand(c, *([1] * (len(shape) - 2)), dtype=dtype, scale=0.1)
    want = ops.rms_norm_cf_ref(x.float(), g.float(), b.float(), silu)
    got = vae_norm.rms_norm_cf_launch(x, g, b, silu)
    assert got.dtype == dtype
    assert_parity(got, ops.rms_norm_cf_ref(x, g, b, silu), want, _atol(want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,l,h,dh", [(1, 1, 1, 2), (2, 7, 3, 128), (1, 32760, 12, 128), (1, 5, 2, 6)])
def test_rope_parity(b, l, h, dh, dtype):
    x = _rand(b, l, h, dh, dtype=dtype)
    ang = torch.rand(l, dh // 2, device=DEV) * 100
    cos, sin = ang.cos(), ang.sin()
    want = ops.rope_apply_ref(x.float(), cos, sin)
    assert_parity(rope.rope_apply_launch(x, cos, sin), ops.rope_apply_ref(x, cos, sin), want, _atol(want))
    c4, s4 = cos[None, :, None].expand(b, l, 1, dh // 2).contiguous(), sin[None, :, None].expand(b, l, 1, dh // 2).contiguous()
    assert torch.equal(rope.rope_apply_launch(x, c4, s4), rope.rope_apply_launch(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", ROWS_D)
def test_quantize_int8_matches_reference(rows, d, dtype):
    x = _rand(rows, d, dtype=dtype, scale=3.0)
    q, s = int8.quantize_int8_per_token_launch(x)
    rq, rs = ops.quantize_int8_per_token_ref(x)
    # The kernel divides amax by 127 exactly as the CPU reference; torch's CUDA divide-by-scalar
    # multiplies by the reciprocal instead, so the scales may differ in the last bit...
    torch.testing.assert_close(s, rs, rtol=2 ** -23, atol=0)
    # ...which can move a value sitting on a rounding tie by one step, and nothing else.
    assert (q.int() - rq.int()).abs().max().item() <= 1
    assert (q != rq).float().mean().item() < 1e-3
    # Against the CPU reference, which uses the kernel's operations, the match is exact.
    cq, cs = ops.quantize_int8_per_token_ref(x.cpu())
    assert torch.equal(s.cpu(), cs) and torch.equal(q.cpu(), cq)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "silu"])
@pytest.mark.parametrize("m,n", [(1, 1), (7, 33), (4096, 8960)])
def test_int8_epilogue_parity(m, n, activation, out_dtype):
    acc = torch.randint(-2**20, 2**20, (m, n), dtype=torch.int32, device=DEV)
    a, w, bias = torch.rand(m, 1, device=DEV) * 1e-4, torch.rand(n, device=DEV) * 1e-2, _rand(n, dtype=out_dtype)
    want = ops.int8_gemm_epilogue_ref(acc, a, w, bias, activation, torch.float32)
    got = int8.int8_gemm_epilogue_launch(acc, a, w, bias, activation, out_dtype)
    assert got.dtype == out_dtype
    assert_parity(got, ops.int8_gemm_epilogue_ref(acc, a, w, bias, activation, out_dtype), want, _atol(want))


def test_nan_inf_propagate():
    x = _rand(4, 1536, dtype=torch.bfloat16)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    m = _rand(1, 1536)  # one modulation row for all four rows of x
    for got, want in [
        (norm.ln_modulate_launch(x, m, m), ops.ln_modulate_ref(x, m, m)),
        (norm.rms_norm_launch(x, None), ops.rms_norm_ref(x, None)),
        (norm.gated_residual_launch(x, m, x), ops.gated_residual_ref(x, m, x)),
        (int8.quantize_int8_per_token_launch(x)[1], ops.quantize_int8_per_token_ref(x)[1]),
    ]:
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isnan(norm.rms_norm_launch(x, None)[1]).all()  # the NaN spreads over its row only
    assert not torch.isnan(norm.rms_norm_launch(x, None)[0]).any()


def test_public_ops_route_to_the_kernels():
    x, m = _rand(2, 9, 1536, dtype=torch.bfloat16), _rand(2, 1, 1536)
    out = ops.ln_modulate(x, m, m)
    assert ops.op_status()["ln_modulate"] == ("cupy", None)
    assert torch.equal(out, norm.ln_modulate_launch(x, m, m))


def test_non_default_stream_orders_with_torch_work():
    s = torch.cuda.Stream()
    m = _rand(1, 1, 5120)
    with torch.cuda.stream(s):
        # x is produced on s and consumed on s with no synchronisation: the launch must use s.
        x = torch.randn(1, 4096, 5120, device=DEV, dtype=torch.bfloat16) * 2
        out = ops.ln_modulate(x, m, m)
        want = ops.ln_modulate_ref(x, m, m)
    s.synchronize()
    assert_parity(out, want, want, _atol(want))


def test_cuda_graph_capture_and_replay():
    x = _rand(2, 300, 1536, dtype=torch.bfloat16)
    m = _rand(2, 1, 1536)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles the module outside the capture
        ops.ln_modulate(x, m, m)
        ops.rms_norm(x, None)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.ln_modulate(x, m, m)
        out2 = ops.rms_norm(x, None)
    x.copy_(_rand(2, 300, 1536, dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    want = ops.ln_modulate_ref(x, m, m)
    assert_parity(out, want, want, _atol(want))
    assert_parity(out2, ops.rms_norm_ref(x, None), ops.rms_norm_ref(x.float(), None), 1e-6)


def test_deterministic():
    x, y = _rand(1, 32760, 1536, dtype=torch.bfloat16), _rand(1, 32760, 1536, dtype=torch.bfloat16)
    m = _rand(1, 1, 1536)
    a = norm.gated_residual_ln_modulate_launch(x, m, y, m, m)
    b = norm.gated_residual_ln_modulate_launch(x, m, y, m, m)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(int8.quantize_int8_per_token_launch(x)[0], int8.quantize_int8_per_token_launch(x)[0])


def test_compiled_graph_calls_the_kernel():
    torch._dynamo.reset()
    x, m = _rand(2, 64, 1536, dtype=torch.bfloat16), _rand(2, 1, 1536)

    def f(x, m):
        return ops.ln_modulate(x, m, m).to(x.dtype) * 2

    got = torch.compile(f, fullgraph=True)(x, m)
    torch.testing.assert_close(got, f(x, m), rtol=0, atol=0)


def test_wan_mixed_dtype_residual():
    # Wan's block: fp32 residual stream x, bf16 branch output y, fp32 (B, 1, D) views of e0.
    e = _rand(2, 6, 1536)
    m = e.unsqueeze(2).unbind(1)  # non-contiguous (B, 1, D) views, as models/wan_dit.py makes them
    x, y = _rand(2, 777, 1536, scale=4.0), _rand(2, 777, 1536, dtype=torch.bfloat16)
    got = ops.gated_residual(x, m[2], y)
    assert ops.op_status()["gated_residual"] == ("cupy", None)
    want = ops.gated_residual_ref(x, m[2], y)
    assert_parity(got, want, want, _atol(want))
    gx, gy = ops.gated_residual_ln_modulate(x, m[2], y, m[3], m[4])
    assert torch.equal(gx, got)
    wy = ops.ln_modulate_ref(gx, m[3], m[4])
    assert_parity(gy, wy, wy, _atol(wy))
