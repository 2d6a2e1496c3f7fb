"""benchmarks/vae.py harness: the smoke case end to end (ours and diffusers in child processes)."""
import json
import subprocess
import sys

import pytest


def test_vae_benchmark_smoke_case_runs_and_compares(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--cases", "smoke", "--repeats", "1",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["case"] == "smoke" and row["max_abs_diff"] < 1e-4  # same weights, same numerics
    assert row["speedup"] > 0 and row["median"]["ours"]["peak_above_model_mib"] >= 0
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--cases", "nope"], check=True,
                       capture_output=True, cwd=tmp_path, timeout=120)
    for device, why in (("tpu", "use cpu or cuda"), ("cuda", "no CUDA device")):
        if device == "cuda" and __import__("torch").cuda.is_available():
            continue
        bad = subprocess.run([sys.executable, "-m", "twinflow.benchmarks.vae", "--cases", "smoke", "--device", device],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr[-500:]
