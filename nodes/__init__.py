"""All TwinFlow nodes (classic V1 node API). Each area keeps its node classes in its own module;
this module only merges their mappings. Node ids are prefixed `TwinFlow` to never clash."""
from . import io, vae, dit, refiner, text, sampling, quant, compile, stream  # noqa: F401  (one module per area)

_MODULES = (io, vae, dit, refiner, text, sampling, quant, compile, stream)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    for _name in _m.NODE_CLASS_MAPPINGS:
        assert _name.startswith("TwinFlow"), _name
        assert _name not in NODE_CLASS_MAPPINGS, f"duplicate node id {_name}"
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
