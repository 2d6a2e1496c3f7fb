"""Weight streaming for the Wan DiT (the peers' "block swap" / offload): the transformer blocks' weights stay
in host memory and each block is copied to the compute device just before it runs, within a budget of
resident blocks; the embeddings and the head stay on the device.

    streamed = stream_blocks(module, max_resident_blocks=4, device="cuda")  # a copy; `module` is untouched
    streamed(x, t, context)  # same output as the resident model, bit for bit

How it works (one code path; only the copy engine differs per device):
- `stream_blocks` makes a structural copy of the module whose parameters are new `nn.Parameter` objects over
  the same tensors (the input model is never changed), moves the non-block weights to the device, and keeps
  one host copy of every block tensor (pinned on CUDA, so copies are asynchronous).
- Forward hooks on the model and on each block (never on the linears: see below) drive a `BlockStreamer`:
  the model's pre-hook starts copying the first blocks; block i's pre-hook waits for block i's copy, points
  the block's parameters at the device tensors and starts copying blocks i+1, i+2, ... into the free slots of
  the budget; block i's post-hook points it back at the host tensors and releases its device memory. The
  model's post-hook (`always_call`, so also after an error or an interrupt) releases whatever is left, so
  between forwards no block is resident and two models can share one `StreamBudget`: each block is copied
  exactly once per forward, and at most `max_resident_blocks` blocks (of all models sharing the budget) hold
  device memory at any time (a block counts from the start of its copy until its release).
- The copy engine is a strategy (`CopyEngine`): `CudaCopyEngine` copies on a side stream, the compute stream
  waits on an event, and a released block's memory is freed only after the GPU is past its kernels (so the
  budget bounds real device memory although the CPU runs ahead); `SyncCopyEngine` is a plain `.to(device)` for
  other devices. Tests pass a counting engine of their own through the same hooks.

Hooks and the CPU fast path: `wan_dit` sends a linear through oneDNN only when that `nn.Linear` (or the
FFN `Sequential`) has no hooks and no global module hooks are installed. The streamer hooks the model and
the blocks only, so the linears keep their fast path (a test checks that streaming adds no hook on them).

The text K/V cache (`WanDiT.text_cache()`) computes every block's cross-attention K/V up front, which
needs all blocks' weights at once: a streamed model's `text_cache()` is a no-op (logged once) and each
block computes its own K/V (a text-length GEMM per block: small next to the blocks' token-length work).

Not supported, refused with a clear error: compiling or quantizing a streamed model (stream after them:
quantize, then stream; a compiled graph holds every weight on the device), streaming a model twice, and
modules without a `blocks` ModuleList.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..core.log import log_once

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Copy engines: how a block's tensors reach the device (the one part that differs per device)
# ----------------------------------------------------------------------------------------------

@dataclass
class Transfer:
    """One block's copy in flight or done: the device tensors (in the block's tensor order) and an engine token."""

    label: tuple  # (model name, block index)
    tensors: list
    token: object = None


class CopyEngine:
    """Strategy: host copies of block tensors, and copies of them to `device`.

    `host(t)` -> the tensor the streamer keeps between uses (called once per tensor at set-up);
    `start(label, hosts)` -> a Transfer whose copies may still be in flight;
    `ready(transfer)` -> its device tensors, safe to use on the current compute stream;
    `release(transfer)` -> after the block ran: its device memory may be reused once the queued work is done."""

    device: torch.device
    pinned = False
    limit = 1 << 30  # blocks that may hold device memory at once; the streamer sets its budget here

    def settle(self) -> None:
        """End of a forward: device memory of released blocks is free once this returns."""

    def host(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def start(self, label: tuple, hosts: list) -> Transfer:
        raise NotImplementedError

    def ready(self, transfer: Transfer) -> list:
        raise NotImplementedError

    def release(self, transfer: Transfer) -> None:
        transfer.tensors = []


class SyncCopyEngine(CopyEngine):
    """A plain synchronous `.to(device)` (non-CUDA accelerators): correct, with no copy/compute overlap."""

    def __init__(self, device):
        self.device = torch.device(device)

    def host(self, t):
        return t.detach().to("cpu")

    def start(self, label, hosts):
        return Transfer(label, [h.to(self.device) for h in hosts])

    def ready(self, transfer):
        return transfer.tensors


class CudaCopyEngine(CopyEngine):
    """Pinned host tensors, copies on a side stream; the compute stream waits on each block's event.

    The CPU runs ahead of the GPU: when block i's post-hook releases it, its kernels may still be queued. A
    released block's device tensors are therefore kept (with an event recorded on the compute stream after its
    kernels) until the GPU is done with them, and `start` waits for the oldest such block before a copy would
    make more than `limit` blocks hold device memory: the budget bounds real device memory, not only the
    bookkeeping. `settle` (end of every forward) waits for all of them, so nothing is held between forwards."""

    def __init__(self, device, pin: bool = True):
        self.pinned = bool(pin)  # False: stream from the model's own (pageable) host memory: no second copy, slower
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._live = 0
        self._retiring = collections.deque()  # (compute-stream event after the block's kernels, its tensors)

    def _reap(self, wait_for: int) -> None:
        """Free retired blocks the GPU is done with; wait (CPU side) for the oldest until at most `wait_for` remain."""
        while self._retiring and (len(self._retiring) > wait_for or self._retiring[0][0].query()):
            done, _tensors = self._retiring.popleft()
            done.synchronize()

    def host(self, t):
        if t.device.type == "cpu" and (t.is_pinned() or not self.pinned):
            return t.detach()
        if not self.pinned:
            return t.detach().to("cpu")
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # page-locked: the copy can run async
        out.copy_(t.detach())
        return out

    def start(self, label, hosts):
        self._reap(max(0, self.limit - self._live - 1))
        self._live += 1
        with torch.cuda.stream(self.stream):
            dev = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in hosts]
            for d, h in zip(dev, hosts):
                d.copy_(h, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Transfer(label, dev, event)

    def ready(self, transfer):
        torch.cuda.current_stream(self.device).wait_event(transfer.token)
        return transfer.tensors

    def release(self, transfer):
        # Allocated on the side stream, read on the compute stream: freed only once the compute stream is past
        # the block (the event), so the allocator never hands the memory to a copy while kernels still read it.
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._retiring.append((done, transfer.tensors))
        self._live -= 1
        transfer.tensors = []

    def settle(self):
        self._reap(0)


def default_engine(device, pin: bool = True) -> CopyEngine:
    """The engine for a compute device; the CPU has nothing to stream (weights already are in host memory).
    `pin`: CUDA copies from a pinned copy of the blocks (asynchronous; a second copy of the weights in host
    memory while the input model is held), or from the input's own memory (no second copy, slower copies)."""
    device = torch.device(device)
    if device.type == "cpu":
        raise ValueError("block streaming copies weights from host memory to an accelerator; the compute device "
                         "is the CPU, where the weights already are in host memory: nothing to stream")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"block streaming to {device}: torch sees no CUDA device")
        return CudaCopyEngine(device, pin=pin)
    return SyncCopyEngine(device)


# ----------------------------------------------------------------------------------------------
# Budget: resident blocks, shared by every model streamed with it
# ----------------------------------------------------------------------------------------------

class StreamBudget:
    """At most `max_resident_blocks` blocks hold device memory at once, over every model that shares this."""

    def __init__(self, max_resident_blocks: int, name: str = ""):
        if isinstance(max_resident_blocks, bool) or not isinstance(max_resident_blocks, int) \
                or max_resident_blocks < 1:
            raise ValueError(f"max_resident_blocks must be an integer >= 1 (blocks on the device at once, the one "
                             f"running included), got {max_resident_blocks!r}")
        self.max_resident_blocks = max_resident_blocks
        self.name = name
        self.resident = 0
        self.peak = 0
        self._streamers = weakref.WeakSet()  # the models streamed with this budget that still exist
        self._lock = threading.Lock()

    @property
    def models(self) -> list:
        return sorted(s.name for s in list(self._streamers))

    def try_acquire(self) -> bool:
        with self._lock:
            if self.resident >= self.max_resident_blocks:
                return False
            self.resident += 1
            self.peak = max(self.peak, self.resident)
            return True

    def release(self) -> None:
        with self._lock:
            assert self.resident > 0, "block budget released more often than acquired"
            self.resident -= 1

    def __repr__(self):
        return f"StreamBudget({self.max_resident_blocks}, name={self.name!r}, resident={self.resident})"


_GROUPS: dict[str, StreamBudget] = {}
_GROUPS_LOCK = threading.Lock()


def shared_budget(group: str, max_resident_blocks: int) -> StreamBudget:
    """The budget named `group` (made on first use): models streamed with the same group share it."""
    with _GROUPS_LOCK:
        b = _GROUPS.get(group)
        if b is None:
            b = _GROUPS[group] = StreamBudget(max_resident_blocks, group)
        elif b.max_resident_blocks != max_resident_blocks:
            raise ValueError(f"block budget group {group!r} already holds {b.max_resident_blocks} resident blocks "
                             f"(for {', '.join(b.models)}); give every model of the group the same "
                             f"max_resident_blocks, or use another group name")
        return b


# ----------------------------------------------------------------------------------------------
# The streamer
# ----------------------------------------------------------------------------------------------

@dataclass
class _Slot:
    owner: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor


@dataclass
class _Block:
    slots: list = field(default_factory=list)
    transfer: Optional[Transfer] = None
    active: bool = False  # parameters point at the device tensors


class BlockStreamer:
    """Drives one model's blocks through a copy engine within a (possibly shared) budget; see the module doc."""

    def __init__(self, module: nn.Module, blocks: nn.ModuleList, budget: StreamBudget, engine: CopyEngine,
                 name: str, prefetch: int):
        self.module, self.budget, self.engine, self.name = module, budget, engine, name
        self.prefetch = prefetch
        engine.limit = min(engine.limit, budget.max_resident_blocks)
        self.blocks: list[_Block] = []
        self.block_bytes = 0
        self.copies = 0  # block copies started, all forwards
        self._handles = []
        for blk in blocks:
            b = _Block()
            for _, mod in blk.named_modules():
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        b.slots.append(_Slot(mod, pname, True, engine.host(p.data)))
                for bname, t in list(mod._buffers.items()):
                    if t is not None:
                        b.slots.append(_Slot(mod, bname, False, engine.host(t)))
            for s in b.slots:
                self._point(s, s.host)
                self.block_bytes += s.host.numel() * s.host.element_size()
            self.blocks.append(b)
        self._handles.append(module.register_forward_pre_hook(self._model_pre))
        self._handles.append(module.register_forward_hook(self._model_post, always_call=True))
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_pre_hook(self._block_pre(i)))
            self._handles.append(blk.register_forward_hook(self._block_post(i), always_call=True))

    def __deepcopy__(self, memo):
        raise TypeError(f"{self.name}: a block-streamed model cannot be copied (quantize, compile and other copies "
                        f"need every weight in one place); apply TwinFlow Block Stream after them")

    @staticmethod
    def _point(s: _Slot, t: torch.Tensor) -> None:
        if s.is_param:
            s.owner._parameters[s.name].data = t
        else:
            s.owner._buffers[s.name] = t

    # -- the schedule ------------------------------------------------------------------------

    def _start(self, i: int, need: bool) -> bool:
        b = self.blocks[i]
        if b.transfer is not None:
            return True
        if not self.budget.try_acquire():
            if need:
                raise RuntimeError(f"{self.name}: block {i} must run but the block budget {self.budget.name!r} "
                                   f"({self.budget.max_resident_blocks} resident blocks) is held by other models: "
                                   f"models sharing a budget must not run at the same time")
            return False
        b.transfer = self.engine.start((self.name, i), [s.host for s in b.slots])
        self.copies += 1
        return True

    def _prefetch_from(self, i: int, limit: int) -> None:
        for j in range(i, min(len(self.blocks), i + limit)):
            if not self._start(j, need=False):
                break

    def _evict(self, i: int) -> None:
        b = self.blocks[i]
        if b.transfer is None:
            return
        if b.active:
            for s in b.slots:
                self._point(s, s.host)
            b.active = False
        self.engine.release(b.transfer)
        b.transfer = None
        self.budget.release()

    def _model_pre(self, module, args):
        for i in range(len(self.blocks)):  # a forward starts with nothing resident (see _model_post)
            self._evict(i)
        self._prefetch_from(0, self.prefetch + 1)  # the first copies overlap the embeddings

    def _model_post(self, module, args, output):
        for i in range(len(self.blocks)):
            self._evict(i)
        self.engine.settle()  # another model sharing the budget may copy next

    def _block_pre(self, i: int):
        def hook(block, args):
            self._start(i, need=True)
            b = self.blocks[i]
            for s, t in zip(b.slots, self.engine.ready(b.transfer)):
                self._point(s, t)
            b.active = True
            self._prefetch_from(i + 1, self.prefetch)
        return hook

    def _block_post(self, i: int):
        def hook(block, args, output):
            self._evict(i)  # its slot is filled by the next block's pre-hook (block i+1+prefetch)
        return hook

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> str:
        """One line: what is streamed, from where, within which budget."""
        rest = sum(t.numel() * t.element_size() for t in _non_block_tensors(self.module))
        shared = len(self.budget.models)
        group = (f"budget {self.budget.name!r} shared by {shared} models" if shared > 1
                 else f"budget {self.budget.name!r}" if self.budget.name else "own budget")
        return (f"{self.name}: streaming {len(self.blocks)} blocks ({self.block_bytes / 2 ** 30:.2f} GiB) from "
                f"{'pinned ' if self.engine.pinned else ''}host memory to {self.engine.device}, at most "
                f"{self.budget.max_resident_blocks} resident ({group}), prefetching {self.prefetch} ahead; "
                f"embeddings and head resident ({rest / 2 ** 30:.2f} GiB)")


def _non_block_tensors(module: nn.Module) -> list:
    inside = {id(t) for blk in module.blocks for t in list(blk.parameters()) + list(blk.buffers())}
    return [t for t in list(module.parameters()) + list(module.buffers()) if id(t) not in inside]


def _shared_tensors(module: nn.Module) -> int:
    """How many tensors (or modules) belong to more than one block, or to a block and to the rest of the model."""
    block_of, shared = {}, 0
    for j, blk in enumerate(module.blocks):
        for m in blk.modules():
            if block_of.setdefault(id(m), j) != j:
                shared += 1
    owners: dict = {}
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None:
                owners.setdefault(id(t), set()).add(block_of.get(id(m), -1))
    return shared + sum(len(o) > 1 for o in owners.values())


def streamer_of(module) -> Optional[BlockStreamer]:
    """The streamer of a streamed model, else None."""
    return getattr(module, "_block_streamer", None)


def refuse_streamed(module, what: str) -> None:
    """Raise a clear error when `what` (a node or operation that needs every weight in one place) gets a
    streamed model."""
    s = streamer_of(module)
    if s is not None:
        raise ValueError(f"{what}: {s.name} is block-streamed (TwinFlow Block Stream / --stream-blocks); "
                         f"{what} needs the whole model: apply it to the model before streaming, and stream after it")


def _own_copy(module: nn.Module) -> nn.Module:
    """A structural copy with new Parameter objects over the same tensors (buffers shared as they are): the
    streamer repoints the copy's parameters and buffers, the original keeps its own."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def _no_text_cache(module):
    log_once(logger, ("block_stream.text_cache", id(module)), "%s: block-streamed, so the text K/V cache is off "
             "(it needs every block's weights at once); each block computes its cross-attention K/V",
             getattr(module, "_block_streamer").name)
    yield module


def stream_blocks(module: nn.Module, max_resident_blocks: Optional[int] = None, *, budget: Optional[StreamBudget] = None,
                  device=None, engine: Optional[CopyEngine] = None, prefetch: Optional[int] = None,
                  name: str = "") -> nn.Module:
    """A copy of `module` (a model with a `blocks` ModuleList, e.g. `WanDiT`) whose blocks are streamed.

    Args:
        max_resident_blocks: blocks on the device at once (>= 1), the running one included; or pass `budget`
            (a `StreamBudget`, e.g. `shared_budget(group, n)`) to share it with other models.
        device: compute device (default: the device of `engine`; one of them is needed).
        engine: the copy engine (default `default_engine(device)`: CUDA side stream, or `.to()`).
        prefetch: blocks copied ahead of the running one (default: every free slot of the budget).
        name: the model's name in status lines and errors.
    Returns:
        the streamed copy: same forward, same outputs; `streamer_of(copy).status()` says what is streamed.
    Raises:
        ValueError for a budget below 1, a model without blocks, a model already streamed, a CPU device.
    """
    name = name or type(module).__name__
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{name}: block streaming needs a model with a non-empty `blocks` ModuleList (a Wan DiT); "
                         f"{type(module).__name__} has none (a compiled or wrapped model? stream the plain model "
                         f"before compiling or wrapping it)")
    if streamer_of(module) is not None:
        raise ValueError(f"{name}: already block-streamed ({streamer_of(module).status()}); stream the model from "
                         f"before the first TwinFlow Block Stream")
    if (budget is None) == (max_resident_blocks is None):
        raise ValueError("give exactly one of max_resident_blocks and budget")
    if budget is None:
        budget = StreamBudget(max_resident_blocks)
    if engine is None:
        if device is None:
            raise ValueError("block streaming needs a compute device (or a copy engine)")
        engine = default_engine(device)
    elif device is not None and torch.device(device) != engine.device:
        raise ValueError(f"device {device} differs from the copy engine's {engine.device}")
    if prefetch is None:
        prefetch = budget.max_resident_blocks - 1
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")

    on_device = sorted({str(t.device) for t in list(blocks.parameters()) + list(blocks.buffers())
                        if t.device == engine.device and engine.device.type != "cpu"})
    if on_device:
        logger.warning("%s: its blocks are already on %s; the input model keeps them there as long as it is held "
                       "(streaming saves device memory only for a model loaded in host memory)", name, on_device[0])
    shared = _shared_tensors(module)
    if shared:
        raise ValueError(f"{name}: {shared} tensor(s) or module(s) are shared between blocks or with the "
                         f"embeddings/head; block streaming needs every block to own its weights")
    new = _own_copy(module)
    inside = {id(t) for blk in new.blocks for t in list(blk.parameters()) + list(blk.buffers())}
    for mod in new.modules():
        for pname, p in mod._parameters.items():
            if p is not None and id(p) not in inside:
                p.data = p.data.to(engine.device)
        for bname, b in list(mod._buffers.items()):
            if b is not None and id(b) not in inside:
                mod._buffers[bname] = b.to(engine.device)
    streamer = BlockStreamer(new, new.blocks, budget, engine, name, prefetch)
    budget._streamers.add(streamer)
    object.__setattr__(new, "_block_streamer", streamer)
    if callable(getattr(new, "text_cache", None)):
        object.__setattr__(new, "text_cache", lambda: _no_text_cache(new))
    logger.info("%s", streamer.status())
    return new
