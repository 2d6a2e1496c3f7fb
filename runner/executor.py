"""Executing a validated prompt like ComfyUI's PromptExecutor, minus the server.

- Only ancestors of the output nodes run, dependencies first.
- List semantics (`_async_map_node_over_list`): every input is a list; the node is called max(len) times
  with shorter lists repeating their last item, or once with whole lists when `INPUT_IS_LIST`; results
  are merged per output (`OUTPUT_IS_LIST` outputs concatenated). `{"ui": ..., "result": ...}` returns are
  split; ui lists of repeated calls are concatenated.
- Hidden inputs PROMPT, EXTRA_PNGINFO, UNIQUE_ID (DYNPROMPT and the Comfy-org tokens are None here).
- Cache (ComfyUI's classic `CacheKeySetInputSignature`): a node's key is its class, its `IS_CHANGED`
  value, its constant inputs and the keys of the nodes it links to (plus its id when it is NOT_IDEMPOTENT
  or asks for UNIQUE_ID). An Executor keeps the outputs of its last run, so running an edited prompt
  again re-executes only the nodes whose key changed - output nodes included, as in ComfyUI.
  `IS_CHANGED` returning NaN (or raising) means "always re-run". Node instances persist per (id, class).
- Demand-driven like ComfyUI's ExecutionList: a cached node needs nothing upstream; an input declared
  `{"lazy": True}` is evaluated only when the node's `check_lazy_status(**inputs)` (unevaluated lazy
  inputs passed as None) names it. Node expansion and ExecutionBlocker are not supported (expansion is
  refused with a clear error).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core import paths, progress
from ..core.errors import Interrupted, OutOfMemory, TwinFlowError, WorkflowError
from ..core.outputs import output_batch
from .spec import hidden_inputs, is_output_node, iter_inputs, output_is_list, return_types
from .validate import ValidatedPrompt, is_link

logger = logging.getLogger(__name__)

# Exceptions that describe a user-fixable problem; anything else escaping a node is treated as a bug.
EXPECTED_ERRORS = (TwinFlowError, ValueError, TypeError, OSError, NotImplementedError)


@dataclass
class NodeTiming:
    node_id: str
    class_type: str
    seconds: float
    cached: bool
    calls: int


class NodeExecutionError(WorkflowError):
    """A node raised while executing; `original` is the exception, `node_id`/`class_type` say where."""

    def __init__(self, node_id: str, class_type: str, original: BaseException):
        msg = f"node #{node_id} ({class_type}) failed: {original}"
        super().__init__(msg, type="execution_error", details=f"{type(original).__name__}: {original}",
                         node_errors={node_id: {"errors": [{"type": "execution_error", "message": str(original),
                                                            "details": type(original).__name__, "extra_info": {}}],
                                                "dependent_outputs": [], "class_type": class_type}},
                         extra_info={"node_id": node_id, "node_type": class_type,
                                     "exception_type": type(original).__name__, "exception_message": str(original)})
        self.node_id = node_id
        self.class_type = class_type
        self.original = original

    @property
    def is_bug(self) -> bool:
        """True when the node raised something other than a clear, user-fixable error."""
        return not isinstance(self.original, EXPECTED_ERRORS)


class RunResult(dict):
    """`{node_id: ui_dict}` for every output node (and any node that returned a "ui" dict), as ComfyUI's
    history "outputs". Extra attributes:

    - `results`: `{node_id: [list per output slot]}` - the raw (list-semantics) outputs of every node of
      the run, e.g. `result.results["5"][0][0]` is the first value of node 5's first output;
    - `executed` / `cached`: node ids that ran / were reused from the previous run of the same Executor;
    - `timings`: list of NodeTiming in execution order; `prompt`: the validated API prompt;
    - `files()`: paths of files named in ui dicts (`{"filename", "subfolder", "type"}` entries).
    """

    def __init__(self, outputs: dict, results: dict, executed: list, cached: list, timings: list, prompt: dict,
                 roots: Optional[dict] = None):
        super().__init__(outputs)
        # the folders of this run (a later change of core.paths must not change where its files are)
        self.roots = roots or {"output": paths.output_dir(), "input": paths.input_dir(), "temp": paths.temp_dir()}
        self.results = results
        self.executed = executed
        self.cached = cached
        self.timings = timings
        self.prompt = prompt

    def files(self) -> list[Path]:
        found = []
        for ui in self.values():
            for entries in (ui or {}).values():
                if not isinstance(entries, list):
                    continue
                for e in entries:
                    if isinstance(e, dict) and isinstance(e.get("filename"), str):
                        root = self.roots.get(e.get("type", "output"), self.roots["output"])
                        found.append(root / (e.get("subfolder") or "") / e["filename"])
        return found

    def timing_report(self) -> str:
        """A small table: node, class, seconds, calls or 'cached'; total at the end."""
        if not self.timings:
            return "no nodes ran"
        width = max(len(t.class_type) for t in self.timings)
        lines = [f"{'node':>6}  {'class':<{width}}  {'seconds':>9}  calls"]
        for t in self.timings:
            what = "cached" if t.cached else str(t.calls)
            lines.append(f"{'#' + t.node_id:>6}  {t.class_type:<{width}}  {t.seconds:9.3f}  {what}")
        total = sum(t.seconds for t in self.timings)
        lines.append(f"{'':>6}  {'total':<{width}}  {total:9.3f}")
        return "\n".join(lines)


@dataclass
class _Entry:
    outputs: list  # one list per output slot
    ui: Optional[dict]


def _freeze(value) -> str:
    """A stable text form of a constant input for the cache key."""
    try:
        return json.dumps(value, sort_keys=True, default=repr, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


class _AlwaysRerun:
    """A cache-key part that never equals another (IS_CHANGED returned NaN or raised)."""

    __slots__ = ()

    def __repr__(self):
        return f"<rerun {id(self):x}>"


@dataclass
class Executor:
    """Runs validated prompts for one node registry, keeping outputs and node objects between runs."""

    registry: Any
    _cache: dict = field(default_factory=dict)  # signature -> _Entry
    _objects: dict = field(default_factory=dict)  # (node id, class) -> node instance

    def clear(self) -> None:
        """Forget cached outputs and node instances (frees the tensors and models they hold)."""
        self._cache.clear()
        self._objects.clear()

    def execute(self, validated: ValidatedPrompt, *, extra_pnginfo: Optional[dict] = None,
                original_prompt: Optional[dict] = None, listener=None) -> RunResult:
        """Run the prompt. `listener(event, data)`, when given, is called as ComfyUI's server messages are
        sent: ("execution_cached", {"nodes"}), ("executing", {"node"}) before a node runs and
        ("executed", {"node", "output", "cached"}) after a node with a ui dict ran or was reused."""
        import torch  # lazy: the runner's import stays cheap

        emit = listener if listener is not None else (lambda event, data: None)

        prompt = validated.prompt
        hidden_prompt = original_prompt if original_prompt is not None else prompt
        progress.clear_interrupt()
        sigs: dict[str, Any] = {}
        for nid in validated.order:  # dependencies first, so upstream keys exist
            node = prompt[nid]
            sigs[nid] = self._signature(nid, node, self.registry[node["class_type"]], sigs)
        cached = [nid for nid in validated.order if sigs[nid] in self._cache]  # ComfyUI's "execution_cached"
        emit("execution_cached", {"nodes": list(cached)})
        values: dict[str, _Entry] = {}
        executed, timings = [], []
        requested: dict[str, set] = {}  # lazy inputs check_lazy_status asked for, per node
        ok = False
        try:
            with torch.inference_mode():
                # Demand-driven from the outputs, like ComfyUI's ExecutionList: a cached node needs nothing
                # upstream; a lazy input is evaluated only when check_lazy_status asks for it.
                stack = list(reversed(validated.outputs))
                while stack:
                    progress.check_interrupt()
                    nid = stack[-1]
                    if nid in values:
                        stack.pop()
                        continue
                    node = prompt[nid]
                    ctype = node["class_type"]
                    cls = self.registry[ctype]
                    start = time.perf_counter()
                    entry = self._cache.get(sigs[nid])
                    if entry is None:
                        wanted = self._missing_inputs(nid, node, cls, values, requested)
                        if wanted:
                            stack.extend(w for w in wanted if w not in values)
                            continue
                        if nid not in requested:  # once per node, also when lazy inputs send it back
                            emit("executing", {"node": nid})
                        progress.set_current_node(nid)
                        try:
                            more = self._lazy_requests(nid, node, cls, values, requested, hidden_prompt,
                                                       extra_pnginfo)
                            if more:
                                requested.setdefault(nid, set()).update(more)
                                continue
                            with output_batch():  # a node's files (over all its calls) appear together or not at all
                                entry, calls = self._run_node(nid, node, cls, values, hidden_prompt, extra_pnginfo)
                        finally:
                            progress.set_current_node(None)
                        executed.append(nid)
                    else:
                        calls = 0
                    stack.pop()
                    values[nid] = entry
                    if entry.ui is not None:
                        emit("executed", {"node": nid, "output": entry.ui, "cached": calls == 0})
                    timings.append(NodeTiming(nid, ctype, time.perf_counter() - start, calls == 0, calls))
                    logger.info("node #%s %s: %s in %.3f s", nid, ctype, "cached" if calls == 0 else "ran",
                                timings[-1].seconds)
            ok = True
        finally:
            fresh = {sigs[nid]: values[nid] for nid in executed}
            if ok:
                # Keep the entries of this prompt's nodes (ComfyUI drops those of nodes absent from it) ...
                keep = {sigs[nid] for nid in validated.order}
                self._cache = {**{k: v for k, v in self._cache.items() if k in keep}, **fresh}
                live = {(nid, prompt[nid]["class_type"]) for nid in validated.order}
                self._objects = {k: v for k, v in self._objects.items() if k in live}
            else:
                # ... but a failed or interrupted run only adds what it finished, so a retry resumes there.
                self._cache.update(fresh)
        known = {nid: self._cache[sigs[nid]] for nid in validated.order if sigs[nid] in self._cache}
        known.update(values)
        outputs = {nid: (known[nid].ui or {}) if nid in known else {} for nid in validated.outputs}
        for nid in validated.order:
            if nid in values and values[nid].ui is not None:
                outputs.setdefault(nid, values[nid].ui)
        results = {nid: e.outputs for nid, e in known.items()}
        return RunResult(outputs, results, executed, cached, timings, prompt,
                         {"output": paths.output_dir(), "input": paths.input_dir()})

    def _linked(self, node: dict, cls):
        """(input name, source id, is lazy) for each declared linked input."""
        inputs = node.get("inputs") or {}
        for spec in iter_inputs(cls, node["class_type"]):
            val = inputs.get(spec.name)
            if is_link(val):
                yield spec.name, val[0], bool(spec.opts.get("lazy", False))

    def _missing_inputs(self, nid, node, cls, values, requested) -> list:
        """Sources still to evaluate: every non-lazy linked input, and the lazy ones that were requested."""
        asked = requested.get(nid, set())
        return list(dict.fromkeys(src for name, src, lazy in self._linked(node, cls)
                                  if (not lazy or name in asked) and src not in values))

    def _lazy_requests(self, nid, node, cls, values, requested, hidden_prompt, extra_pnginfo) -> set:
        """Lazy inputs `check_lazy_status` wants now (unevaluated ones are passed as None), as ComfyUI."""
        pending = {name for name, src, lazy in self._linked(node, cls) if lazy and src not in values}
        if not pending:
            return set()
        obj = self._instance(nid, node["class_type"], cls)
        check = getattr(obj, "check_lazy_status", None)
        if check is None:
            return set()  # no way to ask for them: they stay None, as in ComfyUI
        data = self._gather(nid, node, cls, values, hidden_prompt, extra_pnginfo)
        asked = set()
        for args in self._calls(cls, data):
            try:
                r = check(**args)
            except Exception as e:  # attribute the failure to the node, as for its FUNCTION
                raise NodeExecutionError(nid, node["class_type"], e) from e
            if isinstance(r, (list, tuple)):
                asked.update(x for x in r if isinstance(x, str))
        return (asked & pending) - requested.get(nid, set())

    def _instance(self, nid, ctype, cls):
        key = (nid, ctype)
        obj = self._objects.get(key)
        if obj is None:
            obj = cls()
            self._objects[key] = obj
        return obj

    @staticmethod
    def _calls(cls, data: dict) -> list:
        """The argument dicts of the node's calls under ComfyUI's list semantics."""
        if getattr(cls, "INPUT_IS_LIST", False):
            return [data]
        n = max((len(v) for v in data.values()), default=0)
        return [{k: v[i if i < len(v) else -1] for k, v in data.items()} for i in range(max(n, 1))]

    # ------------------------------------------------------------------------------------------ internals

    def _signature(self, nid: str, node: dict, cls, sigs: dict):
        declared = {s.name for s in iter_inputs(cls, node["class_type"])}
        inputs = {k: v for k, v in (node.get("inputs") or {}).items() if k in declared}  # others are ignored
        parts = []
        for name in sorted(inputs):
            val = inputs[name]
            if is_link(val):
                parts.append((name, "link", sigs[val[0]], int(val[1])))
            else:
                parts.append((name, "const", _freeze(val)))
        hidden = set(hidden_inputs(cls, node["class_type"]).values())
        ident = nid if (getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden) else None
        return (node["class_type"], self._is_changed(nid, node, cls, inputs), tuple(parts), ident)

    def _is_changed(self, nid: str, node: dict, cls, inputs: dict):
        fn = getattr(cls, "IS_CHANGED", None)
        if fn is None:
            return None
        args = {k: (None if is_link(v) else v) for k, v in inputs.items()}
        try:
            spec = inspect.getfullargspec(fn)
            if spec.varkw is None:
                args = {k: v for k, v in args.items() if k in spec.args}
        except TypeError:
            pass
        try:
            value = fn(**args)
        except Exception:  # ComfyUI treats a failing IS_CHANGED as "changed"; say so once in the log
            logger.warning("IS_CHANGED of node #%s (%s) raised; the node will always re-run", nid,
                           node["class_type"], exc_info=True)
            return _AlwaysRerun()
        if isinstance(value, float) and math.isnan(value):
            return _AlwaysRerun()
        return _freeze(value)

    def _gather(self, nid, node, cls, values, hidden_prompt, extra_pnginfo) -> dict:
        """Every input as a list (constants as one-item lists, unevaluated lazy links as [None]) + hidden."""
        ctype = node["class_type"]
        inputs = node.get("inputs") or {}
        data: dict[str, list] = {}
        for spec in iter_inputs(cls, ctype):
            if spec.name not in inputs:
                continue
            val = inputs[spec.name]
            if is_link(val):
                src, slot = val[0], int(val[1])
                if src not in values:
                    data[spec.name] = [None]
                    continue
                lst = values[src].outputs[slot]
                if len(lst) == 0:
                    raise WorkflowError(f"node #{nid} ({ctype}) input '{spec.name}' received an empty list from "
                                        f"node #{src} output {slot}", type="execution_error",
                                        extra_info={"node_id": nid, "node_type": ctype})
                data[spec.name] = lst
            else:
                data[spec.name] = [val]
        for name, kind in hidden_inputs(cls, ctype).items():
            data[name] = [{"PROMPT": hidden_prompt, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": nid}.get(kind)]
        return data

    def _run_node(self, nid, node, cls, values, hidden_prompt, extra_pnginfo):
        ctype = node["class_type"]
        data = self._gather(nid, node, cls, values, hidden_prompt, extra_pnginfo)
        obj = self._instance(nid, ctype, cls)
        fname = getattr(cls, "FUNCTION", None)
        fn = getattr(obj, fname, None) if isinstance(fname, str) else None
        if fn is None:
            raise WorkflowError(f"node class {ctype} has no FUNCTION method {fname!r}", type="execution_error")
        calls = self._calls(cls, data)
        results, uis = [], []
        n_out = len(return_types(cls))
        for args in calls:
            progress.check_interrupt()
            try:
                r = fn(**args)
                if inspect.iscoroutine(r):
                    r = asyncio.run(r)
            except Interrupted:
                raise
            except KeyboardInterrupt:
                raise
            except Exception as e:  # attribute the failure to the node; the CLI decides how loudly to report it
                oom = out_of_memory(e)
                raise NodeExecutionError(nid, ctype, oom or e) from e
            if isinstance(r, dict):
                if "expand" in r:
                    raise WorkflowError(f"node #{nid} ({ctype}) returned a graph expansion, which the headless "
                                        f"runner does not support", type="execution_error")
                if r.get("ui") is not None:
                    uis.append(r["ui"])
                r = r.get("result", ())
            if r is None and n_out == 0:
                r = ()
            if not isinstance(r, (tuple, list)) or len(r) < n_out:
                raise NodeExecutionError(nid, ctype, TypeError(
                    f"returned {type(r).__name__} {_short(r)}; expected a tuple of {n_out} value(s) "
                    f"{return_types(cls)} (or {{'ui': ..., 'result': (...)}})"))
            results.append(tuple(r))
        flags = output_is_list(cls)
        outputs = []
        for i in range(n_out):
            if flags[i]:
                merged = []
                for r in results:
                    if not isinstance(r[i], (list, tuple)):
                        raise NodeExecutionError(nid, ctype, TypeError(
                            f"output {i} is declared OUTPUT_IS_LIST but the node returned {type(r[i]).__name__}"))
                    merged.extend(r[i])
                outputs.append(merged)
            else:
                outputs.append([r[i] for r in results])
        ui = None
        if uis:
            ui = {}
            for k in uis[0]:
                merged = []
                for u in uis:
                    v = u.get(k, [])
                    merged.extend(v if isinstance(v, (list, tuple)) else [v])
                ui[k] = merged
        if ui is None and is_output_node(cls):
            ui = {}
        return _Entry(outputs, ui), len(calls)


def out_of_memory(e: BaseException) -> "Optional[OutOfMemory]":
    """A clear OutOfMemory for an allocation failure (MemoryError, torch's OutOfMemoryError, the CPU
    allocator's "can't allocate"), else None: such a failure is the workflow's size, not a bug."""
    if isinstance(e, OutOfMemory):
        return e
    text = str(e)
    first = text.splitlines()[0][:300] if text else type(e).__name__
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and ("can't allocate" in text or "out of memory" in text.lower()))):
        return None
    return OutOfMemory(f"out of memory ({first}); lower the width, height, length or batch size, use tiling "
                       f"for the VAE decode, or free memory (`twinflow validate` shows the memory plan)")


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
