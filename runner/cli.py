"""The `twinflow` command line: run / validate / convert / nodes / doctor / fit-gate / plan / cache / serve / batch.

Every subcommand is registered here, explicitly (`build_parser`); a command that needs more than a few
lines keeps its code in its own runner module (`fit_gate.py`, `plan.py`, `serve/cli.py`).

Exit codes: 0 success; 1 a workflow, validation, model-file or node error (one clear paragraph, no
traceback; a node that crashed with an unexpected exception also shows its traceback); 2 bad command
line; 130 interrupted by Ctrl-C at any moment, one line (no partial output files: output nodes write
atomically, a node's files all or none); 141 the reader of stdout went away (`| head`), silently.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from ..core import paths, progress
from ..core.errors import Interrupted, TwinFlowError, WorkflowError
from . import fit_gate
from .serve import cli as serve_cli

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_PIPE = 141  # 128 + SIGPIPE: what a Unix tool whose reader went away reports


def _root_package() -> str:
    return __package__.rsplit(".", 1)[0]


def build_parser() -> argparse.ArgumentParser:
    from ..core.version import __version__

    p = argparse.ArgumentParser(prog="twinflow", description="Run ComfyUI-format workflows of TwinFlow nodes "
                                "headless, and inspect this environment.")
    p.add_argument("--version", action="version", version=f"twinflow {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("--kernels", dest="kernels_global", choices=("auto", "cupy", "torch"),
                   help="kernel path for fused ops (default auto)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a workflow (UI or API JSON, or a PNG/WebP/MP4 with one embedded)")
    r.add_argument("workflow", help="workflow file: UI or API JSON, or a PNG/WebP/MP4 a Save node wrote (its "
                                    "embedded workflow)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID.input=VALUE",
                   help="change an input, e.g. --set 3.seed=42 --set '6.text=a red fox' (VALUE is JSON or text)")
    r.add_argument("--output-dir", help="where output nodes write (default ./output or $TWINFLOW_OUTPUT_DIR)")
    r.add_argument("--models-dir", help="models folder in ComfyUI layout (default ./models or $TWINFLOW_MODELS_DIR)")
    r.add_argument("--input-dir", help="where LoadImage & co. read (default ./input or $TWINFLOW_INPUT_DIR)")
    r.add_argument("--extra-model-paths", metavar="YAML",
                   help="also search the folders of a ComfyUI extra_model_paths.yaml (or $TWINFLOW_EXTRA_MODEL_PATHS)")
    r.add_argument("--json", action="store_true", help="print results / errors as JSON (ComfyUI error format)")
    r.add_argument("--kernels", choices=("auto", "cupy", "torch"), help="kernel path for fused ops")
    r.add_argument("--output", dest="targets", action="append", metavar="NODE_ID",
                   help="run only this output node (repeatable)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-timings", action="store_true", help="no per-node timing report")
    r.add_argument("--compile", choices=("auto", "tensorrt", "inductor", "eager"), metavar="BACKEND",
                   help="insert TwinFlow Compile Model/VAE nodes with the planned profile and build them "
                        "before the first step (see `twinflow plan`)")
    r.add_argument("--quantize", metavar="FORMAT", choices=_quant_formats(),
                   help="insert a TwinFlow Quantize Model node (this format, its accuracy report and check) before "
                        "every sampler's model, core UNETLoader models included: " + ", ".join(_quant_formats()))
    r.add_argument("--stream-blocks", metavar="N", type=_positive_int,
                   help="weight streaming: insert a TwinFlow Block Stream node (N blocks on the GPU at once, one "
                        "budget shared by every model of the run, e.g. two experts) before every sampler's model, "
                        "core UNETLoader models included (loaded into host memory); after --quantize; not with "
                        "--compile. Without a GPU the models are left as they are (a status line says so)")
    r.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="dtype the core UNETLoader and VAELoader models compute in (as ComfyUI's --fp32-unet/"
                        "--bf16-unet/--fp16-unet and --fp32-vae/...); default: float32 on the CPU, the file's dtype "
                        "on a GPU. The umT5 text encoder computes in float32 either way")
    r.add_argument("--step-cache", metavar="POLICY:THRESHOLD[,KEY=VALUE...]",
                   help="step caching on every TwinFlow sampler branch of the workflow, replacing what the graph "
                        "sets: easycache:0.2, magcache:0.12, teacache:0.2 (keys: start, end, window, max_skips, "
                        "device, calibration; docs/sampling.md), or none to turn caching off")

    v = sub.add_parser("validate", help="check a workflow without running it")
    v.add_argument("workflow")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID.input=VALUE")
    v.add_argument("--models-dir")
    v.add_argument("--output-dir", help="the output folder `run` would use (checked: writable or creatable)")
    v.add_argument("--output", dest="targets", action="append", metavar="NODE_ID",
                   help="validate only for this output node (repeatable)")
    v.add_argument("--extra-model-paths", metavar="YAML",
                   help="also search the folders of a ComfyUI extra_model_paths.yaml (or $TWINFLOW_EXTRA_MODEL_PATHS)")
    v.add_argument("--json", action="store_true")

    c = sub.add_parser("convert", help="convert a UI workflow to the API prompt ComfyUI's /prompt takes")
    c.add_argument("workflow")
    c.add_argument("-o", "--output", help="write here instead of stdout (an existing file is kept: see --force)")
    c.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    c.add_argument("--models-dir", help="models folder (file widgets list its contents)")
    c.add_argument("--json", action="store_true", help="errors as JSON")

    n = sub.add_parser("nodes", help="list TwinFlow nodes")
    n.add_argument("--json", action="store_true", help="ComfyUI /object_info format")

    sub.add_parser("doctor", help="what this environment can do, and why not")

    fit_gate.add_parser(sub)
    serve_cli.add_parsers(sub)  # serve, batch (their functions are set as `func`)

    pl = sub.add_parser("plan", help="show which sub-graphs of a workflow would compile, with which profile and "
                        "backend, cache hit/miss and build estimates (nothing runs)")
    pl.add_argument("workflow", help="workflow file (UI or API JSON)")
    pl.add_argument("--backend", choices=("auto", "tensorrt", "inductor", "eager"), default=None,
                    help="backend for sub-graphs without a Compile node (as `run --compile` would use)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    ca = sub.add_parser("cache", help="list or clear the compile artifact cache")
    ca.add_argument("action", choices=("ls", "clear"))
    ca.add_argument("--dir", default=None, help="cache directory (default: $TWINFLOW_CACHE_DIR or the user cache dir)")
    return p


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever `sys.stderr` is now (not the stream of the first call: tests and hosts swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger(_root_package())
    if not any(getattr(h, "_twinflow_cli", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        h._twinflow_cli = True
        root.addHandler(h)
    root.setLevel(level)


def _set_kernels(mode) -> None:
    if not mode:
        return
    from .. import fused  # the library's dispatcher; cupy itself is imported only when a kernel runs

    fused.set_mode(mode)


def _tqdm_backend():
    from tqdm import tqdm

    def factory(total, desc, node_id):
        label = f"#{node_id} {desc}".strip() if node_id is not None else desc
        return tqdm(total=total, desc=label, leave=False, file=sys.stderr, dynamic_ncols=True)

    return factory


class _SigintHandler:
    """First Ctrl-C asks the run to stop at the next check; a second one aborts immediately."""

    def __init__(self):
        self.count = 0
        self.previous = None

    def __call__(self, signum, frame):
        self.count += 1
        if self.count == 1:
            progress.request_interrupt()
            print("\ninterrupt requested: stopping at the next step (Ctrl-C again to abort now)", file=sys.stderr)
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread (e.g. called from a worker): keep the default behaviour
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _print_error(err: BaseException, as_json: bool, verbose: int = 0) -> None:
    from .executor import NodeExecutionError
    from .validate import format_error

    if isinstance(err, WorkflowError):
        if as_json:
            print(json.dumps(err.to_json(), indent=2, default=str))
            return
        print(f"error: {format_error(err)}", file=sys.stderr)
        if isinstance(err, NodeExecutionError) and (err.is_bug or verbose):
            print("".join(traceback.format_exception(type(err.original), err.original, err.original.__traceback__)),
                  file=sys.stderr, end="")
        return
    kind = {FileNotFoundError: "file_not_found"}.get(type(err), type(err).__name__)
    # errors from other parts' subcommands or folder setup carry no node context: print them as they are
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": str(err), "details": "", "extra_info": {}},
                          "node_errors": {}}, indent=2))
    else:
        print(f"error: {err}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of blocks >= 1, got {text!r}")
    return n


def _quant_formats() -> tuple:
    from ..quant.formats import FORMATS

    return tuple(FORMATS)


def _step_cache_spec(text):
    """--step-cache value -> StepCacheConfig, step_cache.OFF for none/off, None when not given; a bad value is a
    ValueError that `main` prints as one line (no usage dump, no traceback)."""
    from ..sampling import step_cache

    if text is None:
        return None
    try:
        return step_cache.parse_spec(text) or step_cache.OFF
    except ValueError as e:
        raise ValueError(f"--step-cache: {e}") from None


def cmd_run(args) -> int:
    from .api import Runner

    cache_override = _step_cache_spec(getattr(args, "step_cache", None))  # before any work: a typo fails at once

    _set_kernels(args.kernels or args.kernels_global)
    if not args.no_progress:
        progress.set_backend(_tqdm_backend())
    runner = Runner()
    workflow, overrides = args.workflow, args.overrides
    stream = getattr(args, "stream_blocks", None)
    if stream and getattr(args, "compile", None):
        raise ValueError("--stream-blocks and --compile do not combine: a compiled graph holds every weight on the "
                         "device; pick one")
    if getattr(args, "compile", None) or getattr(args, "quantize", None) or stream:
        import dataclasses

        from .api import apply_overrides
        from .plan import with_compile_nodes, with_quantize_nodes, with_stream_nodes

        wf = runner.load(args.workflow)
        prompt = apply_overrides(wf.prompt, overrides, runner.registry)
        if args.quantize:
            prompt = with_quantize_nodes(prompt, args.quantize)
        if stream:
            prompt = with_stream_nodes(prompt, stream)
        if args.compile:
            prompt = with_compile_nodes(prompt, args.compile)
        workflow, overrides = dataclasses.replace(wf, prompt=prompt), None
    from ..sampling import step_cache

    from ..nodes.core_models import compute_dtype_override, loading_on_host

    with _SigintHandler(), step_cache.run_override(cache_override) as used, loading_on_host(bool(stream)), \
            compute_dtype_override(getattr(args, "dtype", None)) as dtype_used:
        result = runner.run(workflow, overrides=overrides, output_dir=args.output_dir,
                            models_dir=args.models_dir, targets=args.targets)
    if getattr(args, "dtype", None) and not dtype_used:
        logging.getLogger(__name__).warning("--dtype %s: no core UNETLoader or VAELoader ran in this workflow, so "
                                            "nothing was loaded in it", args.dtype)
    if cache_override is not None and not used:
        logging.getLogger(__name__).warning("--step-cache %s: no sampler ran in this workflow, so nothing "
                                            "was cached", args.step_cache)
    if stream and not args.json:
        lines = [out[1][0] for nid, out in result.results.items() if str(nid).startswith("twinflow_stream_")]
        for line in lines or ["no sampler model ran, so nothing was streamed"]:
            print(f"--stream-blocks {stream}: {line}", file=sys.stderr)
    files = [str(f) for f in result.files()]
    if args.json:
        print(json.dumps({"outputs": dict(result), "files": files,
                          "timings": [t.__dict__ for t in result.timings]}, indent=2, default=str))
    else:
        if not args.no_timings:
            print(result.timing_report(), file=sys.stderr)
        if files:
            print("outputs written:")
            for f in files:
                print(f"  {f}")
        else:
            print(f"done; the output nodes ({', '.join('#' + k for k in result) or 'none'}) wrote no files")
    return EXIT_OK


def cmd_validate(args) -> int:
    from .api import Runner

    runner = Runner()
    v = runner.validate(args.workflow, overrides=args.overrides, targets=args.targets, output_dir=args.output_dir)
    mem = v.memory
    if args.json:
        plan = None if mem is None else {"device": mem.device, "need_bytes": mem.need,
                                         "available_bytes": mem.available, "parts": mem.parts}
        print(json.dumps({"error": None, "node_errors": {}, "outputs": v.outputs, "nodes": v.order,
                          "memory": plan}, indent=2))
    else:
        print(f"ok: {len(v.order)} node(s) to run for output node(s) {', '.join('#' + o for o in v.outputs)}")
        if mem is not None and mem.available is not None:
            print(f"memory: needs at least {mem.need / 2 ** 30:.2f} GiB of {mem.available / 2 ** 30:.2f} GiB "
                  f"available on {mem.device}")
    return EXIT_OK


def cmd_convert(args) -> int:
    from .api import default_registry
    from .formats import load_workflow

    wf = load_workflow(args.workflow, default_registry())
    text = json.dumps(wf.prompt, indent=2)
    if wf.format != "ui":
        print(f"note: {args.workflow} is already in API format; writing it unchanged", file=sys.stderr)
    if args.output:
        from ..core.outputs import atomic_output

        out = Path(args.output)
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; convert never overwrites a file: pass --force to replace it, "
                                  f"or choose another -o")
        if args.force and out.is_file():
            out.unlink()
        with atomic_output(out) as tmp:  # no half-written file under the name, and no overwrite of a newcomer
            tmp.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}")
    else:
        print(text)
    return EXIT_OK


def cmd_nodes(args) -> int:
    from .api import default_registry, display_names
    from .spec import object_info

    reg = default_registry()
    names = display_names()
    info = {name: object_info(name, cls, names.get(name)) for name, cls in sorted(reg.items())}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    if not info:
        print("no TwinFlow nodes are registered")
        return EXIT_OK
    width = max(len(k) for k in info)
    for name, i in info.items():
        print(f"{name:<{width}}  {i['category']:<24}  {i['display_name']}{'  [output]' if i['output_node'] else ''}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from .doctor import doctor_lines

    for line in doctor_lines():
        print(line)
    return EXIT_OK


def cmd_plan(args) -> int:
    from .formats import load_workflow
    from .plan import format_plan, plan_workflow

    wf = load_workflow(args.workflow)
    plan = plan_workflow(wf.prompt, backend=args.backend)
    sys.stdout.write((json.dumps(plan, indent=1) if args.json else format_plan(plan)) + "\n")
    return EXIT_OK


def cmd_cache(args) -> int:
    import time

    from ..compiled.cache import ArtifactCache

    cache = ArtifactCache(args.dir)
    if args.action == "clear":
        n = cache.clear()
        sys.stdout.write(f"removed {n} entries from {cache.root}\n")
        return EXIT_OK
    entries = cache.entries()
    sys.stdout.write(f"{cache.root}: {len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB\n")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        sys.stdout.write(f"  {e['key']}  {e['backend'] or '?':9s} {e['bytes'] / 1e6:9.1f} MB  used {used}  {e['label']}\n")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "convert": cmd_convert, "nodes": cmd_nodes,
            "doctor": cmd_doctor, "fit-gate": fit_gate.cmd_fit_gate, "plan": cmd_plan, "cache": cmd_cache}


def _remove_leftovers() -> None:
    from ..core.outputs import remove_leftover_temps

    remove_leftover_temps()


def _published_count() -> int:
    try:
        from ..core.outputs import published_count
    except KeyboardInterrupt:  # a Ctrl-C while this very import runs (torch may still be importing)
        return 0
    return published_count()


_interrupt_shown = [False]  # one "interrupted" line per main() call, however many Ctrl-C arrive while it is printed


def _interrupted(as_json: bool) -> int:
    progress.clear_interrupt()
    _remove_leftovers()
    if _interrupt_shown[0]:  # a second Ctrl-C right after the first was reported (outside the run's handler)
        return EXIT_INTERRUPTED
    _interrupt_shown[0] = True
    published = _published_count()
    if published:  # the Ctrl-C came once the outputs were published (a batch is published whole or not at all)
        msg = (f"interrupted: the outputs were already written ({published} file{'s' if published != 1 else ''}, "
               f"kept whole); nothing partial was left")
    else:
        msg = "interrupted: stopped before finishing; no partial outputs were kept"
    if as_json:
        print(json.dumps({"error": {"type": "execution_interrupted", "message": msg, "details": "",
                                    "extra_info": {}}, "node_errors": {}}))
    else:
        print(msg, file=sys.stderr)
    return EXIT_INTERRUPTED


def _silence_closed_pipes() -> None:
    """The reader of stdout/stderr went away (`twinflow nodes --json | head`): send whatever is still
    buffered, and everything printed later (interpreter exit included), to the null device, as Unix tools
    do, instead of raising BrokenPipeError again at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                os.dup2(null, stream.fileno())
            except (OSError, ValueError):
                pass
    os.close(null)


def _ignore_sigint() -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def main(argv=None) -> int:
    """Entry point of the `twinflow` console script; returns the exit code.

    Called with no arguments (the console script, `python -m`), main is the process: once the outcome is
    decided a further Ctrl-C is ignored, so exit handlers never print a traceback, and closed pipes are
    silenced. A Ctrl-C at any moment (imports, parsing, the run, printing) exits 130 with one line."""
    process = argv is None
    as_json = "--json" in (sys.argv[1:] if argv is None else list(argv))
    _interrupt_shown[0] = False
    if "twinflow.core.outputs" in sys.modules:  # count only this call's outputs (tests call main repeatedly)
        sys.modules["twinflow.core.outputs"].reset_published_count()
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # a Ctrl-C outside the run's own handling: imports, parsing, printing
        if process:
            _ignore_sigint()
        try:
            code = _interrupted(as_json)
        except BrokenPipeError:
            code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = EXIT_PIPE
    if process:
        _ignore_sigint()  # the outcome is decided: a Ctrl-C during exit handlers changes nothing
        _remove_leftovers()  # a temp file whose writer's cleanup a second Ctrl-C cut short
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            _silence_closed_pipes()
            code = code if code != EXIT_OK else EXIT_PIPE
    return code


def _main(argv) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage / --version
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    _setup_logging(args.verbose)
    if getattr(args, "models_dir", None):
        paths.set_models_dir(args.models_dir)
    if getattr(args, "extra_model_paths", None):
        paths.set_extra_model_paths(args.extra_model_paths)
    if getattr(args, "input_dir", None):
        paths.set_input_dir(args.input_dir)
    func = getattr(args, "func", None) or COMMANDS.get(args.command)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    as_json = bool(getattr(args, "json", False))
    try:
        return int(func(args) or 0)
    except (Interrupted, KeyboardInterrupt):
        return _interrupted(as_json)
    except BrokenPipeError:
        _silence_closed_pipes()
        return EXIT_PIPE
    except MemoryError as e:  # an allocation outside any node (nodes report theirs as a node error)
        _print_error(TwinFlowError(f"out of memory: {e or 'an allocation failed'}; lower the resolution, "
                                   f"length or batch size"), as_json, args.verbose)
        return EXIT_ERROR
    except (TwinFlowError, ValueError, TypeError, OSError) as e:
        # Our boundaries raise these with a message that says what to fix (STYLE.md); -v adds the traceback.
        _print_error(e, as_json, args.verbose)
        if args.verbose and not isinstance(e, WorkflowError):
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        return EXIT_ERROR
    finally:
        progress.set_backend(None)


if __name__ == "__main__":
    raise SystemExit(main())
