"""Logging helpers: one logger per module, and messages that should be said once per process."""
import logging
import threading

_said: set = set()
_lock = threading.Lock()


def log_once(logger: logging.Logger, key, message: str, *args, level: int = logging.INFO) -> bool:
    """Log `message` the first time `key` is seen in this process; return whether it was logged."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    logger.log(level, message, *args)
    return True


def forget_once(prefix=None) -> None:
    """Forget keys logged by `log_once` (all, or those tuples/strings starting with `prefix`); for tests."""
    with _lock:
        if prefix is None:
            _said.clear()
            return
        for key in list(_said):
            head = key[0] if isinstance(key, tuple) else key
            if isinstance(head, str) and head.startswith(prefix):
                _said.discard(key)
