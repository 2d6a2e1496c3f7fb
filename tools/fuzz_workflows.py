"""Long fuzz of the workflow front door (issue 15): generated workflows through load, convert, validate
(with every check before compute) and, for those that validate, `run`.

Each workflow is one of the shipped workflows (`workflows/*.json`, UI format, and their API conversions)
with 1-3 mutations: truncated or garbled text, cycles, dangling links (missing node, bad slot), wrong
value types, int ids, huge and non-finite numbers, control characters, deep nesting, UI-graph damage.
The only acceptable failure is a `TwinFlowError` (WorkflowError, CheckpointError...: a message naming
what to fix); anything else escaping load / convert / validate / run is counted as an uncaught exception,
and its traceback printed once per distinct (type, place).

Runs use the shipped tiny random presets with their costs capped before the run (steps <= 2, frames
<= 5, sizes <= 64, batch 1; the capped workflow is validated again by `run` itself), at most `--runs`
of them, spread over the whole generated set.

    python tools/fuzz_workflows.py --count 10000 --runs 200 --seed 0
exits 1 when any uncaught exception was seen. CI runs a small count (tests/test_runner_fuzz.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HUGE = [2 ** 31, 2 ** 63, 2 ** 64 + 1, -2 ** 63, 10 ** 30, 10 ** 400, -1, 0, 1e308, -1e308, 1e-320,
        float("inf"), float("-inf"), float("nan")]
CONTROL = ["a\nb", "x\r\ny", "\x00", "nul\x00in", "\x1b[31mred", "tab\there", "\u202eevil", "\x7f", "a/\n/b",
           "twinflow/\x01x", "\u2028sep", ""]
WRONG = [None, True, False, "", "12", "nan", "1e9", [], {}, [1], ["1"], ["1", 0, 0], {"a": 1}, 1.5, -7, "random:tiny"]


def seeds() -> list[tuple[str, object]]:
    """(name, workflow) for each shipped workflow: its UI document and its API prompt."""
    from twinflow.runner.api import default_registry
    from twinflow.runner.formats import load_workflow

    reg = default_registry()
    out = []
    for p in sorted((ROOT / "workflows").glob("*.json")):
        ui = json.loads(p.read_text())
        out.append((f"{p.stem}.ui", ui))
        out.append((f"{p.stem}.api", load_workflow(copy.deepcopy(ui), reg).prompt))
    return out


# ----------------------------------------------------------------------------------------------
# Mutations: each takes (rng, doc) and returns the new doc (a dict/list, or str for text)
# ----------------------------------------------------------------------------------------------

def _api_nodes(doc):
    return [(k, v) for k, v in doc.items() if isinstance(v, dict) and isinstance(v.get("inputs"), dict)] \
        if isinstance(doc, dict) and "nodes" not in doc else []


def _ui_nodes(doc):
    return [n for n in doc.get("nodes", []) if isinstance(n, dict)] if isinstance(doc, dict) else []


def _pick_input(rng, doc):
    """(container, key) of a random widget value (API input or UI widgets_values slot), or None."""
    spots = []
    for _, node in _api_nodes(doc):
        spots += [(node["inputs"], k) for k in node["inputs"]]
    for node in _ui_nodes(doc):
        wv = node.get("widgets_values")
        if isinstance(wv, list):
            spots += [(wv, i) for i in range(len(wv))]
        elif isinstance(wv, dict):
            spots += [(wv, k) for k in wv]
    return rng.choice(spots) if spots else None


def m_truncate(rng, doc):
    text = doc if isinstance(doc, str) else json.dumps(doc, allow_nan=True)
    cut = rng.randrange(len(text) + 1)
    noise = "".join(rng.choice('{}[]",:0123456789aeE.-\\n\x00 ') for _ in range(rng.randrange(8)))
    return text[:cut] + noise


def m_cycle(rng, doc):
    nodes = _api_nodes(doc)
    if nodes:
        (a, na), (b, nb) = rng.choice(nodes), rng.choice(nodes)
        links = [k for k, v in na["inputs"].items() if isinstance(v, list)] or list(na["inputs"]) or ["x"]
        na["inputs"][rng.choice(links)] = [b, 0]
        if a != b and rng.random() < 0.5:
            keys = [k for k, v in nb["inputs"].items() if isinstance(v, list)] or ["y"]
            nb["inputs"][rng.choice(keys)] = [a, 0]
        return doc
    ui = _ui_nodes(doc)
    if ui and isinstance(doc.get("links"), list):
        a, b = rng.choice(ui), rng.choice(ui)
        lid = max([lk[0] for lk in doc["links"] if isinstance(lk, list) and lk and isinstance(lk[0], int)] or [0]) + 1
        doc["links"].append([lid, a.get("id"), 0, b.get("id"), 0, "*"])
        doc["links"].append([lid + 1, b.get("id"), 0, a.get("id"), 0, "*"])
    return doc


def m_dangling(rng, doc):
    nodes = _api_nodes(doc)
    if nodes:
        _, n = rng.choice(nodes)
        key = rng.choice(list(n["inputs"]) or ["x"])
        n["inputs"][key] = rng.choice([["999", 0], ["1", 99], ["1", -1], ["1"], [None, 0], ["1", "0"], ["1", 1.5],
                                       [1, 0], ["", 0]])
        if rng.random() < 0.3:
            del doc[rng.choice(list(doc))]
        return doc
    links = doc.get("links") if isinstance(doc, dict) else None
    if isinstance(links, list) and links:
        lk = rng.choice(links)
        if isinstance(lk, list) and len(lk) >= 5:
            lk[rng.choice([1, 2, 3, 4])] = rng.choice([999, -1, 10 ** 20, "1", None, 1.5])
        elif rng.random() < 0.5:
            links.remove(lk)
    return doc


def m_wrong_type(rng, doc):
    spot = _pick_input(rng, doc)
    if spot:
        c, k = spot
        c[k] = copy.deepcopy(rng.choice(WRONG))
    elif isinstance(doc, dict) and doc:
        doc[rng.choice(list(doc))] = copy.deepcopy(rng.choice(WRONG))
    return doc


def m_int_ids(rng, doc):
    nodes = _api_nodes(doc)
    if nodes:
        new = {}
        for k, v in doc.items():
            nk = int(k) if isinstance(k, str) and k.isdigit() and rng.random() < 0.7 else k
            if isinstance(v, dict) and isinstance(v.get("inputs"), dict):
                for ik, iv in v["inputs"].items():
                    if isinstance(iv, list) and iv and isinstance(iv[0], str) and iv[0].isdigit() and rng.random() < 0.7:
                        iv[0] = int(iv[0])
            new[nk] = v
        return new
    for n in _ui_nodes(doc):
        if rng.random() < 0.5:
            i = n.get("id")
            n["id"] = str(i) if rng.random() < 0.7 or not isinstance(i, (int, float)) else float(i)
    return doc


def m_huge(rng, doc):
    spot = _pick_input(rng, doc)
    if spot:
        c, k = spot
        c[k] = rng.choice(HUGE)
    return doc


def m_control(rng, doc):
    spot = _pick_input(rng, doc)
    if spot:
        c, k = spot
        c[k] = rng.choice(CONTROL) + (c[k] if isinstance(c[k], str) and rng.random() < 0.5 else "")
    if rng.random() < 0.2 and isinstance(doc, dict) and doc:  # a control character in a key
        k = rng.choice(list(doc))
        doc[f"{k}\n"] = doc.pop(k)
    return doc


def m_deep(rng, doc):
    depth = rng.choice([10, 100, 1000, 5000, 50000])
    if rng.random() < 0.4:  # as text (the parser must not overflow the stack)
        return "[" * depth + "1" + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    value = 1
    for _ in range(min(depth, 300)):  # in memory (an API caller's dict): below Python's recursion limit
        value = [value] if rng.random() < 0.5 else {"a": value}
    spot = _pick_input(rng, doc)
    if spot:
        c, k = spot
        c[k] = value
    return doc


def m_ui_damage(rng, doc):
    ui = _ui_nodes(doc)
    if not ui:
        return m_wrong_type(rng, doc)
    n = rng.choice(ui)
    field = rng.choice(["type", "mode", "inputs", "outputs", "widgets_values", "id", "links"])
    if field == "widgets_values" and rng.random() < 0.5:
        n.pop("widgets_values", None)
    elif field in n and rng.random() < 0.3:
        del n[field]
    else:
        n[field] = copy.deepcopy(rng.choice(WRONG + [["x"], [{"name": "a", "link": 3}], 7, "Reroute",
                                                     "PrimitiveNode", "Nope"]))
    if rng.random() < 0.2:
        doc["nodes"].append(copy.deepcopy(n))  # duplicate id
    return doc


MUTATIONS = {"truncate": m_truncate, "cycle": m_cycle, "dangling": m_dangling, "wrong_type": m_wrong_type,
             "int_ids": m_int_ids, "huge": m_huge, "control": m_control, "deep": m_deep, "ui_damage": m_ui_damage}


def generate(rng: random.Random, base: list):
    name, doc = rng.choice(base)
    doc = copy.deepcopy(doc)
    kinds = rng.sample(sorted(MUTATIONS), rng.randint(1, 3))
    for kind in kinds:
        if isinstance(doc, str):
            break  # text: nothing structural left to mutate
        try:
            doc = MUTATIONS[kind](rng, doc)
        except Exception:  # a mutation that does not apply to what earlier ones left (the generator's limit)
            kinds = [k for k in kinds if k != kind]
    return name, kinds, doc


# ----------------------------------------------------------------------------------------------
# Running one
# ----------------------------------------------------------------------------------------------

CAPS = {"steps": 2, "preview_steps": 2, "length": 5, "width": 64, "height": 64, "batch_size": 1, "tile_size": 64}


def capped(prompt: dict) -> dict:
    """The validated prompt with its costs capped (tiny presets, few steps) for the run phase."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        if "TextEncode" in str(node.get("class_type")):
            continue  # its width is the text embedding's, fixed by the model
        for k, cap in CAPS.items():
            v = node.get("inputs", {}).get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > cap:
                node["inputs"][k] = cap
    return out


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(tb) if "twinflow" in f.filename or "/tools/" not in f.filename), tb[-1])
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"


class CliTraceback(Exception):
    """The CLI printed a traceback (its stderr holds it) without raising."""


def cli_stage(doc, out_dir: Path, stats: Counter, report) -> None:
    """`twinflow validate --json` and `twinflow convert` on the workflow as a file, as a user runs them:
    an exception out of `main`, or a traceback in what it printed, is uncaught."""
    import contextlib
    import io

    from twinflow.runner import cli

    path = out_dir / "fuzz_workflow.json"
    try:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc, allow_nan=True), encoding="utf-8",
                        errors="surrogatepass")
    except (ValueError, RecursionError, TypeError):
        return  # not representable as a file (the generator's doc, not the CLI's problem)
    for argv in (["validate", str(path), "--json", "--output-dir", str(out_dir)], ["convert", str(path)]):
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = cli.main(argv)
        except Exception as exc:
            report(exc)
            continue
        if "Traceback" in err.getvalue():
            report(CliTraceback(err.getvalue()[-2000:]))
            continue
        stats[f"cli {argv[0]} exit {code}"] += 1
    import logging

    logging.getLogger("twinflow").setLevel(logging.ERROR)  # the CLI set its own level


def fuzz(count: int, runs: int, seed: int, out_dir: Path, quiet: bool = False, cli_every: int = 5) -> dict:
    from twinflow.core.errors import TwinFlowError
    from twinflow.runner.api import Runner

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    import logging

    logging.getLogger("twinflow").setLevel(logging.ERROR)  # the refusals' warnings: thousands of lines
    rng = random.Random(seed)
    base = seeds()
    runner = Runner()
    stats = Counter()
    uncaught = Counter()
    shown = set()

    def uncaught_at(stage, exc, name, kinds):
        key = f"{stage}: {_where(exc)}"
        uncaught[key] += 1
        if key not in shown and not quiet:
            shown.add(key)
            print(f"UNCAUGHT {key} (seed workflow {name}, mutations {kinds})", file=sys.stderr)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)

    for i in range(count):
        name, kinds, doc = generate(rng, base)
        stats["generated"] += 1
        if cli_every and i % cli_every == 0:
            cli_stage(doc, out_dir, stats, lambda exc, n=name, k=kinds: uncaught_at("cli", exc, n, k))
        try:  # load + convert (what `twinflow convert` writes)
            wf = runner.load(doc)
            json.dumps(wf.prompt, indent=2)
        except TwinFlowError:
            stats["refused at load"] += 1
            continue
        except Exception as exc:
            uncaught_at("load/convert", exc, name, kinds)
            continue
        try:
            v = runner.validate(doc, output_dir=out_dir, models_dir=out_dir / "models")
        except TwinFlowError:
            stats["refused at validate"] += 1
            continue
        except Exception as exc:
            uncaught_at("validate", exc, name, kinds)
            continue
        stats["validated"] += 1
        if stats["ran"] + stats["refused at run"] + stats["uncaught at run"] >= runs * (i + 1) / count:
            continue  # runs are paced evenly over the generated set
        try:
            Runner().run(capped(v.prompt), output_dir=out_dir, models_dir=out_dir / "models")
            stats["ran"] += 1
        except TwinFlowError as exc:
            stats["refused at run"] += 1
            if not quiet:
                print(f"run refused: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                      file=sys.stderr)
        except Exception as exc:
            stats["uncaught at run"] += 1
            uncaught_at("run", exc, name, kinds)
        if not quiet:
            print(f"[{i + 1}/{count}] runs so far: {stats['ran']} ran, {stats['refused at run']} refused",
                  file=sys.stderr, flush=True)
    return {"stats": dict(stats), "uncaught": dict(uncaught), "uncaught_total": sum(uncaught.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10000, help="workflows to generate (default 10000)")
    p.add_argument("--runs", type=int, default=200, help="at most this many validated workflows are run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cli-every", type=int, default=5, help="every Nth workflow also goes through the CLI's "
                   "validate --json and convert (0: never)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="twinflow-fuzz-") as tmp:
        res = fuzz(args.count, args.runs, args.seed, Path(tmp), args.quiet, args.cli_every)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    return 1 if res["uncaught_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
