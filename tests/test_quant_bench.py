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


def test_cpu_table_checks_int8_against_closed_form_and_compares_with_fp32():
    import torch

    from twinflow.benchmarks.quant import cpu_table

    (row,) = cpu_table(tokens=9, repeats=1, shapes=[("odd", 40, 24)])
    assert (row["M"], row["K"], row["N"]) == (9, 40, 24)
    assert row["int8_dynamic_err_vs_closed_form"] < 1e-6
    assert 0 < row["int8_dynamic_rel_l2_vs_fp32"] < 0.05  # quantized (not the fp32 path), and close to it
    if torch.backends.mkldnn.is_available():
        assert row["onednn_max_abs_vs_aten"] < 1e-5


def test_best_interleaved_is_the_best_of_each_after_a_warm_up(monkeypatch):
    """A scripted clock: each call of a peer advances it by that peer's next duration."""
    from twinflow.benchmarks import quant as bench

    clock, calls = [0.0], []
    durations = {"a": [0.5, 5.0, 3.0, 4.0], "b": [0.1, 2.0, 7.0, 2.5]}  # warm-up first (fastest: must not count)

    def peer(name):
        def run():
            calls.append(name)
            clock[0] += durations[name].pop(0)
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    best = bench._best_interleaved({"a": peer("a"), "b": peer("b")}, repeats=3)
    assert best == {"a": 3.0, "b": 2.0}
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then in rotation


def test_cpu_table_reports_the_timings_it_measured(monkeypatch):
    """Known timings in (one per peer), so the reported ms and ratios are checked against values computed here."""
    import torch

    from twinflow.benchmarks import quant as bench

    seconds = {"fp32_aten": 0.004, "fp32_onednn": 0.005, "int8_dynamic": 0.002, "int8_weight_only": 0.008}
    seen = []

    def fake_best(fns, repeats):
        seen.append((sorted(fns), repeats))
        return {name: seconds[name] for name in fns}

    monkeypatch.setattr(bench, "_best_interleaved", fake_best)
    (row,) = bench.cpu_table(tokens=5, repeats=7, shapes=[("odd", 24, 8)])
    onednn = torch.backends.mkldnn.is_available()
    assert seen == [(sorted(["fp32_aten", "int8_dynamic", "int8_weight_only"] + ["fp32_onednn"] * onednn), 7)]
    assert row["fp32_aten_ms"] == pytest.approx(4.0) and row["int8_dynamic_ms"] == pytest.approx(2.0)
    assert row["int8_weight_only_ms"] == pytest.approx(8.0)
    assert row["int8_dynamic_vs_aten"] == pytest.approx(2.0)  # fp32 time / int8 time: > 1 means int8 is faster
    assert row["int8_weight_only_vs_aten"] == pytest.approx(0.5)
    if onednn:
        assert row["fp32_onednn_ms"] == pytest.approx(5.0)
        assert row["int8_dynamic_vs_onednn"] == pytest.approx(2.5)
        assert row["int8_weight_only_vs_onednn"] == pytest.approx(0.625)
        assert row["onednn_vs_aten"] == pytest.approx(0.8)
