"""Validation errors, one test per ComfyUI error kind: type string, node id, class and input named.

Oracle: ComfyUI's execution.validate_inputs / validate_prompt (error types, messages and coercion
rules re-derived from its source), not the code under test.
"""
import importlib.util
from pathlib import Path

import pytest

from twinflow.core.errors import WorkflowError
from twinflow.runner.validate import format_error, validate_prompt

FIX = Path(__file__).parent / "fixtures" / "runner"
_spec = importlib.util.spec_from_file_location("runner_testnodes", FIX / "testnodes.py")
tn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tn)
REG = tn.REGISTRY


def base():
    return {
        "1": {"class_type": "TestModel", "inputs": {"name": "tiny"}},
        "2": {"class_type": "TestConst", "inputs": {"value": 7}},
        "4": {"class_type": "TestSampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": ["2", 0], "cfg": 4.5,
                                                      "sampler_name": "euler", "denoise": 1.0}},
        "6": {"class_type": "TestSaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "x"}},
    }


def errors_of(prompt, reg=REG):
    with pytest.raises(WorkflowError) as e:
        validate_prompt(prompt, reg)
    return e.value


def only_error(prompt, node_id):
    err = errors_of(prompt)
    assert err.type == "prompt_outputs_failed_validation"
    assert list(err.node_errors) == [node_id], err.node_errors
    entry = err.node_errors[node_id]
    assert entry["class_type"] == prompt[node_id]["class_type"]
    assert entry["dependent_outputs"] == ["6"] or entry["dependent_outputs"]
    assert len(entry["errors"]) == 1, entry["errors"]
    text = format_error(err, prompt)
    assert f"node #{node_id} {entry['class_type']}" in text
    return entry["errors"][0], text


def test_valid_prompt_coerces_and_orders():
    p = base()
    p["4"]["inputs"]["cfg"] = "4"  # ComfyUI coerces with float()
    p["2"]["inputs"]["value"] = {"__value__": 7.9}  # __value__ unwrapped, int() truncates like ComfyUI
    p["9"] = {"class_type": "TestConst", "inputs": {"value": 10**6}}  # not an ancestor of an output: not checked
    v = validate_prompt(p, REG)
    assert v.outputs == ["6"]
    assert v.prompt["4"]["inputs"]["cfg"] == 4.0 and v.prompt["2"]["inputs"]["value"] == 7
    assert p["4"]["inputs"]["cfg"] == "4"  # the caller's prompt is not mutated
    order = v.order
    assert set(order) == {"1", "2", "4", "6"} and order.index("4") > order.index("1") and order[-1] == "6"


def test_missing_node_type_core_and_unknown():
    p = base()
    p["7"] = {"class_type": "KSampler", "inputs": {}}
    err = errors_of(p)
    assert err.type == "missing_node_type" and "ComfyUI core node" in err.message and "#7" in err.message
    p["7"]["class_type"] = "TestSamplr"
    err = errors_of(p)
    assert "did you mean TestSampler" in err.message
    assert err.to_json()["node_errors"]["7"]["class_type"] == "TestSamplr"


def test_prompt_no_outputs():
    p = base()
    del p["6"]
    err = errors_of(p)
    assert err.type == "prompt_no_outputs"
    assert errors_of({}).type == "prompt_no_outputs"


def test_required_input_missing():
    p = base()
    del p["4"]["inputs"]["denoise"]
    e, text = only_error(p, "4")
    assert e["type"] == "required_input_missing" and e["extra_info"]["input_name"] == "denoise"
    assert "input 'denoise'" in text


@pytest.mark.parametrize("value, fragment", [
    (["1", 0, 0], "length-2 list"),
    ([1, 0], 'write ["1", 0]'),
    (["99", 0], "#99 does not exist"),
    (["1", 3], "no output 3"),
    (["1", -1], "non-negative integer"),
    (["1", True], "non-negative integer"),
])
def test_bad_linked_input(value, fragment):
    p = base()
    p["4"]["inputs"]["model"] = value
    e, text = only_error(p, "4")
    assert e["type"] == "bad_linked_input" and e["extra_info"]["input_name"] == "model"
    assert fragment in e["message"] + e["details"]


def test_return_type_mismatch_and_unions_and_any():
    p = base()
    p["4"]["inputs"]["model"] = ["2", 0]  # INT into TESTMODEL
    e, _ = only_error(p, "4")
    assert e["type"] == "return_type_mismatch"
    assert e["details"] == "model, received_type(INT) mismatch input_type(TESTMODEL)"
    p = base()
    p["3"] = {"class_type": "TestUnion", "inputs": {"model": ["1", 0]}}  # TESTMODEL into "OTHER_MODEL,TESTMODEL"
    p["4"]["inputs"]["model"] = ["3", 0]  # "TESTMODEL,OTHER_MODEL" into TESTMODEL
    p["8"] = {"class_type": "TestShow", "inputs": {"value": ["4", 0]}}  # anything into "*"
    assert set(validate_prompt(p, REG).outputs) == {"6", "8"}


@pytest.mark.parametrize("node, name, value", [
    ("2", "value", "abc"),
    ("2", "value", 1e400),  # JSON 1e400 parses to inf: int(inf) overflows
    ("2", "value", float("nan")),
    ("2", "value", [1, 2, 3]),  # a list that is not a link
    ("4", "cfg", float("inf")),  # stricter than ComfyUI: non-finite floats refused
    ("4", "cfg", {"a": 1}),
    ("6", "samples", 5),  # a constant for a LATENT socket
])
def test_invalid_input_type(node, name, value):
    p = base()
    p[node]["inputs"][name] = value
    e, text = only_error(p, node)
    assert e["type"] in ("invalid_input_type", "bad_linked_input")
    assert e["extra_info"]["input_name"] == name and f"input '{name}'" in text


@pytest.mark.parametrize("value, kind", [(0, "value_smaller_than_min"), (2**70, "value_bigger_than_max"),
                                         ("100000", "value_bigger_than_max")])
def test_min_max(value, kind):
    p = base()
    p["4"]["inputs"]["steps"] = value
    e, _ = only_error(p, "4")
    assert e["type"] == kind and e["extra_info"]["input_name"] == "steps"
    if kind == "value_smaller_than_min":
        assert e["message"] == "Value 0 smaller than min of 1"


def test_value_not_in_list():
    p = base()
    p["4"]["inputs"]["sampler_name"] = "dpmpp"
    e, _ = only_error(p, "4")
    assert e["type"] == "value_not_in_list"
    assert e["details"] == "sampler_name: 'dpmpp' not in ['euler', 'uni_pc']"


def test_custom_validation_and_its_exception():
    p = {"1": {"class_type": "TestEven", "inputs": {"x": 3}},
         "6": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    e, text = only_error(p, "1")
    assert e["type"] == "custom_validation_failed" and e["details"] == "x - x must be even, got 3"
    p["1"]["inputs"]["x"] = 11  # above max, but VALIDATE_INPUTS names x: ComfyUI skips min/max for it
    e, _ = only_error(p, "1")
    assert e["type"] == "custom_validation_failed"
    p["1"]["inputs"]["x"] = 4
    validate_prompt(p, REG)
    p["1"]["class_type"] = "TestBadValidate"
    e, _ = only_error(p, "1")
    assert e["type"] == "exception_during_validation" and "validator exploded" in e["details"]


def test_dependency_cycle():
    p = {"1": {"class_type": "TestAdd", "inputs": {"a": ["2", 0], "b": 1}},
         "2": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 1}},
         "3": {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}}
    err = errors_of(p)
    assert set(err.node_errors) == {"1", "2"}
    assert all(e["type"] == "dependency_cycle" for v in err.node_errors.values() for e in v["errors"])
    assert "(TestAdd)" in err.node_errors["1"]["errors"][0]["details"]


def test_long_chain_does_not_hit_recursion_limit():
    p = {"0": {"class_type": "TestConst", "inputs": {"value": 1}}}
    for i in range(1, 3000):
        p[str(i)] = {"class_type": "TestAdd", "inputs": {"a": [str(i - 1), 0], "b": 1}}
    p["out"] = {"class_type": "TestShow", "inputs": {"value": ["2999", 0]}}
    v = validate_prompt(p, REG)
    assert len(v.order) == 3001 and v.order[0] == "0"


def test_several_errors_reported_together_and_json_shape():
    p = base()
    p["4"]["inputs"]["steps"] = 0
    p["1"]["inputs"]["name"] = "huge"
    err = errors_of(p)
    j = err.to_json()
    assert j["error"]["type"] == "prompt_outputs_failed_validation"
    assert j["error"]["message"] == "Prompt outputs failed validation"
    assert set(j["node_errors"]) == {"1", "4"}
    for entry in j["node_errors"].values():
        assert entry["dependent_outputs"] == ["6"]
        for e in entry["errors"]:
            assert set(e) == {"type", "message", "details", "extra_info"}
    assert "2 error(s)" in format_error(err)


def test_partial_targets():
    p = base()
    p["8"] = {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}
    assert validate_prompt(p, REG, targets=["8"]).order == ["2", "8"]
    with pytest.raises(WorkflowError, match="not in the prompt"):
        validate_prompt(p, REG, targets=["77"])
