"""ComfyUI's core node set for the headless runner: the merged mappings of `nodes/core_*.py`.

Imported by the runner only (never by the package's ComfyUI entry), so inside ComfyUI the core nodes
keep coming from ComfyUI itself and nothing is registered twice.
"""
from . import core_media, core_models, core_sampling

_MODULES = (core_models, core_sampling, core_media)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    for _name in _m.NODE_CLASS_MAPPINGS:
        assert not _name.startswith("TwinFlow") and _name not in NODE_CLASS_MAPPINGS, _name
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
