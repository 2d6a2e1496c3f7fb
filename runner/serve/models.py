"""Models kept loaded across prompts: an LRU cache of loader results under a memory budget.

The runner's execution cache (ComfyUI's classic cache) keeps only the nodes of the last prompt, so two
workflows that alternate would reload their models every time. The server wraps each *loader* of its
registry - a node with only constant inputs that returns a model object (TWINFLOW_MODEL, TWINFLOW_VAE,
TWINFLOW_GATE_NET, or core MODEL/VAE/CLIP) - so a call with the same inputs returns the object loaded
before. Entries are dropped least-recently-used first when the bytes of their tensors exceed the budget;
`clear()` drops them all (POST /free). An object larger than the whole budget is returned but not kept
(logged once). A dropped model stays in memory while the last prompt's execution cache still holds it.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from ...core.log import log_once
from ..spec import hidden_inputs, iter_inputs, return_types

logger = logging.getLogger(__name__)

MODEL_TYPES = frozenset({"TWINFLOW_MODEL", "TWINFLOW_VAE", "TWINFLOW_GATE_NET", "MODEL", "VAE", "CLIP",
                         "CLIP_VISION"})


def tensor_bytes(value, _seen=None, _depth=0) -> int:
    """Bytes of the distinct tensor storages reachable from a loader result (modules, handles, tuples)."""
    import torch

    seen = _seen if _seen is not None else set()
    if _depth > 4:
        return 0
    if isinstance(value, torch.Tensor):
        try:
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.device.type)
            if key in seen or value.device.type == "meta":
                return 0
            seen.add(key)
            return storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        return sum(tensor_bytes(t, seen, _depth + 1) for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in value.values())
    module = getattr(value, "module", None)  # core.handles.Denoiser and similar handles
    if isinstance(module, torch.nn.Module):
        return tensor_bytes(module, seen, _depth + 1)
    return 0


class ModelCache:
    """LRU of `(class_type, inputs) -> loader result` holding at most `budget_bytes` of tensors."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict = OrderedDict()  # key -> (result, nbytes)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key):
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[0]

    def put(self, key, result) -> None:
        size = tensor_bytes(result)
        if size > self.budget_bytes:
            log_once(logger, ("twinflow.serve.model_too_big", key[0]),
                     "%s result of %.1f MiB is larger than the model cache budget (%.1f MiB): it is not kept "
                     "between prompts; raise --model-cache-mb", key[0], size / 2**20, self.budget_bytes / 2**20,
                     level=logging.WARNING)
            return
        with self._lock:
            self._entries[key] = (result, size)
            self._entries.move_to_end(key)
            total = sum(n for _, n in self._entries.values())
            while total > self.budget_bytes and len(self._entries) > 1:
                old_key, (_, n) = self._entries.popitem(last=False)
                total -= n
                logger.info("model cache: dropped %s (%.1f MiB) to stay within %.1f MiB", old_key[0], n / 2**20,
                            self.budget_bytes / 2**20)

    def clear(self) -> int:
        """Drop every entry; returns how many there were."""
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            return n

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "used_bytes": sum(n for _, n in self._entries.values()),
                    "budget_bytes": self.budget_bytes, "hits": self.hits, "misses": self.misses}


def _freeze(value):
    import json

    return json.dumps(value, sort_keys=True, default=repr)


def is_loader(ctype: str, cls) -> bool:
    """Only constant (widget) inputs, no hidden ones, and at least one model-typed output."""
    try:
        outs = return_types(cls)
        specs = iter_inputs(cls, ctype)
        hidden = hidden_inputs(cls, ctype)
    except Exception:  # a class whose INPUT_TYPES fails is reported by validation, not here
        return False
    if hidden or not any(str(t) in MODEL_TYPES for t in outs):
        return False
    return all(s.kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") for s in specs)


def with_model_cache(registry: dict, cache: ModelCache) -> dict:
    """A copy of `registry` whose loader classes answer from `cache` (subclasses; other classes unchanged)."""
    out = {}
    for ctype, cls in registry.items():
        out[ctype] = _cached_subclass(ctype, cls, cache) if is_loader(ctype, cls) else cls
    return out


def _cached_subclass(ctype: str, cls, cache: ModelCache):
    fname = getattr(cls, "FUNCTION", None)
    original = getattr(cls, fname, None) if isinstance(fname, str) else None
    if original is None:
        return cls

    def load(self, **kwargs):
        key = (ctype, _freeze(kwargs))
        hit = cache.get(key)
        if hit is not None:
            logger.debug("model cache hit: %s", ctype)
            return hit
        result = original(self, **kwargs)
        cache.put(key, result)
        return result

    load.__name__ = fname
    return type(cls.__name__, (cls,), {fname: load, "__module__": cls.__module__, "__doc__": cls.__doc__})
