"""On-disk artifact cache for compiled sub-graphs: keyed by everything that must invalidate an artifact.

Layout: `<root>/<key>/` holds the artifact files and `meta.json` (the key parts, a sha256 of every
file, size, created/last-used times). Writes are atomic (build into `<root>/.tmp-<key>-<pid>/`, then
`os.rename`; a builder that dies leaves only that hidden folder, removed by the next build of the key),
a checksum mismatch is treated as a miss (rebuilt with a warning), and the total size is capped with
least-recently-used eviction.

One build per key: the builder holds `<root>/.<key>.lock`, a file created exclusively that names it
(pid, host, start time) and whose mtime it refreshes every few seconds. Other processes wait for it
and then load its entry. A lock is stale, and is taken over, when its pid is gone (same host) or its
heartbeat is older than `LOCK_STALE_S` (a builder on another host that died, or one frozen so hard its
heartbeat stopped). Works on any OS and on network filesystems without fcntl locks. Two builds of one
key can still happen after a wrongly broken lock; the atomic publish keeps the entry whole either way.

Root: `$TWINFLOW_CACHE_DIR`, else `set_cache_root()`, else inside ComfyUI `<models>/twinflow/compile`,
else `$XDG_CACHE_HOME/twinflow/compile` (`~/.cache/twinflow/compile`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .probe import package_version

logger = logging.getLogger(__name__)

SCHEMA = 2  # 2: AOTInductor packages fold weight-derived constants at load time, not build time
LOCK_STALE_S = 120.0  # a build lock whose heartbeat is older than this is taken over
LOCK_HEARTBEAT_S = 5.0
LOCK_POLL_S = 0.2
DEFAULT_MAX_BYTES = 20 * 2 ** 30
_root_override: Optional[Path] = None


def set_cache_root(path) -> None:
    """Host hook (the ComfyUI adapter, tests): where the cache lives (None: the default)."""
    global _root_override
    _root_override = Path(path) if path is not None else None


def cache_root() -> Path:
    env = os.environ.get("TWINFLOW_CACHE_DIR")
    if env:
        return Path(env)
    if _root_override is not None:
        return _root_override
    fp = sys.modules.get("folder_paths")  # only present when running inside ComfyUI
    if fp is not None and getattr(fp, "models_dir", None):
        return Path(fp.models_dir) / "twinflow" / "compile"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "twinflow" / "compile"


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------

def environment() -> dict:
    """What a compiled artifact depends on beyond the graph: library versions and the device."""
    env = {
        "schema": SCHEMA,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton") or package_version("pytorch-triton"),
        "torch_tensorrt": package_version("torch-tensorrt"),
        "tensorrt": package_version("tensorrt-cu13") or package_version("tensorrt"),
        "device": "cpu",
        "capability": None,
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        env["device"] = torch.cuda.get_device_name(idx)
        env["capability"] = list(torch.cuda.get_device_capability(idx))
    return env


def _canon(value):
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_canon(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # dtypes, devices, enums


def cache_key(*, graph: str, dtypes, profile, backend: str, options: Optional[dict] = None,
              quant: Optional[str] = None, kernels: Optional[str] = None, env: Optional[dict] = None,
              weights: Optional[str] = None) -> tuple[str, dict]:
    """(hex key, the parts) for an artifact. `weights` only when the artifact bakes the weights in."""
    profile_part = profile.to_dict() if hasattr(profile, "to_dict") else profile
    parts = {"graph": graph, "dtypes": dtypes, "profile": profile_part, "backend": backend,
             "options": options or {}, "quant": quant, "kernels": kernels,
             "env": env if env is not None else environment()}
    if weights is not None:
        parts["weights"] = weights
    blob = json.dumps(_canon(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32], _canon(parts)


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------

@dataclass
class Entry:
    key: str
    path: Path
    hit: bool
    meta: dict
    build_s: float = 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != "meta.json")


class ArtifactCache:
    """Directory cache of compiled artifacts (see the module docstring)."""

    def __init__(self, root=None, max_bytes: int = DEFAULT_MAX_BYTES, lock_stale_s: float = LOCK_STALE_S):
        self.root = Path(root) if root is not None else cache_root()
        self.max_bytes = int(max_bytes)
        self.lock_stale_s = float(lock_stale_s)

    # -- locking ------------------------------------------------------------------------------
    @contextmanager
    def _lock(self, key: str):
        """Hold the build lock of `key` (see the module docstring); waits while another live builder has it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = BuildLock(self.root / f".{key}.lock", stale_s=self.lock_stale_s)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # -- lookup -------------------------------------------------------------------------------
    def _valid(self, key: str) -> Optional[dict]:
        """The entry's meta if present and intact; a corrupt entry is removed with a warning."""
        d = self.root / key
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            if d.exists():
                logger.warning("compile cache: entry %s has no meta.json (interrupted write?); rebuilding", d)
                shutil.rmtree(d, ignore_errors=True)
            return None
        try:
            meta = json.loads(meta_path.read_text())
            sums = meta["files"]
            ok = set(sums) == {p.relative_to(d).as_posix() for p in _files(d)} and all(
                _sha256(d / name) == digest for name, digest in sums.items())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ok, meta = False, {"error": str(exc)}
        if not ok:
            logger.warning("compile cache: entry %s is corrupt (checksum mismatch or unreadable meta); "
                           "removing it and rebuilding", d)
            shutil.rmtree(d, ignore_errors=True)
            return None
        return meta

    def lookup(self, key: str) -> Optional[Entry]:
        meta = self._valid(key)
        if meta is None:
            return None
        self._touch(key, meta)
        return Entry(key, self.root / key, True, meta)

    def _touch(self, key: str, meta: dict) -> None:
        # last use lives in its own file so the checksummed meta.json is never rewritten
        try:
            (self.root / f".{key}.used").write_text(str(time.time()))
        except OSError:
            pass

    def contains(self, key: str) -> bool:
        return (self.root / key / "meta.json").is_file()

    # -- build --------------------------------------------------------------------------------
    def get_or_build(self, key: str, build: Callable[[Path], Optional[dict]], parts: Optional[dict] = None,
                     label: str = "") -> Entry:
        """Return the entry for `key`, calling `build(tmp_dir)` (which writes the artifact files and may
        return extra meta) under the key's lock if it is missing or corrupt."""
        entry = self.lookup(key)
        if entry is not None:
            return entry
        with self._lock(key):
            entry = self.lookup(key)  # another process may have built it while we waited
            if entry is not None:
                return entry
            self._remove_orphans(key)
            tmp = self.root / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            t0 = time.perf_counter()
            final = self.root / key
            try:
                extra = build(tmp) or {}
                files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in _files(tmp)}
                size = sum(p.stat().st_size for p in _files(tmp))
                build_s = time.perf_counter() - t0
                meta = {"schema": SCHEMA, "key": key, "label": label, "parts": parts or {}, "files": files,
                        "bytes": size, "created": time.time(), "build_s": build_s, **extra}
                tmp_meta = tmp / "meta.json.part"
                tmp_meta.write_text(json.dumps(meta, indent=1, default=str))
                os.replace(tmp_meta, tmp / "meta.json")
                if self._valid(key) is not None:  # published meanwhile by a builder whose lock we took over
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self.lookup(key)
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._touch(key, meta)
            logger.info("compile cache: built %s (%s) in %.1f s, %.1f MB", key, label or "artifact", build_s,
                        size / 1e6)
        self.evict(keep=key)
        return Entry(key, final, False, meta, build_s)

    def _remove_orphans(self, key: str) -> None:
        """Build folders of `key` left by builders that died (their pid is gone); called under the lock."""
        for p in self.root.glob(f".tmp-{key}-*"):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                logger.info("compile cache: removing %s left by a builder that died (pid %d)", p, pid)
                shutil.rmtree(p, ignore_errors=True)

    # -- listing / eviction ---------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Every intact-looking entry: key, label, bytes, created, last_used (oldest use first)."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            if d.name.startswith(".") or not (d / "meta.json").is_file():
                continue
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            used = self.root / f".{d.name}.used"
            try:
                last = float(used.read_text())
            except (OSError, ValueError):
                last = float(meta.get("created", 0))
            out.append({"key": d.name, "label": meta.get("label", ""), "bytes": int(meta.get("bytes", 0)),
                        "created": meta.get("created"), "last_used": last,
                        "backend": (meta.get("parts") or {}).get("backend")})
        return sorted(out, key=lambda e: e["last_used"])

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)
        try:  # the lock file is its holder's to remove: another process may be building this key now
            (self.root / f".{key}.used").unlink()
        except OSError:
            pass

    def evict(self, keep: Optional[str] = None) -> list[str]:
        """Remove least-recently-used entries until the total is under `max_bytes`."""
        entries = self.entries()
        total = sum(e["bytes"] for e in entries)
        removed = []
        for e in entries:
            if total <= self.max_bytes:
                break
            if e["key"] == keep:
                continue
            self.remove(e["key"])
            total -= e["bytes"]
            removed.append(e["key"])
            logger.info("compile cache: evicted %s (%s, %.1f MB) to stay under %.1f GB", e["key"], e["label"],
                        e["bytes"] / 1e6, self.max_bytes / 1e9)
        return removed

    def clear(self) -> int:
        n = 0
        for e in self.entries():
            self.remove(e["key"])
            n += 1
        if self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        return n


# ----------------------------------------------------------------------------------------------
# The build lock
# ----------------------------------------------------------------------------------------------

_HOST = socket.gethostname()
_WINDOWS = os.name == "nt"


def _pid_alive(pid: int) -> bool:
    if _WINDOWS:  # os.kill(pid, 0) would terminate the process there: the heartbeat lease alone decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: treat as alive
    return True


class BuildLock:
    """An exclusive lock file with a heartbeat and stale-lock takeover (see the module docstring)."""

    def __init__(self, path: Path, stale_s: float = LOCK_STALE_S, heartbeat_s: float = LOCK_HEARTBEAT_S,
                 poll_s: float = LOCK_POLL_S):
        self.path = Path(path)
        self.stale_s, self.heartbeat_s, self.poll_s = stale_s, heartbeat_s, poll_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _read(self) -> tuple[Optional[dict], Optional[float]]:
        """(holder info or None if unreadable, age of the heartbeat in s or None if the file is gone)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            info = json.loads(self.path.read_text())
            return (info if isinstance(info, dict) else None), age
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, age

    def _stale(self, info: Optional[dict], age: float) -> Optional[str]:
        if info is None:  # created but never written: its creator died at once (or is writing it right now)
            return "unreadable lock file" if age > 5.0 else None
        pid, host = info.get("pid"), info.get("host")
        if host == _HOST and isinstance(pid, int) and not _pid_alive(pid):
            return f"builder pid {pid} is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s from pid {pid} on {host}"
        return None

    def acquire(self) -> None:
        waited_since = None
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info, age = self._read()
                if age is None:
                    continue  # released just now: try again at once
                why = self._stale(info, age)
                if why:
                    self._take_over(info, why)
                    continue
                if waited_since is None:
                    waited_since = time.monotonic()
                    logger.warning("compile cache: waiting for pid %s on %s, which is building this artifact "
                                   "(%s)", (info or {}).get("pid"), (info or {}).get("host"), self.path.name)
                time.sleep(self.poll_s)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": _HOST, "started": time.time(), "token": self.token}, f)
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="twinflow-cache-lock", daemon=True)
            self._beat.start()
            return

    def _take_over(self, seen: Optional[dict], why: str) -> None:
        """Remove a stale lock, making sure it is the one judged stale (a fresh one may have replaced it)."""
        moved = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # someone else removed it first
        try:
            now = json.loads(moved.read_text())
        except (OSError, ValueError):
            now = None
        if now != seen:  # we moved a fresh lock: put it back unless a newer one exists
            try:
                os.link(moved, self.path)
            except OSError:
                pass
        else:
            logger.warning("compile cache: taking over the build lock %s (%s)", self.path.name, why)
        try:
            moved.unlink()
        except OSError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=1.0)
        info, _age = self._read()
        if info is not None and info.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError:
                pass
