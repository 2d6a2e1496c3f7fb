"""Every benchmark and tool starts from a directory outside the repository, both as a module
(`python -m twinflow.benchmarks.X`) and as a file path (`python .../benchmarks/X.py`), in a fresh process;
and no top-level name of the repository shadows (or is shadowed by) an importable module.

As a file, each entry point runs its cheapest mode that still reaches its imports: the DiT benchmark's
tiny smoke run (it imports diffusers and transformers, which import Hugging Face's `kernels`: the name our
kernel folder once shadowed), `--help`, a check, or the clean refusal of a machine without the hardware.
The VAE benchmark's smoke run from outside the repo is tests/test_vae_bench.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twinflow

PKG = Path(twinflow.__file__).resolve().parent  # the repository root is the package `twinflow`
BENCHMARKS = sorted(p.stem for p in (PKG / "benchmarks").glob("*.py") if p.stem != "__init__")
TOOLS = sorted(p.stem for p in (PKG / "tools").glob("*.py"))


def _has_tensorrt() -> bool:
    from twinflow.compiled import probe

    return probe.tensorrt_unavailable() is None


# name -> (args, expected exit status, text the output must contain). `{tmp}` is the working directory.
def _cases(tmp: Path) -> dict:
    dit = ["--configs", "tiny", "--dtypes", "fp32", "--repeats", "1", "--shape", "1", "16", "1", "4", "4",
           "--ctx-tokens", "2", "--json", str(tmp / "dit.json")]
    return {
        "benchmarks.compile": (["--help"], 0, "--gpu"),
        "benchmarks.dit": (dit, 0, "| tiny | fp32 |"),
        "benchmarks.fused": ((["--help"], 0, "--block") if torch.cuda.is_available() else ([], 2, "needs a CUDA GPU")),
        "benchmarks.quant": (["--help"], 0, "memory"),  # `memory` itself: tests/test_quant_bench.py
        # no weights in the folder: refused by name before any work; the smoke run: tests/test_train_fixtures.py
        "benchmarks.quality": (["--weights", str(tmp / "none")], 1, "missing weights"),
        "benchmarks.sampling": (["--help"], 0, "--layers"),
        # a bad spec is refused before any model is built; the smoke run: tests/test_step_cache_bench.py
        "benchmarks.serve": (["--help"], 0, "--clients"),  # a served run: tests/test_bench_serve.py
        "benchmarks.step_cache": (["--policies", "nonsense:1"], 2, "unknown policy 'nonsense'"),
        "benchmarks.vae": (["--cases", "smoke", "--device", "tpu"], 2, "use cpu or cuda"),  # smoke: test_vae_bench
        # the smoke run of both sides (ComfyUI + slow): tests/test_bench_workflow.py
        "benchmarks.workflow": (["--comfyui", str(tmp / "no-comfyui")], 2, "must name a ComfyUI checkout"),
        "tools.build_workflows": (["--check"], 0, "current: workflows/"),
        "tools.fuzz_workflows": (["--help"], 0, "--count"),  # a run: tests/test_runner_fuzz.py
        "tools.gpu_accept": (["--help"], 0, "--dry-run"),  # the dry run itself: tests/test_gpu_accept.py
        "tools.gpu_parts": ([], 0, ""),  # the parts gpu_accept runs: importable from anywhere, does nothing alone
        "tools.train_fixtures": (["--help"], 0, "--smoke"),  # training loops: tests/test_train_fixtures.py
        "tools.trt_smoke": ((["--help"], 0, "--vae-preset") if _has_tensorrt()
                            else (["--out", str(tmp / "trt.json")], 2, "tensorrt unavailable")),
    }


def test_every_entry_point_has_a_case(tmp_path):
    assert set(_cases(tmp_path)) == {f"benchmarks.{b}" for b in BENCHMARKS} | {f"tools.{t}" for t in TOOLS}


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _check(res, status, text, what):
    out = res.stdout + res.stderr
    assert res.returncode == status, f"{what}: exit {res.returncode}, expected {status}\n{out[-3000:]}"
    assert text in out, f"{what}: {text!r} not in the output\n{out[-3000:]}"
    assert "Traceback" not in out, f"{what}:\n{out[-3000:]}"


@pytest.mark.parametrize("name", [f"benchmarks.{b}" for b in BENCHMARKS])
def test_benchmark_runs_as_a_module_from_outside_the_repo(tmp_path, name):
    """`--help` (the file-path runs below do the rest): the module resolves from any directory."""
    _check(_run([sys.executable, "-m", f"twinflow.{name}", "--help"], tmp_path), 0, "usage:",
           f"python -m twinflow.{name}")


@pytest.mark.parametrize("name", [f"benchmarks.{b}" for b in BENCHMARKS] + [f"tools.{t}" for t in TOOLS])
def test_entry_point_runs_as_a_file_from_outside_the_repo(tmp_path, name):
    args, status, text = _cases(tmp_path)[name]
    path = PKG / (name.replace(".", "/") + ".py")
    _check(_run([sys.executable, str(path), *args], tmp_path), status, text, f"python {path}")
    if name == "benchmarks.dit":
        (row, cached) = json.loads((tmp_path / "dit.json").read_text())
        assert row["config"] == "tiny" and row["rel_err_vs_diffusers"] < 1e-4  # ours vs diffusers, same weights
        assert cached["fold"] == "cached" and cached["rel_err_vs_diffusers"] < 1e-4


def test_no_top_level_name_of_the_repo_is_importable_elsewhere(tmp_path):
    """A folder or module of the repo root, benchmarks/ or tools/ must not share its name with an importable
    module: with that folder on sys.path (`python -m` in the root, `python benchmarks/X.py`) ours would
    shadow it (as kernels/ once shadowed Hugging Face's `kernels`, which transformers imports)."""
    names = {}
    for folder in (PKG, PKG / "benchmarks", PKG / "tools"):
        for p in folder.iterdir():
            name = p.stem if p.suffix == ".py" else p.name if p.is_dir() and not p.suffix else None
            if name and name.isidentifier() and not name.startswith(("_", ".")):
                names.setdefault(name, str(p.relative_to(PKG)))
    assert {"fused", "models", "dit", "vae", "build_workflows"} <= set(names)  # the scan found the layout
    code = ("import importlib.util, json, sys\n"
            f"names = {sorted(names)!r}\n"
            "found = {n: getattr(importlib.util.find_spec(n), 'origin', None) or 'namespace'\n"
            "         for n in names if n in sys.stdlib_module_names or n in sys.builtin_module_names\n"
            "         or importlib.util.find_spec(n) is not None}\n"
            "print(json.dumps(found))\n")
    res = _run([sys.executable, "-c", code], tmp_path)  # cwd outside the repo, so only the environment counts
    assert res.returncode == 0, res.stderr
    clashes = {names[n]: origin for n, origin in json.loads(res.stdout).items()}
    assert not clashes, f"these names of the repository are importable from the environment: {clashes}"
