"""benchmarks/quant.py memory counts against closed-form byte formulas (meta tensors: no allocation)."""
import pytest

from twinflow.benchmarks.quant import memory_table
from twinflow.models.wan_dit import PRESETS


def _block_bytes(d, f, code_bytes, per_out_scales, extra_fp32=0):
    """One Wan block: 8 DxD attention linears + D->F, F->D FFN; everything else bf16."""
    weights = 8 * d * d + 2 * d * f
    out_channels = 8 * d + f + d
    others = out_channels + 2 * d + 4 * d + 6 * d  # biases, norm3 w+b, q/k RMSNorm x2 attns, modulation
    if code_bytes == 2:
        return 2 * (weights + others)
    return code_bytes * weights + 4 * per_out_scales + 2 * others + 4 * extra_fp32


@pytest.fixture(scope="module")
def rows():
    return {(r["preset"], r["recipe"]): r for r in memory_table()}


@pytest.mark.parametrize("preset", ["wan2.1-1.3b", "wan2.1-14b"])
def test_block_bytes_closed_form(rows, preset):
    cfg = PRESETS[preset]
    d, f = cfg.dim, cfg.ffn_dim
    per_channel = 8 * d + f + d
    assert rows[(preset, "bf16 (baseline)")]["block_bytes"] == _block_bytes(d, f, 2, 0)
    assert rows[(preset, "int8_weight_only")]["block_bytes"] == _block_bytes(d, f, 1, per_channel)
    assert rows[(preset, "int8_dynamic")]["block_bytes"] == _block_bytes(d, f, 1, per_channel)
    assert rows[(preset, "fp8_e4m3_weight_only")]["block_bytes"] == _block_bytes(d, f, 1, 10)  # one scale per tensor
    groups = 8 * d * (d // 128) + f * (d // 128) + d * (f // 128)
    assert rows[(preset, "int8_weight_only g128")]["block_bytes"] == _block_bytes(d, f, 1, groups)
    smooth = 8 * d + d + f  # pre_quant_scale [K] per layer
    assert rows[(preset, "int8_dynamic + SmoothQuant")]["block_bytes"] == _block_bytes(d, f, 1, per_channel, smooth)


def test_14b_model_halves(rows):
    base = rows[("wan2.1-14b", "bf16 (baseline)")]["model_bytes"]
    q = rows[("wan2.1-14b", "int8_weight_only")]["model_bytes"]
    assert 0.5 < q / base < 0.52


def test_cpu_table_checks_int8_against_closed_form_and_times_both_fp32_peers():
    import torch

    from twinflow.benchmarks.quant import cpu_table

    (row,) = cpu_table(tokens=9, repeats=1, shapes=[("odd", 40, 24)])
    assert row["int8_dynamic_err_vs_closed_form"] < 1e-6
    assert 0 < row["int8_dynamic_rel_l2_vs_fp32"] < 0.05
    assert row["fp32_aten_ms"] > 0 and row["int8_dynamic_ms"] > 0
    if torch.backends.mkldnn.is_available():
        assert row["fp32_onednn_ms"] > 0 and row["onednn_max_abs_vs_aten"] < 1e-5
        assert row["int8_dynamic_vs_onednn"] == pytest.approx(row["fp32_onednn_ms"] / row["int8_dynamic_ms"])
