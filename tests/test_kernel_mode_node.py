"""The Kernel Mode node: the mode is in force only inside the wrapped model's forward."""
import pytest
import torch

from twinflow import fused
from twinflow.core.handles import Denoiser
from twinflow.nodes.compile import TwinFlowKernelMode


class _Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, ctx):
        self.seen.append(fused.get_mode())
        return x * 2


def test_mode_applies_inside_forward_only():
    probe = _Probe()
    den = Denoiser(probe, "wan_dit", 16)
    out = TwinFlowKernelMode().apply(den, "torch")
    new, status = out["result"]
    assert den.module is probe and new.module is not probe  # input handle untouched
    before = fused.get_mode()
    x = torch.ones(1, 16, 1, 2, 2)
    torch.testing.assert_close(new.velocity(x, torch.tensor(0.5), None), x * 2)
    assert probe.seen == ["torch"] and fused.get_mode() == before
    assert "kernels" in status.lower() and new.info["kernels"] == "torch"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        TwinFlowKernelMode().apply(Denoiser(_Probe(), "wan_dit", 16), "fast")
