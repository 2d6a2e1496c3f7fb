"""Loading ComfyUI workflows in both formats, and converting the UI format to the API prompt.

API prompt (what ComfyUI's `/prompt` executes): `{"3": {"class_type": "...", "inputs": {...}, "_meta": {...}}}`;
a link is `["<source id>", <output index>]`; a literal list is wrapped as `{"__value__": [...]}`. A whole
`/prompt` request body (`{"prompt": {...}, "extra_data": {...}}`) is accepted too.

UI workflow (what the frontend saves, schema 0.4 and 1): `nodes` with positional `widgets_values`,
`links` as `[id, origin_id, origin_slot, target_id, target_slot, type]` (0.4) or objects (1). It is
converted as the frontend's `graphToPrompt` (src/utils/executionUtil.ts + litegraph's ExecutableNodeDTO)
does; the mapping of `widgets_values` follows the widget constructors (src/renderer/extensions/vueNodes/
widgets/composables/use*Widget.ts, src/scripts/valueControlWidgets.ts). Group nodes and subgraphs are
refused with a clear error (unpack them in ComfyUI first) rather than flattened.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.errors import WorkflowError
from .core_nodes import unknown_class_hint
from .spec import SEED_NAMES, UPLOAD_FLAGS, iter_inputs

logger = logging.getLogger(__name__)

VIRTUAL_NODES = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4  # litegraph LGraphEventMode values the frontend acts on
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass
class Workflow:
    """A loaded workflow: the API prompt to execute plus what ComfyUI would embed in outputs."""

    prompt: dict  # API form {id: {"class_type", "inputs", "_meta"?}}
    format: str  # "api" | "ui"
    ui: Optional[dict] = None  # the UI workflow when loaded from one (goes into EXTRA_PNGINFO)
    extra_data: dict = field(default_factory=dict)  # /prompt "extra_data" (extra_pnginfo, ...)
    source: str = "<dict>"

    @property
    def extra_pnginfo(self) -> dict:
        if self.ui is not None:
            return {"workflow": self.ui}
        info = self.extra_data.get("extra_pnginfo")
        return dict(info) if isinstance(info, dict) else {}


# ----------------------------------------------------------------------------------------------- reading


def read_json(path, *, what: str = "workflow") -> Any:
    """Parse a JSON file; every failure becomes a WorkflowError naming the file and how to fix it."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise WorkflowError(f"{what} file not found: {p}", type="no_prompt", details=str(p)) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise WorkflowError(f"cannot read {what} file {str(p)!r}: {getattr(e, 'strerror', None) or e}",
                            type="no_prompt", details=str(p)) from None
    if p.is_dir():
        raise WorkflowError(f"{what} path {p} is a folder; pass a .json file", type="no_prompt", details=str(p))
    if p.suffix.lower() in (".webp",):
        return _embedded(p, _webp_text(p), "EXIF")
    if p.suffix.lower() in (".mp4", ".m4v", ".mov", ".mkv", ".webm"):
        return _embedded(p, _video_text(p), "metadata tag")
    if size > MAX_FILE_BYTES:
        raise WorkflowError(f"{what} file {p} is {size} bytes; a workflow is at most {MAX_FILE_BYTES} bytes",
                            type="no_prompt", details=str(p))
    if p.suffix.lower() == ".png":
        return _read_png(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise WorkflowError(f"cannot read {what} file {p}: {e.strerror or e}", type="no_prompt", details=str(p)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WorkflowError(f"{what} file {p} is not UTF-8 text (byte {e.start}); save it as JSON from ComfyUI",
                            type="no_prompt", details=str(p)) from None
    return parse_json_text(text, str(p))


def parse_json_text(text: str, source: str = "<text>") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; the file looks truncated (unclosed brackets or string) - save or download it again" \
            if _unclosed(text) else ""
        raise WorkflowError(f"{source} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}){hint}",
                            type="no_prompt", details=source) from None
    except RecursionError:
        raise WorkflowError(f"{source} is nested too deeply to be a workflow", type="no_prompt",
                            details=source) from None


def _unclosed(text: str) -> bool:
    """Whether JSON text ends inside a string or with brackets still open (a cut-off download/save)."""
    depth, in_str, esc = 0, False, False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
    return in_str or depth > 0


def _read_png(p: Path):
    """A ComfyUI PNG: its "prompt" text chunk (API) plus "workflow" (UI) for the metadata."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as e:
        raise WorkflowError(f"{p} is not a readable PNG: {e}", type="no_prompt", details=str(p)) from None
    return _embedded(p, text, "text chunk")


def _embedded(p: Path, text: dict, where: str):
    """The workflow a saver embedded (ComfyUI's keys): the API `prompt` (+ the UI `workflow` as metadata),
    or the UI `workflow` alone."""
    if "prompt" in text:
        body = {"prompt": parse_json_text(text["prompt"], f"{p} (prompt {where})")}
        if "workflow" in text:
            body["extra_data"] = {"extra_pnginfo": {"workflow": parse_json_text(text["workflow"],
                                                                                 f"{p} (workflow {where})")}}
        return body
    if "workflow" in text:
        return parse_json_text(text["workflow"], f"{p} (workflow {where})")
    raise WorkflowError(f"{p} has no embedded ComfyUI workflow (no 'prompt' or 'workflow' {where})",
                        type="no_prompt", details=str(p))


def _webp_text(p: Path) -> dict:
    """ComfyUI's WebP layout (Save Animated WEBP, ours): EXIF 0x0110 "prompt:<json>", and "<key>:<json>"
    counting down from 0x010F."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            exif = im.getexif()
    except (UnidentifiedImageError, OSError) as e:
        raise WorkflowError(f"{p} is not a readable WebP: {e}", type="no_prompt", details=str(p)) from None
    text = {}
    for tag in range(0x0110, 0x0100, -1):
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and ":" in value:
            key, _, body = value.partition(":")
            if key in ("prompt", "workflow"):
                text.setdefault(key, body)
    return text


def _video_text(p: Path) -> dict:
    """The `prompt` / `workflow` metadata tags of a video (Save Video writes them, as ComfyUI's SaveVideo)."""
    try:
        import av
    except ImportError:
        raise WorkflowError(f"reading the workflow embedded in {p} needs PyAV: pip install av", type="no_prompt",
                            details=str(p)) from None
    try:
        with av.open(str(p)) as c:
            meta = dict(c.metadata)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise WorkflowError(f"{p} is not a readable video: {e}", type="no_prompt", details=str(p)) from None
    return {k: v for k, v in meta.items() if k in ("prompt", "workflow")}


# ----------------------------------------------------------------------------------------------- detection


def detect_format(data) -> str:
    """"ui", "api" or "body" (a /prompt request); raises WorkflowError for anything else."""
    if not isinstance(data, dict):
        raise WorkflowError(f"a workflow must be a JSON object, got {_json_kind(data)}; export it from ComfyUI "
                            f"with Save (UI format) or Export (API)", type="no_prompt")
    if isinstance(data.get("nodes"), list):
        return "ui"
    if "nodes" in data and "links" in data:
        raise WorkflowError(f"UI workflow 'nodes' must be a list, got {_json_kind(data['nodes'])}", type="no_prompt")
    if isinstance(data.get("prompt"), dict) and all(k in ("prompt", "extra_data", "client_id", "prompt_id",
                                                           "partial_execution_targets", "number", "front")
                                                      for k in data):
        return "body"
    return "api"


def _json_kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def load_workflow(source, registry=None, *, rng: Optional[random.Random] = None) -> Workflow:
    """Load a workflow from a path, JSON text or an already parsed dict, in either ComfyUI format."""
    if isinstance(source, Workflow):
        return source
    name = "<dict>"
    if isinstance(source, (str, Path)) and not (isinstance(source, str) and source.lstrip().startswith("{")):
        name = str(source)
        data = read_json(source)
    elif isinstance(source, str):
        data = parse_json_text(source)
    else:
        data = source
    fmt = detect_format(data)
    if fmt == "ui":
        registry = _default_registry(registry)
        prompt = ui_to_api(data, registry, rng=rng)
        return Workflow(prompt=prompt, format="ui", ui=data, source=name)
    if fmt == "body":
        extra = data.get("extra_data") if isinstance(data.get("extra_data"), dict) else {}
        check_api_shape(data["prompt"])
        return Workflow(prompt=data["prompt"], format="api", extra_data=extra, source=name)
    check_api_shape(data)
    return Workflow(prompt=data, format="api", source=name)


def _default_registry(registry):
    if registry is not None:
        return registry
    from .api import default_registry

    return default_registry()


def check_api_shape(prompt) -> None:
    """Structural checks on an API prompt (types of ids, nodes, inputs); values are checked by validate."""
    if not isinstance(prompt, dict):
        raise WorkflowError(f"an API prompt must be a JSON object of nodes, got {_json_kind(prompt)}", type="no_prompt")
    for node_id, node in prompt.items():
        if not isinstance(node_id, str):
            raise WorkflowError(f"node id {node_id!r} must be a string (as in JSON keys), e.g. \"{node_id}\"",
                                type="invalid_prompt", details=f"Node ID '#{node_id}'")
        if not isinstance(node, dict):
            raise WorkflowError(f"node #{node_id} must be an object with 'class_type' and 'inputs', got "
                                f"{_json_kind(node)}; is this an API-format prompt?", type="invalid_prompt",
                                details=f"Node ID '#{node_id}'")
        if "class_type" not in node:
            title = (node.get("_meta") or {}).get("title") if isinstance(node.get("_meta"), dict) else None
            raise WorkflowError(f"node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be corrupted "
                                f"or is not in ComfyUI's API format.", type="missing_node_type",
                                details=f"Node ID '#{node_id}'",
                                extra_info={"node_id": node_id, "class_type": None, "node_title": title})
        if not isinstance(node["class_type"], str):
            raise WorkflowError(f"node #{node_id}: class_type must be a string, got {_json_kind(node['class_type'])}",
                                type="invalid_prompt", details=f"Node ID '#{node_id}'")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"node #{node_id} ({node['class_type']}): 'inputs' must be an object, got "
                                f"{_json_kind(inputs)}", type="invalid_prompt", details=f"Node ID '#{node_id}'")
        for name in inputs:
            if not isinstance(name, str):
                raise WorkflowError(f"node #{node_id} ({node['class_type']}): input name {name!r} must be a string",
                                    type="invalid_prompt", details=f"Node ID '#{node_id}'")


# ----------------------------------------------------------------------------------------------- UI -> API


@dataclass
class _Link:
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: Any


class _UIGraph:
    """The parts of a saved UI graph the conversion reads, checked once for shape."""

    def __init__(self, ui: dict):
        self.ui = ui
        self.nodes: dict[str, dict] = {}
        self.order: list[str] = []
        for i, node in enumerate(ui["nodes"]):
            if not isinstance(node, dict):
                raise _bad(f"UI workflow nodes[{i}] must be an object, got {_json_kind(node)}")
            nid = _id_key(node.get("id"), f"nodes[{i}].id")
            if nid in self.nodes:
                raise _bad(f"UI workflow has two nodes with id {nid}; the file is corrupted")
            if not isinstance(node.get("type"), str):
                raise _bad(f"UI node #{nid}: 'type' must be a string, got {_json_kind(node.get('type'))}")
            for key in ("inputs", "outputs"):
                if key in node and node[key] is not None and not isinstance(node[key], list):
                    raise _bad(f"UI node #{nid} ({node['type']}): '{key}' must be a list")
                for j, slot in enumerate(node.get(key) or []):
                    if not isinstance(slot, dict):
                        raise _bad(f"UI node #{nid} ({node['type']}): {key}[{j}] must be an object")
                    if key == "inputs" and not isinstance(slot.get("name"), str):
                        raise _bad(f"UI node #{nid} ({node['type']}): inputs[{j}] has no name")
            mode = node.get("mode", MODE_ALWAYS)
            if mode is None:
                mode = MODE_ALWAYS
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 4:
                raise _bad(f"UI node #{nid} ({node['type']}): mode {mode!r} is not a litegraph mode "
                           f"(0 always, 2 muted, 4 bypassed)")
            self.nodes[nid] = node
            self.order.append(nid)
        self.links: dict[str, _Link] = {}
        raw_links = ui.get("links") or []
        if not isinstance(raw_links, list):
            raise _bad(f"UI workflow 'links' must be a list, got {_json_kind(raw_links)}")
        for i, link in enumerate(raw_links):
            if isinstance(link, list):
                if len(link) < 5:
                    raise _bad(f"UI workflow links[{i}] must be [id, origin_id, origin_slot, target_id, target_slot, type]")
                lid, o, os_, t, ts = link[:5]
                typ = link[5] if len(link) > 5 else "*"
            elif isinstance(link, dict):
                try:
                    lid, o, os_, t, ts = (link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot"))
                except KeyError as e:
                    raise _bad(f"UI workflow links[{i}] has no {e.args[0]!r}") from None
                typ = link.get("type", "*")
            elif link is None:
                continue
            else:
                raise _bad(f"UI workflow links[{i}] must be a list or an object, got {_json_kind(link)}")
            key = _id_key(lid, f"links[{i}] id")
            self.links[key] = _Link(_id_key(o, f"links[{i}] origin_id"), _slot(os_, f"links[{i}] origin_slot"),
                                    _id_key(t, f"links[{i}] target_id"), _slot(ts, f"links[{i}] target_slot"), typ)

    def mode(self, nid: str) -> int:
        m = self.nodes[nid].get("mode", MODE_ALWAYS)
        return MODE_ALWAYS if m is None else m

    def inputs(self, nid: str) -> list:
        return self.nodes[nid].get("inputs") or []

    def outputs(self, nid: str) -> list:
        return self.nodes[nid].get("outputs") or []

    def is_virtual(self, nid: str) -> bool:
        return self.nodes[nid]["type"] in VIRTUAL_NODES

    def link_of_input(self, nid: str, slot: int) -> Optional[_Link]:
        node = self.nodes[nid]
        inputs = self.inputs(nid)
        if slot >= len(inputs):
            raise _bad(f"UI node #{nid} ({node['type']}) has no input slot {slot}; a link points at it")
        lid = inputs[slot].get("link")
        if lid is None:
            return None
        key = _id_key(lid, f"node #{nid} input {inputs[slot]['name']!r} link")
        link = self.links.get(key)
        if link is None:
            raise _bad(f"UI node #{nid} ({node['type']}) input {inputs[slot]['name']!r} uses link {key}, which is "
                       f"not in the workflow's links (a dangling link); reconnect or remove it in ComfyUI")
        if link.origin not in self.nodes:
            raise _bad(f"UI node #{nid} ({node['type']}) input {inputs[slot]['name']!r} is linked to node "
                       f"#{link.origin}, which does not exist (a dangling link); reconnect it in ComfyUI")
        return link


def _bad(message: str) -> WorkflowError:
    return WorkflowError(message, type="invalid_prompt")


def _id_key(v, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _bad(f"UI workflow {where} must be an integer or string id, got {_json_kind(v)}")
    return str(v)


def _slot(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(f"UI workflow {where} must be a non-negative integer, got {v!r}")
    return v


def valid_connection(a, b) -> bool:
    """litegraph's LiteGraph.isValidConnection: "*"/"" match anything; case-insensitive comma unions."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(valid_connection(x, y) for x in a.split(",") for y in b.split(","))


class _Resolver:
    """Follows links through bypassed and virtual nodes like ExecutableNodeDTO.resolveInput/resolveOutput."""

    def __init__(self, graph: _UIGraph):
        self.g = graph

    def resolve_input(self, nid: str, slot: int, visited: set, type_=None):
        key = f"{nid}[I]{slot}"
        if key in visited:
            raise _bad(f"UI workflow has a circular link through node #{nid} input {slot}")
        visited.add(key)
        link = self.g.link_of_input(nid, slot)
        if link is None:
            return None
        in_type = type_ if type_ is not None else self.g.inputs(nid)[slot].get("type", "*")
        return self.resolve_output(link.origin, link.origin_slot, in_type, visited)

    def resolve_output(self, nid: str, slot: int, type_, visited: set):
        key = f"{nid}[O]{slot}"
        if key in visited:
            raise _bad(f"UI workflow has a circular link through node #{nid} output {slot}")
        visited.add(key)
        node = self.g.nodes[nid]
        if self.g.mode(nid) == MODE_BYPASS:
            idx = self._bypass_slot(nid, slot, type_)
            if idx == -1:
                logger.warning("bypassed node #%s (%s) has no input matching type %s; the link is dropped",
                               nid, node["type"], type_)
                return None
            return self.resolve_input(nid, idx, visited)
        if self.g.is_virtual(nid):
            if slot < len(self.g.inputs(nid)):
                return self.resolve_input(nid, slot, visited, type_)
            return None  # PrimitiveNode: its value was written into the target widget (applyToGraph)
        return (nid, slot)

    def _bypass_slot(self, nid: str, slot: int, type_) -> int:
        inputs = self.g.inputs(nid)
        outputs = self.g.outputs(nid)
        if slot >= len(outputs):
            raise _bad(f"UI node #{nid} ({self.g.nodes[nid]['type']}) has no output slot {slot}; a link uses it")
        out_type = outputs[slot].get("type", "*")
        if type_ in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            t = inputs[slot].get("type", "*")
            if valid_connection(t, out_type) and valid_connection(t, type_):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == type_:
                return i
        for i, inp in enumerate(inputs):
            t = inp.get("type", "*")
            if valid_connection(t, out_type) and valid_connection(t, type_):
                return i
        return -1


def widget_slots(cls, class_type: str = "?") -> list:
    """The node's widgets in `widgets_values` order: (input name, spec) or (None, None) for a value the
    frontend stores but never sends (control_after_generate, control_filter_list, the upload button)."""
    slots: list = []
    upload = False
    specs = iter_inputs(cls, class_type)
    for spec in specs:
        if spec.category == "optional" and upload:
            slots.append((None, None))  # the "upload" widget is appended to the required inputs
            upload = False
        if not spec.is_widget:
            continue
        slots.append((spec.name, spec))
        cag = spec.opts.get("control_after_generate")
        if spec.kind == "INT":
            if (cag if cag is not None else spec.name in SEED_NAMES):
                slots.append((None, None))
        elif spec.kind == "COMBO":
            if cag:
                slots += [(None, None), (None, None)]  # control combo + control_filter_list string
            if spec.category == "required" and any(spec.opts.get(f) for f in UPLOAD_FLAGS):
                upload = True
    if upload:
        slots.append((None, None))
    return slots


def widget_default(spec):
    """The value a freshly created widget holds (used when widgets_values is shorter than the widgets)."""
    d = spec.opts.get("default")
    if spec.kind == "COMBO":
        opts = spec.options or []
        return d if d else (opts[0] if opts else None)
    if d is not None:
        return d
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(spec.kind)


_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")


def process_dynamic_prompt(text: str, rng: random.Random) -> str:
    """The frontend's dynamic prompts: strip C comments, pick one option of every {a|b|c} (nested)."""
    text = _COMMENTS.sub("", text)
    pos = 0

    def choice() -> str:
        nonlocal pos
        options, cur, depth = [], "", 0
        while pos < len(text):
            c = text[pos]
            pos += 1
            if c == "\\":
                cur += "\\" + (text[pos] if pos < len(text) else "undefined")
                pos += 1
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                if not depth:
                    break
                depth -= 1
            elif c == "|" and not depth:
                options.append(cur)
                cur = ""
                continue
            cur += c
        options.append(cur)
        return process_dynamic_prompt(options[math.floor(rng.random() * len(options))], rng)

    out = ""
    while pos < len(text):
        c = text[pos]
        pos += 1
        if c == "\\":
            out += "\\" + (text[pos] if pos < len(text) else "undefined")
            pos += 1
        elif c == "{":
            out += choice()
        else:
            out += c
    return re.sub(r"\\([{}|])", r"\1", out)


def _check_unsupported(ui: dict, graph: _UIGraph) -> None:
    defs = ui.get("definitions")
    sub_ids = set()
    if isinstance(defs, dict) and isinstance(defs.get("subgraphs"), list):
        sub_ids = {s.get("id") for s in defs["subgraphs"] if isinstance(s, dict)}
    extra = ui.get("extra") if isinstance(ui.get("extra"), dict) else {}
    groups = set(extra.get("groupNodes") or {}) if isinstance(extra.get("groupNodes"), dict) else set()
    found = []
    for nid in graph.order:
        t = graph.nodes[nid]["type"]
        if t in sub_ids:
            found.append(f"#{nid} (subgraph {graph.nodes[nid].get('title') or t})")
        elif t.startswith(("workflow>", "workflow/")) or t in groups:
            found.append(f"#{nid} (group node {t})")
    if found:
        raise WorkflowError(
            f"this workflow uses group nodes / subgraphs ({', '.join(found)}), which the headless converter does not "
            f"flatten. Open it in ComfyUI, right-click the node and choose 'Convert to nodes' / 'Unpack subgraph', "
            f"save, and run the saved file.", type="invalid_prompt", details=", ".join(found))


def ui_to_api(ui: dict, registry, *, rng: Optional[random.Random] = None) -> dict:
    """Convert a saved UI workflow to the API prompt exactly as the frontend's graphToPrompt would."""
    if not isinstance(ui, dict) or not isinstance(ui.get("nodes"), list):
        raise _bad("a UI workflow must be an object with a 'nodes' list")
    rng = rng or random.Random()
    graph = _UIGraph(ui)
    _check_unsupported(ui, graph)
    resolver = _Resolver(graph)

    # PrimitiveNode.applyToGraph: the primitive's value overwrites each target widget (through reroutes).
    forced: dict[str, dict] = {}
    for nid in graph.order:
        node = graph.nodes[nid]
        if node["type"] != "PrimitiveNode" or graph.mode(nid) == MODE_NEVER:
            continue
        values = node.get("widgets_values")
        if not isinstance(values, list) or not values:
            continue
        for target, name in _primitive_targets(graph, nid):
            forced.setdefault(target, {})[name] = values[0]

    missing = {}
    out: dict[str, dict] = {}
    for nid in graph.order:
        node = graph.nodes[nid]
        ctype = node["type"]
        if graph.is_virtual(nid) or graph.mode(nid) in (MODE_NEVER, MODE_BYPASS):
            continue
        cls = registry.get(ctype)
        if cls is None:
            missing[nid] = ctype
            continue
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        slots = widget_slots(cls, ctype)
        if values is not None and not isinstance(values, (list, dict)):
            raise _bad(f"UI node #{nid} ({ctype}): widgets_values must be a list, got {_json_kind(values)}")
        defaulted = [name for i, (name, spec) in enumerate(slots) if name is not None and name not in forced.get(nid, {})
                     and not ((name in values) if isinstance(values, dict) else (values is not None and i < len(values)))]
        if defaulted:  # the frontend does the same silently; a hand-edited or cut file deserves a word
            logger.warning("UI node #%s (%s): no saved value for widget(s) %s (%s); using the node's defaults",
                           nid, ctype, ", ".join(defaulted),
                           "no widgets_values" if values is None else f"widgets_values has {len(values)} value(s)")
        for i, (name, spec) in enumerate(slots):
            if name is None:
                continue
            saved = (name in values) if isinstance(values, dict) else (values is not None and i < len(values))
            if not saved:
                value = widget_default(spec)
            else:
                value = values[name] if isinstance(values, dict) else values[i]
            if name in forced.get(nid, {}):
                value = forced[nid][name]
            if spec.kind == "STRING" and spec.opts.get("dynamicPrompts") and isinstance(value, str):
                value = process_dynamic_prompt(value, rng)
            if value is None and not saved and name not in forced.get(nid, {}):
                continue  # a fresh widget without a default holds `undefined`, which JSON drops (a saved null is sent)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot, inp in enumerate(graph.inputs(nid)):
            resolved = resolver.resolve_input(nid, slot, set())
            if resolved is None:
                continue
            inputs[inp["name"]] = [resolved[0], resolved[1]]
        title = node.get("title") if isinstance(node.get("title"), str) else ctype
        out[nid] = {"inputs": inputs, "class_type": ctype, "_meta": {"title": title}}

    if missing:
        node_errors = {nid: {"errors": [{"type": "missing_node_type", "message": unknown_class_hint(t, registry),
                                          "details": f"Node ID '#{nid}'", "extra_info": {"node_id": nid,
                                                                                          "class_type": t}}],
                             "dependent_outputs": [], "class_type": t} for nid, t in missing.items()}
        first_id, first = next(iter(missing.items()))
        more = f" (and {len(missing) - 1} more unknown node(s))" if len(missing) > 1 else ""
        raise WorkflowError(f"cannot convert node #{first_id}: {unknown_class_hint(first, registry)}{more}",
                            type="missing_node_type", details=f"Node ID '#{first_id}'", node_errors=node_errors)

    # Inputs linked to nodes that were not emitted (muted ones) are removed, as graphToPrompt does.
    for node in out.values():
        for name, val in list(node["inputs"].items()):
            if isinstance(val, list) and len(val) == 2 and val[0] not in out:
                del node["inputs"][name]
    return out


def _primitive_targets(graph: _UIGraph, nid: str):
    """(target node id, widget name) for every widget a PrimitiveNode drives, following Reroutes."""
    seen = set()
    stack = [nid]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        outputs = graph.outputs(cur)
        links = (outputs[0].get("links") or []) if outputs else []
        if not isinstance(links, list):
            continue
        for lid in links:
            link = graph.links.get(_id_key(lid, f"node #{cur} output link"))
            if link is None or link.target not in graph.nodes:
                continue
            if graph.nodes[link.target]["type"] == "Reroute":
                stack.append(link.target)
                continue
            tin = graph.inputs(link.target)
            if link.target_slot >= len(tin):
                continue
            widget = tin[link.target_slot].get("widget")
            if isinstance(widget, dict) and isinstance(widget.get("name"), str):
                yield link.target, widget["name"]
