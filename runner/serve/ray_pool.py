"""Prompts executed by Ray actors (`twinflow serve --ray`, `twinflow batch --ray`; the `ray` extra).

The API server stays the single front door: it validates, queues and keeps the history as without Ray;
`RayWorker` replaces the in-process `Worker` with one dispatcher thread per actor. An actor (one per GPU,
or one per CPU slot on CPU hosts) keeps its own Executor and model LRU for its life, so models stay warm
between the prompts it runs. It streams the executor's events (a Ray streaming generator); the dispatcher
turns them into the same WebSocket messages the in-process worker sends.

Outputs: an attempt writes into a staging folder `<output>/.twinflow-ray/<prompt_id>.<attempt>/` (the
output folder must be storage shared by the server and every actor's node). Only a successful attempt's
files are published into the output folder (renamed to the next free counter when a name is taken, never
overwriting), and only then are `executed` messages sent and the history written - so an attempt that
dies leaves nothing behind and a retried prompt is never written twice. With previews on, the actor
encodes the JPEG frame of each sampler step and the server relays it as a binary message.

Failures: when an actor dies mid-prompt (process killed, node lost), the prompt's history gets an
`execution_error` message naming the dead actor, a fresh actor takes the slot, and the prompt is retried
once there; a second death is the prompt's final error.
"""
from __future__ import annotations

import logging
import os
import queue as pyqueue
import re
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from ...core import paths, progress
from ...core.errors import Interrupted
from .preview import PREVIEW_IMAGE
from .queue import PromptQueue, QueueItem

logger = logging.getLogger(__name__)

STAGING = ".twinflow-ray"
MAX_ATTEMPTS = 2  # the first run and one retry on a fresh actor
_NUMBERED = re.compile(r"^(.*)_(\d{5,})_(.*)$")


def _ms() -> int:
    return int(time.time() * 1000)


class _QueueBar:
    """A progress bar of the actor: its steps (and, with previews on, a JPEG frame of the sampler's
    denoised latent per step, built here as the in-process worker builds it) go into the event stream."""

    def __init__(self, events, total, node_id, previews: bool = False):
        self.events, self.total, self.node_id, self.value = events, max(int(total), 1), node_id, 0
        self.previews = previews

    def update(self, n):
        self.value = min(self.value + n, self.total)
        self.events.put(("progress", {"value": self.value, "max": self.total, "node": self.node_id}))

    def preview(self, latent):
        if not self.previews:
            return
        from .preview import preview_frame

        frame = preview_frame(latent)
        if frame is not None:
            self.events.put(("preview", frame[4:]))  # the image type + image; the server adds the event type

    def close(self):
        pass


class PromptActorImpl:
    """What runs inside a Ray actor: an Executor over the model-cached registry, kept for the actor's life."""

    def __init__(self, input_dir: Optional[str], models_dir: Optional[str], model_cache_bytes: int,
                 previews: bool = False):
        from ..api import default_registry
        from ..executor import Executor
        from .models import ModelCache, with_model_cache

        self.model_cache = ModelCache(model_cache_bytes)
        self.registry = with_model_cache(default_registry(), self.model_cache)
        self.executor = Executor(self.registry)
        self.input_dir, self.models_dir = input_dir, models_dir
        self.previews = previews
        self.warmups = 0
        self._current: Optional[str] = None
        self._cancel: Optional[tuple] = None
        self._pending_free: Optional[tuple] = None
        self._free_lock = threading.Lock()  # free() comes on another actor thread than run()
        progress.add_interrupt_check(self._check)

    def pid(self) -> int:
        return os.getpid()

    def cancel(self, prompt_id: str, timeout_s: float = 0.0) -> bool:
        if self._current != prompt_id:
            return False
        self._cancel = (prompt_id, timeout_s)
        return True

    def stats(self) -> dict:
        """This actor's process, warm-ups run and model LRU (entries, hits, misses = loads)."""
        return {"pid": os.getpid(), "warmups": self.warmups, "model_cache": self.model_cache.stats()}

    def warmup(self, prompt: dict, temp_dir: str) -> float:
        """Run the server's --warmup workflow here (outputs to its temp folder); the seconds it took."""
        from ..validate import validate_prompt

        start = time.perf_counter()
        with paths.using(output_dir=temp_dir, input_dir=self.input_dir, models_dir=self.models_dir):
            self.executor.execute(validate_prompt(prompt, self.registry), original_prompt=prompt)
        self.warmups += 1
        return time.perf_counter() - start

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's /free for this actor; while a prompt runs, it applies when that prompt ends."""
        with self._free_lock:
            if self._current is not None:
                prev = self._pending_free or (False, False)
                self._pending_free = (prev[0] or unload_models, prev[1] or free_memory)
                return
            self._free(unload_models, free_memory)  # under the lock: a prompt starting now waits for it

    def _free(self, unload_models: bool, free_memory: bool) -> None:
        import gc

        if unload_models or free_memory:
            self.model_cache.clear()
        if free_memory:
            self.executor.clear()
            gc.collect()

    def _check(self) -> None:
        c = self._cancel
        if c is not None and c[0] == self._current:
            if c[1]:
                raise _Timeout(f"prompt {c[0]} ran longer than the server's per-prompt limit of {c[1]:g} s "
                               f"(twinflow serve --prompt-timeout) and was stopped")
            raise Interrupted(f"prompt {c[0]} was cancelled")

    def run(self, prompt_id: str, prompt: dict, extra_data: dict, targets, staging: str):
        """Yield `(event, data)` while the prompt runs; the last is ("done" | "interrupted" | "error", data)."""
        from ..executor import NodeExecutionError
        from ..validate import validate_prompt

        events: pyqueue.Queue = pyqueue.Queue()

        def work():
            try:
                with paths.using(output_dir=staging, input_dir=self.input_dir, models_dir=self.models_dir):
                    validated = validate_prompt(prompt, self.registry, targets)
                    self.executor.execute(validated, extra_pnginfo=extra_data.get("extra_pnginfo"),
                                          original_prompt=prompt, listener=lambda e, d: events.put((e, d)))
                events.put(("done", {}))
            except _Timeout as e:
                events.put(("error", {"exception_type": "TimeoutError", "exception_message": str(e),
                                      "traceback": [], "node_id": None}))
            except Interrupted as e:
                events.put(("interrupted", {"message": str(e)}))
            except NodeExecutionError as e:
                tb = traceback.format_exception(type(e.original), e.original, e.original.__traceback__)
                events.put(("error", {"exception_type": type(e.original).__name__, "exception_message":
                                      str(e.original), "traceback": "".join(tb).splitlines(), "node_id": e.node_id}))
            except Exception as e:  # a WorkflowError or a bug outside any node: reported, the actor lives on
                events.put(("error", {"exception_type": type(e).__name__, "exception_message": str(e),
                                      "traceback": traceback.format_exc().splitlines(), "node_id": None}))

        with self._free_lock:
            self._current, self._cancel = prompt_id, None
        previews = self.previews and extra_data.get("client_id") is not None  # as in-process: to the client only
        progress.set_backend(lambda total, desc, node_id: _QueueBar(events, total, node_id, previews))
        thread = threading.Thread(target=work, name=f"twinflow-actor-{prompt_id}")
        thread.start()
        try:
            while True:
                ev = events.get()
                yield ev
                if ev[0] in ("done", "interrupted", "error"):
                    break
        finally:
            thread.join()
            with self._free_lock:
                self._current, self._cancel = None, None
                pending, self._pending_free = self._pending_free, None
                if pending is not None:
                    self._free(*pending)


class _Timeout(Interrupted):
    pass


def _actor_class():
    import ray

    @ray.remote(max_restarts=0, max_concurrency=4)
    class PromptActor(PromptActorImpl):
        @ray.method(num_returns="streaming")
        def run(self, *args):
            yield from PromptActorImpl.run(self, *args)

    return PromptActor


def _ray_errors() -> tuple:
    import ray.exceptions as rx

    names = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(rx, n) for n in names if hasattr(rx, n))


def publish_outputs(outputs: dict, staging: Path, output: Path) -> dict:
    """Move the files an attempt wrote from `staging` into `output` (never overwriting: a taken
    `<prefix>_<counter>_<rest>` name gets the next free counter); returns `outputs` with the final names."""
    from ...core.outputs import next_counter

    result = {}
    for nid, ui in outputs.items():
        new_ui = {}
        for key, value in ui.items():
            if not (isinstance(value, list) and all(isinstance(v, dict) and "filename" in v for v in value)):
                new_ui[key] = value
                continue
            entries = []
            for entry in value:
                if entry.get("type", "output") != "output":
                    entries.append(entry)
                    continue
                sub = entry.get("subfolder", "") or ""
                src = staging / sub / entry["filename"]
                folder = output / sub
                folder.mkdir(parents=True, exist_ok=True)
                name = entry["filename"]
                m = _NUMBERED.match(name)
                for _ in range(10000):
                    try:
                        os.link(src, folder / name)  # atomic, fails if the name exists
                        break
                    except FileExistsError:
                        if not m:
                            stem, ext = os.path.splitext(entry["filename"])
                            name = f"{stem}_{next_counter(folder, stem):05}_{ext}"
                            m = _NUMBERED.match(name)
                        else:
                            name = f"{m.group(1)}_{next_counter(folder, m.group(1)):05}_{m.group(3)}"
                else:
                    raise FileExistsError(f"no free name for {entry['filename']} in {folder}")
                entries.append({**entry, "filename": name})
            new_ui[key] = entries
        result[nid] = new_ui
    return result


def init_local_ray(**kwargs) -> None:
    """Start a local, single-machine Ray whose every process listens on the loopback interface only.

    Ray 2.x binds its GCS, raylet, object manager and workers to the node's IP, and `ray.init` turns a
    loopback `_node_ip_address` into the machine's routable address (services.resolve_ip_for_localhost).
    What keeps it on 127.0.0.1 is the switch Ray itself uses on macOS/Windows, where it runs local-only:
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (read into ray_constants.ENABLE_RAY_CLUSTER), set only while
    the cluster starts. The node IP is checked afterwards: anything else is an error, not a warning."""
    import ray
    from ray._private import ray_constants

    env_name = getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    prev_env, prev_const = os.environ.get(env_name), ray_constants.ENABLE_RAY_CLUSTER
    before = {(addr, port) for _, addr, port in _public_listeners()}  # e.g. the API server on --listen 0.0.0.0
    os.environ[env_name] = "0"  # the processes Ray starts read it too
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = prev_const
        if prev_env is None:
            os.environ.pop(env_name, None)
        else:
            os.environ[env_name] = prev_env
    ip = ray.util.get_node_ip_address()
    if ip not in ("127.0.0.1", "::1"):
        ray.shutdown()
        raise RuntimeError(f"the local Ray started on {ip}, not on loopback (this Ray version does not honour "
                           f"{env_name}=0); start Ray yourself and pass its address to --ray")
    public = [x for x in _public_listeners() if x[1:] not in before]
    if public:  # Ray before ray-project/ray#59852 (2026) binds its gRPC servers to every interface
        logger.warning("the local Ray listens beyond loopback (this Ray version binds to every interface "
                       "whatever the node IP): %s; keep these ports firewalled or upgrade Ray",
                       ", ".join(f"{name} {addr}:{port}" for name, addr, port in public))


def _public_listeners() -> list:
    """(process name, address, port) of the TCP listeners of this process and its descendants (the local
    Ray's GCS, raylet, agents, workers) that are not on a loopback address; [] where /proc is missing."""
    import ipaddress

    if not os.path.exists("/proc/net/tcp"):
        return []
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":  # listening
                hexip, port = f[1].split(":")
                raw = bytes.fromhex(hexip)
                ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                ip = getattr(ip, "ipv4_mapped", None) or ip
                if not ip.is_loopback:
                    sockets[int(f[9])] = (str(ip), int(port, 16))
    if not sockets:
        return []
    children: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
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
                found.append((name, *sockets[int(target[8:-1])]))
    return found


def plan_actors(cluster: dict) -> tuple[int, dict]:
    """One actor per GPU when the cluster has GPUs, else one per CPU slot: (count, actor options)."""
    gpus = int(cluster.get("GPU", 0))
    if gpus > 0:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return max(int(cluster.get("CPU", 1)), 1), {"num_cpus": 1}


class RayWorker:
    """The server's worker when prompts run on Ray actors (same interface as serve.worker.Worker)."""

    def __init__(self, queue: PromptQueue, send: Callable, *, address: Optional[str], actors: int = 0,
                 output_dir: Path, input_dir: Optional[Path] = None, models_dir: Optional[str] = None,
                 model_cache_bytes: int = 2**34, prompt_timeout: float = 0.0, previews: bool = False,
                 warmup: Optional[tuple] = None):
        self.queue, self.send = queue, send
        self.address, self.n_actors = address, actors
        self.output_dir = Path(output_dir)
        self.input_dir, self.models_dir = input_dir, models_dir
        self.model_cache_bytes, self.prompt_timeout = model_cache_bytes, float(prompt_timeout or 0.0)
        self.previews = previews
        self.warmup = warmup  # (API prompt, temp folder) run on every actor before /ready, or None
        self.ready = False
        self.not_ready_reason = "starting the Ray actors"
        self.last_node_id: Optional[str] = None
        self.prompts_done = 0
        self.retries = 0
        self.actors: list = []
        self.running: dict[str, int] = {}  # prompt_id -> actor slot
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._options: dict = {}
        self._owns_ray = False
        self._starter: Optional[threading.Thread] = None
        self._failed = False

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Connect to (or start) Ray here; the actors come up in the background (/ready says when)."""
        import ray

        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            if address is None:  # a Ray of this machine only: loopback, like the server's default --listen
                init_local_ray()
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        self._starter = threading.Thread(target=self._start_actors, name="twinflow-ray-start", daemon=True)
        self._starter.start()

    def _start_actors(self) -> None:
        import ray

        try:
            count, self._options = plan_actors(ray.cluster_resources())
            count = self.n_actors or count
            self.actors = [self._new_actor() for _ in range(count)]
            pids = ray.get([a.pid.remote() for a in self.actors])  # every actor up (its imports done)
        except Exception as e:  # the server stays up and /ready says why
            logger.error("starting the Ray actors failed: %s", e, exc_info=True)
            self.not_ready_reason, self._failed = f"starting the Ray actors failed: {e}", True
            return
        logger.info("twinflow serve: %d Ray actor(s) %s, processes %s", count, self._options, pids)
        warm_error = None
        if self.warmup is not None:
            self.not_ready_reason = f"running the warm-up workflow on {count} Ray actor(s)"
            start = time.perf_counter()
            for slot, actor in enumerate(self.actors):
                warm_error = warm_error or self._warm(actor, slot)
            if warm_error is None:
                logger.info("warm-up workflow done on %d actor(s) in %.2f s; ready", count, time.perf_counter() - start)
        for slot in range(count):
            t = threading.Thread(target=self._loop, args=(slot,), name=f"twinflow-ray-slot-{slot}", daemon=True)
            t.start()
            self._threads.append(t)
        if warm_error is not None:  # as in-process: the server serves on, but never reports ready
            self.not_ready_reason = warm_error
            return
        self.ready, self.not_ready_reason = True, ""

    def _warm(self, actor, slot: int) -> Optional[str]:
        """Run the warm-up workflow on `actor`; None, or why it failed."""
        import ray

        try:
            ray.get(actor.warmup.remote(*self.warmup))
            return None
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            logger.error("warm-up workflow failed on Ray slot %d: %s", slot, cause)
            return f"the warm-up workflow failed on a Ray actor: {type(cause).__name__}: {cause}"

    def actor_stats(self, timeout: float = 30.0) -> list:
        """Each actor's `stats()` (process, warm-ups, model LRU); an actor that does not answer -> its error."""
        import ray

        out = []
        for a in list(self.actors):
            try:
                out.append(ray.get(a.stats.remote(), timeout=timeout))
            except Exception as e:
                out.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        return out

    def _new_actor(self):
        return _actor_class().options(**self._options).remote(
            str(self.input_dir) if self.input_dir else None, self.models_dir, self.model_cache_bytes, self.previews)

    def stop(self, timeout: float = 30.0) -> None:
        import ray

        self._stop.set()
        self.queue.close()
        if self._starter is not None:
            self._starter.join(timeout)
        for pid in list(self.running):
            self.cancel(pid)
        for t in self._threads:
            t.join(timeout)
        for a in self.actors:
            ray.kill(a)
        if self._owns_ray:
            ray.shutdown()

    @property
    def alive(self) -> bool:
        if self._failed or self._starter is None:
            return False
        if not self._threads:  # the actors are still coming up
            return self._starter.is_alive()
        return all(t.is_alive() for t in self._threads)  # (a failed warm-up leaves them serving, not ready)

    @property
    def current(self) -> Optional[QueueItem]:
        return None  # several prompts run at once; a reconnecting client gets no "executing" replay

    def actor_pid(self, prompt_id: str) -> Optional[int]:
        """The process id of the actor running `prompt_id` (None when it is not running)."""
        import ray

        slot = self.running.get(prompt_id)
        return None if slot is None else ray.get(self.actors[slot].pid.remote())

    def cancel(self, prompt_id: Optional[str] = None, timeout_s: float = 0.0) -> bool:
        with self._lock:
            targets = [(p, s) for p, s in self.running.items() if prompt_id is None or p == prompt_id]
        for p, slot in targets:
            self.actors[slot].cancel.remote(p, timeout_s)
        return bool(targets)

    def cancel_queued(self, item: QueueItem, reason: str) -> None:
        from .worker import Worker

        Worker.cancel_queued(self, item, reason)  # same history entry and messages

    # ------------------------------------------------------------------------------------------ loop
    def _loop(self, slot: int) -> None:
        while not self._stop.is_set():
            item = self.queue.get(timeout=1.0)
            if item is not None:
                self._execute(slot, item)
            flags = self.queue.take_flags()
            if flags:
                for a in self.actors:
                    a.free.remote(bool(flags.get("unload_models", flags.get("free_memory"))),
                                  bool(flags.get("free_memory")))

    def _execute(self, slot: int, item: QueueItem) -> None:
        import ray

        pid, sid = item.prompt_id, item.extra_data.get("client_id")
        messages: list = []
        start = time.perf_counter()

        def add(event, data, broadcast=False):
            data = {**data, "timestamp": _ms()}
            messages.append([event, data])
            if sid is not None or broadcast:
                self.send(event, data, sid)

        def ctype(node):
            n = item.prompt.get(node) if node is not None else None
            return n.get("class_type") if isinstance(n, dict) else None

        add("execution_start", {"prompt_id": pid})
        ok, outputs, meta = False, {}, {}
        for attempt in range(1, MAX_ATTEMPTS + 1):
            staging = self.output_dir / STAGING / f"{pid}.{attempt}"
            actor = self.actors[slot]
            executed, raw_outputs, final, last = [], {}, None, None
            with self._lock:
                self.running[pid] = slot
            timer = None
            if self.prompt_timeout > 0:
                timer = threading.Timer(self.prompt_timeout, self.cancel, (pid, self.prompt_timeout))
                timer.daemon = True
                timer.start()
            try:
                for ref in actor.run.remote(pid, item.prompt, item.extra_data, item.validated.outputs, str(staging)):
                    event, data = ray.get(ref)
                    if event == "execution_cached":
                        add("execution_cached", {"nodes": data["nodes"], "prompt_id": pid})
                    elif event == "executing":
                        last = self.last_node_id = data["node"]
                        executed.append(last)
                        if sid is not None:
                            self.send("executing", {"node": last, "display_node": last, "prompt_id": pid}, sid)
                    elif event == "progress":
                        if sid is not None:
                            self.send("progress", {**data, "node": data["node"] or last, "prompt_id": pid}, sid)
                    elif event == "preview":
                        if sid is not None:
                            self.send(PREVIEW_IMAGE, data, sid)
                    elif event == "executed":
                        if data["output"]:
                            raw_outputs[data["node"]] = data["output"]
                    else:
                        final = (event, data)
            except _ray_errors() as e:
                dead = f"the Ray actor running prompt {pid} died (attempt {attempt} of {MAX_ATTEMPTS}): {type(e).__name__}"
                logger.error("%s; %s", dead, "retrying on a fresh actor" if attempt < MAX_ATTEMPTS else "giving up")
                add("execution_error", {"prompt_id": pid, "node_id": last, "node_type": ctype(last),
                                        "executed": [n for n in executed if n != last], "exception_message":
                                        f"{dead}: {str(e).splitlines()[0] if str(e) else ''}",
                                        "exception_type": "ActorDiedError", "traceback": [], "current_inputs": {},
                                        "current_outputs": [], "attempt": attempt,
                                        "retrying": attempt < MAX_ATTEMPTS})
                shutil.rmtree(staging, ignore_errors=True)
                with self._lock:
                    self.running.pop(pid, None)
                    self.actors[slot] = self._new_actor()
                if self.warmup is not None:  # the fresh actor warms up as its predecessor did
                    self._warm(self.actors[slot], slot)
                self.retries += 1
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            with self._lock:
                self.running.pop(pid, None)
            event, data = final if final is not None else ("error", {"exception_type": "RuntimeError",
                                                                     "exception_message": "the actor ended the "
                                                                     "prompt without a result", "traceback": []})
            if event == "done":
                try:
                    outputs = publish_outputs(raw_outputs, staging, self.output_dir)
                    ok = True
                except OSError as e:
                    event, data = "error", {"exception_type": type(e).__name__, "exception_message":
                                            f"publishing the outputs failed: {e}", "traceback": [], "node_id": None}
            if ok:
                for nid, ui in outputs.items():
                    meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                    if sid is not None:
                        self.send("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid}, sid)
                add("execution_success", {"prompt_id": pid})
            elif event == "interrupted":
                add("execution_interrupted", {"prompt_id": pid, "node_id": last, "node_type": ctype(last),
                                              "executed": [n for n in executed if n != last]}, broadcast=True)
            else:
                node = data.get("node_id") or last
                add("execution_error", {"prompt_id": pid, "node_id": node, "node_type": ctype(node),
                                        "executed": [n for n in executed if n != node],
                                        "exception_message": data["exception_message"],
                                        "exception_type": data["exception_type"], "traceback": data["traceback"],
                                        "current_inputs": {}, "current_outputs": [n for n in executed if n != node]})
            shutil.rmtree(staging, ignore_errors=True)
            break
        try:
            (self.output_dir / STAGING).rmdir()  # only when no other prompt is staging
        except OSError:
            pass
        status = {"status_str": "success" if ok else "error", "completed": ok, "messages": messages}
        self.queue.task_done(item, outputs, status, meta)
        self.prompts_done += 1
        logger.info("prompt %s %s in %.2f s (Ray slot %d)", pid, "done" if ok else "failed",
                    time.perf_counter() - start, slot)
        if sid is not None:
            self.send("executing", {"node": None, "prompt_id": pid}, sid)
