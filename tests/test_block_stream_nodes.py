"""TwinFlow Block Stream (node) and `twinflow run --stream-blocks N` on ComfyUI's Wan2.2 two-expert template
(tiny random files): the CLI puts one stream node per expert, both in one budget group, after the LoRA and
ModelSamplingSD3 patches (and after a quantize node); compile is refused beside it. The streamed run goes
through the real node and library with the counting device shim of tests/test_block_stream.py standing in
for the GPU's copy engine, and gives the same latent, bit for bit, as the resident run."""
import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from twinflow.core.errors import WorkflowError
from twinflow.models import block_stream as BS

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("core_files", FIX / "core_files.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)
_spec2 = importlib.util.spec_from_file_location("test_block_stream_shim", Path(__file__).parent / "test_block_stream.py")
shim = importlib.util.module_from_spec(_spec2)
_spec2.loader.exec_module(shim)

SIZE_22 = ["74.width=32", "74.height=32", "74.length=5"]


def _prompt(template, overrides):
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    from twinflow.runner.api import Runner, apply_overrides

    r = Runner()
    wf = r.load(cf.template(template))
    return r, wf, apply_overrides(wf.prompt, overrides, r.registry)


def test_stream_nodes_go_after_the_patches_one_per_expert_in_one_group():
    from twinflow.nodes.stream import CLI_GROUP
    from twinflow.runner.plan import with_compile_nodes, with_quantize_nodes, with_stream_nodes

    _r, _wf, prompt = _prompt("video_wan2_2_14B_t2v.json", SIZE_22)
    out = with_stream_nodes(prompt, 3)
    nodes = {k: v for k, v in out.items() if k.startswith("twinflow_stream_")}
    assert len(nodes) == 2
    for nid, node in nodes.items():
        assert node["class_type"] == "TwinFlowBlockStreamCore"
        assert node["inputs"]["max_resident_blocks"] == 3 and node["inputs"]["budget_group"] == CLI_GROUP
        assert node["inputs"]["model"][0] in ("82", "86")  # after LoRA -> ModelSamplingSD3
    assert {out["81"]["inputs"]["model"][0], out["78"]["inputs"]["model"][0]} == set(nodes)
    assert prompt["81"]["inputs"]["model"][0] in ("82", "86")  # the input prompt is not changed
    quant = with_stream_nodes(with_quantize_nodes(prompt, "int8_weight_only"), 2)
    for node in (v for k, v in quant.items() if k.startswith("twinflow_stream_")):
        assert node["inputs"]["model"][0].startswith("twinflow_quantize_")  # quantize, then stream
    with pytest.raises(WorkflowError, match="compiled graph holds every weight"):
        with_stream_nodes(with_compile_nodes(prompt, "eager"), 2)


def test_cli_refuses_compile_beside_stream_blocks_and_a_bad_count(tmp_path, capsys):
    from twinflow.runner.cli import _positive_int, main

    wf = tmp_path / "w.json"
    wf.write_text("{}")
    assert main(["run", str(wf), "--stream-blocks", "2", "--compile", "eager"]) != 0
    assert "--stream-blocks and --compile do not combine" in capsys.readouterr().err
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _positive_int(bad)
    assert main(["run", str(wf), "--stream-blocks", "0"]) != 0


def test_node_on_a_cpu_only_machine_returns_the_model_and_says_so(monkeypatch):
    from twinflow.models import wan_dit
    from twinflow.nodes import stream

    d = wan_dit.make_denoiser(wan_dit.random_wan_dit("tiny", seed=0), "tiny-a")
    monkeypatch.setattr(stream, "stream_device", lambda d: None)
    out = stream.TwinFlowBlockStream().apply(d, 2)
    model, status = out["result"]
    assert model is d and "not streamed: the compute device is the CPU" in status
    assert out["ui"]["text"] == [status]
    with pytest.raises(ValueError, match="max_resident_blocks must be an integer >= 1"):
        stream.stream_model(d, 0)


def test_node_streams_a_copy_and_quantize_or_compile_of_it_are_refused(monkeypatch):
    from twinflow.models import wan_dit
    from twinflow.nodes import stream
    from twinflow.nodes.compile import TwinFlowCompileModel
    from twinflow.nodes.quant import TwinFlowQuantizeModel

    d = wan_dit.make_denoiser(wan_dit.random_wan_dit("tiny", seed=0), "tiny-a")
    engine = shim.CountingEngine(budget_limit=1)
    monkeypatch.setattr(stream, "stream_device", lambda d: torch.device("cpu"))
    pins = []
    monkeypatch.setattr(BS, "default_engine", lambda device, pin=True: pins.append(pin) or engine)
    model, status = stream.TwinFlowBlockStream().apply(d, 1)["result"]
    stream.TwinFlowBlockStream().apply(d, 1, pin_memory=False)
    assert pins == [True, False]
    assert model is not d and model.module is not d.module and BS.streamer_of(d.module) is None
    assert status == model.info["block_stream"] and "tiny-a: streaming 2 blocks" in status
    x, t, ctx = shim._inputs(d.config)
    with torch.no_grad():
        assert torch.equal(model.velocity(x, t / 1000, ctx), d.velocity(x, t / 1000, ctx))
    assert engine.copies == {("tiny-a", 0): 1, ("tiny-a", 1): 1}
    with pytest.raises(ValueError, match="TwinFlow Quantize Model: tiny-a is block-streamed"):
        TwinFlowQuantizeModel().quantize(model)
    with pytest.raises(ValueError, match="TwinFlow Compile Model: tiny-a is block-streamed"):
        TwinFlowCompileModel().compile(model, "eager", "from workflow", "default")
    compiled = TwinFlowCompileModel().compile(d, "eager", "from workflow", "default",
                                              latent={"samples": torch.zeros(1, 16, 1, 4, 4)})["result"][0]
    with pytest.raises(ValueError, match="CompiledWanDiT has none .a compiled or wrapped model"):
        stream.TwinFlowBlockStream().apply(compiled, 1)  # compile, then stream: refused too


@pytest.mark.slow
def test_wan2_2_two_expert_template_streamed_equals_resident(tmp_path_factory, monkeypatch):
    """The CLI's path (stream nodes inserted, UNETLoader in host memory) on the real headless runner; the two
    experts share one budget of 2 blocks (the shim counts the live copies of both)."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("av")
    from twinflow.nodes import core_models, stream
    from twinflow.runner.plan import with_stream_nodes

    files = tmp_path_factory.mktemp("models_stream")
    cf.write_t2v_22_models(files)
    runner, wf, prompt = _prompt("video_wan2_2_14B_t2v.json", SIZE_22)
    out = tmp_path_factory.mktemp("out")
    plain = runner.run(dataclasses.replace(wf, prompt=prompt), output_dir=out / "a", models_dir=files)
    engine = shim.CountingEngine(budget_limit=2)
    monkeypatch.setattr(stream, "stream_device", lambda d: torch.device("cpu"))
    monkeypatch.setattr(BS, "default_engine", lambda device, pin=True: engine)
    monkeypatch.setitem(BS._GROUPS, stream.CLI_GROUP, BS.StreamBudget(2, stream.CLI_GROUP))
    with core_models.loading_on_host():
        res = runner.run(dataclasses.replace(wf, prompt=with_stream_nodes(prompt, 2)), output_dir=out / "b",
                         models_dir=files)
    assert torch.equal(res.results["78"][0][0]["samples"], plain.results["78"][0][0]["samples"])
    names = {label[0] for label in engine.copies}
    assert len(names) == 2 and engine.peak == 2 and engine.live == {}
    per_block = {}
    for (name, i), n in engine.copies.items():
        per_block.setdefault(name, set()).add(n)
    # each expert runs on its side of the boundary: every block of an expert is copied once per forward it ran
    assert all(len(counts) == 1 for counts in per_block.values())
    statuses = [v[1][0] for k, v in res.results.items() if k.startswith("twinflow_stream_")]
    assert len(statuses) == 2 and all("shared by 2 models" in s or "budget 'twinflow-run'" in s for s in statuses)


@pytest.mark.slow
def test_cli_run_stream_blocks_on_a_cpu_machine_runs_and_says_not_streamed(tmp_path_factory, monkeypatch, capsys):
    """`twinflow run --stream-blocks 2` on the unchanged text_to_video_wan template without a GPU: the inserted node
    leaves the model as it is, says so in a log line, and the video is written."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("av")
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    import json

    from twinflow.nodes import stream
    from twinflow.runner.cli import main

    monkeypatch.setattr(stream, "stream_device", lambda d: None)  # as on a machine without CUDA
    files = tmp_path_factory.mktemp("models_cli_stream")
    cf.write_t2v_models(files)
    out = tmp_path_factory.mktemp("out_cli_stream")
    path = out / "t2v.json"
    path.write_text(json.dumps(cf.template("text_to_video_wan.json")))
    args = ["run", str(path), "--models-dir", str(files), "--output-dir", str(out / "o"), "--no-progress",
            "--stream-blocks", "2"]
    for o in ["40.width=32", "40.height=32", "40.length=5", "3.steps=2"]:
        args += ["--set", o]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "--stream-blocks 2: wan2.1_t2v_1.3B_fp16.safetensors: not streamed: the compute device is the CPU" in err
    assert list((out / "o" / "video").glob("ComfyUI_*.mp4"))


def test_preflight_counts_only_the_budget_of_streamed_blocks_on_an_accelerator(tmp_path, monkeypatch):
    """The memory plan (which refuses runs that cannot fit before anything runs) counts a streamed denoiser's
    weights as its budget of blocks, one budget per group (the two experts of `--stream-blocks` share one), on an
    accelerator only: on the CPU the node streams nothing, so the whole weights count."""
    pytest.importorskip("sentencepiece")
    from twinflow.core import paths
    from twinflow.runner import preflight
    from twinflow.runner.plan import with_stream_nodes

    files = cf.write_t2v_22_models(tmp_path)  # tiny experts: 2 blocks each
    monkeypatch.setattr(paths, "_models_dir", None, raising=False)
    paths.set_models_dir(str(tmp_path))

    class Engine:
        estimate_decode_bytes = staticmethod(preflight._vae_engine().estimate_decode_bytes)

        @staticmethod
        def available_memory(dev):
            return 1 << 40

    monkeypatch.setattr(preflight, "_vae_engine", lambda: Engine)
    _r, _wf, prompt = _prompt("video_wan2_2_14B_t2v.json", SIZE_22)
    sizes = [files[e].stat().st_size for e in ("high", "low")]
    plain = preflight.memory_plan(prompt, "cuda").parts["model weights"]
    streamed = preflight.memory_plan(with_stream_nodes(prompt, 1), "cuda").parts["model weights"]
    assert plain == sum(sizes) and streamed == max(s // 2 for s in sizes)  # 1 of 2 blocks, one shared budget
    assert preflight.memory_plan(with_stream_nodes(prompt, 1), "cpu").parts["model weights"] == sum(sizes)


def test_node_follows_the_conventions():
    import twinflow
    from twinflow.nodes.core_headless import CLI_NODE_CLASS_MAPPINGS
    from twinflow.nodes.stream import TwinFlowBlockStream

    assert twinflow.NODE_CLASS_MAPPINGS["TwinFlowBlockStream"] is TwinFlowBlockStream
    assert CLI_NODE_CLASS_MAPPINGS["TwinFlowBlockStreamCore"].RETURN_TYPES == ("MODEL", "STRING")
    assert TwinFlowBlockStream.CATEGORY == "TwinFlow/dit" and TwinFlowBlockStream.DESCRIPTION
    spec = TwinFlowBlockStream.INPUT_TYPES()
    for name, (kind, opts) in {**spec["required"], **spec["optional"]}.items():
        assert opts.get("tooltip"), name
        if kind == "INT":
            assert {"min", "max", "step", "default"} <= set(opts) and opts["min"] == 1
