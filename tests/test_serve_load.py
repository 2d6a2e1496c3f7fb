"""Load: 200 prompts from 8 concurrent ComfyUI-protocol clients against `twinflow serve` (a subprocess on
127.0.0.1, tiny presets, 1 step): no prompt or output lost or duplicated, every history entry complete,
and no memory creep (resident memory of the server process, VmRSS in /proc/<pid>/status, after the last 100
prompts within 10% of after the first 100). Prints p50/p95 latency (POST /prompt to the client's last image)
and throughput; they are printed, never asserted (tests assert behaviour, not wall-clock time)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from statistics import quantiles

import pytest

pytest.importorskip("aiohttp")

from serve_client import ComfyClient  # noqa: E402

from twinflow.runner.api import default_registry  # noqa: E402
from twinflow.runner.formats import load_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIENTS, PER_CLIENT = 8, 25


def load_prompt(seed: int) -> dict:
    """The dual-branch workflow at its smallest: 1 step, one 32x32 frame, saved as one PNG."""
    p = load_workflow(ROOT / "workflows" / "dual_branch_t2v.json", default_registry()).prompt
    p["7"]["inputs"].update(steps=1, seed=seed)
    p["6"]["inputs"].update(width=32, height=32, length=1)
    p["10"] = {"class_type": "TwinFlowSaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "load/img"}}
    del p["11"]
    return p


class ServeProcess:
    """`python -m twinflow.runner serve --port 0` in a subprocess; the port is read from its first line."""

    def __init__(self, tmp: Path, *extra: str):
        self.log = tmp / "serve.log"
        self.out = tmp / "output"
        cmd = [sys.executable, "-m", "twinflow.runner", "serve", "--port", "0", "--output-dir", str(self.out),
               "--input-dir", str(tmp / "input"), "--models-dir", str(tmp / "models"), *extra]
        self._f = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT)
        end = time.monotonic() + 180
        while time.monotonic() < end:
            m = re.search(r"listening on (http://\S+) ", self.log.read_text())
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"twinflow serve did not start:\n{self.log.read_text()}")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def rss_bytes(self) -> int:
        """VmRSS of the server process from /proc/<pid>/status (read by the test, not reported by the server)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    value, unit = line.split()[1:3]
                    assert unit == "kB", line
                    return int(value) * 1024
        raise AssertionError(f"no VmRSS line in /proc/{self.proc.pid}/status")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._f.close()
        return self.proc.returncode


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_200_prompts_from_8_clients(tmp_path, capsys):
    server = ServeProcess(tmp_path)
    results: dict = {}
    latency: list = []
    errors: list = []
    rss: dict = {}
    done = threading.Event()

    def client(k: int):
        c = ComfyClient(server.url.split("//", 1)[1], timeout=300)
        ws = c.connect()
        try:
            for i in range(PER_CLIENT):
                seed = k * 1000 + i
                t0 = time.perf_counter()
                pid, images = c.get_images(ws, load_prompt(seed))
                latency.append(time.perf_counter() - t0)
                results[pid] = (seed, images)
        except Exception as e:  # collected: an assertion below names it
            errors.append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            ws.close()

    def monitor():
        while not done.is_set():
            t = server.get("/system_stats")["twinflow"]
            if t["prompts_done"] >= 100 and "first" not in rss:
                rss["first"] = server.rss_bytes()
                rss["first_at"] = t["prompts_done"]
            time.sleep(0.2)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    start = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        wall = time.perf_counter() - start
        done.set()
        mon.join(30)
        assert not errors, errors
        stats = server.get("/system_stats")["twinflow"]
        rss["last"] = server.rss_bytes()
        history = server.get("/history")
        queue = server.get("/queue")
    finally:
        done.set()
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    n = CLIENTS * PER_CLIENT
    q = quantiles(latency, n=100)
    with capsys.disabled():
        print(f"\nserve load: {n} prompts from {CLIENTS} clients in {wall:.1f} s = {n / wall:.2f} prompts/s; "
              f"latency p50 {q[49]:.3f} s, p95 {q[94]:.3f} s; server VmRSS after prompt {rss.get('first_at')} "
              f"{rss.get('first', 0) / 2**20:.1f} MiB, after prompt {n} {rss['last'] / 2**20:.1f} MiB")
    # nothing lost, nothing duplicated
    assert len(results) == n and stats["prompts_done"] == n and sorted(history) == sorted(results)
    assert queue == {"queue_running": [], "queue_pending": []}
    names = []
    for pid, (seed, images) in results.items():
        entry = history[pid]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"], pid
        assert entry["prompt"][1] == pid and entry["prompt"][2]["7"]["inputs"]["seed"] == seed
        assert [m[0] for m in entry["status"]["messages"]][::2] == ["execution_start", "execution_success"]
        files = entry["outputs"]["10"]["images"]
        assert len(files) == 1 and len(images["10"]) == 1
        path = server.out / files[0]["subfolder"] / files[0]["filename"]
        assert path.read_bytes() == images["10"][0]
        names.append(files[0]["filename"])
    assert len(set(names)) == n
    written = sorted(p.name for p in (server.out / "load").iterdir())
    assert written == sorted(names)  # no extra, partial or temp files
    # no memory creep between the first and the last 100 prompts
    assert rss["first"] > 0 and rss["last"] <= 1.10 * rss["first"], rss
