"""`twinflow serve`: ComfyUI's HTTP + WebSocket API over the headless runner (aiohttp, the `serve` extra).

Endpoints and shapes follow ComfyUI's server.py (every route also under `/api`): POST/GET /prompt,
GET/POST /queue, GET /history[/{id}], POST /history, GET /view, POST /upload/image, POST /interrupt,
POST /free, GET /object_info[/{class}], GET /system_stats, GET /ws?clientId=. Added for production:
GET /health, GET /ready, a bounded queue (503 + reason when full), a per-prompt timeout, an auth token
(required to listen beyond loopback), an upload size limit, and paths confined to the served folders.
See docs/serve.md for the differences from ComfyUI.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import socket
import struct
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import WSMsgType, web

from ...core import paths
from ...core.errors import TwinFlowError, WorkflowError
from ..formats import load_workflow
from ..validate import validate_prompt
from .models import ModelCache, with_model_cache
from .preview import PREVIEW_FORMATS, PREVIEW_IMAGE, encode_preview  # noqa: F401 (re-exported)
from .queue import DuplicatePromptId, PromptQueue, QueueFull
from .worker import Worker

logger = logging.getLogger(__name__)

FOLDER_TYPES = ("output", "input", "temp")
UNAUTHENTICATED = ("/health", "/ready")
_ANNOTATED = re.compile(r"^(.*) \[(input|output|temp)\]$")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    output_dir: Optional[str] = None  # default core.paths.output_dir()
    input_dir: Optional[str] = None
    temp_dir: Optional[str] = None  # default <output>/../temp
    models_dir: Optional[str] = None
    auth_token: Optional[str] = None
    max_queue: int = 64
    max_history: int = 10000
    max_upload_bytes: int = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size (MB)
    prompt_timeout: float = 0.0  # seconds; 0 = no limit
    model_cache_bytes: Optional[int] = None  # default half the machine's RAM
    warmup: Optional[str] = None  # a workflow run once before /ready says ready
    ray: Optional[str] = None  # run prompts on Ray actors: "" = start a local Ray / $RAY_ADDRESS, else an address
    ray_actors: int = 0  # 0 = one per GPU, or one per CPU slot
    previews: bool = False  # binary preview frames of the sampler's denoised latent at every step
    registry: Optional[dict] = field(default=None, repr=False)


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_listen(host: str, token: Optional[str]) -> None:
    """Refuse to listen beyond loopback without an auth token (ValueError saying how to fix it)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to listen on {host!r} (not a loopback address) without an auth token: pass "
                         f"--auth-token TOKEN (or set TWINFLOW_AUTH_TOKEN); clients then send "
                         f"'Authorization: Bearer TOKEN' (or ?token=TOKEN on /ws)")


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _free_ram() -> int:
    from ...core.memory import available_memory

    return available_memory("cpu") or 0


def process_rss() -> int:
    """Resident memory of this process in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def error_json(type_: str, message: str, details: str = "", status: int = 400, headers=None) -> web.Response:
    """ComfyUI's error body: `{"error": {type, message, details, extra_info}, "node_errors": {}}`."""
    return web.json_response({"error": {"type": type_, "message": message, "details": details, "extra_info": {}},
                              "node_errors": {}}, status=status, headers=headers)


class _BadRequest(Exception):
    def __init__(self, response: web.Response):
        super().__init__("bad request")
        self.response = response


async def _json_body(request: web.Request, *, optional: bool = False) -> dict:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise _BadRequest(error_json("invalid_json", "the request body is empty; send a JSON object"))
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _BadRequest(error_json("invalid_json", f"the request body is not valid JSON: {e}")) from None
    if not isinstance(data, dict):
        raise _BadRequest(error_json("invalid_json", f"the request body must be a JSON object, got "
                                                     f"{type(data).__name__}"))
    return data


def _id_list(data: dict, key: str) -> list:
    ids = data.get(key, [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _BadRequest(error_json("invalid_request", f"'{key}' must be a list of prompt id strings"))
    return ids


def confined_path(root: Path, subfolder: str, filename: str) -> Optional[Path]:
    """`root/subfolder/filename` if it stays inside `root` (symlinks resolved), else None."""
    if not filename or any("\x00" in s for s in (subfolder, filename)):
        return None
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        return None
    sub = subfolder.replace("\\", "/")
    if sub.startswith("/") or (len(sub) >= 2 and sub[1] == ":") or ".." in sub.split("/"):
        return None
    base = root.resolve()
    candidate = (base / sub / filename).resolve()
    try:
        candidate.relative_to(base)
    except ValueError:
        return None
    return candidate


class TwinFlowServer:
    """The API server: an aiohttp app, the prompt queue, the worker thread and the WebSocket clients."""

    def __init__(self, config: ServeConfig):
        from ..api import default_registry

        self.config = config
        self.dirs = {
            "output": Path(config.output_dir) if config.output_dir else paths.output_dir(),
            "input": Path(config.input_dir) if config.input_dir else paths.input_dir(),
        }
        self.dirs["temp"] = Path(config.temp_dir) if config.temp_dir else self.dirs["output"].parent / "temp"
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        budget = config.model_cache_bytes if config.model_cache_bytes is not None else _total_ram() // 2
        self.model_cache = ModelCache(budget)
        base = config.registry if config.registry is not None else default_registry()
        self.registry = with_model_cache(base, self.model_cache)
        self.queue = PromptQueue(config.max_queue, config.max_history, on_change=self._queue_changed)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._messages: Optional[asyncio.Queue] = None
        self._publisher: Optional[asyncio.Task] = None
        self._runner: Optional[web.AppRunner] = None
        self._paths_ctx = None
        self.port: Optional[int] = None
        if config.ray is not None:
            from .ray_pool import RayWorker

            warmup = self._load_warmup()  # validated here, so a bad file is an error at start

            self.worker = RayWorker(self.queue, self.send, address=config.ray or None, actors=config.ray_actors,
                                    output_dir=self.dirs["output"], input_dir=self.dirs["input"],
                                    models_dir=config.models_dir, model_cache_bytes=budget,
                                    prompt_timeout=config.prompt_timeout, previews=config.previews,
                                    warmup=(warmup[1], str(warmup[2])) if warmup is not None else None)
        else:
            self.worker = Worker(self.registry, self.queue, self.send, model_cache=self.model_cache,
                                 prompt_timeout=config.prompt_timeout, warmup=self._load_warmup(),
                                 previews=config.previews)

    def _load_warmup(self):
        if not self.config.warmup:
            return None
        try:
            wf = load_workflow(self.config.warmup, self.registry)
            with paths.using(models_dir=self.config.models_dir):
                validated = validate_prompt(wf.prompt, self.registry)
        except WorkflowError as e:
            raise WorkflowError(f"--warmup {self.config.warmup}: {e}", type=e.type, node_errors=e.node_errors) from None
        return validated, wf.prompt, self.dirs["temp"]

    # --------------------------------------------------------------------------------------- messages
    def send(self, event, data, sid=None) -> None:
        """Queue a WebSocket message (thread-safe): JSON `{"type", "data"}`, or bytes for binary events."""
        loop, q = self.loop, self._messages
        if loop is None or q is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(q.put_nowait, (event, data, sid))

    def send_preview(self, image, sid=None, fmt: str = "JPEG") -> None:
        """Send a preview image (PIL) as ComfyUI's binary PREVIEW_IMAGE frame."""
        self.send(PREVIEW_IMAGE, encode_preview(image, fmt)[4:], sid)

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def _queue_changed(self) -> None:
        self.send("status", {"status": self.queue_info()})

    async def _publish(self) -> None:
        while True:
            event, data, sid = await self._messages.get()
            targets = list(self.sockets.values()) if sid is None else (
                [self.sockets[sid]] if sid in self.sockets else [])
            if isinstance(event, int):
                frame = struct.pack(">I", event) + bytes(data)
                sends = [ws.send_bytes(frame) for ws in targets]
            else:
                text = json.dumps({"type": event, "data": data}, default=str)
                sends = [ws.send_str(text) for ws in targets]
            for coro in sends:
                try:
                    await coro
                except (ConnectionError, RuntimeError) as e:  # a client went away mid-send
                    logger.debug("websocket send failed: %s", e)

    # ------------------------------------------------------------------------------------ middleware
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        token = self.config.auth_token
        path = request.path[4:] if request.path.startswith("/api/") else request.path
        if token and path not in UNAUTHENTICATED:
            given = ""
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[7:].strip()
            elif "token" in request.query:
                given = request.query["token"]
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return error_json("unauthorized", "missing or wrong auth token: send 'Authorization: Bearer TOKEN' "
                                  "(or ?token=TOKEN on /ws)", status=401, headers={"WWW-Authenticate": "Bearer"})
        # As ComfyUI: a browser page of another origin must not drive a loopback server.
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host and origin and origin != "null":
            from urllib.parse import urlsplit

            h, o = urlsplit("//" + host.lower()), urlsplit(origin.lower())
            if is_loopback(h.hostname or "") and (h.hostname, h.port or o.port) != (o.hostname, o.port or h.port):
                return error_json("forbidden", f"origin {origin} does not match host {host}", status=403)
        try:
            return await handler(request)
        except _BadRequest as e:
            return e.response
        except web.HTTPRequestEntityTooLarge as e:
            return error_json("too_large", f"the request body is larger than the server's limit of "
                              f"{self.config.max_upload_bytes // 2**20} MiB (twinflow serve --max-upload-mb)",
                              str(e), status=413)

    # ---------------------------------------------------------------------------------------- routes
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_upload_bytes, middlewares=[self._guard])
        routes = [
            ("GET", "/ws", self.ws),
            ("GET", "/prompt", self.get_prompt), ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history), ("GET", "/history/{prompt_id}", self.get_history_id),
            ("POST", "/history", self.post_history),
            ("GET", "/view", self.view), ("POST", "/upload/image", self.upload_image),
            ("POST", "/interrupt", self.interrupt), ("POST", "/free", self.free),
            ("GET", "/object_info", self.object_info), ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/system_stats", self.system_stats), ("GET", "/features", self.features),
            ("GET", "/health", self.health), ("GET", "/ready", self.ready),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        return app

    async def ws(self, request: web.Request):
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        sid = request.query.get("clientId", "") or uuid.uuid4().hex
        old = self.sockets.pop(sid, None)
        if old is not None:
            await old.close()
        self.sockets[sid] = ws
        try:
            await ws.send_str(json.dumps({"type": "status", "data": {"status": self.queue_info(), "sid": sid}}))
            cur = self.worker.current
            if cur is not None and cur.extra_data.get("client_id") == sid and self.worker.last_node_id is not None:
                await ws.send_str(json.dumps({"type": "executing", "data": {"node": self.worker.last_node_id,
                                                                          "prompt_id": cur.prompt_id}}))
            first = True
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        logger.warning("websocket client %s sent text that is not JSON; ignored", sid)
                        continue
                    if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                        await ws.send_str(json.dumps({"type": "feature_flags", "data": self._features()}))
                    first = False
        finally:
            if self.sockets.get(sid) is ws:
                del self.sockets[sid]
        return ws

    def _features(self) -> dict:
        # binary previews are sent in the original frame (no metadata), so that flag is off
        return {"supports_preview_metadata": False, "max_upload_size": self.config.max_upload_bytes}

    async def features(self, request):
        return web.json_response(self._features())

    async def get_prompt(self, request):
        return web.json_response(self.queue_info())

    async def post_prompt(self, request):
        data = await _json_body(request)
        if "prompt" not in data:
            return error_json("no_prompt", "No prompt provided", "No prompt provided")
        prompt = data["prompt"]
        if not isinstance(prompt, dict):
            return error_json("invalid_prompt", f"'prompt' must be a JSON object of nodes (the API format), got "
                              f"{type(prompt).__name__}")
        extra = data.get("extra_data", {})
        if not isinstance(extra, dict):
            return error_json("invalid_prompt", "'extra_data' must be a JSON object")
        extra = dict(extra)
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        pid = data.get("prompt_id")
        pid = str(pid) if pid is not None else str(uuid.uuid4())
        if not pid or len(pid) > 200:
            return error_json("invalid_prompt", "'prompt_id' must be a non-empty string of at most 200 characters")
        targets = data.get("partial_execution_targets")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            return error_json("invalid_prompt", "'partial_execution_targets' must be a list of node id strings")
        number = data.get("number")
        if number is not None:
            try:
                number = float(number)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                return error_json("invalid_prompt", "'number' must be a finite number")
        try:
            wf = load_workflow(prompt, self.registry)
            validated = validate_prompt(wf.prompt, self.registry, targets)
        except WorkflowError as e:
            logger.info("invalid prompt: %s", e)
            return web.json_response(e.to_json(), status=400)
        except (TwinFlowError, ValueError, TypeError) as e:  # a node's INPUT_TYPES/VALIDATE_INPUTS misbehaved
            return error_json("invalid_prompt", f"the prompt could not be validated: {e}")
        if wf.format == "ui" and "extra_pnginfo" not in extra:
            extra["extra_pnginfo"] = {"workflow": wf.ui}
        if number is None:
            number = self.queue.next_number(bool(data.get("front", False)))
        try:
            self.queue.put(number, pid, wf.prompt, extra, validated.outputs, validated)
        except QueueFull as e:
            return error_json("queue_full", str(e), status=503, headers={"Retry-After": "1"})
        except DuplicatePromptId as e:
            return error_json("duplicate_prompt_id", str(e))
        return web.json_response({"prompt_id": pid, "number": number, "node_errors": {}})

    async def get_queue(self, request):
        return web.json_response({"queue_running": [i.as_list() for i in self.queue.running()],
                                  "queue_pending": [i.as_list() for i in self.queue.pending()]})

    async def post_queue(self, request):
        data = await _json_body(request)
        ids = _id_list(data, "delete")
        if data.get("clear"):
            for item in self.queue.wipe():
                self.worker.cancel_queued(item, "the queue was cleared (POST /queue clear)")
        for pid in ids:
            item = self.queue.delete(pid)
            if item is not None:
                self.worker.cancel_queued(item, "deleted from the queue (POST /queue delete)")
        return web.Response(status=200)

    async def get_history(self, request):
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query["offset"]) if "offset" in request.query else -1
        except ValueError:
            return error_json("invalid_request", "max_items and offset must be integers")
        return web.json_response(self.queue.history(max_items=max_items, offset=offset))

    async def get_history_id(self, request):
        return web.json_response(self.queue.history(request.match_info["prompt_id"]))

    async def post_history(self, request):
        data = await _json_body(request)
        ids = _id_list(data, "delete")
        if data.get("clear"):
            self.queue.wipe_history()
        for pid in ids:
            self.queue.delete_history(pid)
        return web.Response(status=200)

    async def interrupt(self, request):
        data = await _json_body(request, optional=True)
        pid = data.get("prompt_id")
        if pid is not None and not isinstance(pid, str):
            return error_json("invalid_request", "'prompt_id' must be a string")
        done = self.worker.cancel(pid)
        if not done:
            logger.info("interrupt: %s", f"prompt {pid} is not running" if pid else "nothing is running")
        return web.json_response({"interrupted": done})

    async def free(self, request):
        data = await _json_body(request)
        if data.get("unload_models", False):
            self.queue.set_flag("unload_models", True)
        if data.get("free_memory", False):
            self.queue.set_flag("free_memory", True)
        return web.Response(status=200)

    def _node_info(self, name: str) -> dict:
        from ...nodes import NODE_DISPLAY_NAME_MAPPINGS
        from ..spec import object_info

        return object_info(name, self.registry[name], NODE_DISPLAY_NAME_MAPPINGS.get(name))

    async def object_info(self, request):
        out = {}
        for name in self.registry:
            try:
                out[name] = self._node_info(name)
            except Exception:  # one broken node class must not hide the others (as ComfyUI)
                logger.exception("object_info of %s failed", name)
        return web.json_response(out, dumps=lambda o: json.dumps(o, default=str))

    async def object_info_node(self, request):
        name = request.match_info["node_class"]
        out = {name: self._node_info(name)} if name in self.registry else {}
        return web.json_response(out, dumps=lambda o: json.dumps(o, default=str))

    async def system_stats(self, request):
        from ...core.version import __version__
        import torch

        devices = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                devices.append({"name": torch.cuda.get_device_name(i), "type": "cuda", "index": i,
                                "vram_total": total, "vram_free": free, "torch_vram_total": total,
                                "torch_vram_free": free})
        else:
            devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": _total_ram(),
                            "vram_free": _free_ram(), "torch_vram_total": _total_ram(), "torch_vram_free": _free_ram()})
        stats = {
            "system": {"os": os.name, "ram_total": _total_ram(), "ram_free": _free_ram(),
                       "comfyui_version": f"twinflow-{__version__}", "twinflow_version": __version__,
                       "python_version": sys.version, "pytorch_version": torch.__version__,
                       "embedded_python": False, "argv": sys.argv},
            "devices": devices,
            "twinflow": {"rss_bytes": process_rss(), "model_cache": self.model_cache.stats(),
                         "prompts_done": self.worker.prompts_done, "queue_remaining": self.queue.remaining(),
                         "ready": self.worker.ready},
        }
        if hasattr(self.worker, "actor_stats"):  # --ray: the models live in the actors
            stats["twinflow"]["ray_actors"] = await asyncio.get_running_loop().run_in_executor(None, self.worker.actor_stats)
        return web.json_response(stats)

    async def health(self, request):
        alive = self.worker.alive
        return web.json_response({"status": "ok" if alive else "worker thread stopped"}, status=200 if alive else 503)

    async def ready(self, request):
        if self.worker.ready and self.worker.alive:
            return web.json_response({"ready": True})
        reason = self.worker.not_ready_reason or "the worker thread stopped"
        return web.json_response({"ready": False, "reason": reason}, status=503)

    # ---------------------------------------------------------------------------------------- files
    def _folder(self, kind: Optional[str]) -> Optional[Path]:
        return self.dirs.get(kind or "output")

    async def view(self, request):
        q = request.query
        filename = q.get("filename", "")
        kind = q.get("type") or "output"
        m = _ANNOTATED.match(filename)
        if m:
            filename, kind = m.group(1), m.group(2)
        if kind not in FOLDER_TYPES:
            return error_json("invalid_request", f"type {kind!r} must be one of {', '.join(FOLDER_TYPES)}")
        if not filename:
            return error_json("invalid_request", "give the file with ?filename=NAME (&subfolder=...&type=output)")
        path = confined_path(self.dirs[kind], q.get("subfolder", ""), filename)
        if path is None:
            return error_json("forbidden", "filename and subfolder must name a file inside the served "
                              f"{kind} folder (no '..', no absolute paths, no links out of it)", status=403)
        if not path.is_file():
            return web.Response(status=404)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css",
                     "image/svg+xml"}:
            ctype = "application/octet-stream"  # never rendered by a browser from our origin
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"',
                                               "Content-Type": ctype})

    async def upload_image(self, request):
        try:
            post = await request.post()
        except ValueError as e:  # not multipart/form-data
            return error_json("invalid_request", f"send the image as multipart/form-data field 'image': {e}")
        image = post.get("image")
        if image is None or not hasattr(image, "file"):
            return error_json("invalid_request", "no file in the multipart field 'image'")
        kind = post.get("type") or "input"
        if kind not in FOLDER_TYPES:
            return error_json("invalid_request", f"type {kind!r} must be one of {', '.join(FOLDER_TYPES)}")
        subfolder = str(post.get("subfolder", "") or "")
        name = os.path.basename(str(image.filename or ""))
        target = confined_path(self.dirs[kind], subfolder, name)
        if target is None:
            return error_json("forbidden", "the file name and subfolder must stay inside the served "
                              f"{kind} folder (no '..', no absolute paths)", status=403)
        overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
        data = image.file.read()
        final = await asyncio.get_running_loop().run_in_executor(None, _store_upload, target, data, overwrite)
        return web.json_response({"name": final.name, "subfolder": subfolder, "type": kind})

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._messages = asyncio.Queue()
        self._publisher = asyncio.create_task(self._publish())
        self._paths_ctx = paths.using(output_dir=self.dirs["output"], input_dir=self.dirs["input"],
                                      models_dir=self.config.models_dir)
        self._paths_ctx.__enter__()
        self.worker.start()
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        logger.info("twinflow serve listening on http://%s:%s", self.config.host, self.port)

    async def stop(self) -> None:
        for ws in list(self.sockets.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        if self._publisher is not None:
            self._publisher.cancel()
        if self._paths_ctx is not None:
            self._paths_ctx.__exit__(None, None, None)
            self._paths_ctx = None


def _store_upload(target: Path, data: bytes, overwrite: bool) -> Path:
    """Write an upload atomically; without `overwrite` a taken name gets ' (n)' (same bytes: reuse it)."""
    from ...core.outputs import atomic_output

    target.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        tmp = target.with_name(f".twinflow-upload-{secrets.token_hex(8)}{target.suffix}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return target
    digest = hashlib.sha256(data).digest()
    stem, ext = os.path.splitext(target.name)
    for i in range(10000):
        path = target if i == 0 else target.with_name(f"{stem} ({i}){ext}")
        if path.exists():
            if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == digest:
                return path  # the same file was uploaded before (ComfyUI's duplicate check)
            continue
        try:
            with atomic_output(path) as tmp:
                tmp.write_bytes(data)
        except FileExistsError:
            continue  # taken meanwhile by a concurrent upload
        return path
    raise FileExistsError(f"no free name for {target.name} in {target.parent}")


class ServerThread:
    """Run a TwinFlowServer on its own event loop in a background thread (tests, embedding)."""

    def __init__(self, config: ServeConfig):
        self.server = TwinFlowServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="twinflow-serve-loop", daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(60)
        return self

    @property
    def url(self) -> str:
        host = self.server.config.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.server.port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
