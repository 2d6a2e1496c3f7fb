"""Safe output writing for every saver node: confined paths, ComfyUI counters, atomic never-overwrite files.

Guarantees (see docs/io.md):
- A `filename_prefix` may name sub-folders of the output folder but never leave it: absolute paths,
  `..` parts and sub-folders that resolve (through symlinks) outside the output folder are refused.
- Names follow ComfyUI: `<prefix>_<counter:05>_.<ext>`, next counter = largest existing + 1.
- Atomic: the encoder writes a hidden temp file in the destination folder; it is fsynced and then
  hard-linked to its final name (`os.link` fails if the name exists, so nothing is ever overwritten,
  even by a concurrent writer: we then take the next counter). On any exception, KeyboardInterrupt or
  `Interrupted` the temp file is removed, so no partial file is ever left under a final name.
- All or nothing: inside `output_batch()` (the runner opens one around every node; savers that write
  several files open their own) finished files stay under their temp names until the batch ends; then
  all of them are published, or, on any error or interrupt, none (temps removed, any name already
  published by this batch unlinked again). Ctrl-C is deferred while a batch publishes or cleans up.

Usage by a saver:

    target = resolve_prefix(filename_prefix, paths.output_dir())
    with atomic_numbered(target, ".png") as out:
        image.save(out.tmp_path, format="PNG")      # the encoder writes the temp file
    out.filename, out.path                          # the published name
"""
from __future__ import annotations

import contextvars
import errno
import logging
import os
import secrets
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .log import log_once

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".twinflow-tmp-"  # hidden, never matches a `<prefix>_<counter>_` name
MAX_FILENAME = 200  # leaves room for `_00001_.ext` under the usual 255-byte limit
_MAX_TRIES = 100_000


@dataclass
class OutputTarget:
    """Where a saver writes: the real folder, the file name stem, the next counter, the sub-folder for the UI."""

    folder: Path  # resolved, inside the output folder, created
    filename: str  # file name stem (no counter, no extension)
    counter: int  # next counter to try
    subfolder: str  # `/`-separated, relative to the output folder ("" for the root), as ComfyUI reports it
    prefix: str  # the prefix after %var% substitution

    def name(self, counter: int, ext: str, batch_num: Optional[int] = None) -> str:
        stem = self.filename
        if batch_num is not None:
            stem = stem.replace("%batch_num%", str(batch_num))
        return f"{stem}_{counter:05}_{ext}"


@dataclass
class PendingOutput:
    """One file being written: the encoder writes `tmp_path`; after the `with` block `path`/`filename` are set
    (inside an `output_batch` they are provisional until the batch publishes, which may take a later counter
    if another writer took the name meanwhile; `ui_entry` dicts made from it follow)."""

    tmp_path: Path
    path: Optional[Path] = None
    filename: Optional[str] = None
    counter: Optional[int] = None
    entries: list = field(default_factory=list)  # ui dicts to keep in step with `filename`


def check_prefix(filename_prefix) -> None:
    """Every check on a `filename_prefix` that needs no folder (validation calls it before any compute)."""
    prefix = _substitute_vars(filename_prefix, 1, 1) if "%" in str(filename_prefix) else filename_prefix
    _split_prefix(prefix)


def check_output_dir(output_dir) -> None:
    """The output folder exists and is a writable folder, or can be created: else ValueError saying why.

    Nothing is left behind: creatability is tested by creating and removing a probe folder in the nearest
    existing parent."""
    root = Path(output_dir).expanduser()
    what = f"output folder {str(root)!r}"
    probe = root
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == root else f"cannot be created: {probe} is a file"
        raise ValueError(f"{what} {where}, not a folder; choose another --output-dir / TWINFLOW_OUTPUT_DIR")
    try:
        made = Path(__import__("tempfile").mkdtemp(prefix=TEMP_PREFIX, dir=probe))
    except OSError as e:
        verb = "is not writable" if probe == root else f"cannot be created in {probe}"
        raise ValueError(f"{what} {verb} ({e.strerror or e}); choose another --output-dir / "
                         f"TWINFLOW_OUTPUT_DIR") from None
    try:
        made.rmdir()
    except OSError:
        pass


def _substitute_vars(prefix: str, width: int, height: int) -> str:
    """ComfyUI's backend placeholders (`%width%`, `%height%`, `%year%` ... `%second%`)."""
    now = time.localtime()
    values = {
        "width": str(width), "height": str(height), "year": str(now.tm_year),
        "month": f"{now.tm_mon:02}", "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}", "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


def _split_prefix(filename_prefix: str) -> tuple[list[str], str]:
    """Validate a prefix and split it into (sub-folder parts, file stem); both `/` and `\\` separate."""
    if not isinstance(filename_prefix, str):
        raise TypeError(f"filename_prefix must be a string, got {type(filename_prefix).__name__}")
    bad = f"filename_prefix {filename_prefix!r}"
    control = sorted({c for c in filename_prefix if ord(c) < 32 or ord(c) == 127})
    if control:
        shown = ", ".join(repr(c) for c in control)
        raise ValueError(f"{bad} contains control character(s) {shown} (a newline, tab or NUL makes a file name "
                         f"that lists and scripts break on); use a plain name such as 'video/TwinFlow'")
    p = filename_prefix
    # Absolute in any OS's sense: `/x`, `\x`, `C:...`, `\\server\share`.
    if p.startswith(("/", "\\")) or (len(p) >= 2 and p[1] == ":"):
        raise ValueError(f"{bad} is an absolute path; outputs must stay inside the output folder. "
                         f"Use a relative prefix such as 'video/TwinFlow' (or change --output-dir).")
    parts = [q for q in p.replace("\\", "/").split("/") if q not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{bad} contains '..'; outputs must stay inside the output folder. "
                         f"Use a relative prefix such as 'video/TwinFlow' (or change --output-dir).")
    if not parts:
        raise ValueError(f"{bad} is empty; give a file name prefix such as 'TwinFlow'")
    stem = parts[-1]
    if len(stem.encode("utf-8")) > MAX_FILENAME:
        raise ValueError(f"{bad}: the file name part is longer than {MAX_FILENAME} bytes; shorten it")
    long_dirs = [q for q in parts[:-1] if len(q.encode("utf-8")) > 255]
    if long_dirs:
        raise ValueError(f"{bad}: folder name {long_dirs[0][:40]!r}... is longer than 255 bytes; shorten it")
    return parts[:-1], stem


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _counter_of(name: str, stem: str) -> Optional[int]:
    """ComfyUI's rule: `<stem>_<digits>...` (the text up to the next `_`) counts; unparsable digits count as 0."""
    n = len(stem)
    if os.path.normcase(name[:n]) != os.path.normcase(stem) or name[n:n + 1] != "_":
        return None
    try:
        return int(name[n + 1:].split("_")[0])
    except ValueError:
        return 0


def next_counter(folder: Path, stem: str) -> int:
    """Largest counter among `folder`'s files named `<stem>_<n>_...`, plus one (1 when none)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 1
    counters = [c for c in (_counter_of(name, stem) for name in names) if c is not None]
    return max(counters, default=0) + 1


def resolve_prefix(filename_prefix: str, output_dir, image_width: int = 0, image_height: int = 0) -> OutputTarget:
    """Resolve a ComfyUI-style `filename_prefix` (may hold sub-folders) inside `output_dir`.

    Creates the folder. Raises ValueError naming the prefix when it is absolute, contains `..`, or
    resolves (through symlinks) outside `output_dir`.
    """
    prefix = _substitute_vars(filename_prefix, image_width, image_height) if "%" in str(filename_prefix) else filename_prefix
    sub_parts, stem = _split_prefix(prefix)
    root = Path(output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    folder = root.joinpath(*sub_parts)

    def check(f: Path) -> Path:
        real = f.resolve()
        if not _inside(real, root):
            raise ValueError(
                f"filename_prefix {filename_prefix!r} resolves to {real}, outside the output folder {root} "
                f"(a symlink leads out of it). Use a prefix whose folders stay inside the output folder.")
        return real

    check(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a file where a folder is needed, or no permission
        raise ValueError(f"filename_prefix {filename_prefix!r}: cannot create the folder {folder} ({e}). "
                         f"Use another prefix or fix the output folder.") from None
    real = check(folder)  # re-check after creation: a symlink may have appeared meanwhile
    subfolder = "/".join(sub_parts)
    return OutputTarget(folder=real, filename=stem, counter=next_counter(real, stem), subfolder=subfolder, prefix=prefix)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    # Makes the new directory entry durable; not possible on every OS (Windows), where it is skipped.
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the file itself is already synced
    finally:
        os.close(fd)


def _make_temp(folder: Path, ext: str) -> Path:
    # Same folder as the destination so the final link/rename never crosses filesystems; keeps the
    # extension last because some encoders pick the format from it.
    # Created like an ordinary file (mode 0o666 minus the umask, as ComfyUI's outputs), unlike mkstemp's
    # 0o600, because the temp file becomes the output; O_EXCL so it never reuses an existing name.
    for _ in range(100):
        path = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{ext}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        _LIVE_TEMPS.add(path)
        return path
    raise FileExistsError(errno.EEXIST, f"could not create a temporary file in {folder}")


_LINK_UNSUPPORTED = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _publish(tmp: Path, final: Path) -> None:
    """Give the finished temp file its final name; FileExistsError if the name exists (never overwrites)."""
    try:
        os.link(tmp, final)  # atomic, and fails with EEXIST if `final` exists (even as a dangling symlink)
        return
    except FileExistsError:
        raise
    except (OSError, NotImplementedError) as e:
        if isinstance(e, OSError) and e.errno not in _LINK_UNSUPPORTED:
            raise
        log_once(logger, ("twinflow.outputs.nolink", str(final.parent)),
                 "hard links unsupported in %s (%s); publishing outputs with exclusive-create + rename",
                 final.parent, e, level=logging.WARNING)
    # Fallback: reserve the name exclusively, then atomically replace our own empty placeholder.
    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    try:
        os.replace(tmp, final)
    except BaseException:
        _remove(final)  # the placeholder is ours and empty; never leave it behind
        raise


def _remove(path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove temporary file %s: %s", path, e)
        return
    _LIVE_TEMPS.discard(path)


_LIVE_TEMPS: set = set()  # temp files this process made and has not yet published or removed


def remove_leftover_temps() -> int:
    """Remove the temp files this process created that are still there (a second Ctrl-C can land inside a
    writer's own cleanup); for a process that is ending its run. Returns how many were removed."""
    n = 0
    for path in list(_LIVE_TEMPS):
        if path.exists():
            n += 1
        _remove(path)
        _LIVE_TEMPS.discard(path)
    return n


# --- what this process has published ---------------------------------------------------------------

_published = [0]  # files published (whole, under their final names) since `reset_published_count`


def _note_published(n: int) -> None:
    _published[0] += n


def published_count() -> int:
    """How many output files this process published since the last `reset_published_count` (the CLI tells a
    user who pressed Ctrl-C after the outputs were written that they were kept, whole)."""
    return _published[0]


def reset_published_count() -> None:
    _published[0] = 0


# --- Ctrl-C deferral ---------------------------------------------------------------------------------

@contextmanager
def sigint_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and deliver it to the previous handler right
    after, so publishing or cleaning up a batch of files is never cut in half. Main thread only (elsewhere
    Python delivers no signals, so there is nothing to defer)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except (ValueError, OSError):  # no signals here (an embedded interpreter): nothing to defer
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if got:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL or previous is None:
                raise KeyboardInterrupt


# --- all-or-nothing batches --------------------------------------------------------------------------

class _Batch:
    """Finished temp files waiting to be published together (see `output_batch`)."""

    def __init__(self):
        self.pending: list = []  # (target, ext, batch_num, PendingOutput)

    def add(self, target: "OutputTarget", ext: str, batch_num, out: PendingOutput) -> None:
        counter = _free_counter(target, target.counter, ext, batch_num)
        out.counter, out.filename = counter, target.name(counter, ext, batch_num)
        out.path = target.folder / out.filename
        target.counter = counter + 1
        self.pending.append((target, ext, batch_num, out))

    def discard(self) -> None:
        for _target, _ext, _bn, out in self.pending:
            _remove(out.tmp_path)
        self.pending.clear()

    def publish(self) -> None:
        done = []
        try:
            for target, ext, batch_num, out in self.pending:
                counter = out.counter
                for _ in range(_MAX_TRIES):
                    name = target.name(counter, ext, batch_num)
                    try:
                        _publish(out.tmp_path, target.folder / name)
                    except FileExistsError:  # taken meanwhile by another writer: the next number
                        counter = _free_counter(target, counter + 1, ext, batch_num)
                        continue
                    break
                else:
                    raise FileExistsError(errno.EEXIST, f"no free file name for prefix {target.prefix!r} in "
                                          f"{target.folder} after {_MAX_TRIES} tries; use another filename_prefix")
                done.append(target.folder / name)
                if counter != out.counter:
                    out.counter, out.filename, out.path = counter, name, target.folder / name
                    target.counter = max(target.counter, counter + 1)
                    for entry in out.entries:
                        entry["filename"] = name
            for folder in {t.folder for t, _e, _b, _o in self.pending}:
                _fsync_dir(folder)
            _note_published(len(done))
        except BaseException:
            for path in done:  # ours, published a moment ago: take them back so the batch stays all-or-nothing
                _remove(path)
            raise
        finally:
            self.discard()


_current_batch: contextvars.ContextVar = contextvars.ContextVar("twinflow_output_batch", default=None)


@contextmanager
def output_batch() -> Iterator[None]:
    """Make every `atomic_numbered` file written inside the block appear together at its end, or none of
    them (on any exception, `Interrupted` or KeyboardInterrupt). Nested batches join the outermost one."""
    if _current_batch.get() is not None:
        yield
        return
    batch = _Batch()
    token = _current_batch.set(batch)
    try:
        yield
    except BaseException:
        _current_batch.reset(token)
        with sigint_deferred():
            batch.discard()
        raise
    _current_batch.reset(token)
    with sigint_deferred():
        batch.publish()


def _free_counter(target: "OutputTarget", start: int, ext: str, batch_num) -> int:
    counter = start
    while os.path.lexists(target.folder / target.name(counter, ext, batch_num)):
        counter += 1
    return counter


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Write one file atomically at the fixed `path`; yields the temp path the encoder must write.

    On a clean exit the temp file is fsynced and linked to `path`; FileExistsError (the temp file
    removed) if `path` exists. On any exception the temp file is removed and nothing appears at `path`.
    """
    final = Path(path)
    tmp = _make_temp(final.parent, final.suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        try:
            _publish(tmp, final)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"refusing to overwrite existing file {final}", str(final)) from None
        _fsync_dir(final.parent)
        _note_published(1)
    finally:
        with sigint_deferred():
            _remove(tmp)


@contextmanager
def atomic_numbered(target: OutputTarget, ext: str, batch_num: Optional[int] = None) -> Iterator[PendingOutput]:
    """Write one numbered file (`<prefix>_<counter:05>_<ext>`) atomically, never overwriting.

    Yields a PendingOutput; the encoder writes `out.tmp_path`. On a clean exit the file is published
    under the first free counter from `target.counter` on (a name taken meanwhile by another writer is
    skipped), `out.path`/`out.filename`/`out.counter` are set and `target.counter` moves past it.
    On any exception (KeyboardInterrupt included) the temp file is removed.
    """
    if not ext.startswith("."):
        raise ValueError(f"extension {ext!r} must start with '.'")
    tmp = _make_temp(target.folder, ext)
    out = PendingOutput(tmp_path=tmp)
    batch = _current_batch.get()
    if batch is not None:  # publish with the batch: the batch owns the temp file once it is finished
        try:
            yield out
            _fsync_file(tmp)
        except BaseException:
            with sigint_deferred():
                _remove(tmp)
            raise
        batch.add(target, ext, batch_num, out)
        return
    try:
        yield out
        _fsync_file(tmp)
        counter = target.counter
        for _ in range(_MAX_TRIES):
            name = target.name(counter, ext, batch_num)
            final = target.folder / name
            try:
                _publish(tmp, final)
            except FileExistsError:
                counter += 1  # taken, by an earlier run or a concurrent writer: try the next number
                continue
            break
        else:
            raise FileExistsError(errno.EEXIST, f"no free file name for prefix {target.prefix!r} in {target.folder} "
                                  f"after {_MAX_TRIES} tries; use another filename_prefix")
        _fsync_dir(target.folder)
        out.path, out.filename, out.counter = final, name, counter
        target.counter = counter + 1
        _note_published(1)
    finally:
        with sigint_deferred():
            _remove(tmp)


def ui_entry(target: OutputTarget, filename) -> dict:
    """ComfyUI's file locator for the `ui` part of a saver's result; given a PendingOutput, the dict follows
    the name its batch finally publishes."""
    if isinstance(filename, PendingOutput):
        entry = {"filename": filename.filename, "subfolder": target.subfolder, "type": "output"}
        filename.entries.append(entry)
        return entry
    return {"filename": filename, "subfolder": target.subfolder, "type": "output"}
