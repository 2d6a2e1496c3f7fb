"""ComfyUI's core node set for the headless runner: the merged mappings of `nodes/core_*.py`.

Imported by the runner only (never by the package's ComfyUI entry), so inside ComfyUI the core nodes
keep coming from ComfyUI itself and nothing is registered twice.
"""
from . import core_media, core_models, core_sampling, core_vision, core_wan

_MODULES = (core_models, core_sampling, core_media, core_vision, core_wan)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    for _name in _m.NODE_CLASS_MAPPINGS:
        assert not _name.startswith("TwinFlow") and _name not in NODE_CLASS_MAPPINGS, _name
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)


# What `twinflow run --compile/--quantize` inserts next to core loaders: the TwinFlow Compile/Quantize nodes typed
# with ComfyUI's MODEL / VAE, so the core samplers and decoders downstream accept them (headless, a core MODEL
# and a TWINFLOW_MODEL are the same denoiser object). Runner only, never registered inside ComfyUI.
from .compile import TwinFlowCompileModel, TwinFlowCompileVAE  # noqa: E402
from .quant import TwinFlowQuantizeModel  # noqa: E402
from .stream import TwinFlowBlockStream  # noqa: E402


class TwinFlowCompileCoreModel(TwinFlowCompileModel):
    RETURN_TYPES = ("MODEL", "STRING")


class TwinFlowCompileCoreVAE(TwinFlowCompileVAE):
    RETURN_TYPES = ("VAE", "STRING")


class TwinFlowQuantizeCoreModel(TwinFlowQuantizeModel):
    RETURN_TYPES = ("MODEL", "STRING")


class TwinFlowBlockStreamCore(TwinFlowBlockStream):
    RETURN_TYPES = ("MODEL", "STRING")


CLI_NODE_CLASS_MAPPINGS = {c.__name__: c for c in (TwinFlowCompileCoreModel, TwinFlowCompileCoreVAE,
                                                   TwinFlowQuantizeCoreModel, TwinFlowBlockStreamCore)}
