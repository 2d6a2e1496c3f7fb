"""Checks before compute: everything about a validated prompt that can fail later is checked before its
first node runs (`twinflow validate` runs the same checks).

- output prefixes (`..`, absolute, control characters, over-long names) of every node with a constant
  `filename_prefix`, and the output folder (a writable folder, or creatable) when such a node will run;
- model files picked by the loaders: the file's header is readable (a safetensors header that parses, a
  PyTorch zip/pickle signature), so a truncated download fails now, not after an hour of sampling;
- a memory plan (`memory_plan`): a lower bound of the run's peak from the workflow's shapes (latents,
  the denoiser's activations, the VAE decode at its smallest tile, the weights) against the memory
  available on the compute device; a run that cannot fit is refused with the figure it needs and the
  nearest setting that fits.

Errors are `WorkflowError`s with ComfyUI's `node_errors` JSON, like validation's.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..core import paths
from ..core.errors import CheckpointError, WorkflowError
from ..core.outputs import check_output_dir, check_prefix
from .spec import iter_inputs
from .validate import ValidatedPrompt, is_link

logger = logging.getLogger(__name__)

GIB = 2 ** 30

# Model-file widgets of the loaders: class_type -> {input: models folder kind}. Keyed by class names, like
# the compile plan's shape rules, so the node classes stay thin.
MODEL_INPUTS: dict[str, dict[str, str]] = {
    "TwinFlowLoadDiT": {"ckpt_name": "diffusion_models"},
    "TwinFlowLoadVAE": {"vae_name": "vae"},
    "TwinFlowLoadRefiner": {"refiner_name": "twinflow"},
    "TwinFlowLoadGateNet": {"gate_net_name": "twinflow"},
    "TwinFlowLoadTextEmbeddings": {"embeddings_name": "text_embeddings"},
    # ComfyUI core loaders, when the runner executes them
    "UNETLoader": {"unet_name": "diffusion_models"},
    "VAELoader": {"vae_name": "vae"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
}
_SAFETENSORS = (".safetensors", ".sft")
_PICKLES = (".pt", ".pth", ".ckpt", ".bin")
_MAX_HEADER = 100 * 2 ** 20  # safetensors caps its JSON header at 100 MB


def _node_error(nid: str, ctype: str, type_: str, message: str, input_name=None) -> dict:
    info = {"input_name": input_name} if input_name else {}
    return {"errors": [{"type": type_, "message": message, "details": input_name or "", "extra_info": info}],
            "dependent_outputs": [], "class_type": ctype}


def _raise(node_errors: dict, summary: str, type_: str) -> None:
    nid, entry = next(iter(node_errors.items()))
    err = entry["errors"][0]
    where = f"node #{nid} ({entry['class_type']})" + (f", input '{err['details']}'" if err["details"] else "")
    more = f" ({len(node_errors) - 1} more in node_errors)" if len(node_errors) > 1 else ""
    raise WorkflowError(f"{summary}: {where}: {err['message']}{more}", type=type_, node_errors=node_errors)


# ----------------------------------------------------------------------------------------------
# outputs and files
# ----------------------------------------------------------------------------------------------

def check_outputs(validated: ValidatedPrompt, registry) -> None:
    """Every constant `filename_prefix` is acceptable and the output folder is usable (when written)."""
    errors, writes = {}, False
    for nid in validated.order:
        node = validated.prompt[nid]
        ctype = node["class_type"]
        for spec in iter_inputs(registry[ctype], ctype):
            if spec.name != "filename_prefix":
                continue
            writes = True
            value = (node.get("inputs") or {}).get(spec.name)
            if value is None or is_link(value):
                continue  # linked: known only when the run gets there (checked again then)
            try:
                check_prefix(value)
            except (TypeError, ValueError) as e:
                errors[nid] = _node_error(nid, ctype, "bad_filename_prefix", str(e), spec.name)
    if errors:
        _raise(errors, "Output check failed", "bad_filename_prefix")
    if writes:
        try:
            check_output_dir(paths.output_dir())
        except ValueError as e:
            raise WorkflowError(str(e), type="bad_output_dir") from None


def check_model_header(path: Path) -> Optional[str]:
    """Why the model file at `path` cannot be read (None when its header looks right). Reads the header
    only: a few bytes for PyTorch files, the JSON header for safetensors."""
    name = path.name.lower()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if name.endswith(_SAFETENSORS):
                head = f.read(8)
                if len(head) < 8:
                    return f"{path}: {size} bytes, too short for a safetensors file (truncated?)"
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    return (f"{path}: not a readable safetensors file (header of {n} bytes in a file of {size}); "
                            f"the file is truncated or corrupt: download or copy it again")
                try:
                    header = json.loads(f.read(n))
                except ValueError as e:
                    return f"{path}: safetensors header is not valid JSON ({e}); download or copy the file again"
                if not isinstance(header, dict):
                    return f"{path}: safetensors header is not a JSON object; download or copy the file again"
                end = max((int(v["data_offsets"][1]) for k, v in header.items()
                           if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
                if 8 + n + end > size:
                    return (f"{path}: truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                            f"download or copy it again")
            elif name.endswith(_PICKLES):
                head = f.read(4)
                if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
                    return (f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                            f"download or copy it again")
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    return None


def check_model_files(validated: ValidatedPrompt) -> None:
    errors = {}
    for nid in validated.order:
        node = validated.prompt[nid]
        ctype = node["class_type"]
        for input_name, kind in MODEL_INPUTS.get(ctype, {}).items():
            value = (node.get("inputs") or {}).get(input_name)
            if not isinstance(value, str) or value.startswith("random:"):
                continue
            try:
                path = paths.find_model(kind, value)
            except (FileNotFoundError, ValueError) as e:
                errors[nid] = _node_error(nid, ctype, "model_file_missing", str(e), input_name)
                continue
            why = check_model_header(path)
            if why:
                errors[nid] = _node_error(nid, ctype, "model_file_unreadable", why, input_name)
    if errors:
        _raise(errors, "Model file check failed", "model_file_unreadable")


# ----------------------------------------------------------------------------------------------
# memory plan
# ----------------------------------------------------------------------------------------------

def _shape_plan():
    # The compile plan's shape inference (latent shapes through samplers to decoders)
    from . import plan

    return plan


def _vae_engine():
    # The VAE's decode-memory estimator and the device's free memory
    from ..models import wan_vae_plan

    return wan_vae_plan


@dataclass
class MemoryPlan:
    """A lower bound of a run's peak memory, by part, against what the device has free."""

    device: str
    available: Optional[int]  # bytes (None: unknown, nothing is refused)
    parts: dict = field(default_factory=dict)  # name -> bytes
    need: int = 0

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available

    def describe(self) -> str:
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{name} {b / GIB:.2f} GiB" for name, b in top)


def _header_shapes(path: Path) -> dict:
    """{key: shape} from a safetensors header ({} when unreadable); read once per file version, since the memory
    plan is recomputed for every candidate setting when it suggests ones that fit."""
    try:
        st = path.stat()
    except OSError:
        return {}
    return _read_header_shapes(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _read_header_shapes(path: str, _mtime_ns: int, _size: int) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return {k: tuple(v["shape"]) for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return {}


def _dit_layers(source: str) -> int:
    """Number of transformer blocks of a denoiser from its preset or its file's header (0: unknown)."""
    from ..models import wan_dit

    if source.startswith("random:"):
        return wan_dit.PRESETS.get(source.split(":", 1)[1], wan_dit.PRESETS["tiny"]).num_layers
    try:
        path = paths.find_model("diffusion_models", source)
    except (FileNotFoundError, ValueError):
        return 0
    shapes = _header_shapes(path) if path.name.lower().endswith(_SAFETENSORS) else {}
    return len({m.group(1) for k in shapes for m in [re.search(r"(?:^|\.)blocks\.(\d+)\.", k)] if m})


def _dit_facts(source: str) -> tuple[int, int, int]:
    """(weight bytes, width, ffn width) of a denoiser from its preset or its file's header (lower bounds)."""
    from ..models import wan_dit

    if source.startswith("random:"):
        cfg = wan_dit.PRESETS.get(source.split(":", 1)[1], wan_dit.PRESETS["tiny"])
        params = cfg.num_layers * (4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim)
        return 4 * params, cfg.dim, cfg.ffn_dim
    try:
        path = paths.find_model("diffusion_models", source)
    except (FileNotFoundError, ValueError):
        return 0, 0, 0
    shapes = _header_shapes(path) if path.name.lower().endswith(_SAFETENSORS) else {}
    pe = shapes.get("patch_embedding.weight")
    ffn = shapes.get("blocks.0.ffn.0.weight")
    size = path.stat().st_size if path.is_file() else 0
    return size, (pe[0] if pe else 0), (ffn[0] if ffn else 0)


def _vae_model(source: str):
    """The VAE of `source` on the meta device (its structure, for the decode estimate): a random or trained
    preset, or the family and config read from a safetensors file's header (Wan2.1 for anything else)."""
    import torch

    from ..models import wan22_vae, wan_vae

    cfg = wan_vae.PRESETS["wan2.1"]  # every Wan2.1 VAE file has this structure
    if source.startswith("random:"):
        name = source.split(":", 1)[1]
        if name in wan22_vae.RANDOM_NAMES:
            cfg = wan22_vae.PRESETS[wan22_vae.RANDOM_NAMES[name]]
        else:
            cfg = wan_vae.PRESETS.get(name, wan_vae.PRESETS["tiny"])
    elif source.startswith(paths.TRAINED_PREFIX):
        cfg = wan_vae.PRESETS["tiny"]  # the shipped trained VAE has the tiny structure (tools/train_fixtures.py)
    else:
        try:
            path = paths.find_model("vae", source)
        except (FileNotFoundError, ValueError):
            path = None
        if path is not None and path.name.lower().endswith(_SAFETENSORS):
            shapes = _header_shapes(path)
            if wan22_vae.is_wan22(shapes):
                with torch.device("meta"):
                    sd = {k: torch.empty(v) for k, v in shapes.items()}
                try:
                    cfg = wan22_vae.file_config(sd, str(path))
                except CheckpointError:  # the loader names what is wrong; estimate the real config meanwhile
                    cfg = wan22_vae.PRESETS["wan2.2"]
    with torch.device("meta"):
        return wan22_vae.Wan22VAE(cfg) if isinstance(cfg, wan22_vae.Wan22VAEConfig) else wan_vae.WanVAE(cfg)


def _subgraphs(prompt: dict):
    """The compile plan's walk: ({node: outputs}, {(kind, model node, compile node): SubGraph})."""
    plan = _shape_plan()
    values, g = {}, plan._Graph()
    try:
        order = plan._order(prompt)
    except ValueError:  # a link on an input the node does not declare (ignored by validation and the run)
        order = list(prompt)  # closes a loop: check_memory's prompt is in the validated order already
    for nid in order:
        node = prompt[nid]
        ins = {}
        for k, v in (node.get("inputs") or {}).items():
            if plan._link(v):
                outs = values.get(str(v[0]))
                ins[k] = (outs[int(v[1])] if outs is not None and int(v[1]) < len(outs) else
                          plan.UNKNOWN if str(v[0]) in prompt else None)
            else:
                ins[k] = v
        rule = plan.RULES.get(node.get("class_type"))
        try:
            values[nid] = rule(nid, ins, g) if rule else None
        except (TypeError, ValueError, KeyError):
            values[nid] = None  # a value the rule cannot read: no estimate for this part
    return values, g.subgraphs


def memory_plan(prompt: dict, device=None) -> MemoryPlan:
    """A lower bound of the run's peak bytes on the compute device (see the module docstring)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae_engine = _vae_engine()
    plan = _shape_plan()
    values, subgraphs = _subgraphs(prompt)
    parts: dict = {}
    latents = 0
    for outs in values.values():
        for v in outs or ():
            if isinstance(v, plan.Latent):
                latents += 4 * math.prod(v.shape)
    parts["latents"] = latents
    weights, act, decode = 0, 0, 0
    streamed: dict = {}  # budget group -> the largest weights a budget of blocks of one of its models holds
    for (kind, _model_node, _c), sg in subgraphs.items():
        if kind == "denoiser":
            w, dim, ffn = _dit_facts(sg.model.source)
            layers = _dit_layers(sg.model.source) if sg.model.stream and dev.type != "cpu" else 0
            if layers:  # TwinFlow Block Stream on an accelerator: only its budget of blocks is on the device
                n, group = sg.model.stream
                streamed[group] = max(streamed.get(group, 0), w * min(n, layers) // layers)
            else:
                weights += w
            for shape in sg.shapes:  # (B, 16, T, h, w); Wan patches are 1x2x2
                tokens = shape[0] * shape[2] * max(1, shape[3] // 2) * max(1, shape[4] // 2)
                # the residual stream, its normed copy and q/k/v or the FFN's hidden layer live together
                act = max(act, 4 * tokens * (3 * dim + max(3 * dim, ffn)))
        elif kind == "vae_decode":
            vae = _vae_model(sg.model.source)
            cfg = vae.cfg
            for shape in sg.shapes:
                # the smallest tile the VAE could fall back to: what no setting of the node gets below
                decode = max(decode, vae.estimate_decode_bytes(shape, tile=8, dtype=torch.float32))
                frames = 1 + cfg.temporal_ratio * (shape[2] - 1)
                r = cfg.spatial_ratio
                decode += 4 * shape[0] * frames * shape[3] * r * shape[4] * r * 3  # the IMAGE handed on
    parts["model weights"] = weights + sum(streamed.values())
    parts["denoiser activations"] = act
    parts["VAE decode"] = decode
    need = latents + parts["model weights"] + max(act, decode)
    return MemoryPlan(str(dev), vae_engine.available_memory(dev), parts, need)


def _latent_nodes(prompt: dict) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") in ("TwinFlowEmptyLatentVideo",
                                                                      "EmptyHunyuanLatentVideo",
                                                                      "EmptyWanLatentVideo")]


def _fits(prompt, nid, device, avail, **inputs) -> bool:
    p = copy.deepcopy(prompt)
    p[nid]["inputs"].update(inputs)
    return memory_plan(p, device).need <= avail


def nearest_fit(prompt: dict, device, avail: int) -> list[str]:
    """For each empty-latent node: the largest length, and the largest size (aspect kept, multiples of 16)
    at which the run fits, as `--set` hints."""
    hints = []
    for nid in _latent_nodes(prompt):
        ins = prompt[nid].get("inputs") or {}
        try:
            w, h, length = int(ins.get("width", 832)), int(ins.get("height", 480)), int(ins.get("length", 33))
        except (TypeError, ValueError):
            continue
        lo, hi = 0, (length - 1) // 4  # length = 1 + 4k
        if _fits(prompt, nid, device, avail, length=1):
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if _fits(prompt, nid, device, avail, length=1 + 4 * mid) else (lo, mid - 1)
            hints.append(f"--set {nid}.length={1 + 4 * lo}")
        lo, hi = 1, max(1, max(w, h) // 16)
        scale = max(w, h)

        def size(k):
            return max(16, (w * k * 16 // scale) // 16 * 16), max(16, (h * k * 16 // scale) // 16 * 16)
        if _fits(prompt, nid, device, avail, width=size(1)[0], height=size(1)[1]):
            while lo < hi:
                mid = (lo + hi + 1) // 2
                sw, sh = size(mid)
                lo, hi = (mid, hi) if _fits(prompt, nid, device, avail, width=sw, height=sh) else (lo, mid - 1)
            sw, sh = size(lo)
            hints.append(f"--set {nid}.width={sw} --set {nid}.height={sh}")
    return hints


def check_memory(validated: ValidatedPrompt, device=None) -> Optional[MemoryPlan]:
    """Refuse a run whose lower-bound peak exceeds the free memory of the compute device."""
    # only the nodes that will run: validation checked those (links, no cycle); the rest may be anything
    prompt = {nid: validated.prompt[nid] for nid in validated.order} if validated.order else validated.prompt
    try:
        plan = memory_plan(prompt, device)
    except ImportError as e:  # torch-less tooling: no plan, and say so
        logger.info("memory plan skipped: %s", e)
        return None
    if plan.fits:
        return plan
    hints = nearest_fit(prompt, plan.device, plan.available)
    hint = ("; nearest settings that fit: " + " or ".join(hints)) if hints else (
        "; no smaller length or size of the workflow's empty latent fits: free memory or use a smaller model")
    nodes = _latent_nodes(prompt)
    msg = (f"this run needs at least {plan.need / GIB:.2f} GiB ({plan.describe()}) and only "
           f"{plan.available / GIB:.2f} GiB is available on {plan.device}{hint}")
    raise WorkflowError(msg, type="insufficient_memory", details=plan.describe(),
                        node_errors={nid: _node_error(nid, validated.prompt[nid]["class_type"],
                                                      "insufficient_memory", msg) for nid in nodes},
                        extra_info={"need_bytes": plan.need, "available_bytes": plan.available,
                                    "device": plan.device, "parts": plan.parts})


def preflight(validated: ValidatedPrompt, registry, *, memory: bool = True) -> Optional[MemoryPlan]:
    """Every check before compute (see the module docstring), in order of cost."""
    check_outputs(validated, registry)
    check_model_files(validated)
    return check_memory(validated) if memory else None
