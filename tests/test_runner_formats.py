"""UI -> API conversion (the frontend's graphToPrompt) and workflow loading.

Oracle: the expected API prompts were written by hand from the frontend source (executionUtil.ts
graphToPrompt, litegraph ExecutableNodeDTO.resolveInput/resolveOutput, useIntWidget/useComboWidget,
valueControlWidgets.ts, PrimitiveNode.applyToGraph), not produced by the code under test.
"""
import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest

from twinflow.core.errors import WorkflowError
from twinflow.runner import formats
from twinflow.runner.formats import load_workflow, process_dynamic_prompt, ui_to_api, widget_slots

FIX = Path(__file__).parent / "fixtures" / "runner"
_spec = importlib.util.spec_from_file_location("runner_testnodes", FIX / "testnodes.py")
tn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tn)
REG = tn.REGISTRY


def _ui(nodes, links, version=0.4, **extra):
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": version, **extra}


def _node(nid, type_, widgets=None, inputs=(), outputs=(), mode=0, **kw):
    return {"id": nid, "type": type_, "pos": [0, 0], "size": [200, 80], "flags": {}, "order": nid, "mode": mode,
            "inputs": list(inputs), "outputs": list(outputs), "properties": {"Node name for S&R": type_},
            "widgets_values": widgets if widgets is not None else [], **kw}


def _in(name, type_, link=None, widget=False):
    d = {"name": name, "type": type_, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def _out(name, type_, links):
    return {"name": name, "type": type_, "links": links}


@pytest.mark.parametrize("name", ["ui_sampler.json", "ui_sampler_v1.json", "ui_sampler_legacy.json"])
def test_fixture_converts_like_the_frontend(name):
    # seed + "randomize" control value skipped, steps converted+linked (link wins over the saved 20),
    # cfg driven by a PrimitiveNode (4.5 overrides the saved 8), model through a Reroute, the bypassed blur
    # passes its LATENT input through, the muted TestShow and Note/MarkdownNote are dropped.
    expected = json.loads((FIX / "ui_sampler.api.json").read_text())
    wf = load_workflow(FIX / name, REG)
    assert wf.format == "ui"
    assert wf.prompt == expected
    assert wf.extra_pnginfo == {"workflow": json.loads((FIX / name).read_text())}


def test_widget_slots_seed_control_and_combo_control_and_upload():
    class N:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {
                "image": (["a.png", "b.png"], {"image_upload": True}),
                "noise_seed": ("INT", {"default": 0}),
                "x": ("INT", {"control_after_generate": True}),
                "y": ("INT", {"forceInput": True}),
                "choice": (["p", "q"], {"control_after_generate": True}),
                "img": ("IMAGE",),
                "n": ("INT", {}),
            }, "optional": {"opt": ("FLOAT", {"default": 0.5}), "seed": ("INT", {"control_after_generate": False})}}

    names = [n for n, _ in widget_slots(N)]
    # image, noise_seed+control, x+control, choice+control+filter, n, upload button (end of required), opt, seed
    assert names == ["image", "noise_seed", None, "x", None, "choice", None, None, "n", None, "opt", "seed"]


def test_combo_with_control_and_defaults_for_short_widgets_values():
    class N:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"choice": (["p", "q"], {"control_after_generate": True}),
                                 "k": ("INT", {"default": 9}), "s": ("STRING", {}), "b": ("BOOLEAN", {}),
                                 "c2": ("COMBO", {"options": ["u", "v"]})}}

        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "f"

    ui = _ui([_node(1, "N", ["q", "fixed", "", 3])], [])
    api = ui_to_api(ui, {"N": N})
    # "fixed" and the filter string are not sent; s/b/c2 are missing from widgets_values -> widget defaults
    assert api["1"]["inputs"] == {"choice": "q", "k": 3, "s": "", "b": False, "c2": "u"}


def test_widgets_values_dict_and_list_values_are_wrapped():
    class N:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"v": ("COMBO", {"options": [[1, 2]], "multiselect": True}), "k": ("INT", {})}}

    api = ui_to_api(_ui([_node(1, "N", {"k": 4, "v": [1, 2]})], []), {"N": N})
    assert api["1"]["inputs"] == {"v": {"__value__": [1, 2]}, "k": 4}


def test_muted_source_removes_the_input_and_bypass_without_match_drops_link():
    nodes = [
        _node(1, "TestConst", [5], outputs=[_out("INT", "INT", [1])], mode=2),
        _node(2, "TestAdd", [3], inputs=[_in("a", "INT", 1), _in("b", "INT", None, widget=True)],
              outputs=[_out("INT", "INT", [2])]),
        _node(3, "TestModel", ["tiny"], outputs=[_out("TESTMODEL", "TESTMODEL", [3])]),
        # bypassed blur whose only input is LATENT: a TESTMODEL output cannot pass through -> link dropped
        _node(4, "TestBlur", [0.1], inputs=[_in("latent", "LATENT", None)], outputs=[_out("LATENT", "LATENT", [4])],
              mode=4),
        _node(5, "TestShow", [], inputs=[_in("value", "*", 2)]),
        _node(6, "TestSaveLatent", ["x"], inputs=[_in("samples", "LATENT", 4)]),
    ]
    links = [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 5, 0, "INT"], [4, 4, 0, 6, 0, "LATENT"]]
    api = ui_to_api(_ui(nodes, links), REG)
    assert "1" not in api and "4" not in api
    assert api["2"]["inputs"] == {"b": 3}  # link to the muted node removed, as graphToPrompt does
    assert api["5"]["inputs"] == {"value": ["2", 0]}
    assert api["6"]["inputs"] == {"filename_prefix": "x"}


def test_bypass_prefers_same_slot_then_exact_type():
    class Two:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"a": ("INT", {"forceInput": True}), "m": ("TESTMODEL",)}}

        RETURN_TYPES = ("TESTMODEL", "INT")
        FUNCTION = "f"

    reg = {**REG, "Two": Two}
    nodes = [
        _node(1, "TestConst", [5], outputs=[_out("INT", "INT", [1])]),
        _node(2, "TestModel", ["tiny"], outputs=[_out("TESTMODEL", "TESTMODEL", [2])]),
        _node(3, "Two", [], inputs=[_in("a", "INT", 1), _in("m", "TESTMODEL", 2)],
              outputs=[_out("TESTMODEL", "TESTMODEL", [3]), _out("INT", "INT", [4])], mode=4),
        _node(4, "TestSampler", [1, "fixed", 2, 3.0, "euler", 1.0],
              inputs=[_in("model", "TESTMODEL", 3)], outputs=[_out("LATENT", "LATENT", [])]),
        _node(5, "TestShow", [], inputs=[_in("value", "INT", 4)]),
    ]
    links = [[1, 1, 0, 3, 0, "INT"], [2, 2, 0, 3, 1, "TESTMODEL"], [3, 3, 0, 4, 0, "TESTMODEL"],
             [4, 3, 1, 5, 0, "INT"]]
    api = ui_to_api(_ui(nodes, links), reg)
    # output 0 (TESTMODEL): slot 0 input is INT (no match) -> exact type match -> input 1 -> node 2
    assert api["4"]["inputs"]["model"] == ["2", 0]
    # output 1 (INT): slot 1 input is TESTMODEL (no match) -> exact type INT -> input 0 -> node 1
    assert api["5"]["inputs"]["value"] == ["1", 0]


def test_primitive_through_reroute_and_dynamic_prompts():
    nodes = [
        _node(1, "PrimitiveNode", ["a {red|blue} fox // a comment"],
              outputs=[{"name": "STRING", "type": "STRING", "widget": {"name": "text"}, "links": [1]}]),
        _node(2, "Reroute", None, inputs=[_in("", "*", 1)], outputs=[_out("", "STRING", [2])]),
        _node(3, "TestText", ["saved text", "y"], inputs=[_in("text", "STRING", 2, widget=True)],
              outputs=[_out("STRING", "STRING", [3])]),
        _node(4, "TestShow", [], inputs=[_in("value", "*", 3)]),
    ]
    links = [[1, 1, 0, 2, 0, "STRING"], [2, 2, 0, 3, 0, "STRING"], [3, 3, 0, 4, 0, "STRING"]]
    seen = set()
    for seed in range(20):
        api = ui_to_api(_ui(nodes, links), REG, rng=random.Random(seed))
        seen.add(api["3"]["inputs"]["text"])
        assert api["3"]["inputs"]["extra"] == "y"  # not dynamicPrompts: unchanged
    assert seen == {"a red fox ", "a blue fox "}


def test_process_dynamic_prompt_matches_frontend_rules():
    rng = random.Random(0)
    assert process_dynamic_prompt(r"keep \{literal\} and /* gone */x", rng) == "keep {literal} and x"
    assert process_dynamic_prompt("{a|{b|b}}", random.Random(1)) in ("a", "b")
    assert process_dynamic_prompt("{only}", rng) == "only"
    assert process_dynamic_prompt("unclosed {a|b", rng) in ("unclosed a", "unclosed b")


def test_group_nodes_and_subgraphs_are_refused_clearly():
    ui = _ui([_node(1, "workflow>MyGroup", [1])], [], extra={"groupNodes": {"MyGroup": {}}})
    with pytest.raises(WorkflowError, match="Convert to nodes"):
        ui_to_api(ui, REG)
    ui = _ui([_node(1, "6a1f0d2e-0000-4000-8000-000000000001", [])], [], version=1,
             definitions={"subgraphs": [{"id": "6a1f0d2e-0000-4000-8000-000000000001", "name": "sub"}]})
    with pytest.raises(WorkflowError, match="subgraph"):
        ui_to_api(ui, REG)


def test_unknown_and_core_nodes_in_ui():
    ui = _ui([_node(1, "KSampler", [1, "randomize"]), _node(2, "NotANode", [])], [])
    with pytest.raises(WorkflowError) as e:
        ui_to_api(ui, REG)
    assert "ComfyUI core node" in str(e.value) and "run this workflow inside ComfyUI" in str(e.value)
    assert set(e.value.node_errors) == {"1", "2"}
    assert e.value.node_errors["2"]["class_type"] == "NotANode"


@pytest.mark.parametrize("mutate, match", [
    (lambda ui: ui["links"].pop(0), "dangling link"),  # input references a link id that is gone
    (lambda ui: ui["links"].__setitem__(0, [1, 99, 0, 10, 0, "*"]), "does not exist"),
    (lambda ui: ui["nodes"][1].__setitem__("id", 1.5), "integer or string id"),
    (lambda ui: ui["nodes"][1].__setitem__("mode", "on"), "mode"),
    (lambda ui: ui["nodes"][1].__setitem__("widgets_values", 3), "widgets_values"),
    (lambda ui: ui["nodes"].append(copy.deepcopy(ui["nodes"][1])), "two nodes with id"),
    (lambda ui: ui.__setitem__("links", {"a": 1}), "'links' must be a list"),
    (lambda ui: ui["links"].__setitem__(1, [2, 2, -1, 4, 2, "INT"]), "non-negative"),
])
def test_malformed_ui_gives_workflow_error(mutate, match):
    ui = json.loads((FIX / "ui_sampler.json").read_text())
    mutate(ui)
    with pytest.raises(WorkflowError, match=match):
        load_workflow(ui, REG)


def test_cycle_through_reroutes_is_an_error():
    nodes = [_node(1, "Reroute", None, inputs=[_in("", "*", 2)], outputs=[_out("", "*", [1])]),
             _node(2, "Reroute", None, inputs=[_in("", "*", 1)], outputs=[_out("", "*", [2, 3])]),
             _node(3, "TestShow", [], inputs=[_in("value", "*", 3)])]
    links = [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"], [3, 2, 0, 3, 0, "*"]]
    with pytest.raises(WorkflowError, match="circular"):
        ui_to_api(_ui(nodes, links), REG)


@pytest.mark.parametrize("text, match", [
    ('{"1": {"class_type": "TestConst", "inputs": {"val', "truncated"),
    ("[1, 2, 3]", "must be a JSON object"),
    ('"just a string"', "must be a JSON object"),
    ("", "not valid JSON"),
    ("[" * 100000, "nested too deeply|not valid JSON"),
])
def test_malformed_files(tmp_path, text, match):
    p = tmp_path / "wf.json"
    p.write_text(text)
    with pytest.raises(WorkflowError, match=match):
        load_workflow(p, REG)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(WorkflowError, match="not found"):
        load_workflow(tmp_path / "missing.json", REG)
    with pytest.raises(WorkflowError, match="folder"):
        load_workflow(tmp_path, REG)
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(WorkflowError, match="UTF-8"):
        load_workflow(p, REG)


def test_api_formats_and_prompt_body_and_png(tmp_path):
    api = json.loads((FIX / "ui_sampler.api.json").read_text())
    assert load_workflow(api, REG).prompt == api
    body = {"prompt": api, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}, "client_id": "x"}
    wf = load_workflow(body, REG)
    assert wf.prompt == api and wf.extra_pnginfo == {"workflow": {"nodes": []}}
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(api))
    info.add_text("workflow", (FIX / "ui_sampler.json").read_text())
    Image.new("RGB", (2, 2)).save(tmp_path / "x.png", pnginfo=info)
    wf = load_workflow(tmp_path / "x.png", REG)
    assert wf.prompt == api and wf.extra_pnginfo["workflow"]["version"] == 0.4


@pytest.mark.parametrize("prompt, match", [
    ({1: {"class_type": "TestConst", "inputs": {}}}, "must be a string"),
    ({"1": []}, "must be an object"),
    ({"1": {"inputs": {}}}, "has no class_type"),
    ({"1": {"class_type": 5, "inputs": {}}}, "class_type must be a string"),
    ({"1": {"class_type": "TestConst", "inputs": [1]}}, "'inputs' must be an object"),
])
def test_malformed_api_shapes(prompt, match):
    with pytest.raises(WorkflowError, match=match):
        load_workflow(prompt, REG)


def test_valid_connection_rules():
    vc = formats.valid_connection
    assert vc("*", "IMAGE") and vc("", "X") and vc("image", "IMAGE")
    assert vc("A,B", "b") and not vc("A,B", "C") and not vc("LATENT", "IMAGE")


def test_shipped_workflows_convert_and_validate(tf_dirs):
    """Every workflow in workflows/ loads, converts with the runner's node definitions and validates."""
    from twinflow.runner.api import default_registry
    from twinflow.runner.validate import validate_prompt

    registry = default_registry()  # TwinFlow's nodes and the core nodes the runner executes (ConditioningZeroOut)

    shipped = sorted((Path(__file__).parent.parent / "workflows").glob("*.json"))
    if not shipped:
        pytest.skip("no shipped workflows yet")
    for path in shipped:
        wf = load_workflow(path, registry)
        v = validate_prompt(wf.prompt, registry)
        assert v.outputs, path.name


def test_saved_null_is_sent_and_undefined_is_dropped():
    class N:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"k": ("INT", {"default": 2}), "c": ("COMBO", {"options": []})}}

    # frontend executionUtil.test.ts: "sends a null widget value through to the prompt"
    assert ui_to_api(_ui([_node(1, "N", [None])], []), {"N": N})["1"]["inputs"] == {"k": None}
    assert ui_to_api(_ui([_node(1, "N", [None, None])], []), {"N": N})["1"]["inputs"] == {"k": None, "c": None}
