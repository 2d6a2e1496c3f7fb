"""The prompt queue and history of `twinflow serve`, with ComfyUI's shapes (execution.PromptQueue).

A queue item is ComfyUI's 5-tuple `[number, prompt_id, prompt, extra_data, outputs_to_execute]`, ordered by
`number` (a prompt sent with `"front": true` gets a negative number). Differences on purpose:
- the queue has a bound: `put` raises `QueueFull` (the HTTP layer answers 503 with the reason);
- a prompt id is used once: a second prompt with an id that is queued, running or in the history is refused;
- a prompt deleted from the queue (or wiped by `clear`) gets a history entry saying so, so a client waiting
  for it learns its fate instead of waiting forever.
Thread-safe: HTTP handlers (event loop thread) and the worker thread share it.
"""
from __future__ import annotations

import copy
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# extra_data keys ComfyUI never keeps in the history (API keys of Comfy-org nodes)
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class QueueFull(Exception):
    """The bounded queue has no room; the message says how many prompts are pending."""


class DuplicatePromptId(Exception):
    """A prompt id that is already queued, running or in the history."""


@dataclass(order=True)
class QueueItem:
    number: float
    seq: int  # FIFO among equal numbers
    prompt_id: str = field(compare=False)
    prompt: dict = field(compare=False)  # the API prompt as received (after UI conversion)
    extra_data: dict = field(compare=False)
    outputs: list = field(compare=False)
    validated: Any = field(compare=False, repr=False)  # runner.validate.ValidatedPrompt
    queued_at: float = field(compare=False, default_factory=time.monotonic)

    def as_list(self) -> list:
        """ComfyUI's `[number, prompt_id, prompt, extra_data, outputs_to_execute]`."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts (a heap), the running one, and the history (insertion-ordered, bounded)."""

    def __init__(self, max_pending: int = 64, max_history: int = 10000,
                 on_change: Optional[Callable[[], None]] = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        self.max_history = max_history
        self._on_change = on_change or (lambda: None)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[QueueItem] = []
        self._running: dict[str, QueueItem] = {}
        self._history: dict[str, dict] = {}
        self._seq = itertools.count()
        self._number = 0
        self._closed = False
        self.flags: dict = {}

    # -------------------------------------------------------------------------------------- producers
    def next_number(self, front: bool = False) -> float:
        with self._lock:
            n = self._number
            self._number += 1
            return -n if front else n

    def put(self, number: float, prompt_id: str, prompt: dict, extra_data: dict, outputs: list, validated) -> QueueItem:
        with self._lock:
            if self.known(prompt_id):
                raise DuplicatePromptId(f"prompt_id {prompt_id!r} is already queued, running or in the history; "
                                        f"send a new id (or none, and the server makes one)")
            if len(self._heap) >= self.max_pending:
                raise QueueFull(f"the queue is full ({len(self._heap)} prompts pending, limit {self.max_pending}); "
                                f"retry after some finish (see GET /queue) or start the server with a larger "
                                f"--max-queue")
            item = QueueItem(number, next(self._seq), prompt_id, prompt, extra_data, outputs, validated)
            heapq.heappush(self._heap, item)
            self._cond.notify()
        self._on_change()
        return item

    def known(self, prompt_id: str) -> bool:
        with self._lock:
            return (prompt_id in self._history or prompt_id in self._running
                    or any(i.prompt_id == prompt_id for i in self._heap))

    # ---------------------------------------------------------------------------------------- worker
    def get(self, timeout: Optional[float] = None) -> Optional[QueueItem]:
        """The next item (moved to running), or None after `timeout` seconds, a flag, or `close()`."""
        with self._cond:
            if not self._heap and not self._closed and not self.flags:
                self._cond.wait(timeout)
            if not self._heap or self._closed:
                return None
            item = heapq.heappop(self._heap)
            self._running[item.prompt_id] = item
        self._on_change()
        return item

    def task_done(self, item: QueueItem, outputs: dict, status: dict, meta: Optional[dict] = None) -> None:
        """Move a running item to the history with ComfyUI's entry shape."""
        with self._lock:
            self._running.pop(item.prompt_id, None)
            self._record(item, outputs, status, meta or {})
        self._on_change()

    def _record(self, item: QueueItem, outputs: dict, status: dict, meta: dict) -> None:
        while len(self._history) >= self.max_history:
            self._history.pop(next(iter(self._history)))
        extra = {k: v for k, v in item.extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        self._history[item.prompt_id] = {
            "prompt": [item.number, item.prompt_id, item.prompt, extra, item.outputs],
            "outputs": outputs,
            "status": status,
            "meta": meta,
        }

    def set_flag(self, name: str, value) -> None:
        with self._cond:
            self.flags[name] = value
            self._cond.notify()

    def take_flags(self) -> dict:
        with self._lock:
            flags, self.flags = self.flags, {}
            return flags

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -------------------------------------------------------------------------------- queries, edits
    def running(self) -> list[QueueItem]:
        with self._lock:
            return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        with self._lock:
            return sorted(self._heap)

    def remaining(self) -> int:
        with self._lock:
            return len(self._heap) + len(self._running)

    def delete(self, prompt_id: str) -> Optional[QueueItem]:
        """Remove a pending prompt; returns it (None if it is not pending)."""
        with self._lock:
            for i, item in enumerate(self._heap):
                if item.prompt_id == prompt_id:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    break
            else:
                return None
        self._on_change()
        return item

    def wipe(self) -> list[QueueItem]:
        with self._lock:
            items, self._heap = list(self._heap), []
        self._on_change()
        return items

    def record_cancelled(self, item: QueueItem, status: dict) -> None:
        """History entry for a prompt removed before it ran."""
        with self._lock:
            self._record(item, {}, status, {})

    def history(self, prompt_id: Optional[str] = None, max_items: Optional[int] = None, offset: int = -1) -> dict:
        """ComfyUI's `get_history`: one entry by id ({} when unknown), or a slice in insertion order."""
        with self._lock:
            if prompt_id is not None:
                entry = self._history.get(prompt_id)
                return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}
            keys = list(self._history)
            if offset < 0 and max_items is not None:
                offset = len(keys) - max_items
            keys = keys[max(offset, 0):]
            if max_items is not None:
                keys = keys[:max_items]
            return {k: copy.deepcopy(self._history[k]) for k in keys}

    def delete_history(self, prompt_id: str) -> None:
        with self._lock:
            self._history.pop(prompt_id, None)

    def wipe_history(self) -> None:
        with self._lock:
            self._history.clear()
