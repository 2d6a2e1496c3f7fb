"""`twinflow batch JOBS.jsonl [--ray [ADDRESS]]`: run many jobs (a workflow + overrides each) through the
server's queue and worker - in this process, or on Ray actors - without HTTP (aiohttp is not needed).

A line of JOBS.jsonl: `{"workflow": "path/to/wf.json" | {API or UI workflow}, "overrides": {"7.seed": 3}
| ["7.seed=3"], "id": "optional name"}`; a relative path is relative to the JSONL file. Every line is
loaded and validated before anything runs (errors name the line). One JSON line per job is printed, in
the order of the file, as jobs finish: `{"line", "id", "prompt_id", "status", "files", "error"}`.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from ...core import paths
from ...core.errors import WorkflowError
from ..api import apply_overrides, default_registry
from ..formats import load_workflow
from ..validate import validate_prompt
from .models import ModelCache, with_model_cache
from .queue import PromptQueue


def load_jobs(jobs_path: Path, registry: dict) -> list:
    """[(line number, id, prompt, extra_data, validated)]; WorkflowError naming the line for a bad one."""
    jobs = []
    text = jobs_path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{jobs_path}:{n}"
        try:
            job = json.loads(line)
        except ValueError as e:
            raise WorkflowError(f"{where}: not a JSON object ({e}); each line is "
                                f'{{"workflow": PATH, "overrides": {{"7.seed": 3}}}}', type="invalid_prompt") from None
        if not isinstance(job, dict) or "workflow" not in job:
            raise WorkflowError(f"{where}: a job must be a JSON object with a 'workflow' key", type="invalid_prompt")
        unknown = set(job) - {"workflow", "overrides", "id"}
        if unknown:
            raise WorkflowError(f"{where}: unknown key(s) {sorted(unknown)}; a job has workflow, overrides, id",
                                type="invalid_prompt")
        wf = job["workflow"]
        if isinstance(wf, str) and not wf.lstrip().startswith("{"):
            p = Path(wf)
            wf = p if p.is_absolute() else jobs_path.parent / p
        try:
            loaded = load_workflow(wf, registry)
            prompt = apply_overrides(loaded.prompt, job.get("overrides"), registry)
            validated = validate_prompt(prompt, registry)
        except WorkflowError as e:
            raise WorkflowError(f"{where}: {e}", type=e.type, node_errors=e.node_errors) from None
        extra = {"extra_pnginfo": loaded.extra_pnginfo} if loaded.extra_pnginfo else {}  # as `twinflow run`
        jobs.append((n, str(job.get("id", n)), prompt, extra, validated))
    if not jobs:
        raise WorkflowError(f"{jobs_path}: no jobs (one JSON object per line)", type="invalid_prompt")
    return jobs


def _files(outputs: dict, output_dir: Path) -> list:
    return [str(output_dir / e.get("subfolder", "") / e["filename"]) for ui in outputs.values()
            for v in ui.values() if isinstance(v, list) for e in v
            if isinstance(e, dict) and "filename" in e and e.get("type", "output") == "output"]


def run_batch(jobs_path, *, output_dir=None, input_dir=None, models_dir=None, ray: Optional[str] = None,
              ray_actors: int = 0, model_cache_bytes: int = 2**34, out=sys.stdout) -> list:
    """Run every job; returns the result dicts (also printed to `out` as JSON lines)."""
    cache = ModelCache(model_cache_bytes)
    registry = with_model_cache(default_registry(), cache)
    with paths.using(models_dir=models_dir):
        jobs = load_jobs(Path(jobs_path), registry)
    out_dir = Path(output_dir) if output_dir else paths.output_dir()
    in_dir = Path(input_dir) if input_dir else paths.input_dir()
    queue = PromptQueue(max_pending=len(jobs))

    def send(event, data, sid=None):
        pass

    if ray is not None:
        from .ray_pool import RayWorker

        worker = RayWorker(queue, send, address=ray or None, actors=ray_actors, output_dir=out_dir, input_dir=in_dir,
                           models_dir=models_dir, model_cache_bytes=model_cache_bytes)
    else:
        from .worker import Worker

        worker = Worker(registry, queue, send, model_cache=cache)
    ids = {}
    for i, (n, job_id, prompt, extra, validated) in enumerate(jobs):
        pid = str(uuid.uuid4())
        ids[pid] = (n, job_id)
        queue.put(i, pid, prompt, extra, validated.outputs, validated)
    results = []
    with paths.using(output_dir=out_dir, input_dir=in_dir, models_dir=models_dir):
        worker.start()
        try:
            pending = list(ids)
            while pending:
                if not worker.alive:
                    raise RuntimeError(f"the worker stopped: {worker.not_ready_reason or 'see the log'}")
                entry = queue.history(pending[0]).get(pending[0])
                if entry is None:
                    time.sleep(0.05)
                    continue
                pid = pending.pop(0)
                n, job_id = ids[pid]
                status = entry["status"]
                err = next((d.get("exception_message") or d.get("reason") for e, d in reversed(status["messages"])
                            if e in ("execution_error", "execution_interrupted")), None) if not status["completed"] else None
                res = {"line": n, "id": job_id, "prompt_id": pid, "status": status["status_str"],
                       "files": _files(entry["outputs"], out_dir), "error": err}
                results.append(res)
                print(json.dumps(res), file=out, flush=True)
        finally:
            worker.stop()
    return results
