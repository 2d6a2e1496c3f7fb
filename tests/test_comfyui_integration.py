"""TwinFlow inside a real ComfyUI (skipped unless COMFYUI_PATH points at a ComfyUI checkout).

Starts `python main.py --cpu --listen 127.0.0.1` from COMFYUI_PATH (interpreter: $COMFYUI_PYTHON, else a
venv/ beside or inside the checkout, else this one) with a fresh `--base-directory` whose custom_nodes/twinflow links to this repository, then talks to it
over HTTP on loopback only:
  * the startup log has no import failure naming TwinFlow, and /object_info lists every TwinFlow node with
    its category, display name, description and tooltips;
  * every workflow in workflows/ (converted to the API form by twinflow.runner.formats) is accepted by
    /prompt and finishes with success and output files;
  * mixed graphs with core nodes: UNETLoader (a tiny random Wan DiT saved in ComfyUI's layout) -> TwinFlow
    Sampler, core EmptyHunyuanLatentVideo, core VAELoader (a random Wan2.1 VAE in ComfyUI's layout) ->
    core VAEDecode -> core SaveImage; the Dual-Branch Guider through core SamplerCustomAdvanced; the Dual-Expert
    Sampler against core's two-KSamplerAdvanced Wan2.2 template on two core models.
Oracles are ComfyUI's own code paths in the same server: core KSampler on the same model and seed for
TwinFlow Sampler, core CFGGuider for the guider at alpha = 1 / alpha = 0, core VAEDecode for our decode.
See docs/comfyui.md for how to get a ComfyUI to run these against.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")]

REPO = Path(__file__).resolve().parents[1]
PACK = Path(os.environ.get("TWINFLOW_PACK_DIR", str(REPO)))  # a patched copy can be linked instead (dev only)
DIT_FILES = ("tiny_wan_dit_a.safetensors", "tiny_wan_dit_b.safetensors")
VAE_FILE = "random_wan21_vae.safetensors"
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600


def _comfy_python() -> str:
    """ComfyUI's interpreter: a venv next to or inside the checkout if there is one, else this interpreter."""
    for cand in (Path(COMFYUI) / "venv", Path(COMFYUI).parent / "venv", Path(COMFYUI) / ".venv"):
        py = cand / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        if py.is_file():
            return str(py)
    return sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ComfyUI process on loopback with its own base directory."""

    def __init__(self, base: Path, root=None, args=()):
        self.base = base
        self.root = str(root or COMFYUI)  # the checkout to run (a test may run a copy of it)
        self.args = list(args)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.proc = None

    def start(self):
        py = os.environ.get("COMFYUI_PYTHON") or _comfy_python()
        cmd = [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory",
               str(self.base), "--disable-api-nodes", "--disable-auto-launch", *self.args]
        self._log = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if k not in ("TWINFLOW_MODELS_DIR", "TWINFLOW_OUTPUT_DIR")}
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT_S} s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def submit(self, prompt: dict, extra_data=None) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "twinflow-tests",
                                             "extra_data": extra_data or {}})
        assert status == 200 and not body.get("node_errors"), f"/prompt refused the graph: {status} {body}"
        return body["prompt_id"]

    def run(self, prompt: dict, extra_data=None, expect: str = "success") -> dict:
        """POST a prompt, poll /history until it completes; return the history entry."""
        return self.wait(self.submit(prompt, extra_data), expect)

    def wait(self, pid: str, expect: str = "success") -> dict:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") == expect or expect in [m[0] for m in
                                                                             entry["status"].get("messages", [])]:
                    return entry
                msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                detail = msgs[0][1] if msgs else entry["status"]
                if isinstance(detail, dict):
                    detail = {k: detail.get(k) for k in ("node_type", "exception_message", "traceback")}
                raise AssertionError(f"prompt failed: {json.dumps(detail, indent=1)[:4000]}")
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish in {RUN_TIMEOUT_S} s")


class MiniWebSocket:
    """Just enough of a WebSocket client (RFC 6455, unmasked server text frames) to read ComfyUI's /ws messages;
    the test venv has no WebSocket library. A thread collects the JSON messages into `messages`."""

    def __init__(self, port: int, client_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        self.sock.settimeout(None)
        self.messages: list = []
        self.binary: list = []  # binary frames: 4-byte event type, then the payload (previews: image type + image)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _read(self):
        try:
            while True:
                b0, b1 = self._exact(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(self._exact(2), "big")
                elif n == 127:
                    n = int.from_bytes(self._exact(8), "big")
                payload = self._exact(n)
                if b0 & 0x0F == 1:  # text frame (binary frames are previews)
                    self.messages.append(json.loads(payload))
                elif b0 & 0x0F == 2:
                    self.binary.append(payload)
                elif b0 & 0x0F == 8:
                    return
        except (OSError, ConnectionError, ValueError):
            return

    def wait_end(self, pid: str, timeout: float = 30.0) -> None:
        """Wait for ComfyUI's end-of-prompt message (`executing` with node None), which follows every progress one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.get("type") == "executing" and m["data"].get("node") is None
                   and m["data"].get("prompt_id") == pid for m in list(self.messages)):
                return
            time.sleep(0.1)
        raise AssertionError(f"no end-of-prompt message for {pid} on the WebSocket")

    def close(self):
        self.sock.close()


def _save_models(models: Path) -> None:
    """A tiny random Wan DiT (x2) and a random full-size Wan2.1 VAE, official/ComfyUI key layout, no prefix.

    The VAE must be full size: ComfyUI builds the Wan2.1 VAE with fixed widths (dim 96) from its anchor key."""
    from safetensors.torch import save_file

    from twinflow.models.wan_dit import random_wan_dit
    from twinflow.models.wan_vae import random_wan_vae

    (models / "diffusion_models").mkdir(parents=True)
    (models / "vae").mkdir(parents=True)
    for seed, name in enumerate(DIT_FILES):
        m = random_wan_dit("tiny", seed=seed)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(models / "diffusion_models" / name))
    vae = random_wan_vae("wan2.1", seed=0, dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models / "vae" / VAE_FILE))
    del vae


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(PACK, base / "custom_nodes" / "twinflow", target_is_directory=True)
    _save_models(base / "models")
    srv = Server(base)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base / "models", ignore_errors=True)  # ~0.3 GB of random weights


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _pack_nodes() -> dict:
    from twinflow import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from twinflow.comfy_adapter import nodes as adapter

    return ({**NODE_CLASS_MAPPINGS, **adapter.NODE_CLASS_MAPPINGS},
            {**NODE_DISPLAY_NAME_MAPPINGS, **adapter.NODE_DISPLAY_NAME_MAPPINGS})


def _outputs(server, entry: dict) -> list[Path]:
    files = []
    for out in entry["outputs"].values():
        for items in out.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    folder = server.base / item.get("type", "output")
                    files.append(folder / item.get("subfolder", "") / item["filename"])
    return files


def _latent(server, entry: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    item = entry["outputs"][node]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


# ------------------------------------------------------------------------------------------------ loading
def test_startup_log_has_no_twinflow_import_failure(server):
    log = server.log()
    bad = [ln for ln in log.splitlines()
           if ("IMPORT FAILED" in ln or "Cannot import" in ln) and "twinflow" in ln.lower()]
    assert not bad, "\n".join(bad)
    assert "custom_nodes/twinflow" in log or "custom_nodes\\twinflow" in log, "TwinFlow was not loaded at all"


def test_object_info_lists_every_node_with_metadata(object_info):
    classes, names = _pack_nodes()
    missing = sorted(set(classes) - set(object_info))
    assert not missing, f"not in /object_info: {missing}"
    for nid, cls in classes.items():
        info = object_info[nid]
        assert info["category"].startswith("TwinFlow/"), (nid, info["category"])
        assert info["display_name"] == names[nid]
        assert info["description"], f"{nid} has no DESCRIPTION"
        spec = cls.INPUT_TYPES()
        served = {sec: set(info["input"].get(sec, {})) for sec in ("required", "optional")}
        for sec in ("required", "optional"):
            assert served[sec] == set(spec.get(sec, {})), (nid, sec)
        tips = [opts.get("tooltip") for sec in ("required", "optional") for v in info["input"].get(sec, {}).values()
                for opts in [v[1] if len(v) > 1 and isinstance(v[1], dict) else {}]]
        if tips:
            assert any(tips), f"{nid}: no input has a tooltip"
    # file widgets list ComfyUI's model folders (core.paths routed through folder_paths by the adapter)
    assert set(DIT_FILES) <= set(object_info["TwinFlowLoadDiT"]["input"]["required"]["ckpt_name"][0])
    assert VAE_FILE in object_info["TwinFlowLoadVAE"]["input"]["required"]["vae_name"][0]


# ---------------------------------------------------------------------------------------------- workflows
def test_core_nodes_keep_coming_from_comfyui(object_info):
    """The headless core node set is the runner's only: inside ComfyUI each of those class names is still
    ComfyUI's own node (no duplicate registration by the pack)."""
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS as CORE

    for name in CORE:
        module = object_info[name]["python_module"]
        assert module == "nodes" or module.startswith("comfy_extras"), (name, module)


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_repo_workflow_runs_through_prompt(server, path):
    from twinflow.runner.formats import load_workflow

    from twinflow.nodes import core_headless

    classes, _ = _pack_nodes()
    # core nodes in a shipped workflow (the quickstart's ConditioningZeroOut) convert with the headless twins'
    # input lists, which are ComfyUI's; the server then runs ComfyUI's own
    wf = load_workflow(path, {**core_headless.NODE_CLASS_MAPPINGS, **classes})
    assert wf.format == "ui", f"{path.name}: workflows/ holds UI-format files"
    virtual = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
    unknown = {n["type"] for n in wf.ui["nodes"]} - virtual - set(server.get("/object_info"))
    assert not unknown, f"{path.name}: the editor would show missing nodes {sorted(unknown)}"
    entry = server.run(wf.prompt, {"extra_pnginfo": {"workflow": wf.ui}})
    files = _outputs(server, entry)
    assert files, f"{path.name}: no output files in history {entry['outputs']}"
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f


# ------------------------------------------------------------------------------------------- mixed graphs
def _common(model_node: dict, length: int = 5) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILES[0], "weight_dtype": "default"}},
        "2": model_node,
        "3": {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "a fox in the snow", "width": 4096,
                                                                   "pad_to": 512}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": length,
                                                                  "batch_size": 1}},
    }


def _ksampler(seed: int, steps: int, node_model="1") -> dict:
    return {"class_type": "KSampler", "inputs": {"model": [node_model, 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                                                 "positive": ["3", 0], "negative": ["3", 0],
                                                 "latent_image": ["4", 0]}}


@pytest.mark.parametrize("mode", ["wrap", "rebuild", "twinflow_loader"])
def test_core_model_in_twinflow_sampler_matches_core_ksampler(server, mode):
    """UNETLoader -> TwinFlow From Core Model -> TwinFlow Sampler == core KSampler (euler, simple, shift 8); also
    TwinFlow Load DiT reading the same ComfyUI-layout file from ComfyUI's diffusion_models folder."""
    if mode == "twinflow_loader":
        p = _common({"class_type": "TwinFlowLoadDiT", "inputs": {"ckpt_name": DIT_FILES[0], "dtype": "default",
                                                                  "preset": "auto", "seed": 0}})
    else:
        p = _common({"class_type": "TwinFlowFromCoreModel", "inputs": {"model": ["1", 0], "mode": mode}})
    p["5"] = {"class_type": "TwinFlowSampler", "inputs": {
        "model": ["2", 0], "latent": ["4", 0], "seed": 7, "steps": 3, "cfg": 1.0, "sampler": "euler",
        "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["3", 0]}}
    p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"tf_{mode}"}}
    p["7"] = _ksampler(7, 3)
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"core_{mode}"}}
    entry = server.run(p)
    ours, core = _latent(server, entry, "6"), _latent(server, entry, "8")
    assert ours.shape == core.shape == (1, 16, 2, 4, 4)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    # wrap: the same ComfyUI forward; rebuild: our WanDiT vs ComfyUI's WanModel on the same weights.
    tol = 1e-4 if mode == "wrap" else 2e-3
    torch.testing.assert_close(ours, core, rtol=tol, atol=tol)


def test_twinflow_sampler_honours_model_sampling_sd3_shift(server):
    """ModelSamplingSD3 (shift 3 / shift 8) -> TwinFlow Sampler with shift 0 ("from the model") follows the patch
    as core KSampler does: the two shifts differ, and each equals core KSampler on the same patched model."""
    p = _common({"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}})
    p["12"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}}
    for shift_node, tag in (("2", "s3"), ("12", "s8")):
        n = "5" if tag == "s3" else "15"
        p[n] = {"class_type": "TwinFlowSampler", "inputs": {
            "model": [shift_node, 0], "latent": ["4", 0], "seed": 7, "steps": 3, "cfg": 1.0, "sampler": "euler",
            "scheduler": "simple", "shift": 0.0, "denoise": 1.0, "positive": ["3", 0]}}
        p[str(int(n) + 1)] = {"class_type": "SaveLatent", "inputs": {"samples": [n, 0],
                                                                     "filename_prefix": f"tf_msd3_{tag}"}}
        k = "7" if tag == "s3" else "17"
        p[k] = _ksampler(7, 3, node_model=shift_node)
        p[str(int(k) + 1)] = {"class_type": "SaveLatent", "inputs": {"samples": [k, 0],
                                                                     "filename_prefix": f"core_msd3_{tag}"}}
    entry = server.run(p)
    ours3, core3, ours8, core8 = (_latent(server, entry, n) for n in ("6", "8", "16", "18"))
    assert (ours3 - ours8).abs().max() > 1e-2, "shift 3 and shift 8 gave the same latent: the patch was ignored"
    torch.testing.assert_close(ours3, core3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours8, core8, rtol=1e-4, atol=1e-4)


def test_twinflow_sampler_applies_cfg_zero_star_as_core_ksampler(server):
    """CFGZeroStar (a sampler_post_cfg_function patch) at cfg 4: TwinFlow Sampler on the patched core MODEL equals
    core KSampler on it, and differs from the unpatched model (the patch is applied, not ignored)."""
    p = _common({"class_type": "CFGZeroStar", "inputs": {"model": ["1", 0]}})
    p["9"] = {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "blurry, static", "width": 4096,
                                                                   "pad_to": 512}}
    for n, model, tag in (("5", "2", "zs"), ("15", "1", "plain")):
        p[n] = {"class_type": "TwinFlowSampler", "inputs": {
            "model": [model, 0], "latent": ["4", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler": "euler",
            "scheduler": "simple", "shift": 0.0, "denoise": 1.0, "positive": ["3", 0], "negative": ["9", 0]}}
        p[str(int(n) + 1)] = {"class_type": "SaveLatent", "inputs": {"samples": [n, 0],
                                                                     "filename_prefix": f"tf_cfg_{tag}"}}
    p["7"] = {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
        "denoise": 1.0, "positive": ["3", 0], "negative": ["9", 0], "latent_image": ["4", 0]}}
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "core_cfg_zs"}}
    entry = server.run(p)
    ours, core, plain = (_latent(server, entry, n) for n in ("6", "8", "16"))
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-3, "CFGZeroStar changed nothing: the test cannot tell applied from ignored"


def test_errors_show_their_short_type_name(server):
    """A TwinFlow error reaches ComfyUI's history (what the UI shows) as twinflow.core.errors.<Type>, not under
    the module name ComfyUI derives from the pack's folder path."""
    p = _common({"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "eps",
                                                                   "zsnr": False}})
    p["5"] = {"class_type": "TwinFlowSampler", "inputs": {
        "model": ["2", 0], "latent": ["4", 0], "seed": 7, "steps": 2, "cfg": 1.0, "sampler": "euler",
        "scheduler": "simple", "shift": 0.0, "denoise": 1.0, "positive": ["3", 0]}}
    p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "tf_err"}}
    entry = server.run(p, expect="execution_error")
    err = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_id"] == "5" and "flow-matching" in err["exception_message"], err
    assert err["exception_type"] == "twinflow.core.errors.UnsupportedError", err["exception_type"]


def test_core_objects_direct_into_widened_inputs(server, object_info):
    """Core MODEL straight into TwinFlow Sampler / Dual-Branch Sampler / Quantize, core VAE into TwinFlow VAE Decode
    (once those inputs accept "TWINFLOW_MODEL,MODEL" / "TWINFLOW_VAE,VAE")."""
    req = {n: object_info[n]["input"]["required"] for n in ("TwinFlowSampler", "TwinFlowVAEDecode")}
    if "MODEL" not in req["TwinFlowSampler"]["model"][0].split(",") or \
            "VAE" not in req["TwinFlowVAEDecode"]["vae"][0].split(","):
        pytest.skip("TwinFlow Sampler / VAE Decode inputs are not widened to accept core MODEL / VAE yet")
    p = _common({"class_type": "TwinFlowSampler", "inputs": {
        "model": ["1", 0], "latent": ["4", 0], "seed": 7, "steps": 2, "cfg": 1.0, "sampler": "euler",
        "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["3", 0]}})
    p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "tf_direct"}}
    p["7"] = _ksampler(7, 2)
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "core_direct"}}
    p["9"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}}
    p["10"] = {"class_type": "TwinFlowVAEDecode", "inputs": {"vae": ["9", 0], "samples": ["2", 0], "tiling": "off",
                                                             "tile_size": 512, "overlap": 64}}
    p["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "tf_direct_vae"}}
    p["12"] = {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILES[1], "weight_dtype": "default"}}
    p["13"] = {"class_type": "TwinFlowGateSchedule", "inputs": {
        "kind": "constant", "alpha": 0.5, "alpha_start": 1.0, "alpha_end": 0.0, "fuse_steps": "2", "boundary": 0.9,
        "values": "", "cutoff": 0.25, "preview_steps": 2, "preview_shift": 8.0}}
    p["14"] = {"class_type": "TwinFlowDualBranchSampler", "inputs": {
        "semantic": ["1", 0], "detail": ["12", 0], "gate": ["13", 0], "latent": ["4", 0], "seed": 7, "steps": 2,
        "cfg_semantic": 1.0, "cfg_detail": 1.0, "sampler": "euler", "scheduler": "simple", "shift": 8.0,
        "denoise": 1.0, "split": "HW", "positive": ["3", 0]}}
    p["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": "tf_direct_dual"}}
    quant = object_info.get("TwinFlowQuantizeModel", {}).get("input", {}).get("required", {}).get("model", [""])[0]
    if "MODEL" in quant.split(","):
        p["16"] = {"class_type": "TwinFlowQuantizeModel", "inputs": {
            "model": ["1", 0], "format": "int8_weight_only", "group_size": 0, "fp8_scale": "auto",
            "smoothquant_alpha": 0.0, "include": "", "exclude": "", "min_cosine": 0.0, "force": True,
            "report_seed": 0, "report_sigmas": "0.95, 0.5, 0.05"}}
        p["17"] = {"class_type": "TwinFlowSampler", "inputs": {**p["2"]["inputs"], "model": ["16", 0]}}
        p["18"] = {"class_type": "SaveLatent", "inputs": {"samples": ["17", 0], "filename_prefix": "tf_direct_q"}}
    entry = server.run(p)
    core = _latent(server, entry, "8")
    torch.testing.assert_close(_latent(server, entry, "6"), core, rtol=1e-4, atol=1e-4)
    assert len([f for f in _outputs(server, entry) if "tf_direct_vae" in f.name]) == 5
    dual = _latent(server, entry, "15")
    assert torch.isfinite(dual).all() and (dual - core).abs().max() > 1e-3
    if "18" in p:  # int8 weight-only stays close to the float model
        q = _latent(server, entry, "18")
        assert torch.nn.functional.cosine_similarity(q.flatten(), core.flatten(), dim=0) > 0.99


def test_mixed_graph_core_latent_twinflow_sampler_core_vae_decode_save_image(server):
    """EmptyHunyuanLatentVideo -> TwinFlow Sampler -> core VAEDecode (core VAELoader) -> core SaveImage; the same
    latent through TwinFlow From Core VAE -> TwinFlow VAE Decode must give the same frames."""
    p = _common({"class_type": "TwinFlowFromCoreModel", "inputs": {"model": ["1", 0], "mode": "wrap"}})
    p["5"] = {"class_type": "TwinFlowSampler", "inputs": {
        "model": ["2", 0], "latent": ["4", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler": "uni_pc",
        "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["3", 0]}}
    p["6"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}}
    p["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}}
    p["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tf_mixed_core"}}
    p["9"] = {"class_type": "TwinFlowFromCoreVAE", "inputs": {"vae": ["6", 0]}}
    p["10"] = {"class_type": "TwinFlowVAEDecode", "inputs": {"vae": ["9", 0], "samples": ["5", 0], "tiling": "off",
                                                             "tile_size": 512, "overlap": 64}}
    p["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "tf_mixed_ours"}}
    p["12"] = {"class_type": "CreateVideo", "inputs": {"images": ["10", 0], "fps": 16.0}}
    p["13"] = {"class_type": "SaveVideo", "inputs": {"video": ["12", 0], "filename_prefix": "tf_mixed_video",
                                                     "format": "auto", "codec": "auto"}}
    entry = server.run(p)
    assert [f for f in _outputs(server, entry) if "tf_mixed_video" in f.name and f.stat().st_size > 0]
    core = [f for f in _outputs(server, entry) if "tf_mixed_core" in f.name]
    ours = [f for f in _outputs(server, entry) if "tf_mixed_ours" in f.name]
    assert len(core) == len(ours) == 5  # 2 latent frames -> 1 + 4 video frames, one PNG each
    import numpy as np
    from PIL import Image

    for a, b in zip(sorted(core), sorted(ours)):
        ia, ib = (np.asarray(Image.open(f), dtype=np.int16) for f in (a, b))
        assert ia.shape == ib.shape == (32, 32, 3)
        assert np.abs(ia - ib).max() <= 2, (a.name, int(np.abs(ia - ib).max()))  # 8-bit rounding of fp16 math


def _guider_graph(kind: str, alpha: float, cutoff: float, guider: str = "twinflow") -> dict:
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILES[0], "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILES[1], "weight_dtype": "default"}},
        "3": {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "a fox", "width": 4096, "pad_to": 512}},
        "4": {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "blurry", "width": 4096, "pad_to": 512}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 5,
                                                                  "batch_size": 1}},
        "6": {"class_type": "TwinFlowGateSchedule", "inputs": {
            "kind": kind, "alpha": alpha, "alpha_start": 1.0, "alpha_end": 0.0, "fuse_steps": "2", "boundary": 0.9,
            "values": "", "cutoff": cutoff, "preview_steps": 3, "preview_shift": 8.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "10": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["7", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["10", 0],
                                                                 "latent_image": ["5", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"g_{guider}"}},
    }
    if guider == "twinflow":
        p["7"] = {"class_type": "TwinFlowDualBranchGuider", "inputs": {
            "semantic": ["1", 0], "detail": ["2", 0], "gate": ["6", 0], "positive": ["3", 0], "negative": ["4", 0],
            "cfg_semantic": 3.0, "cfg_detail": 2.0, "split": "HW"}}
    else:  # core CFGGuider on one of the two models
        model, cfg = ("1", 3.0) if guider == "core_semantic" else ("2", 2.0)
        p["7"] = {"class_type": "CFGGuider", "inputs": {"model": [model, 0], "positive": ["3", 0],
                                                        "negative": ["4", 0], "cfg": cfg}}
    return p


@pytest.mark.parametrize("alpha,reference", [(1.0, "core_semantic"), (0.0, "core_detail")])
def test_dual_branch_guider_limits_equal_core_cfg_guider(server, alpha, reference):
    ours = _latent(server, server.run(_guider_graph("constant", alpha, 0.0)), "12")
    core = _latent(server, server.run(_guider_graph("constant", alpha, 0.0, guider=reference)), "12")
    torch.testing.assert_close(ours, core, rtol=1e-5, atol=1e-5)


def test_dual_branch_guider_fuses_and_decodes(server):
    """A real fusion (alpha 0.5, FFT cutoff 0.25) differs from both limits, and decodes to frames by core nodes."""
    g = _guider_graph("constant", 0.5, 0.25)
    g["13"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}}
    g["14"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["13", 0]}}
    g["15"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "tf_guider"}}
    entry = server.run(g)
    fused = _latent(server, entry, "12")
    assert len([f for f in _outputs(server, entry) if "tf_guider" in f.name]) == 5
    sem = _latent(server, server.run(_guider_graph("constant", 1.0, 0.0, guider="core_semantic")), "12")
    det = _latent(server, server.run(_guider_graph("constant", 0.0, 0.0, guider="core_detail")), "12")
    assert torch.isfinite(fused).all()
    assert (fused - sem).abs().max() > 1e-3 and (fused - det).abs().max() > 1e-3


def test_progress_bars_and_interrupt_reach_our_loops(server):
    """Sampling steps and VAE frames drive ComfyUI progress bars on the executing node; /interrupt stops a long
    TwinFlow sampling loop mid-way (ComfyUI reports execution_interrupted)."""
    ws = MiniWebSocket(server.port, "twinflow-tests")
    try:
        p = _common({"class_type": "TwinFlowFromCoreModel", "inputs": {"model": ["1", 0], "mode": "wrap"}})
        p["5"] = {"class_type": "TwinFlowSampler", "inputs": {
            "model": ["2", 0], "latent": ["4", 0], "seed": 12345, "steps": 4, "cfg": 1.0, "sampler": "euler",
            "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["3", 0]}}
        p["6"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}}
        p["7"] = {"class_type": "TwinFlowFromCoreVAE", "inputs": {"vae": ["6", 0]}}
        p["8"] = {"class_type": "TwinFlowVAEDecode", "inputs": {"vae": ["7", 0], "samples": ["5", 0], "tiling": "off",
                                                                "tile_size": 512, "overlap": 64}}
        p["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "tf_progress"}}
        pid = server.run(p)["prompt"][1]
        ws.wait_end(pid)
        prog = [m["data"] for m in ws.messages if m.get("type") == "progress" and m["data"].get("prompt_id") == pid]
        sampler = [(d["value"], d["max"]) for d in prog if d["node"] == "5"]
        assert sampler and sampler[-1] == (4, 4) and [v for v, _ in sampler] == sorted(v for v, _ in sampler)
        assert any(d["node"] == "8" and d["value"] == d["max"] for d in prog), prog

        p["5"]["inputs"].update(seed=54321, steps=1000)
        pid = server.submit(p)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            seen = [m["data"]["value"] for m in ws.messages if m.get("type") == "progress"
                    and m["data"].get("prompt_id") == pid and m["data"]["node"] == "5"]
            if seen and seen[-1] >= 3:
                break
            time.sleep(0.2)
        assert server.post("/interrupt", {})[0] == 200
        entry = server.wait(pid, expect="execution_interrupted")
        seen = [m["data"]["value"] for m in ws.messages if m.get("type") == "progress"
                and m["data"].get("prompt_id") == pid and m["data"]["node"] == "5"]
        assert 3 <= max(seen) < 1000 and "5" not in entry["outputs"]
    finally:
        ws.close()


def test_dual_branch_guider_equals_twinflow_dual_branch_sampler(server):
    """Two independent loops over the same fusion: core SamplerCustomAdvanced (k-diffusion euler) with the guider,
    and our Dual-Branch Sampler (sampling/dual.py) on the same two core models (wrapped), seed and sigmas."""
    g = _guider_graph("constant", 0.5, 0.25)
    g["9"]["inputs"]["sampler_name"] = "euler"
    g["7"]["inputs"].update(cfg_semantic=1.0, cfg_detail=1.0)
    g["20"] = {"class_type": "TwinFlowFromCoreModel", "inputs": {"model": ["1", 0], "mode": "wrap"}}
    g["21"] = {"class_type": "TwinFlowFromCoreModel", "inputs": {"model": ["2", 0], "mode": "wrap"}}
    g["22"] = {"class_type": "TwinFlowDualBranchSampler", "inputs": {
        "semantic": ["20", 0], "detail": ["21", 0], "gate": ["6", 0], "latent": ["5", 0], "seed": 11, "steps": 3,
        "cfg_semantic": 1.0, "cfg_detail": 1.0, "sampler": "euler", "scheduler": "simple", "shift": 8.0,
        "denoise": 1.0, "split": "HW", "positive": ["3", 0]}}
    g["23"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": "tf_dual_vs_guider"}}
    entry = server.run(g)
    guided, ours = _latent(server, entry, "12"), _latent(server, entry, "23")
    assert guided.abs().max() > 0.1
    torch.testing.assert_close(ours, guided, rtol=1e-4, atol=1e-4)


def test_dual_expert_sampler_equals_core_two_ksampler_advanced(server):
    """ComfyUI's Wan2.2 template shape in the real server: two core models (different weights), ModelSamplingSD3
    8 / 3, KSamplerAdvanced (high) 0..2 with leftover noise, then (low) 2..6 without noise, CFG 4 / 3; against the
    TwinFlow Dual-Expert Sampler on the same core MODELs with the boundary between the high grid's sigma_1 and
    sigma_2, handoff restart (the headless twin of this test is bit-exact: tests/test_dual_experts.py)."""
    p = _common({"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}})
    p["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILES[1], "weight_dtype": "default"}}
    p["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["10", 0], "shift": 3.0}}
    p["12"] = {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "blurry", "width": 4096, "pad_to": 512}}
    adv = lambda model, cfg, noise, latent, start, end, leftover: {"class_type": "KSamplerAdvanced", "inputs": {
        "model": [model, 0], "add_noise": noise, "noise_seed": 7, "steps": 6, "cfg": cfg, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["3", 0], "negative": ["12", 0], "latent_image": [latent, 0],
        "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}
    p["13"] = adv("2", 4.0, "enable", "4", 0, 2, "enable")
    p["14"] = adv("11", 3.0, "disable", "13", 2, 10000, "disable")
    p["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": "core_two_pass"}}
    s = lambda t: 8.0 * t / (1 + 7.0 * t)  # the shift-8 grid of 6 simple steps at t = 1 - i/6
    p["16"] = {"class_type": "TwinFlowDualExpertSampler", "inputs": {
        "high_noise": ["2", 0], "low_noise": ["11", 0], "latent": ["4", 0], "preset": "wan22_t2v_a14b", "seed": 7,
        "steps": 6, "cfg_high": 4.0, "cfg_low": 3.0, "shift_high": 8.0, "shift_low": 3.0,
        "boundary": round(0.5 * (s(5 / 6) + s(4 / 6)), 3), "blend_width": 0.0, "sampler": "euler",
        "scheduler": "simple", "handoff": "restart", "denoise": 1.0, "positive": ["3", 0], "negative": ["12", 0]}}
    p["17"] = {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": "tf_dual_expert"}}
    entry = server.run(p)
    core, ours = _latent(server, entry, "15"), _latent(server, entry, "17")
    assert core.abs().max() > 0.1
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-4)  # the wrap path's tolerance (apply_model)


# ------------------------------------------------------------------------------------------------ step cache
def _skips_in_log(text: str, marker: str) -> list[int]:
    """Skipped-step counts in log lines containing `marker` (core: 'EasyCache - skipped N/M'; ours: 'N skipped')."""
    import re

    out = []
    for ln in text.splitlines():
        if marker not in ln:
            continue
        m = re.search(r"skipped (\d+)/\d+ steps", ln) or re.search(r"computed, (\d+) skipped", ln)
        if m:
            out.append(int(m.group(1)))
    return out


def _step_cache(model: str, threshold: float, core_compatible: bool = True) -> dict:
    return {"class_type": "TwinFlowStepCache", "inputs": {
        "model": [model, 0], "policy": "easycache", "threshold": threshold, "start": 0.15, "end": 0.95,
        "window_unit": "percent", "max_consecutive_skips": -1, "cache_device": "compute", "calibration": "auto",
        "core_compatible": core_compatible}}


def test_step_cache_easycache_skips_as_core_easycache(server):
    """Core EasyCache -> KSampler (the oracle) against TwinFlow Step Cache (easycache, core-compatible skip output)
    -> core KSampler (our ComfyUI wrappers) and -> TwinFlow Sampler (our sampler loop): same model, euler, simple,
    20 steps. At 0.6 core skips steps of the random 2-block DiT (it skips none at 0.3); all three skip as many, and
    the latents agree within 1e-4."""
    thr = 0.6
    p = _common({"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": thr,
                                                        "start_percent": 0.15, "end_percent": 0.95,
                                                        "verbose": False}})
    p["5"] = {**_ksampler(5, 20, node_model="2")}
    p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "sc_core"}}
    p["7"] = _step_cache("1", thr)
    p["8"] = _ksampler(5, 20, node_model="7")
    p["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "sc_ours_core"}}
    p["10"] = {"class_type": "TwinFlowSampler", "inputs": {
        "model": ["7", 0], "latent": ["4", 0], "seed": 5, "steps": 20, "cfg": 1.0, "sampler": "euler",
        "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["3", 0]}}
    p["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "sc_ours_tf"}}
    p["12"] = _ksampler(5, 20)
    p["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "sc_nocache"}}
    start = len(server.log())
    entry = server.run(p)
    log = server.log()[start:]
    core_n = _skips_in_log(log, "EasyCache - skipped")
    ours_core = _skips_in_log(log, "step cache model:")
    ours_tf = _skips_in_log(log, "step cache semantic:")
    assert core_n and core_n[0] > 0, f"core EasyCache skipped nothing at {thr}: {core_n}\n{log[-3000:]}"
    assert ours_core == core_n and ours_tf == core_n, (core_n, ours_core, ours_tf)
    core = _latent(server, entry, "6")
    plain = _latent(server, entry, "13")
    assert not torch.equal(core, plain)  # the skips changed the result, so agreement below means something
    for node in ("9", "11"):
        ours = _latent(server, entry, node)
        rel = float((ours - core).norm() / core.norm())
        assert rel <= 1e-4, (node, rel)


def test_step_cache_per_branch_in_dual_branch_guider(server):
    """A step-cached detail MODEL in TwinFlow's Dual-Branch Guider at alpha 0 equals core CFGGuider on the same cached
    model (CFG 2, both passes through our wrapper), and the log reports the detail branch's cache on its own."""
    thr = 0.6
    ours_graph = _guider_graph("constant", 0.0, 0.0)
    core_graph = _guider_graph("constant", 0.0, 0.0, guider="core_detail")
    for g in (ours_graph, core_graph):
        g["20"] = _step_cache("2", thr, core_compatible=False)
        g["10"]["inputs"]["steps"] = 20
        g["9"]["inputs"]["sampler_name"] = "euler"
    ours_graph["7"]["inputs"]["detail"] = ["20", 0]
    core_graph["7"]["inputs"]["model"] = ["20", 0]
    start = len(server.log())
    ours = _latent(server, server.run(ours_graph), "12")
    log_ours = server.log()[start:]
    core = _latent(server, server.run(core_graph), "12")
    log_core = server.log()[start + len(log_ours):]
    detail_n = _skips_in_log(log_ours, "step cache detail:")
    assert detail_n and detail_n == _skips_in_log(log_core, "step cache model:"), (detail_n, log_core[-2000:])
    assert not _skips_in_log(log_ours, "step cache semantic:")  # the semantic model carries no cache
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-5)


def test_step_cache_easycache_with_cfg_skips_as_core_easycache(server):
    """The same at CFG 3 with a negative prompt (cond and uncond in one batch): core decides on one entry for both and,
    on a skip, adds both entries' cached residuals to the batch; TwinFlow's easycache (core-compatible) through core
    KSampler and through the TwinFlow Sampler skips as many steps and lands within 1e-4 of core's latent."""
    thr = 0.6
    p = _common({"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": thr,
                                                        "start_percent": 0.15, "end_percent": 0.95,
                                                        "verbose": False}})
    p["30"] = {"class_type": "TwinFlowTinyTextEncode", "inputs": {"text": "blurry", "width": 4096, "pad_to": 512}}

    def ks(model):
        k = _ksampler(5, 20, node_model=model)
        k["inputs"].update(cfg=3.0, negative=["30", 0])
        return k

    p["5"] = ks("2")
    p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "scc_core"}}
    p["7"] = _step_cache("1", thr)
    p["8"] = ks("7")
    p["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "scc_ours_core"}}
    p["10"] = {"class_type": "TwinFlowSampler", "inputs": {
        "model": ["7", 0], "latent": ["4", 0], "seed": 5, "steps": 20, "cfg": 3.0, "sampler": "euler",
        "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "positive": ["3", 0], "negative": ["30", 0]}}
    p["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "scc_ours_tf"}}
    start = len(server.log())
    entry = server.run(p)
    log = server.log()[start:]
    core_n = _skips_in_log(log, "EasyCache - skipped")
    assert core_n and core_n[0] > 0, f"core EasyCache skipped nothing at {thr}: {core_n}\n{log[-3000:]}"
    assert _skips_in_log(log, "step cache model:") == core_n and _skips_in_log(log, "step cache semantic:") == core_n
    core = _latent(server, entry, "6")
    for node in ("9", "11"):
        rel = float((_latent(server, entry, node) - core).norm() / core.norm())
        assert rel <= 1e-4, (node, rel)


def test_twinflow_sampler_sends_step_previews_as_core_ksampler(server, tmp_path):
    """With --preview-method latent2rgb, TwinFlow Sampler sends one preview image per step over the WebSocket as
    core KSampler does (ComfyUI's previewer with Wan21's latent_rgb_factors), and its last preview equals
    KSampler's on the same model and seed."""
    import io

    import numpy as np
    from PIL import Image

    (tmp_path / "custom_nodes").mkdir()
    os.symlink(PACK, tmp_path / "custom_nodes" / "twinflow", target_is_directory=True)
    os.symlink(server.base / "models", tmp_path / "models", target_is_directory=True)
    srv = Server(tmp_path, args=["--preview-method", "latent2rgb"])
    srv.start()
    try:
        ws = MiniWebSocket(srv.port, "twinflow-tests")
        try:
            previews = {}
            for tag, sampler in (("tf", {"class_type": "TwinFlowSampler", "inputs": {
                    "model": ["1", 0], "latent": ["4", 0], "seed": 7, "steps": 3, "cfg": 1.0, "sampler": "euler",
                    "scheduler": "simple", "shift": 0.0, "denoise": 1.0, "positive": ["3", 0]}}),
                                 ("core", _ksampler(7, 3))):
                p = _common(sampler)
                p["4"]["inputs"].update(width=64, height=64)  # an 8x8 preview
                p["5"] = p.pop("2")
                p["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"pv_{tag}"}}
                before = len(ws.binary)
                pid = srv.submit(p)
                srv.wait(pid)
                ws.wait_end(pid)
                frames = ws.binary[before:]
                previews[tag] = [f for f in frames if int.from_bytes(f[:4], "big") == 1]  # PREVIEW_IMAGE
        finally:
            ws.close()
    finally:
        srv.stop()
    assert len(previews["core"]) == 3, "core KSampler sent no previews: the oracle is not set up"
    assert len(previews["tf"]) == 3, f"TwinFlow Sampler sent {len(previews['tf'])} previews for 3 steps"
    imgs = {k: np.asarray(Image.open(io.BytesIO(v[-1][8:])).convert("RGB"), dtype=np.int16)
            for k, v in previews.items()}
    assert imgs["tf"].shape == imgs["core"].shape and imgs["tf"].std() > 0
    assert np.abs(imgs["tf"] - imgs["core"]).max() <= 2


def test_dual_branch_guider_keeps_core_model_patches(server):
    """The guider path runs ComfyUI's own sampling_function and sigmas: with ModelSamplingSD3 (shift 3) and CFGZeroStar
    on the semantic model, alpha = 1 equals core CFGGuider on the same patched model, and differs from unpatched."""
    def patched(graph):
        graph["20"] = {"class_type": "CFGZeroStar", "inputs": {"model": ["1", 0]}}
        graph["21"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["20", 0], "shift": 3.0}}
        for node in ("7", "10"):
            for k, v in graph[node]["inputs"].items():
                if v == ["1", 0]:
                    graph[node]["inputs"][k] = ["21", 0]
        return graph

    ours = _latent(server, server.run(patched(_guider_graph("constant", 1.0, 0.0))), "12")
    core = _latent(server, server.run(patched(_guider_graph("constant", 1.0, 0.0, guider="core_semantic"))), "12")
    plain = _latent(server, server.run(_guider_graph("constant", 1.0, 0.0)), "12")
    torch.testing.assert_close(ours, core, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2
