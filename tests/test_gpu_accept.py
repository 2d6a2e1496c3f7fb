"""`./dev gpu` (tools/gpu_accept.py): the CPU dry run, the time budget, the targets and the report.

The GPU run itself needs a CUDA host; here: the dry run end to end (imports every GPU code path, the torch
API gates, collects the cuda/cupy tests), and the budget logic with fake parts that overrun tiny caps.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_accept.py"


@pytest.fixture(scope="module")
def ga():
    spec = importlib.util.spec_from_file_location("gpu_accept_under_test", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def _py(code: str) -> list:
    return [sys.executable, "-c", code]


def _record(path, **rec) -> str:
    """Python source that appends one JSON record to `path` (what a part's Recorder writes)."""
    return f"import json; open({str(path)!r}, 'a').write(json.dumps({rec!r}) + '\\n')"


def test_dry_run_imports_every_gpu_path_and_lists_the_plan(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    res = subprocess.run([sys.executable, str(TOOL), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "dry run ok" in out
    for part in ("env", "tests", "fused", "quant", "vae", "dit", "dual", "compile", "stream", "step_cache"):
        assert f"  {part} " in out, part
    for gate in ("_scaled_mm signature", "AOTInductor packaging API", "torch.library registration"):
        assert f"ok   gate: {gate}" in out
    assert "plan: 10 parts, total budget 285 s" in out
    for line in (l for l in out.splitlines() if l.startswith("  ") and " cap " in l):
        assert re.match(r"  \w+ +cap +\d+ s  \S", line), line  # the time budget per part
    assert "ok   collect the cuda/cupy tests" in out
    spec = importlib.util.spec_from_file_location("gpu_parts_for_dry_run", ROOT / "tools" / "gpu_parts.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    assert all(f in out for f in gp.marked_test_files())
    assert all(f"ok   import twinflow.{m}:" in out for m in gp.DRY_IMPORTS)
    if not gp.torch_version_is_host():  # CI's torch is not the GPU host's: every gate also read against it
        assert f"ok   every gate read against torch {gp.GPU_HOST_TORCH}" in out
    assert "FAIL" not in out
    readme = (ROOT / "README.md").read_text()
    assert all(f"./dev gpu{flag}" in readme for flag in ("", " --prepare", " --dry-run"))


def test_a_part_over_its_cap_is_stopped_and_the_next_part_still_runs(ga, tmp_path):
    parts = [ga.Part("slow", 1.0, "sleeps past its cap"), ga.Part("quick", 10.0, "returns at once")]

    def argv(part, results, soft):
        if part.name == "slow":  # one figure, then a child of its own, then far past the cap
            return _py(_record(results, type="figure", name="first") + "; import subprocess, time; "
                       f"p = subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(60)']); "
                       f"open({str(tmp_path / 'grandchild')!r}, 'w').write(str(p.pid)); time.sleep(60)")
        return _py(_record(results, type="figure", name="done"))

    t0 = time.monotonic()
    slow, quick = ga.run_budgeted(parts, 100.0, tmp_path, dict(os.environ), argv)
    assert time.monotonic() - t0 < 30
    assert slow.status == "stopped" and "cap of 1 s" in slow.reason
    assert [r["name"] for r in slow.records] == ["first"]  # what it wrote before the cap is kept
    assert quick.status == "ok" and [r["name"] for r in quick.records] == ["done"]
    # the whole process group went, not only the part's own process
    pid = int((tmp_path / "grandchild").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child {pid} outlived the cap")
    lines = ga.skipped_lines([slow, quick])
    assert lines and lines[0].startswith("slow: stopped")


def test_parts_that_no_longer_fit_the_total_are_skipped_not_started(ga, tmp_path):
    ticks = iter([0.0, 0.0, 50.0, 98.0])  # a fake clock: start, then before each part ("a" took 50 s, "b" 48 s)
    started = []

    def argv(part, results, soft):
        started.append(part.name)
        return _py("pass")

    parts = [ga.Part("a", 60, ""), ga.Part("b", 60, ""), ga.Part("c", 60, "")]
    res = ga.run_budgeted(parts, 100.0, tmp_path, dict(os.environ), argv, clock=lambda: next(ticks))
    assert [r.status for r in res] == ["ok", "ok", "skipped"]
    assert started == ["a", "b"]
    assert "not started" in res[2].reason and "100 s total budget" in res[2].reason


def test_a_failing_part_and_a_precheck_are_reported(ga, tmp_path):
    parts = [ga.Part("boom", 10, ""), ga.Part("needs", 10, "", needs=("nope",))]
    res = ga.run_budgeted(parts, 100.0, tmp_path, dict(os.environ), lambda p, r, s: _py("raise SystemExit(3)"),
                          precheck=lambda p: "nope is missing" if p.needs else None)
    assert res[0].status == "failed" and res[0].reason == "exit status 3"
    assert res[1].status == "skipped" and res[1].reason == "nope is missing"


def test_recorder_stops_starting_cases_near_its_deadline(ga, tmp_path):
    rec = ga.Recorder(tmp_path / "r.jsonl", time.time() + 2.0)
    assert rec.fits(0.5, "small case")
    assert not rec.fits(30, "big case")
    rec.figure("x", value=1.5)
    recs = ga.read_records(tmp_path / "r.jsonl")
    assert recs[0]["type"] == "skip" and recs[0]["what"] == "big case" and "needs about 30 s" in recs[0]["why"]
    assert recs[1] == {"type": "figure", "name": "x", "value": 1.5}
    (tmp_path / "r.jsonl").write_text((tmp_path / "r.jsonl").read_text() + '{"type": "fig')  # cut by a kill
    assert len(ga.read_records(tmp_path / "r.jsonl")) == 2


def _res(ga, name, *figs):
    return ga.PartResult(name, 10, "ok", 1.0, "", [{"type": "figure", **f} for f in figs])


def test_targets_compare_each_figure_with_its_threshold(ga, tmp_path):
    results = {
        "tests": _res(ga, "tests", {"name": "pytest", "passed": 120, "failed": 1, "errors": 0, "skipped": 2}),
        "fused": _res(ga, "fused", {"name": "fused_op", "D": 1536, "op": "rms_norm", "pct_peak": 90.0, "x_eager": 1.2,
                                    "kernel_GBps": 3000.0, "peak_GBps": 3350.0}),
        "quant": _res(ga, "quant", {"name": "gemm", "shape": "14B attn", "fp8_gemm_speedup": 1.7, "M": 1, "K": 2, "N": 3}),
        "vae": _res(ga, "vae", {"name": "vae_decode", "case": "dec", "speedup": 2.5, "memory_ratio": 0.5}),
        "dit": _res(ga, "dit", {"name": "dit_eager", "diffusers_s": 0.30}),
        "compile": _res(ga, "compile", {"name": "compiled_step", "backend": "inductor", "compiled_s": 0.15},
                        {"name": "cold_warm", "warm_over_cold": 0.05}, {"name": "recompiles", "recompiles": 0}),
    }
    got = {(t["target"], t["item"]): t["pass"] for t in ga.targets(results)}
    assert got[("cuda/cupy tests: 0 failed", "pytest -m 'cuda or cupy'")] is False
    assert got[("fused kernel >= 85% of HBM peak", "D=1536 rms_norm")] is True
    assert got[("fused kernel >= 1.5x eager torch", "D=1536 rms_norm")] is False
    assert got[("fp8 W8A8 GEMM >= 1.6x bf16", "14B attn")] is True
    assert got[("VAE decode >= 2x diffusers", "dec")] is True
    assert got[("VAE memory above model <= 1/3 of diffusers'", "dec")] is False
    assert got[("DiT compiled >= 1.5x diffusers eager", "inductor")] is True  # 0.30 / 0.15 = 2x
    assert got[("warm compile load <= 10% of cold build", "1.3B AOTInductor")] is True
    assert got[("0 recompiles across steps", "1.3B compiled")] is True
    assert got[("dual-branch step at alpha 0/1 <= +5% of a single step", "alpha 0 and 1")] is None  # not measured

    report = {"started": "now", "total_s": 285.0, "elapsed_s": 10.0, "commit": "abc", "parts":
              [r.to_dict() for r in results.values()], "targets": ga.targets(results), "skipped": ["dual: skipped - x"]}
    js, md = ga.write_report(tmp_path / "out", report)
    assert json.loads(js.read_text())["targets"] == report["targets"]
    text = md.read_text()
    assert "| fp8 W8A8 GEMM >= 1.6x bf16 | 14B attn | 1.7 x | >= 1.6 | PASS |" in text
    assert "| not measured |" in text and "- dual: skipped - x" in text


def test_pytest_output_is_counted_per_result_line():
    spec = importlib.util.spec_from_file_location("gpu_parts_under_test", ROOT / "tools" / "gpu_parts.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    text = "\n".join([
        "tests/test_kernels_cuda.py::test_a[64-float32] PASSED                [ 10%]",
        "tests/test_kernels_cuda.py::test_b FAILED                             [ 20%]",
        "tests/test_quant.py::test_fp8_dynamic_on_gpu SKIPPED (needs CC 8.9)   [ 30%]",
        "tests/test_wan_vae.py::test_cuda_decode_matches_cpu ERROR            [ 40%]",
        "SKIPPED [1] tests/test_quant.py:560: needs a CUDA GPU with compute capability >= 8.9",
        "ERROR tests/test_x.py - ImportError: no module",
        "FAILED tests/test_kernels_cuda.py::test_b - AssertionError",
    ])
    res = gp.parse_pytest(text)
    assert (res["passed"], res["failed"], res["skipped"], res["errors"]) == (1, 1, 1, 2)
    assert "tests/test_kernels_cuda.py::test_b" in res["failed_tests"]
    assert res["skip_reasons"] == ["SKIPPED [1] tests/test_quant.py:560: needs a CUDA GPU with compute capability >= 8.9"]
    files = gp.marked_test_files()
    assert "tests/test_quant.py" in files and any(f.endswith("_cuda.py") for f in files)  # the kernels' parity tests
    assert "tests/test_gpu_accept.py" not in files


def test_unknown_part_names_are_refused(ga):
    with pytest.raises(SystemExit, match="unknown part"):
        ga.main(["--dry-run", "--only", "nosuch"])
    with pytest.raises(SystemExit):
        ga.main(["--cap", "compile"])


def test_the_dit_parts_measurement_code_runs_on_the_cpu_tiny():
    """benchmarks/dit.cuda_rows (the `dit` part) with the tiny config on the CPU: the same steps as on the GPU
    (pair built on the device, inputs, warm-up, alternating timing, budget veto), wall-clock instead of events."""
    pytest.importorskip("diffusers")
    from twinflow.benchmarks import dit

    row = dit.cuda_rows("tiny", "fp32", (1, 16, 1, 4, 4), 4, repeats=2, device="cpu")
    assert row["tokens"] == 4 and row["ours_s"] > 0 and row["diffusers_s"] > 0
    assert row["rel_err_vs_diffusers"] < 1e-5  # fp32: the two models compute the same function
    vetoed = []
    assert dit.cuda_rows("tiny", "fp32", (1, 16, 1, 4, 4), 4, 2, lambda s, what: vetoed.append(what) and False,
                         device="cpu") is None
    assert vetoed == ["DiT tiny fp32 timing"]


def test_the_stream_parts_measurement_code_runs_on_the_cpu_tiny(ga):
    """tools/gpu_parts.stream_rows (the `stream` part) on the CPU, tiny config, with the counting device shim of
    tests/test_block_stream.py as the copy engine: the same steps as on the GPU (resident baseline, weights moved to
    host memory once, one streamed model per budget, output compared), wall-clock times and no memory figure."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_parts
    finally:
        sys.path.remove(str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location("block_stream_shim", ROOT / "tests" / "test_block_stream.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    engine = shim.CountingEngine(budget_limit=2)
    rows = gpu_parts.stream_rows("tiny", "fp32", (1, 16, 1, 4, 4), 4, budgets=(1, 2), repeats=2, device="cpu",
                                 engine=engine)
    assert [r["case"] for r in rows] == ["resident", "streamed 1", "streamed 2"]
    assert all(r["max_abs_diff"] == 0.0 and r["seconds"] > 0 and r["peak_mib"] is None for r in rows)
    assert {n for n in engine.copies.values()} == {3}  # per budget: warm-up + 2 timed calls, each block once
    assert engine.peak == 2 and engine.live == {}
    assert "streaming 2 blocks" in rows[-1]["status"]
    vetoed = []
    assert gpu_parts.stream_rows("tiny", "fp32", (1, 16, 1, 4, 4), 4, budgets=(1,), repeats=1, device="cpu",
                                 engine=engine, fits=lambda s, what: vetoed.append(what) and False) == []
    assert vetoed == ["block streaming tiny"]
    got = {(t["target"], t["item"]): t["pass"] for t in ga.targets({"stream": _res(
        ga, "stream", *({"name": "block_stream", **r} for r in rows))})}
    assert got[("streamed DiT output equals the resident one", "streamed 1")] is True
    rows[2].update(peak_mib=900.0, max_abs_diff=1e-3)
    rows[0]["peak_mib"] = 3000.0
    got = {(t["target"], t["item"]): t for t in ga.targets({"stream": _res(
        ga, "stream", *({"name": "block_stream", **r} for r in rows))})}
    assert got[("streamed DiT output equals the resident one", "streamed 2")]["pass"] is False
    assert got[("streamed DiT peak memory below the resident one", "streamed 2")]["value"] == 0.3


def test_the_real_run_on_a_machine_without_cuda_reports_every_part_as_skipped(ga, tmp_path, monkeypatch):
    """`./dev gpu` (not the dry run) end to end on the CPU, with the plan cut to the env part and one GPU part:
    the env part runs for real (device, versions, API gates), the GPU part is not started, and the report says
    why, with every target "not measured" but the gates."""
    monkeypatch.setattr(ga, "PLAN", (ga.PLAN[0], next(p for p in ga.PLAN if p.name == "quant")))
    monkeypatch.delenv("OUT", raising=False)
    assert ga.main(["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["partial"] is False and [p["name"] for p in report["parts"]] == ["env", "quant"]
    env, quant = report["parts"]
    assert env["status"] == "ok", env["log_tail"]
    device = next(r for r in env["records"] if r.get("name") == "device")
    assert device["cuda_available"] is False and device["torch"]
    assert quant["status"] == "skipped" and "no CUDA device" in quant["reason"]
    verdicts = {t["target"]: t["pass"] for t in report["targets"]}
    assert verdicts.pop("torch API gates hold on the host's torch") is True
    assert set(verdicts.values()) == {None}
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| quant | skipped |" in md and "not measured" in md
    assert "===== env: ok" in (tmp_path / "gpu_logs.txt").read_text()


def test_the_run_stops_cleanly_within_its_total_and_reports_what_it_skipped(ga, tmp_path, monkeypatch):
    """`./dev gpu` end to end with fake parts that overrun a 10 s total: one part stops starting cases at its
    soft deadline (ok, its leftover cases listed as skipped), one ignores its cap and is killed when the total
    runs out, and the last is never started; the report says all of it."""
    tools = str(ga.TOOLS)

    def argv(part, results, soft):
        if part.name == "env":  # a CUDA device, so that the GPU parts are not skipped for lack of one
            return _py(_record(results, type="figure", name="device", cuda_available=True, gpu="fake"))
        if part.name == "careful":  # what a real part does: ask fits() before each case
            return _py(f"import sys, time; sys.path.insert(0, {tools!r}); import gpu_accept as g; "
                       f"r = g.Recorder({str(results)!r}, {soft!r})\n"
                       "for i in range(20):\n"
                       "    if r.fits(1.0, f'case {i}'):\n"
                       "        time.sleep(0.25); r.figure('case', i=i)\n")
        if part.name == "stubborn":
            return _py(_record(results, type="figure", name="started") + "; import time; time.sleep(120)")
        return _py(_record(results, type="figure", name="ran"))

    monkeypatch.setattr(ga, "_argv_for", lambda dry: argv)
    monkeypatch.setattr(ga, "PLAN", (ga.Part("env", 5, ""), ga.Part("careful", 4, ""), ga.Part("stubborn", 100, ""),
                                     ga.Part("late", 5, "")))
    monkeypatch.delenv("OUT", raising=False)
    assert ga.main(["--out", str(tmp_path), "--total", "10"]) == 0
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    env, careful, stubborn, late = report["parts"]
    assert env["status"] == "ok"
    assert careful["status"] == "ok"  # it stopped itself before its 4 s cap
    cases = [r for r in careful["records"] if r["type"] == "figure"]
    left_out = [r["what"] for r in careful["records"] if r["type"] == "skip"]
    assert cases and left_out and len(cases) + len(left_out) == 20
    assert stubborn["status"] == "stopped" and "cap cut from 100 s to what was left of the total" in stubborn["reason"]
    assert [r["name"] for r in stubborn["records"]] == ["started"]  # its figures up to the kill are kept
    assert late["status"] == "skipped" and "total budget" in late["reason"] and not late["records"]
    # the whole run ended at its total (plus the kill's grace), not at the stubborn part's own 100 s cap
    assert report["elapsed_s"] < 10 + 5 and report["partial"] is False
    md = (tmp_path / "gpu_report.md").read_text()
    assert f"- careful: {left_out[0]} - not started:" in md
    assert "- stubborn: stopped - still running at its cap" in md and "- late: skipped - not started:" in md


def test_the_gpu_run_never_installs_torch_and_carries_under_the_limit(ga, tmp_path, monkeypatch):
    """The carried wheels never include the torch stack (refused even if one were put there), the host's own
    packages are never replaced, and what a device run carries (tree + wheels) stays under 64 MiB."""
    assert not [k for k in ga.WHEELS if k.lower().startswith(ga.FORBIDDEN_WHEELS)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl", "nvidia_cublas-13.0-py3-none-any.whl",
                 "cupy_cuda13x-14.2-cp312-cp312-manylinux2014_x86_64.whl", "pytest-8.0.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"not a wheel")  # pip would fail on these: nothing may reach pip
    monkeypatch.setattr(ga, "WHEELS_DIR", wheels)
    installed, lines = ga.install_missing_wheels(tmp_path / "site")
    assert installed == [] and not (tmp_path / "site").exists()
    assert sum("refused" in line for line in lines) == 3 and any("not needed, the host has pytest" in l for l in lines)
    monkeypatch.undo()
    tree, wmib = ga.carried_mib()
    assert 0 < tree and tree + wmib < ga.CARRY_LIMIT_MIB
    # the `gpu` branch of ./dev runs the tool with the host's python and nothing else (no setup, no pip)
    dev = (ROOT / "dev").read_text()
    start = dev.index("\n  gpu)")
    block = dev[start:dev.index('exec "$gpy" tools/gpu_accept.py "$@" ;;', start)]
    code = [line for line in block.splitlines() if not line.strip().startswith("#")]
    assert code and not [line for line in code if "setup" in line or "pip" in line or "install" in line]


def test_the_fused_kernels_are_named_in_one_place():
    """The fused kernels' package (fused/, benchmarks/fused.py) is named once: the GPU parts follow from
    gpu_parts.FUSED; this fails, naming it, while it points at a package that is not there."""
    spec = importlib.util.spec_from_file_location("gpu_parts_fused", ROOT / "tools" / "gpu_parts.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    assert (ROOT / gp.FUSED / "ops.py").is_file(), f"tools/gpu_parts.py: FUSED = {gp.FUSED!r} is not a package here"
    assert (ROOT / "benchmarks" / f"{gp.FUSED}.py").is_file() and gp.FUSED_BENCH == f"benchmarks.{gp.FUSED}"
    assert f"{gp.FUSED}.ops" in gp.DRY_IMPORTS and gp.FUSED_BENCH in gp.DRY_IMPORTS
    src = (ROOT / "tools" / "gpu_parts.py").read_text()
    assert not re.findall(r'["\'](?:benchmarks\.)?kernels[."\']', src)


def test_the_host_python_check_catches_what_312_rejects(ga, tmp_path):
    """The dry run's python3.12 check (where a 3.12 interpreter exists here): syntax newer than 3.12 and stdlib
    modules 3.12 removed are reported; 3.12's own syntax passes."""
    if ga._host_python() is None:
        pytest.skip("no python3.12 on this machine (the dry run says so and skips that check)")
    ok = tmp_path / "ok.py"
    ok.write_text("def f[T](x: T) -> T:\n    return x\n")
    assert ga.host_python_syntax([ok])[1] is None
    gone, new = tmp_path / "gone.py", tmp_path / "new.py"
    gone.write_text("import os\nfrom distutils import util\n")
    new.write_text("try:\n    pass\nexcept ValueError, TypeError:\n    pass\n")
    line, problem = ga.host_python_syntax([ok, gone, new])
    assert "FAILED" in line and "gone.py:2: imports distutils" in problem and "new.py:3:" in problem
