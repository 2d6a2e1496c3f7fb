"""The `twinflow` CLI: exit codes, messages without tracebacks, JSON output, subcommands."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from twinflow.core import progress
from twinflow.core.errors import Interrupted
from twinflow.runner import api, cli

FIX = Path(__file__).parent / "fixtures" / "runner"
_spec = importlib.util.spec_from_file_location("runner_testnodes", FIX / "testnodes.py")
tn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tn)


@pytest.fixture
def test_nodes(monkeypatch, tf_dirs):
    monkeypatch.setattr(api, "default_registry", lambda: tn.REGISTRY)
    tn.CALLS.clear()
    progress.clear_interrupt()
    yield tf_dirs
    progress.clear_interrupt()


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_run_ui_workflow(test_nodes, capsys, tmp_path):
    code, out, err = run(["run", FIX / "ui_sampler.json", "--output-dir", tmp_path / "o", "--set", "4.seed=3",
                          "--no-progress"], capsys)
    assert code == 0
    assert "outputs written:" in out and str(tmp_path / "o" / "run" / "test_00001_.latent") in out
    assert "TestSampler" in err and "total" in err  # timing report
    assert tn.TestSaveLatent.SEEN[-1]["samples"]["seed"] == 3


def test_run_json_output(test_nodes, capsys):
    code, out, _ = run(["run", FIX / "ui_sampler.api.json", "--json", "--no-progress"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["outputs"]["6"]["latents"][0]["filename"] == "run/test_00001_.latent"
    assert [t["node_id"] for t in data["timings"]] and data["files"]


def test_validation_failure_exit_1_and_json(test_nodes, capsys, tmp_path):
    p = json.loads((FIX / "ui_sampler.api.json").read_text())
    p["4"]["inputs"]["steps"] = 0
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(p))
    code, out, err = run(["run", f, "--no-progress"], capsys)
    assert code == 1 and "node #4 TestSampler, input 'steps': Value 0 smaller than min of 1" in err
    code, out, err = run(["validate", f, "--json"], capsys)
    assert code == 1
    j = json.loads(out)
    assert j["error"]["type"] == "prompt_outputs_failed_validation"
    assert j["node_errors"]["4"]["errors"][0]["type"] == "value_smaller_than_min"
    code, out, _ = run(["validate", FIX / "ui_sampler.json"], capsys)
    assert code == 0 and out.startswith("ok: 4 node(s)")


@pytest.mark.parametrize("content, fragment", [
    ('{"1": {"class_type": "TestConst", ', "truncated"),
    ("[1, 2]", "must be a JSON object"),
    ('{"1": {"class_type": "TestAdd", "inputs": {"a": [1, 0], "b": 1}}, "2": {"class_type": "TestShow", '
     '"inputs": {"value": ["1", 0]}}}', 'write ["1", 0]'),
    ('{"1": {"class_type": "TestAdd", "inputs": {"a": ["2", 0], "b": 1}}, "2": {"class_type": "TestAdd", '
     '"inputs": {"a": ["1", 0], "b": 1}}, "3": {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}}',
     "Dependency cycle"),
    ('{"1": {"class_type": "TestConst", "inputs": {"value": 1e400}}, "2": {"class_type": "TestShow", '
     '"inputs": {"value": ["1", 0]}}}', "Failed to convert"),
    ('{"1": {"class_type": "TestConst", "inputs": {"value": 1180591620717411303424}}, "2": {"class_type": '
     '"TestShow", "inputs": {"value": ["1", 0]}}}', "bigger than max"),
    ('{"1": {"class_type": "KSampler", "inputs": {}}}', "ComfyUI core node"),
])
def test_malformed_files_exit_1_with_message(test_nodes, capsys, tmp_path, content, fragment):
    f = tmp_path / "wf.json"
    f.write_text(content)
    code, out, err = run(["run", f, "--no-progress"], capsys)
    assert code == 1 and fragment in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) <= 4


def test_node_failure_exit_1(test_nodes, capsys, tmp_path):
    f = tmp_path / "wf.json"
    f.write_text(json.dumps({"1": {"class_type": "TestFail", "inputs": {"value": 1}},
                             "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}))
    code, _, err = run(["run", f, "--no-progress"], capsys)
    assert code == 1 and "node #1 (TestFail) failed: value 1 is not acceptable: use 2" in err


def test_interrupt_exit_130(test_nodes, capsys, tmp_path):
    f = tmp_path / "wf.json"
    f.write_text(json.dumps({"1": {"class_type": "TestSlow", "inputs": {"steps": 4}},
                             "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}))
    code, _, err = run(["run", f], capsys)
    assert code == 130 and "interrupted" in err and tn.CALLS["TestShow"] == 0


def test_real_sigint_stops_cleanly_with_130(test_nodes, capsys, tmp_path):
    f = tmp_path / "wf.json"
    f.write_text(json.dumps({"1": {"class_type": "TestSigint", "inputs": {"steps": 50}},
                             "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}))
    before = signal.getsignal(signal.SIGINT)
    code, _, err = run(["run", f, "--no-progress"], capsys)
    assert code == 130 and "interrupt requested" in err
    assert tn.CALLS["TestSigint.steps"] < 50 and tn.CALLS["TestShow"] == 0
    assert signal.getsignal(signal.SIGINT) is before  # the CLI put the previous handler back


def test_sigint_handler_first_requests_then_aborts():
    h = cli._SigintHandler()
    try:
        h(signal.SIGINT, None)
        with pytest.raises(Interrupted):
            progress.check_interrupt()
        with pytest.raises(KeyboardInterrupt):
            h(signal.SIGINT, None)
    finally:
        progress.clear_interrupt()


def test_convert(test_nodes, capsys, tmp_path):
    out_file = tmp_path / "api.json"
    code, out, _ = run(["convert", FIX / "ui_sampler_v1.json", "-o", out_file], capsys)
    assert code == 0 and json.loads(out_file.read_text()) == json.loads((FIX / "ui_sampler.api.json").read_text())
    code, out, _ = run(["convert", FIX / "ui_sampler.json"], capsys)
    assert code == 0 and json.loads(out)["4"]["inputs"]["cfg"] == 4.5


def test_nodes_json_is_object_info(test_nodes, capsys):
    code, out, _ = run(["nodes", "--json"], capsys)
    assert code == 0
    info = json.loads(out)["TestSampler"]
    assert info["input"]["required"]["sampler_name"] == [["euler", "uni_pc"]]
    assert info["input_order"]["required"] == ["model", "seed", "steps", "cfg", "sampler_name", "denoise"]
    assert info["output"] == ["LATENT"] and info["output_is_list"] == [False] and info["output_name"] == ["LATENT"]
    assert info["name"] == "TestSampler" and info["output_node"] is False and info["category"] == "test"
    assert json.loads(out)["TestListOut"]["output_is_list"] == [True, False]
    assert json.loads(out)["TestSaveLatent"]["input"]["hidden"]["prompt"] == "PROMPT"


def test_doctor_version_usage(capsys):
    code, out, _ = run(["doctor"], capsys)
    assert code == 0 and "torch:" in out and "cupy:" in out and ("GPU" in out)
    assert "\nfused kernels: mode " in out  # the fused package's doctor hook is found under its name
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("twinflow ")
    code, _, err = run(["run"], capsys)
    assert code == 2
    code, _, _ = run([], capsys)
    assert code == 2


def test_subprocess_module_entry(tmp_path):
    f = tmp_path / "cut.json"
    f.write_text('{"nodes": [{"id": 1, "type": "Tw')
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "twinflow.runner.cli", "validate", str(f)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert "not valid JSON" in proc.stderr and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "twinflow.runner", "--version"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("twinflow ")


def test_node_bug_shows_traceback_but_clear_errors_do_not(test_nodes, capsys, tmp_path, monkeypatch):
    class Buggy:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "f"

        def f(self):
            return ({}["missing"],)  # a genuine bug: KeyError

    monkeypatch.setattr(api, "default_registry", lambda: {**tn.REGISTRY, "Buggy": Buggy})
    f = tmp_path / "wf.json"
    f.write_text(json.dumps({"1": {"class_type": "Buggy", "inputs": {}},
                             "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}))
    code = cli.main(["run", str(f), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "node #1 (Buggy) failed" in err and "Traceback" in err and "KeyError" in err


def test_run_input_dir_is_where_load_image_reads(tf_dirs, capsys, tmp_path):
    """`twinflow run --input-dir DIR`: core LoadImage finds the start image of an image-to-video template there."""
    from PIL import Image

    from twinflow.core import paths

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    Image.new("RGB", (8, 6), (200, 10, 30)).save(folder / "start.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cli/in"}}}
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(prompt))
    code, out, err = run(["run", wf, "--no-progress", "--input-dir", folder], capsys)
    assert code == 0, err
    assert paths.input_dir() == folder and (tf_dirs["output"] / "cli" / "in_00001_.png").is_file()
    code, _, err = run(["run", wf, "--no-progress", "--input-dir", tmp_path / "empty"], capsys)
    assert code == 1 and "start.png" in err
