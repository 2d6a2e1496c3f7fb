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
    "wan_dit": ("models/wan_dit.py", "compiled/export.py", "kernels/ops.py", "kernels/norm.py", "kernels/rope.py"),
    "wan_vae": ("models/wan_vae.py", "compiled/export.py", "kernels/ops.py", "kernels/vae_norm.py"),
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
    from ..kernels import ops

    return f"{ops.get_mode()}:{','.join(ops.OPS)}"


def artifact_key(module, family: str, profile: ex.Profile, backend: str, options: Optional[dict],
                 quant: Optional[str], part: str) -> tuple[str, dict]:
    dtype = str(getattr(module, "dtype", None) or next(module.parameters()).dtype)
    return cache_key(graph=f"{source_fingerprint(module, family)}:{part}", dtypes=[dtype], profile=profile,
                     backend=backend, options=options, quant=quant, kernels=kernel_set())


# ----------------------------------------------------------------------------------------------
# One exported graph -> one backend callable (cached, verified)
# ----------------------------------------------------------------------------------------------

def _build_backend(ep, backend: str, report: CompileReport, cache: ArtifactCache, key: str, parts: dict,
                   example, shapes, dtypes, dtype, options: Optional[dict], aot: bool, module=None):
    """The compiled callable for `ep`; uses/creates the cache entry `key`."""
    opts = dict(options or {})
    if backend == "inductor" and aot:
        def build(tmp: Path):
            backends.build_aoti_package(ep, tmp / "model.pt2", opts)
            return {"kind": "aoti"}
        entry = cache.get_or_build(key, build, parts, label=report.label)
        return backends.load_aoti(entry.path / "model.pt2", backends.exported_state(ep)), entry
    if backend == "inductor":
        backends.use_inductor_cache_dir(cache.root / "inductor")
        fn = backends.build_inductor(ep, opts)

        def build(tmp: Path):
            with torch.no_grad():
                fn(*example)  # torch.compile builds on the first call
            backends.save_inductor_artifacts(tmp / "inductor_cache.bin")
            return {"kind": "inductor"}
        if cache.contains(key):
            entry = cache.lookup(key)
            if entry is not None and (entry.path / "inductor_cache.bin").is_file():
                backends.load_inductor_artifacts(entry.path / "inductor_cache.bin")
                with torch.no_grad():
                    fn(*example)
                return fn, entry
        entry = cache.get_or_build(key, build, parts, label=report.label)
        return fn, entry
    if backend == "tensorrt":
        holder = {}

        def build(tmp: Path):
            holder["gm"] = backends.compile_tensorrt(ep, shapes, dtypes, dtype, opts)
            backends.save_tensorrt(holder["gm"], tmp / "engine.ep", example)
            return {"kind": "tensorrt"}
        entry = cache.get_or_build(key, build, parts, label=report.label)
        gm = holder.get("gm") or backends.load_tensorrt(entry.path / "engine.ep")
        return gm, entry
    raise ValueError(f"unknown backend {backend!r}")


def compile_graph(ep, eager_fn, *, label: str, requested: str, backend: str, reason: str, key: str, parts: dict,
                  example_opt, example_trace, shapes, dtypes, dtype, cache: Optional[ArtifactCache],
                  options: Optional[dict] = None, aot: bool = False, export_s: float = 0.0):
    """(callable or None, report): None means eager runs, with the reason in the report."""
    report = CompileReport(label, requested, backend, reason, export_s=export_s, key=key)
    if backend == "eager":
        return None, report
    cache = cache or ArtifactCache()
    t0 = time.perf_counter()
    try:
        fn, entry = _build_backend(ep, backend, report, cache, key, parts, example_trace, shapes, dtypes, dtype,
                                   options, aot, module=eager_fn if isinstance(eager_fn, nn.Module) else None)
    except Exception as exc:  # a failed build must never take the workflow down: run eager and say why
        logger.warning("%s: %s build failed (%s: %s); running eager", label, backend, type(exc).__name__,
                       str(exc).splitlines()[0][:300] if str(exc) else "")
        report.backend, report.fell_back = "eager", True
        report.reason = f"{backend} build failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None, report
    report.build_s = time.perf_counter() - t0
    report.cache = "hit" if entry.hit else "miss"
    report.verdict = verify(fn, eager_fn, example_opt, dtype)
    if not report.verdict.ok:
        logger.warning("%s: %s artifact discarded, %s; running eager", label, backend, report.verdict.line())
        cache.remove(key)
        report.backend, report.fell_back = "eager", True
        report.reason = f"{backend} artifact discarded: {report.verdict.reason}"
        return None, report
    return fn, report


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
    """Drop-in for a `WanDiT` as `Denoiser.module`: forward(x, timestep, context) -> velocity."""

    def __init__(self, dit: nn.Module, call: ProfiledCall):
        super().__init__()
        self.dit = dit
        self.config = dit.config
        self._call = call

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


def compile_denoiser(denoiser, profile: ex.Profile, backend: str = "auto", *, dtype: Optional[torch.dtype] = None,
                     cache: Optional[ArtifactCache] = None, options: Optional[dict] = None, aot: bool = False):
    """(new Denoiser whose module runs compiled inside `profile`, CompileReport)."""
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
                              "dit-aoti" if aot else "dit")
    fn, export_s = None, 0.0
    if run != "eager":
        t0 = time.perf_counter()
        ep, _graph = ex.export_dit(dit, profile)
        export_s = time.perf_counter() - t0
        shapes, dtypes = dit_shapes(dit, profile)
        fn, report = compile_graph(ep, _graph, label=label, requested=backend, backend=run, reason=reason, key=key,
                                   parts=parts, example_opt=ex.dit_example_inputs(dit, profile, opt=True),
                                   example_trace=ex.dit_example_inputs(dit, profile), shapes=shapes, dtypes=dtypes,
                                   dtype=cdt, cache=cache, options=options, aot=aot, export_s=export_s)
    else:
        report = CompileReport(label, backend, "eager", reason)
    call = ProfiledCall(fn, dit, profile, label)
    report.details["calls"] = call.calls
    wrapped = CompiledWanDiT(dit, call)
    log_once(logger, ("twinflow.compiled.report", report.line()), "%s", report.line())
    return denoiser.clone(module=wrapped, info={**denoiser.info, "compile": report.line()}), report


# ----------------------------------------------------------------------------------------------
# VAE decode
# ----------------------------------------------------------------------------------------------

def compile_vae(vae, profile: ex.Profile, backend: str = "auto", *, cache: Optional[ArtifactCache] = None,
                options: Optional[dict] = None):
    """(a copy of `vae` whose untiled decode runs the compiled first/rest steps inside `profile`, report)."""
    label = "vae decode"
    run, reason = backends.resolve_backend(backend, vae.device)
    fns, reports = {}, []
    for first in (True, False):
        part = "vae-decode-first" if first else "vae-decode-rest"
        key, parts = artifact_key(vae, "wan_vae", profile, run, options, None, part)
        if run == "eager":
            reports.append(CompileReport(f"{label} ({'first' if first else 'rest'})", backend, "eager", reason))
            fns[first] = None
            continue
        t0 = time.perf_counter()
        ep, step = ex.export_vae_decode_step(vae, profile, first)
        export_s = time.perf_counter() - t0
        sizes = {k: (getattr(profile, a).min, getattr(profile, a).opt, getattr(profile, a).max)
                 for k, a in (("b", "batch"), ("h", "height"), ("w", "width"))}

        def shape_at(i, first=first, step=step):
            b, h, w = sizes["b"][i], sizes["h"][i], sizes["w"][i]
            return [(b, vae.cfg.z_dim, h, w)] + ([] if first else step.cache_shapes(b, h, w))
        shapes = list(zip(shape_at(0), shape_at(1), shape_at(2)))
        fn, rep = compile_graph(ep, step, label=f"{label} ({'first' if first else 'rest'})", requested=backend,
                                backend=run, reason=reason, key=key, parts=parts,
                                example_opt=ex.vae_decode_example(step, profile, opt=True),
                                example_trace=ex.vae_decode_example(step, profile), shapes=shapes,
                                dtypes=[vae.dtype] * len(shapes), dtype=vae.dtype, cache=cache, options=options,
                                export_s=export_s)
        fns[first] = fn
        reports.append(rep)
    new = copy.copy(vae)
    call = {"compiled": 0, "eager": 0}
    original = vae.iter_decode

    def iter_decode(self, z):
        b, _, t, h, w = z.shape
        why = profile.outside(batch=b, height=h, width=w)
        if fns.get(True) is None or fns.get(False) is None or why:
            if why:
                log_once(logger, ("twinflow.compiled.outside", label, why),
                         "%s: %s; decoding eager (widen the profile to compile it)", label, why)
            call["eager"] += 1
            yield from original(z)
            return
        call["compiled"] += 1
        z = z.to(device=vae.device, dtype=vae.dtype)
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

    new.iter_decode = types.MethodType(iter_decode, new)
    new.compile_calls = call
    new.compile_report = " | ".join(r.line() for r in reports)
    log_once(logger, ("twinflow.compiled.report", new.compile_report), "%s", new.compile_report)
    return new, reports
