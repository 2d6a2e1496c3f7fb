"""`twinflow plan` and `twinflow run --compile/--quantize` on ComfyUI's own Wan templates (core nodes), on the
tiny random files: the plan lists each denoiser (shapes with the CFG batch) and the VAE decode; the inserted
Compile/Quantize nodes run, with the nodes' own verification, without editing the JSON."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("core_files", FIX / "core_files.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

pytest.importorskip("sentencepiece")
pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")

SIZE_21 = ["40.width=32", "40.height=32", "40.length=5", "3.steps=2"]
SIZE_22 = ["74.width=32", "74.height=32", "74.length=5"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_plan")
    cf.write_t2v_22_models(root)
    return root


def _prompt(template, overrides):
    from twinflow.runner.api import Runner, apply_overrides

    r = Runner()
    return r, r.load(cf.template(template)), apply_overrides(r.load(cf.template(template)).prompt, overrides,
                                                             r.registry)


def test_plan_lists_denoiser_with_cfg_batch_and_vae_decode_of_text_to_video_wan():
    from twinflow.runner.plan import format_plan, plan_workflow

    _r, _wf, prompt = _prompt("text_to_video_wan.json", SIZE_21)
    plan = {p["kind"]: p for p in plan_workflow(prompt, backend="inductor")}
    den, dec = plan["denoiser"], plan["vae_decode"]
    # UNETLoader 37 -> ModelSamplingSD3 48 -> KSampler 3 at cfg 6 with a negative: B and the CFG batch 2B
    assert (den["model_node"], den["feed_node"], den["used_by"]) == ("37", "48", ["3"])
    assert den["shapes"] == [(1, 16, 2, 4, 4), (2, 16, 2, 4, 4)]
    assert list(den["profile"]["batch"]) == [1, 1, 2] and den["requested"] == "inductor"
    assert (dec["model_node"], dec["used_by"], dec["shapes"]) == ("39", ["8"], [(1, 16, 2, 4, 4)])
    text = format_plan(list(plan.values()))
    assert "denoiser of node 37 (wan2.1_t2v_1.3B_fp16.safetensors) via 48 used by 3" in text
    assert "vae_decode of node 39" in text


def test_plan_lists_both_experts_of_the_wan2_2_template_and_skips_the_bypassed_group():
    from twinflow.runner.plan import plan_workflow

    _r, _wf, prompt = _prompt("video_wan2_2_14B_t2v.json", SIZE_22)
    plan = plan_workflow(prompt)
    dens = sorted((p["model_node"], p["feed_node"], tuple(p["used_by"]), tuple(p["shapes"])) for p in plan
                  if p["kind"] == "denoiser")
    # high: UNETLoader 75 -> LoRA 83 -> ModelSamplingSD3 86 -> KSamplerAdvanced 81; low: 76 -> 85 -> 82 -> 78;
    # cfg 1: no CFG batch
    feeds = {p["model_node"]: p for p in plan if p["kind"] == "denoiser"}
    assert set(feeds) == {"75", "76"}
    for model_node, _feed, used_by, shapes in dens:
        assert shapes == ((1, 16, 2, 4, 4),)
        assert used_by == (("81",) if model_node == "75" else ("78",))
    assert {feeds["75"]["feed_node"], feeds["76"]["feed_node"]} <= {"82", "86"}
    assert [p["used_by"] for p in plan if p["kind"] == "vae_decode"] == [["87"]]  # 97 is bypassed (mode 4)
    assert all(p["backend"] == "eager" for p in plan)  # no --compile: nothing would compile


def test_cli_plan_on_the_template_file(tmp_path, capsys):
    from twinflow.runner.cli import main

    path = tmp_path / "t2v.json"
    path.write_text(json.dumps(cf.template("text_to_video_wan.json")))
    assert main(["plan", str(path), "--backend", "eager", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(p["kind"] for p in plan) == ["denoiser", "vae_decode"]
    assert [p["shapes"] for p in plan if p["kind"] == "denoiser"] == [[[1, 16, 9, 60, 104], [2, 16, 9, 60, 104]]]


def _latent(res, node):
    return res.results[node][0][0]["samples"]


def test_run_compile_eager_and_quantize_apply_to_core_loaders(model_files, tmp_path):
    from twinflow.runner.plan import with_compile_nodes, with_quantize_nodes
    from twinflow.quant.linear import QuantLinear

    runner, wf, prompt = _prompt("text_to_video_wan.json", SIZE_21)
    plain = runner.run(wf, overrides=SIZE_21, output_dir=tmp_path / "a", models_dir=model_files)

    import dataclasses

    compiled = with_compile_nodes(prompt, "eager")
    assert compiled["3"]["inputs"]["model"] == ["twinflow_compile_1", 0]
    assert compiled["twinflow_compile_1"]["inputs"]["model"] == ["48", 0]
    assert compiled["8"]["inputs"]["vae"] == ["twinflow_compile_2", 0]
    res = runner.run(dataclasses.replace(wf, prompt=compiled), output_dir=tmp_path / "b", models_dir=model_files)
    status = res.results["twinflow_compile_1"][1][0]
    assert "eager" in status
    torch.testing.assert_close(_latent(res, "3"), _latent(plain, "3"), rtol=1e-4, atol=1e-5)

    quant = with_quantize_nodes(prompt, "int8_weight_only")
    assert quant["3"]["inputs"]["model"] == ["twinflow_quantize_1", 0]
    assert quant["twinflow_quantize_1"]["inputs"]["force"] is False  # the node's own accuracy check stays on
    both = with_compile_nodes(quant, "eager")  # the compile node compiles the quantized model
    assert both["twinflow_compile_1"]["inputs"]["model"] == ["twinflow_quantize_1", 0]
    res = runner.run(dataclasses.replace(wf, prompt=quant), output_dir=tmp_path / "c", models_dir=model_files)
    qmodel, report = res.results["twinflow_quantize_1"][0][0], res.results["twinflow_quantize_1"][1][0]
    assert any(isinstance(m, QuantLinear) for m in qmodel.module.modules())
    assert "cos" in report.lower()
    a, b = _latent(res, "3"), _latent(plain, "3")
    assert 0 < (a - b).abs().max() and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99


def test_cli_run_quantize_and_compile_on_the_unchanged_template(model_files, tmp_path):
    pytest.importorskip("av")
    from twinflow.runner.cli import main

    path = tmp_path / "t2v.json"
    path.write_text(json.dumps(cf.template("text_to_video_wan.json")))
    args = ["run", str(path), "--models-dir", str(model_files), "--output-dir", str(tmp_path / "out"),
            "--no-progress", "--quantize", "int8_weight_only", "--compile", "eager"]
    for o in SIZE_21:
        args += ["--set", o]
    assert main(args) == 0
    assert list((tmp_path / "out" / "video").glob("ComfyUI_*.mp4"))



def test_extra_model_paths_yaml_read_as_comfyui_reads_it(tmp_path, monkeypatch):
    """ComfyUI's extra_model_paths.yaml (utils/extra_config.py): base_path relative to the YAML's folder, one
    path per line, ComfyUI folder names (`unet`, `clip` are the legacy names) mapped to ours."""
    from twinflow.core import paths

    (tmp_path / "cfg").mkdir()
    for d in ("shared/unets", "shared/te_a", "shared/te_b", "abs_vae", "other"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "shared/unets/u.safetensors").write_bytes(b"x")
    (tmp_path / "shared/te_b/t.safetensors").write_bytes(b"x")
    (tmp_path / "abs_vae/v.safetensors").write_bytes(b"x")
    yml = tmp_path / "cfg" / "extra_model_paths.yaml"
    yml.write_text(f"""
comfyui:
    base_path: ../shared
    is_default: true
    unet: unets/
    clip: |
        te_a/
        te_b/
    upscale_models: nowhere/
other:
    vae: {tmp_path / 'abs_vae'}
""")
    folders = paths.extra_model_folders(yml)
    assert folders == {"diffusion_models": [tmp_path / "shared/unets"],
                       "text_encoders": [tmp_path / "shared/te_a", tmp_path / "shared/te_b"],
                       "vae": [tmp_path / "abs_vae"]}
    monkeypatch.setenv("TWINFLOW_EXTRA_MODEL_PATHS", str(yml))
    with paths.using(models_dir=tmp_path / "other"):
        assert paths.find_model("diffusion_models", "u.safetensors") == tmp_path / "shared/unets/u.safetensors"
        assert paths.find_model("text_encoders", "t.safetensors") == tmp_path / "shared/te_b/t.safetensors"
        assert paths.list_models("vae") == ["v.safetensors"]
        with pytest.raises(FileNotFoundError, match="te_a"):  # the error lists the YAML's folders too
            paths.find_model("text_encoders", "missing.safetensors")
    monkeypatch.setenv("TWINFLOW_EXTRA_MODEL_PATHS", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="extra model paths file"):
        paths.list_models("vae")


def test_template_runs_with_models_found_through_extra_model_paths(model_files, tmp_path):
    """The CLI's --extra-model-paths: the template's files live outside --models-dir, listed by a YAML."""
    pytest.importorskip("av")
    from twinflow.core import paths
    from twinflow.runner.cli import main

    yml = tmp_path / "extra_model_paths.yaml"
    yml.write_text(f"mine:\n    base_path: {model_files}\n    unet: diffusion_models/\n    clip: text_encoders/\n"
                   f"    vae: vae/\n")
    wf = tmp_path / "t2v.json"
    wf.write_text(json.dumps(cf.template("text_to_video_wan.json")))
    (tmp_path / "empty").mkdir()
    args = ["run", str(wf), "--models-dir", str(tmp_path / "empty"), "--extra-model-paths", str(yml),
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    for o in SIZE_21:
        args += ["--set", o]
    try:
        assert main(args) == 0
    finally:
        paths.set_extra_model_paths(None)
        paths.set_models_dir(None)
    assert list((tmp_path / "out" / "video").glob("ComfyUI_*.mp4"))


def test_run_compile_eager_on_the_wan2_2_template_equals_eager(model_files, tmp_path):
    """Both experts (fp8_scaled + LoRA) compiled after their patches; the split's result equals the plain run."""
    import dataclasses

    from twinflow.runner.plan import with_compile_nodes

    runner, wf, prompt = _prompt("video_wan2_2_14B_t2v.json", SIZE_22)
    plain = runner.run(wf, overrides=SIZE_22, output_dir=tmp_path / "a", models_dir=model_files)
    compiled = with_compile_nodes(prompt, "eager")
    inserted = {k: v for k, v in compiled.items() if k.startswith("twinflow_compile_")}
    assert sorted(v["class_type"] for v in inserted.values()) == ["TwinFlowCompileCoreModel"] * 2 + ["TwinFlowCompileCoreVAE"]
    assert {compiled["81"]["inputs"]["model"][0], compiled["78"]["inputs"]["model"][0]} <= set(inserted)
    res = runner.run(dataclasses.replace(wf, prompt=compiled), output_dir=tmp_path / "b", models_dir=model_files)
    torch.testing.assert_close(_latent(res, "78"), _latent(plain, "78"), rtol=1e-4, atol=1e-5)
