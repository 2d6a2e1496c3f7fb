"""`twinflow serve`: ComfyUI's API protocol, production behaviour and bad requests (loopback only).

The client (tests/serve_client.py) follows ComfyUI's script_examples protocol; outputs are checked against
`twinflow run` (the runner) on the same prompt.
"""
from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

from serve_client import ComfyClient, WebSocket  # noqa: E402

from twinflow.core import progress  # noqa: E402
from twinflow.runner.api import Runner, default_registry  # noqa: E402
from twinflow.runner.formats import load_workflow  # noqa: E402
from twinflow.runner.serve.app import ServeConfig, ServerThread, check_listen, encode_preview  # noqa: E402
from twinflow.runner.serve.models import ModelCache, is_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "dual_branch_t2v.json"


def small_prompt(steps=2, seed=42) -> dict:
    """The repository's dual-branch workflow (the trained:tiny models), with few steps."""
    p = load_workflow(WORKFLOW, default_registry()).prompt
    p["7"]["inputs"].update(steps=steps, seed=seed)
    p["6"]["inputs"].update(width=32, height=32, length=5)
    return p


class Block:
    """A test output node that waits for `release` (checking for interrupts), for queue/cancel tests."""

    release = threading.Event()
    started = threading.Event()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, tag):
        Block.started.set()
        bar = progress.Progress(1000000, desc="block")
        while not Block.release.is_set():
            bar.update(1)  # raises Interrupted when cancelled or timed out
            time.sleep(0.005)
        return {"ui": {"text": [tag]}}


class Fail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, tag):
        raise ValueError(f"this node always fails ({tag})")


def block_prompt(tag: str) -> dict:
    return {"1": {"class_type": "TestBlock", "inputs": {"tag": tag}}}


@pytest.fixture
def registry():
    Block.release.clear()
    Block.started.clear()
    yield {**default_registry(), "TestBlock": Block, "TestFail": Fail}
    Block.release.set()


def _cfg(tmp_path, registry=None, **kw) -> ServeConfig:
    return ServeConfig(port=0, output_dir=str(tmp_path / "output"), input_dir=str(tmp_path / "input"),
                       temp_dir=str(tmp_path / "temp"), models_dir=str(tmp_path / "models"), registry=registry,
                       **kw)


def http(url, data=None, method=None, headers=None, raw=False):
    """(status, parsed JSON or bytes) without raising on 4xx/5xx."""
    body = data if isinstance(data, (bytes, type(None))) else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    if raw:
        return status, payload
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload


def wait_history(url, pid, timeout=60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, h = http(f"{url}/history/{pid}")
        if pid in h:
            return h[pid]
        time.sleep(0.05)
    raise AssertionError(f"prompt {pid} never reached the history")


def wait_until(fn, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if fn():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def multipart(fields: dict, filename: str, content: bytes):
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f'Content-Type: image/png\r\n\r\n'.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# ------------------------------------------------------------------------------------------ the protocol
def test_websocket_example_client_gets_the_images(tmp_path):
    prompt = small_prompt()
    # also save the decoded frames as PNGs (lossless, so they can be compared byte for byte)
    prompt["13"] = {"class_type": "TwinFlowSaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "frames"}}
    with ServerThread(_cfg(tmp_path)) as st:
        client = ComfyClient(st.url.split("//", 1)[1])
        ws = client.connect()
        try:
            pid, images = client.get_images(ws, prompt)
        finally:
            ws.close()
        history = client.get_history(pid)[pid]
    # the message sequence ComfyUI sends for a prompt of this client
    types = [m["type"] for m in client.messages]
    assert types[0] == "status" and "sid" in client.messages[0]["data"]
    order = [t for t in types if t != "status" and t != "progress"]
    assert order[0:2] == ["execution_start", "execution_cached"]
    assert order[-2:] == ["execution_success", "executing"]
    ran = [m["data"]["node"] for m in client.messages if m["type"] == "executing"][:-1]
    assert sorted(ran, key=int) == [str(i) for i in range(1, 14)]
    steps = [m["data"] for m in client.messages if m["type"] == "progress" and m["data"]["node"] == "7"]
    assert [(s["value"], s["max"]) for s in steps] == [(1, 2), (2, 2)]
    executed = {m["data"]["node"]: m["data"]["output"] for m in client.messages if m["type"] == "executed"}
    assert set(executed) == {"10", "11", "13"} and executed == history["outputs"]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert history["prompt"][1] == pid and history["prompt"][2] == prompt
    assert sorted(history["prompt"][4], key=int) == ["10", "11", "13"]
    # the images the client downloaded are the files the runner writes for the same prompt
    # node 10 (Save Video) reports its MP4 as core SaveVideo does, under "images": the example client fetches it too
    assert sorted(images, key=int) == ["10", "11", "13"] and len(images["10"]) == 1
    assert len(images["11"]) == 1 and len(images["13"]) == 5
    ref = Runner().run(prompt, output_dir=tmp_path / "ref")
    ref_files = {p.name: p.read_bytes() for p in ref.files()}
    got = [e["filename"] for e in history["outputs"]["11"]["images"] + history["outputs"]["13"]["images"]]
    assert [ref_files[name] for name in got] == images["11"] + images["13"]
    assert history["outputs"]["10"]["animated"] == [True]
    video = history["outputs"]["10"]["images"][0]
    assert (tmp_path / "output" / video["subfolder"] / video["filename"]).read_bytes() == images["10"][0]
    assert len(_frames(tmp_path / "output" / video["subfolder"] / video["filename"])) == 5


def _frames(path) -> list:
    av = pytest.importorskip("av")
    with av.open(str(path)) as f:
        return [fr.to_ndarray(format="rgb24").tobytes() for fr in f.decode(video=0)]


def test_basic_example_without_client_id(tmp_path):
    with ServerThread(_cfg(tmp_path)) as st:
        status, body = http(f"{st.url}/prompt", {"prompt": small_prompt(steps=1)})  # basic_api_example.py
        assert status == 200 and set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
        entry = wait_history(st.url, body["prompt_id"])
        assert entry["status"]["status_str"] == "success"
        events = [m[0] for m in entry["status"]["messages"]]
        assert events == ["execution_start", "execution_cached", "execution_success"]
        status, q = http(f"{st.url}/queue")
        assert status == 200 and q == {"queue_running": [], "queue_pending": []}
        assert http(f"{st.url}/prompt")[1] == {"exec_info": {"queue_remaining": 0}}
        # the /api prefix of ComfyUI's newer frontends reaches the same routes
        assert http(f"{st.url}/api/history/{body['prompt_id']}")[1].keys() == {body["prompt_id"]}


def test_execution_cache_and_model_cache_across_prompts(tmp_path):
    """Same prompt twice: nothing re-runs (ComfyUI's cache); a new seed re-runs only the sampler and after;
    an unrelated workflow in between does not make the models load again (the LRU keeps them)."""
    with ServerThread(_cfg(tmp_path)) as st:
        c = ComfyClient(st.url.split("//", 1)[1])
        ws = c.connect()
        try:
            def run(prompt):
                c.messages.clear()
                pid, _ = c.get_images(ws, prompt)
                ran = [m["data"]["node"] for m in c.messages if m["type"] == "executing"][:-1]
                cached = next(m["data"]["nodes"] for m in c.messages if m["type"] == "execution_cached")
                return pid, ran, cached

            p1, ran1, _ = run(small_prompt(steps=1))
            p2, ran2, cached2 = run(small_prompt(steps=1))
            assert ran2 == [] and sorted(cached2, key=int) == sorted(ran1, key=int)
            h1, h2 = c.get_history(p1)[p1], c.get_history(p2)[p2]
            assert h2["outputs"] == h1["outputs"]  # cached outputs are reported, as ComfyUI does
            _, ran3, _ = run(small_prompt(steps=1, seed=7))
            assert sorted(ran3, key=int) == ["7", "9", "10"]
            stats = http(f"{st.url}/system_stats")[1]["twinflow"]["model_cache"]
            assert stats["entries"] == 3 and stats["hits"] == 0
            roundtrip = load_workflow(ROOT / "workflows" / "vae_roundtrip.json", default_registry()).prompt
            run(roundtrip)  # the executor drops the dual-branch nodes here (it shares none of their loaders) ...
            _, ran5, _ = run(small_prompt(steps=1, seed=8))
            assert {"1", "2", "8"} <= set(ran5)  # ... so the loaders run again, but answer from the LRU:
            stats = http(f"{st.url}/system_stats")[1]["twinflow"]["model_cache"]
            assert stats["hits"] == 3 and stats["entries"] == 4, stats  # + the roundtrip's random:tiny VAE
            # /free unload_models empties it (handled by the worker between prompts)
            assert http(f"{st.url}/free", {"unload_models": True})[0] == 200
            wait_until(lambda: http(f"{st.url}/system_stats")[1]["twinflow"]["model_cache"]["entries"] == 0)
        finally:
            ws.close()


def test_model_cache_lru_budget():
    import torch

    def obj(n):
        return (torch.nn.Linear(n, 1, bias=False),)  # n * 4 bytes

    cache = ModelCache(budget_bytes=1000)
    a, b, c = obj(100), obj(100), obj(100)
    cache.put(("A", "1"), a)
    cache.put(("B", "1"), b)
    assert cache.used_bytes == 800 and cache.get(("A", "1")) is a  # A is now the most recently used
    cache.put(("C", "1"), c)  # 1200 > 1000: drops the least recently used, B
    assert cache.get(("B", "1")) is None and cache.get(("A", "1")) is a and cache.get(("C", "1")) is c
    cache.put(("D", "1"), obj(1000))  # larger than the whole budget: not kept, nothing dropped
    assert cache.get(("D", "1")) is None and len(cache) == 2
    reg = default_registry()
    assert is_loader("TwinFlowLoadDiT", reg["TwinFlowLoadDiT"]) and is_loader("TwinFlowLoadVAE", reg["TwinFlowLoadVAE"])
    assert not is_loader("TwinFlowDualBranchSampler", reg["TwinFlowDualBranchSampler"])


def test_object_info_system_stats_health(tmp_path):
    with ServerThread(_cfg(tmp_path)) as st:
        status, info = http(f"{st.url}/object_info")
        assert status == 200 and "TwinFlowLoadDiT" in info
        entry = info["TwinFlowDualBranchSampler"]
        assert entry["output"] == ["LATENT", "STRING"] and entry["input"]["required"]["steps"][0] == "INT"
        assert http(f"{st.url}/object_info/TwinFlowLoadVAE")[1].keys() == {"TwinFlowLoadVAE"}
        assert http(f"{st.url}/object_info/NoSuchNode") == (200, {})
        status, stats = http(f"{st.url}/system_stats")
        assert status == 200 and {"os", "ram_total", "ram_free", "python_version", "pytorch_version"} <= set(stats["system"])
        assert stats["devices"][0]["type"] in ("cpu", "cuda")
        assert http(f"{st.url}/health") == (200, {"status": "ok"})
        assert http(f"{st.url}/ready") == (200, {"ready": True})


def test_binary_preview_frames_as_comfyui(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (8, 8), (255, 0, 0))
    frame = encode_preview(img, "JPEG")
    assert struct.unpack(">II", frame[:8]) == (1, 1)  # PREVIEW_IMAGE, JPEG
    with ServerThread(_cfg(tmp_path)) as st:
        c = ComfyClient(st.url.split("//", 1)[1])
        ws = c.connect()
        try:
            assert json.loads(ws.recv())["type"] == "status"
            st.server.send_preview(img, sid=c.client_id, fmt="PNG")
            out = ws.recv()
        finally:
            ws.close()
    assert isinstance(out, bytes) and struct.unpack(">II", out[:8]) == (1, 2)
    assert Image.open(io.BytesIO(out[8:])).getpixel((0, 0)) == (255, 0, 0)  # as the example decodes it


def test_binary_previews_during_sampling(tmp_path):
    """--previews: one binary PREVIEW_IMAGE (JPEG) frame per sampler step, to the prompt's client only, each
    the size of the decoded frame (latent x 8); without it, none (ComfyUI's default --preview-method none)."""
    from PIL import Image

    for previews, expected in ((True, 3), (False, 0)):
        with ServerThread(_cfg(tmp_path / str(previews), previews=previews)) as st:
            c = ComfyClient(st.url.split("//", 1)[1])
            other = ComfyClient(st.url.split("//", 1)[1])
            ws, ws_other = c.connect(), other.connect()
            try:
                c.get_images(ws, small_prompt(steps=3))
                other.get_images(ws_other, small_prompt(steps=1, seed=9))  # its own prompt: 1 step
            finally:
                ws.close()
                ws_other.close()
        assert len(c.binary_frames) == expected
        for f in c.binary_frames:
            assert struct.unpack(">II", f[:8]) == (1, 1)
            assert Image.open(io.BytesIO(f[8:])).size == (32, 32)
        assert len(other.binary_frames) == (1 if previews else 0)


# ---------------------------------------------------------------------------------- production behaviour
def test_bounded_queue_cancel_and_interrupt(tmp_path, registry):
    with ServerThread(_cfg(tmp_path, registry, max_queue=2)) as st:
        c = ComfyClient(st.url.split("//", 1)[1])
        ws = c.connect()
        try:
            a = http(f"{st.url}/prompt", {"prompt": block_prompt("a"), "client_id": c.client_id})[1]["prompt_id"]
            assert Block.started.wait(30)
            b = http(f"{st.url}/prompt", {"prompt": block_prompt("b")})[1]["prompt_id"]
            d = http(f"{st.url}/prompt", {"prompt": block_prompt("d"), "client_id": c.client_id,
                                          "prompt_id": "dee"})[1]["prompt_id"]
            status, body = http(f"{st.url}/prompt", {"prompt": block_prompt("e")})
            assert status == 503 and body["error"]["type"] == "queue_full" and "2 prompts pending" in body["error"]["message"]
            q = http(f"{st.url}/queue")[1]
            assert [i[1] for i in q["queue_running"]] == [a] and [i[1] for i in q["queue_pending"]] == [b, d]
            # cancel a queued prompt: it leaves the queue, gets a history entry, and its client is told
            assert http(f"{st.url}/queue", {"delete": [d]})[0] == 200
            assert wait_history(st.url, d)["status"]["status_str"] == "error"
            # cancel the running one
            assert http(f"{st.url}/interrupt", {"prompt_id": a}) == (200, {"interrupted": True})
            ha = wait_history(st.url, a)
            assert ha["status"]["status_str"] == "error"
            assert ha["status"]["messages"][-1][0] == "execution_interrupted"
            Block.release.set()
            assert wait_history(st.url, b)["outputs"] == {"1": {"text": ["b"]}}
            seen = []
            while not any(m["type"] == "executing" and m["data"] == {"node": None, "prompt_id": a} for m in seen):
                seen.append(json.loads(ws.recv()))
            assert any(m["type"] == "execution_interrupted" and m["data"]["prompt_id"] == "dee" for m in seen)
            assert any(m["type"] == "execution_interrupted" and m["data"]["prompt_id"] == a
                       and m["data"]["node_id"] == "1" for m in seen)
        finally:
            ws.close()


def test_queue_clear_and_history_edits(tmp_path, registry):
    """POST /queue {"clear": true} empties the pending queue (each cleared prompt gets a history entry), the
    running prompt is untouched; GET /history?max_items; POST /history delete / clear (ComfyUI's shapes)."""
    with ServerThread(_cfg(tmp_path, registry)) as st:
        a = http(f"{st.url}/prompt", {"prompt": block_prompt("a")})[1]["prompt_id"]
        assert Block.started.wait(30)
        pending = [http(f"{st.url}/prompt", {"prompt": block_prompt(t)})[1]["prompt_id"] for t in "bcd"]
        assert http(f"{st.url}/prompt")[1] == {"exec_info": {"queue_remaining": 4}}
        assert http(f"{st.url}/queue", {"clear": True})[0] == 200
        q = http(f"{st.url}/queue")[1]
        assert [i[1] for i in q["queue_running"]] == [a] and q["queue_pending"] == []
        for pid in pending:
            entry = http(f"{st.url}/history/{pid}")[1][pid]
            assert entry["status"]["completed"] is False and entry["outputs"] == {}
            assert "cleared" in entry["status"]["messages"][0][1]["reason"]
        Block.release.set()
        assert wait_history(st.url, a)["outputs"] == {"1": {"text": ["a"]}}
        assert list(http(f"{st.url}/history")[1]) == pending + [a]  # insertion order, as ComfyUI
        assert list(http(f"{st.url}/history?max_items=2")[1]) == pending[2:] + [a]  # the newest
        assert http(f"{st.url}/history", {"delete": [pending[0], "no-such-id"]})[0] == 200
        assert list(http(f"{st.url}/history")[1]) == pending[1:] + [a]
        assert http(f"{st.url}/history", {"clear": True})[0] == 200
        assert http(f"{st.url}/history")[1] == {} and http(f"{st.url}/history/{a}")[1] == {}


def test_prompt_timeout_and_failing_node_keep_the_server_serving(tmp_path, registry):
    with ServerThread(_cfg(tmp_path, registry, prompt_timeout=0.5)) as st:
        slow = http(f"{st.url}/prompt", {"prompt": block_prompt("slow")})[1]["prompt_id"]
        h = wait_history(st.url, slow)
        assert h["status"]["status_str"] == "error"
        event, data = h["status"]["messages"][-1]
        assert event == "execution_error" and data["exception_type"] == "TimeoutError"
        assert "--prompt-timeout" in data["exception_message"] and data["node_id"] == "1"
        bad = http(f"{st.url}/prompt", {"prompt": {"1": {"class_type": "TestFail", "inputs": {"tag": "x"}}}})[1]
        h = wait_history(st.url, bad["prompt_id"])
        event, data = h["status"]["messages"][-1]
        assert event == "execution_error" and data["exception_type"] == "ValueError"
        assert data["node_type"] == "TestFail" and "always fails (x)" in data["exception_message"]
        Block.release.set()
        ok = http(f"{st.url}/prompt", {"prompt": block_prompt("after")})[1]
        assert wait_history(st.url, ok["prompt_id"])["status"]["status_str"] == "success"


def test_ready_after_warmup(tmp_path, registry):
    with ServerThread(_cfg(tmp_path, registry, warmup=block_prompt("warm"))) as st:
        assert Block.started.wait(30)
        status, body = http(f"{st.url}/ready")
        assert status == 503 and body["ready"] is False and "warm-up" in body["reason"]
        assert http(f"{st.url}/health")[0] == 200
        Block.release.set()
        wait_until(lambda: http(f"{st.url}/ready")[0] == 200)
        assert not list((tmp_path / "output").iterdir())  # warm-up outputs go to the temp folder


# ------------------------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize("path", ["/prompt", "/queue", "/history", "/free"])
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_json_bodies(tmp_path, path, body, _shared_server):
    status, out = http(f"{_shared_server}{path}", body, method="POST")
    assert status == 400 and out["error"]["type"] == "invalid_json" and out["node_errors"] == {}


@pytest.fixture(scope="module")
def _shared_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    with ServerThread(_cfg(d)) as st:
        yield st.url


def test_invalid_prompts_get_comfyui_error_json(_shared_server):
    url = _shared_server
    status, out = http(f"{url}/prompt", {"client_id": "x"})
    assert status == 400 and out["error"]["type"] == "no_prompt"
    status, out = http(f"{url}/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert status == 400 and out["error"]["type"] == "missing_node_type" and "1" in out["node_errors"]
    bad = small_prompt()
    bad["7"]["inputs"]["steps"] = -3
    status, out = http(f"{url}/prompt", {"prompt": bad})
    assert status == 400 and out["error"]["type"] == "prompt_outputs_failed_validation"
    assert out["node_errors"]["7"]["errors"][0]["type"] == "value_smaller_than_min"
    assert out["node_errors"]["7"]["class_type"] == "TwinFlowDualBranchSampler"
    for body in ({"prompt": [1]}, {"prompt": {}, "extra_data": 3}, {"prompt": small_prompt(), "number": "x"},
                 {"prompt": small_prompt(), "partial_execution_targets": "10"}):
        status, out = http(f"{url}/prompt", body)
        assert status == 400 and "error" in out, body
    assert http(f"{url}/queue")[1]["queue_pending"] == []


def test_unknown_prompt_ids(_shared_server):
    url = _shared_server
    assert http(f"{url}/history/no-such-id") == (200, {})  # ComfyUI's answer: clients poll until it appears
    assert http(f"{url}/history", {"delete": ["no-such-id"]})[0] == 200
    assert http(f"{url}/queue", {"delete": ["no-such-id"]})[0] == 200
    assert http(f"{url}/interrupt", {"prompt_id": "no-such-id"}) == (200, {"interrupted": False})
    assert http(f"{url}/interrupt", b"", method="POST") == (200, {"interrupted": False})
    assert http(f"{url}/queue", {"delete": "no-such-id"})[0] == 400  # not a list
    assert http(f"{url}/history?max_items=x")[0] == 400
    # a prompt id is used once
    body = {"prompt": small_prompt(steps=1), "prompt_id": "once"}
    assert http(f"{url}/prompt", body)[0] == 200
    status, out = http(f"{url}/prompt", body)
    assert status == 400 and out["error"]["type"] == "duplicate_prompt_id"
    wait_history(url, "once")


def test_view_never_leaves_the_served_folders(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "ok.png").write_bytes(b"png bytes")
    (out / "page.html").write_text("<script>")
    os.symlink(secret, out / "link.txt")
    os.symlink(tmp_path, out / "linkdir")
    with ServerThread(_cfg(tmp_path)) as st:
        u = st.url
        assert http(f"{u}/view?filename=ok.png&subfolder=sub&type=output", raw=True) == (200, b"png bytes")
        assert http(f"{u}/view?filename=ok.png%20[output]&subfolder=sub", raw=True) == (200, b"png bytes")
        attacks = [
            "filename=secret.txt&subfolder=..", "filename=../secret.txt", "filename=..%2Fsecret.txt",
            "filename=%2e%2e%2fsecret.txt", "filename=..%5Csecret.txt", "filename=secret.txt&subfolder=%2e%2e",
            "filename=secret.txt&subfolder=sub%2F..%2F..", f"filename={secret}", "filename=passwd&subfolder=/etc",
            f"filename=secret.txt&subfolder={tmp_path}", "filename=link.txt", "filename=secret.txt&subfolder=linkdir",
            "filename=secret.txt&type=temp&subfolder=..", "filename=secret.txt%00.png",
        ]
        for q in attacks:
            status, body = http(f"{u}/view?{q}", raw=True)
            assert status in (400, 403, 404) and b"SECRET" not in body, q
        assert http(f"{u}/view?filename=secret.txt&type=models", raw=True)[0] == 400
        assert http(f"{u}/view?filename=nope.png", raw=True)[0] == 404
        # a path traversal in the URL path itself never reaches a file either
        status, body = http(f"{u}/view/../../secret.txt", raw=True)
        assert status == 404 and b"SECRET" not in body
        req = urllib.request.Request(f"{u}/view?filename=page.html")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["Content-Type"] == "application/octet-stream"  # never rendered as a page


def test_upload_image(tmp_path):
    with ServerThread(_cfg(tmp_path, max_upload_bytes=64 * 1024)) as st:
        body, headers = multipart({"subfolder": "up"}, "cat.png", b"x" * 1000)
        status, out = http(f"{st.url}/upload/image", body, headers=headers)
        assert status == 200 and out == {"name": "cat.png", "subfolder": "up", "type": "input"}
        assert (tmp_path / "input" / "up" / "cat.png").read_bytes() == b"x" * 1000
        assert http(f"{st.url}/upload/image", body, headers=headers)[1]["name"] == "cat.png"  # same bytes: reused
        body2, headers2 = multipart({"subfolder": "up"}, "cat.png", b"y" * 1000)
        assert http(f"{st.url}/upload/image", body2, headers=headers2)[1]["name"] == "cat (1).png"
        body3, headers3 = multipart({"subfolder": "up", "overwrite": "true"}, "cat.png", b"z" * 10)
        assert http(f"{st.url}/upload/image", body3, headers=headers3)[1]["name"] == "cat.png"
        assert (tmp_path / "input" / "up" / "cat.png").read_bytes() == b"z" * 10
        # the file shows in /view with type=input
        assert http(f"{st.url}/view?filename=cat.png&subfolder=up&type=input", raw=True) == (200, b"z" * 10)
        # too large: 413 with the limit, nothing written
        big, hb = multipart({}, "big.png", b"x" * 100 * 1024)
        status, out = http(f"{st.url}/upload/image", big, headers=hb)
        assert status == 413 and out["error"]["type"] == "too_large" and not (tmp_path / "input" / "big.png").exists()
        for fields in ({"subfolder": "../.."}, {"subfolder": "/tmp"}, {"type": "models"}):
            b, h = multipart(fields, "evil.png", b"1")
            assert http(f"{st.url}/upload/image", b, headers=h)[0] in (400, 403), fields
        assert not (tmp_path / "evil.png").exists()
        assert http(f"{st.url}/upload/image", b"not multipart", headers={"Content-Type": "text/plain"})[0] == 400
    assert sorted(p.name for p in (tmp_path / "input" / "up").iterdir()) == ["cat (1).png", "cat.png"]


def test_auth_token(tmp_path):
    with pytest.raises(ValueError, match="--auth-token"):
        check_listen("0.0.0.0", None)
    check_listen("0.0.0.0", "s3cret")
    check_listen("127.0.0.1", None)
    check_listen("localhost", None)
    with ServerThread(_cfg(tmp_path, auth_token="s3cret")) as st:
        u = st.url
        status, out = http(f"{u}/queue")
        assert status == 401 and out["error"]["type"] == "unauthorized"
        assert http(f"{u}/queue", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http(f"{u}/prompt", {"prompt": small_prompt()}, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http(f"{u}/queue", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert http(f"{u}/health")[0] == 200 and http(f"{u}/ready")[0] == 200  # probes need no token
        host = u.split("//", 1)[1]
        with pytest.raises(ConnectionError, match="401"):
            WebSocket(f"ws://{host}/ws?clientId=a")
        ws = WebSocket(f"ws://{host}/ws?clientId=a&token=s3cret")
        assert json.loads(ws.recv())["type"] == "status"
        ws.close()


def test_cli_refuses_public_address_without_token(capsys, monkeypatch):
    from twinflow.runner.cli import main

    monkeypatch.delenv("TWINFLOW_AUTH_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--auth-token" in err and "Traceback" not in err


def test_foreign_origin_is_refused(_shared_server):
    host = _shared_server.split("//", 1)[1]
    status, _ = http(f"{_shared_server}/queue", headers={"Origin": "http://evil.example", "Host": host})
    assert status == 403
    assert http(f"{_shared_server}/queue", headers={"Origin": f"http://{host}"})[0] == 200


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_public_listener_scan_used_to_warn_about_a_local_ray():
    """ray_pool._public_listeners (init_local_ray warns with it when a Ray binds beyond loopback) finds a
    socket listening on every interface in this process, and not one on 127.0.0.1."""
    import socket

    from twinflow.runner.serve.ray_pool import _public_listeners

    with socket.socket() as public, socket.socket() as local:
        public.bind(("0.0.0.0", 0))
        local.bind(("127.0.0.1", 0))
        public.listen()
        local.listen()
        found = {port for _, _, port in _public_listeners()}
        assert public.getsockname()[1] in found and local.getsockname()[1] not in found
