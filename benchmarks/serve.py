"""Serving benchmark: N prompts from C concurrent API clients against `twinflow serve` or ComfyUI's own server.

    python -m twinflow.benchmarks.serve --server twinflow [--prompts 60] [--clients 8] [--steps 2]
    python -m twinflow.benchmarks.serve --server comfyui --comfyui /path/to/ComfyUI [--comfyui-python PY]
    python -m twinflow.benchmarks.serve --url http://127.0.0.1:8188 [--pid PID]    # a server already running
    python -m twinflow.benchmarks.serve --smoke          # 4 prompts, 2 clients, 1 step: checks the plumbing

Needs aiohttp (the `serve` extra) in the interpreter that runs it.

What runs: the repository's dual-branch workflow (workflows/dual_branch_t2v.json, tiny random models) at
`--steps` steps, `--size`x`--size` px and `--frames` frames, ending in one PNG per prompt (TwinFlowSaveImage),
each prompt with its own seed (base seed + index), so no prompt is answered from the execution cache. The
same API prompts go to either server: ComfyUI runs them through TwinFlow installed as a custom node (a fresh
`--base-directory` whose custom_nodes/twinflow is a symlink to this checkout; nothing in the ComfyUI
checkout is modified).

Method:
  * a started server gets fresh input/output folders under `--workdir` (default a temp folder, removed
    unless --keep) and is run on 127.0.0.1 with a free port; ComfyUI gets `--cpu` unless --comfyui-gpu;
  * `--warmup` prompts (default 1) run first, one at a time, and are not counted (model load, first-call
    allocations); then the resident memory of the server process (VmRSS in /proc/<pid>/status) is read;
  * C clients, each with its own WebSocket (`/ws?clientId=`), take prompts from one shared list: POST
    /prompt with a client-made `prompt_id`, wait for `executing` with node None for that id (as ComfyUI's
    websockets_api_example.py), then GET /history/{id}; latency = POST to that message;
  * throughput = counted prompts / wall time from the first POST to the last completion;
  * VmRSS is read again after the last prompt (and a gc pause of 2 s, as both servers collect lazily);
  * counts: completed with status success, distinct prompt ids, image outputs listed in the histories, and
    (for a started server) PNG files found under the output folder.
Timings are only meaningful on a quiet machine; compare two servers only from runs on the same machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the package root: ComfyUI loads it as a custom node
WORKFLOW = REPO / "workflows" / "dual_branch_t2v.json"
START_TIMEOUT_S = 300


def build_prompt(seed: int, steps: int, size: int, frames: int, prefix: str = "bench/img") -> dict:
    """The dual-branch workflow in API form, shrunk, saving one PNG per decoded frame."""
    from ..runner.api import default_registry
    from ..runner.formats import load_workflow

    p = load_workflow(WORKFLOW, default_registry()).prompt
    p["7"]["inputs"].update(steps=steps, seed=seed)
    p["6"]["inputs"].update(width=size, height=size, length=frames)
    p["10"] = {"class_type": "TwinFlowSaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}}
    del p["11"]
    for node in p.values():
        node.pop("_meta", None)
    return p


def vm_rss(pid: int) -> int:
    """VmRSS of process `pid` in bytes (0 where /proc cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Started:
    """A server subprocess on 127.0.0.1 with its own folders under `work`."""

    def __init__(self, kind: str, work: Path, comfyui: str | None = None, comfyui_python: str | None = None,
                 comfyui_gpu: bool = False):
        self.kind, self.work = kind, work
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"{kind}.log"
        env = dict(os.environ)
        if kind == "twinflow":
            self.output = work / "output"
            cmd = [sys.executable, "-m", "twinflow.runner", "serve", "--port", str(self.port),
                   "--output-dir", str(self.output), "--input-dir", str(work / "input"),
                   "--models-dir", str(work / "models")]
            cwd = None
        else:
            if not comfyui or not (Path(comfyui) / "main.py").is_file():
                raise SystemExit(f"--server comfyui needs --comfyui PATH of a ComfyUI checkout (main.py), got {comfyui!r}")
            base = work / "comfy_base"
            (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
            link = base / "custom_nodes" / "twinflow"
            if not link.exists():
                os.symlink(REPO, link, target_is_directory=True)
            self.output = base / "output"
            py = comfyui_python or _comfy_python(Path(comfyui))
            cmd = [py, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
                   "--disable-api-nodes", "--disable-auto-launch"] + ([] if comfyui_gpu else ["--cpu"])
            cwd = comfyui
            for k in ("TWINFLOW_MODELS_DIR", "TWINFLOW_OUTPUT_DIR", "PYTHONPATH"):
                env.pop(k, None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    async def wait_ready(self, session) -> None:
        path = "/ready" if self.kind == "twinflow" else "/system_stats"
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.kind} exited with {self.proc.returncode}; log {self.log_path}:\n"
                                 f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                async with session.get(self.url + path) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.5)
        raise SystemExit(f"{self.kind} did not answer {path} within {START_TIMEOUT_S} s; log {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()


def _comfy_python(root: Path) -> str:
    for cand in (root / "venv", root.parent / "venv", root / ".venv"):
        py = cand / "bin" / "python"
        if py.is_file():
            return str(py)
    return sys.executable


class Client:
    """One API client: a WebSocket for completion messages, HTTP for /prompt and /history."""

    def __init__(self, session, url: str):
        self.session, self.url = session, url
        self.client_id = str(uuid.uuid4())
        self.ws = None
        self.waiting: dict[str, asyncio.Future] = {}
        self._reader = None

    async def connect(self) -> None:
        ws_url = self.url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import aiohttp

        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # binary previews
            m = json.loads(msg.data)
            data = m.get("data") or {}
            if m.get("type") == "executing" and data.get("node") is None:
                fut = self.waiting.pop(data.get("prompt_id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the WebSocket closed before the prompt finished"))

    async def run(self, prompt: dict, timeout: float) -> tuple[str, float, dict]:
        pid = str(uuid.uuid4())
        fut = asyncio.get_running_loop().create_future()
        self.waiting[pid] = fut
        t0 = time.perf_counter()
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": pid}
        async with self.session.post(self.url + "/prompt", json=body) as r:
            if r.status != 200:
                self.waiting.pop(pid, None)
                raise RuntimeError(f"POST /prompt answered {r.status}: {(await r.text())[:500]}")
        t1 = await asyncio.wait_for(fut, timeout)
        async with self.session.get(f"{self.url}/history/{pid}") as r:
            entry = (await r.json()).get(pid, {})
        return pid, t1 - t0, entry

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def _images(entry: dict) -> list:
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])
            if img.get("type", "output") == "output"]


def _percentile(sorted_vals: list, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default 'linear' method)."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


async def drive(args, url: str, pid: int | None, output: Path | None) -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if args.started is not None:
            await args.started.wait_ready(session)
        warm = Client(session, url)
        await warm.connect()
        for i in range(args.warmup):
            _, _, entry = await warm.run(build_prompt(args.seed - 1 - i, args.steps, args.size, args.frames,
                                                     "bench/warmup"), args.timeout)
            status = entry.get("status", {}).get("status_str")
            if status != "success":
                raise SystemExit(f"the warm-up prompt did not succeed (status {status!r}): "
                                 f"{json.dumps(entry.get('status', {}))[:2000]}")
        await warm.close()
        await asyncio.sleep(args.settle)
        rss_before = vm_rss(pid) if pid else 0
        prompts = [build_prompt(args.seed + i, args.steps, args.size, args.frames) for i in range(args.prompts)]
        todo = list(range(args.prompts))
        results: list = []
        errors: list = []

        async def one_client():
            c = Client(session, url)
            await c.connect()
            try:
                while todo:
                    i = todo.pop(0)
                    try:
                        results.append((i, *await c.run(prompts[i], args.timeout)))
                    except Exception as e:  # counted and reported; the run goes on
                        errors.append(f"prompt {i}: {type(e).__name__}: {e}")
            finally:
                await c.close()

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(args.clients)))
        wall = time.perf_counter() - start
        await asyncio.sleep(args.settle)
        rss_after = vm_rss(pid) if pid else 0

    lat = sorted(r[2] for r in results)
    ok = [r for r in results if r[3].get("status", {}).get("status_str") == "success"]
    listed = [img for r in ok for img in _images(r[3])]
    on_disk = None
    if output is not None:
        on_disk = len([p for p in (output / "bench").glob("img*.png")]) if (output / "bench").is_dir() else 0
    return {
        "url": url, "prompts": args.prompts, "clients": args.clients, "steps": args.steps, "size": args.size,
        "frames": args.frames, "completed": len(results), "succeeded": len(ok),
        "distinct_prompt_ids": len({r[1] for r in results}), "images_listed": len(listed),
        "distinct_images_listed": len({(i["subfolder"], i["filename"]) for i in listed}),
        "png_files_on_disk": on_disk, "errors": errors,
        "wall_s": wall, "throughput_prompts_per_s": len(ok) / wall if wall > 0 else float("nan"),
        "latency_s": [r[2] for r in sorted(results)], "p50_s": _percentile(lat, 0.50), "p95_s": _percentile(lat, 0.95),
        "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
    }


def report(res: dict, label: str) -> str:
    rss = ""
    if res["rss_before_bytes"]:
        b, a = res["rss_before_bytes"] / 2**20, res["rss_after_bytes"] / 2**20
        rss = f"; server VmRSS {b:.1f} MiB before, {a:.1f} MiB after ({(a / b - 1) * 100:+.1f}%)"
    disk = "" if res["png_files_on_disk"] is None else f", {res['png_files_on_disk']} PNG files on disk"
    return (f"{label}: {res['succeeded']}/{res['prompts']} prompts succeeded from {res['clients']} clients "
            f"({res['steps']} steps, {res['size']}x{res['size']}x{res['frames']}) in {res['wall_s']:.2f} s = "
            f"{res['throughput_prompts_per_s']:.2f} prompts/s; latency p50 {res['p50_s']:.3f} s, p95 "
            f"{res['p95_s']:.3f} s; {res['images_listed']} images in the histories{disk}{rss}"
            + (f"\n  {len(res['errors'])} errors, first: {res['errors'][0]}" if res["errors"] else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("twinflow", "comfyui"), default="twinflow",
                    help="which server to start (ignored with --url)")
    ap.add_argument("--url", help="drive a server that is already running (e.g. http://127.0.0.1:8188)")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for VmRSS before/after")
    ap.add_argument("--comfyui", help="ComfyUI checkout for --server comfyui (its main.py is started)")
    ap.add_argument("--comfyui-python", help="ComfyUI's interpreter (default: a venv beside/inside the checkout)")
    ap.add_argument("--comfyui-gpu", action="store_true", help="do not pass --cpu to ComfyUI")
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="width = height in pixels")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1000, help="prompt i gets seed + i")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted prompts run first, one at a time")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each VmRSS reading")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one prompt may take")
    ap.add_argument("--workdir", help="folder for the started server's files (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (outputs, server log)")
    ap.add_argument("--json", help="write the results (with every latency) to this file")
    ap.add_argument("--smoke", action="store_true", help="4 prompts, 2 clients, 1 step, no settle pauses")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.clients, args.steps, args.settle = 4, 2, 1, 0.0
    if args.prompts < 1 or args.clients < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--prompts, --clients and --steps must be >= 1, --warmup >= 0")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print('error: the serving benchmark needs aiohttp: pip install "comfyui-twinflow[serve]"', file=sys.stderr)
        return 2

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="twinflow-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    args.started = None
    try:
        if args.url:
            url, pid, output, label = args.url.rstrip("/"), args.pid, None, f"server at {args.url}"
        else:
            args.started = Started(args.server, work, args.comfyui, args.comfyui_python, args.comfyui_gpu)
            url, pid, output = args.started.url, args.started.pid, args.started.output
            label = f"{args.server} (started, pid {pid})"
        res = asyncio.run(drive(args, url, pid, output))
    finally:
        if args.started is not None:
            args.started.stop()
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["server"] = args.server if not args.url else "url"
    print(report(res, label))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["succeeded"] == args.prompts else 1


if __name__ == "__main__":
    sys.exit(main())
