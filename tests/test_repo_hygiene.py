"""No file of the repository names a path of one particular machine (a home directory, a fixed checkout):
code, docs and tests must work in any checkout."""
import re
import subprocess
from pathlib import Path

import twinflow

ROOT = Path(twinflow.__file__).resolve().parent
# Built from parts so that this file does not match itself.
_HOMES = "|".join(["wo" + "rk", "ro" + "ot", "ho" + "me", "Us" + "ers"])
MACHINE_PATH = re.compile(r"(?<![\w.~$}-])/(?:" + _HOMES + r")/|\b[A-Za-z]:\\\\?(?:" + _HOMES + r")\\")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", "output", ".cache", ".hypothesis", ".pytest_cache"}


def _files() -> list:
    """The tracked files (git), or every file under the package root outside build/venv folders."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=60).stdout
        files = [ROOT / f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*")
                 if p.is_file() and not any(part in SKIP_DIRS or part.startswith(".venv") or part.endswith(".egg-info")
                                            for part in p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file()]


def test_the_pattern_catches_machine_paths():
    for bad in ("cd /" + "work/main && x", "open('/" + "root/.cache/x')", "see /" + "home/me/ckpt",
                "C:\\" + "Users\\me\\x"):
        assert MACHINE_PATH.search(bad), bad
    for fine in ("https://github.com/" + "home/x", "~/" + "work/x", "$HOME/x", "tests/fixtures/reference/a.tsv",
                 "../shared/STYLE.md", "/tmp/x", "${ROOT}/" + "home/x"):
        assert not MACHINE_PATH.search(fine), fine


def test_no_machine_paths_in_the_repository():
    files = _files()
    assert any(f.name == "pyproject.toml" for f in files) and len(files) > 50  # the listing found the repo
    hits = []
    for f in files:
        data = f.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (images)
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "absolute paths of one machine (use paths relative to the file or the repo):\n" + "\n".join(hits)
