"""core.cpu_linear: the oneDNN dense linear used by the Wan DiT and the weight-only quant formats."""
import pytest
import torch
import torch.nn.functional as F

from twinflow.core import cpu_linear
from twinflow.quant.linear import QuantLinear


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_linear_is_f_linear_math(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((2, 7, 48), (40, 48), (40,)))
    want = F.linear(x.double(), w.double(), b.double())
    got = cpu_linear.linear(x.to(dtype), w.to(dtype), b.to(dtype))
    assert got.dtype == dtype and got.shape == want.shape
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol
    gelu = cpu_linear.linear(x, w, b, gelu_tanh=True)
    torch.testing.assert_close(gelu.double(), F.gelu(want, approximate="tanh"), rtol=1e-5, atol=1e-5)


def test_falls_back_where_onednn_cannot_run():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    if cpu_linear.ONEDNN and torch.backends.mkldnn.is_available():
        assert cpu_linear.onednn_ok(x, w)
    assert not cpu_linear.onednn_ok(torch.randn(8, 3).t(), w)  # non-contiguous x
    assert not cpu_linear.onednn_ok(x, w.double())  # mixed dtypes
    assert not cpu_linear.onednn_ok(x.double(), w.double())  # fp64: aten only
    wg = w.clone().requires_grad_()
    assert not cpu_linear.onednn_ok(x, wg)  # autograd needs aten's formula
    y = cpu_linear.linear(x, wg)
    y.sum().backward()
    assert wg.grad is not None


ONEDNN_HERE = cpu_linear.ONEDNN and torch.backends.mkldnn.is_available()


@pytest.mark.skipif(not ONEDNN_HERE, reason="oneDNN's linear is used on x86_64 builds with mkldnn only")
def test_module_parameters_take_the_onednn_path():
    # nn.Linear holds nn.Parameter, a subclass of Tensor: it must be accepted (a regression once sent the
    # whole Wan DiT to aten's ~2x slower addmm without a word).
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert cpu_linear.onednn_ok(x, lin.weight, lin.bias)
        assert cpu_linear.onednn_ok(x.to(torch.bfloat16), lin.weight.to(torch.bfloat16)) == bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported())

    class Sub(torch.Tensor):  # a tensor subclass (as in traces and wrappers) keeps F.linear
        pass

    assert not cpu_linear.onednn_ok(x.as_subclass(Sub), lin.weight.detach())
    assert cpu_linear.status().startswith("oneDNN linear for fp32")


@pytest.mark.skipif(not ONEDNN_HERE, reason="oneDNN's linear is used on x86_64 builds with mkldnn only")
def test_wan_dit_forward_runs_every_linear_through_onednn(monkeypatch):
    from twinflow.models import wan_dit

    model = wan_dit.random_wan_dit("tiny", seed=0)
    seen = []
    real = cpu_linear.onednn_ok
    monkeypatch.setattr(cpu_linear, "onednn_ok", lambda *a: seen.append(real(*a)) or seen[-1])
    cfg = model.config
    x = torch.randn(1, cfg.in_dim, 1, 4, 4)
    with torch.inference_mode():
        model(x, torch.tensor([500.0]), torch.randn(1, 5, cfg.text_dim))
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} linears fell back to aten"


def test_weight_only_quant_runs_through_it(monkeypatch):
    lin = torch.nn.Linear(64, 32)
    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    for fmt in ("int8_weight_only", "fp8_e4m3_weight_only"):
        q = QuantLinear.from_linear(lin, fmt, {})
        x = torch.randn(5, 64)
        with torch.no_grad():
            torch.testing.assert_close(q(x), F.linear(x, q.dequantized_weight(), lin.bias), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
