"""Reading classic (V1) node classes: their inputs, widgets, outputs and `/object_info` description.

A node class declares `INPUT_TYPES()` -> {"required": {name: (TYPE, {opts})}, "optional": {...},
"hidden": {name: "PROMPT" | "EXTRA_PNGINFO" | "UNIQUE_ID" | ...}}. TYPE is a string ("INT", "IMAGE",
"A,B" for a union, "*" for any) or a list of options (a COMBO).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.errors import WorkflowError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control_after_generate widget to these INT inputs
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


@dataclass(frozen=True)
class InputSpec:
    name: str
    category: str  # "required" | "optional"
    type: Any  # str, or a list of options for a legacy COMBO
    opts: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"COMBO" for both combo forms, else the type string."""
        if isinstance(self.type, (list, tuple)):
            return "COMBO"
        return self.type if isinstance(self.type, str) else repr(self.type)

    @property
    def options(self) -> Optional[list]:
        if isinstance(self.type, (list, tuple)):
            return list(self.type)
        if self.type == "COMBO":
            return list(self.opts.get("options", []))
        return None

    @property
    def is_widget(self) -> bool:
        """A value the frontend shows as a widget (and stores in `widgets_values`)."""
        return self.kind in WIDGET_TYPES and not self.opts.get("forceInput", False)

    def config(self) -> list:
        """`[TYPE, opts]` as ComfyUI reports it in error JSON (`input_config`)."""
        return [self.type if isinstance(self.type, str) else list(self.type), dict(self.opts)]


def input_types(cls, class_type: str = "?") -> dict:
    """`cls.INPUT_TYPES()` checked for shape; a node bug becomes a clear error naming the class."""
    fn = getattr(cls, "INPUT_TYPES", None)
    if fn is None:
        return {}
    spec = fn()
    if not isinstance(spec, dict):
        raise TypeError(f"{class_type}.INPUT_TYPES() must return a dict, got {type(spec).__name__}")
    return spec


def iter_inputs(cls, class_type: str = "?") -> list[InputSpec]:
    """Required then optional inputs, in declaration order (the frontend's widget order)."""
    spec = input_types(cls, class_type)
    out = []
    for category in ("required", "optional"):
        section = spec.get(category) or {}
        for name, entry in section.items():
            if isinstance(entry, (list, tuple)) and entry:
                typ = entry[0]
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            else:
                typ, opts = entry, {}
            out.append(InputSpec(name, category, typ, dict(opts)))
    return out


def hidden_inputs(cls, class_type: str = "?") -> dict:
    return dict(input_types(cls, class_type).get("hidden") or {})


def return_types(cls) -> tuple:
    return tuple(getattr(cls, "RETURN_TYPES", ()) or ())


def output_is_list(cls) -> tuple:
    n = len(return_types(cls))
    flags = tuple(getattr(cls, "OUTPUT_IS_LIST", ()) or ())
    return tuple(bool(flags[i]) if i < len(flags) else False for i in range(n))


def is_output_node(cls) -> bool:
    return getattr(cls, "OUTPUT_NODE", False) is True


def type_matches(received, expected) -> bool:
    """ComfyUI's linked-type check: equal, "*" on either side, or overlapping comma unions."""
    if isinstance(expected, (list, tuple)):  # a COMBO input accepts COMBO/list outputs (primitives, switches)
        return received == "COMBO" or isinstance(received, (list, tuple)) or received == "*"
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    if received == expected or received == "*" or expected == "*":
        return True
    a = {t.strip() for t in received.split(",")}
    b = {t.strip() for t in expected.split(",")}
    return "*" in a or "*" in b or bool(a & b)


def validate_signature(cls):
    """(argument names, takes **kwargs) of VALIDATE_INPUTS, or None when the class has none."""
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return None
    try:
        spec = inspect.getfullargspec(fn)
    except TypeError:
        return None
    args = [a for a in spec.args if a not in ("self", "cls")]
    return args, spec.varkw is not None


def object_info(class_type: str, cls, display_name: Optional[str] = None) -> dict:
    """The `/object_info` entry ComfyUI serves for a classic node class."""
    spec = input_types(cls, class_type)
    info_input = {}
    order = {}
    for category in ("required", "optional", "hidden"):
        section = spec.get(category)
        if section:
            info_input[category] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items()}
            order[category] = list(section)
    outputs = list(return_types(cls))
    names = getattr(cls, "RETURN_NAMES", None) or outputs
    module = getattr(cls, "RELATIVE_PYTHON_MODULE", None) or "custom_nodes.twinflow"
    info = {
        "input": info_input,
        "input_order": order,
        "output": outputs,
        "output_is_list": list(output_is_list(cls)),
        "output_name": list(names),
        "name": class_type,
        "display_name": display_name or class_type,
        "description": getattr(cls, "DESCRIPTION", "") or "",
        "python_module": module,
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": is_output_node(cls),
    }
    tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    if tooltips:
        info["output_tooltips"] = list(tooltips)
    for flag in ("DEPRECATED", "EXPERIMENTAL"):
        if getattr(cls, flag, False):
            info[flag.lower()] = True
    return info


def node_error(message: str, node_id=None, class_type=None, input_name=None, *, type: str = "invalid_prompt",
               details: str = "") -> WorkflowError:
    """A WorkflowError for one node, with ComfyUI-shaped `node_errors`."""
    node_errors = {}
    if node_id is not None:
        extra = {"input_name": input_name} if input_name is not None else {}
        node_errors[str(node_id)] = {
            "errors": [{"type": type, "message": message, "details": details or (input_name or ""),
                        "extra_info": extra}],
            "dependent_outputs": [],
            "class_type": class_type,
        }
    return WorkflowError(message, type=type, details=details, node_errors=node_errors)
