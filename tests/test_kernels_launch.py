"""Launcher logic without a GPU: the launchers run on fake CUDA tensors (FakeTensorMode: shapes,
dtypes and devices without memory) and `_runtime.launch` -- the launch boundary, the only place
that touches CuPy -- is replaced by a recorder that checks every argument against the kernel's C
signature parsed from its .cu source. Covers kernel choice (vector/scalar variant), grid/block
sizing, validation errors and the dispatcher's fallback reasons.
"""
import logging
import re

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from twinflow.core.log import forget_once
from twinflow.fused import _plan, _runtime, int8, norm, ops, rope, vae_norm

CT_DTYPES = {"float": torch.float32, "__half": torch.float16, "__nv_bfloat16": torch.bfloat16,
             "signed char": torch.int8, "int": torch.int32}
SCALARS = {"int": np.int32, "long long": np.int64, "float": np.float32}


def kernel_signature(module: str, expr: str) -> list:
    """[(C type with template arguments substituted, parameter name)] of a name expression."""
    base, targs = expr.split("<", 1)
    targs = [a.strip() for a in targs.rstrip(">").split(",")]
    src = _runtime.source(module)
    m = re.search(r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?"
                  + re.escape(base) + r"\s*\(([^)]*)\)", src)
    assert m, f"{base} not found in {module}.cu"
    tnames = [p.split()[-1] for p in m.group(1).split(",")]
    sub = dict(zip(tnames, targs))
    out = []
    for p in m.group(2).split(","):
        toks = p.replace("*", " * ").split()
        name = toks[-1]
        ctype = " ".join(sub.get(t, t) for t in toks[:-1] if t not in ("const", "__restrict__"))
        out.append((ctype, name))
    return out


class LaunchBoundary:
    """Stands in for `_runtime.launch`: records each launch after checking it against the C signature."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, name_expressions, kernel, grid, block, args, device):
        assert kernel in name_expressions, f"{kernel} is not compiled in module {module}"
        sig = kernel_signature(module, kernel)
        assert len(args) == len(sig), f"{kernel}: {len(args)} args for {len(sig)} params"
        for a, (ctype, name) in zip(args, sig):
            if ctype.endswith("*"):
                if a is None:
                    assert name in ("weight", "bias"), f"{kernel}: null {name}"
                    continue
                assert isinstance(a, torch.Tensor) and a.device == device and a.is_contiguous(), name
                assert a.dtype == CT_DTYPES[ctype[:-1].strip()], f"{kernel}: {name} is {a.dtype}, C type {ctype}"
            else:
                assert type(a) is SCALARS[ctype], f"{kernel}: {name} is {type(a).__name__}, C type {ctype}"
        assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1 and len(block) == 1
        assert block[0] % 32 == 0 and 32 <= block[0] <= 1024
        self.calls.append({"kernel": kernel, "grid": grid, "block": block, "args": args})

    @property
    def last(self):
        return self.calls[-1]


@pytest.fixture
def boundary(monkeypatch):
    b = LaunchBoundary()
    monkeypatch.setattr(_runtime, "launch", b)
    # Fake tensors have no address: every pointer is 16-byte aligned unless a test says otherwise.
    monkeypatch.setattr(_plan, "ptr", lambda t: getattr(t, "_test_ptr", 0))
    return b


@pytest.fixture
def fake():
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        yield mode


def cuda(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="cuda")


# ---------------------------------------------------------------------------------------------
# Kernel choice and launch geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,d,kernel,block", [
    (torch.bfloat16, 5120, "ln_modulate_kernel<__nv_bfloat16, 8, 1>", 640),   # Wan 14B
    (torch.bfloat16, 1536, "ln_modulate_kernel<__nv_bfloat16, 8, 1>", 192),   # Wan 1.3B
    (torch.float16, 64, "ln_modulate_kernel<__half, 8, 1>", 32),
    (torch.bfloat16, 16384, "ln_modulate_kernel<__nv_bfloat16, 8, 2>", 1024),
    (torch.float32, 5120, "ln_modulate_kernel<float, 4, 2>", 640),            # 1280 float4s, 2 per thread
    (torch.float32, 16384, "ln_modulate_kernel<float, 4, 4>", 1024),
    (torch.bfloat16, 4099, "ln_modulate_kernel<__nv_bfloat16, 1, 16>", 832),  # odd D: scalar, 5 per thread
    (torch.float32, 1, "ln_modulate_kernel<float, 1, 16>", 32),
])
def test_ln_modulate_geometry(fake, boundary, dtype, d, kernel, block):
    x = cuda((2, 32760, d), dtype)
    out = norm.ln_modulate_launch(x, cuda((2, 1, d), torch.float32), cuda((2, 1, d), dtype))
    assert out.shape == x.shape and out.dtype == torch.float32
    call = boundary.last
    assert call["kernel"] == kernel and call["grid"] == (65520,) and call["block"] == (block,)
    assert call["args"][5] == 32760  # rows_per_mod: every token of a sample shares its modulation


def test_misaligned_pointer_takes_scalar_variant(fake, boundary):
    x = cuda((3, 7, 64))
    x._test_ptr = 8  # e.g. a view starting mid-vector
    norm.ln_modulate_launch(x, cuda((3, 1, 64), torch.float32), cuda((3, 1, 64), torch.float32))
    assert boundary.last["kernel"] == "ln_modulate_kernel<__nv_bfloat16, 1, 16>"


def test_per_frame_modulation_groups(fake, boundary):
    b, f, s, d = 2, 21, 1560, 1536
    x = cuda((b, f, s, d))
    mods = cuda((b, f, 1, d), torch.float32)
    norm.ln_modulate_launch(x, mods, mods)
    args = boundary.last["args"]
    assert args[1].shape == (b * f, d) and args[5] == s  # one modulation row per frame


def test_fused_and_rms_norm_geometry(fake, boundary):
    x, y = cuda((1, 32760, 5120)), cuda((1, 32760, 5120))
    m = cuda((1, 1, 5120), torch.float32)
    ox, oy = norm.gated_residual_ln_modulate_launch(x, m, y, m, m)
    assert (ox.dtype, oy.dtype) == (torch.bfloat16, torch.float32)
    assert boundary.last["kernel"] == "gated_residual_ln_modulate_kernel<__nv_bfloat16, __nv_bfloat16, 8, 1>"
    norm.gated_residual_ln_modulate_launch(x.float(), m, y, m, m)
    assert boundary.last["kernel"] == "gated_residual_ln_modulate_kernel<float, __nv_bfloat16, 4, 2>"
    assert boundary.last["grid"] == (32760,) and boundary.last["block"] == (640,)
    q = cuda((1, 32760, 40, 128))
    out = norm.rms_norm_launch(q.flatten(2), cuda((5120,)))
    assert out.dtype == torch.bfloat16 and boundary.last["args"][1].dtype == torch.float32
    norm.rms_norm_launch(q, None)  # weightless: a null pointer
    assert boundary.last["args"][1] is None and boundary.last["block"] == (32,)


def test_elementwise_geometry(fake, boundary):
    x = cuda((2, 32760, 5120))
    norm.gated_residual_launch(x, cuda((2, 1, 5120), torch.float32), cuda((2, 32760, 5120)))
    call = boundary.last
    n_vec = 2 * 32760 * 5120 // 8
    assert call["kernel"] == "gated_residual_kernel<__nv_bfloat16, __nv_bfloat16, 8>"
    assert call["args"][4] == n_vec and call["grid"] == (_plan.MAX_GRID,) and call["block"] == (256,)
    small = cuda((1, 3, 7), torch.float32)
    norm.gated_residual_launch(small, cuda((1, 1, 7), torch.float32), cuda((1, 3, 7), torch.float32))
    assert boundary.last["kernel"] == "gated_residual_kernel<float, float, 1>" and boundary.last["grid"] == (1,)
    # Wan's residual stream is fp32 while the branch output is bf16: 16 bytes of fp32 per access.
    norm.gated_residual_launch(cuda((2, 9, 1536), torch.float32), cuda((2, 1, 1536), torch.float32),
                               cuda((2, 9, 1536)))
    assert boundary.last["kernel"] == "gated_residual_kernel<float, __nv_bfloat16, 4>"


def test_vae_norm_rope_int8_geometry(fake, boundary):
    x = cuda((1, 96, 3, 5, 8))
    out = vae_norm.rms_norm_cf_launch(x, cuda((96, 1, 1, 1)), cuda((96, 1, 1, 1)), silu=True)
    a = boundary.last["args"]
    assert out.shape == x.shape and boundary.last["kernel"] == "rms_norm_cf_kernel<__nv_bfloat16, 8>"
    assert (a[4], a[5], a[6], a[9]) == (96, 120, 15, 1)  # C, S, n_vec, silu
    assert boundary.last["grid"] == (2,) and boundary.last["block"] == (256,)  # 8 vectors per block
    assert abs(float(a[8]) - 96 ** 0.5) < 1e-6
    vae_norm.rms_norm_cf_launch(cuda((1, 96, 3, 5, 7)), cuda((96, 1, 1, 1)))  # S=105: scalar
    assert boundary.last["kernel"] == "rms_norm_cf_kernel<__nv_bfloat16, 1>"

    q = cuda((2, 30, 12, 128))
    rope.rope_apply_launch(q, cuda((30, 64), torch.float32), cuda((30, 64), torch.float32))
    a = boundary.last["args"]
    assert boundary.last["kernel"] == "rope_kernel<__nv_bfloat16, 8>"
    assert (a[4], a[5], a[6], a[7], a[8]) == (2 * 30 * 12 * 16, 64, 12, 30, 0)
    rope.rope_apply_launch(q, cuda((2, 30, 1, 64), torch.float32), cuda((2, 30, 1, 64), torch.float32))
    assert boundary.last["args"][8] == 1  # per-batch tables

    qq, sc = int8.quantize_int8_per_token_launch(cuda((4, 33), torch.float16))
    assert (qq.dtype, tuple(sc.shape)) == (torch.int8, (4, 1))
    assert boundary.last["kernel"] == "quantize_int8_kernel<__half, 1, 16>"
    acc = cuda((32760, 8960), torch.int32)
    y = int8.int8_gemm_epilogue_launch(acc, cuda((32760, 1), torch.float32), cuda((8960,), torch.bfloat16),
                                       None, "gelu_tanh", torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert boundary.last["kernel"] == "int8_gemm_epilogue_kernel<__nv_bfloat16, 1, 4>"
    assert boundary.last["args"][3] is None


# ---------------------------------------------------------------------------------------------
# Validation: launchers refuse what the kernels cannot take (CuPy itself checks nothing)
# ---------------------------------------------------------------------------------------------

def test_launchers_validate(fake, boundary):
    x = cuda((2, 3, 64))
    m = cuda((2, 1, 64), torch.float32)
    cases = [
        (lambda: norm.ln_modulate_launch(torch.empty(2, 3, 64), m, m), "CUDA tensors"),
        (lambda: norm.ln_modulate_launch(cuda((2, 3, 64), torch.float64), m, m), "dtype float64"),
        (lambda: norm.ln_modulate_launch(cuda((2, 64, 3)).transpose(1, 2), m, m), "not contiguous"),
        (lambda: norm.ln_modulate_launch(cuda((1, 2, 40000)), cuda((1, 1, 40000)), cuda((1, 1, 40000))), "longer than"),
        (lambda: norm.ln_modulate_launch(x, cuda((1, 3, 64)), m), "does not group"),
        (lambda: norm.ln_modulate_launch(x, cuda((2, 1, 32)), m), "last dim 32"),
        (lambda: norm.gated_residual_launch(x, m, cuda((2, 3, 64), torch.float64)), "y has dtype float64"),
        (lambda: vae_norm.rms_norm_cf_launch(cuda((1, 4, 2, 3, 3)), cuda((4, 1, 1))), "expected (4, 1, 1, 1)"),
        (lambda: norm.rms_norm_launch(x, cuda((63,))), "expected (64,)"),
        (lambda: vae_norm.rms_norm_cf_launch(cuda((1, 4, 2, 3, 3)), cuda((4, 1, 1, 1), torch.float32)), "dtype"),
        (lambda: vae_norm.rms_norm_cf_launch(cuda((4, 3)), cuda((4, 1))), "[B, C, T, H, W]"),
        (lambda: rope.rope_apply_launch(cuda((1, 5, 2, 8)), cuda((5, 4), torch.float64), cuda((5, 4), torch.float64)),
         "float32 tables"),
        (lambda: rope.rope_apply_launch(cuda((1, 5, 2, 8)), cuda((6, 4), torch.float32), cuda((6, 4), torch.float32)),
         "expected [L, Dh/2]"),
        (lambda: int8.int8_gemm_epilogue_launch(cuda((2, 4), torch.int32), cuda((2, 1), torch.float32),
                                                cuda((4,), torch.float32), None, "relu"), "unknown activation"),
        (lambda: int8.int8_gemm_epilogue_launch(cuda((2, 4), torch.float32), cuda((2, 1), torch.float32),
                                                cuda((4,), torch.float32)), "dtype float32"),
        (lambda: int8.quantize_int8_per_token_launch(cuda((0, 8))), "non-empty"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            fn()
    assert boundary.calls == []  # nothing was launched


def test_grad_inputs_are_refused(fake, boundary):
    x = cuda((2, 3, 64), torch.float32).requires_grad_()
    assert "no backward" in norm.rms_norm_unsupported(x, None)
    with torch.no_grad():
        assert norm.rms_norm_unsupported(x, None) is None


def test_launch_args_must_be_numpy_scalars():
    with pytest.raises(TypeError, match="numpy"):
        _runtime._as_arg(5)
    assert _runtime._as_arg(None) == np.uint64(0)
    assert type(_runtime._as_arg(np.float32(1.0))) is np.float32


def test_sources_carry_the_shared_header():
    for module in ("norm", "vae_norm", "rope", "int8"):
        src = _runtime.source(module)
        assert "#include <cuda_bf16.h>" in src and "namespace tf" in src
        # NVRTC has no host C++ headers: only the CUDA fp16/bf16 headers may be included.
        assert set(re.findall(r"#include\s*<([^>]+)>", src)) == {"cuda_fp16.h", "cuda_bf16.h"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_reason():
    _runtime.reset_probe()
    assert _runtime.unavailable_reason() == "torch sees no CUDA device"


# ---------------------------------------------------------------------------------------------
# The dispatcher's choice with a usable CuPy (pretended) and fake CUDA inputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def cupy_usable(monkeypatch):
    monkeypatch.setattr(_runtime, "unavailable_reason", lambda: None)
    ops.set_mode("auto")
    yield
    ops.set_mode("auto")


def test_dispatch_routes_supported_inputs_to_the_kernel(cupy_usable, fake, boundary):
    x, m = cuda((2, 3, 64)), cuda((2, 1, 64), torch.float32)
    out = ops.ln_modulate(x, m, m)  # under FakeTensorMode the custom op's fake impl answers
    assert out.dtype == torch.float32 and ops.op_status()["ln_modulate"] == ("cupy", None)
    # The custom op's real implementation calls the launcher, i.e. the launch boundary.
    ops._run("rms_norm", norm.rms_norm_unsupported, norm.rms_norm_launch, ops.rms_norm_ref, x, None, 1e-6)
    assert boundary.last["kernel"] == "rms_norm_kernel<__nv_bfloat16, 8, 1>"


def test_dispatch_falls_back_with_reason(cupy_usable, fake, boundary, caplog):
    forget_once("twinflow.fused")
    xt = cuda((2, 64, 3)).transpose(1, 2)
    m = cuda((2, 1, 64), torch.float32)
    with caplog.at_level(logging.INFO, logger="twinflow.fused.ops"):
        ops.ln_modulate(xt, m, m)
        path, reason = ops.op_status()["ln_modulate"]
        assert path == "torch" and "not contiguous" in reason
        ops.set_mode("cupy")  # asked for the kernel: a fallback is a warning
        ops.rms_norm(cuda((2, 3, 64), torch.float64), None)
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "rms_norm" in warn[0].getMessage() and "float64" in warn[0].getMessage()
    ops.set_mode("torch")
    ops.ln_modulate(cuda((2, 3, 64)), m, m)
    assert ops.op_status()["ln_modulate"] == ("torch", "kernel mode is 'torch'")
    assert boundary.calls == []


def test_launch_boundary_glue_with_a_stand_in_cupy(monkeypatch):
    """`_runtime.launch` itself, with a stand-in `cupy` module: the module is built from our source
    with every instantiation, the launch goes to torch's current stream of the tensor's device,
    tensors become device pointers and None a null pointer."""
    import sys
    import types

    seen = {}

    class Device:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            seen.setdefault("devices", []).append(self.i)

        def __exit__(self, *exc):
            return False

    class ExternalStream:
        def __init__(self, ptr, device_id):
            self.ptr, self.device_id = ptr, device_id

    class RawModule:
        def __init__(self, code, options, name_expressions):
            seen["module"] = (code, options, name_expressions)

        def get_function(self, name):
            def fn(grid, block, args, stream=None):
                seen["launch"] = (name, grid, block, args, stream)
            return fn

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream),
                                      RawModule=RawModule)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(_runtime, "_functions", {})

    class Stream:
        cuda_stream = 0xABC0

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    x = torch.zeros(4, 8)
    kernel = "rms_norm_kernel<float, 4, 4>"
    _runtime.launch("norm", norm.INSTANCES, kernel, (4,), (32,), (x, None, x, np.int32(8), np.float32(1e-6)),
                    torch.device("cuda", 1))
    code, options, exprs = seen["module"]
    assert code == _runtime.source("norm") and options == _runtime.NVRTC_OPTIONS and exprs == norm.INSTANCES
    name, grid, block, args, stream = seen["launch"]
    assert (name, grid, block) == (kernel, (4,), (32,))
    assert (stream.ptr, stream.device_id) == (0xABC0, 1) and seen["devices"] == [1, 1]
    assert args[0] == np.uint64(x.data_ptr()) and args[1] == np.uint64(0) and type(args[3]) is np.int32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_benchmark_says_it_needs_a_gpu(capsys):
    from twinflow.benchmarks import fused as bench

    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
