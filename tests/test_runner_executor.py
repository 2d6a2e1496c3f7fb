"""Execution semantics: ancestors only, dependency order, list mapping, caching, hidden inputs, interrupts.

Oracles: ComfyUI's _async_map_node_over_list / merge_result_data rules (repeat-last, INPUT_IS_LIST,
OUTPUT_IS_LIST concatenation) and its classic cache (re-run only nodes whose inputs changed), re-derived
by hand in the expected values below; execution counts come from the test nodes themselves.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from twinflow.core import progress
from twinflow.core.errors import Interrupted, WorkflowError
from twinflow.runner.api import Runner, run_workflow
from twinflow.runner.executor import NodeExecutionError

FIX = Path(__file__).parent / "fixtures" / "runner"
_spec = importlib.util.spec_from_file_location("runner_testnodes", FIX / "testnodes.py")
tn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tn)
REG = tn.REGISTRY


@pytest.fixture(autouse=True)
def _reset():
    tn.CALLS.clear()
    tn.TestSaveLatent.SEEN.clear()
    progress.clear_interrupt()
    yield
    progress.clear_interrupt()


def api():
    return json.loads((FIX / "ui_sampler.api.json").read_text())


def test_runs_ui_fixture_with_hidden_inputs(tf_dirs):
    result = run_workflow(FIX / "ui_sampler.json", registry=REG, cache=False)
    assert dict(result) == {"6": {"latents": [{"filename": "run/test_00001_.latent", "subfolder": "", "type": "output"}]}}
    assert result.files() == [tf_dirs["output"] / "run" / "test_00001_.latent"]
    seen = tn.TestSaveLatent.SEEN[-1]
    assert seen["samples"] == {"model": "tiny", "seed": 823456789012345, "steps": 7, "cfg": 4.5, "sampler": "uni_pc"}
    assert seen["unique_id"] == "6"
    assert seen["prompt"]["4"]["inputs"]["steps"] == ["2", 0]  # PROMPT is the API prompt
    assert seen["extra_pnginfo"]["workflow"]["version"] == 0.4  # EXTRA_PNGINFO carries the UI workflow
    assert result.results["4"][0][0]["cfg"] == 4.5
    assert [t.node_id for t in result.timings] == result.executed


def test_only_ancestors_of_outputs_run(tf_dirs):
    p = api()
    p["9"] = {"class_type": "TestFail", "inputs": {"value": 1}}  # not connected to an output: never runs
    result = run_workflow(p, registry=REG, cache=False)
    assert set(result.executed) == {"1", "2", "4", "6"}


def test_second_run_reexecutes_only_changed_nodes(tf_dirs):
    runner = Runner(REG)
    r1 = runner.run(api())
    assert sorted(r1.executed) == ["1", "2", "4", "6"] and r1.cached == []
    r2 = runner.run(api())  # identical: everything cached, output node included (as ComfyUI)
    assert r2.executed == [] and sorted(r2.cached) == ["1", "2", "4", "6"]
    assert dict(r2) == dict(r1)
    r3 = runner.run(api(), overrides={"2.value": 8})  # constant of node 2 -> 2 and its dependents re-run
    assert sorted(r3.executed) == ["2", "4", "6"] and r3.cached == ["1"]
    r4 = runner.run(api(), overrides=["2.value=8", "4.cfg=5.5"])
    assert sorted(r4.executed) == ["4", "6"] and sorted(r4.cached) == ["1", "2"]
    assert tn.CALLS == {"TestModel": 1, "TestConst": 2, "TestSampler": 3, "TestSaveLatent": 3}
    assert tn.TestSaveLatent.SEEN[-1]["samples"]["cfg"] == 5.5 and tn.TestSaveLatent.SEEN[-1]["samples"]["steps"] == 8


def test_process_wide_cache_of_run_workflow(tf_dirs):
    reg = dict(REG)  # its own registry -> its own process-wide runner
    run_workflow(api(), registry=reg)
    r = run_workflow(api(), registry=reg, overrides={"6": {"filename_prefix": "y"}})
    assert r.executed == ["6"]
    assert run_workflow(api(), registry=reg, cache=False).cached == []


def test_is_changed_nan_always_reruns(tf_dirs):
    p = {"1": {"class_type": "TestVolatile", "inputs": {"value": 2}},
         "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    runner = Runner(REG)
    runner.run(p)
    r = runner.run(p)
    assert r.executed == ["1", "2"] or r.executed == ["1"]  # the volatile node always re-runs
    assert tn.CALLS["TestVolatile"] == 2


def test_list_semantics_repeat_last_and_input_is_list(tf_dirs):
    p = {
        "1": {"class_type": "TestListOut", "inputs": {"n": 3}},  # output0 = [0, 1, 2] (list), output1 = 3
        "2": {"class_type": "TestListOut", "inputs": {"n": 2}},  # [0, 1]
        # a from a 3-list, b constant -> 3 calls; a + b
        "3": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 10}},
        # a 3-list + b 2-list -> 3 calls, b repeats its last item: [0+0, 1+1, 2+1]
        "4": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "5": {"class_type": "TestShowList", "inputs": {"value": ["4", 0]}},
        # INPUT_IS_LIST: one call with whole lists
        "6": {"class_type": "TestListSum", "inputs": {"values": ["3", 0], "scale": 2}},
        "7": {"class_type": "TestShow", "inputs": {"value": ["6", 0]}},
        "8": {"class_type": "TestShow", "inputs": {"value": ["1", 1]}},  # non-list output: one value
    }
    r = run_workflow(p, registry=REG, cache=False)
    assert r.results["3"][0] == [10, 11, 12]
    assert r.results["4"][0] == [0, 2, 3]
    assert r["5"] == {"values": [0, 2, 3]}
    assert r.results["6"][0] == [(10 + 11 + 12) * 2]
    assert r["7"] == {"text": ["66"]}
    assert r["8"] == {"text": ["3"]}
    assert tn.CALLS["TestAdd"] == 6 and tn.CALLS["TestListSum"] == 1 and tn.CALLS["TestShowList"] == 1


def test_ui_of_repeated_calls_is_concatenated(tf_dirs):
    p = {"1": {"class_type": "TestListOut", "inputs": {"n": 3}},
         "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    r = run_workflow(p, registry=REG, cache=False)
    assert r["2"] == {"text": ["0", "1", "2"]} and tn.CALLS["TestShow"] == 3


def test_empty_list_input_is_a_clear_error(tf_dirs):
    p = {"1": {"class_type": "TestListOut", "inputs": {"n": 0}},
         "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(WorkflowError, match="empty list"):
        run_workflow(p, registry=REG, cache=False)


def test_inference_mode_during_execution(tf_dirs):
    class Probe:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "f"

        def f(self):
            return {"ui": {"inference": [torch.is_inference_mode_enabled()]}}

    assert run_workflow({"1": {"class_type": "Probe", "inputs": {}}}, registry={"Probe": Probe},
                        cache=False)["1"] == {"inference": [True]}


def test_node_error_names_the_node_and_is_not_cached(tf_dirs):
    p = {"1": {"class_type": "TestFail", "inputs": {"value": 1}},
         "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(NodeExecutionError) as e:
        run_workflow(p, registry=REG, cache=False)
    assert e.value.node_id == "1" and "node #1 (TestFail) failed: value 1 is not acceptable" in str(e.value)
    assert not e.value.is_bug and e.value.to_json()["error"]["type"] == "execution_error"


def test_bad_return_value_is_reported(tf_dirs):
    class Bad:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "f"

        def f(self):
            return 5  # not a tuple

    p = {"1": {"class_type": "Bad", "inputs": {}}, "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(NodeExecutionError, match="expected a tuple of 1"):
        run_workflow(p, registry={**REG, "Bad": Bad}, cache=False)


def test_interrupt_stops_the_run_and_nothing_downstream_runs(tf_dirs):
    p = {"1": {"class_type": "TestSlow", "inputs": {"steps": 4}},
         "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    runner = Runner(REG)
    with pytest.raises(Interrupted):
        runner.run(p)
    assert tn.CALLS["TestShow"] == 0
    # the interrupted node left nothing in the cache: the next run executes it again
    tn.CALLS.clear()
    with pytest.raises(Interrupted):
        runner.run(p)
    assert tn.CALLS["TestSlow"] == 1


def test_node_instances_persist_per_id(tf_dirs):
    class Stateful:
        made = 0

        def __init__(self):
            Stateful.made += 1

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"v": ("INT", {"default": 0, "min": 0, "max": 9})}}

        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "f"

        def f(self, v):
            return {"ui": {"v": [v]}}

    runner = Runner({"S": Stateful})
    for v in range(3):
        runner.run({"1": {"class_type": "S", "inputs": {"v": v}}})
    assert Stateful.made == 1


def test_overrides_errors(tf_dirs):
    with pytest.raises(WorkflowError, match="node #42 is not in the workflow"):
        run_workflow(api(), registry=REG, overrides={"42.value": 1}, cache=False)
    with pytest.raises(WorkflowError, match="has no input 'nope'; its inputs are value"):
        run_workflow(api(), registry=REG, overrides=["2.nope=1"], cache=False)
    with pytest.raises(WorkflowError, match="ID.input=VALUE"):
        run_workflow(api(), registry=REG, overrides=["2value"], cache=False)


def test_output_dir_is_per_run_and_restored(tmp_path, tf_dirs):
    r = run_workflow(api(), registry=REG, output_dir=tmp_path / "elsewhere", cache=False)
    assert r.files() == [tmp_path / "elsewhere" / "run" / "test_00001_.latent"]
    from twinflow.core import paths

    assert paths.output_dir() == tf_dirs["output"]


def test_paths_using_restores_on_error(tmp_path, tf_dirs):
    from twinflow.core import paths

    before = (paths.output_dir(), paths.models_dir(), paths.input_dir())
    with pytest.raises(RuntimeError):
        with paths.using(output_dir=tmp_path / "o", input_dir=tmp_path / "i"):
            assert (paths.output_dir(), paths.input_dir()) == (tmp_path / "o", tmp_path / "i")
            assert paths.models_dir() == before[1]  # None leaves a folder as it is
            raise RuntimeError("boom")
    assert (paths.output_dir(), paths.models_dir(), paths.input_dir()) == before


def test_real_io_nodes_end_to_end(tf_dirs):
    """A small UI workflow of TwinFlow's own io nodes (Empty Latent Video -> Save Latent) through run_workflow."""
    from twinflow.nodes import NODE_CLASS_MAPPINGS

    if not {"TwinFlowEmptyLatentVideo", "TwinFlowSaveLatent"} <= set(NODE_CLASS_MAPPINGS):
        pytest.skip("the io nodes are not available in this build")
    from safetensors import safe_open

    r = run_workflow(FIX / "ui_real_latent.json", cache=False)
    files = r.files()
    assert len(files) == 1 and files[0].is_file() and files[0].parent == tf_dirs["output"] / "latents"
    with safe_open(str(files[0]), "pt") as f:
        key = "latent_tensor" if "latent_tensor" in f.keys() else next(iter(f.keys()))
        shape = tuple(f.get_tensor(key).shape)
    assert shape == (1, 16, 1 + (9 - 1) // 4, 48 // 8, 64 // 8)  # ComfyUI's Wan latent convention
    again = run_workflow(FIX / "ui_real_latent.json", cache=False).files()
    assert again[0] != files[0] and files[0].is_file()  # a second run never overwrites


def test_failed_run_keeps_finished_nodes_cached(tf_dirs):
    runner = Runner(REG)
    p = api()
    runner.run(p)
    # the failing branch comes first, so the run stops before it reaches the cached nodes
    bad = {"10": {"class_type": "TestShow", "inputs": {"value": ["9", 0]}},
           "9": {"class_type": "TestFail", "inputs": {"value": 1}}, **api()}
    with pytest.raises(NodeExecutionError):
        runner.run(bad)
    r = runner.run(p)  # the earlier results survived the failed run
    assert r.executed == [] and sorted(r.cached) == ["1", "2", "4", "6"]


def test_undeclared_inputs_are_ignored(tf_dirs, caplog):
    p = api()
    p["2"]["inputs"]["stale"] = ["404", 0]  # an input the class no longer has, linked to a missing node
    r = run_workflow(p, registry=REG, cache=False)
    assert sorted(r.executed) == ["1", "2", "4", "6"]
    assert "'stale' is not declared" in caplog.text


def test_lazy_inputs_only_the_requested_branch_runs(tf_dirs):
    tn.TestSwitch.SEEN.clear()
    p = {"1": {"class_type": "TestConst", "inputs": {"value": 5}},
         "2": {"class_type": "TestFail", "inputs": {"value": 1}},  # would raise if evaluated
         "3": {"class_type": "TestSwitch", "inputs": {"use_a": True, "a": ["1", 0], "b": ["2", 0]}},
         "4": {"class_type": "TestShow", "inputs": {"value": ["3", 0]}}}
    r = run_workflow(p, registry=REG, cache=False)
    assert r["4"] == {"text": ["5"]} and "2" not in r.executed
    # as in ComfyUI, check_lazy_status runs again once the requested input is ready; unevaluated ones are None
    assert tn.TestSwitch.SEEN == [(True, None, None), (True, 5, None)]
    p["3"]["inputs"]["use_a"] = False
    with pytest.raises(NodeExecutionError, match="TestFail"):
        run_workflow(p, registry=REG, cache=False)


def test_lazy_input_without_check_stays_none(tf_dirs):
    p = {"1": {"class_type": "TestConst", "inputs": {"value": 5}},
         "2": {"class_type": "TestLazyNoCheck", "inputs": {"x": ["1", 0]}},
         "3": {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}}
    r = run_workflow(p, registry=REG, cache=False)
    assert r["3"] == {"text": ["None"]} and r.executed == ["2", "3"]  # node 1 is never needed


def test_cached_output_needs_nothing_upstream(tf_dirs):
    runner = Runner(REG)
    runner.run(api())
    tn.CALLS.clear()
    r = runner.run(api())
    assert r.executed == [] and not tn.CALLS and [t.node_id for t in r.timings] == ["6"]
    assert set(r.results) == {"1", "2", "4", "6"}  # cached results are still reported
