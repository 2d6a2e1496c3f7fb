"""Input files of the loader nodes: ComfyUI's annotated names, confinement to the input folder, listing,
and the IS_CHANGED fingerprint."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import paths


def _split_annotation(name: str) -> tuple[str, Path, str]:
    """ComfyUI's annotated names: `x.png [output]` reads the output folder, `x.png [input]` / `x.png` the input."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name must be a non-empty string, got {name!r}")
    for tag, folder, label in ((" [output]", paths.output_dir, "output"), (" [input]", paths.input_dir, "input")):
        if name.endswith(tag):
            return name[: -len(tag)], folder(), label
    return name, paths.input_dir(), "input"


def list_input_files(extensions) -> list[str]:
    """Files under the input folder with one of `extensions` (relative, `/`-separated, sorted)."""
    root = paths.input_dir()
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.lower().endswith(extensions) and not f.startswith("."):
                found.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(found)


def resolve_input(name: str, extensions, what: str) -> Path:
    """Resolve a loader's file name inside its folder; a clear error listing the folder's files otherwise."""
    rel, folder, label = _split_annotation(name)
    rel_parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or (len(rel) >= 2 and rel[1] == ":") or ".." in rel_parts:
        raise ValueError(f"{what} {name!r} must be a name inside the {label} folder ({folder}), "
                         f"not an absolute path or one with '..'")
    root = folder.resolve()
    path = (root / rel).resolve()
    try:
        path.relative_to(root)
    except ValueError:
        raise ValueError(f"{what} {name!r} resolves to {path}, outside the {label} folder {root}") from None
    if not path.is_file():
        if label == "input":
            available = list_input_files(extensions)
        else:
            available = sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
        shown = ", ".join(available[:30]) + (" ..." if len(available) > 30 else "")
        hint = f"files there: {shown}" if available else f"the {label} folder has no {what} files"
        raise FileNotFoundError(f"{what} {name!r} not found in the {label} folder {root}; {hint}. "
                                f"Put the file there (or set --input-dir / TWINFLOW_INPUT_DIR).")
    return path


def file_fingerprint(path: Path) -> str:
    """IS_CHANGED value: sha256 of the content (size + mtime for files over 256 MiB, to stay quick)."""
    st = path.stat()
    if st.st_size > (256 << 20):
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

