"""Compile path on the CPU: export with dynamic dims, VAE chunk steps, inductor parity without
recompiles, out-of-profile fallback, cache hit, ONNX parity, the workflow plan and the nodes.

Oracles: the eager `WanDiT.forward` / `WanVAE.decode` (themselves checked against diffusers in
test_wan_dit.py / test_wan_vae.py) and onnxruntime. One inductor build in the whole file."""
import pytest
import torch

from twinflow.compiled import export as ex
from twinflow.compiled.cache import ArtifactCache
from twinflow.core.handles import Denoiser
from twinflow.models.wan_dit import get_config, random_wan_dit, with_config
from twinflow.models.wan_vae import random_wan_vae

PROFILE = ex.Profile.make(batch=(1, 1, 2), frames=(1, 2, 4), height=(4, 6, 8), width=(4, 8, 8), text=(1, 5, 16))


@pytest.fixture(scope="module")
def dit():
    return random_wan_dit(config=with_config(get_config("tiny"), num_layers=1), seed=3)


@pytest.fixture(scope="module")
def exported(dit):
    return ex.export_dit(dit, PROFILE)


def _ranges(ep):
    return sorted((int(v.lower), int(v.upper)) for v in ep.range_constraints.values())


def test_export_records_profile_ranges(exported):
    ep, _ = exported
    ranges = _ranges(ep)
    # batch [1,2], frames [1,4], patchified height/width [2,4] (derived 2*h), text+pad [2,17]
    for r in ((1, 2), (1, 4), (2, 4), (2, 17)):
        assert r in ranges, (r, ranges)
    # the derived dims: the exported x has height 2*s, width 2*s
    x_meta = [n for n in ep.graph.nodes if n.op == "placeholder"][-4].meta["val"]
    assert "2*" in str(x_meta.shape[3]) and "2*" in str(x_meta.shape[4])


@pytest.mark.parametrize("shape,n_text", [((1, 16, 1, 4, 4), 1), ((2, 16, 3, 8, 6), 9), ((1, 16, 4, 6, 8), 16)])
def test_exported_dit_matches_eager(dit, exported, shape, n_text):
    ep, _ = exported
    g = torch.Generator().manual_seed(sum(shape))
    x, c = torch.randn(*shape, generator=g), torch.randn(1, n_text, 4096, generator=g)
    t = torch.linspace(800, 200, shape[0])
    ref = dit(x, t, c)
    ctx, bias = ex.prepare_text(dit, c, shape[0])
    out = ep.module()(x, t, ctx, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_exported_dit_refuses_out_of_profile(exported, dit):
    ep, _ = exported
    x = torch.randn(1, 16, 6, 4, 4)  # 6 frames > max 4
    ctx, bias = ex.prepare_text(dit, torch.randn(1, 3, 4096), 1)
    with pytest.raises(Exception):
        ep.module()(x, torch.tensor([500.0]), ctx, bias)


def test_no_padding_token_gets_minus_inf(dit):
    ctx, bias = ex.prepare_text(dit, torch.randn(1, dit.config.text_len, 4096), 1)
    assert ctx.shape[1] == dit.config.text_len + 1 and bias[0, 0, 0, -1] == float("-inf")


def test_vae_decode_steps_match_streaming_decode():
    vae = random_wan_vae("tiny", seed=1)
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(z)
    first, rest = ex.WanVAEDecodeStep(vae, True), ex.WanVAEDecodeStep(vae, False)
    ep_first, _ = ex.export_vae_decode_step(vae, ex.Profile.make(batch=(1, 1, 2), height=(2, 4, 8),
                                                                 width=(2, 6, 8)), first=True)
    assert (2, 8) in _ranges(ep_first)
    with torch.no_grad():
        out = ep_first.module()(z[:, :, 0])
        frames, cache = [out[0]], out[1:]
        assert len(cache) == 2 * len(first.geometry)
        for i in (1, 2):
            out = rest(z[:, :, i], *cache)
            frames.append(out[0])
            cache = out[1:]
    video = torch.cat(frames, dim=2)
    assert video.shape == ref.shape
    torch.testing.assert_close(video, ref, rtol=1e-5, atol=1e-5)


def _close_to_eager(new, dit, shape, n_text, t=600.0):
    g = torch.Generator().manual_seed(sum(shape) + n_text)
    x, c = torch.randn(*shape, generator=g), torch.randn(1, n_text, 4096, generator=g)
    tt = torch.full((shape[0],), t)
    torch.testing.assert_close(new.module(x, tt, c), dit(x, tt, c), rtol=1e-4, atol=1e-4)


def test_aoti_default_batch_1_and_2_one_build_warm_hit_without_export_weight_swap(dit, tmp_path, caplog,
                                                                                   monkeypatch):
    """The default inductor path (weight-free AOTInductor package): one build serves batch 1, 2 and 3 and one
    latent frame (no 0/1 specialisation: nothing re-traces); a cache hit loads without exporting; new
    weights are swapped in without a build; a cached package that does not load is rebuilt."""
    from twinflow.compiled import backends, runtime
    from twinflow.compiled.runtime import compile_denoiser

    builds = []
    real_build = backends.build_aoti_package
    monkeypatch.setattr(backends, "build_aoti_package", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    den = Denoiser(dit, "wan_dit", 16, 4096, name="tiny1")
    cache = ArtifactCache(tmp_path)
    new, report = compile_denoiser(den, PROFILE, "inductor", cache=cache)
    assert report.backend == "inductor" and report.cache == "miss" and report.verdict.ok, report.line()
    assert new.module is not dit and den.module is dit  # the input handle is untouched
    for shape, n in (((1, 16, 1, 4, 4), 1), ((2, 16, 3, 8, 6), 9), ((1, 16, 4, 6, 8), 16), ((2, 16, 2, 4, 8), 3)):
        _close_to_eager(new, dit, shape, n)
    # a strided latent (a slice) and a 0-d timestep (expanded to the batch): the package needs dense inputs
    big, c = torch.randn(2, 16, 6, 8, 6), torch.randn(1, 4, 4096)
    torch.testing.assert_close(new.module(big[:, :, ::2], torch.tensor(450.0), c),
                               dit(big[:, :, ::2], torch.tensor(450.0), c), rtol=1e-4, atol=1e-4)
    assert report.details["calls"] == {"compiled": 5, "eager": 0} and len(builds) == 1
    with caplog.at_level("INFO"):
        x = torch.randn(1, 16, 6, 4, 4)  # frames outside the profile: eager, one line, no crash
        torch.testing.assert_close(new.module(x, torch.tensor([300.0]), None), dit(x, torch.tensor([300.0]), None))
    assert "frames 6 is outside the compiled profile [1, 4]" in caplog.text
    assert report.details["calls"]["eager"] == 1

    # warm: the key needs no export, and a hit exports nothing
    def no_export(*a, **k):
        raise AssertionError("a cache hit must not export")
    monkeypatch.setattr(ex, "export_dit", no_export)
    again, report2 = compile_denoiser(den, PROFILE, "inductor", cache=cache)
    assert report2.cache == "hit" and report2.key == report.key and report2.verdict.ok and report2.export_s == 0.0
    assert "no rebuild: cached package loaded with this model's weights" in report2.line()
    assert len(builds) == 1

    # new weights (another checkpoint of the same shape): swapped into the loaded package, no build
    dit2 = random_wan_dit(config=dit.config, seed=11)
    line = again.module.update_weights(dit2)
    assert "weights swapped, no rebuild" in line and "verified" in line, line
    _close_to_eager(again, dit2, (2, 16, 3, 8, 6), 9)
    _close_to_eager(again, dit2, (1, 16, 1, 4, 4), 1)
    assert len(builds) == 1
    x = torch.randn(1, 16, 6, 4, 4)  # the eager fallback uses the new weights too
    torch.testing.assert_close(again.module(x, torch.tensor([300.0]), None), dit2(x, torch.tensor([300.0]), None))
    with pytest.raises(ValueError, match="do not fit the compiled graph"):
        again.module.update_weights(random_wan_dit(config=with_config(dit.config, num_layers=2)))
    with pytest.raises(TypeError, match="update_weights needs a Wan DiT"):
        again.module.update_weights({"blocks.0.q.weight": torch.zeros(1)})  # a state dict, not a module

    # a cached package that does not load (e.g. other constants) is removed and rebuilt, then verified
    monkeypatch.undo()
    real_load = backends.load_aoti
    fails = []

    def load_once_broken(path, state):
        if not fails:
            fails.append(1)
            raise ValueError("AOTInductor package needs constants that were not given")
        return real_load(path, state)
    monkeypatch.setattr(backends, "load_aoti", load_once_broken)
    with caplog.at_level("WARNING"):
        _, report3 = compile_denoiser(den, PROFILE, "inductor", cache=cache)
    assert fails and report3.cache == "miss" and report3.verdict.ok and "does not load" in caplog.text


def test_inductor_jit_no_recompile_fallback_cache_hit_and_weight_swap(dit, tmp_path, monkeypatch):
    from twinflow.compiled import backends
    from twinflow.compiled.runtime import compile_denoiser

    monkeypatch.setattr(backends, "_USER_INDUCTOR_DIR", True)  # leave this process's Inductor cache dir alone
    den = Denoiser(dit, "wan_dit", 16, 4096, name="tiny1")
    cache = ArtifactCache(tmp_path)
    stats = torch._dynamo.utils.counters["stats"]  # dynamo's count of graphs it compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        # opt sizes >= 2: dynamo specialises size-1 axes (see backends.build_inductor)
        prof = ex.Profile.make(batch=(1, 2, 3), frames=(2, 2, 4), height=(4, 6, 8), width=(4, 8, 8), text=(1, 5, 16))
        new, report = compile_denoiser(den, prof, "inductor", cache=cache, aot=False)
        assert report.backend == "inductor" and report.cache == "miss" and report.verdict.ok, report.line()
        for shape, n in (((3, 16, 2, 4, 4), 3), ((2, 16, 3, 8, 6), 7)):  # two shapes, no recompile
            _close_to_eager(new, dit, shape, n)
        assert report.details["calls"] == {"compiled": 2, "eager": 0}
        graphs = stats["unique_graphs"]
        assert graphs >= 1
        # new weights: the compiled module reads them as inputs -- nothing recompiles (error_on_recompile)
        dit2 = random_wan_dit(config=dit.config, seed=12)
        line = new.module.update_weights(dit2)
        assert "inductor weights swapped, no rebuild" in line and "verified" in line, line
        _close_to_eager(new, dit2, (2, 16, 3, 8, 6), 7)
        _close_to_eager(new, dit2, (3, 16, 2, 4, 4), 3)
        assert stats["unique_graphs"] == graphs
        assert all(not torch.equal(a, b) for a, b in zip(dit.parameters(), dit2.parameters()))  # dit untouched
        _close_to_eager(Denoiser(dit, "wan_dit", 16, 4096), dit, (2, 16, 3, 8, 6), 7)
    assert len(cache.entries()) == 1
    # same model layout, profile and backend: the cached artifact is used (Inductor's saved caches)
    again, report2 = compile_denoiser(den, prof, "inductor", cache=cache, aot=False)
    assert report2.cache == "hit" and report2.key == report.key and report2.verdict.ok
    # another profile is another artifact; the JIT and AOT artifacts have different keys
    from twinflow.compiled.runtime import artifact_key
    other = ex.Profile.make(batch=(1, 2, 4), frames=(2, 2, 4), height=(4, 6, 8), width=(4, 8, 8), text=(1, 5, 16))
    assert artifact_key(dit, "wan_dit", other, "inductor", None, None, "dit-jit")[0] != report.key
    assert artifact_key(dit, "wan_dit", prof, "inductor", None, None, "dit")[0] != report.key


def test_onnx_parity(dit, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from twinflow.compiled import onnx as tf_onnx

    path = tmp_path / "dit.onnx"
    tf_onnx.export_dit_onnx(dit, PROFILE, path)
    assert onnx.load(str(path)).opset_import[0].version >= 17
    graph = ex.WanDiTGraph(dit, (4, 8, 8))
    ctx, bias = ex.prepare_text(dit, torch.randn(1, 11, 4096), 1)
    err = tf_onnx.check_onnxruntime(path, graph, (torch.randn(1, 16, 3, 4, 8), torch.tensor([250.0]), ctx, bias))
    assert err <= 1e-4


# ------------------------------------------------------------------------------------------------
# plan and nodes
# ------------------------------------------------------------------------------------------------

def _prompt(compile_backend=None, cfg=1.0):
    import twinflow

    names = twinflow.NODE_CLASS_MAPPINGS
    for n in ("TwinFlowLoadDiT", "TwinFlowLoadVAE", "TwinFlowEmptyLatentVideo", "TwinFlowSampler",
              "TwinFlowDualBranchSampler", "TwinFlowVAEDecode", "TwinFlowCompileModel", "TwinFlowGateSchedule"):
        assert n in names, n
    p = {
        "1": {"class_type": "TwinFlowLoadDiT", "inputs": {"ckpt_name": "random:tiny", "dtype": "default",
                                                          "preset": "auto", "seed": 0}},
        "2": {"class_type": "TwinFlowEmptyLatentVideo", "inputs": {"width": 64, "height": 48, "length": 9,
                                                                   "batch_size": 1}},
        "4": {"class_type": "TwinFlowSampler", "inputs": {"model": ["1", 0], "latent": ["2", 0], "seed": 0,
                                                          "steps": 2, "cfg": cfg, "sampler": "euler",
                                                          "scheduler": "simple", "shift": 5.0, "denoise": 1.0,
                                                          "positive": ["8", 0], "negative": ["8", 0]}},
        "5": {"class_type": "TwinFlowLoadVAE", "inputs": {"vae_name": "random:tiny", "dtype": "default", "seed": 0}},
        "6": {"class_type": "TwinFlowVAEDecode", "inputs": {"vae": ["5", 0], "samples": ["4", 0], "tiling": "off",
                                                           "tile_size": 512, "overlap": 64}},
        "8": {"class_type": "TwinFlowTextEmbeddings", "inputs": {}},
    }
    if compile_backend:
        p["3"] = {"class_type": "TwinFlowCompileModel", "inputs": {"model": ["1", 0], "backend": compile_backend,
                                                                   "profile": "from workflow", "dtype": "default"}}
        p["4"]["inputs"]["model"] = ["3", 0]
    return p


def test_plan_shapes_backends_and_cache(tmp_path):
    from twinflow.runner.plan import format_plan, plan_workflow

    plan = plan_workflow(_prompt("inductor", cfg=4.0), cache=ArtifactCache(tmp_path))
    den = [p for p in plan if p["kind"] == "denoiser"][0]
    # Empty Latent 64x48, 9 frames -> latent (1, 16, 3, 6, 8); CFG 4 -> batch 1 and 2
    assert den["shapes"] == [(1, 16, 3, 6, 8), (2, 16, 3, 6, 8)]
    assert den["profile"]["batch"] == [1, 1, 2] and den["profile"]["frames"] == [3, 3, 3]
    assert den["backend"] == "inductor" and den["cache"] == "miss" and den["build_s"] > 0
    assert den["compile_node"] == "3" and den["used_by"] == ["4"]
    vae = [p for p in plan if p["kind"] == "vae_decode"][0]
    assert vae["backend"] == "eager" and vae["profile"]["height"] == [6, 6, 6]
    assert "denoiser of node 1" in format_plan(plan)
    # dual-branch: two denoisers, each with its own shapes
    p = _prompt()
    p["4"] = {"class_type": "TwinFlowDualBranchSampler", "inputs": {
        "semantic": ["1", 0], "detail": ["9", 0], "gate": ["10", 0], "latent": ["2", 0], "seed": 0, "steps": 2,
        "cfg_semantic": 1.0, "cfg_detail": 1.0, "sampler": "euler", "scheduler": "simple", "shift": 5.0,
        "denoise": 1.0, "split": "HW"}}
    p["9"] = {**p["1"]}
    plan = plan_workflow(p, backend="inductor")
    assert sorted(x["model_node"] for x in plan if x["kind"] == "denoiser") == ["1", "9"]


def test_compile_model_node_eager_status_and_vae_node():
    from twinflow.nodes.compile import TwinFlowCompileModel, TwinFlowCompileVAE

    dit = random_wan_dit("tiny")
    den = Denoiser(dit, "wan_dit", 16, 4096, name="tiny")
    latent = {"samples": torch.zeros(1, 16, 2, 4, 4)}
    node = TwinFlowCompileModel()
    out = node.compile(den, "eager", "from workflow", "default", latent=latent)
    new, status = out["result"]
    assert out["ui"]["text"] == [status]  # the status also shows in ComfyUI
    assert "eager" in status and new is not den and new.module.dit is dit
    x = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(new.module(x, torch.tensor([500.0]), None), dit(x, torch.tensor([500.0]), None))
    with pytest.raises(ValueError, match="latent"):
        node.compile(den, "eager", "from workflow", "default")
    vae = random_wan_vae("tiny")
    out = TwinFlowCompileVAE().compile(vae, "eager", "from workflow", latent=latent)
    new_vae, status = out["result"]
    assert "eager" in status and new_vae is not vae
    torch.testing.assert_close(new_vae.decode(latent["samples"]), vae.decode(latent["samples"]))


def test_vae_encode_chunks_match_encode_and_rest_step_exports():
    vae = random_wan_vae("tiny", seed=2)
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = vae.encode(video)
    first = ex.WanVAEEncodeStep(vae, True)
    ep_rest, rest = ex.export_vae_encode_step(vae, ex.Profile.make(batch=(1, 1, 2), height=(2, 4, 8),
                                                                   width=(2, 6, 8)), first=False)
    with torch.no_grad():
        out = first(video[:, :, :1])
        mus, cache = [out[0]], out[1:]
        for i in range(2):  # official chunking: 1 frame, then 4 frames per latent frame
            out = ep_rest.module()(video[:, :, 1 + 4 * i:5 + 4 * i], *cache)
            mus.append(out[0])
            cache = out[1:]
    torch.testing.assert_close(torch.stack(mus, dim=2), ref, rtol=1e-5, atol=1e-5)


def test_run_compile_inserts_valid_compile_nodes():
    from twinflow.runner.plan import plan_workflow, with_compile_nodes
    from twinflow.runner.validate import validate_prompt
    import twinflow

    p = _prompt(cfg=1.0)
    p.pop("8")
    for k in ("positive", "negative"):
        p["4"]["inputs"].pop(k)
    p["7"] = {"class_type": "TwinFlowSaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "t"}}
    new = with_compile_nodes(p, "eager")
    assert new["4"]["inputs"]["model"][0].startswith("twinflow_compile_")
    assert new["6"]["inputs"]["vae"][0].startswith("twinflow_compile_")
    assert p["4"]["inputs"]["model"] == ["1", 0]  # the input prompt is untouched
    validate_prompt(new, twinflow.NODE_CLASS_MAPPINGS, None)
    plan = plan_workflow(new)
    assert all(x["compile_node"] is not None for x in plan)
    den = [x for x in plan if x["kind"] == "denoiser"][0]
    assert den["profile"]["frames"] == [3, 3, 3] and den["profile"]["height"] == [6, 6, 6]

