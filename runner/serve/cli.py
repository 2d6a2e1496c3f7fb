"""`twinflow serve` and `twinflow batch` (registered by runner/cli.py; aiohttp and ray imported on use)."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE = 0, 2


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve ComfyUI's HTTP + WebSocket API headless (needs the 'serve' extra)")
    s.add_argument("--host", "--listen", dest="host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything else needs --auth-token)")
    s.add_argument("--port", type=int, default=8188, help="port (default 8188, as ComfyUI; 0 = any free port)")
    s.add_argument("--auth-token", default=os.environ.get("TWINFLOW_AUTH_TOKEN"),
                   help="clients must send 'Authorization: Bearer TOKEN' (default $TWINFLOW_AUTH_TOKEN)")
    s.add_argument("--output-dir", help="where output nodes write (default ./output or $TWINFLOW_OUTPUT_DIR)")
    s.add_argument("--input-dir", help="uploads and input files (default ./input or $TWINFLOW_INPUT_DIR)")
    s.add_argument("--temp-dir", help="the 'temp' folder of /view and /upload (default beside the output folder)")
    s.add_argument("--models-dir", help="models folder in ComfyUI layout (default ./models or $TWINFLOW_MODELS_DIR)")
    s.add_argument("--max-queue", type=int, default=64, help="pending prompts before POST /prompt answers 503")
    s.add_argument("--prompt-timeout", type=float, default=0.0,
                   help="stop a prompt running longer than this many seconds (0 = no limit)")
    s.add_argument("--max-upload-mb", type=float, default=100.0, help="largest request body, in MiB (default 100)")
    s.add_argument("--model-cache-mb", type=float, help="memory budget of the models kept loaded between prompts "
                                                        "(default half the RAM)")
    s.add_argument("--max-history", type=int, default=10000, help="history entries kept (oldest dropped first)")
    s.add_argument("--warmup", metavar="WORKFLOW", help="run this workflow once at start; /ready answers 200 after it")
    s.add_argument("--kernels", choices=("auto", "cupy", "torch"), help="kernel path for fused ops")
    s.add_argument("--previews", action="store_true",
                   help="send a binary JPEG preview of the sampler's denoised latent at every step (first 3 latent "
                        "channels stretched; not a learned RGB projection; relayed from the actors with --ray)")
    _ray_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="run the jobs of a JSONL file (a workflow + overrides per line), in this "
                                     "process or on Ray actors")
    b.add_argument("jobs", help='JSONL file: {"workflow": PATH, "overrides": {"7.seed": 3}, "id": NAME} per line')
    b.add_argument("--output-dir", help="where output nodes write (default ./output or $TWINFLOW_OUTPUT_DIR)")
    b.add_argument("--input-dir", help="input files (default ./input or $TWINFLOW_INPUT_DIR)")
    b.add_argument("--models-dir", help="models folder in ComfyUI layout (default ./models or $TWINFLOW_MODELS_DIR)")
    b.add_argument("--model-cache-mb", type=float, help="memory budget of the models kept loaded between jobs")
    _ray_args(b)
    b.set_defaults(func=cmd_batch)


def _ray_args(p) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run prompts on Ray actors (the 'ray' extra): no ADDRESS = $RAY_ADDRESS, else a new local Ray "
                        "listening on loopback only; else a cluster address such as head:6379 or ray://head:10001 "
                        "('auto' = the Ray started with `ray start` on this machine)")
    p.add_argument("--ray-actors", type=int, default=0,
                   help="actors to start (default: one per GPU of the cluster, else one per CPU slot)")


def _need(module: str, extra: str, what: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f'error: {what} needs {module}: pip install "comfyui-twinflow[{extra}]"', file=sys.stderr)
        return False
    return True


def cmd_batch(args) -> int:
    from ...core.errors import WorkflowError
    from .batch import run_batch

    if args.ray is not None and not _need("ray", "ray", "--ray"):
        return EXIT_USAGE
    budget = int(args.model_cache_mb * 2**20) if args.model_cache_mb else 2**34
    try:
        results = run_batch(args.jobs, output_dir=args.output_dir, input_dir=args.input_dir,
                            models_dir=args.models_dir, ray=args.ray, ray_actors=args.ray_actors,
                            model_cache_bytes=budget)
    except (WorkflowError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    failed = [r for r in results if r["status"] != "success"]
    print(f"twinflow batch: {len(results) - len(failed)}/{len(results)} jobs succeeded", file=sys.stderr)
    return 1 if failed else EXIT_OK


def cmd_serve(args) -> int:
    if not _need("aiohttp", "serve", "twinflow serve"):
        return EXIT_USAGE
    if args.ray is not None and not _need("ray", "ray", "twinflow serve --ray"):
        return EXIT_USAGE
    from .app import ServeConfig, TwinFlowServer, check_listen

    if args.max_queue < 1 or args.max_upload_mb <= 0 or args.prompt_timeout < 0:
        print("error: --max-queue must be >= 1, --max-upload-mb > 0 and --prompt-timeout >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_listen(args.host, args.auth_token)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    kernels = args.kernels or getattr(args, "kernels_global", None)
    if kernels:
        from ..cli import _set_kernels

        _set_kernels(kernels)
    config = ServeConfig(host=args.host, port=args.port, output_dir=args.output_dir, input_dir=args.input_dir,
                         temp_dir=args.temp_dir, models_dir=args.models_dir, auth_token=args.auth_token,
                         max_queue=args.max_queue, max_history=args.max_history,
                         max_upload_bytes=int(args.max_upload_mb * 2**20), prompt_timeout=args.prompt_timeout,
                         model_cache_bytes=int(args.model_cache_mb * 2**20) if args.model_cache_mb else None,
                         warmup=args.warmup, ray=args.ray, ray_actors=args.ray_actors,
                         previews=args.previews)
    try:
        server = TwinFlowServer(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    asyncio.run(_serve(server))
    return EXIT_OK


async def _serve(server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C raises KeyboardInterrupt instead
            pass
    await server.start()
    print(f"twinflow serve: listening on http://{server.config.host}:{server.port} "
          f"(output {server.dirs['output']}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        print("twinflow serve: stopping (the running prompt is interrupted)", file=sys.stderr, flush=True)
        await server.stop()
