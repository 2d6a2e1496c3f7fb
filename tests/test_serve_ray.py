"""`twinflow serve --ray`: prompts run on Ray actors of a local cluster (2 CPU slots, loopback), with the
in-process server as the oracle (the cluster listens on loopback only: checked): byte-identical output files for the same prompts, the same message
sequence, and an actor killed mid-prompt (SIGKILL to its process) costs a retry, never a lost prompt or a
file written twice. Skipped without ray (the `ray` extra) or aiohttp (the `serve` extra)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
ray = pytest.importorskip("ray")

from serve_client import ComfyClient  # noqa: E402

from twinflow.runner.api import default_registry  # noqa: E402
from twinflow.runner.formats import load_workflow  # noqa: E402
from twinflow.runner.serve.app import ServeConfig, ServerThread  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and its actors start in ~30-60 s on 2 cores

ROOT = Path(__file__).resolve().parents[1]


def prompt(seed: int, steps: int = 2, size: int = 32, frames: int = 1) -> dict:
    p = load_workflow(ROOT / "workflows" / "dual_branch_t2v.json", default_registry()).prompt
    p["7"]["inputs"].update(steps=steps, seed=seed)
    p["6"]["inputs"].update(width=size, height=size, length=frames)
    p["10"] = {"class_type": "TwinFlowSaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "ray/img"}}
    del p["11"]
    return p


def _cfg(d: Path, **kw) -> ServeConfig:
    return ServeConfig(port=0, output_dir=str(d / "output"), input_dir=str(d / "input"), temp_dir=str(d / "temp"),
                       models_dir=str(d / "models"), **kw)


def _wait_ready(st, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if st.server.worker.ready:
            return
        assert st.server.worker.alive, st.server.worker.not_ready_reason
        time.sleep(0.2)
    raise AssertionError("the Ray actors did not come up")


class one_thread:
    """Ray gives an actor with num_cpus=1 one intra-op thread (OMP_NUM_THREADS=1); the in-process oracle
    runs with the same, since a different thread count changes float reduction order (and PNG bytes)."""

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


def _run_all(st, prompts) -> dict:
    """Run prompts one after another through a ComfyUI-protocol client; {seed: (messages, {node: [bytes]})}."""
    out = {}
    c = ComfyClient(st.url.split("//", 1)[1], timeout=300)
    ws = c.connect()
    try:
        for p in prompts:
            c.messages.clear()
            pid, images = c.get_images(ws, p)
            out[p["7"]["inputs"]["seed"]] = ([m for m in c.messages if m["type"] != "status"], images, pid)
    finally:
        ws.close()
    return out


def _summary(messages) -> tuple:
    """Event types without `executing`, and the sampler's progress (value, max) relayed from the actor."""
    types = [m["type"] for m in messages if m["type"] not in ("executing", "progress")]
    steps = [(m["data"]["value"], m["data"]["max"]) for m in messages
             if m["type"] == "progress" and m["data"]["node"] == "7"]
    executed = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"] is not None]
    assert steps == [(1, 2), (2, 2)] and executed[-2:] == ["9", "10"]
    return types, steps


@pytest.fixture(scope="module")
def local_ray():
    from twinflow.runner.serve.ray_pool import init_local_ray

    init_local_ray(num_cpus=2)  # what `twinflow serve --ray` without an address starts: loopback only
    try:
        yield
    finally:
        ray.shutdown()


def _descendants(root: int) -> set:
    children: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _listening_sockets() -> dict:
    """{socket inode: (ip, port)} of every listening TCP socket (IPv4 and IPv6) of this network namespace."""
    import ipaddress

    found = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hexip, port = f[1].split(":")
            raw = bytes.fromhex(hexip)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if v6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found[int(f[9])] = (ip, int(port, 16))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_local_ray_listens_on_loopback_only(tmp_path, local_ray):
    """Every TCP listener of the local cluster's processes (GCS, raylet, agents, the actors, this driver's
    core worker) is on a loopback address: nothing of the cluster is reachable from another machine."""
    with ServerThread(_cfg(tmp_path, ray="")) as st:
        _wait_ready(st)
        actor_pids = set(ray.get([a.pid.remote() for a in st.server.worker.actors]))
        sockets = _listening_sockets()
        seen = []
        for pid in _descendants(os.getpid()):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:[") and int(target[8:-1]) in sockets:
                    seen.append((pid, name, *sockets[int(target[8:-1])]))
    names = {n for _, n, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and actor_pids <= {p for p, *_ in seen}, seen  # the scan sees them
    public = [s for s in seen if not s[2].is_loopback]
    assert public == [], f"Ray processes listening beyond loopback: {public}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def test_ray_outputs_equal_in_process_and_killed_actor_is_retried(tmp_path, local_ray):
    prompts = [prompt(seed) for seed in (1, 2, 3)]
    with one_thread(), ServerThread(_cfg(tmp_path / "local")) as st:
        ref = _run_all(st, prompts)
    with ServerThread(_cfg(tmp_path / "ray", ray="")) as st:
        _wait_ready(st)
        assert len(st.server.worker.actors) == 2  # one per CPU slot
        got = _run_all(st, prompts)
        for seed in ref:
            assert got[seed][1] == ref[seed][1]  # byte-identical PNGs, downloaded through /view
            # the same messages, except which loaders ran: each actor has its own execution cache
            assert _summary(got[seed][0]) == _summary(ref[seed][0]), seed

        # kill the actor's process in the middle of a longer prompt
        long = prompt(7, steps=30, size=64, frames=5)
        c = ComfyClient(st.url.split("//", 1)[1], timeout=300)
        ws = c.connect()
        killed = {}
        try:
            pid = "killed-mid-prompt"
            c.queue_prompt(long, pid)
            while "pid" not in killed:
                m = ws.recv()
                if isinstance(m, str):
                    m = json.loads(m)
                    if m["type"] == "progress" and m["data"]["prompt_id"] == pid and m["data"]["node"] == "7":
                        killed["pid"] = st.server.worker.actor_pid(pid)
                        os.kill(killed["pid"], signal.SIGKILL)
            while True:
                m = ws.recv()
                if isinstance(m, str):
                    m = json.loads(m)
                    if m["type"] == "executing" and m["data"] == {"node": None, "prompt_id": pid}:
                        break
            entry = c.get_history(pid)[pid]
        finally:
            ws.close()
        assert st.server.worker.retries == 1
        events = [e for e, _ in entry["status"]["messages"]]
        assert events[0] == "execution_start" and events[-1] == "execution_success", events
        died = [d for e, d in entry["status"]["messages"] if e == "execution_error"]
        assert len(died) == 1 and died[0]["exception_type"] == "ActorDiedError" and died[0]["retrying"] is True
        assert entry["status"]["status_str"] == "success"
        files = entry["outputs"]["10"]["images"]
        assert len(files) == 5
        out = tmp_path / "ray" / "output"
        names = sorted(p.name for p in (out / "ray").iterdir())
        assert len(names) == 3 + 5 and len(set(names)) == len(names)  # nothing written twice
        assert not (out / ".twinflow-ray").exists()  # the dead attempt's staging folder is gone
        # and the retried prompt's files equal the in-process server's
    with one_thread(), ServerThread(_cfg(tmp_path / "local2")) as st:
        ref_long = _run_all(st, [long])
    got_long = [(out / f["subfolder"] / f["filename"]).read_bytes() for f in files]
    assert got_long == ref_long[7][1]["10"]


def test_batch_on_ray_equals_in_process(tmp_path, local_ray):
    import io

    from twinflow.runner.serve.batch import run_batch

    p = prompt(0)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"workflow": p, "overrides": {"7.seed": s}}) + "\n" for s in (11, 12, 13)))
    with one_thread():
        ref = run_batch(jobs, output_dir=tmp_path / "local", models_dir=tmp_path / "models", out=io.StringIO())
    got = run_batch(jobs, output_dir=tmp_path / "ray", models_dir=tmp_path / "models", ray="", out=io.StringIO())
    assert [r["status"] for r in got] == ["success"] * 3 and [r["line"] for r in got] == [1, 2, 3]
    for r, g in zip(ref, got):
        assert len(g["files"]) == 1
        assert Path(g["files"][0]).read_bytes() == Path(r["files"][0]).read_bytes()


def test_interrupt_a_prompt_running_on_an_actor(tmp_path, local_ray):
    with ServerThread(_cfg(tmp_path, ray="")) as st:
        _wait_ready(st)
        c = ComfyClient(st.url.split("//", 1)[1], timeout=300)
        ws = c.connect()
        try:
            pid = "to-interrupt"
            c.queue_prompt(prompt(3, steps=200, size=64, frames=5), pid)
            while True:
                m = ws.recv()
                if isinstance(m, str) and json.loads(m)["type"] == "progress":
                    break
            req = urllib.request.Request(f"{st.url}/interrupt", data=json.dumps({"prompt_id": pid}).encode())
            assert json.loads(urllib.request.urlopen(req, timeout=60).read()) == {"interrupted": True}
            while True:
                m = ws.recv()
                if isinstance(m, str) and json.loads(m) == {"type": "executing", "data": {"node": None, "prompt_id": pid}}:
                    break
            entry = c.get_history(pid)[pid]
        finally:
            ws.close()
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert entry["status"]["messages"][-1][1]["node_id"] == "7"
    out = tmp_path / "output"
    assert not any(p.is_file() for p in out.rglob("*"))  # nothing published, staging removed


def test_prompt_timeout_on_an_actor(tmp_path, local_ray):
    with ServerThread(_cfg(tmp_path, ray="", prompt_timeout=1.0)) as st:
        _wait_ready(st)
        long = prompt(4, steps=1000, size=64, frames=5)
        long["7"]["inputs"]["sampler"] = "euler"  # uni_pc divides by zero at 1000 steps (a sampler bug, not ours)
        req = urllib.request.Request(f"{st.url}/prompt", data=json.dumps({"prompt": long, "prompt_id": "too-long"}).encode())
        urllib.request.urlopen(req, timeout=60).read()
        end = time.monotonic() + 300
        entry = None
        while time.monotonic() < end and entry is None:
            entry = json.loads(urllib.request.urlopen(f"{st.url}/history/too-long", timeout=60).read()).get("too-long")
            time.sleep(0.2)
    assert entry is not None and entry["status"]["status_str"] == "error"
    event, data = entry["status"]["messages"][-1]
    assert event == "execution_error" and data["exception_type"] == "TimeoutError"
    assert "--prompt-timeout" in data["exception_message"] and data["node_id"] in {str(i) for i in range(1, 11)}


def _sequence(st, p, pid) -> list:
    """Every message a ComfyUI client gets for prompt `pid`, in order: JSON ones without their timestamps
    (and without the queue `status` broadcasts), binary ones as bytes."""
    c = ComfyClient(st.url.split("//", 1)[1], timeout=300)
    ws = c.connect()
    seq = []
    try:
        c.queue_prompt(p, pid)
        while True:
            m = ws.recv()
            if isinstance(m, bytes):
                seq.append(m)
                continue
            m = json.loads(m)
            if m["type"] == "status":
                continue
            m["data"].pop("timestamp", None)
            seq.append(m)
            if m == {"type": "executing", "data": {"node": None, "prompt_id": pid}}:
                return seq
    finally:
        ws.close()


def test_progress_and_previews_relayed_from_actors(tmp_path, local_ray):
    """With --previews, a client of the Ray server gets the very messages of the in-process server, in the
    same order: executing / progress per sampler step / a binary JPEG frame per step (the same bytes) /
    executed / execution_success (fresh caches on both sides, so the same nodes run)."""
    p = prompt(5, steps=3)
    with one_thread(), ServerThread(_cfg(tmp_path / "local", previews=True)) as st:
        ref = _sequence(st, p, "relayed")
    with ServerThread(_cfg(tmp_path / "ray", ray="", previews=True)) as st:
        _wait_ready(st)
        got = _sequence(st, p, "relayed")
    steps = [m for m in ref if isinstance(m, dict) and m["type"] == "progress" and m["data"]["node"] == "7"]
    frames = [m for m in ref if isinstance(m, bytes)]
    assert len(steps) == 3 and len(frames) == 3 and frames[0][:4] == b"\x00\x00\x00\x01"  # JPEG frames
    assert [m if isinstance(m, dict) else ("binary", len(m)) for m in got] == \
        [m if isinstance(m, dict) else ("binary", len(m)) for m in ref]
    assert got == ref  # and the preview frames are the same bytes


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_warmup_runs_on_every_actor_before_ready(tmp_path, local_ray):
    """--warmup with --ray: each actor runs the warm-up workflow (outputs in the temp folder) before /ready
    answers 200; the first real prompt then finds the loaders in the actor's execution cache."""
    with ServerThread(_cfg(tmp_path, ray="", warmup=prompt(9))) as st:
        status, body = _get(f"{st.url}/ready")
        assert status == 503 and body["ready"] is False and body["reason"], body
        _wait_ready(st)
        assert _get(f"{st.url}/ready") == (200, {"ready": True})
        stats = st.server.worker.actor_stats()
        assert [a["warmups"] for a in stats] == [1, 1] and all(a["model_cache"]["misses"] == 3 for a in stats), stats
        warm_files = sorted(p.name for p in (tmp_path / "temp" / "ray").iterdir())
        assert len(warm_files) == 2, warm_files  # one warm-up image per actor, in the temp folder
        assert not (tmp_path / "output" / "ray").exists()
        messages = _run_all(st, [prompt(10)])[10][0]
    cached = next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")
    ran = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"] is not None]
    assert {"1", "2"} <= set(cached) and not {"1", "2"} & set(ran)  # the models were already loaded


def test_free_unloads_the_actors_models(tmp_path, local_ray):
    """POST /free with --ray frees the actors' model LRU and execution cache: the next prompt loads again."""
    with ServerThread(_cfg(tmp_path, ray="", ray_actors=1)) as st:
        _wait_ready(st)

        def cache():
            return st.server.worker.actor_stats()[0]["model_cache"]

        def ran(messages):
            return {m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"] is not None}

        first = _run_all(st, [prompt(1)])[1][0]
        loads = cache()["misses"]
        assert loads == 3 and {"1", "2"} <= ran(first)
        again = _run_all(st, [prompt(2)])[2][0]
        assert cache()["misses"] == loads and not {"1", "2"} & ran(again)  # kept warm between prompts
        req = urllib.request.Request(f"{st.url}/free", data=json.dumps({"unload_models": True,
                                                                         "free_memory": True}).encode())
        assert urllib.request.urlopen(req, timeout=60).status == 200
        end = time.monotonic() + 120
        while cache()["entries"] and time.monotonic() < end:
            time.sleep(0.2)
        assert cache()["entries"] == 0
        after = _run_all(st, [prompt(3)])[3][0]
        assert {"1", "2"} <= ran(after) and cache()["misses"] == 2 * loads  # loaded again
        status, body = _get(f"{st.url}/system_stats")
        assert status == 200 and body["twinflow"]["ray_actors"][0]["model_cache"]["misses"] == 2 * loads


def test_failed_warmup_on_an_actor_keeps_ready_503(tmp_path, local_ray):
    """A warm-up that fails in the actors (here: its output folder is taken by a file) is not ignored: /ready
    stays 503 naming the failure, as in-process; the server still serves prompts."""
    (tmp_path / "temp").mkdir()
    (tmp_path / "temp" / "ray").write_text("not a folder")
    with ServerThread(_cfg(tmp_path, ray="", ray_actors=1, warmup=prompt(9))) as st:
        end = time.monotonic() + 300
        while "failed" not in st.server.worker.not_ready_reason and time.monotonic() < end:
            assert not st.server.worker.ready
            time.sleep(0.2)
        status, body = _get(f"{st.url}/ready")
        assert status == 503 and "warm-up workflow failed on a Ray actor" in body["reason"], body
        assert not st.server.worker.ready and st.server.worker.alive
        got = _run_all(st, [prompt(11)])[11]
        assert len(got[1]["10"]) == 1  # prompts still run
