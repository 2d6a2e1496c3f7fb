"""Hypothesis fuzzing of the loader, converter and validator: they either succeed or raise WorkflowError."""
import copy
import importlib.util
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinflow.core.errors import WorkflowError
from twinflow.runner.executor import Executor
from twinflow.runner.formats import load_workflow, parse_json_text
from twinflow.runner.validate import validate_prompt

FIX = Path(__file__).parent / "fixtures" / "runner"
_spec = importlib.util.spec_from_file_location("runner_testnodes", FIX / "testnodes.py")
tn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tn)
REG = tn.REGISTRY
UI = json.loads((FIX / "ui_sampler.json").read_text())
API = json.loads((FIX / "ui_sampler.api.json").read_text())

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["1", "2", "4", "TestConst", "TestShow", "*", "INT", "LATENT", "__value__"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)


SAFE = {k: v for k, v in REG.items() if k not in ("TestSlow", "TestSigint")}  # those interrupt on purpose


def check(data, execute=False):
    try:
        wf = load_workflow(data, REG)
        v = validate_prompt(wf.prompt, REG)
        if execute and all(n["class_type"] in SAFE for n in v.prompt.values()):
            Executor(SAFE).execute(v, extra_pnginfo=wf.extra_pnginfo)
    except WorkflowError:
        pass


@FUZZ
@given(json_values)
def test_arbitrary_json(data):
    check(data)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


UI_PATHS = [p for p in _paths(UI) if p]
API_PATHS = [p for p in _paths(API) if p]


def _mutate(doc, path, value, delete):
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(UI_PATHS), json_values, st.booleans()), min_size=1, max_size=3))
def test_mutated_ui_workflow(mutations):
    doc = UI
    for path, value, delete in mutations:
        try:
            doc = _mutate(doc, path, value, delete)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed this path
            continue
    check(doc)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(API_PATHS), json_values, st.booleans()), min_size=1, max_size=3))
def test_mutated_api_prompt(mutations):
    doc = API
    for path, value, delete in mutations:
        try:
            doc = _mutate(doc, path, value, delete)
        except (KeyError, IndexError, TypeError):
            continue
    check(doc, execute=True)


@FUZZ
@given(st.text(max_size=60), st.integers(min_value=0, max_value=len(json.dumps(UI))))
def test_truncated_or_garbled_text(noise, cut):
    text = json.dumps(UI)[:cut] + noise
    try:
        data = parse_json_text(text)
    except WorkflowError:
        return
    check(data)


TYPES = ["INT", "FLOAT", "STRING", "LATENT", "TESTMODEL", "*", "", "INT,FLOAT", None, 3]
NODE_TYPES = sorted(REG) + ["Reroute", "PrimitiveNode", "Note", "MarkdownNote", "Unknown"]


@st.composite
def random_graphs(draw):
    """UI graphs with random wiring between random slots, random modes and widgets: the converter must
    either produce a prompt or refuse with WorkflowError, never crash or loop."""
    n = draw(st.integers(min_value=1, max_value=7))
    nodes = []
    for i in range(1, n + 1):
        slots_in = draw(st.integers(min_value=0, max_value=3))
        slots_out = draw(st.integers(min_value=0, max_value=2))
        nodes.append({
            "id": i, "type": draw(st.sampled_from(NODE_TYPES)), "mode": draw(st.sampled_from([0, 0, 2, 4, 1])),
            "inputs": [{"name": draw(st.sampled_from(["a", "b", "value", "model", "latent", "x"])),
                        "type": draw(st.sampled_from(TYPES)), "link": None,
                        **({"widget": {"name": "value"}} if draw(st.booleans()) else {})} for _ in range(slots_in)],
            "outputs": [{"name": "o", "type": draw(st.sampled_from(TYPES)), "links": [],
                         **({"widget": {"name": "value"}} if draw(st.booleans()) else {})} for _ in range(slots_out)],
            "widgets_values": draw(st.lists(scalars, max_size=7)),
        })
    links = []
    for lid in range(1, draw(st.integers(min_value=0, max_value=10)) + 1):
        src = draw(st.integers(min_value=1, max_value=n + 1))  # n + 1: a node that does not exist
        dst = draw(st.integers(min_value=1, max_value=n))
        src_node = nodes[src - 1] if src <= n else None
        dst_node = nodes[dst - 1]
        if not dst_node["inputs"]:
            continue
        o_slot = draw(st.integers(min_value=0, max_value=max(0, len(src_node["outputs"]) - 1 if src_node else 0)))
        t_slot = draw(st.integers(min_value=0, max_value=len(dst_node["inputs"]) - 1))
        dst_node["inputs"][t_slot]["link"] = lid
        if src_node and src_node["outputs"] and o_slot < len(src_node["outputs"]):
            src_node["outputs"][o_slot]["links"].append(lid)
        links.append([lid, src, o_slot, dst, t_slot, "*"])
    return {"nodes": nodes, "links": links, "version": 0.4}


@FUZZ
@given(random_graphs())
def test_random_ui_graphs(ui):
    check(ui, execute=True)


def test_long_fuzz_tool_small_count_no_uncaught():
    """tools/fuzz_workflows.py (the recorded long run, docs/runner.md) at a CI size: mutated shipped
    workflows through load, convert and validate: refusals are TwinFlowErrors, nothing else escapes."""
    spec = importlib.util.spec_from_file_location("fuzz_workflows", Path(__file__).parents[1] / "tools" / "fuzz_workflows.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = tool.fuzz(300, 0, seed=1, out_dir=Path(tmp), quiet=True)
    st_ = res["stats"]
    assert res["uncaught_total"] == 0, res["uncaught"]
    assert st_["generated"] == 300 and st_["refused at load"] + st_["refused at validate"] + st_["validated"] == 300
    assert min(st_["refused at load"], st_["refused at validate"], st_["validated"]) > 0  # each stage is reached
