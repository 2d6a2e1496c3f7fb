"""The error types TwinFlow raises at its boundaries.

Every error a user can cause (a bad workflow, a bad file, a refused capability) is a subclass of
`TwinFlowError`, so hosts can tell our clear messages from genuine bugs. The classes also derive from
the builtin type a caller would expect (`ValueError`, `RuntimeError`), so `except ValueError` works.
"""


# The package's import name here: "twinflow" when installed, but a host may load the folder under another
# name (ComfyUI names a custom-node pack by its file path, so errors would show in its UI as
# "<folder>/custom_nodes/twinflow.core.errors.UnsupportedError"). Our error types report the package's
# import path instead, which is what `import twinflow` resolves to.
_LOADED_AS = __name__[: -len(".core.errors")] if __name__.endswith(".core.errors") else None
CANONICAL = "twinflow"


def _canonical_module(cls) -> None:
    mod = cls.__module__
    if _LOADED_AS and _LOADED_AS != CANONICAL and (mod == _LOADED_AS or mod.startswith(_LOADED_AS + ".")):
        cls.__module__ = CANONICAL + mod[len(_LOADED_AS):]


class TwinFlowError(Exception):
    """Base class of every error TwinFlow raises on purpose."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _canonical_module(cls)  # our subclasses in any module of the package


_canonical_module(TwinFlowError)


class WorkflowError(TwinFlowError, ValueError):
    """A workflow that cannot be loaded, validated or executed.

    `node_errors` follows ComfyUI's `/prompt` error JSON: `{node_id: {"errors": [...], "class_type": ...}}`.
    """

    def __init__(self, message, *, type="invalid_prompt", details="", node_errors=None, extra_info=None):
        super().__init__(message)
        self.message = message
        self.type = type
        self.details = details
        self.node_errors = node_errors or {}
        self.extra_info = extra_info or {}

    def to_json(self):
        """ComfyUI's error JSON: `{"error": {...}, "node_errors": {...}}`."""
        return {
            "error": {"type": self.type, "message": self.message, "details": self.details,
                      "extra_info": self.extra_info},
            "node_errors": self.node_errors,
        }


class CheckpointError(TwinFlowError, ValueError):
    """A model file that is missing, corrupt, truncated, unsafe or not what it claims to be."""


class UnsupportedError(TwinFlowError, RuntimeError):
    """A requested capability (kernel, backend, quant mode) cannot run here; the message says why."""


class Interrupted(TwinFlowError):
    """The user interrupted the run (Ctrl-C in the CLI, the Cancel button in ComfyUI)."""


class OutOfMemory(TwinFlowError, MemoryError):
    """An allocation failed (host or device memory); the message says how much and what to lower."""
