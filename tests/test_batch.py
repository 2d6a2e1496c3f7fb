"""`twinflow batch JOBS.jsonl` in process: each job's files equal `Runner().run` on the same workflow and
overrides (the runner is the oracle); a bad line is a usage error naming the line, nothing runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twinflow.runner.api import Runner, default_registry
from twinflow.runner.formats import load_workflow

ROOT = Path(__file__).resolve().parents[1]


def _prompt() -> dict:
    """The dual-branch workflow (API form) saving its decoded frame as a PNG (seed-dependent, lossless)."""
    p = load_workflow(ROOT / "workflows" / "dual_branch_t2v.json", default_registry()).prompt
    p["10"] = {"class_type": "TwinFlowSaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "batch/img"}}
    del p["11"]
    return p


BASE = {"6.width": 32, "6.height": 32, "6.length": 1, "7.steps": 1}


def _jobs(tmp_path: Path, seeds) -> Path:
    lines = [json.dumps({"workflow": _prompt(), "id": f"s{s}", "overrides": {**BASE, "7.seed": s}}) for s in seeds]
    p = tmp_path / "jobs.jsonl"
    p.write_text("# a seed sweep\n" + "\n".join(lines) + "\n")
    return p


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "twinflow.runner", "batch", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_batch_equals_runner(tmp_path):
    jobs = _jobs(tmp_path, (5, 6))
    r = _cli(jobs, "--output-dir", tmp_path / "out", "--models-dir", tmp_path / "models", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["line"], x["id"], x["status"]) for x in results] == [(2, "s5", "success"), (3, "s6", "success")]
    for x, seed in zip(results, (5, 6)):
        ref = Runner().run(_prompt(), output_dir=tmp_path / f"ref{seed}", overrides={**BASE, "7.seed": seed})
        ref_files = ref.files()
        assert len(x["files"]) == len(ref_files) == 1
        assert Path(x["files"][0]).read_bytes() == ref_files[0].read_bytes()
    assert "2/2 jobs succeeded" in r.stderr


def test_batch_bad_line_names_it(tmp_path):
    jobs = _jobs(tmp_path, (1,))
    jobs.write_text(jobs.read_text() + '{"workflow": "nope.json"}\n')
    r = _cli(jobs, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2 and f"{jobs}:3" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_batch_and_cli_import_neither_ray_nor_aiohttp():
    code = ("import sys, twinflow, twinflow.runner.serve.batch, twinflow.runner.serve.cli, twinflow.runner.serve.ray_pool; "
            "bad = [m for m in ('ray', 'aiohttp') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
