"""TwinFlow nodes: stream — run a Wan DiT whose blocks stay in host memory (`models.block_stream`).

One library call: `block_stream.stream_blocks` on a copy of the model; the node picks the device and the
budget (a named group shares one budget between models, e.g. Wan2.2's two experts).
"""
from __future__ import annotations

import logging

import torch

from ._inputs import as_model

logger = logging.getLogger(__name__)

CLI_GROUP = "twinflow-run"  # the budget group `twinflow run --stream-blocks` gives every model it streams


def stream_device(d) -> "torch.device | None":
    """Where a model is streamed to: its own accelerator, else CUDA when there is one; None on a CPU-only machine."""
    if d.device.type != "cpu":
        return d.device
    return torch.device("cuda") if torch.cuda.is_available() else None


def stream_model(model, max_resident_blocks: int, budget_group: str = "", pin_memory: bool = True):
    """(streamed TWINFLOW_MODEL, status line); the model unchanged when there is no accelerator."""
    from ..core.log import log_once
    from ..models import block_stream

    d = as_model(model, need_module=True)
    if isinstance(max_resident_blocks, bool) or not isinstance(max_resident_blocks, int) or max_resident_blocks < 1:
        raise ValueError(f"TwinFlow Block Stream: max_resident_blocks must be an integer >= 1, got "
                         f"{max_resident_blocks!r}")
    device = stream_device(d)
    name = d.name or "model"
    if device is None:
        status = (f"{name}: not streamed: the compute device is the CPU, where the weights already are in host "
                  f"memory")
        log_once(logger, ("block_stream.cpu", name), "TwinFlow Block Stream: %s", status)
        return d, status
    budget = (block_stream.shared_budget(budget_group, int(max_resident_blocks)) if budget_group
              else block_stream.StreamBudget(int(max_resident_blocks)))
    module = block_stream.stream_blocks(d.module, budget=budget, engine=block_stream.default_engine(device, pin=bool(pin_memory)), name=name)
    status = block_stream.streamer_of(module).status()
    new = d.clone(module=module)
    new.info["block_stream"] = status
    return new, status


class TwinFlowBlockStream:
    """Keep a Wan DiT's blocks in host memory and copy each to the GPU just before it runs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("TWINFLOW_MODEL,MODEL", {"tooltip": "A Wan DiT (TwinFlow Load DiT, or a core MODEL rebuilt as "
                                                          "one). Quantize it before streaming; compiling a streamed "
                                                          "model is refused."}),
            "max_resident_blocks": ("INT", {"default": 4, "min": 1, "max": 64, "step": 1, "tooltip":
                                    "Blocks on the GPU at once (the running one included); the others are being "
                                    "copied in ahead. A 14B block is about 0.7 GB in bf16."}),
            "budget_group": ("STRING", {"default": "", "tooltip":
                             "Models with the same group name share one budget (e.g. Wan2.2's high- and low-noise "
                             "experts); empty = a budget of this model's own."}),
        }, "optional": {
            "pin_memory": ("BOOLEAN", {"default": True, "tooltip":
                           "Copy from a pinned (page-locked) copy of the blocks: asynchronous copies that overlap "
                           "the compute, but a second copy of the weights in host memory while the loaded model "
                           "is held. Off: copy from the loaded model's own memory (no second copy; slower copies)."}),
        }}

    RETURN_TYPES = ("TWINFLOW_MODEL", "STRING")
    RETURN_NAMES = ("model", "status")
    FUNCTION = "apply"
    CATEGORY = "TwinFlow/dit"
    DESCRIPTION = ("Weight streaming (block swap): the transformer blocks stay in (pinned) host memory and are copied "
                   "to the GPU one by one ahead of use on a side stream; embeddings and head stay on the GPU. Same "
                   "output as the resident model. On a machine without a GPU the model is returned unchanged.")

    def apply(self, model, max_resident_blocks=4, budget_group="", pin_memory=True):
        new, status = stream_model(model, max_resident_blocks, str(budget_group or "").strip(), pin_memory)
        return {"ui": {"text": [status]}, "result": (new, status)}


NODE_CLASS_MAPPINGS: dict = {"TwinFlowBlockStream": TwinFlowBlockStream}
NODE_DISPLAY_NAME_MAPPINGS: dict = {"TwinFlowBlockStream": "TwinFlow Block Stream"}
