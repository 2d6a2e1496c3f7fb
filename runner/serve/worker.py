"""The worker thread of `twinflow serve`: runs queued prompts one at a time with the runner's Executor.

The executor is synchronous, so it runs here, off the event loop. What it reports is turned into
ComfyUI's WebSocket messages (`execution_start`, `execution_cached`, `executing`, `progress`, `executed`,
`execution_success` / `execution_error` / `execution_interrupted`, then `executing` with node None once
the history entry is written) through `send(event, data, sid)`, which must be thread-safe.

Cancel and timeout are cooperative, like ComfyUI's interrupt: a check registered with
`core.progress.add_interrupt_check` raises between nodes and at every progress step of the running
prompt. One Executor is kept for the server's life, so prompts get the runner's execution-cache
semantics (only nodes whose inputs changed re-run); loaders answer from the model LRU (serve/models.py).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from typing import Callable, Optional

from ...core import progress
from ...core.errors import Interrupted, WorkflowError
from ..executor import Executor, NodeExecutionError
from .models import ModelCache
from .queue import PromptQueue, QueueItem

logger = logging.getLogger(__name__)

GC_INTERVAL_S = 10.0  # as ComfyUI's prompt worker: collect at most this often after prompts


class PromptTimeout(Interrupted):
    """The running prompt passed the server's per-prompt time limit."""


class _NullBar:
    def update(self, n):
        pass

    def close(self):
        pass


class _RelayBar:
    """A progress bar whose updates become ComfyUI `progress` messages of the running prompt."""

    def __init__(self, worker: "Worker", total: int, node_id):
        self.worker, self.total, self.node_id, self.value = worker, max(int(total), 1), node_id, 0

    def update(self, n):
        self.value = min(self.value + n, self.total)
        self.worker._progress(self.value, self.total, self.node_id)

    def preview(self, latent):
        self.worker._preview(latent)

    def close(self):
        pass


def _ms() -> int:
    return int(time.time() * 1000)


class Worker:
    """Owns the Executor and executes queue items in one thread."""

    def __init__(self, registry: dict, queue: PromptQueue, send: Callable, *, model_cache: ModelCache,
                 prompt_timeout: float = 0.0, warmup=None, previews: bool = False):
        self.registry = registry
        self.queue = queue
        self.send = send
        self.model_cache = model_cache
        self.prompt_timeout = float(prompt_timeout or 0.0)
        self.executor = Executor(registry)
        self.warmup = warmup  # (ValidatedPrompt, prompt, temp folder) or None
        self.previews = previews
        self.ready = warmup is None
        self.not_ready_reason = "running the warm-up workflow" if warmup is not None else ""
        self.last_node_id: Optional[str] = None
        self.prompts_done = 0
        self._current: Optional[QueueItem] = None
        self._cancel: Optional[str] = None
        self._deadline: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._last_gc = 0.0
        self._prev_backend = None

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._prev_backend = progress._backend
        progress.set_backend(self._bar)
        progress.add_interrupt_check(self._check)
        self._thread = threading.Thread(target=self._loop, name="twinflow-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.queue.close()
        if self._current is not None:
            self._cancel = self._current.prompt_id
        if self._thread is not None:
            self._thread.join(timeout)
        progress.remove_interrupt_check(self._check)
        if progress._backend == self._bar:
            progress.set_backend(self._prev_backend)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def current(self) -> Optional[QueueItem]:
        return self._current

    def cancel(self, prompt_id: Optional[str] = None) -> bool:
        """Stop the running prompt (any, or only `prompt_id`) at its next check; False if it is not running."""
        cur = self._current
        if cur is None or (prompt_id is not None and cur.prompt_id != prompt_id):
            return False
        self._cancel = cur.prompt_id
        return True

    # --------------------------------------------------------------------------------- progress hooks
    def _in_worker(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread.ident

    def _bar(self, total, desc, node_id):
        if self._in_worker():
            return _RelayBar(self, total, node_id)
        prev = self._prev_backend
        return prev(total, desc, node_id) if prev is not None else _NullBar()

    def _check(self) -> None:
        if not self._in_worker():
            return
        cur = self._current
        if cur is None:
            return
        if self._cancel == cur.prompt_id:
            raise Interrupted(f"prompt {cur.prompt_id} was cancelled")
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise PromptTimeout(f"prompt {cur.prompt_id} ran longer than the server's per-prompt limit of "
                                f"{self.prompt_timeout:g} s (twinflow serve --prompt-timeout) and was stopped")

    def _progress(self, value, total, node_id) -> None:
        cur = self._current
        if cur is None:
            return
        sid = cur.extra_data.get("client_id")
        self.send("progress", {"value": value, "max": total, "prompt_id": cur.prompt_id,
                               "node": node_id if node_id is not None else self.last_node_id}, sid)

    def _preview(self, latent) -> None:
        cur = self._current
        sid = cur.extra_data.get("client_id") if cur is not None else None
        if not self.previews or sid is None:
            return
        from .preview import PREVIEW_IMAGE, preview_frame

        frame = preview_frame(latent)
        if frame is not None:
            self.send(PREVIEW_IMAGE, frame[4:], sid)

    # ------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        if self.warmup is not None:
            self._run_warmup()
        while not self._stop.is_set():
            item = self.queue.get(timeout=1.0)
            if item is not None:
                self._execute(item)
            self._handle_flags()
            self._maybe_gc(item is not None)

    def _run_warmup(self) -> None:
        from ...core import paths

        validated, prompt, temp = self.warmup
        start = time.perf_counter()
        try:
            with paths.using(output_dir=temp):
                self.executor.execute(validated, original_prompt=prompt)
        except Exception as e:  # any failure: the server stays up but never reports ready
            logger.error("warm-up workflow failed: %s", e, exc_info=not isinstance(e, WorkflowError))
            self.not_ready_reason = f"the warm-up workflow failed: {e}"
            return
        logger.info("warm-up workflow done in %.2f s; ready", time.perf_counter() - start)
        self.ready, self.not_ready_reason = True, ""

    def _handle_flags(self) -> None:
        flags = self.queue.take_flags()
        free_memory = bool(flags.get("free_memory", False))
        if flags.get("unload_models", free_memory):
            n = self.model_cache.clear()
            logger.info("/free: unloaded %d cached model(s)", n)
        if free_memory:
            self.executor.clear()
            self._collect()
            logger.info("/free: cleared the execution cache")

    def _maybe_gc(self, ran: bool) -> None:
        if ran and time.monotonic() - self._last_gc > GC_INTERVAL_S:
            self._collect()

    def _collect(self) -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception as e:  # emptying a cache is best effort; say why once
            logger.debug("torch.cuda.empty_cache failed: %s", e)
        self._last_gc = time.monotonic()

    # -------------------------------------------------------------------------------------- one prompt
    def _execute(self, item: QueueItem) -> None:
        pid = item.prompt_id
        sid = item.extra_data.get("client_id")
        messages: list = []
        outputs: dict = {}
        meta: dict = {}
        executed: list = []

        def add_message(event, data, broadcast=False):
            data = {**data, "timestamp": _ms()}
            messages.append([event, data])
            if sid is not None or broadcast:
                self.send(event, data, sid)

        def listener(event, data):
            if event == "execution_cached":
                add_message("execution_cached", {"nodes": data["nodes"], "prompt_id": pid})
            elif event == "executing":
                nid = data["node"]
                self.last_node_id = nid
                executed.append(nid)
                if sid is not None:
                    self.send("executing", {"node": nid, "display_node": nid, "prompt_id": pid}, sid)
            elif event == "executed" and data["output"]:
                nid = data["node"]
                outputs[nid] = data["output"]
                meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                if sid is not None:
                    self.send("executed", {"node": nid, "display_node": nid, "output": data["output"],
                                           "prompt_id": pid}, sid)

        self._cancel = None
        self._deadline = time.monotonic() + self.prompt_timeout if self.prompt_timeout > 0 else None
        self._current = item
        start = time.perf_counter()
        add_message("execution_start", {"prompt_id": pid})
        ok = False
        try:
            self.executor.execute(item.validated, extra_pnginfo=item.extra_data.get("extra_pnginfo"),
                                  original_prompt=item.prompt, listener=listener)
            ok = True
            add_message("execution_success", {"prompt_id": pid})
        except PromptTimeout as e:
            add_message("execution_error", self._error_data(pid, item, executed, e, "TimeoutError", ""))
        except Interrupted:
            node = self.last_node_id
            add_message("execution_interrupted", {"prompt_id": pid, "node_id": node,
                                                  "node_type": self._ctype(item, node),
                                                  "executed": [n for n in executed if n != node]},
                        broadcast=True)
        except NodeExecutionError as e:
            tb = "".join(traceback.format_exception(type(e.original), e.original, e.original.__traceback__))
            if e.is_bug:
                logger.error("prompt %s: %s\n%s", pid, e, tb)
            add_message("execution_error", self._error_data(pid, item, executed, e.original,
                                                            type(e.original).__name__, tb, e.node_id))
        except Exception as e:  # a WorkflowError, or a bug outside any node: the server must keep serving
            tb = traceback.format_exc()
            if not isinstance(e, WorkflowError):
                logger.error("prompt %s failed outside a node:\n%s", pid, tb)
            add_message("execution_error", self._error_data(pid, item, executed, e, type(e).__name__, tb))
        finally:
            self._current = None
            self._cancel = None
            self._deadline = None
        status = {"status_str": "success" if ok else "error", "completed": ok, "messages": messages}
        self.queue.task_done(item, outputs, status, meta)
        self.prompts_done += 1
        self.last_node_id = None
        logger.info("prompt %s %s in %.2f s", pid, "done" if ok else "failed", time.perf_counter() - start)
        if sid is not None:
            self.send("executing", {"node": None, "prompt_id": pid}, sid)

    def _ctype(self, item: QueueItem, node) -> Optional[str]:
        n = item.prompt.get(node) if node is not None else None
        return n.get("class_type") if isinstance(n, dict) else None

    def _error_data(self, pid, item, executed, exc, exc_type, tb, node=None) -> dict:
        node = node if node is not None else self.last_node_id
        done = [n for n in executed if n != node]  # the failing node did not finish
        return {"prompt_id": pid, "node_id": node, "node_type": self._ctype(item, node), "executed": done,
                "exception_message": str(exc), "exception_type": exc_type, "traceback": tb.splitlines(),
                "current_inputs": {}, "current_outputs": done}

    def cancel_queued(self, item: QueueItem, reason: str) -> None:
        """Record a prompt removed from the queue before it ran, and tell its client it will not run."""
        sid = item.extra_data.get("client_id")
        data = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                "reason": reason, "timestamp": _ms()}
        status = {"status_str": "error", "completed": False, "messages": [["execution_interrupted", data]]}
        self.queue.record_cancelled(item, status)
        if sid is not None:
            self.send("execution_interrupted", data, sid)
            self.send("executing", {"node": None, "prompt_id": item.prompt_id}, sid)
