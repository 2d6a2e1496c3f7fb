"""Compile artifact cache: key parts, corruption, concurrent builders, LRU; probe messages; TensorRT
contract through a recording stand-in for the torch_tensorrt module (no TensorRT here)."""
import json
import multiprocessing as mp
import sys
import types
from pathlib import Path

import pytest
import torch

from twinflow.compiled import backends, probe
from twinflow.compiled.cache import ArtifactCache, cache_key
from twinflow.compiled.export import Profile

BASE = dict(graph="g1", dtypes=["torch.float32"], profile=Profile.make(batch=(1, 1, 2), frames=(1, 3, 5)),
            backend="inductor", options={"mode": "default"}, quant=None, kernels="auto:ops",
            env={"torch": "2.13.0", "cuda": None, "device": "cpu", "capability": None})


def test_cache_key_changes_with_every_part_and_only_then():
    k0, _ = cache_key(**BASE)
    assert cache_key(**BASE)[0] == k0
    assert cache_key(**{**BASE, "options": {"mode": "default"}})[0] == k0  # equal value, new dict
    changes = {
        "graph": "g2", "dtypes": ["torch.bfloat16"], "profile": Profile.make(batch=(1, 1, 3), frames=(1, 3, 5)),
        "backend": "tensorrt", "options": {"mode": "max-autotune"}, "quant": "int8-w8a8",
        "kernels": "torch:ops", "env": {**BASE["env"], "torch": "2.14.0"},
    }
    keys = {k0}
    for part, value in changes.items():
        k, _ = cache_key(**{**BASE, part: value})
        assert k not in keys, part
        keys.add(k)
    for env_part, value in (("cuda", "13.0"), ("device", "NVIDIA H100"), ("capability", [9, 0])):
        k, _ = cache_key(**{**BASE, "env": {**BASE["env"], env_part: value}})
        assert k not in keys, env_part
        keys.add(k)
    # weights only when baked in
    kw, parts = cache_key(**BASE, weights="abc")
    assert kw not in keys and parts["weights"] == "abc"


def _write(tmp: Path, text="artifact"):
    (tmp / "a.bin").write_text(text)
    return {"kind": "fake"}


def test_fingerprinted_sources_exist():
    """The cache key hashes these files; a renamed or split file left in the list would silently stop
    invalidating artifacts (the fingerprint hashes a placeholder for a missing file)."""
    from twinflow.compiled import runtime

    pkg = Path(runtime.__file__).resolve().parents[1]
    missing = [rel for rels in runtime.SOURCES.values() for rel in rels if not (pkg / rel).is_file()]
    assert not missing, f"compiled.runtime.SOURCES lists files that do not exist: {missing}"


def test_build_once_then_hit_and_corruption_rebuilds(tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(tmp):
        calls.append(1)
        return _write(tmp)
    e1 = cache.get_or_build("k1", build, {"backend": "fake"}, label="x")
    assert not e1.hit and len(calls) == 1
    e2 = cache.get_or_build("k1", build)
    assert e2.hit and len(calls) == 1
    (e2.path / "a.bin").write_text("artifacX")  # same size, different bytes
    with caplog.at_level("WARNING"):
        e3 = cache.get_or_build("k1", build)
    assert not e3.hit and len(calls) == 2 and "corrupt" in caplog.text
    assert (e3.path / "a.bin").read_text() == "artifact"
    # a failed build leaves nothing behind
    with pytest.raises(RuntimeError):
        cache.get_or_build("k2", lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not cache.contains("k2") and not list(tmp_path.glob(".tmp-*"))


def test_lru_eviction_and_clear(tmp_path):
    import time

    cache = ArtifactCache(tmp_path, max_bytes=25)
    for k in ("a", "b"):
        cache.get_or_build(k, lambda tmp: _write(tmp, "x" * 10))
        time.sleep(0.02)
    cache.lookup("a")  # a is now more recently used than b
    time.sleep(0.02)
    cache.get_or_build("c", lambda tmp: _write(tmp, "x" * 10))
    keys = {e["key"] for e in cache.entries()}
    assert keys == {"a", "c"}
    assert cache.clear() == 2 and cache.entries() == []


def _racer(root, out_dir, i):
    from twinflow.compiled.cache import ArtifactCache
    import time

    def build(tmp):
        (Path(out_dir) / f"built-{i}").write_text("1")
        time.sleep(0.5)  # hold the lock long enough for the other process to wait on it
        (tmp / "a.bin").write_text("same")
    e = ArtifactCache(root).get_or_build("race", build)
    (Path(out_dir) / f"hit-{i}").write_text(str(e.hit))


def test_two_processes_racing_build_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "c"), str(out), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(list(out.glob("built-*"))) == 1
    assert sorted(p.read_text() for p in out.glob("hit-*")) == ["False", "True"]


# ------------------------------------------------------------------------------------------------
# probe messages
# ------------------------------------------------------------------------------------------------

def test_probe_messages(monkeypatch):
    monkeypatch.setattr(probe, "package_version", lambda name: None)
    assert "torch_tensorrt not installed" in probe.tensorrt_unavailable(force=True)
    monkeypatch.setattr(probe, "package_version", lambda name: "2.11.0" if name == "torch-tensorrt" else None)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert "version mismatch" in probe.tensorrt_unavailable(force=True)
    monkeypatch.setattr(probe, "package_version", lambda name: "2.13.0" if name == "torch-tensorrt" else None)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA device" in probe.tensorrt_unavailable(force=True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe.ctypes.util, "find_library", lambda name: None)
    assert "libnvinfer not found" in probe.tensorrt_unavailable(force=True)
    monkeypatch.setattr(probe.ctypes.util, "find_library", lambda name: "libnvinfer.so.10")

    def failing_import(name):
        raise ImportError("libnvinfer.so.11: cannot open shared object file")
    assert "libnvinfer not found" in probe.tensorrt_unavailable(importer=failing_import, force=True)
    assert probe.tensorrt_unavailable(importer=lambda name: types.ModuleType(name), force=True) is None
    probe.reset()


def test_auto_backend_on_cpu_explains_tensorrt():
    run, why = backends.resolve_backend("tensorrt", torch.device("cpu"))
    assert run == "eager" and "tensorrt unavailable" in why
    with pytest.raises(ValueError, match="not one of"):
        backends.resolve_backend("xla", torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# TensorRT contract: a recording stand-in for the torch_tensorrt module, injected at the import boundary
# ------------------------------------------------------------------------------------------------

def recording_torch_tensorrt_standin(version):
    """A stand-in for `torch_tensorrt` (NOT the real library) that records every call it receives."""
    calls = []
    mod = types.ModuleType("torch_tensorrt")
    mod.__version__ = version

    class Input:
        def __init__(self, **kw):
            calls.append(("Input", kw))
            self.kw = kw

    def compile_(ep, **kw):
        calls.append(("dynamo.compile", kw))
        return "trt_gm"

    def refit(gm, new_ep, **kw):
        calls.append(("refit_module_weights", kw))
        return "refitted"
    mod.Input = Input
    mod.dynamo = types.SimpleNamespace(compile=compile_, refit_module_weights=refit)
    return mod, calls


SHAPES = [((1, 16, 1, 4, 4), (1, 16, 3, 6, 8), (2, 16, 5, 8, 8)), ((1,), (1,), (2,))]


@pytest.mark.parametrize("version", ["2.11.0", "2.14.0"])
def test_tensorrt_kwargs_per_version(monkeypatch, version):
    mod, calls = recording_torch_tensorrt_standin(version)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", mod)
    out = backends.compile_tensorrt("EP", SHAPES, [torch.bfloat16, torch.float32], torch.bfloat16)
    assert out == "trt_gm"
    inputs = [c[1] for c in calls if c[0] == "Input"]
    assert inputs[0] == {"min_shape": (1, 16, 1, 4, 4), "opt_shape": (1, 16, 3, 6, 8), "max_shape": (2, 16, 5, 8, 8),
                         "dtype": torch.bfloat16}
    kw = [c[1] for c in calls if c[0] == "dynamo.compile"][0]
    expected = {"arg_inputs", "truncate_double", "immutable_weights", "min_block_size", "require_full_compilation",
                "cache_built_engines", "reuse_cached_engines", "offload_module_to_cpu"}
    if version == "2.11.0":
        expected.add("use_explicit_typing")
        assert kw["use_explicit_typing"] is True
    assert set(kw) == expected
    assert "enabled_precisions" not in kw
    assert kw["truncate_double"] is True and kw["immutable_weights"] is False
    assert len(kw["arg_inputs"]) == 2
    assert backends.refit_tensorrt("trt_gm", "EP2") == "refitted"
    assert [c[1] for c in calls if c[0] == "refit_module_weights"] == [{"in_place": False}]


def test_tensorrt_kwargs_refusals():
    with pytest.raises(ValueError, match="removed in torch-tensorrt 2.14"):
        backends.trt_compile_kwargs("2.14.0", [], torch.bfloat16, {"enabled_precisions": {torch.half}})
    with pytest.raises(ValueError, match="unknown tensorrt options"):
        backends.trt_compile_kwargs("2.11.0", [], torch.float32, {"bogus": 1})
    kw = backends.trt_compile_kwargs("2.9.0", [], torch.float16)
    assert kw["enabled_precisions"] == {torch.float16} and "use_explicit_typing" not in kw
    with pytest.raises(Exception, match="too old"):
        backends.trt_compile_kwargs("2.5.0", [], torch.float32)


# ------------------------------------------------------------------------------------------------
# CLI: the runner's `plan` and `cache` commands (runner/cli.py)
# ------------------------------------------------------------------------------------------------

def test_cli_plan_and_cache(tmp_path, monkeypatch, capsys):
    from twinflow.runner.cli import main

    monkeypatch.setenv("TWINFLOW_CACHE_DIR", str(tmp_path / "cache"))
    prompt = {
        "1": {"class_type": "TwinFlowLoadDiT", "inputs": {"ckpt_name": "random:tiny", "dtype": "default",
                                                          "preset": "auto", "seed": 0}},
        "2": {"class_type": "TwinFlowEmptyLatentVideo", "inputs": {"width": 128, "height": 64, "length": 17,
                                                                   "batch_size": 1}},
        "3": {"class_type": "TwinFlowSampler", "inputs": {"model": ["1", 0], "latent": ["2", 0], "seed": 0, "steps": 2,
                                                          "cfg": 1.0, "sampler": "euler", "scheduler": "simple",
                                                          "shift": 5.0, "denoise": 1.0}},
    }
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(prompt))
    assert main(["plan", str(wf), "--backend", "inductor", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan[0]["shapes"] == [[1, 16, 5, 8, 16]] and plan[0]["backend"] == "inductor" and plan[0]["cache"] == "miss"
    ArtifactCache(tmp_path / "cache").get_or_build("k", lambda tmp: _write(tmp), {"backend": "inductor"}, label="x")
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "inductor" in out
    assert main(["cache", "clear"]) == 0 and "removed 1" in capsys.readouterr().out


def functional_torch_tensorrt_standin(version="2.11.0"):
    """A stand-in for `torch_tensorrt` (NOT the real library): records every call and "builds" an engine as the
    exported program's module with the weights it was given baked in (as TensorRT engines bake them), so the
    runtime's cache/refit logic can be checked end to end without TensorRT."""
    mod, calls = recording_torch_tensorrt_standin(version)
    saved = {}

    def compile_(ep, **kw):
        calls.append(("dynamo.compile", kw))
        return ep.module()

    def refit(gm, new_ep, **kw):
        calls.append(("refit_module_weights", kw))
        return new_ep.module()

    def save(gm, path, **kw):
        calls.append(("save", kw["output_format"]))
        Path(path).write_text(f"engine {len(saved)}")
        saved[Path(path).read_text()] = gm

    def load(path):
        gm = saved[Path(path).read_text()]
        return types.SimpleNamespace(module=lambda: gm)
    mod.dynamo = types.SimpleNamespace(compile=compile_, refit_module_weights=refit)
    mod.save, mod.load = save, load
    return mod, calls


def test_tensorrt_cache_hit_refits_and_update_weights_refits(monkeypatch, tmp_path):
    """TensorRT engines bake the weights: a cache hit from another model of the same shape, and
    `update_weights`, refit the engines instead of rebuilding (through the functional stand-in)."""
    from twinflow.compiled import runtime
    from twinflow.compiled.export import Profile
    from twinflow.core.handles import Denoiser
    from twinflow.models.wan_dit import get_config, random_wan_dit, with_config

    mod, calls = functional_torch_tensorrt_standin()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", mod)
    monkeypatch.setattr(backends, "resolve_backend", lambda req, dev: ("tensorrt", "stand-in for torch_tensorrt"))
    cfg = with_config(get_config("tiny"), num_layers=1)
    dits = [random_wan_dit(config=cfg, seed=s) for s in (1, 2, 3)]
    prof = Profile.make(batch=(1, 1, 2), frames=(1, 2, 3), height=(4, 4, 6), width=(4, 6, 6), text=(1, 4, 8))
    cache = ArtifactCache(tmp_path)
    x, t, c = torch.randn(2, 16, 3, 6, 4), torch.tensor([700.0, 300.0]), torch.randn(1, 5, 4096)

    new, rep = runtime.compile_denoiser(Denoiser(dits[0], "wan_dit", 16, 4096), prof, "tensorrt", cache=cache)
    assert rep.backend == "tensorrt" and rep.cache == "miss" and rep.verdict.ok, rep.line()
    torch.testing.assert_close(new.module(x, t, c), dits[0](x, t, c), rtol=1e-5, atol=1e-5)
    # same architecture, other weights: the cached engine is loaded and refit (its baked weights are dits[0]'s)
    new2, rep2 = runtime.compile_denoiser(Denoiser(dits[1], "wan_dit", 16, 4096), prof, "tensorrt", cache=cache)
    assert rep2.cache == "hit" and rep2.verdict.ok and "refit" in rep2.line(), rep2.line()
    torch.testing.assert_close(new2.module(x, t, c), dits[1](x, t, c), rtol=1e-5, atol=1e-5)
    line = new2.module.update_weights(dits[2])
    assert "tensorrt refit, no rebuild" in line and "verified" in line, line
    torch.testing.assert_close(new2.module(x, t, c), dits[2](x, t, c), rtol=1e-5, atol=1e-5)
    names = [k for k, _ in calls]
    assert names.count("dynamo.compile") == 1 and names.count("refit_module_weights") == 2
    assert [kw for k, kw in calls if k == "refit_module_weights"] == [{"in_place": False}] * 2


@pytest.mark.slow  # four exports of the tiny VAE decode steps: ~50 s of CPU
def test_vae_decode_through_standin_engines_and_refit(monkeypatch, tmp_path):
    """The compiled VAE decode chains the first/rest step engines with the causal cache and equals the eager
    decode; `update_weights` refits both engines (functional stand-in for torch_tensorrt, no TensorRT)."""
    from twinflow.compiled import runtime
    from twinflow.compiled.export import Profile
    from twinflow.models.wan_vae import random_wan_vae

    mod, calls = functional_torch_tensorrt_standin()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", mod)
    monkeypatch.setattr(backends, "resolve_backend", lambda req, dev: ("tensorrt", "stand-in for torch_tensorrt"))
    vae, vae2 = random_wan_vae("tiny", seed=1), random_wan_vae("tiny", seed=4)
    new, reports = runtime.compile_vae(vae, Profile.make(batch=(1, 1, 2), height=(2, 4, 4), width=(2, 6, 6)),
                                       "tensorrt", cache=ArtifactCache(tmp_path))
    assert all(r.backend == "tensorrt" and r.verdict.ok for r in reports), [r.line() for r in reports]
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(z)
    torch.testing.assert_close(new.decode(z), ref, rtol=1e-5, atol=1e-5)
    line = new.update_weights(vae2)
    assert line.count("tensorrt refit, no rebuild") == 2, line
    torch.testing.assert_close(new.decode(z), vae2.decode(z), rtol=1e-5, atol=1e-5)
    assert new.compile_calls == {"compiled": 2, "eager": 0}
    torch.testing.assert_close(vae.decode(z), ref)  # the input VAE is untouched
    names = [k for k, _ in calls]
    assert names.count("dynamo.compile") == 2 and names.count("refit_module_weights") == 2
