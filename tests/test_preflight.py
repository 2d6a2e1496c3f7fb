"""Checks before compute (issue 15): output prefixes and folder, model file headers, the memory plan, and
allocation failures at the runner boundary. Each case is refused before the first node runs, with a
message that says what to change, and never a traceback."""
import json
import struct
from pathlib import Path

import pytest
import torch

from twinflow.core import outputs
from twinflow.core.errors import WorkflowError
from twinflow.runner import api, cli, executor, preflight

ROOT = Path(__file__).resolve().parents[1]
T2V = ROOT / "workflows" / "dual_branch_t2v.json"  # node 6: empty latent, 10: Save Video, 11: Save Image


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if any node would run: every check here must happen before the first node."""
    def refuse(self, *a, **k):
        raise AssertionError("a node ran: the check came after compute started")
    monkeypatch.setattr(executor.Executor, "execute", refuse)


def _cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("prefix,fragment", [
    ("../../x", "'..'"), ("/tmp/abs", "absolute"), ("a\nb", "control character"), ("v/\tx", "control character"),
    ("x" * 300, "longer than"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_prefix_refused_before_compute(tf_dirs, capsys, no_compute, prefix, fragment, command):
    code, out, err = _cli([command, T2V, "--set", f"10.filename_prefix={prefix}", "--models-dir", tf_dirs["models"]],
                          capsys)
    assert code == 1 and fragment in err and "node #10 (TwinFlowSaveVideo), input 'filename_prefix'" in err, err
    assert list(tf_dirs["output"].iterdir()) == []


@pytest.mark.parametrize("command", ["validate", "run"])
def test_unusable_output_folder_refused_before_compute(tf_dirs, tmp_path, capsys, no_compute, command):
    a_file = tmp_path / "plain_file"
    a_file.write_text("x")
    for folder, fragment in ((a_file, "is a file"), (a_file / "sub", "is a file"), ("/proc/nope", "cannot be created")):
        code, _, err = _cli([command, T2V, "--output-dir", folder, "--models-dir", tf_dirs["models"]], capsys)
        assert code == 1 and fragment in err, err


def test_valid_workflow_passes_and_shows_the_memory_plan(tf_dirs, capsys):
    code, out, _ = _cli(["validate", T2V, "--output-dir", tf_dirs["output"] / "new"], capsys)
    assert code == 0 and "ok:" in out and "memory: needs at least" in out
    assert not (tf_dirs["output"] / "new").exists()  # checked, not created


@pytest.mark.parametrize("size", [{"width": 16384, "height": 16384, "length": 16384},
                                  {"width": 16384, "height": 16384, "length": 9}])
def test_run_too_big_for_memory_refused_before_the_first_node(tf_dirs, capsys, no_compute, size, monkeypatch):
    monkeypatch.setattr(preflight._vae_engine(), "available_memory", lambda dev: 16 * 2 ** 30)
    sets = [x for k, v in size.items() for x in ("--set", f"6.{k}={v}")]
    code, _, err = _cli(["run", T2V, *sets, "--no-progress"], capsys)
    assert code == 1 and "needs at least" in err and "16.00 GiB is available" in err, err
    assert "nearest settings that fit" in err
    # the suggested settings do fit: validating with them passes
    hint = err.split("nearest settings that fit: ")[1].split(" or ")[-1].strip().split()
    sets2 = sets + [h for h in hint]
    code, out, _ = _cli(["validate", T2V, *sets2], capsys)
    assert code == 0, out


def test_memory_plan_parts_against_hand_computed_sizes():
    # latent of the empty-latent node: B*16*T*(H/8)*(W/8) fp32 = 1*16*3*8*8*4, counted for the empty latent and
    # the sampler's output; the VAE's IMAGE output 9 frames x 64 x 64 x 3 fp32 is part of the decode figure
    wf = api.Runner().load(str(T2V))
    plan = preflight.memory_plan(wf.prompt, "cpu")
    assert plan.parts["latents"] == 2 * 16 * 3 * 8 * 8 * 4
    assert plan.parts["VAE decode"] >= 9 * 64 * 64 * 3 * 4
    assert plan.need >= plan.parts["latents"] + plan.parts["VAE decode"]


def _safetensors(path: Path, tensors: dict):
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def test_truncated_or_corrupt_model_file_refused_before_compute(tf_dirs, capsys, no_compute):
    vae_dir = tf_dirs["models"] / "vae"
    vae_dir.mkdir()
    good = vae_dir / "good.safetensors"
    _safetensors(good, {"w": torch.zeros(64, 64)})
    assert preflight.check_model_header(good) is None
    data = good.read_bytes()
    (vae_dir / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (vae_dir / "junk.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all....")
    (vae_dir / "html.pt").write_bytes(b"<html>404 not found</html>")
    for name, fragment in (("cut.safetensors", "truncated"), ("junk.safetensors", "not valid JSON"),
                           ("html.pt", "not a PyTorch checkpoint")):
        assert fragment in preflight.check_model_header(vae_dir / name)
        code, _, err = _cli(["validate", T2V, "--set", f"8.vae_name={name}", "--models-dir", tf_dirs["models"]],
                            capsys)
        assert code == 1 and fragment in err and name in err, err


class Hog:
    """A node whose allocation fails the way torch's CPU allocator does."""
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gib": ("INT", {"default": 1024, "min": 1, "max": 1 << 20})}}

    def run(self, gib):
        torch.empty(int(gib) << 28, dtype=torch.float32)  # gib GiB
        return {"ui": {}}


def test_allocation_failure_is_a_clear_error_not_a_traceback(tf_dirs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(api, "default_registry", lambda: {"Hog": Hog})
    wf = tmp_path / "hog.json"
    wf.write_text(json.dumps({"1": {"class_type": "Hog", "inputs": {"gib": 1 << 20}}}))  # 1 PiB
    code, _, err = _cli(["run", wf, "--no-progress"], capsys)
    assert code == 1 and "out of memory" in err and "node #1 (Hog)" in err, err
    with pytest.raises(WorkflowError) as e:
        api.run_workflow(str(wf), registry={"Hog": Hog}, cache=False)
    assert not e.value.is_bug


def test_out_of_memory_classification():
    assert executor.out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate 1099511627776 bytes"))
    assert executor.out_of_memory(MemoryError("Wan VAE decode needs about 94.50 GiB"))
    assert executor.out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert executor.out_of_memory(RuntimeError("shape mismatch")) is None
    assert executor.out_of_memory(ValueError("can't allocate")) is None


def test_memory_plan_ignores_links_on_undeclared_inputs_and_nodes_that_do_not_run(tf_dirs):
    """Found by tools/fuzz_workflows.py: a link on an input the node does not declare (validation ignores it,
    with a warning) closing a loop, or a cycle among nodes no output needs, made the memory plan raise a
    bare ValueError ('workflow has a cycle') out of validate."""
    prompt = api.Runner().load(str(T2V)).prompt
    looped = json.loads(json.dumps(prompt))
    looped["6"]["inputs"]["y"] = ["9", 0]  # the latent node 'depends' on the decode that depends on it
    v = api.Runner().validate(looped)
    assert v.memory is not None and v.memory.need > 0
    orphans = json.loads(json.dumps(prompt))
    orphans["90"] = {"class_type": "TwinFlowVAEDecode", "inputs": {"samples": ["91", 0], "vae": ["8", 0]}}
    orphans["91"] = {"class_type": "TwinFlowVAEEncode", "inputs": {"pixels": ["90", 0], "vae": ["8", 0]}}
    v = api.Runner().validate(orphans, targets=["10"])
    assert v.memory is not None and "90" not in v.order


def _decode_part(prompt: dict, vae) -> int:
    """The memory plan's "VAE decode" figure computed by hand for a decode of the T2V workflow's latent."""
    shape = (1, 16, 3, 8, 8)  # the empty latent of dual_branch_t2v.json, as the shape plan infers it
    r, t = vae.cfg.spatial_ratio, vae.video_frames(shape[2])
    return vae.estimate_decode_bytes(shape, tile=8, dtype=torch.float32) + 4 * t * 8 * r * 8 * r * 3


def test_memory_plan_and_compile_plan_know_the_wan2_2_vae(tf_dirs):
    """A Wan2.2 VAE (random preset or a file, told apart by the file's header) gets the Wan2.2 decode estimate
    (16x space, its widths), not the Wan2.1 one; `twinflow plan` takes the random Wan2.2 presets."""
    from safetensors.torch import save_file

    from twinflow.models import wan22_vae, wan_vae
    from twinflow.runner import plan as cplan

    wf = api.Runner().load(str(T2V))
    with torch.device("meta"):
        v21 = wan_vae.WanVAE(wan_vae.PRESETS["tiny"])
        v22 = wan22_vae.Wan22VAE(wan22_vae.PRESETS["tiny"])
    base = preflight.memory_plan(wf.prompt, "cpu").parts["VAE decode"]
    assert base == _decode_part(wf.prompt, v21)
    vae_dir = tf_dirs["models"] / "vae"
    vae_dir.mkdir(exist_ok=True)
    sd = wan22_vae.random_wan22_vae("tiny").state_dict()
    save_file({"first_stage_model." + k: t.contiguous() for k, t in sd.items()}, str(vae_dir / "w22.safetensors"))
    for name in ("random:wan2.2-tiny", "w22.safetensors"):
        prompt = json.loads(json.dumps(wf.prompt))
        prompt["8"]["inputs"]["vae_name"] = name
        got = preflight.memory_plan(prompt, "cpu").parts["VAE decode"]
        assert got == _decode_part(prompt, v22) and got != base, name
    prompt["8"]["inputs"]["vae_name"] = "random:wan2.2-tiny"
    (vae_plan,) = [p for p in cplan.plan_workflow(prompt, backend="inductor") if p["kind"] != "denoiser"]
    assert vae_plan["model"] == "random:wan2.2-tiny" and "memory_bytes" in vae_plan, vae_plan
