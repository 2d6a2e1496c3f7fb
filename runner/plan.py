"""Compile plan of a workflow: shape inference through the node graph, before anything runs.

Each relevant node class declares its output values from its inputs and widget values in `RULES`
(keyed by class_type, so the node classes stay thin): Empty Latent Video -> LATENT shape -> sampler
-> decode. `plan_workflow(api_prompt)` walks the graph in the runner's dependency order
(`validate.topological_order`) and returns, per sub-graph (a denoiser per sampler branch, a VAE decode),
the profile, the backend that would run, cache hit/miss where the model's layout is known without loading
it (random presets), and rough build-time and memory estimates. The shape math is `compiled.profiles`;
`with_compile_nodes` is `twinflow run --compile`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..compiled import profiles
from ..compiled.export import Profile
from ..core.errors import WorkflowError
from ..core.paths import random_preset
from .validate import find_cycles, topological_order

logger = logging.getLogger(__name__)


@dataclass
class Latent:
    shape: tuple  # (B, 16, T, h, w)


@dataclass
class Frames:
    shape: tuple  # (B, F, H, W): decoded video frames (IMAGE)


@dataclass
class ModelRef:
    """Where a TWINFLOW_MODEL / TWINFLOW_VAE comes from, and any compile node on the way."""

    node: str
    kind: str  # "dit" | "vae"
    source: str  # widget value (file name or random:<preset>)
    dtype: str = "default"
    compile: Optional[dict] = None  # {"node", "backend", "profile": None | Profile}
    tail: Optional[str] = None  # the node whose output 0 carries the model as its users see it (ModelSamplingSD3,
    #                              LoraLoaderModelOnly after a core UNETLoader); None: the loader itself
    stream: Optional[tuple] = None  # (max_resident_blocks, budget group or the node id) after a TwinFlow Block Stream

    @property
    def feed(self) -> str:
        return self.tail or self.node


@dataclass
class SubGraph:
    kind: str  # "denoiser" | "vae_decode"
    model: ModelRef
    used_by: list = field(default_factory=list)
    shapes: list = field(default_factory=list)  # latent shapes seen (B, 16, T, h, w) incl. CFG batch


class _Unknown:
    """An output of a node without a rule (text encoders, loaders of other kinds): present, shape unknown."""

    def __repr__(self):
        return "unknown"


UNKNOWN = _Unknown()


def _link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int))


# ----------------------------------------------------------------------------------------------
# Rules: class_type -> fn(node_id, inputs with links resolved to upstream values, graph) -> outputs
# ----------------------------------------------------------------------------------------------

def _empty_latent(nid, ins, g):
    b, t = int(ins.get("batch_size", 1)), (int(ins.get("length", 33)) - 1) // 4 + 1
    return [Latent((b, 16, t, int(ins.get("height", 480)) // 8, int(ins.get("width", 832)) // 8))]


def _wan_i2v(nid, ins, g):
    """WanImageToVideo: (positive, negative passed on with the image added, an empty Wan2.1 latent)."""
    return [ins.get("positive"), ins.get("negative")] + _empty_latent(nid, ins, g)


def _wan22_i2v_latent(nid, ins, g):
    """Wan22ImageToVideoLatent: a 48-channel latent at /16 (batch_size applies only with a start image)."""
    b = int(ins.get("batch_size", 1)) if ins.get("start_image") is not None else 1
    t = (int(ins.get("length", 49)) - 1) // 4 + 1
    return [Latent((b, 48, t, int(ins.get("height", 704)) // 16, int(ins.get("width", 1280)) // 16))]


def _load_dit(nid, ins, g):
    return [ModelRef(nid, "dit", str(ins.get("ckpt_name", "")), str(ins.get("dtype", "default")))]


def _load_vae(nid, ins, g):
    return [ModelRef(nid, "vae", str(ins.get("vae_name", "")), str(ins.get("dtype", "default")))]


def _core_unet(nid, ins, g):
    return [ModelRef(nid, "dit", str(ins.get("unet_name", "")), str(ins.get("weight_dtype", "default")))]


def _model_patch(nid, ins, g):
    """ModelSamplingSD3 / LoraLoaderModelOnly / TwinFlowQuantizeModel: the same denoiser (a LoRA changes its weights, so what
    compiles is the patched model: the compile node goes after the last patch)."""
    from dataclasses import replace

    m = ins.get("model")
    return [replace(m, tail=nid) if isinstance(m, ModelRef) and m.compile is None else None]


def _block_stream(nid, ins, g):
    """TwinFlowBlockStream: the same denoiser, with only its budget of blocks on the device (preflight's memory plan)."""
    from dataclasses import replace

    m = ins.get("model")
    if not isinstance(m, ModelRef) or m.compile is not None:
        return [None]
    try:
        n = int(ins.get("max_resident_blocks", 4))
    except (TypeError, ValueError):
        n = None
    group = str(ins.get("budget_group") or "").strip() or f"#{nid}"
    return [replace(m, tail=nid, stream=(n, group) if n else None)]


def _compile_profile(nid, kind, ins) -> Optional[Profile]:
    if ins.get("profile", "from workflow") != "custom":
        return None
    try:
        return profiles.custom_profile(kind, ins)
    except (KeyError, ValueError) as e:
        raise WorkflowError(f"node {nid}: its custom compile profile is invalid: {e}") from None


def _compile_model(nid, ins, g):
    m = ins.get("model")
    if not isinstance(m, ModelRef):
        return [None, None]
    return [ModelRef(m.node, m.kind, m.source, ins.get("dtype", m.dtype) if ins.get("dtype", "default") != "default"
                     else m.dtype, {"node": nid, "backend": ins.get("backend", "auto"),
                                    "profile": _compile_profile(nid, m.kind, ins)}),
            None]


def _compile_vae(nid, ins, g):
    m = ins.get("vae")
    if not isinstance(m, ModelRef):
        return [None, None]
    return [ModelRef(m.node, m.kind, m.source, m.dtype,
                     {"node": nid, "backend": ins.get("backend", "auto"),
                      "profile": _compile_profile(nid, m.kind, ins)}), None]


def _cfg_batch(b: int, cfg, negative) -> list[int]:
    # CFG runs cond and uncond as one batch of 2B (falling back to two calls of B on out-of-memory)
    return [b, 2 * b] if negative is not None and float(cfg) != 1.0 else [b]


def _sampler(nid, ins, g):
    lat = ins.get("latent", ins.get("latent_image"))  # TwinFlow samplers / core KSampler(Advanced)
    if not isinstance(lat, Latent):
        return [None, None]
    b = lat.shape[0]
    for key, cfg_key, neg_key in (("model", "cfg", "negative"), ("semantic", "cfg_semantic", "negative"),
                                  ("detail", "cfg_detail", "negative_detail"),
                                  ("high_noise", "cfg_high", "negative"), ("low_noise", "cfg_low", "negative")):
        m = ins.get(key)
        if isinstance(m, ModelRef):
            neg = ins.get(neg_key, ins.get("negative")) if key == "detail" else ins.get(neg_key)
            for bb in _cfg_batch(b, ins.get(cfg_key, 1.0), neg):
                g.use("denoiser", m, nid, (bb,) + tuple(lat.shape[1:]))
    return [Latent(lat.shape), None]


def _vae_decode(nid, ins, g):
    lat, vae = ins.get("samples"), ins.get("vae")
    if not isinstance(lat, Latent):
        return [None]
    if isinstance(vae, ModelRef):
        g.use("vae_decode", vae, nid, lat.shape)
    b, c, t, h, w = lat.shape  # Wan VAE: 4x time (first frame alone), 8x space (Wan2.2's 48-channel VAE: 16x)
    r = 16 if c == 48 else 8
    return [Frames((b, 1 + 4 * (t - 1), h * r, w * r))]


def _vae_encode(nid, ins, g):
    px = ins.get("pixels")
    if not isinstance(px, Frames):
        return [None]
    b, f, h, w = px.shape
    return [Latent((b, 16, (f - 1) // 4 + 1, h // 8, w // 8))]


RULES: dict[str, Callable] = {
    "TwinFlowEmptyLatentVideo": _empty_latent,
    "TwinFlowLoadDiT": _load_dit,
    "TwinFlowLoadVAE": _load_vae,
    "TwinFlowCompileModel": _compile_model,
    "TwinFlowCompileVAE": _compile_vae,
    "TwinFlowSampler": _sampler,
    "TwinFlowDualBranchSampler": _sampler,
    "TwinFlowDualExpertSampler": _sampler,  # cfg -1 = the preset's (never 1): cond+uncond batched
    "TwinFlowVAEDecode": _vae_decode,
    "TwinFlowVAEEncode": _vae_encode,
    # ComfyUI's core Wan nodes (the headless core node set)
    "UNETLoader": _core_unet,
    "VAELoader": _load_vae,
    "ModelSamplingSD3": _model_patch,
    "LoraLoaderModelOnly": _model_patch,
    "EmptyHunyuanLatentVideo": _empty_latent,
    "WanImageToVideo": _wan_i2v,
    "Wan22ImageToVideoLatent": _wan22_i2v_latent,
    "KSampler": _sampler,
    "KSamplerAdvanced": _sampler,
    "VAEDecode": _vae_decode,
    "VAEDecodeTiled": _vae_decode,
    "VAEEncode": _vae_encode,
    "TwinFlowQuantizeModel": _model_patch,  # what `run --quantize` inserts
    "TwinFlowQuantizeCoreModel": _model_patch,
    "TwinFlowBlockStream": _block_stream,  # and what `run --stream-blocks` inserts
    "TwinFlowBlockStreamCore": _block_stream,
    "TwinFlowCompileCoreModel": _compile_model,
    "TwinFlowCompileCoreVAE": _compile_vae,
}
CORE_LOADERS = ("UNETLoader", "VAELoader")  # models from these feed core nodes: insert the MODEL/VAE-typed variants


# ----------------------------------------------------------------------------------------------
# Walking the graph
# ----------------------------------------------------------------------------------------------

class _Graph:
    def __init__(self):
        self.subgraphs: dict = {}

    def use(self, kind: str, model: ModelRef, user: str, shape: tuple) -> None:
        ckey = model.compile["node"] if model.compile else None
        key = (kind, model.feed, ckey)
        sg = self.subgraphs.setdefault(key, SubGraph(kind, model))
        sg.used_by.append(user)
        sg.shapes.append(tuple(shape))


def _order(prompt: dict) -> list[str]:
    """Every node, dependencies first (the runner's order), from the node ids in numeric-like order."""
    graph = {nid: sorted({str(v[0]) for v in (n.get("inputs") or {}).values() if _link(v)} & set(prompt))
             for nid, n in prompt.items()}
    roots = sorted(prompt, key=lambda s: (len(s), s))
    cyc = find_cycles(graph, roots)
    if cyc:
        raise ValueError(f"workflow has a cycle through node {next(iter(cyc))}")
    return topological_order(graph, roots)


def _meta_module(model: ModelRef):
    """The module on the meta device when its layout is known without files (random presets)."""
    from ..models import wan22_vae, wan_dit, wan_vae

    presets = wan_dit.PRESETS if model.kind == "dit" else [*wan_vae.PRESETS, *wan22_vae.RANDOM_NAMES]
    preset = random_preset(model.source, presets, "preset" if model.kind == "dit" else "VAE")
    return None if preset is None else profiles.meta_module(model.kind, preset)


def plan_workflow(api_prompt: dict, backend: Optional[str] = None, cache=None) -> list[dict]:
    """One dict per sub-graph: kind, model node, used_by, profile, requested/resolved backend, reason,
    cache ("hit" | "miss" | "unknown (...)"), estimates. `backend` applies to sub-graphs without a
    compile node (the `twinflow run --compile` case); None leaves them eager."""
    import torch

    from ..compiled import backends

    if not isinstance(api_prompt, dict):
        raise WorkflowError("plan_workflow needs an API prompt dict {node_id: {class_type, inputs}}")
    values: dict = {}
    g = _Graph()
    for nid in _order(api_prompt):
        node = api_prompt[nid]
        ct = node.get("class_type")
        ins = {}
        for k, v in (node.get("inputs") or {}).items():
            if _link(v):
                outs = values.get(str(v[0]))
                if outs is None:
                    ins[k] = UNKNOWN if str(v[0]) in api_prompt else None
                else:
                    ins[k] = outs[int(v[1])] if int(v[1]) < len(outs) else None
            else:
                ins[k] = v
        rule = RULES.get(ct)
        values[nid] = rule(nid, ins, g) if rule else None
    out = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for (kind, feed, cnode), sg in g.subgraphs.items():
        model_node = sg.model.node
        comp = sg.model.compile
        requested = comp["backend"] if comp else (backend or "eager")
        profile = (comp or {}).get("profile") or profiles.shapes_profile(sg.shapes, kind)
        nothing_requested = comp is None and backend is None
        resolved, reason = backends.resolve_backend(requested, device)
        if nothing_requested:
            reason = "nothing requested (no compile node, no --backend): runs eager"
        module = _meta_module(sg.model)
        cache_state = "-"
        if resolved != "eager":
            if module is None:
                cache_state = "unknown (model layout known only after loading the file)"
            else:
                cache_state = profiles.cache_state(module, "dit" if kind == "denoiser" else "vae", profile, resolved,
                                                   cache)
        out.append({"kind": kind, "model_node": model_node, "feed_node": feed, "model": sg.model.source,
                    "compile_node": cnode,
                    "used_by": sorted(set(sg.used_by)), "shapes": sorted(set(sg.shapes)), "profile": profile.to_dict(),
                    "requested": requested, "backend": resolved, "reason": reason, "cache": cache_state,
                    **profiles.estimates(module, "denoiser" if kind == "denoiser" else "vae", resolved, profile)})
    return out


def format_plan(plan: list[dict]) -> str:
    if not plan:
        return "no compilable sub-graphs (no sampler or VAE decode fed by TwinFlow or core Wan loaders)"
    lines = []
    for p in plan:
        prof = ", ".join(f"{k} {a}..{o}..{b}" for k, (a, o, b) in p["profile"].items())
        est = ""
        if "build_s" in p:
            est = f"; estimate ~{p['build_s']} s build, ~{p['memory_bytes'] / 2 ** 30:.1f} GiB"
        via = f" via {p['feed_node']}" if p.get("feed_node", p["model_node"]) != p["model_node"] else ""
        lines.append(f"{p['kind']} of node {p['model_node']} ({p['model']}){via} used by {', '.join(p['used_by'])}: "
                     f"{p['backend']} ({p['reason']}); profile {prof}; cache {p['cache']}{est}")
    return "\n".join(lines)


def with_compile_nodes(api_prompt: dict, backend: str) -> dict:
    """A copy of the prompt with a TwinFlowCompileModel / TwinFlowCompileVAE node (custom profile from the
    plan) between every loader and the samplers / decoders it feeds that have no compile node yet; used
    by `twinflow run --compile BACKEND`, so the builds run (with progress) before the first step."""
    plan = plan_workflow(api_prompt, backend=backend)
    prompt = copy.deepcopy(api_prompt)
    n = 0
    for p in plan:
        if p["compile_node"] is not None:
            continue
        n += 1
        nid = f"twinflow_compile_{n}"
        while nid in prompt:
            nid += "_"
        widgets = {"backend": backend, "profile": "custom", **profiles.profile_widgets(Profile.make(**p["profile"]))}
        is_dit = p["kind"] == "denoiser"
        if is_dit:
            widgets["dtype"] = "default"
        ctype, port = ("TwinFlowCompileModel", "model") if is_dit else ("TwinFlowCompileVAE", "vae")
        if api_prompt[p["model_node"]].get("class_type") in CORE_LOADERS:
            ctype = ctype.replace("Compile", "CompileCore")
        feed = p.get("feed_node", p["model_node"])
        prompt[nid] = {"class_type": ctype, "inputs": {port: [feed, 0], **widgets},
                       "_meta": {"title": f"compile ({backend})"}}
        _rewire(prompt, p["used_by"], feed, nid)
    return prompt


def _rewire(prompt: dict, users, old: str, new: str) -> None:
    for user in users:
        for k, v in prompt[user]["inputs"].items():
            if _link(v) and str(v[0]) == str(old) and int(v[1]) == 0:
                prompt[user]["inputs"][k] = [new, 0]


def _quantize_defaults() -> dict:
    """TwinFlowQuantizeModel's widget defaults (its report and accuracy check as the node gives them)."""
    from ..nodes.quant import TwinFlowQuantizeModel

    req = TwinFlowQuantizeModel.INPUT_TYPES()["required"]
    return {k: spec[1]["default"] for k, spec in req.items() if k not in ("model", "format")}


def with_quantize_nodes(api_prompt: dict, fmt: str) -> dict:
    """A copy of the prompt with a TwinFlowQuantizeModel node (format `fmt`, its default report and accuracy
    check) between every denoiser and the samplers it feeds (after ModelSamplingSD3 / LoRA patches); used by
    `twinflow run --quantize FORMAT`. Run before `with_compile_nodes`, so a compile compiles the quantized model."""
    prompt = copy.deepcopy(api_prompt)
    n = 0
    for p in plan_workflow(api_prompt):
        if p["kind"] != "denoiser" or p["compile_node"] is not None:
            continue
        n += 1
        nid = f"twinflow_quantize_{n}"
        while nid in prompt:
            nid += "_"
        feed = p.get("feed_node", p["model_node"])
        core = api_prompt[p["model_node"]].get("class_type") in CORE_LOADERS
        ctype = "TwinFlowQuantizeCoreModel" if core else "TwinFlowQuantizeModel"
        prompt[nid] = {"class_type": ctype, "inputs": {"model": [feed, 0], "format": fmt, **_quantize_defaults()},
                       "_meta": {"title": f"quantize ({fmt})"}}
        _rewire(prompt, p["used_by"], feed, nid)
    return prompt


def with_stream_nodes(api_prompt: dict, max_resident_blocks: int) -> dict:
    """A copy of the prompt with a TwinFlowBlockStream node (this budget, one budget group for the whole run, so
    two experts share it) between every denoiser and the samplers it feeds, after any quantize node; used by
    `twinflow run --stream-blocks N` (which refuses `--compile` beside it)."""
    from ..nodes.stream import CLI_GROUP

    prompt = copy.deepcopy(api_prompt)
    n = 0
    for p in plan_workflow(api_prompt):
        if p["kind"] != "denoiser":
            continue
        if p["compile_node"] is not None:
            raise WorkflowError(f"--stream-blocks: the model of node {p['model_node']} goes through a compile node "
                                f"({p['compile_node']}); a compiled graph holds every weight on the device. Remove "
                                f"the compile node or run without --stream-blocks")
        n += 1
        nid = f"twinflow_stream_{n}"
        while nid in prompt:
            nid += "_"
        feed = p.get("feed_node", p["model_node"])
        core = api_prompt[p["model_node"]].get("class_type") in CORE_LOADERS
        prompt[nid] = {"class_type": "TwinFlowBlockStreamCore" if core else "TwinFlowBlockStream",
                       "inputs": {"model": [feed, 0], "max_resident_blocks": int(max_resident_blocks),
                                  "budget_group": CLI_GROUP},
                       "_meta": {"title": f"block stream ({max_resident_blocks})"}}
        _rewire(prompt, p["used_by"], feed, nid)
    return prompt
