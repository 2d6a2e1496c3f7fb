"""GPU acceptance in one command: every GPU test and benchmark of TwinFlow within a fixed time budget.

    ./dev gpu --prepare   # here, with network: wheels the GPU host lacks (diffusers, ...) into .gpu-wheels/
    ./dev gpu --dry-run   # any machine: import every GPU code path, check the torch API gates, list the plan
    ./dev gpu             # on the CUDA host: run the plan, write gpu_report.json / gpu_report.md

The GPU host runs its own python3 and torch (never installed or upgraded here). TwinFlow is imported from
this working tree through a temporary folder holding a `twinflow` symlink to the repository root (the root
is the package); packages the host lacks come from `.gpu-wheels/`, installed with `pip --no-deps --target`
into a temporary folder. Each part runs in its own process (its own session) under a time cap: it stops
starting new cases when its cap is near and records what it skipped; a part still running at its cap is
killed and reported as stopped, with the figures it had written. Parts that no longer fit in the total
budget are not started and are reported as skipped. Nothing here asserts a speed: the report compares
every figure with its target from the issues and says pass, fail or not measured.

This file is a developer tool outside the package (it must run before `twinflow` is importable); the
parts' bodies are in `tools/gpu_parts.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
WHEELS_DIR = ROOT / ".gpu-wheels"
CARRY_LIMIT_MIB = 64
# Pure-python packages the GPU host's image lacks: diffusers, the oracle of the VAE / DiT benchmarks, at the
# version of the `test` extra. Its other requirements are on the host (huggingface-hub 1.33, safetensors 0.8,
# regex, requests, filelock, numpy, pillow), except importlib_metadata, which diffusers imports only on
# Python < 3.8 (the host has 3.12), so it is not carried.
WHEELS = {"diffusers": "0.42.1"}
# Never carried: the host's own torch stack is the one under test.
FORBIDDEN_WHEELS = ("torch", "nvidia", "triton", "cupy")
TOTAL_S = 285.0  # the whole run, wheel install and every part included: 5 minutes on an H100 with margin
MIN_PART_S = 5.0  # a part is not started with less than this left of the total


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    cap_s: float
    what: str
    needs: tuple = ()           # importable modules the part needs on the host (else skipped, with why)
    optional: Optional[str] = None  # module that must exist for an optional part to run at all


# Order: cheap and decisive first; the compile part (the most likely to need more) last but one.
PLAN = (
    Part("env", 20, "device, driver, versions; torch API gates (_scaled_mm, AOTInductor, torch.library)"),
    Part("tests", 50, "pytest -m 'cuda or cupy' on the test files that carry those markers"),
    Part("fused", 30, "fused CuPy kernels: GB/s, % of HBM peak, speed-up over eager torch (D 1536, 5120)"),
    Part("quant", 15, "fp8 _scaled_mm and int8 _int_mm W8A8 GEMMs vs bf16 at Wan 1.3B / 14B shapes"),
    Part("vae", 35, "Wan2.1 VAE decode vs diffusers AutoencoderKLWan: speed, CUDA peak memory above the model",
         needs=("diffusers",)),
    Part("dit", 45, "Wan DiT 1.3B real config (30 blocks, random weights, bf16) eager vs diffusers",
         needs=("diffusers",)),
    Part("dual", 30, "dual-branch step at alpha 0 / 1 vs a single-model step (1.3B, 30 blocks, bf16)"),
    Part("compile", 60, "1.3B DiT through AOTInductor: cold build, warm load, compiled step, recompiles"),
    Part("stream", 20, "block streaming (pinned host weights, budgets 2/4/8 of 30 blocks) vs the resident 1.3B DiT: "
         "time overhead, peak CUDA memory, output difference"),
    Part("step_cache", 10, "OPTIONAL (issue 18): step caching speed-up, when twinflow.sampling.step_cache exists",
         optional="twinflow.sampling.step_cache"),
)


# ----------------------------------------------------------------------------------------------
# Child side: a part writes JSON lines as it goes, so a part stopped at its cap keeps its figures
# ----------------------------------------------------------------------------------------------

class Recorder:
    """What a part reports: figures, skipped items, notes (one JSON line each, flushed at once)."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = Path(path), deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def _write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def figure(self, name: str, **fields) -> None:
        self._write({"type": "figure", "name": name, **fields})

    def note(self, text: str) -> None:
        self._write({"type": "note", "text": text})

    def skip(self, what: str, why: str) -> None:
        self._write({"type": "skip", "what": what, "why": why})

    def fits(self, need_s: float, what: str) -> bool:
        """True if `need_s` more seconds fit before the part's soft deadline; else record `what` as skipped."""
        left = self.left()
        if left >= need_s:
            return True
        self.skip(what, f"not started: {max(0.0, left):.0f} s left before the part's cap, needs about {need_s:.0f} s")
        return False


def read_records(path: Path) -> list:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill at the cap
                pass
    return out


def child_main(part: str, results: Path, deadline: float, dry: bool) -> int:
    import gpu_parts

    rec = Recorder(results, deadline)
    fn = getattr(gpu_parts, ("dry_" if dry else "part_") + part)
    return int(fn(rec) or 0)


# ----------------------------------------------------------------------------------------------
# Parent side: the budget
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PartResult:
    name: str
    cap_s: float
    status: str  # ok | failed | stopped (killed at its cap) | skipped (not started)
    elapsed_s: float = 0.0
    reason: str = ""
    records: list = dataclasses.field(default_factory=list)
    log_tail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the part's whole process group (pytest workers, benchmark children): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # nothing left in the group
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(0.2)  # let the rest of the group go before the KILL sweep


def run_part(argv: list, cap_s: float, results: Path, log: Path, env: dict, name: str) -> PartResult:
    """Run one part's command with a hard cap; its soft deadline (passed in `argv`) comes earlier."""
    t0 = time.monotonic()
    with open(log, "wb") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
            status, reason = ("ok", "") if rc == 0 else ("failed", f"exit status {rc}")
        except subprocess.TimeoutExpired:
            status, reason = "stopped", f"still running at its cap of {cap_s:.0f} s: stopped; figures up to then kept"
        _kill_group(proc)  # the part, or what it left behind (compile workers, benchmark children)
    tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
    return PartResult(name, cap_s, status, time.monotonic() - t0, reason, read_records(results), tail)


def run_budgeted(parts, total_s: float, work: Path, env: dict, argv_for: Callable, clock=time.monotonic,
                 precheck: Callable = lambda part: None, on_done: Callable = lambda r: None) -> list:
    """Run `parts` in order within `total_s`: each under min(its cap, what is left of the total).

    `argv_for(part, results, soft_deadline_epoch)` gives the command; `precheck(part)` a reason not to start
    it (or None). A part that would get less than MIN_PART_S is skipped, and so is everything after it that
    does not fit. Returns one PartResult per part, in order."""
    start = clock()
    out = []
    for part in parts:
        left = total_s - (clock() - start)
        why = precheck(part)
        if why:
            res = PartResult(part.name, part.cap_s, "skipped", reason=why)
        elif left < MIN_PART_S:
            res = PartResult(part.name, part.cap_s, "skipped",
                             reason=f"not started: {max(0.0, left):.0f} s left of the {total_s:.0f} s total budget")
        else:
            cap = min(part.cap_s, left)
            # the part itself stops starting new cases a little before the hard cap
            soft = time.time() + cap - max(2.0, 0.1 * cap)
            results, log = work / f"{part.name}.jsonl", work / f"{part.name}.log"
            results.unlink(missing_ok=True)
            res = run_part(argv_for(part, results, soft), cap, results, log, env, part.name)
            if cap < part.cap_s and res.status == "stopped":
                res.reason += f" (cap cut from {part.cap_s:.0f} s to what was left of the total)"
        out.append(res)
        on_done(res)
    return out


# ----------------------------------------------------------------------------------------------
# Environment: the twinflow shim and the carried wheels
# ----------------------------------------------------------------------------------------------

def make_shim(tmp: Path) -> Path:
    """A folder whose `twinflow` entry is this working tree (the repository root is the package)."""
    shim = tmp / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "twinflow"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    return shim


def _wheel_dist(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("-", "_")


def wheel_files() -> list:
    return sorted(WHEELS_DIR.glob("*.whl")) if WHEELS_DIR.is_dir() else []


def install_missing_wheels(site: Path, python: str = sys.executable) -> tuple:
    """Install the carried wheels whose package this python cannot import, into `site` (never torch).

    (installed names, lines for the report)."""
    lines, todo = [], []
    for whl in wheel_files():
        dist = _wheel_dist(whl)
        if dist.startswith(FORBIDDEN_WHEELS):
            lines.append(f"{whl.name}: refused (the host's own torch stack is what is under test)")
        elif importlib.util.find_spec(dist) is not None:
            lines.append(f"{whl.name}: not needed, the host has {dist}")
        else:
            todo.append(whl)
    if not todo:
        return [], lines
    site.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--target", str(site), *map(str, todo)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines.append(f"pip could not install {[w.name for w in todo]}: {res.stderr.strip()[-500:]}")
        return [], lines
    lines += [f"{w.name}: installed into a temporary folder" for w in todo]
    return [_wheel_dist(w) for w in todo], lines


def child_env(shim: Path, site: Optional[Path]) -> dict:
    env = dict(os.environ)
    paths = [str(shim)] + ([str(site)] if site else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


def importable(module: str, env: dict) -> bool:
    """Whether `module` imports' spec is found on the children's path (no import is run)."""
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    saved = list(sys.path)
    sys.path[:0] = extra
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None and _find_nested(module)
    except (ImportError, ValueError):
        return False
    finally:
        sys.path[:] = saved
        for name in [m for m in sys.modules if m == "twinflow" or m.startswith("twinflow.")]:
            del sys.modules[name]


def _find_nested(module: str) -> bool:
    if "." not in module:
        return True
    head, _, tail = module.partition(".")
    spec = importlib.util.find_spec(head)
    base = Path(next(iter(spec.submodule_search_locations or []), ""))
    rel = Path(*tail.split("."))
    return (base / rel).with_suffix(".py").is_file() or (base / rel / "__init__.py").is_file()


def carried_mib() -> tuple:
    """(MiB of what a device run sends: tracked + untracked-not-ignored files, MiB of .gpu-wheels)."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True)
    except OSError:  # no git: count nothing rather than fail the dry run
        res = None
    files = [ROOT / p for p in res.stdout.decode().split("\0") if p] if res and res.returncode == 0 else []
    tree = sum(p.stat().st_size for p in files if p.is_file())
    wheels = sum(p.stat().st_size for p in wheel_files())
    return tree / 2 ** 20, wheels / 2 ** 20


# ----------------------------------------------------------------------------------------------
# Targets (from the issues) and the report
# ----------------------------------------------------------------------------------------------

def _target(name, item, value, op, threshold, unit="", detail=""):
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"target": name, "item": item, "value": value, "op": op, "threshold": threshold, "unit": unit,
            "pass": ok, "detail": detail}


def targets(results: dict) -> list:
    """Every figure that has a target, with pass/fail; a target with no figure is listed as not measured."""
    figs = {name: [r for r in res.records if r.get("type") == "figure"] for name, res in results.items()}
    out = []

    def by(part, name):
        return [f for f in figs.get(part, []) if f["name"] == name]

    gates = by("env", "gate")
    bad = [g["gate"] for g in gates if not g.get("ok")]
    out.append(_target("torch API gates hold on the host's torch", ", ".join(bad) or "all", len(bad) if gates else None,
                       "<=", 0, "failing", "; ".join(g["detail"][:120] for g in gates if not g.get("ok"))))
    t = by("tests", "pytest")
    if t:
        f = t[-1]
        out.append(_target("cuda/cupy tests: 0 failed", "pytest -m 'cuda or cupy'", f.get("failed", 0) + f.get("errors", 0),
                           "<=", 0, "failed", f"{f.get('passed', 0)} passed, {f.get('skipped', 0)} skipped"))
    else:
        out.append(_target("cuda/cupy tests: 0 failed", "pytest -m 'cuda or cupy'", None, "<=", 0))
    rows = by("fused", "fused_op")
    for r in rows:
        item = f"D={r['D']} {r['op']}"
        out.append(_target("fused kernel >= 85% of HBM peak", item, r["pct_peak"], ">=", 85, "%",
                           f"{r['kernel_GBps']:.0f} GB/s of {_fmt(r['peak_GBps'])}"))
        out.append(_target("fused kernel >= 1.5x eager torch", item, r["x_eager"], ">=", 1.5, "x"))
    if not rows:
        out.append(_target("fused kernel >= 85% of HBM peak", "all ops", None, ">=", 85, "%"))
        out.append(_target("fused kernel >= 1.5x eager torch", "all ops", None, ">=", 1.5, "x"))
    rows = by("quant", "gemm")
    for r in rows:
        out.append(_target("fp8 W8A8 GEMM >= 1.6x bf16", r["shape"], r["fp8_gemm_speedup"], ">=", 1.6, "x",
                           f"M={r['M']} K={r['K']} N={r['N']}"))
    if not rows:
        out.append(_target("fp8 W8A8 GEMM >= 1.6x bf16", "Wan shapes", None, ">=", 1.6, "x"))
    rows = by("vae", "vae_decode")
    for r in rows:
        out.append(_target("VAE decode >= 2x diffusers", r["case"], r["speedup"], ">=", 2.0, "x"))
        out.append(_target("VAE memory above model <= 1/3 of diffusers'", r["case"], r["memory_ratio"], "<=", 1 / 3, "x"))
    if not rows:
        out.append(_target("VAE decode >= 2x diffusers", "decode", None, ">=", 2.0, "x"))
        out.append(_target("VAE memory above model <= 1/3 of diffusers'", "decode", None, "<=", 1 / 3, "x"))
    eager = by("dit", "dit_eager")
    comp = by("compile", "compiled_step")
    if eager and comp:
        d, c = eager[-1], comp[-1]
        out.append(_target("DiT compiled >= 1.5x diffusers eager", c["backend"], d["diffusers_s"] / c["compiled_s"],
                           ">=", 1.5, "x", f"diffusers {d['diffusers_s'] * 1e3:.1f} ms, compiled {c['compiled_s'] * 1e3:.1f} ms"))
    else:
        out.append(_target("DiT compiled >= 1.5x diffusers eager", "1.3B bf16", None, ">=", 1.5, "x"))
    builds = by("compile", "cold_build") + by("compile", "warm_load")
    out.append(_target("compiled DiT verified against eager", "cold build, warm load",
                       sum(not b["verified"] for b in builds) if builds else None, "<=", 0, "unverified",
                       "; ".join(b["line"] for b in builds)))
    cw = by("compile", "cold_warm")
    out.append(_target("warm compile load <= 10% of cold build", "1.3B AOTInductor",
                       cw[-1]["warm_over_cold"] if cw else None, "<=", 0.10, "x"))
    rc = by("compile", "recompiles")
    out.append(_target("0 recompiles across steps", "1.3B compiled", rc[-1]["recompiles"] if rc else None, "<=", 0, ""))
    rows = by("dual", "dual_step")
    for r in rows:
        for k in ("alpha1_overhead", "alpha0_overhead"):
            out.append(_target("dual-branch step at alpha 0/1 <= +5% of a single step", k, 100 * r[k], "<=", 5.0, "%"))
    if not rows:
        out.append(_target("dual-branch step at alpha 0/1 <= +5% of a single step", "alpha 0 and 1", None, "<=", 5.0, "%"))
    rows = by("stream", "block_stream")
    base = next((r for r in rows if r["case"] == "resident"), None)
    for r in (r for r in rows if r["case"] != "resident"):
        out.append(_target("streamed DiT output equals the resident one", r["case"], r["max_abs_diff"], "<=", 0.0, "",
                           f"overhead {100 * r['overhead']:+.0f}%"))
        if base is not None and base.get("peak_mib") and r.get("peak_mib") is not None:
            out.append(_target("streamed DiT peak memory below the resident one", r["case"],
                               r["peak_mib"] / base["peak_mib"], "<=", 1.0, "x",
                               f"{r['peak_mib']:.0f} of {base['peak_mib']:.0f} MiB; time overhead "
                               f"{100 * r['overhead']:+.0f}%"))
    if not rows:
        out.append(_target("streamed DiT output equals the resident one", "budgets 2/4/8", None, "<=", 0.0, ""))
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_report(out: Path, report: dict) -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "gpu_report.json", out / "gpu_report.md"
    js.write_text(json.dumps(report, indent=1, default=str))
    env = next((r for r in report["parts"] if r["name"] == "env"), {"records": []})
    info = {f["name"]: f for f in env["records"] if f.get("type") == "figure"}
    dev = info.get("device", {})
    lines = ["# TwinFlow GPU acceptance report", "",
             f"- device: {dev.get('gpu', 'unknown')} ({dev.get('memory_gib', '?')} GiB, CC {dev.get('capability', '?')}),"
             f" driver {dev.get('driver', '?')}",
             f"- python {dev.get('python', '?')}, torch {dev.get('torch', '?')} (CUDA {dev.get('cuda', '?')}),"
             f" cupy {dev.get('cupy', '?')}, triton {dev.get('triton', '?')}, diffusers {dev.get('diffusers', '?')}",
             f"- run: {report['started']}, {report['elapsed_s']:.0f} s of a {report['total_s']:.0f} s budget;"
             f" working tree {report['commit']}"
             + ("; PARTIAL: written after each part, the run did not reach its end" if report.get("partial") else ""),
             "",
             "## Targets", "", "| target | item | value | target | result | detail |", "|---|---|---|---|---|---|"]
    for t in report["targets"]:
        res = {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]
        lines.append(f"| {t['target']} | {t['item']} | {_fmt(t['value'])} {t['unit']} | {t['op']} {_fmt(t['threshold'])} "
                     f"| {res} | {t['detail']} |")
    lines += ["", "## Parts", "", "| part | status | time / cap (s) | note |", "|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['elapsed_s']:.0f} / {p['cap_s']:.0f} | {p['reason']} |")
    for p in report["parts"]:
        if p["status"] == "failed":
            tail = "\n".join(p["log_tail"].splitlines()[-20:])
            lines += ["", f"{p['name']} failed; the end of its output:", "", "```", tail, "```"]
    lines += ["", "## Skipped", ""]
    skipped = report["skipped"]
    lines += [f"- {s}" for s in skipped] or ["- nothing"]
    lines += ["", "## Figures", ""]
    for p in report["parts"]:
        figs = [r for r in p["records"] if r.get("type") == "figure"]
        notes = [r["text"] for r in p["records"] if r.get("type") == "note"]
        if not figs and not notes:
            continue
        lines.append(f"### {p['name']}")
        lines += [f"- {n}" for n in notes]
        for f in figs:
            lines.append("- " + ", ".join(f"{k}={_fmt(v)}" for k, v in f.items() if k != "type"))
        lines.append("")
    md.write_text("\n".join(lines) + "\n")
    return js, md


def skipped_lines(results: list) -> list:
    out = []
    for r in results:
        if r.status in ("skipped", "stopped", "failed"):
            out.append(f"{r.name}: {r.status} - {r.reason}")
        for s in (x for x in r.records if x.get("type") == "skip"):
            out.append(f"{r.name}: {s['what']} - {s['why']}")
    return out


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def prepare(python: str = sys.executable) -> int:
    """Download the pure-python wheels the GPU host lacks into .gpu-wheels/ (gitignored, carried)."""
    WHEELS_DIR.mkdir(exist_ok=True)
    specs = [f"{k}=={v}" for k, v in WHEELS.items()]
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
           "-d", str(WHEELS_DIR), *specs]
    print("$ " + " ".join(cmd))
    res = subprocess.run(cmd)
    if res.returncode != 0:
        print(f"pip download failed (exit {res.returncode}): check the network and the pins in WHEELS "
              f"({', '.join(specs)})", file=sys.stderr)
        return res.returncode
    keep = {f"{k}-{v}".lower() for k, v in WHEELS.items()}
    for whl in wheel_files():
        if "-".join(whl.name.split("-")[:2]).lower() not in keep:
            whl.unlink()  # an older pin: two versions of one package would both be installed
            print(f"removed stale {whl.name}")
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(WHEELS_DIR)], cwd=ROOT).returncode == 0
    except OSError:
        ignored = False
    tree, wheels = carried_mib()
    where = "gitignored: name it in the device run's carry" if ignored else "NOT gitignored"
    print(f"{len(wheel_files())} wheels, {wheels:.1f} MiB in {WHEELS_DIR.name}/ ({where}); "
          f"working tree {tree:.1f} MiB; together {tree + wheels:.1f} of {CARRY_LIMIT_MIB} MiB")
    if tree + wheels > CARRY_LIMIT_MIB / 2:
        print(f"warning: more than half of the {CARRY_LIMIT_MIB} MiB a device run may carry", file=sys.stderr)
    return 0


def _plan(args) -> list:
    caps = dict(args.cap or [])
    unknown = (set(caps) | set(args.only or []) | set(args.skip or [])) - {p.name for p in PLAN}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; parts: {', '.join(p.name for p in PLAN)}")
    parts = [dataclasses.replace(p, cap_s=caps.get(p.name, p.cap_s)) for p in PLAN
             if (not args.only or p.name in args.only or p.name == "env") and p.name not in (args.skip or [])]
    return parts


def print_plan(parts, total_s: float) -> None:
    print(f"plan: {len(parts)} parts, total budget {total_s:.0f} s (caps add up to {sum(p.cap_s for p in parts):.0f} s;"
          " a part gets min(its cap, what is left))")
    for p in parts:
        print(f"  {p.name:<11} cap {p.cap_s:>4.0f} s  {p.what}")


def _argv_for(dry: bool):
    def argv(part, results, soft_deadline):
        return [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--results", str(results),
                "--deadline", f"{soft_deadline:.3f}"] + (["--dry-run"] if dry else [])
    return argv


def _commit() -> str:
    try:
        res = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    return res.stdout.strip() or "unknown"


def _cap_arg(s: str) -> tuple:
    name, _, val = s.partition("=")
    try:
        return name, float(val)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cap {s!r}: use PART=SECONDS, e.g. compile=120") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="download the wheels the GPU host lacks into .gpu-wheels/")
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: imports, API gates, the plan; exits 0 if all good")
    ap.add_argument("--out", help="report folder (default: $OUT if set, else output/gpu/)")
    ap.add_argument("--total", type=float, default=TOTAL_S, help=f"total budget in seconds (default {TOTAL_S:.0f})")
    ap.add_argument("--only", nargs="+", metavar="PART", help="run only these parts (env always runs)")
    ap.add_argument("--skip", nargs="+", metavar="PART", help="leave these parts out")
    ap.add_argument("--cap", action="append", type=_cap_arg, metavar="PART=S", help="override a part's cap")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return child_main(args.part, Path(args.results), args.deadline, args.dry_run)
    if args.prepare:
        return prepare()

    parts = _plan(args)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "output" / "gpu")
    t_start, started = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    tmp = Path(tempfile.mkdtemp(prefix="twinflow-gpu-"))
    try:
        shim = make_shim(tmp)
        if args.dry_run:
            return dry_run(parts, args.total, tmp, shim)
        installed, wheel_lines = install_missing_wheels(tmp / "site")
        env = child_env(shim, tmp / "site" if installed else None)
        for line in wheel_lines:
            print(line)
        print_plan(parts, args.total)

        state = {"no_cuda": None}

        def precheck(part):
            if part.name != "env" and state["no_cuda"]:
                return state["no_cuda"]
            if part.optional and not importable(part.optional, env):
                return f"optional part: {part.optional} does not exist in this working tree yet"
            missing = [m for m in part.needs if not importable(m, env)]
            if missing:
                return (f"{', '.join(missing)} cannot be imported on this host: run `./dev gpu --prepare` where "
                        f"there is network and carry {WHEELS_DIR.name}/ along")
            return None

        work = tmp / "work"
        work.mkdir()
        finished = []

        def report_now(results, partial: bool) -> tuple:
            by_name = {r.name: r for r in results}
            report = {"started": started, "total_s": args.total, "elapsed_s": time.monotonic() - t_start,
                      "partial": partial, "commit": _commit(), "wheels": wheel_lines,
                      "plan": [dataclasses.asdict(p) for p in parts], "parts": [r.to_dict() for r in results],
                      "targets": targets(by_name), "skipped": skipped_lines(results)
                      + [f"{p.name}: not reached (the run was stopped)" for p in parts[len(results):] if partial]}
            js, md = write_report(out, report)
            logs = out / "gpu_logs.txt"
            with open(logs, "w") as f:  # every part's full output, for what the report's tails leave out
                for r in results:
                    log = work / f"{r.name}.log"
                    text = log.read_text(errors="replace") if log.is_file() else "(not started)\n"
                    f.write(f"===== {r.name}: {r.status} {r.reason}\n{text[-1_000_000:]}\n")
            return js, md, logs

        def done(r):
            if r.name == "env":
                dev = next((f for f in r.records if f.get("name") == "device"), None)
                if dev is None or not dev.get("cuda_available"):
                    state["no_cuda"] = ("not started: torch sees no CUDA device on this host" if dev else
                                        f"not started: the env part gave no device ({r.status} {r.reason})")
            print(f"[{time.monotonic() - t_start:5.0f} s] {r.name}: {r.status} in {r.elapsed_s:.0f} s"
                  + (f" - {r.reason}" if r.reason else ""), flush=True)
            if r.status == "failed":
                print("  " + "\n  ".join(r.log_tail.splitlines()[-15:]))
            finished.append(r)
            report_now(finished, partial=True)  # a run stopped from outside still leaves a report

        left = args.total - (time.monotonic() - t_start)
        results = run_budgeted(parts, left, work, env, _argv_for(False), precheck=precheck, on_done=done)
        js, md, logs = report_now(results, partial=False)
        print(md.read_text())
        print(f"wrote {js}, {md} and {logs}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HOST_PYTHON = "python3.12"  # the GPU image's interpreter
# Run by that interpreter over every tracked .py file: compile it (syntax), and list imports of stdlib modules this
# (the CPU machine's) Python has but 3.12 removed (distutils, imp, asynchat, ...), which a syntax check misses.
_COMPILE_ALL = """
import ast, sys
ours = set(sys.argv[1].split(","))
gone = sorted(ours - set(sys.stdlib_module_names))
bad = []
for path in sys.stdin.read().split("\\0"):
    if not path:
        continue
    try:
        tree = compile(open(path, encoding="utf-8").read(), path, "exec", ast.PyCF_ONLY_AST)
    except SyntaxError as exc:
        bad.append(f"{path}:{exc.lineno}: {exc.msg}")
        continue
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            if name.split(".")[0] in gone:
                bad.append(f"{path}:{node.lineno}: imports {name}, removed from the standard library in 3.12")
print(len(bad)); print("\\n".join(bad))
"""


def _host_python() -> Optional[str]:
    """An interpreter of the GPU host's Python version on this machine: on PATH, or a pyenv version of it."""
    cands = [shutil.which(HOST_PYTHON)]
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    cands += sorted(str(p) for p in root.glob(f"versions/{HOST_PYTHON[6:]}*/bin/{HOST_PYTHON}"))
    for exe in filter(None, cands):
        try:
            if subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                              capture_output=True, timeout=60).returncode == 0:
                return exe
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def host_python_syntax(files: Optional[list] = None) -> tuple:
    """(line, problem or None): every tracked .py file compiled by the GPU host's Python version, and its imports
    checked against that version's standard library, where an interpreter of that version exists on this
    machine (nothing of TwinFlow is imported or run by it). `files`: those instead of the tracked ones."""
    exe = _host_python()
    if not exe:
        return f"{HOST_PYTHON} check: no usable {HOST_PYTHON} on this machine; skipped", None
    try:
        listing = b"\0".join(str(f).encode() for f in files) if files is not None else subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True).stdout
    except OSError:
        listing = b"\0".join(str(p.relative_to(ROOT)).encode() for p in ROOT.rglob("*.py") if ".venv" not in p.parts)
    res = subprocess.run([exe, "-c", _COMPILE_ALL, ",".join(sorted(sys.stdlib_module_names))], input=listing,
                         cwd=ROOT, capture_output=True, timeout=120)
    out = res.stdout.decode().splitlines()
    n = len([p for p in listing.split(b"\0") if p])
    if res.returncode != 0 or not out or out[0] != "0":
        return (f"{HOST_PYTHON} check: FAILED", f"{HOST_PYTHON} ({exe}) rejects: "
                + ("; ".join(out[1:6]) or res.stderr.decode()[-500:]))
    return (f"{HOST_PYTHON} check: all {n} tracked .py files compile with {exe} and import nothing 3.12 "
            "removed from the standard library", None)


def dry_run(parts, total_s: float, tmp: Path, shim: Path) -> int:
    """CPU check of everything the GPU run needs except the GPU: plan, budget, wheels, imports, API gates."""
    print_plan(parts, total_s)
    problems = []
    if sum(p.cap_s for p in PLAN) > total_s + 30:
        problems.append("the parts' caps exceed the total budget by more than 30 s")
    wheels = wheel_files()
    have = {_wheel_dist(w) for w in wheels}
    missing = [k for k in WHEELS if k not in have]
    print(f"wheels in {WHEELS_DIR.name}/: {', '.join(w.name for w in wheels) or 'none'}"
          + (f" (missing {missing}: run ./dev gpu --prepare before a GPU run)" if missing else ""))
    tree, wmib = carried_mib()
    print(f"a device run carries {tree:.1f} MiB of working tree + {wmib:.1f} MiB of wheels (limit {CARRY_LIMIT_MIB} MiB)")
    if tree + wmib > CARRY_LIMIT_MIB:
        problems.append(f"{tree + wmib:.1f} MiB would travel, over the {CARRY_LIMIT_MIB} MiB limit")
    line, problem = host_python_syntax()
    print(line)
    if problem:
        problems.append(problem)
    env = child_env(shim, None)
    work = tmp / "work"
    work.mkdir()
    res = run_budgeted([Part("imports", 240, "imports and API gates")], 240, work, env, _argv_for(True))[0]
    for r in res.records:
        if r.get("type") == "figure":
            mark = "ok  " if r.get("ok") else "FAIL"
            print(f"  {mark} {r['name']}: {r.get('detail', '')}")
            if not r.get("ok"):
                problems.append(f"{r['name']}: {r.get('detail', '')}")
        elif r.get("type") == "note":
            print(f"  note {r['text']}")
    if res.status != "ok":
        problems.append(f"the import check {res.status}: {res.reason}\n{res.log_tail[-3000:]}")
    if problems:
        print("dry run FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("dry run ok: every GPU code path imports and the torch API gates hold on this torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
