"""The Python API of the headless runner: `run_workflow` and the `Runner` that keeps a cache between runs."""
from __future__ import annotations

import copy
import logging
from typing import Optional

from ..core import paths
from ..core.errors import WorkflowError
from .executor import Executor, RunResult
from .formats import Workflow, load_workflow
from .preflight import preflight as check_before_compute
from .spec import iter_inputs
from .validate import ValidatedPrompt, validate_prompt

logger = logging.getLogger(__name__)


_default: Optional[dict] = None


def default_registry() -> dict:
    """TwinFlow's own nodes plus ComfyUI's core node set that runs headless (imported on first use; the same
    dict on every call, so the process-wide Runner cache finds it)."""
    global _default
    if _default is None:
        from ..nodes import NODE_CLASS_MAPPINGS
        from ..nodes.core_headless import CLI_NODE_CLASS_MAPPINGS
        from ..nodes.core_headless import NODE_CLASS_MAPPINGS as CORE

        _default = {**CORE, **NODE_CLASS_MAPPINGS, **CLI_NODE_CLASS_MAPPINGS}
    return _default


def display_names() -> dict:
    """Display names of every node in `default_registry()`."""
    from ..nodes import NODE_DISPLAY_NAME_MAPPINGS
    from ..nodes.core_headless import NODE_DISPLAY_NAME_MAPPINGS as CORE

    return {**CORE, **NODE_DISPLAY_NAME_MAPPINGS}


def parse_overrides(overrides) -> dict:
    """`{"3.seed": 5}`, `{"3": {"seed": 5}}` or a list of "3.seed=5" strings -> `{"3": {"seed": 5}}`."""
    import json

    out: dict = {}
    if overrides is None:
        return out
    if isinstance(overrides, (list, tuple)):
        items = []
        for text in overrides:
            if not isinstance(text, str) or "=" not in text or "." not in text.split("=", 1)[0]:
                raise WorkflowError(f"override {text!r} must look like NODE_ID.input=VALUE, e.g. 3.seed=42",
                                    type="invalid_prompt")
            key, raw = text.split("=", 1)
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw  # not JSON: take it as text (so --set 6.text=a cat works unquoted)
            items.append((key, value))
    elif isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        raise WorkflowError(f"overrides must be a dict or a list of 'ID.input=VALUE', got {type(overrides).__name__}",
                            type="invalid_prompt")
    for key, value in items:
        if isinstance(value, dict) and "." not in str(key):
            out.setdefault(str(key), {}).update(value)
            continue
        if not isinstance(key, str) or "." not in key:
            raise WorkflowError(f"override key {key!r} must be 'NODE_ID.input'", type="invalid_prompt")
        nid, name = key.split(".", 1)
        out.setdefault(nid, {})[name] = value
    return out


def apply_overrides(prompt: dict, overrides, registry) -> dict:
    """A copy of `prompt` with override values set; unknown node ids or input names are clear errors."""
    parsed = parse_overrides(overrides)
    if not parsed:
        return prompt
    prompt = copy.deepcopy(prompt)
    for nid, values in parsed.items():
        if nid not in prompt:
            raise WorkflowError(f"--set: node #{nid} is not in the workflow; its node ids are "
                                f"{', '.join(sorted(prompt, key=_id_sort))}", type="invalid_prompt",
                                details=f"Node ID '#{nid}'")
        ctype = prompt[nid].get("class_type")
        cls = registry.get(ctype) if isinstance(ctype, str) else None
        declared = [s.name for s in iter_inputs(cls, ctype)] if cls is not None else None
        for name, value in values.items():
            if declared is not None and name not in declared:
                raise WorkflowError(f"--set: node #{nid} ({ctype}) has no input {name!r}; its inputs are "
                                    f"{', '.join(declared)}", type="invalid_prompt", details=f"{nid}.{name}")
            if isinstance(value, list) and not (len(value) == 2 and isinstance(value[0], str)):
                value = {"__value__": value}
            prompt[nid].setdefault("inputs", {})[name] = value
    return prompt


def _id_sort(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


class Runner:
    """Loads, validates and executes workflows; keeps node outputs so repeated runs re-run only changes."""

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else default_registry()
        self.executor = Executor(self.registry)

    def load(self, workflow) -> Workflow:
        return load_workflow(workflow, self.registry)

    def validate(self, workflow, overrides=None, targets=None, output_dir=None, models_dir=None,
                 preflight: bool = True) -> ValidatedPrompt:
        """Validation plus every check before compute (`runner.preflight`: output prefixes and folder,
        model file headers, the memory plan), exactly as `run` does them before its first node."""
        wf = self.load(workflow)
        prompt = apply_overrides(wf.prompt, overrides, self.registry)
        with paths.using(output_dir=output_dir, models_dir=models_dir):
            validated = validate_prompt(prompt, self.registry, targets)
            if preflight:
                validated.memory = check_before_compute(validated, self.registry)
        return validated

    def run(self, workflow, overrides=None, output_dir=None, models_dir=None, targets=None,
            preflight: bool = True) -> RunResult:
        wf = self.load(workflow)
        prompt = apply_overrides(wf.prompt, overrides, self.registry)
        with paths.using(output_dir=output_dir, models_dir=models_dir):
            validated = validate_prompt(prompt, self.registry, targets)
            if preflight:
                check_before_compute(validated, self.registry)
            return self.executor.execute(validated, extra_pnginfo=wf.extra_pnginfo, original_prompt=prompt)


_runners: dict = {}


def run_workflow(workflow, overrides=None, output_dir=None, models_dir=None, registry=None, *,
                 targets=None, cache: bool = True, runner: Optional[Runner] = None) -> RunResult:
    """Run a ComfyUI workflow headless and return the outputs per output node.

    Args:
        workflow: a path (.json in UI or API format, or a ComfyUI .png), JSON text, or a parsed dict.
        overrides: input values to change: `{"3.seed": 42}`, `{"3": {"seed": 42}}` or ["3.seed=42"].
        output_dir / models_dir: folders for this run (default `core.paths`: ./output, ./models or
            $TWINFLOW_OUTPUT_DIR / $TWINFLOW_MODELS_DIR); restored afterwards.
        registry: `{class_type: node class}`; default TwinFlow's nodes plus the headless core node set.
        targets: run only these output node ids (ComfyUI's partial execution).
        cache: reuse the process-wide Runner of this registry, so a second call re-executes only the
            nodes whose inputs changed (as ComfyUI does between prompts); False runs everything fresh.
        runner: an explicit Runner to use (its cache).

    Returns:
        RunResult, a dict `{output_node_id: ui_dict}` (e.g. `{"9": {"images": [{"filename": ...,
        "subfolder": "", "type": "output"}]}}`) with `.results` (`{node_id: [list per output slot]}` of
        every node that ran or was cached), `.executed`, `.cached`, `.timings`, `.files()`.

    Raises:
        WorkflowError (and its NodeExecutionError) for a bad workflow or a failing node;
        core.errors.Interrupted when `core.progress.request_interrupt()` was called.
    """
    if runner is None:
        reg = registry if registry is not None else default_registry()
        if cache:
            runner = _runners.get(id(reg))
            if runner is None or runner.registry is not reg:
                runner = _runners[id(reg)] = Runner(reg)
        else:
            runner = Runner(reg)
    return runner.run(workflow, overrides=overrides, output_dir=output_dir, models_dir=models_dir, targets=targets)
