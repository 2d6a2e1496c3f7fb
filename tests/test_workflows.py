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
    assert str(videos[0].relative_to(tmp_path)) in proc.stdout  # the CLI says where outputs went


def test_generated_workflows_are_current():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "tools" / "build_workflows.py")
    build_workflows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_workflows)
    for name, spec in build_workflows.WORKFLOWS.items():
        on_disk = json.loads((ROOT / "workflows" / name).read_text())
        assert on_disk == build_workflows.build(spec), f"workflows/{name} is stale: run tools/build_workflows.py"
