"""Compile a denoiser or a VAE through export -> backend -> verify, behind a profile check.

`compile_denoiser` / `compile_vae` return a wrapped copy (the input is never changed) and a
`CompileReport`. At run time every call first checks the input sizes against the profile the
artifact was built for: outside it, that call runs eager with a one-line explanation (logged once
per reason) -- a backend is never handed a shape it was not built for.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..core.log import log_once
from ..core.progress import Progress
from . import backends, export as ex
from .cache import ArtifactCache, cache_key
from .verify import Verdict, verify

logger = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parents[1]
# The source files whose code is traced into each graph: any edit invalidates cached artifacts.
SOURCES = {
    "wan_dit": ("models/wan_dit.py", "compiled/export.py", "fused/ops.py", "fused/norm.py", "fused/rope.py"),
    "wan_vae": ("models/wan_vae.py", "compiled/export.py", "fused/ops.py", "fused/vae_norm.py"),
}


@dataclass
class CompileReport:
    label: str
    requested: str
    backend: str = "eager"
    reason: str = ""
    cache: str = "-"  # "hit" | "miss" | "-"
    export_s: float = 0.0
    build_s: float = 0.0
    verdict: Optional[Verdict] = None
    key: str = ""
    fell_back: bool = False
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"{self.label}: {self.backend}"]
        if self.requested != self.backend:
            parts.append(f"(requested {self.requested})")
        if self.reason:
            parts.append(f"- {self.reason}")
        if self.backend != "eager" or self.cache != "-":
            parts.append(f"[cache {self.cache}, export {self.export_s:.1f}s, build/load {self.build_s:.1f}s]")
        if self.verdict is not None:
            parts.append(self.verdict.line())
        return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Fingerprints and keys (computable before any export: the plan uses them)
# ----------------------------------------------------------------------------------------------

def source_fingerprint(module: nn.Module, family: str) -> str:
    """sha256 of the traced source files, the module's config and its parameter layout (names, shapes,
    dtypes -- not values): equal fingerprints export equal graphs."""
    h = hashlib.sha256()
    for rel in SOURCES[family]:
        p = _PKG / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.is_file() else b"missing")
    cfg = getattr(module, "config", None) or getattr(module, "cfg", None)
    h.update(repr(cfg).encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()


def kernel_set() -> str:
    from ..fused import ops

    return f"{ops.get_mode()}:{','.join(ops.OPS)}"


def artifact_key(module, family: str, profile: ex.Profile, backend: str, options: Optional[dict],
                 quant: Optional[str], part: str) -> tuple[str, dict]:
    dtype = str(getattr(module, "dtype", None) or next(module.parameters()).dtype)
    return cache_key(graph=f"{source_fingerprint(module, family)}:{part}", dtypes=[dtype], profile=profile,
                     backend=backend, options=options, quant=quant, kernels=kernel_set())


# ----------------------------------------------------------------------------------------------
# One graph -> one backend artifact (cached, verified, weights swappable)
# ----------------------------------------------------------------------------------------------

@dataclass
class GraphSpec:
    """One sub-graph to compile: its eager module (the oracle and the fallback; built without exporting)
    and how to export it, which is done only when the backend needs the exported program."""

    label: str
    module: nn.Module  # WanDiTGraph / WanVAEDecodeStep
    export: Callable[[nn.Module], object]  # module -> ExportedProgram
    example_opt: tuple
    example_trace: tuple
    shapes: list
    dtypes: list
    dtype: torch.dtype
    export_s: float = 0.0

    def exported(self, module: Optional[nn.Module] = None):
        t0 = time.perf_counter()
        ep = self.export(module if module is not None else self.module)
        self.export_s += time.perf_counter() - t0
        return ep


class Artifact:
    """A built or loaded backend callable for one graph, and how to give it new weights without rebuilding:
    aoti -> the package's constants are reloaded; inductor (JIT) -> the compiled module's parameters are
    re-pointed (torch.compile reads them as inputs: no recompile); tensorrt -> `refit_module_weights`."""

    def __init__(self, kind: str, fn, owner=None, extra: Optional[dict] = None):
        self.kind, self.fn, self.owner = kind, fn, owner  # owner: the runner / ep.module() / TRT module
        self.extra = extra or {}  # aoti: the graph's own lifted constants, reloaded with every new weight set

    def __call__(self, *args):
        if self.kind == "aoti":
            # a package reads its inputs at the strides it was traced with (it checks none): a latent frame
            # slice z[:, :, i] or an expanded timestep must be made dense first
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        return self.fn(*args)

    def swap_weights(self, spec: GraphSpec, module: nn.Module) -> str:
        """Give the artifact `module`'s weights (same graph); returns how, for the status line."""
        if self.kind == "aoti":
            backends.aoti_swap_constants(self.owner, {**self.extra, **backends.module_state(module)})
            return "aoti constants reloaded"
        if self.kind == "inductor":
            n = backends.swap_module_tensors(self.owner, backends.module_state(module))
            return f"{n} compiled-module tensors re-pointed"
        if self.kind == "tensorrt":
            self.fn = self.owner = backends.refit_tensorrt(self.owner, spec.exported(module))
            return "tensorrt engines refit"
        raise ValueError(f"unknown artifact kind {self.kind!r}")


def _load_aoti_entry(entry, module: nn.Module) -> Artifact:
    """A weight-free package + this module's weights (+ the graph's own lifted constants saved beside it)."""
    extra = {}
    if (entry.path / "constants.pt").is_file():
        extra = torch.load(entry.path / "constants.pt", weights_only=True, map_location="cpu")
        dev = next(iter(backends.module_state(module).values())).device
        extra = {k: v.to(dev) for k, v in extra.items()}
    runner = backends.load_aoti(entry.path / "model.pt2", {**extra, **backends.module_state(module)})
    return Artifact("aoti", runner, runner, extra)


def _obtain(spec: GraphSpec, backend: str, cache: ArtifactCache, key: str, parts: dict, options: Optional[dict],
            aot: bool, report: "CompileReport") -> tuple[Artifact, bool]:
    """(artifact, hit). A hit needs no export for aoti (the key is computed from sources and layout)."""
    opts = dict(options or {})
    if backend == "inductor" and aot:
        entry = cache.lookup(key)  # checksummed: a corrupt entry is removed (and rebuilt below)
        if entry is not None:
            try:
                return _load_aoti_entry(entry, spec.module), True
            except Exception as exc:  # a mismatched package (e.g. other constants): rebuild it
                logger.warning("%s: cached package %s does not load (%s: %s); rebuilding", report.label, key,
                               type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                cache.remove(key)
        ep = spec.exported()
        module_names = set(backends.module_state(spec.module))

        def build(tmp: Path):
            backends.build_aoti_package(ep, tmp / "model.pt2", opts)
            extra = {k: v for k, v in backends.exported_state(ep).items() if k not in module_names}
            if extra:
                torch.save({k: v.detach().cpu() for k, v in extra.items()}, tmp / "constants.pt")
            return {"kind": "aoti"}
        entry = cache.get_or_build(key, build, parts, label=report.label)
        return _load_aoti_entry(entry, spec.module), entry.hit
    ep = spec.exported()
    if backend == "inductor":
        backends.use_inductor_cache_dir(cache.root / "inductor")
        gm = ep.module()
        fn = backends.build_inductor_module(gm, opts)

        def build(tmp: Path):
            with torch.no_grad():
                fn(*spec.example_trace)  # torch.compile builds on the first call
            backends.save_inductor_artifacts(tmp / "inductor_cache.bin")
            return {"kind": "inductor"}
        entry = cache.lookup(key)
        if entry is not None and (entry.path / "inductor_cache.bin").is_file():
            backends.load_inductor_artifacts(entry.path / "inductor_cache.bin")
            with torch.no_grad():
                fn(*spec.example_trace)
            return Artifact("inductor", fn, gm), True
        entry = cache.get_or_build(key, build, parts, label=report.label)
        return Artifact("inductor", fn, gm), entry.hit
    if backend == "tensorrt":
        holder = {}

        def build(tmp: Path):
            holder["gm"] = backends.compile_tensorrt(ep, spec.shapes, spec.dtypes, spec.dtype, opts)
            backends.save_tensorrt(holder["gm"], tmp / "engine.ep", spec.example_trace)
            return {"kind": "tensorrt"}
        entry = cache.get_or_build(key, build, parts, label=report.label)
        if "gm" in holder:
            return Artifact("tensorrt", holder["gm"], holder["gm"]), False
        # engines bake the weights of the model they were built from: refit this model's weights into them
        gm = backends.refit_tensorrt(backends.load_tensorrt(entry.path / "engine.ep"), ep)
        report.details["refit"] = True
        return Artifact("tensorrt", gm, gm), True
    raise ValueError(f"unknown backend {backend!r}")


def compile_graph(spec: GraphSpec, *, requested: str, backend: str, reason: str, key: str, parts: dict,
                  cache: Optional[ArtifactCache], options: Optional[dict] = None, aot: bool = True):
    """(Artifact or None, report): None means eager runs, with the reason in the report. Every build and
    every cache load is verified against eager on the opt shape; a cached artifact that fails is removed
    and rebuilt once, a fresh one that fails is discarded (eager runs)."""
    report = CompileReport(spec.label, requested, backend, reason, key=key)
    if backend == "eager":
        return None, report
    cache = cache or ArtifactCache()
    t0 = time.perf_counter()
    for attempt in (0, 1):
        try:
            art, hit = _obtain(spec, backend, cache, key, parts, options, aot, report)
        except Exception as exc:  # a failed build must never take the workflow down: run eager and say why
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            logger.warning("%s: %s build failed (%s: %s); running eager", spec.label, backend, type(exc).__name__,
                           first)
            report.backend, report.fell_back = "eager", True
            report.reason = f"{backend} build failed: {type(exc).__name__}: {first}"
            report.export_s = spec.export_s
            return None, report
        report.verdict = verify(art, spec.module, spec.example_opt, spec.dtype)
        if report.verdict.ok or not hit or attempt == 1:
            break
        logger.warning("%s: cached %s artifact %s fails verification (%s); rebuilding it", spec.label, backend, key,
                       report.verdict.line())
        cache.remove(key)
    report.export_s = spec.export_s
    report.build_s = time.perf_counter() - t0 - spec.export_s
    report.cache = "hit" if hit else "miss"
    if report.details.get("refit"):
        report.reason = (report.reason + "; " if report.reason else "") + "cached engines refit with this model's weights"
    elif hit and art.kind == "aoti":
        report.reason = (report.reason + "; " if report.reason else "") + "no rebuild: cached package loaded with this model's weights"
    if not report.verdict.ok:
        logger.warning("%s: %s artifact discarded, %s; running eager", spec.label, backend, report.verdict.line())
        cache.remove(key)
        report.backend, report.fell_back = "eager", True
        report.reason = f"{backend} artifact discarded: {report.verdict.reason}"
        return None, report
    return art, report


class ProfiledCall:
    """Calls the compiled function when the sizes are inside the profile, else eager (one line, once)."""

    def __init__(self, compiled, eager, profile: ex.Profile, label: str):
        self.compiled, self.eager, self.profile, self.label = compiled, eager, profile, label
        self.calls = {"compiled": 0, "eager": 0}

    def __call__(self, sizes: dict, compiled_args: Callable, eager_args: tuple):
        why = self.profile.outside(**sizes) if self.compiled is not None else None
        if self.compiled is None or why:
            if why:
                log_once(logger, ("twinflow.compiled.outside", self.label, why),
                         "%s: %s; running this call eager (widen the profile to compile it)", self.label, why)
            self.calls["eager"] += 1
            return self.eager(*eager_args)
        self.calls["compiled"] += 1
        # inference only; the same grad mode as at build time (grad mode is part of dynamo's guards)
        with torch.no_grad():
            return self.compiled(*compiled_args())


def swap_weights(art: Optional[Artifact], spec: GraphSpec, new_graph: nn.Module) -> tuple[Optional[Artifact], str]:
    """New weights (same graph) into a built artifact, verified against eager with those weights.
    (artifact or None when the swap fails verification, status line)."""
    spec.module = new_graph
    if art is None:
        return None, f"{spec.label}: eager, new weights used as they are"
    t0 = time.perf_counter()
    try:
        how = art.swap_weights(spec, new_graph)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        logger.warning("%s: weight swap failed (%s: %s); running eager", spec.label, type(exc).__name__, first)
        return None, f"{spec.label}: weight swap failed ({type(exc).__name__}: {first}); running eager"
    verdict = verify(art, new_graph, spec.example_opt, spec.dtype)
    dt = time.perf_counter() - t0
    if not verdict.ok:
        logger.warning("%s: swapped weights fail verification (%s); running eager", spec.label, verdict.line())
        return None, f"{spec.label}: weights swapped but {verdict.line()}; running eager"
    verb = "refit" if art.kind == "tensorrt" else "weights swapped"
    return art, f"{spec.label}: {art.kind} {verb}, no rebuild ({how}, {dt:.1f}s) {verdict.line()}"


def _same_layout(old: nn.Module, new: nn.Module, family: str) -> None:
    if source_fingerprint(old, family) != source_fingerprint(new, family):
        a, b = old.state_dict(), new.state_dict()
        diff = sorted(set(a) ^ set(b))[:3] or [k for k in a if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype][:3]
        raise ValueError(f"new weights do not fit the compiled graph (config or parameter names/shapes/dtypes "
                         f"differ, e.g. {diff}); compile the new model instead")


# ----------------------------------------------------------------------------------------------
# Denoiser
# ----------------------------------------------------------------------------------------------

def _cast_copy(module: nn.Module, dtype: Optional[torch.dtype], keep_fp32=None) -> nn.Module:
    """The module in `dtype` (a copy; fp32 islands kept) -- precision is set by casting before export."""
    if dtype is None or all(p.dtype == dtype for p in module.parameters()):
        return module
    new = copy.deepcopy(module)
    for name, p in new.named_parameters():
        if p.is_floating_point() and not (keep_fp32 and keep_fp32(name)):
            p.data = p.data.to(dtype)
    return new


def dit_shapes(dit, profile: ex.Profile) -> tuple[list, list]:
    """((min, opt, max) shape per graph input, dtypes) for TensorRT's Input objects."""
    cfg = dit.config
    cdt = dit.patch_embedding.weight.dtype

    def at(k):
        b, f, h, w, n = (getattr(getattr(profile, a), k) for a in ("batch", "frames", "height", "width", "text"))
        return [(b, cfg.in_dim, f, h, w), (b,), (b, n + 1, cfg.text_dim), (1, 1, 1, n + 1)]
    lo, opt, hi = at("min"), at("opt"), at("max")
    return list(zip(lo, opt, hi)), [cdt, torch.float32, cdt, torch.float32]


class CompiledWanDiT(nn.Module):
    """Drop-in for a `WanDiT` as `Denoiser.module`: forward(x, timestep, context) -> velocity.

    `update_weights(new)` gives the compiled graph the weights of another model of the same architecture
    (a LoRA-patched clone, another checkpoint of the same shape) without rebuilding anything."""

    def __init__(self, dit: nn.Module, call: ProfiledCall, spec: Optional[GraphSpec] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dit = dit
        self.config = dit.config
        self._call = call
        self._spec = spec
        self._dtype = dtype
        self.weight_updates: list[str] = []

    def forward(self, x, timestep, context=None):
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        sizes = {"batch": b, "frames": x.shape[2], "height": x.shape[3], "width": x.shape[4],
                 "text": 0 if context is None else context.shape[1]}

        def compiled_args():
            ctx, bias = ex.prepare_text(self.dit, context, b)
            return x.to(self.dit.patch_embedding.weight.dtype), t, ctx, bias
        out = self._call(sizes, compiled_args, (x, t, context))
        return out.to(x.dtype)

    def update_weights(self, new) -> str:
        """Swap in the weights of `new` (a Wan DiT module or a `Denoiser` holding one) -- no rebuild: aoti reloads
        the package constants, inductor re-points the compiled module's parameters, tensorrt refits. Verified
        against eager with the new weights; returns the status line (also in `weight_updates`)."""
        new = getattr(new, "module", new) if not isinstance(new, nn.Module) else new
        if isinstance(new, CompiledWanDiT):
            new = new.dit
        if not isinstance(new, nn.Module):
            raise TypeError(f"update_weights needs a Wan DiT module or a Denoiser holding one, got {type(new).__name__} "
                            f"(for a state dict: load it into a module of the same architecture first)")
        from ..models.wan_dit import keep_fp32

        new = _cast_copy(new, self._dtype, keep_fp32)
        _same_layout(self.dit, new, "wan_dit")
        if self._spec is None:  # eager: nothing was compiled
            line = f"{self._call.label}: eager, new weights used as they are"
        else:
            graph = ex.dit_graph(new, self._call.profile)
            self._call.compiled, line = swap_weights(self._call.compiled, self._spec, graph)
        self.dit = new
        self._call.eager = new
        self.weight_updates.append(line)
        log_once(logger, ("twinflow.compiled.swap", line), "%s", line)
        return line


def compile_denoiser(denoiser, profile: ex.Profile, backend: str = "auto", *, dtype: Optional[torch.dtype] = None,
                     cache: Optional[ArtifactCache] = None, options: Optional[dict] = None, aot: bool = True):
    """(new Denoiser whose module runs compiled inside `profile`, CompileReport).

    inductor: `aot=True` (default) builds a weight-free AOTInductor package (a cache hit loads it without
    exporting or tracing anything); `aot=False` is JIT `torch.compile` of the exported module."""
    label = f"denoiser {denoiser.name or denoiser.family}"
    dit = denoiser.module
    if denoiser.family != "wan_dit" or not hasattr(getattr(dit, "config", None), "rope_dims"):
        report = CompileReport(label, backend, "eager", f"family {denoiser.family!r} has no export path yet (Wan DiT "
                               f"only); running eager")
        return denoiser.clone(info={**denoiser.info, "compile": report.line()}), report
    from ..models.wan_dit import keep_fp32

    dit = _cast_copy(dit, dtype, keep_fp32)
    run, reason = backends.resolve_backend(backend, dit.patch_embedding.weight.device)
    cdt = dit.patch_embedding.weight.dtype
    quant = (denoiser.info or {}).get("quant")
    key, parts = artifact_key(dit, "wan_dit", profile, run, options, str(quant) if quant else None,
                              "dit" if aot else "dit-jit")
    fn, spec = None, None
    if run != "eager":
        graph = ex.dit_graph(dit, profile)
        shapes, dtypes = dit_shapes(dit, profile)
        spec = GraphSpec(label, graph, lambda g: ex.export_dit(g.dit, profile, graph=g)[0],
                         example_opt=ex.dit_example_inputs(dit, profile, opt=True),
                         example_trace=ex.dit_example_inputs(dit, profile), shapes=shapes, dtypes=dtypes, dtype=cdt)
        fn, report = compile_graph(spec, requested=backend, backend=run, reason=reason, key=key, parts=parts,
                                   cache=cache, options=options, aot=aot)
    else:
        report = CompileReport(label, backend, "eager", reason)
    call = ProfiledCall(fn, dit, profile, label)
    report.details["calls"] = call.calls
    wrapped = CompiledWanDiT(dit, call, spec if fn is not None else None, dtype)
    log_once(logger, ("twinflow.compiled.report", report.line()), "%s", report.line())
    return denoiser.clone(module=wrapped, info={**denoiser.info, "compile": report.line()}), report


# ----------------------------------------------------------------------------------------------
# VAE decode
# ----------------------------------------------------------------------------------------------

def _take_modules(dst: nn.Module, src: nn.Module) -> None:
    """Give `dst` its own copies of `src`'s submodule/parameter/buffer dicts (the same tensors)."""
    for attr in ("_modules", "_parameters", "_buffers"):
        dst.__dict__[attr] = dict(src.__dict__[attr])


def compile_vae(vae, profile: ex.Profile, backend: str = "auto", *, cache: Optional[ArtifactCache] = None,
                options: Optional[dict] = None, aot: bool = True):
    """(a copy of `vae` whose untiled decode runs the compiled first/rest steps inside `profile`, reports).

    The copy has `update_weights(new_vae)`: another Wan VAE of the same architecture, no rebuild."""
    label = "vae decode"
    run, reason = backends.resolve_backend(backend, vae.device)
    fns, specs, reports = {}, {}, []
    for first in (True, False):
        part = "vae-decode-first" if first else "vae-decode-rest"
        key, parts = artifact_key(vae, "wan_vae", profile, run, options, None, part if aot else part + "-jit")
        step_label = f"{label} ({'first' if first else 'rest'})"
        if run == "eager":
            reports.append(CompileReport(step_label, backend, "eager", reason))
            fns[first] = None
            continue
        step = ex.WanVAEDecodeStep(vae, first).eval()
        sizes = {k: (getattr(profile, a).min, getattr(profile, a).opt, getattr(profile, a).max)
                 for k, a in (("b", "batch"), ("h", "height"), ("w", "width"))}

        def shape_at(i, first=first, step=step):
            b, h, w = sizes["b"][i], sizes["h"][i], sizes["w"][i]
            return [(b, vae.cfg.z_dim, h, w)] + ([] if first else step.cache_shapes(b, h, w))
        shapes = list(zip(shape_at(0), shape_at(1), shape_at(2)))
        spec = GraphSpec(step_label, step,
                         lambda st, first=first: ex.export_vae_decode_step(st.vae, profile, first, step=st)[0],
                         example_opt=ex.vae_decode_example(step, profile, opt=True),
                         example_trace=ex.vae_decode_example(step, profile), shapes=shapes,
                         dtypes=[vae.dtype] * len(shapes), dtype=vae.dtype)
        fns[first], rep = compile_graph(spec, requested=backend, backend=run, reason=reason, key=key, parts=parts,
                                        cache=cache, options=options, aot=aot)
        specs[first] = spec
        reports.append(rep)
    new = copy.copy(vae)
    _take_modules(new, vae)  # copy.copy shares these dicts with `vae`
    call = {"compiled": 0, "eager": 0}
    state = {"vae": vae}

    def iter_decode(self, z):
        cur = state["vae"]
        b, _, t, h, w = z.shape
        why = profile.outside(batch=b, height=h, width=w)
        if fns.get(True) is None or fns.get(False) is None or why:
            if why:
                log_once(logger, ("twinflow.compiled.outside", label, why),
                         "%s: %s; decoding eager (widen the profile to compile it)", label, why)
            call["eager"] += 1
            yield from cur.iter_decode(z)
            return
        call["compiled"] += 1
        z = z.to(device=cur.device, dtype=cur.dtype)
        n = 0
        with torch.no_grad(), Progress(total=t, desc="Wan VAE decode (compiled)") as bar:
            out = fns[True](z[:, :, 0])
            for i in range(t):
                if i > 0:
                    out = fns[False](z[:, :, i], *cache_)
                frames, cache_ = out[0], tuple(out[1:])
                for j in range(frames.shape[2]):
                    yield n, frames[:, :, j]
                    n += 1
                bar.update(1)

    def update_weights(self, new_vae) -> str:
        """Swap in another Wan VAE's weights (same architecture) without rebuilding; returns the status."""
        if not isinstance(new_vae, nn.Module) or not hasattr(new_vae, "decoder"):
            raise TypeError(f"update_weights needs a Wan VAE module, got {type(new_vae).__name__}")
        _same_layout(state["vae"], new_vae, "wan_vae")
        lines = []
        for first in (True, False):
            if first in specs:
                fns[first], line = swap_weights(fns[first], specs[first], ex.WanVAEDecodeStep(new_vae, first).eval())
            else:
                line = f"{label}: eager, new weights used as they are"
            lines.append(line)
        _take_modules(self, new_vae)
        state["vae"] = new_vae
        line = " | ".join(lines)
        self.weight_updates.append(line)
        log_once(logger, ("twinflow.compiled.swap", line), "%s", line)
        return line

    new.iter_decode = types.MethodType(iter_decode, new)
    new.update_weights = types.MethodType(update_weights, new)
    new.weight_updates = []
    new.compile_calls = call
    new.compile_report = " | ".join(r.line() for r in reports)
    log_once(logger, ("twinflow.compiled.report", new.compile_report), "%s", new.compile_report)
    return new, reports
