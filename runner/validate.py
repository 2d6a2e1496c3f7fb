"""Validating an API prompt like ComfyUI's `execution.validate_prompt`, with its error types and JSON.

Differences on purpose (stricter, never looser): any error fails the whole prompt (ComfyUI still queues the
outputs that validated); a link whose node id is not a string, to a missing node or to an output index out
of range is a `bad_linked_input` with a message instead of an exception; a non-finite FLOAT is rejected;
a constant given for a non-widget input (IMAGE, LATENT...) is rejected; inputs the class does not declare
are reported as warnings in the log (ComfyUI drops them silently).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

from ..core.errors import WorkflowError
from .core_nodes import unknown_class_hint
from .spec import InputSpec, is_output_node, iter_inputs, return_types, type_matches, validate_signature

logger = logging.getLogger(__name__)


@dataclass
class ValidatedPrompt:
    prompt: dict  # a copy with constants coerced (int/float/str/bool) and {"__value__"} unwrapped
    outputs: list  # output node ids to execute
    order: list = field(default_factory=list)  # every node to run, dependencies first


def is_link(value) -> bool:
    """ComfyUI's `is_link`: a 2-list of a string node id and an int (or float) output index."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


def _err(type_: str, message: str, details: str, input_name=None, **extra) -> dict:
    info = {"input_name": input_name} if input_name is not None else {}
    info.update(extra)
    return {"type": type_, "message": message, "details": details, "extra_info": info}


def _coerce(spec: InputSpec, val):
    """ComfyUI's int()/float()/str()/bool() coercion; raises on failure (the caller reports it)."""
    kind = spec.kind
    if kind == "INT":
        if isinstance(val, (dict, list)) or val is None:
            raise TypeError(f"expected a whole number, got {type(val).__name__}")
        if isinstance(val, float) and not math.isfinite(val):
            raise ValueError(f"{val} is not a finite number")
        return int(val)
    if kind == "FLOAT":
        if isinstance(val, (dict, list)) or val is None:
            raise TypeError(f"expected a number, got {type(val).__name__}")
        out = float(val)
        if not math.isfinite(out):
            raise ValueError(f"{val!r} is not a finite number")
        return out
    if kind == "STRING":
        if isinstance(val, (dict, list)):
            raise TypeError(f"expected text, got {type(val).__name__}")
        return str(val)
    if kind == "BOOLEAN":
        return bool(val)
    return val


def _fmt(val) -> str:
    s = repr(val)
    return s if len(s) <= 80 else s[:77] + "..."


def _check_node(node_id: str, prompt: dict, registry, coerced: dict) -> tuple[list, list]:
    """Local checks of one node; returns (errors, upstream node ids it links to)."""
    node = prompt[node_id]
    ctype = node["class_type"]
    cls = registry[ctype]
    inputs = node.get("inputs") or {}
    errors, upstream = [], []
    specs = iter_inputs(cls, ctype)
    sig = validate_signature(cls)
    v_args, v_kwargs = sig if sig is not None else ([], False)
    received_types = {}
    declared = {s.name for s in specs}
    for name in inputs:
        if name not in declared:
            logger.warning("node #%s (%s): input %r is not declared by the node and is ignored", node_id, ctype, name)
    for spec in specs:
        x = spec.name
        info = spec.config()
        if x not in inputs:
            if spec.category == "required":
                errors.append(_err("required_input_missing", "Required input is missing", x, x))
            continue
        val = inputs[x]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(_err("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                   "[node_id, slot_index]", x, x, input_config=info, received_value=val))
                continue
            src, slot = val
            if not isinstance(src, str):
                errors.append(_err("bad_linked_input", f"Bad linked input: node ids in links are strings; "
                                   f"write [\"{src}\", {slot}] instead of {_fmt(val)}", x, x, input_config=info,
                                   received_value=val))
                continue
            if not _is_index(slot):
                errors.append(_err("bad_linked_input", f"Bad linked input: output index {_fmt(slot)} must be a "
                                   f"non-negative integer", x, x, input_config=info, received_value=val))
                continue
            slot = int(slot)
            if src not in prompt:
                errors.append(_err("bad_linked_input", f"Bad linked input: node #{src} does not exist in the "
                                   f"prompt", x, x, input_config=info, linked_node=val))
                continue
            src_type = prompt[src]["class_type"]
            outs = return_types(registry[src_type])
            if not 0 <= slot < len(outs):
                errors.append(_err("bad_linked_input", f"Bad linked input: node #{src} ({src_type}) has "
                                   f"{len(outs)} output(s), no output {slot}", x, x, input_config=info,
                                   linked_node=val))
                continue
            received = outs[slot]
            received_types[x] = received
            if "input_types" not in v_args and not type_matches(received, spec.type):
                errors.append(_err("return_type_mismatch", "Return type mismatch between linked nodes",
                                   f"{x}, received_type({received}) mismatch input_type({spec.kind})",
                                   x, input_config=info, received_type=received, linked_node=val))
                continue
            upstream.append(src)
            continue
        if isinstance(val, dict) and "__value__" in val:
            val = val["__value__"]
        if spec.kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "*"):
            errors.append(_err("invalid_input_type", f"Input '{x}' of type {spec.kind} must be linked to a node "
                               f"output, not given a constant", f"{x}, {_fmt(val)}", x, input_config=info,
                               received_value=_fmt(val)))
            continue
        try:
            val = _coerce(spec, val)
        except (TypeError, ValueError, OverflowError) as ex:
            errors.append(_err("invalid_input_type", f"Failed to convert an input value to a {spec.kind} value",
                               f"{x}, {_fmt(val)}, {ex}", x, input_config=info, received_value=_fmt(val),
                               exception_message=str(ex)))
            continue
        coerced[x] = val
        if x in v_args or v_kwargs:
            continue
        lo, hi = spec.opts.get("min"), spec.opts.get("max")
        if spec.kind in ("INT", "FLOAT"):
            if lo is not None and val < lo:
                errors.append(_err("value_smaller_than_min", f"Value {val} smaller than min of {lo}", x, x,
                                   input_config=info, received_value=val))
                continue
            if hi is not None and val > hi:
                errors.append(_err("value_bigger_than_max", f"Value {val} bigger than max of {hi}", x, x,
                                   input_config=info, received_value=val))
                continue
        if spec.kind == "COMBO" and not spec.opts.get("remote_combo"):
            options = spec.options or []
            multi = spec.opts.get("multiselect", False)
            bad = [v for v in val if v not in options] if multi and isinstance(val, list) else (
                [] if _in(val, options) else [val])
            if bad:
                list_info = f"(list of length {len(options)})" if len(options) > 20 else str(options)
                errors.append(_err("value_not_in_list", "Value not in list",
                                   f"{x}: {', '.join(_fmt(v) for v in bad)} not in {list_info}", x,
                                   input_config=info if len(options) <= 20 else None, received_value=_fmt(val)))
                continue
    if sig is not None:
        errors += _custom_validation(cls, ctype, node_id, inputs, coerced, specs, v_args, v_kwargs, received_types)
    return errors, upstream


def _is_index(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    return isinstance(v, float) and math.isfinite(v) and v >= 0 and v == int(v)


def _in(val, options) -> bool:
    try:
        return val in options
    except TypeError:  # unhashable vs. a set-like option list
        return False


def _custom_validation(cls, ctype, node_id, inputs, coerced, specs, v_args, v_kwargs, received_types) -> list:
    """Call VALIDATE_INPUTS with the constant inputs it names (linked ones as None), as ComfyUI does."""
    args = {}
    for spec in specs:
        x = spec.name
        if x not in inputs or not (x in v_args or v_kwargs):
            continue
        args[x] = coerced.get(x) if not isinstance(inputs[x], list) else None
    if "input_types" in v_args:
        args["input_types"] = received_types
    try:
        ret = cls.VALIDATE_INPUTS(**args)
    except Exception as ex:  # a node's own check failed: report it on that node, keep validating others
        logger.debug("VALIDATE_INPUTS of node #%s (%s) raised", node_id, ctype, exc_info=True)
        return [_err("exception_during_validation", "Exception when validating node", f"{type(ex).__name__}: {ex}",
                     exception_type=type(ex).__name__)]
    if ret is True:
        return []
    names = [x for x in args if x != "input_types"] or [None]
    out = []
    for x in names:
        details = x if x is not None else ""
        if ret is not False:
            details = f"{x} - {ret}" if x is not None else str(ret)
        out.append(_err("custom_validation_failed", "Custom validation failed for node", details, x))
    return out


def find_cycles(graph: dict, roots: list) -> dict:
    """Iterative DFS from the outputs; returns {node: cycle path string} for nodes on a cycle."""
    color, on_cycle = {}, {}
    for root in roots:
        if root in color:
            continue
        stack = [(root, iter(graph.get(root, ())))]
        path = [root]
        color[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
                continue
            c = color.get(nxt, 0)
            if c == 0:
                color[nxt] = 1
                stack.append((nxt, iter(graph.get(nxt, ()))))
                path.append(nxt)
            elif c == 1:
                cyc = path[path.index(nxt):] + [nxt]
                for n in cyc:
                    on_cycle.setdefault(n, cyc)
    return on_cycle


def topological_order(graph: dict, roots: list) -> list:
    """Dependencies-first order of every node reachable from `roots` (graph: node -> upstream ids)."""
    order, state = [], {}
    for root in roots:
        if root in state:
            continue
        stack = [(root, iter(graph.get(root, ())))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                order.append(node)
                stack.pop()
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(graph.get(nxt, ()))))
    return order


def validate_prompt(prompt: dict, registry, targets=None) -> ValidatedPrompt:
    """Check a prompt; return the coerced copy and run order, or raise WorkflowError with ComfyUI's JSON."""
    from .formats import check_api_shape

    check_api_shape(prompt)
    unknown = {nid: n["class_type"] for nid, n in prompt.items() if n["class_type"] not in registry}
    if unknown:
        node_errors = {}
        for nid, ctype in unknown.items():
            title = (prompt[nid].get("_meta") or {}).get("title", ctype) if isinstance(prompt[nid].get("_meta"), dict) else ctype
            node_errors[nid] = {"errors": [_err("missing_node_type", unknown_class_hint(ctype, registry),
                                                f"Node ID '#{nid}'", node_id=nid, class_type=ctype, node_title=title)],
                                "dependent_outputs": [], "class_type": ctype}
        nid, ctype = next(iter(unknown.items()))
        more = f" ({len(unknown) - 1} more unknown node(s) listed in node_errors)" if len(unknown) > 1 else ""
        raise WorkflowError(f"Node #{nid} ({ctype}): {unknown_class_hint(ctype, registry)}{more}",
                            type="missing_node_type", details=f"Node ID '#{nid}'", node_errors=node_errors,
                            extra_info={"node_id": nid, "class_type": ctype})
    outputs = [nid for nid, n in prompt.items() if is_output_node(registry[n["class_type"]])]
    if targets is not None:
        targets = [str(t) for t in targets]
        bad = [t for t in targets if t not in prompt]
        if bad:
            raise WorkflowError(f"requested output node(s) {', '.join(bad)} are not in the prompt", type="invalid_prompt")
        outputs = [o for o in outputs if o in targets]
    if not outputs:
        raise WorkflowError("Prompt has no outputs: no node is an output node (OUTPUT_NODE = True), e.g. a Save "
                            "node; add one so the workflow produces something", type="prompt_no_outputs")

    work = copy.deepcopy(prompt)
    node_errors: dict = {}
    graph: dict = {}
    pending = list(outputs)
    seen = set()
    while pending:  # local checks on every ancestor of an output, as ComfyUI validates only those
        nid = pending.pop()
        if nid in seen:
            continue
        seen.add(nid)
        coerced: dict = {}
        errors, upstream = _check_node(nid, work, registry, coerced)
        work[nid].setdefault("inputs", {}).update(coerced)
        graph[nid] = upstream
        if errors:
            node_errors[nid] = {"errors": errors, "dependent_outputs": [], "class_type": work[nid]["class_type"]}
        pending.extend(u for u in upstream if u not in seen)
    for nid, cyc in find_cycles(graph, outputs).items():
        path = " -> ".join(f"{n} ({work[n]['class_type']})" for n in cyc)
        entry = node_errors.setdefault(nid, {"errors": [], "dependent_outputs": [], "class_type": work[nid]["class_type"]})
        entry["errors"].append(_err("dependency_cycle", "Dependency cycle detected", path, node_id=nid,
                                    cycle_nodes=list(dict.fromkeys(cyc))))
    if node_errors:
        for o in outputs:
            for nid in topological_order(graph, [o]):
                if nid in node_errors:
                    node_errors[nid]["dependent_outputs"].append(o)
        lines = [f"{e['message']}: {e['details']}" for v in node_errors.values() for e in v["errors"]]
        raise WorkflowError("Prompt outputs failed validation", type="prompt_outputs_failed_validation",
                            details="\n".join(lines), node_errors=node_errors)
    return ValidatedPrompt(prompt=work, outputs=outputs, order=topological_order(graph, outputs))


def format_error(err: WorkflowError, prompt=None) -> str:
    """A human-readable paragraph per error: node id, class, input, what is wrong."""
    lines = [str(err.message)]
    if err.type == "prompt_outputs_failed_validation":
        lines = [f"The workflow failed validation ({sum(len(v.get('errors', [])) for v in err.node_errors.values())} error(s)):"]
    elif err.details and err.details not in err.message and not err.node_errors:
        lines[0] += f" ({err.details})"
    for nid, entry in err.node_errors.items():
        ctype = entry.get("class_type")
        title = ""
        if isinstance(prompt, dict) and isinstance(prompt.get(nid), dict):
            meta = prompt[nid].get("_meta")
            if isinstance(meta, dict) and meta.get("title") and meta.get("title") != ctype:
                title = f" \"{meta['title']}\""
        for e in entry.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            where = f"  node #{nid} {ctype}{title}" + (f", input '{name}'" if name else "")
            msg = e.get("message", "")
            det = e.get("details", "")
            if det and det != name and det not in msg:
                msg += f" ({det})"
            if err.type == "prompt_outputs_failed_validation" or len(err.node_errors) > 1 or e.get("message") not in lines[0]:
                lines.append(f"{where}: {msg} [{e.get('type')}]")
    return "\n".join(lines)
