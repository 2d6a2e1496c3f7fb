"""Loading model files that may be quantized: the one place that decides, per file, between the quantized
path (`checkpoint.load_quantized_into`: stored codes and scales, no re-quantization) and the model
family's own plain loader.

The dependency runs one way: quant uses models (the family builds its module and parses its keys);
models never import quant. Loaders of quantizable families (TwinFlow Load DiT, `twinflow fit-gate`) call
here; `models.wan_dit.load_wan_dit` reads plain files only.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..models import wan_dit
from .checkpoint import is_quantized, load_quantized_into, strip_record_prefix

logger = logging.getLogger(__name__)


def wan_dit_from_state_dict(sd: dict, source: str = "state dict", dtype: Optional[torch.dtype] = None,
                            config: Optional[wan_dit.WanDiTConfig] = None,
                            meta: Optional[dict] = None) -> wan_dit.WanDiT:
    """A WanDiT from a plain or quantized state dict (TwinFlow record, ComfyUI scaled fp8 layouts).

    Quantized files keep the dtypes they were saved with (`dtype` applies to plain files only)."""
    meta = meta or {}
    if not is_quantized(meta, sd):
        return wan_dit.wan_dit_from_state_dict(sd, source, dtype=dtype, config=config)
    module, sd, prefix = wan_dit.wan_dit_on_meta(sd, source, config, meta)
    load_quantized_into(module, sd, strip_record_prefix(meta, prefix), source=source)
    logger.info("%s: quantized Wan2.1 DiT %s loaded without re-quantizing", source, wan_dit.preset_name(module.config))
    return module.eval().requires_grad_(False)


def load_wan_dit(path_or_index, dtype: Optional[torch.dtype] = None, preset: Optional[str] = None) -> wan_dit.WanDiT:
    """`models.wan_dit.load_wan_dit` for every Wan DiT file, quantized ones included (same arguments)."""
    from pathlib import Path

    sd, meta = wan_dit.read_wan_dit_file(path_or_index)
    config = wan_dit.get_config(preset) if preset else None
    return wan_dit_from_state_dict(sd, str(Path(path_or_index)), dtype=dtype, config=config, meta=meta)
