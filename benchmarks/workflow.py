"""ComfyUI's own `text_to_video_wan` template, side by side: a real ComfyUI (headless, its own executor) and
`twinflow run`, on the same model files, alternating in fresh processes (ComfyUI, TwinFlow, ComfyUI, ...).

    python -m twinflow.benchmarks.workflow --smoke --repeats 1                  # tiny random models, minutes
    python -m twinflow.benchmarks.workflow --files-dir DIR --repeats 3 --out wf.md   # the CPU case (below)
    python -m twinflow.benchmarks.workflow --files-dir DIR --device cuda --out wf_gpu.md   # GPU (not run yet)

ComfyUI is found through `--comfyui` or $COMFYUI_PATH, its interpreter through `--comfyui-python`,
$COMFYUI_PYTHON or a `venv` next to / inside the checkout. The checkout is never modified (the smoke mode runs
a copy, see below).

The graph: the template converted to ComfyUI's API prompt (`twinflow convert`'s converter), widgets changed
only for size, length, steps and seed (`--set`-style overrides: 160x96, 9 frames, 4 steps on the CPU), plus two
observers on each side so the outputs can be compared: a latent saver on the KSampler output (ComfyUI's
SaveLatent / TwinFlow Save Latent: the same `.latent` layout) and a core SaveImage on the VAEDecode output
(8-bit PNGs). Both sides run the identical prompt apart from which latent saver it names.

Model files (ComfyUI's folder layout, the template's file names), generated once into `--files-dir` and reused:
  * CPU case: Wan2.1 1.3B DiT at its real config (random weights, fp16 as the template's file), the real-config
    umT5-XXL as ComfyUI ships it (fp8 e4m3fn "scaled" Linears, bf16 embedding and norms, a small sentencepiece
    tokenizer in `spiece_model`: ~6.7 GB) and the Wan2.1 VAE at its real config (fp32). Files are written tensor
    by tensor (the safetensors header first, then each tensor's bytes; at most one model in memory).
  * `--smoke`: a tiny DiT (text width 4096, fixed in ComfyUI's Wan model), the real-width VAE (ComfyUI builds it
    at 96 whatever the file holds) and the small-config umT5 of the ComfyUI oracle test (24 blocks, d_model
    4096, d_kv 1, d_ff 8, vocab 256); ComfyUI builds umT5 from its XXL JSON, so the smoke mode runs a COPY of
    the checkout whose `umt5_config_xxl.json` carries those sizes.

Precision (`--dtype`; both sides must compute in the same dtype, and the table shows what each side reported):
  * ComfyUI is told with its process flags: fp32 = `--fp32-unet --fp32-vae`, bf16 = `--bf16-unet --bf16-vae`;
    the text encoder runs in fp32 in both cases (`--fp32-text-enc`; on the CPU ComfyUI would otherwise pick
    fp16) because TwinFlow's umT5 always computes in fp32. Its log says the dtypes it used ("model weight
    dtype ..., manual cast ...", "CLIP/text encoder ... dtype", "VAE ... dtype"); the table quotes them.
    On the CPU, `--bf16-unet` alone stores the DiT in bf16 but computes it in fp32 (ComfyUI's
    `unet_manual_cast`: no bf16 compute on a CPU device), so the bf16 CPU case also gets ComfyUI's own
    ModelComputeDtype node (dtype bf16) between UNETLoader and ModelSamplingSD3 on the ComfyUI side: the one
    graph change that is not a widget, and the table says so.
  * TwinFlow is told with `twinflow run --dtype fp32|bf16` (the core UNETLoader/VAELoader models load in it;
    its umT5 always computes in fp32); its log line for each loader is quoted. The files are the same for all
    cases (the DiT in fp16, as the template's file; each side converts it at load).

Measured per process: wall time from spawn to the outputs being complete (TwinFlow: process exit; ComfyUI: its
/history reporting the prompt done, then the server is stopped), the time each side reports for the work
(ComfyUI's "Prompt executed in"; the sum of TwinFlow's per-node timings from `run --json`), per-node times
grouped into load / text / sample / decode / save phases (TwinFlow's own; ComfyUI's from a small custom node
the benchmark puts in the run's base directory, which wraps the executor's per-node `get_output_data` call
with a clock: the checkout is not changed, the executor is ComfyUI's), and peak RSS of the process (`os.wait4`'s ru_maxrss: the kernel's high-water
mark of that child, children included). Output difference: latents (max |a-b| / max |a|), PNG frames and the
decoded MP4 frames (max |a-b| in 1/255), from each pair of runs; the table gives the largest over the pairs.
Both sides use all cores (torch's defaults); CUDA_VISIBLE_DEVICES is emptied for `--device cpu`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from twinflow.benchmarks import cpu_name

TEMPLATE = "text_to_video_wan.json"
FILES = {"unet": ("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"),
         "clip": ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
         "vae": ("vae", "wan_2.1_vae.safetensors")}
# node ids of text_to_video_wan.json (comfyui-workflow-templates 0.1.95)
LATENT_NODE, SAMPLER_NODE, DECODE_NODE = "40", "3", "8"
PHASES = {"load": ("UNETLoader", "CLIPLoader", "VAELoader"), "text": ("CLIPTextEncode",),
          "sample": ("ModelSamplingSD3", "ModelComputeDtype", "KSampler", "EmptyHunyuanLatentVideo"),
          "decode": ("VAEDecode",), "save": ("CreateVideo", "SaveVideo", "SaveImage", "SaveLatent",
                                            "TwinFlowSaveLatent")}
SMALL_UMT5 = {"d_ff": 8, "d_kv": 1, "num_heads": 64, "vocab_size": 256, "d_model": 4096, "num_layers": 24}
PROMPTS = ("a fox moving quickly in a beautiful winter scenery nature trees mountains daytime tracking camera",
           "the quick brown fox jumps over the lazy dog, blurry, static, worst quality")
COPY_IGNORE = ("venv", ".venv", ".git", "models", "output", "input", "temp", "user", "custom_nodes")
START_TIMEOUT_S, RUN_TIMEOUT_S = 600, 7200


# ------------------------------------------------------------------------------------------ numbers


@dataclass
class Sample:
    """One fresh process of one side."""
    wall_s: float
    work_s: float  # ComfyUI: "Prompt executed in"; TwinFlow: the sum of its node timings
    peak_rss_bytes: int
    phases: dict = field(default_factory=dict)  # TwinFlow only: phase -> seconds
    dtypes: str = ""


@dataclass
class Case:
    name: str
    comfyui: list  # [Sample]
    twinflow: list  # [Sample]
    latent_rel: float = math.nan
    frames_255: float = math.nan
    video_255: float = math.nan


def median(xs) -> float:
    return statistics.median(xs) if xs else math.nan


def speed_ratio(case: Case) -> float:
    """ComfyUI's median wall time over TwinFlow's: above 1 means TwinFlow is faster."""
    return median([s.wall_s for s in case.comfyui]) / median([s.wall_s for s in case.twinflow])


def _secs(xs) -> str:
    return f"{median(xs):.2f} ({', '.join(f'{x:.2f}' for x in xs)})"


def _gib(n) -> str:
    return f"{n / 2 ** 30:.2f}"


def format_table(cases: list, header: dict) -> str:
    """The markdown report: what ran where, one row per case, then the phases."""
    lines = [f"### `{TEMPLATE}`: ComfyUI vs `twinflow run`", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| case | ComfyUI wall s: median (all) | TwinFlow wall s: median (all) | speed ratio | "
              "ComfyUI peak RSS GiB | TwinFlow peak RSS GiB | latent diff (rel) | frames diff /255 | "
              "video diff /255 |", "|" + "---|" * 9]
    for c in cases:
        rss_c = max(s.peak_rss_bytes for s in c.comfyui)
        rss_t = max(s.peak_rss_bytes for s in c.twinflow)
        lines.append(f"| {c.name} | {_secs([s.wall_s for s in c.comfyui])} | {_secs([s.wall_s for s in c.twinflow])} "
                     f"| {speed_ratio(c):.2f}x | {_gib(rss_c)} | {_gib(rss_t)} | {c.latent_rel:.2e} | "
                     f"{c.frames_255:.0f} | {c.video_255:.0f} |")
    lines += ["", "Phases (median s). work = ComfyUI's \"Prompt executed in\" / the sum of TwinFlow's node timings; "
              "start-up + exit = wall - work. Per node on both sides (ComfyUI: its executor's per-node calls, timed "
              "by a small custom node of the benchmark): load = the three loaders, text = CLIPTextEncode x2, "
              "sample = KSampler (+ latent, shift), decode = VAEDecode, save = CreateVideo + SaveVideo + the "
              "observers. ComfyUI moves models to their compute device and dtype lazily, inside KSampler / "
              "VAEDecode / CLIPTextEncode, so part of its loading shows under those.", "",
              "| case | side | start-up + exit | work | load | text | sample | decode | save | dtypes reported |",
              "|" + "---|" * 10]
    for c in cases:
        for side, samples in (("ComfyUI", c.comfyui), ("TwinFlow", c.twinflow)):
            work = median([s.work_s for s in samples])
            rest = median([s.wall_s - s.work_s for s in samples])
            ph = [median([s.phases.get(p, math.nan) for s in samples]) for p in PHASES]
            cells = " | ".join("-" if math.isnan(x) else f"{x:.2f}" for x in ph)
            lines.append(f"| {c.name} | {side} | {rest:.2f} | {work:.2f} | {cells} | {samples[0].dtypes} |")
    return "\n".join(lines) + "\n"


def group_phases(timings: list) -> dict:
    """TwinFlow's `run --json` timings -> seconds per phase (PHASES)."""
    out = {p: 0.0 for p in PHASES}
    for t in timings:
        for p, classes in PHASES.items():
            if t["class_type"] in classes:
                out[p] += t["seconds"]
    return out


# ------------------------------------------------------------------------------------------ files


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "uint8": "U8"}


def stream_safetensors(path: Path, specs: list) -> None:
    """Write a safetensors file tensor by tensor: `specs` = [(name, dtype, shape, make)], `make()` returning the
    tensor (or an iterable of row chunks of it). The header is written first (offsets follow from the shapes),
    so only the tensor being made is in memory. Written to a temporary name, renamed when complete."""
    import torch

    header, offset = {}, 0
    for name, dtype, shape, _ in specs:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[str(dtype).replace("torch.", "")], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, make in specs:
            made = make()
            written = 0
            for chunk in ([made] if isinstance(made, torch.Tensor) else made):
                assert chunk.dtype == dtype, (name, chunk.dtype, dtype)
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                f.write(data)
                written += len(data)
            begin, end = header[name]["data_offsets"]
            assert written == end - begin, (name, written, end - begin)
    os.replace(tmp, path)


def _spiece_proto(vocab: int = 96) -> bytes:
    """A small sentencepiece model with umT5's special ids (pad 0, eos 1, unk 2)."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(PROMPTS), model_writer=out, vocab_size=vocab,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    return out.getvalue()


FP8_LINEARS = ("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")


def write_umt5(path: Path, cfg, seed: int = 1, chunk_rows: int = 16384) -> None:
    """umT5 as ComfyUI ships `umt5_xxl_fp8_e4m3fn_scaled`: Linears float8_e4m3fn with a scalar `scale_weight`,
    the rest bf16, a `scaled_fp8` marker and the tokenizer in `spiece_model`; random weights (std 0.05, norms
    near 1, the embedding N(0, 1)), made one tensor (the embedding: row chunks) at a time."""
    import torch

    from twinflow.models import umt5

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in umt5.UMT5Encoder(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    specs, pending = [], {}

    def linear(k, shape):
        def make():
            w = 0.05 * torch.randn(shape, generator=gen)
            scale = (w.abs().amax() / 448.0).clamp(min=1e-12)
            pending[k] = scale
            return (w / scale).to(torch.float8_e4m3fn)
        return make

    for k, shape in shapes.items():
        if k.endswith(FP8_LINEARS) and len(shape) == 2:
            specs.append((k, torch.float8_e4m3fn, shape, linear(k, shape)))
            scale_key = k[: -len("weight")] + "scale_weight"
            specs.append((scale_key, torch.float32, (), lambda k=k: pending.pop(k).reshape(())))
        elif k == "shared.weight":
            def rows(shape=shape):
                for r in range(0, shape[0], chunk_rows):
                    yield torch.randn((min(chunk_rows, shape[0] - r), shape[1]), generator=gen).to(torch.bfloat16)
            specs.append((k, torch.bfloat16, shape, rows))
        elif k.endswith("layer_norm.weight"):
            specs.append((k, torch.bfloat16, shape,
                          lambda shape=shape: (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)))
        else:
            specs.append((k, torch.bfloat16, shape,
                          lambda shape=shape: (0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)))
    proto = torch.frombuffer(bytearray(_spiece_proto()), dtype=torch.uint8)
    specs.append(("scaled_fp8", torch.float8_e4m3fn, (0,), lambda: torch.empty(0, dtype=torch.float8_e4m3fn)))
    specs.append(("spiece_model", torch.uint8, tuple(proto.shape), lambda: proto))
    stream_safetensors(path, specs)


def _write_module(path: Path, module) -> None:
    sd = module.state_dict()
    stream_safetensors(path, [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()])


def ensure_files(root: Path, smoke: bool) -> Path:
    """The three files under `root/models` (reused when `root/complete.json` says they match); returns models/."""
    import torch

    from twinflow.models import umt5, wan_dit, wan_vae

    spec = {"smoke": smoke, "version": 1}
    models = root / "models"
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return models
    for folder, _name in FILES.values():
        (models / folder).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ucfg = umt5.UMT5Config(**SMALL_UMT5) if smoke else umt5.PRESETS["xxl"]
    print(f"writing {models / FILES['clip'][0] / FILES['clip'][1]} ...", file=sys.stderr)
    write_umt5(models / FILES["clip"][0] / FILES["clip"][1], ucfg)
    dcfg = wan_dit.get_config("tiny" if smoke else "wan2.1-1.3b")
    dcfg = wan_dit.with_config(dcfg, text_dim=ucfg.d_model)
    print(f"writing the DiT ({'tiny' if smoke else 'wan2.1-1.3b'}, float16) ...", file=sys.stderr)
    dit = wan_dit.random_wan_dit(config=dcfg, seed=2, dtype=torch.float16)
    _write_module(models / FILES["unet"][0] / FILES["unet"][1], dit)
    del dit
    _write_module(models / FILES["vae"][0] / FILES["vae"][1], wan_vae.random_wan_vae("wan2.1", seed=3))
    marker.write_text(json.dumps(spec))
    print(f"model files ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return models


# ------------------------------------------------------------------------------------------ the two sides


def comfy_python(root: Path) -> str:
    for cand in (root / "venv", root.parent / "venv", root / ".venv"):
        py = cand / "bin" / "python"
        if py.is_file():
            return str(py)
    return sys.executable


def comfy_version(root: Path) -> str:
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (root / "comfyui_version.py").read_text()) \
        if (root / "comfyui_version.py").is_file() else None
    return m.group(1) if m else "?"


def comfy_copy(src: Path, dest: Path) -> Path:
    """A copy of the ComfyUI checkout whose umT5 JSON has the smoke file's small sizes (the original untouched)."""
    top = os.path.realpath(src)

    def ignore(folder, names):
        return [n for n in names if n == "__pycache__" or (os.path.realpath(folder) == top and n in COPY_IGNORE)]

    shutil.copytree(src, dest, ignore=ignore, symlinks=True)
    cfg_path = dest / "comfy" / "text_encoders" / "umt5_config_xxl.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({**SMALL_UMT5, "num_decoder_layers": SMALL_UMT5["num_layers"]})
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


def build_prompt(overrides: list) -> dict:
    """The template as an API prompt (TwinFlow's converter), widgets overridden, plus the PNG observer."""
    import importlib.resources

    from twinflow.runner.api import Runner, apply_overrides

    runner = Runner()
    path = importlib.resources.files("comfyui_workflow_templates") / "templates" / TEMPLATE
    prompt = apply_overrides(runner.load(str(path)).prompt, overrides, runner.registry)
    prompt["bench_frames"] = {"class_type": "SaveImage",
                              "inputs": {"images": [DECODE_NODE, 0], "filename_prefix": "bench/frames"}}
    return prompt


def with_compute_dtype(prompt: dict, dtype: str) -> dict:
    """ComfyUI's ModelComputeDtype after the UNETLoader, every consumer of the loader rewired to it."""
    unet = next(k for k, v in prompt.items() if v["class_type"] == "UNETLoader")
    out = {}
    for k, v in prompt.items():
        inputs = {n: (["bench_dtype", 0] if x == [unet, 0] else x) for n, x in v["inputs"].items()}
        out[k] = {**v, "inputs": inputs}
    out["bench_dtype"] = {"class_type": "ModelComputeDtype", "inputs": {"model": [unet, 0], "dtype": dtype}}
    return out


def _latent_observer(prompt: dict, class_type: str) -> dict:
    return {**prompt, "bench_latent": {"class_type": class_type, "inputs": {"samples": [SAMPLER_NODE, 0],
                                                                           "filename_prefix": "bench/latent"}}}


def _reap(proc, block: bool = True):
    """Reap the child with `os.wait4` (not `poll`, which would lose its resource usage); returns its exit code
    or None while it runs, and sets `proc.peak_rss` (bytes; ru_maxrss is KiB on Linux)."""
    if proc.returncode is not None:
        return proc.returncode
    pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.peak_rss = usage.ru_maxrss * 1024
    return proc.returncode


def _http(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_dtypes(log: str, compute_node: str = "") -> str:
    """What ComfyUI's log says it computed in: DiT weight/manual-cast dtype, text encoder and VAE dtypes (the
    load line comes before a ModelComputeDtype node acts: `compute_node` names its dtype)."""
    unet = re.search(r"model weight dtype torch\.(\w+), manual cast: (?:torch\.)?(\w+)", log)
    clip = re.search(r"CLIP/text encoder model load device: .*dtype: torch\.(\w+)", log)
    vae = re.search(r"VAE load device: .*dtype: torch\.(\w+)", log)
    unet_s = "?" if not unet else unet.group(1) if unet.group(2) == "None" else f"{unet.group(2)} (cast)"
    if compute_node:
        unet_s = f"{compute_node} (ModelComputeDtype; weights {unet.group(1) if unet else '?'})"
    return f"DiT {unet_s}, text {clip.group(1) if clip else '?'}, VAE {vae.group(1) if vae else '?'}"


def _executed_s(log: str) -> float:
    m = re.search(r"Prompt executed in (\d+(?:\.\d+)?) seconds", log)
    if m:
        return float(m.group(1))
    m = re.search(r"Prompt executed in (\d+):(\d+):(\d+)", log)
    if m:
        return 3600 * int(m.group(1)) + 60 * int(m.group(2)) + int(m.group(3))
    return math.nan


# A custom node package for the ComfyUI side's base directory: times each node's `get_output_data` call (ComfyUI's
# executor runs every node through it, looking the name up at call time) and appends one JSON line per node.
NODE_TIMER = '''"""TwinFlow's workflow benchmark: per-node wall times of ComfyUI's own executor (one JSON line each)."""
import json
import os
import time

import execution
import folder_paths

_get_output_data = execution.get_output_data
_LOG = os.path.join(folder_paths.base_path, "bench_node_timings.jsonl")


async def _timed(prompt_id, unique_id, obj, *args, **kwargs):
    start = time.perf_counter()
    try:
        return await _get_output_data(prompt_id, unique_id, obj, *args, **kwargs)
    finally:
        with open(_LOG, "a") as f:
            f.write(json.dumps({"node_id": unique_id, "seconds": time.perf_counter() - start}) + "\\n")


execution.get_output_data = _timed
NODE_CLASS_MAPPINGS = {}
'''


def run_comfyui(root: Path, python: str, base: Path, models: Path, prompt: dict, flags: list, env: dict,
                compute_node: str = ""):
    """One fresh ComfyUI process: start, run the prompt through its own executor, stop. -> (Sample, outputs)."""
    (base / "custom_nodes" / "twinflow_bench_timer").mkdir(parents=True)
    (base / "custom_nodes" / "twinflow_bench_timer" / "__init__.py").write_text(NODE_TIMER)
    os.symlink(models, base / "models")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--disable-api-nodes", "--disable-auto-launch", *flags]
    log_path = base / "comfyui.log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if _reap(proc, block=False) is not None:
                    raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                if time.perf_counter() - t0 > START_TIMEOUT_S:
                    raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT_S} s")
                try:
                    _http(url + "/system_stats")
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.1)
            try:
                pid = _http(url + "/prompt", {"prompt": prompt, "client_id": "twinflow-bench"})["prompt_id"]
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"ComfyUI refused the prompt ({e.code}): {e.read()[:3000]!r}") from None
            while True:
                hist = _http(f"{url}/history/{pid}")
                status = hist.get(pid, {}).get("status", {})
                if status.get("completed") is not None:
                    break
                if _reap(proc, block=False) is not None or time.perf_counter() - t0 > RUN_TIMEOUT_S:
                    raise RuntimeError(f"ComfyUI stopped or timed out:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            if status.get("status_str") != "success":
                raise RuntimeError(f"ComfyUI failed the prompt: {json.dumps(status)[:3000]}\n"
                                   f"{log_path.read_text()[-4000:]}")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)  # the prompt is done (or failed): stop the server
                deadline = time.perf_counter() + 60
                while _reap(proc, block=False) is None and time.perf_counter() < deadline:
                    time.sleep(0.1)
                if proc.returncode is None:
                    proc.kill()
            _reap(proc)
    rss = proc.peak_rss
    text = log_path.read_text(errors="replace")
    files = _outputs(base / "output", hist[pid]["outputs"])
    timings_path = base / "bench_node_timings.jsonl"
    timings = [json.loads(line) for line in timings_path.read_text().splitlines()] if timings_path.is_file() else []
    timings = [{**t, "class_type": prompt.get(t["node_id"], {}).get("class_type", "?")} for t in timings]
    phases = group_phases(timings) if timings else {}
    return Sample(wall, _executed_s(text), rss, phases, comfy_dtypes(text, compute_node)), files


def _outputs(out_dir: Path, outputs: dict) -> dict:
    """Paths of the video, PNG frames and latent from a history-style outputs dict."""
    found = {"video": None, "frames": [], "latent": None}
    for node, ui in outputs.items():
        for key, entries in ui.items():
            for e in entries if isinstance(entries, list) else []:
                if not isinstance(e, dict) or "filename" not in e:
                    continue
                p = out_dir / e.get("subfolder", "") / e["filename"]
                if node == "bench_latent":
                    found["latent"] = p
                elif node == "bench_frames":
                    found["frames"].append(p)
                elif p.suffix in (".mp4", ".webm", ".mov"):
                    found["video"] = p
    return found


def twinflow_dtypes(log: str) -> str:
    """What TwinFlow's log says: the dtype each core loader was told (`--dtype`), umT5's weight dtypes (its
    activations are float32)."""
    unet = re.search(r"UNETLoader .*: computing in (\w+)", log)
    vae = re.search(r"VAELoader .*: computing in (\w+)", log)
    text = re.search(r"umT5 loaded from .*dtypes (\[[^\]]*\])", log)
    return (f"DiT {unet.group(1) if unet else '?'}, text float32 (weights {text.group(1) if text else '?'}), "
            f"VAE {vae.group(1) if vae else '?'}")


def run_twinflow(api_json: Path, models: Path, out: Path, env: dict, dtype: str):
    """One fresh `twinflow run` process. -> (Sample, outputs)."""
    cmd = [sys.executable, "-m", "twinflow.runner", "-v", "run", str(api_json), "--models-dir", str(models),
           "--output-dir", str(out), "--json", "--no-progress", "--dtype", dtype]
    out.mkdir(parents=True)
    with open(out / "stdout.json", "w") as so, open(out / "stderr.log", "w") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env)
        _reap(proc)
        wall, rss = time.perf_counter() - t0, proc.peak_rss
    stdout, stderr = (out / "stdout.json").read_text(), (out / "stderr.log").read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"twinflow run exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    res = json.loads(stdout)
    work = sum(t["seconds"] for t in res["timings"])
    return Sample(wall, work, rss, group_phases(res["timings"]), twinflow_dtypes(stderr)), \
        _outputs(out, res["outputs"])


# ------------------------------------------------------------------------------------------ comparison


def _video_frames(path):
    import av
    import numpy as np

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def compare(a: dict, b: dict) -> tuple:
    """(latent max|a-b|/max|a|, PNG frames max diff in 1/255, decoded-video max diff in 1/255); NaN if absent."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    lat = img = vid = math.nan
    if a["latent"] and b["latent"]:
        la, lb = (load_file(str(p))["latent_tensor"].float() for p in (a["latent"], b["latent"]))
        lat = ((la - lb).abs().max() / la.abs().max()).item() if la.shape == lb.shape else math.inf
    if a["frames"] and b["frames"]:
        fa, fb = (np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(x["frames"])]) for x in (a, b))
        img = float(np.abs(fa.astype(int) - fb.astype(int)).max()) if fa.shape == fb.shape else math.inf
    if a["video"] and b["video"]:
        va, vb = _video_frames(a["video"]), _video_frames(b["video"])
        vid = float(np.abs(va.astype(int) - vb.astype(int)).max()) if va.shape == vb.shape else math.inf
    return lat, img, vid


# ------------------------------------------------------------------------------------------ main


def _comfy_flags(dtype: str, device: str) -> list:
    flags = ["--cpu"] if device == "cpu" else []
    return flags + {"fp32": ["--fp32-unet", "--fp32-vae"], "bf16": ["--bf16-unet", "--bf16-vae"]}[dtype] + \
        ["--fp32-text-enc"]


def run_case(name, dtype, args, comfy_root, comfy_py, models, overrides, work: Path) -> Case:
    prompt = build_prompt(overrides)
    env = {k: v for k, v in os.environ.items() if k not in ("TWINFLOW_MODELS_DIR", "TWINFLOW_OUTPUT_DIR")}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    tf_env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(_twinflow_file()).parent.parent),
                                                    env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    api = work / f"{name}.api.json"
    api.write_text(json.dumps(_latent_observer(prompt, "TwinFlowSaveLatent"), indent=1))
    comfy_prompt = _latent_observer(prompt, "SaveLatent")
    compute_node = "bf16" if dtype == "bf16" and args.device == "cpu" else ""
    if compute_node:
        comfy_prompt = with_compute_dtype(comfy_prompt, compute_node)
    case = Case(name, [], [])
    diffs = []
    for i in range(args.repeats):
        c, c_files = run_comfyui(comfy_root, comfy_py, work / f"{name}-comfyui-{i}", models, comfy_prompt,
                                 _comfy_flags(dtype, args.device), env, compute_node)
        case.comfyui.append(c)
        print(f"{name} #{i} ComfyUI: {c.wall_s:.2f} s (prompt {c.work_s:.2f} s), {_gib(c.peak_rss_bytes)} GiB",
              file=sys.stderr)
        t, t_files = run_twinflow(api, models, work / f"{name}-twinflow-{i}", tf_env, dtype)
        case.twinflow.append(t)
        print(f"{name} #{i} TwinFlow: {t.wall_s:.2f} s (nodes {t.work_s:.2f} s), {_gib(t.peak_rss_bytes)} GiB",
              file=sys.stderr)
        diffs.append(compare(c_files, t_files))
        if not args.keep:
            for side in ("comfyui", "twinflow"):
                shutil.rmtree(work / f"{name}-{side}-{i}", ignore_errors=True)
    case.latent_rel, case.frames_255, case.video_255 = (max(d[k] for d in diffs) for k in range(3))
    return case


def _twinflow_file() -> str:
    import twinflow

    return twinflow.__file__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random models (minutes): checks the harness")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process pairs per case (default 3)")
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="cases (default: fp32 bf16; smoke: fp32); see the precision notes above")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (default cpu)")
    p.add_argument("--files-dir", help="cache of the generated model files (created; reused when complete). "
                                       "The CPU case needs ~10 GB free here; default: a temporary folder")
    p.add_argument("--work-dir", help="where the runs write (default: a temporary folder, removed)")
    p.add_argument("--size", nargs=3, type=int, metavar=("WIDTH", "HEIGHT", "FRAMES"), default=None,
                   help="default 160 96 9 (smoke: 32 32 5)")
    p.add_argument("--steps", type=int, default=None, help="default 4 (smoke: 2)")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    p.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON"),
                   help="ComfyUI's interpreter (default: a venv next to or inside the checkout)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only generate the model files into --files-dir (e.g. before a quiet window), then exit")
    p.add_argument("--keep", action="store_true", help="keep each run's output folder")
    p.add_argument("--out", help="also write the markdown table here (never overwrites an existing file)")
    args = p.parse_args(argv)

    if args.prepare_only and not args.files_dir:
        p.error("--prepare-only needs --files-dir (where the files are kept for the runs)")
    if not args.prepare_only and (not args.comfyui or not (Path(args.comfyui) / "main.py").is_file()):
        p.error(f"--comfyui / $COMFYUI_PATH must name a ComfyUI checkout (a folder with main.py); got {args.comfyui!r}")
    if args.out and Path(args.out).exists():
        p.error(f"--out {args.out} exists; choose another name (the table never overwrites a file)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    dtypes = args.dtype or (["fp32"] if args.smoke else ["fp32", "bf16"])
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to this interpreter")
    width, height, frames = args.size or ((32, 32, 5) if args.smoke else (160, 96, 9))
    steps = args.steps or (2 if args.smoke else 4)
    overrides = [f"{LATENT_NODE}.width={width}", f"{LATENT_NODE}.height={height}", f"{LATENT_NODE}.length={frames}",
                 f"{SAMPLER_NODE}.steps={steps}", f"{SAMPLER_NODE}.seed=123"]

    tmp = Path(tempfile.mkdtemp(prefix="twinflow-wfbench-"))
    try:
        work = Path(args.work_dir) if args.work_dir else tmp / "work"
        files_root = Path(args.files_dir) if args.files_dir else tmp / "files"
        kind = "smoke" if args.smoke else "wan2.1-1.3b"
        models = ensure_files(files_root / kind, args.smoke)
        if args.prepare_only:
            print(f"model files ready under {models}", file=sys.stderr)
            return 0
        comfy_root = Path(args.comfyui).resolve()
        comfy_py = args.comfyui_python or comfy_python(comfy_root)
        if args.smoke:
            comfy_root = comfy_copy(comfy_root, tmp / "ComfyUI")
        versions = subprocess.run([comfy_py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                  text=True, timeout=300).stdout.strip() or "?"
        cases = []
        work.mkdir(parents=True, exist_ok=True)
        for f in sorted(models.rglob("*.safetensors")):  # into the page cache once, for the first pair alike
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        for dtype in dtypes:
            name = f"{kind} {dtype} {args.device} {width}x{height}x{frames} {steps} steps"
            cases.append(run_case(name.replace(" ", "_"), dtype, args, comfy_root, comfy_py, models, overrides, work))
        header = {"machine": cpu_name(),
                  "torch": f"TwinFlow {torch.__version__}, ComfyUI {versions}",
                  "ComfyUI": f"{comfy_version(Path(args.comfyui))} "
                             f"({'a copy with the small umT5 config' if args.smoke else 'the checkout as is'})",
                  "models": "tiny random DiT / small-config umT5 / real-config VAE (smoke)" if args.smoke else
                            "Wan2.1 1.3B DiT, umT5-XXL fp8_scaled, Wan2.1 VAE: real configs, random weights",
                  "graph": f"{TEMPLATE}, {width}x{height}, {frames} frames, {steps} steps uni_pc, cfg 6, "
                           f"fresh process per run, sides alternating, {args.repeats} pair(s)"}
        table = format_table(cases, header)
        sys.stdout.write(table)
        if args.out:
            from twinflow.core.outputs import atomic_output

            with atomic_output(Path(args.out)) as t:
                t.write_text(table, encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
