"""Imports run one way (docs/DEVELOPING.md): read every .py file's imports with `ast` and check the rule.

Every import counts, at module level or inside a function (a lazy import is still an import); relative
imports are resolved against the file's package, `twinflow.<...>` absolute imports too. Fails on
  * a library folder importing `nodes`, `runner`, `comfy_adapter` or `server`, or ComfyUI itself
    (its top-level modules `comfy`, `folder_paths`, `server`, ... imported absolutely);
  * any cycle between top-level folders (the root `__init__.py` counts as a folder, `<root>`),
printing the offending file:line of every import involved. The checker is unit-tested on small synthetic
trees that reproduce each cycle the project once had.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "twinflow"
ROOT = "<root>"  # the folder name of the package's own __init__.py
# Library folders; a name here whose folder does not exist (yet) is simply never matched (`kernels/` is being
# renamed `fused/`, `media/` is being split out of nodes/io.py).
LIBRARY = ("core", "models", "sampling", "quant", "compiled", "kernels", "fused", "media")
HOSTS = ("nodes", "runner", "comfy_adapter", "server")  # the app-level folders the library must never import
COMFYUI = ("comfy", "comfy_extras", "folder_paths", "server", "execution", "nodes_comfy")
SKIP_DIRS = {"tests", "docs", "workflows", "__pycache__"}


def _files(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p.startswith(".") or p in SKIP_DIRS for p in rel.parts[:-1]):
            continue
        yield rel


def _package_of(rel: Path) -> list:
    """The package a file's relative imports start from: its folder parts (an __init__ is its own package)."""
    return list(rel.parts[:-1])


def _folder(parts: list, root: Path) -> str:
    """Top-level folder of a module path inside the package (the root __init__ itself is ROOT)."""
    if not parts:
        return ROOT
    head = parts[0]
    if (root / head).is_dir() or (root / f"{head}.py").is_file():
        return head
    return ROOT  # a name defined in the root __init__ (e.g. `from .. import __version__`)


def imports_of(root: Path, rel: Path) -> list:
    """[(line, kind, target)] for one file: kind "pkg" (target = top-level folder) or "ext" (top-level name)."""
    tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel))
    out = []
    pkg = _package_of(rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    out.append((node.lineno, "pkg", _folder(parts[1:], root)))
                else:
                    out.append((node.lineno, "ext", parts[0]))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module.split(".") if node.module else []
            if node.level == 0:
                if mod and mod[0] == PACKAGE:
                    base = mod[1:]
                else:
                    out.append((node.lineno, "ext", mod[0]))
                    continue
            else:
                if node.level - 1 > len(pkg):
                    raise ValueError(f"{rel}:{node.lineno}: relative import goes above the package")
                base = pkg[:len(pkg) - (node.level - 1)] + mod
            if base:
                out.append((node.lineno, "pkg", _folder(base, root)))
            else:  # `from .. import nodes, __version__`: each name may be a folder or a root attribute
                for alias in node.names:
                    out.append((node.lineno, "pkg", _folder([alias.name], root)))
    return out


def folder_edges(root: Path) -> dict:
    """{(from folder, to folder): ["file:line", ...]} for every import between different top-level folders."""
    edges: dict = {}
    for rel in _files(root):
        src = _folder(list(rel.parts[:-1]) if rel.name == "__init__.py" else list(rel.with_suffix("").parts), root)
        for line, kind, target in imports_of(root, rel):
            if kind == "pkg" and target != src:
                edges.setdefault((src, target), []).append(f"{rel.as_posix()}:{line}")
    return edges


def wrong_way(root: Path) -> list:
    """'file:line: library folder X imports Y' for every library -> host / ComfyUI import."""
    bad = []
    for rel in _files(root):
        src = _folder(list(rel.parts[:-1]) if rel.name == "__init__.py" else list(rel.with_suffix("").parts), root)
        if src not in LIBRARY:
            continue
        for line, kind, target in imports_of(root, rel):
            if (kind == "pkg" and target in HOSTS) or (kind == "ext" and target in COMFYUI):
                bad.append(f"{rel.as_posix()}:{line}: library folder {src}/ imports {target}")
    return bad


def cycles(edges: dict) -> list:
    """Strongly connected groups of folders (Tarjan), each as (sorted folders, ["A -> B at file:line", ...])."""
    graph: dict = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, on, stack, groups, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        where = [f"{a} -> {b} at {', '.join(sites)}" for (a, b), sites in sorted(edges.items())
                 if a in group and b in group]
        out.append((group, where))
    return out


def report(root: Path) -> list:
    """Every problem as printable lines (empty = the rule holds)."""
    lines = wrong_way(root)
    for group, where in cycles(folder_edges(root)):
        lines.append(f"import cycle between folders {', '.join(group)}:")
        lines += [f"    {w}" for w in where]
    return lines


# ------------------------------------------------------------------------------------------------
# The real tree
# ------------------------------------------------------------------------------------------------

def test_library_never_imports_hosts_and_folders_have_no_cycles():
    problems = report(REPO)
    assert not problems, "imports must run one way (docs/DEVELOPING.md):\n" + "\n".join(problems)


def test_the_checker_sees_this_repository():
    edges = folder_edges(REPO)
    # the runner uses the nodes and the library; the root entry point uses the nodes
    assert ("runner", "nodes") in edges and ("nodes", "core") in edges and (ROOT, "nodes") in edges


# ------------------------------------------------------------------------------------------------
# The checker on synthetic trees: each cycle this project once had is found, with file:line
# ------------------------------------------------------------------------------------------------

def _tree(tmp_path: Path, files: dict) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    for d in {p.parent for p in root.rglob("*.py")} | {root}:
        (d / "__init__.py").touch()
    return root


def _base(tmp_path, extra: dict) -> Path:
    files = {"core/errors.py": "X = 1\n", "models/loading.py": "from ..core.errors import X\n",
             "nodes/dit.py": "from ..models import loading\n", "runner/cli.py": "from ..nodes import dit\n",
             "comfy_adapter/models.py": "from ..core import errors\n", "__init__.py": "from .nodes import dit\n"}
    files.update(extra)
    return _tree(tmp_path, files)


def test_checker_clean_tree_has_no_problems(tmp_path):
    assert report(_base(tmp_path, {})) == []


def _one_cycle(root, folders):
    found = cycles(folder_edges(root))
    assert [g for g, _ in found] == [sorted(folders)], found
    return "\n".join(found[0][1])


def test_checker_finds_nodes_comfy_adapter_cycle_through_lazy_import(tmp_path):
    root = _base(tmp_path, {
        "comfy_adapter/models.py": "import torch\n\ndef rebuild():\n    from ..nodes.dit import wan_denoiser\n",
        "nodes/sampling.py": "from ..comfy_adapter.models import as_denoiser\n"})
    where = _one_cycle(root, ["nodes", "comfy_adapter"])
    assert "comfy_adapter -> nodes at comfy_adapter/models.py:4" in where
    assert "nodes -> comfy_adapter at nodes/sampling.py:1" in where


def test_checker_finds_models_quant_cycle(tmp_path):
    root = _base(tmp_path, {
        "models/wan_dit.py": "def _load():\n    if True:\n        from ..quant import checkpoint as q\n",
        "quant/checkpoint.py": "from ..models import loading\n"})
    where = _one_cycle(root, ["models", "quant"])
    assert "models -> quant at models/wan_dit.py:3" in where and "quant -> models at quant/checkpoint.py:1" in where


def test_checker_finds_compiled_runner_cycle_and_the_wrong_way_import(tmp_path):
    root = _base(tmp_path, {
        "compiled/cli.py": "def _plan(args):\n    from ..runner.formats import load_workflow\n",
        "runner/cli.py": "def run():\n    from ..compiled.plan import with_compile_nodes\n",
        "compiled/plan.py": "X = 1\n", "runner/formats.py": "X = 1\n"})
    where = _one_cycle(root, ["compiled", "runner"])
    assert "compiled -> runner at compiled/cli.py:2" in where and "runner -> compiled at runner/cli.py:2" in where
    assert wrong_way(root) == ["compiled/cli.py:2: library folder compiled/ imports runner"]


def test_checker_finds_root_runner_cycle(tmp_path):
    root = _base(tmp_path, {
        "__init__.py": "__version__ = '0'\n\ndef run_workflow():\n    from .runner.api import run\n",
        "runner/api.py": "def run():\n    pass\n",
        "runner/doctor.py": "def lines():\n    from .. import __version__\n"})
    where = _one_cycle(root, [ROOT, "runner"])
    assert f"{ROOT} -> runner at __init__.py:4" in where and f"runner -> {ROOT} at runner/doctor.py:2" in where


def test_checker_resolves_absolute_and_from_package_imports(tmp_path):
    root = _base(tmp_path, {
        "sampling/cli.py": "import twinflow.runner.cli\n",
        "kernels/ops.py": "def f():\n    from .. import nodes\n",
        "media/codecs.py": "def g():\n    import folder_paths\n",
        "quant/x.py": "from twinflow.comfy_adapter import models\n",
        "fused/ops.py": "def h():\n    from ..server import app\n", "server/app.py": "X = 1\n"})
    bad = wrong_way(root)
    assert bad == ["fused/ops.py:2: library folder fused/ imports server",
                   "kernels/ops.py:2: library folder kernels/ imports nodes",
                   "media/codecs.py:2: library folder media/ imports folder_paths",
                   "quant/x.py:1: library folder quant/ imports comfy_adapter",
                   "sampling/cli.py:1: library folder sampling/ imports runner"]


def test_checker_library_list_tolerates_absent_folders(tmp_path):
    """The real tree may lack `fused/`, `media/` or `kernels/` at any moment of the rename: no error, and the
    folders that do exist are still checked."""
    root = _base(tmp_path, {"models/x.py": "from ..runner import cli\n"})
    assert not (root / "fused").exists() and not (root / "media").exists()
    assert wrong_way(root) == ["models/x.py:1: library folder models/ imports runner"]


def test_checker_reports_file_and_line_in_the_failure_text(tmp_path):
    root = _base(tmp_path, {"models/wan_dit.py": "from ..quant import checkpoint\n",
                            "quant/checkpoint.py": "\n\nfrom ..models import loading\n"})
    text = "\n".join(report(root))
    assert "models/wan_dit.py:1" in text and "quant/checkpoint.py:3" in text


@pytest.mark.parametrize("bad", ["from ... import x\n"])
def test_checker_refuses_an_import_above_the_package(tmp_path, bad):
    root = _base(tmp_path, {"core/bad.py": bad})
    with pytest.raises(ValueError, match="core/bad.py:1"):
        folder_edges(root)
