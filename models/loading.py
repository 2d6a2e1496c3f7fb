"""Safe checkpoint loading shared by every model family.

- safetensors (`.safetensors`/`.sft`), sharded safetensors (`*.index.json` + shards) and `.pth`/`.pt`/
  `.ckpt`/`.bin` through `torch.load(weights_only=True)` only: a pickle that holds objects is refused.
- prefixes such as `model.diffusion_model.`, `first_stage_model.`, `vae.` are detected and stripped.
- strict checking reports missing, unexpected and shape-mismatched keys together, with the file name.
- models are built on the meta device and filled with `load_state_dict(assign=True)`.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from ..core.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pth", ".pt", ".ckpt", ".bin")


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on corrupt files
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}). "
            f"The file may be truncated or corrupt; download or copy it again."
        ) from None
    return sd, meta


def _load_pickle(path: Path) -> tuple[dict, dict]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises `weights_only=False`, i.e. running the file's code: never quote that advice
        found = re.search(r"unsupported (?:global: )?GLOBAL\s+([\w.]+)", str(e), re.IGNORECASE)
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled Python objects, not only tensors{what}, and "
            f"loading it could run code. Only weights-only checkpoints are accepted; convert it to safetensors "
            f"with a tool you trust, or use a .safetensors download of the same model."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            f"The file may be truncated or corrupt."
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return dict(obj), {}


def _load_sharded(index_path: Path) -> tuple[dict, dict]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception as e:
        raise CheckpointError(f"{index_path}: not a valid shard index (needs a 'weight_map' object): {e}") from None
    sd: dict = {}
    meta = dict(index.get("metadata") or {})
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = (index_path.parent / shard)
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: names shard {shard!r} which does not exist at {shard_path}")
        part, _ = load_file(shard_path)
        sd.update(part)
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise CheckpointError(f"{index_path}: keys listed in the index are not in their shards: {missing[:5]}")
    return sd, meta


def load_file(path) -> tuple[dict, dict]:
    """Read a checkpoint file into `(state_dict, metadata)`; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(".json"):
        return _load_sharded(path)
    if name.endswith(SAFETENSORS_EXT):
        return _load_safetensors(path)
    if name.endswith(PICKLE_EXT):
        return _load_pickle(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint extension; expected one of {SAFETENSORS_EXT + PICKLE_EXT} or a shard index .json"
    )


def strip_prefix(sd: dict, anchor: str, prefixes: Iterable[str] = ()) -> tuple[dict, str]:
    """Find the prefix under which `anchor` (a key every valid file has) appears, and strip it.

    Tries the given prefixes first, then any prefix that ends right before `anchor`.
    Returns `(stripped_state_dict, prefix)`; raises KeyError if `anchor` is nowhere.
    """
    if anchor in sd:
        return sd, ""
    candidates = list(prefixes) + sorted({k[: -len(anchor)] for k in sd if k.endswith(anchor)}, key=len)
    for prefix in candidates:
        if prefix + anchor in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    raise KeyError(anchor)


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], source: str,
                     allow_unexpected: Callable[[str], bool] = lambda k: False) -> None:
    """Raise one CheckpointError listing every missing, unexpected and shape-mismatched key."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not allow_unexpected(k)]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
                  for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{source}: checkpoint does not match the model"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            parts.append(f"{title} ({len(items)}): {shown}")
    raise CheckpointError("; ".join(parts))


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """Names and shapes of a module's state dict (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def convert_dtype(sd: dict, dtype: Optional[torch.dtype], keep_fp32: Callable[[str], bool] = lambda k: False) -> dict:
    """Cast floating tensors to `dtype` (None keeps the file's dtypes); `keep_fp32` keys stay float32."""
    if dtype is None:
        return sd
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            v = v.to(torch.float32 if keep_fp32(k) else dtype)
        out[k] = v
    return out


def build_and_load(factory: Callable[[], torch.nn.Module], sd: dict, source: str) -> torch.nn.Module:
    """Build a module on the meta device, check `sd` against it strictly, load with `assign=True`."""
    with torch.device("meta"):
        module = factory()
    check_state_dict(sd, expected_shapes(module), source)
    module.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers (e.g. RoPE tables) are still on meta: let the module rebuild them.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise AssertionError(f"{source}: buffer {name} left on meta; module must register it persistent=False "
                                 f"and rebuild lazily")
    return module.eval()


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "default": None, "auto": None}


def parse_dtype(name: str) -> Optional[torch.dtype]:
    """Map a dtype widget value (`default`, `fp32`, `fp16`, `bf16`) to a torch dtype (None = keep the file's)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None
