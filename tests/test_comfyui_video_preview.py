"""Inside a real ComfyUI: TwinFlow's video/animated savers report what core SaveVideo / SaveAnimatedWEBP report,
so the editor draws their output on the node (a <video> for the MP4), checked in the real frontend.

The editor check drives headless Chromium over the DevTools protocol; it skips without a `chromium` binary
(or CHROMIUM=/path/to/chrome). Set TWINFLOW_SCREENSHOT_DIR to keep the editor screenshot it takes.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from test_comfyui_integration import COMFYUI, PACK, Server  # noqa: E402  (tests/ is on sys.path)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI with the pack linked in and no model files (the graphs here need none)."""
    base = tmp_path_factory.mktemp("comfy_preview")
    (base / "custom_nodes").mkdir()
    os.symlink(PACK, base / "custom_nodes" / "twinflow", target_is_directory=True)
    srv = Server(base)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _savers(tag: str) -> dict:
    """5 grey 32x32 frames into core SaveVideo / SaveAnimatedWEBP and TwinFlow's Save Video / Save Animated WebP."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 5, "color": 8421504}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 16.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": f"video/core_{tag}",
                                                    "format": "auto", "codec": "auto"}},
        "4": {"class_type": "TwinFlowSaveVideo", "inputs": {"images": ["1", 0], "filename_prefix": f"video/tf_{tag}",
                                                            "fps": 16.0, "crf": 19}},
        "5": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": f"core_{tag}",
                                                           "fps": 6.0, "lossless": True, "quality": 80,
                                                           "method": "default"}},
        "6": {"class_type": "TwinFlowSaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": f"tf_{tag}",
                                                                   "fps": 6.0, "lossless": True, "quality": 80,
                                                                   "method": "default"}},
    }


def _shape(output: dict) -> dict:
    """A node's history output with each file name reduced to its extension (names differ by prefix only)."""
    return {k: [{**e, "filename": Path(e["filename"]).suffix} if isinstance(e, dict) and "filename" in e else e
                for e in v] if isinstance(v, list) else v for k, v in output.items()}


def test_save_video_and_webp_report_what_core_savers_report(server):
    entry = server.run(_savers("hist"))
    outs = entry["outputs"]
    assert _shape(outs["3"]) == {"images": [{"filename": ".mp4", "subfolder": "video", "type": "output"}],
                                 "animated": [True]}, outs["3"]  # core SaveVideo (ui.PreviewVideo)
    assert _shape(outs["4"]) == _shape(outs["3"]), (outs["4"], outs["3"])
    assert _shape(outs["6"]) == _shape(outs["5"]), (outs["6"], outs["5"])
    for nid in ("3", "4", "5", "6"):
        item = outs[nid]["images"][0]
        assert (server.base / "output" / item["subfolder"] / item["filename"]).stat().st_size > 0


# ------------------------------------------------------------------------------------------ the real editor
def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


class _Page:
    """One headless Chromium page driven over the DevTools protocol (the test suite's own WebSocket client)."""

    def __init__(self, binary: str, profile: Path):
        from serve_client import WebSocket

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--remote-allow-origins=*",
             "--window-size=1600,1200", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.skip(f"{binary} did not open a DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"], timeout=120)
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait_js(self, expr: str, timeout: float, what: str, detail=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"the editor never showed {what} within {timeout:.0f} s"
                             + (f": {detail()}" if detail else ""))

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_VIDEO_SOURCES = """(() => {
  const v = Array.from(document.querySelectorAll('video'))
                 .map(e => e.src || (e.querySelector('source') || {}).src || '');
  return v.some(s => s.includes('tf_editor')) && v.some(s => s.includes('core_editor')) ? v : null; })()"""
_NODE_STATE = """(() => {
  const s = id => { const n = app.graph.getNodeById(id);
                    return [!!n.animatedImages, (n.imgs || []).length, (n.images || []).map(i => i.filename)]; };
  const r = {3: s(3), 4: s(4), 5: s(5), 6: s(6)};
  return Object.values(r).every(x => x[2].length) ? r : null; })()"""


@pytest.mark.slow
def test_editor_draws_twinflow_save_video_on_its_node(server, tmp_path):
    binary = _chromium()
    if not binary:
        pytest.skip("no chromium binary (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    profile = Path(tempfile.mkdtemp(prefix="tf_chromium_"))
    page = _Page(binary, profile)
    try:
        page.call("Page.enable")
        page.call("Runtime.enable")
        server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog over the canvas
        page.call("Page.navigate", url=server.url + "/")
        page.wait_js("!!(window.app && window.app.graph && window.app.api && window.app.api.clientId)", 180,
                     "a loaded editor (window.app with a client id)")
        # queue the graph from the page, so this page's client gets the `executed` messages, as a user's would
        # the frontend builds a node's preview when it draws the node: lay the six out inside the viewport
        layout = {1: [10, 60], 2: [10, 420], 3: [360, 60], 4: [360, 560], 5: [900, 60], 6: [900, 560]}
        page.js(f"(async () => {{ await app.loadApiJson({json.dumps(_savers('editor'))}, 'preview.json');"
                f" const at = {json.dumps(layout)}; for (const n of app.graph.nodes) n.pos = at[n.id];"
                f" app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true);"
                f" await app.queuePrompt(0, 1); return true; }})()")
        history = lambda: {k: (v["status"], v["outputs"]) for k, v in server.get("/history").items()}  # noqa: E731
        sources = page.wait_js(_VIDEO_SOURCES, 240, "a <video> for both Save Video nodes", history)
        ours = [s for s in sources if "tf_editor" in s]
        assert len(ours) == 1 and "subfolder=video" in ours[0] and ".mp4" in ours[0], sources
        # each node's own state: [animated, canvas images, files]; a video node draws no canvas image (the
        # <video> above), an animated WebP one does -- TwinFlow's nodes take the path their core twin takes
        state = page.wait_js(_NODE_STATE, 120, "the outputs of all four savers", history)
        assert state["4"][:2] == state["3"][:2] == [True, 0], state
        assert state["6"][:2] == state["5"][:2] == [True, 1], state
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "editor.png").write_bytes(shot)
        if os.environ.get("TWINFLOW_SCREENSHOT_DIR"):
            Path(os.environ["TWINFLOW_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
            (Path(os.environ["TWINFLOW_SCREENSHOT_DIR"]) / "editor_save_video.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        page.close()
        shutil.rmtree(profile, ignore_errors=True)
