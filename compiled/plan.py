"""Compile plan from a workflow: shape inference through the node graph, before anything runs.

Each relevant node class declares its output values from its inputs and widget values in `RULES`
(keyed by class_type, so the node classes stay thin): Empty Latent Video -> LATENT shape -> sampler
-> decode. `plan_workflow(api_prompt)` walks the graph in dependency order and returns, per
sub-graph (a denoiser per sampler branch, a VAE decode), the profile, the backend that would run,
cache hit/miss where the model's layout is known without loading it (random presets), and rough
build-time and memory estimates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import backends
from .export import Profile, Range

logger = logging.getLogger(__name__)

DEFAULT_TEXT = Range(1, 64, 512)  # real umT5 tokens; unknown until the text encoder runs


@dataclass
class Latent:
    shape: tuple  # (B, 16, T, h, w)


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


def _compile_profile(ins) -> Optional[Profile]:
    if ins.get("profile", "from workflow") != "custom":
        return None
    def r(name, div=1):
        return Range(int(ins[f"min_{name}"]) // div, int(ins[f"opt_{name}"]) // div, int(ins[f"max_{name}"]) // div)
    frames = Range(*(((int(ins[f"{k}_frames"]) - 1) // 4 + 1) for k in ("min", "opt", "max")))
    return Profile(batch=r("batch"), frames=frames, height=r("height", 8), width=r("width", 8), text=DEFAULT_TEXT)


def _compile_model(nid, ins, g):
    m = ins.get("model")
    if not isinstance(m, ModelRef):
        return [None, None]
    return [ModelRef(m.node, m.kind, m.source, ins.get("dtype", m.dtype) if ins.get("dtype", "default") != "default"
                     else m.dtype, {"node": nid, "backend": ins.get("backend", "auto"), "profile": _compile_profile(ins)}),
            None]


def _compile_vae(nid, ins, g):
    m = ins.get("vae")
    if not isinstance(m, ModelRef):
        return [None, None]
    return [ModelRef(m.node, m.kind, m.source, m.dtype,
                     {"node": nid, "backend": ins.get("backend", "auto"), "profile": _compile_profile(ins)}), None]


def _cfg_batch(b: int, cfg, negative) -> list[int]:
    # CFG runs cond and uncond as one batch of 2B (falling back to two calls of B on out-of-memory)
    return [b, 2 * b] if negative is not None and float(cfg) != 1.0 else [b]


def _sampler(nid, ins, g):
    lat = ins.get("latent", ins.get("latent_image"))  # TwinFlow samplers / core KSampler(Advanced)
    if not isinstance(lat, Latent):
        return [None, None]
    b = lat.shape[0]
    for key, cfg_key, neg_key in (("model", "cfg", "negative"), ("semantic", "cfg_semantic", "negative"),
                                  ("detail", "cfg_detail", "negative_detail")):
        m = ins.get(key)
        if isinstance(m, ModelRef):
            neg = ins.get(neg_key, ins.get("negative")) if key == "detail" else ins.get(neg_key)
            for bb in _cfg_batch(b, ins.get(cfg_key, 1.0), neg):
                g.use("denoiser", m, nid, (bb,) + tuple(lat.shape[1:]))
    return [Latent(lat.shape), None]


def _vae_decode(nid, ins, g):
    lat, vae = ins.get("samples"), ins.get("vae")
    if isinstance(lat, Latent) and isinstance(vae, ModelRef):
        g.use("vae_decode", vae, nid, lat.shape)
    return [None]


def _passthrough_latent(nid, ins, g):
    lat = ins.get("latent") or ins.get("samples")
    return [lat if isinstance(lat, Latent) else None]


RULES: dict[str, Callable] = {
    "TwinFlowEmptyLatentVideo": _empty_latent,
    "TwinFlowLoadDiT": _load_dit,
    "TwinFlowLoadVAE": _load_vae,
    "TwinFlowCompileModel": _compile_model,
    "TwinFlowCompileVAE": _compile_vae,
    "TwinFlowSampler": _sampler,
    "TwinFlowDualBranchSampler": _sampler,
    "TwinFlowVAEDecode": _vae_decode,
    # ComfyUI's core Wan nodes (the headless core node set)
    "UNETLoader": _core_unet,
    "VAELoader": _load_vae,
    "ModelSamplingSD3": _model_patch,
    "LoraLoaderModelOnly": _model_patch,
    "EmptyHunyuanLatentVideo": _empty_latent,
    "KSampler": _sampler,
    "KSamplerAdvanced": _sampler,
    "VAEDecode": _vae_decode,
    "VAEDecodeTiled": _vae_decode,
    "TwinFlowQuantizeModel": _model_patch,  # what `run --quantize` inserts
    "TwinFlowQuantizeCoreModel": _model_patch,
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
    deps = {nid: {str(v[0]) for v in (n.get("inputs") or {}).values() if _link(v)} for nid, n in prompt.items()}
    done, out = set(), []

    def visit(nid, stack=()):
        if nid in done:
            return
        if nid in stack:
            raise ValueError(f"workflow has a cycle through node {nid}")
        for d in sorted(deps.get(nid, ())):
            if d in prompt:
                visit(d, stack + (nid,))
        done.add(nid)
        out.append(nid)
    for nid in sorted(prompt, key=lambda s: (len(s), s)):
        visit(nid)
    return out


def workflow_profile(shapes: list, kind: str) -> Profile:
    """The profile covering every shape a sub-graph sees (opt = the first, i.e. the main call)."""
    bs, ts, hs, ws = zip(*[(s[0], s[2], s[3], s[4]) for s in shapes])
    def r(vals):
        return Range(min(vals), vals[0], max(vals))
    frames = r(ts) if kind == "denoiser" else Range(1, 1, 1)
    return Profile(batch=r(bs), frames=frames, height=r(hs), width=r(ws), text=DEFAULT_TEXT)


def _meta_module(model: ModelRef):
    """The module on the meta device when its layout is known without files (random presets)."""
    import torch

    if not model.source.startswith("random:"):
        return None
    preset = model.source.split(":", 1)[1]
    with torch.device("meta"):
        if model.kind == "dit":
            from ..models.wan_dit import WanDiT, get_config
            return WanDiT(get_config(preset))
        from ..models.wan_vae import PRESETS, WanVAE
        return WanVAE(PRESETS[preset])


def _estimates(module, kind: str, backend: str, profile: Profile) -> dict:
    """Rough build time (s) and peak memory (bytes): order-of-magnitude guidance, not measurements."""
    if module is None or backend == "eager":
        return {}
    n_params = sum(p.numel() for p in module.parameters())
    layers = getattr(getattr(module, "config", None), "num_layers", 8)
    dynamic = sum(not getattr(profile, a).static for a in ("batch", "frames", "height", "width"))
    per = {"inductor": (20.0, 1.5), "tensorrt": (60.0, 8.0)}.get(backend, (0.0, 0.0))
    build_s = per[0] + per[1] * layers * (1 + 0.25 * dynamic)
    weight_bytes = 2 * n_params if backend == "tensorrt" else 4 * n_params
    if kind == "denoiser":
        tokens = profile.batch.max * profile.frames.max * (profile.height.max // 2) * (profile.width.max // 2)
        dim = getattr(module.config, "dim", 1024)
        act = tokens * dim * 4 * 8
    else:
        act = profile.batch.max * profile.height.max * profile.width.max * 64 * 96 * 4 * 8
    return {"build_s": round(build_s), "memory_bytes": int(weight_bytes * (2 if backend == "tensorrt" else 1) + act)}


def plan_workflow(api_prompt: dict, backend: Optional[str] = None, cache=None) -> list[dict]:
    """One dict per sub-graph: kind, model node, used_by, profile, requested/resolved backend, reason,
    cache ("hit" | "miss" | "unknown (...)"), estimates. `backend` applies to sub-graphs without a
    compile node (the `twinflow run --compile` case); None leaves them eager."""
    from ..core.errors import WorkflowError

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
    for (kind, feed, cnode), sg in g.subgraphs.items():
        model_node = sg.model.node
        comp = sg.model.compile
        requested = comp["backend"] if comp else (backend or "eager")
        profile = (comp or {}).get("profile") or workflow_profile(sg.shapes, kind)
        if kind == "vae_decode":
            profile = Profile(batch=profile.batch, frames=Range(1, 1, 1), height=profile.height,
                              width=profile.width, text=Range(1, 1, 1))
        import torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        resolved, reason = backends.resolve_backend(requested, device)
        module = _meta_module(sg.model)
        cache_state = "-"
        if resolved != "eager":
            if module is None:
                cache_state = "unknown (model layout known only after loading the file)"
            else:
                from .cache import ArtifactCache
                from .runtime import artifact_key
                c = cache or ArtifactCache()
                parts = ["dit"] if kind == "denoiser" else ["vae-decode-first", "vae-decode-rest"]
                fam = "wan_dit" if kind == "denoiser" else "wan_vae"
                keys = [artifact_key(module, fam, profile, resolved, None, None, p)[0] for p in parts]
                cache_state = "hit" if all(c.contains(k) for k in keys) else "miss"
        out.append({"kind": kind, "model_node": model_node, "feed_node": feed, "model": sg.model.source,
                    "compile_node": cnode,
                    "used_by": sorted(set(sg.used_by)), "shapes": sorted(set(sg.shapes)), "profile": profile.to_dict(),
                    "requested": requested, "backend": resolved, "reason": reason, "cache": cache_state,
                    **_estimates(module, "denoiser" if kind == "denoiser" else "vae", resolved, profile)})
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
    import copy

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
        b, f, h, w = (p["profile"][k] for k in ("batch", "frames", "height", "width"))
        widgets = {"backend": backend, "profile": "custom"}
        for i, k in enumerate(("min", "opt", "max")):
            widgets.update({f"{k}_batch": b[i], f"{k}_frames": 1 + 4 * (f[i] - 1), f"{k}_height": h[i] * 8,
                            f"{k}_width": w[i] * 8})
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


# TwinFlowQuantizeModel's widget defaults (tests/test_core_plan.py checks them against the node)
QUANTIZE_DEFAULTS = {"group_size": 0, "fp8_scale": "auto", "smoothquant_alpha": 0.0, "include": "", "exclude": "",
                     "min_cosine": 0.0, "force": False, "report_seed": 0, "report_sigmas": "0.95, 0.75, 0.5, 0.25, 0.05"}


def with_quantize_nodes(api_prompt: dict, fmt: str) -> dict:
    """A copy of the prompt with a TwinFlowQuantizeModel node (format `fmt`, its default report and accuracy
    check) between every denoiser and the samplers it feeds (after ModelSamplingSD3 / LoRA patches); used by
    `twinflow run --quantize FORMAT`. Run before `with_compile_nodes`, so a compile compiles the quantized model."""
    import copy

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
        prompt[nid] = {"class_type": ctype, "inputs": {"model": [feed, 0], "format": fmt, **QUANTIZE_DEFAULTS},
                       "_meta": {"title": f"quantize ({fmt})"}}
        _rewire(prompt, p["used_by"], feed, nid)
    return prompt
