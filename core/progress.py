"""Progress and interrupt API used by every long loop (sampling steps, VAE chunks, compile builds).

Library code does:

    with Progress(total=steps, desc="sampling") as bar:
        for i in range(steps):
            check_interrupt()
            ...
            bar.update(1)

The host installs a backend: the headless CLI draws tqdm bars; inside ComfyUI the adapter maps onto
`comfy.utils.ProgressBar` (which also raises ComfyUI's interrupt). With no backend nothing is drawn.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Protocol

from .errors import Interrupted


class _BarBackend(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


# backend factory: (total, desc, node_id) -> object with update(n) and close()
_backend: Optional[Callable[[int, str, Optional[str]], _BarBackend]] = None
_interrupt = threading.Event()
_extra_interrupt_checks: list[Callable[[], None]] = []
_current_node = threading.local()


def set_backend(factory) -> None:
    """Install the bar factory `(total, desc, node_id) -> bar` (None: no bars)."""
    global _backend
    _backend = factory


def add_interrupt_check(fn: Callable[[], None]) -> None:
    """Register a host callback that raises if the host wants to stop (e.g. ComfyUI's interrupt)."""
    if fn not in _extra_interrupt_checks:
        _extra_interrupt_checks.append(fn)


def remove_interrupt_check(fn: Callable[[], None]) -> None:
    """Unregister a callback added with `add_interrupt_check` (no error if it is not registered)."""
    if fn in _extra_interrupt_checks:
        _extra_interrupt_checks.remove(fn)


def request_interrupt() -> None:
    """Ask every running loop to stop at its next `check_interrupt()`."""
    _interrupt.set()


def clear_interrupt() -> None:
    _interrupt.clear()


def check_interrupt() -> None:
    """Raise `Interrupted` if the user asked to stop; call between steps of long loops."""
    if _interrupt.is_set():
        raise Interrupted("interrupted by the user")
    for fn in _extra_interrupt_checks:
        fn()


def set_current_node(node_id: Optional[str]) -> None:
    """The runner tells which node is executing, so bars can be attributed to it."""
    _current_node.value = node_id


def current_node() -> Optional[str]:
    return getattr(_current_node, "value", None)


class Progress:
    """A progress bar over `total` units of work; also checks for interrupts on every update."""

    def __init__(self, total: int, desc: str = "", node_id: Optional[str] = None):
        self.total = int(total)
        self.n = 0
        self.desc = desc
        node = node_id if node_id is not None else current_node()
        self._bar = _backend(self.total, desc, node) if _backend is not None else None

    def update(self, n: int = 1, preview=None) -> None:
        """Advance by `n`; `preview` (e.g. the sampler's denoised latent) goes to a backend that shows
        previews (one with a `preview(value)` method); others ignore it."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if preview is not None and hasattr(self._bar, "preview"):
                self._bar.preview(preview)
        check_interrupt()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
