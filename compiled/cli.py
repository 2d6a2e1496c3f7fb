"""`twinflow plan WORKFLOW` and `twinflow cache ls|clear` (added to the runner's CLI by add_commands)."""
from __future__ import annotations

import json
import sys
import time


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="show which sub-graphs of a workflow would compile, with which profile and "
                       "backend, cache hit/miss and build estimates (nothing runs)")
    p.add_argument("workflow", help="workflow file (UI or API JSON)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "inductor", "eager"), default=None,
                   help="backend for sub-graphs without a Compile node (as `run --compile` would use)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)

    c = sub.add_parser("cache", help="list or clear the compile artifact cache")
    c.add_argument("action", choices=("ls", "clear"))
    c.add_argument("--dir", default=None, help="cache directory (default: $TWINFLOW_CACHE_DIR or the user cache dir)")
    c.set_defaults(func=_cache)


def _plan(args) -> int:
    from ..runner.formats import load_workflow
    from .plan import format_plan, plan_workflow

    wf = load_workflow(args.workflow)
    plan = plan_workflow(wf.prompt, backend=args.backend)
    sys.stdout.write((json.dumps(plan, indent=1) if args.json else format_plan(plan)) + "\n")
    return 0


def _cache(args) -> int:
    from .cache import ArtifactCache

    cache = ArtifactCache(args.dir)
    if args.action == "clear":
        n = cache.clear()
        sys.stdout.write(f"removed {n} entries from {cache.root}\n")
        return 0
    entries = cache.entries()
    sys.stdout.write(f"{cache.root}: {len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB\n")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        sys.stdout.write(f"  {e['key']}  {e['backend'] or '?':9s} {e['bytes'] / 1e6:9.1f} MB  used {used}  {e['label']}\n")
    return 0
