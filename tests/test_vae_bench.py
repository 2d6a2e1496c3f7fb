"""benchmarks/vae.py harness: the smoke case end to end (ours and diffusers in child processes)."""
import json
import subprocess
import sys

import pytest
import torch

from twinflow.benchmarks.vae import CASES, CASES22
from twinflow.models.wan_vae import PRESETS, WanVAE


def test_vae_benchmark_smoke_case_runs_and_compares(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--cases", "smoke", "--repeats", "1",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["case"] == "smoke" and row["max_abs_diff"] < 1e-4  # same weights, same numerics
    # Each child measured what the case must hold: the model's weights sit in the RSS before the op, and
    # the op's peak above that holds at least the decoded video (1, 3, 1 + 4 * (T - 1), 8H, 8W) fp32.
    with torch.device("meta"):
        weight_mib = sum(t.numel() * 4 for t in WanVAE(PRESETS["wan2.1"]).state_dict().values()) / 2 ** 20
    _, _, t, h, w = CASES["smoke"][1]
    video_mib = 3 * (1 + 4 * (t - 1)) * 8 * h * 8 * w * 4 / 2 ** 20
    for impl in ("ours", "diffusers"):
        (run,) = row["runs"][impl]
        assert run["rss_before_mib"] >= weight_mib, (impl, run)
        assert run["peak_above_model_mib"] >= video_mib, (impl, run)
    # the ratios are of the two implementations' own timings (medians of one run each), not swapped
    ours, theirs = row["runs"]["ours"][0], row["runs"]["diffusers"][0]
    assert row["speedup"] == pytest.approx(theirs["seconds"] / ours["seconds"])
    assert row["cpu_speedup"] == pytest.approx(theirs["cpu_seconds"] / ours["cpu_seconds"])
    assert row["memory_ratio"] == pytest.approx(ours["peak_above_model_mib"] / theirs["peak_above_model_mib"])
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--cases", "nope"], check=True,
                       capture_output=True, cwd=tmp_path, timeout=120)
    for device, why in (("tpu", "use cpu or cuda"), ("cuda", "no CUDA device")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        bad = subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--cases", "smoke", "--device", device],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr[-500:]


@pytest.mark.slow
def test_vae_benchmark_wan22_smoke_case(tmp_path):
    """--family wan22: the real-config Wan2.2 VAE (704 M parameters) in both children, same weights."""
    pytest.importorskip("diffusers")
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--family", "wan22", "--cases", "smoke",
                          "--repeats", "1", "--threads", "2", "--json", str(out)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["family"] == "wan22" and row["case"] == "smoke" and row["max_abs_diff"] < 1e-4
    _, _, t, h, w = CASES22["smoke"][1]
    video_mib = 3 * (1 + 4 * (t - 1)) * 16 * h * 16 * w * 4 / 2 ** 20
    for impl in ("ours", "diffusers"):
        (run,) = row["runs"][impl]
        assert run["rss_before_mib"] >= 704e6 * 4 / 2 ** 20, (impl, run)  # the real config's weights
        assert run["peak_above_model_mib"] >= video_mib, (impl, run)
    bad = subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--family", "wan22", "--cases", "dec32whole"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "for --family wan22" in bad.stderr, bad.stderr[-500:]
