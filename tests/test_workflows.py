"""The shipped workflows: the quickstart runs end to end through the CLI, and the generated files are
exactly what tools/build_workflows.py writes (so they never drift from the nodes' INPUT_TYPES)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "twinflow.runner.cli", "run", str(ROOT / "workflows" / "dual_branch_t2v.json"),
         "--output-dir", str(out), "--models-dir", str(tmp_path / "models"), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    videos = sorted(out.glob("twinflow/dual_branch_*.mp4"))
    plots = sorted(out.glob("twinflow/gate_*.png"))
    assert len(videos) == 1 and len(plots) == 1, proc.stdout
    av = pytest.importorskip("av")
    with av.open(str(videos[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)  # 3 latent frames -> 1 + 4*2 frames
    # The shipped trained models render the prompt ("a red ... square ... on a teal background"): a teal
    # background and a red object (measured: 3-15% of the pixels of frames 4-9 red; random weights give grey
    # noise with neither).
    import numpy as np

    video = np.stack(frames).astype(np.float64) / 255
    r, g, b = np.median(video.reshape(-1, 3), axis=0)
    assert g > r + 0.1 and b > r + 0.1, (r, g, b)
    red = (video[..., 0] - np.maximum(video[..., 1], video[..., 2])) > 0.25
    assert red[3:].mean() > 0.02, red.reshape(9, -1).mean(axis=1)
    assert str(videos[0].relative_to(tmp_path)) in proc.stdout  # the CLI says where outputs went


def test_generated_workflows_are_current():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "tools" / "build_workflows.py")
    build_workflows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_workflows)
    for name in build_workflows.WORKFLOWS:
        on_disk = json.loads((ROOT / "workflows" / name).read_text())
        assert on_disk == build_workflows.build(build_workflows.spec_for(name)), \
            f"workflows/{name} is stale: run tools/build_workflows.py"


@pytest.mark.slow
def test_wan22_dual_expert_workflow_runs_and_reports_the_preset(tmp_path):
    # the shipped Wan2.2 dual-expert workflow (two tiny random experts) through the headless runner
    from twinflow.runner.api import run_workflow
    from twinflow.sampling.experts import PRESETS
    from twinflow.sampling.schedules import sampler_sigmas

    res = run_workflow(ROOT / "workflows" / "wan22_dual_expert_t2v.json", output_dir=tmp_path / "out",
                       models_dir=tmp_path / "models", cache=False)
    (mp4,) = res.files()
    assert mp4.name == "wan22_dual_expert_00001_.mp4"
    report = res.results["6"][1][0]
    p = PRESETS["wan22_t2v_a14b"]
    assert "preset wan22_t2v_a14b" in report and "steps 12 (set)" in report and "boundary 0.875," in report
    assert "cfg high 4 / low 3," in report and "shift high 12 / low 12," in report and "uni_pc / wan_unipc" in report
    # one expert per step: the high-noise expert on the steps with sigma >= 0.875 of Wan's grid at shift 12
    k = sum(float(s) >= p.boundary for s in sampler_sigmas("wan_unipc", 12, p.shift_high, "uni_pc")[:-1])
    assert 0 < k < 12
    assert f"semantic (random:tiny): {k} forwards" in report and f"detail (random:tiny): {12 - k} forwards" in report
