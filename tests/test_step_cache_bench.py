"""benchmarks/step_cache.py --smoke, run as a user would (a subprocess outside the repository): its figures
against values recomputed here from what it saved and from the sampler reports it printed."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cache.py"


def _forwards(report: str) -> tuple[int, int]:
    """(forwards, latents) of the semantic branch from a sampler report's line (the branch's own counters)."""
    m = re.search(r"^semantic \([^)]*\): (\d+) forwards \((\d+) latents\)", report, re.M)
    assert m, report
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(tmp / "r.json"), "--save",
                           str(tmp / "saved")], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "r.json").read_text()), proc.stdout, tmp / "saved"


def test_forwards_saved_and_bound_follow_the_reports(smoke):
    res, _, _ = smoke
    m, lm = _forwards(res["uncached_report"])
    assert m == res["steps"] and lm == 2 * res["steps"]  # CFG batched: one forward of 2 latents per step
    for r in res["results"]:
        f, lat = _forwards(r["report"])
        assert (r["forwards_uncached"], r["forwards_saved"]) == (m, m - f)
        assert (r["latents_uncached"], r["latents_saved"]) == (lm, lm - lat)
        assert r["speedup_bound"] == pytest.approx(lm / lat)
        assert r["speedup"] == pytest.approx(r["seconds_uncached"] / r["seconds_cached"])
        assert r["policy_overhead_pct_of_step"] == pytest.approx(
            100 * r["policy_overhead_s"] / res["steps"] / (r["seconds_uncached"] / res["steps"]))
    by = {r["policy"]: r for r in res["results"]}
    assert by["easycache:0"]["forwards_saved"] == 0 and by["easycache:0"]["latent_rel_l2"] == 0.0
    assert math.isinf(by["easycache:0"]["frame_psnr_db"])
    mag = by["magcache:0.12,calibration=wan2.1-1.3b"]
    assert mag["latents_saved"] > 0  # the published table skips at 8 steps whatever the model: the case bites


def test_deviation_recomputed_from_the_saved_runs(smoke):
    res, _, saved = smoke
    ref = torch.load(saved / "run_0.pt")
    for i, r in enumerate(res["results"], 1):
        run = torch.load(saved / f"run_{i}.pt")
        rel = float((run["latent"] - ref["latent"]).norm() / ref["latent"].norm())
        assert r["latent_rel_l2"] == pytest.approx(rel, rel=1e-6, abs=1e-12)
        a, b = ((t.clamp(-1, 1) + 1) / 2 for t in (run["frames"], ref["frames"]))
        mse = float(((a - b) ** 2).mean())
        want = math.inf if mse == 0 else -10 * math.log10(mse)
        assert r["frame_psnr_db"] == pytest.approx(want, rel=1e-6)
        assert run["frames"].shape[1] == 3 and run["frames"].shape[2] == 1 + 4 * (run["latent"].shape[2] - 1)


def test_printed_table_rows_carry_the_figures(smoke):
    res, out, _ = smoke
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "forwards saved" not in ln]
    assert len(rows) == len(res["results"])
    for row, r in zip(rows, res["results"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == r["policy"]
        assert cells[1] == f"{r['forwards_saved']}/{r['forwards_uncached']}, {r['latents_saved']}/{r['latents_uncached']}"
        assert cells[2] == f"{r['speedup']:.2f}x ({r['speedup_bound']:.2f}x)"
        assert "random weights" in cells[4] and res["machine"] in cells[6]
    assert "random weights: the deviation says little" in out
