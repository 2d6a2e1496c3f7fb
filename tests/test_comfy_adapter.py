"""comfy_adapter without ComfyUI: host wiring, core-object converters, the guider's step/fusion logic.

ComfyUI is replaced at the import boundary by minimal stand-ins named Fake*: `FakeFolderPaths` (the
`folder_paths` functions we call, with ComfyUI's add_model_folder_path semantics), `FakeProgressBar`
(`comfy.utils.ProgressBar`'s update API), and `FakeModelPatcher` whose `apply_model` is ComfyUI's flow-model
formula re-derived here (`CONST`: x0 = x - sigma * diffusion_model(x, sigma * 1000, context)). The real thing is
exercised by tests/test_comfyui_integration.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from twinflow import comfy_adapter
from twinflow.comfy_adapter import guider as G
from twinflow.comfy_adapter import models as M
from twinflow.comfy_adapter import nodes as N
from twinflow.core import paths, progress
from twinflow.core.errors import UnsupportedError


# ----------------------------------------------------------------------------------------------- stand-ins
class FakeFolderPaths:
    """The part of ComfyUI's `folder_paths` module the adapter uses."""

    def __init__(self, base: Path):
        self.models_dir = str(base / "models")
        self._out, self._in = str(base / "output"), str(base / "input")
        exts = {".safetensors", ".pth"}
        self.folder_names_and_paths = {
            "vae": ([str(base / "models" / "vae")], exts),
            "diffusion_models": ([str(base / "models" / "unet"), str(base / "models" / "diffusion_models")], exts),
        }

    def map_legacy(self, name):
        return {"unet": "diffusion_models", "clip": "text_encoders"}.get(name, name)

    def add_model_folder_path(self, name, path, is_default=False):
        name = self.map_legacy(name)
        if name in self.folder_names_and_paths:
            lst = self.folder_names_and_paths[name][0]
            if path not in lst:
                lst.insert(0, path) if is_default else lst.append(path)
        else:
            self.folder_names_and_paths[name] = ([path], set())

    def get_filename_list(self, name):
        dirs, exts = self.folder_names_and_paths[self.map_legacy(name)]
        out = []
        for d in dirs:
            for root, _, files in os.walk(d):
                for f in files:
                    if not exts or os.path.splitext(f)[1] in exts:
                        out.append(os.path.relpath(os.path.join(root, f), d))
        return sorted(out)

    def get_full_path(self, name, filename):
        for d in self.folder_names_and_paths[self.map_legacy(name)][0]:
            p = os.path.join(d, filename)
            if os.path.isfile(p):
                return p
        return None

    def get_output_directory(self):
        return self._out

    def get_input_directory(self):
        return self._in


class FakeProgressBar:
    made: list = []

    def __init__(self, total, node_id=None):
        self.total, self.node_id, self.current = total, node_id, 0
        FakeProgressBar.made.append(self)

    def update(self, value):
        self.current = min(self.total, self.current + value)


class CONST:
    """Stand-in named like ComfyUI's flow-matching model-sampling mixin (the adapter checks the MRO name)."""


class FakeFlowSampling(CONST):
    """ComfyUI's ModelSamplingDiscreteFlow as Wan2.1 sets it up: shift 8, timestep multiplier 1000."""
    shift = 8.0
    multiplier = 1000


class FakeEpsSampling:
    pass


class FakeBaseModel:
    """ComfyUI's BaseModel.apply_model for a CONST (flow) model, re-derived: xc = x; t = 1000*sigma;
    out = diffusion_model(xc, t, context).float(); x0 = x - out * sigma."""

    def __init__(self, dm, sampling):
        self.diffusion_model = dm
        self.model_sampling = sampling
        self.calls = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        self.calls.append(transformer_options)
        out = self.diffusion_model(x, t * 1000.0, c_crossattn).float()
        return x - out * t.reshape(-1, *([1] * (x.ndim - 1)))


class FakeModelPatcher:
    def __init__(self, dm, sampling=None):
        self.model = FakeBaseModel(dm, sampling or FakeFlowSampling())
        self.model_options = {"transformer_options": {"patches": {"p": 1}}}
        self.wrappers = {"apply_model": {"user": ["w1"]}}
        self.load_device = torch.device("cpu")

    def get_model_object(self, name):
        return getattr(self.model, name)


class FakeCoreVAE:
    """A core VAE stand-in: `first_stage_model` is a plain module holding the official-layout tensors."""

    def __init__(self, sd: dict):
        fsm = nn.Module()
        for k, v in sd.items():
            mod = fsm
            *parents, leaf = k.split(".")
            for p in parents:
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
            mod.register_parameter(leaf, nn.Parameter(v.clone(), requires_grad=False))
        self.first_stage_model = fsm


@pytest.fixture
def loads(monkeypatch):
    """Replace ComfyUI's load_models_gpu with a recorder."""
    seen = []
    monkeypatch.setattr(M, "load_patchers", lambda patchers, full=False: seen.append((list(patchers), full)))
    return seen


@pytest.fixture
def tiny_dit():
    from twinflow.models.wan_dit import random_wan_dit

    return random_wan_dit("tiny", seed=3)


# ------------------------------------------------------------------------------------------------ install
def test_is_comfyui_needs_both_host_modules(monkeypatch):
    assert not comfy_adapter.is_comfyui()  # this test process is not ComfyUI
    monkeypatch.setitem(sys.modules, "folder_paths", object())
    assert not comfy_adapter.is_comfyui()
    monkeypatch.setitem(sys.modules, "comfy.model_management", object())
    assert comfy_adapter.is_comfyui()


def test_importing_the_adapter_imports_no_comfyui():
    code = ("import sys, twinflow, twinflow.comfy_adapter.nodes, twinflow.comfy_adapter.models; "
            "bad = [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.') or m in "
            "('folder_paths', 'server', 'nodes')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_routes_paths_progress_and_interrupt(tmp_path):
    fp = FakeFolderPaths(tmp_path)
    (tmp_path / "models" / "unet").mkdir(parents=True)
    (tmp_path / "models" / "unet" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "diffusion_models" / "sub").mkdir(parents=True)
    (tmp_path / "models" / "diffusion_models" / "sub" / "b.safetensors").write_bytes(b"x")
    stop = {"now": False}

    def interrupt():
        if stop["now"]:
            raise KeyboardInterrupt("host interrupt")  # stands in for InterruptProcessingException

    FakeProgressBar.made.clear()
    try:
        info = comfy_adapter.install(fp, FakeProgressBar, interrupt)
        assert info["compile_cache"] == os.environ.get("TWINFLOW_CACHE_DIR", os.path.join(fp.models_dir, "twinflow",
                                                                                          "compile"))
        # our extra folders exist in folder_paths, first, with our extensions
        for name in comfy_adapter.EXTRA_FOLDERS:
            dirs, exts = fp.folder_names_and_paths[name]
            assert dirs[0] == os.path.join(fp.models_dir, name) and ".safetensors" in exts and ".json" in exts
        (Path(fp.models_dir) / "twinflow").mkdir()
        (Path(fp.models_dir) / "twinflow" / "gate.safetensors").write_bytes(b"x")
        (Path(fp.models_dir) / "twinflow" / "notes.txt").write_text("no")
        assert paths.list_models("diffusion_models") == ["a.safetensors", "sub/b.safetensors"]
        assert paths.list_models("twinflow") == ["gate.safetensors"]
        assert paths.find_model("diffusion_models", "sub/b.safetensors") == \
            tmp_path / "models" / "diffusion_models" / "sub" / "b.safetensors"
        with pytest.raises(FileNotFoundError):
            paths.find_model("vae", "missing.safetensors")
        assert paths.output_dir() == Path(fp.get_output_directory())

        with progress.Progress(total=3, desc="steps") as bar:
            bar.update(1)
            bar.update(2)
        assert FakeProgressBar.made[-1].total == 3 and FakeProgressBar.made[-1].current == 3
        stop["now"] = True
        with pytest.raises(KeyboardInterrupt):
            progress.check_interrupt()
    finally:
        comfy_adapter.uninstall()
    progress.check_interrupt()  # the host check is gone again
    assert progress._backend is None


# --------------------------------------------------------------------------------------------- converters
def test_as_denoiser_passes_ours_through(tiny_dit):
    from twinflow.models.wan_dit import make_denoiser as wan_denoiser

    d = wan_denoiser(tiny_dit, "x", "y")
    assert M.as_denoiser(d) is d and M.as_denoiser(d, need_module=True) is d
    with pytest.raises(TypeError, match="TWINFLOW_MODEL"):
        M.as_denoiser(object())


def test_wrapped_core_model_velocity_equals_the_module(tiny_dit, loads):
    patcher = FakeModelPatcher(tiny_dit)
    d = M.as_denoiser(patcher)
    assert d.family == "comfy" and d.in_channels == 16 and d.text_dim == tiny_dit.config.text_dim
    assert d.dtype == torch.float32 and d.timestep_scale == 1.0
    x = torch.randn(2, 16, 2, 4, 4)
    ctx = torch.randn(1, 7, tiny_dit.config.text_dim)
    for sigma in (0.9, 0.3, 0.02):
        v = d.velocity(x, torch.tensor(sigma), ctx)
        ref = tiny_dit(x, torch.full((2,), sigma * 1000.0), ctx)
        torch.testing.assert_close(v, ref, rtol=2e-4, atol=2e-4 / sigma ** 0.5)
    # the patcher was loaded through ComfyUI, and its wrappers travel with its transformer options
    assert loads and loads[0][0] == [patcher]
    opts = patcher.model.calls[-1]
    assert opts["patches"] == {"p": 1} and opts["wrappers"]["apply_model"]["user"] == ["w1"]


def test_wrapped_core_model_samples_like_our_module(tiny_dit, loads):
    """The whole sampling loop on the wrapped core model equals the loop on our module (uni_pc, 3 steps)."""
    from twinflow.models.wan_dit import make_denoiser as wan_denoiser
    from twinflow.sampling.dual import sample
    from twinflow.sampling.guidance import Branch

    ctx = [[torch.randn(1, 5, tiny_dit.config.text_dim), {}]]
    latent = {"samples": torch.zeros(1, 16, 1, 4, 4)}
    kw = dict(seed=5, steps=3, sampler="uni_pc", scheduler="simple", shift=8.0)
    ours, _ = sample(Branch(wan_denoiser(tiny_dit, "t", "t"), ctx, None, 1.0), latent, **kw)
    core, _ = sample(Branch(M.as_denoiser(FakeModelPatcher(tiny_dit)), ctx, None, 1.0), latent, **kw)
    torch.testing.assert_close(core["samples"], ours["samples"], rtol=1e-4, atol=1e-4)


def test_core_model_refusals(tiny_dit, loads):
    with pytest.raises(UnsupportedError, match="flow-matching"):
        M.as_denoiser(FakeModelPatcher(tiny_dit, FakeEpsSampling()))
    bad = FakeModelPatcher(nn.Linear(2, 2))
    with pytest.raises(UnsupportedError, match="not a Wan2.1"):
        M.as_denoiser(bad)


@pytest.mark.parametrize("key, value", [("sampler_pre_cfg_function", [lambda args: args["conds_out"]]),
                                        ("model_function_wrapper", lambda apply, args: apply(**args)),
                                        ("sampler_calc_cond_batch_function", lambda args: None),
                                        ("disable_cfg1_optimization", True)])
def test_core_patches_the_loop_cannot_apply_are_refused_by_name(tiny_dit, loads, key, value):
    patcher = FakeModelPatcher(tiny_dit)
    patcher.model_options[key] = value
    with pytest.raises(UnsupportedError, match=key):
        M.as_denoiser(patcher)


def test_core_sampling_without_a_flow_shift_is_refused(tiny_dit, loads):
    sampling = FakeFlowSampling()
    sampling.multiplier = 1.0  # e.g. ModelSamplingFlux / AuraFlow: another timestep scale than Wan's
    with pytest.raises(UnsupportedError, match="multiplier"):
        M.as_denoiser(FakeModelPatcher(tiny_dit, sampling))
    den = M.as_denoiser(FakeModelPatcher(tiny_dit))
    assert den.info["sampling_shift"] == 8.0


def test_cfg_patches_are_applied_with_comfyuis_argument_dicts(tiny_dit, loads):
    """sampler_cfg_function / sampler_post_cfg_function run on x0 predictions as in ComfyUI's cfg_function:
    a cfg function returning plain CFG and an identity post-CFG leave the result unchanged; a post-CFG that
    returns cond_denoised turns CFG off."""
    from twinflow.sampling.guidance import Branch

    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4)
    d = tiny_dit.config.text_dim
    pos, neg = [[torch.randn(1, 3, d), {}]], [[torch.randn(1, 5, d), {}]]
    seen = []

    def cfg_fn(args):
        seen.append(sorted(args))
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]  # noise-space CFG

    def velocity(opts, cfg=4.0):
        patcher = FakeModelPatcher(tiny_dit)
        patcher.model_options.update(opts)
        b = Branch(M.as_denoiser(patcher), pos, neg, cfg)
        b.prepare(1)
        return b.velocity(x, 0.7)

    plain = velocity({})
    torch.testing.assert_close(velocity({"sampler_cfg_function": cfg_fn,
                                         "sampler_post_cfg_function": [lambda a: a["denoised"]]}), plain)
    assert seen and {"cond", "uncond", "cond_scale", "input", "sigma", "cond_denoised", "uncond_denoised", "model",
                     "model_options", "timestep"} <= set(seen[0])
    cond_only = velocity({}, cfg=1.0)
    torch.testing.assert_close(velocity({"sampler_post_cfg_function": [lambda a: a["cond_denoised"]]}), cond_only,
                               rtol=1e-5, atol=1e-5)
    assert (plain - cond_only).abs().max() > 1e-3


def test_rebuild_gives_our_wan_dit_with_the_same_outputs(tiny_dit, loads):
    from twinflow.models.wan_dit import WanDiT

    patcher = FakeModelPatcher(tiny_dit)
    d = M.as_denoiser(patcher, need_module=True)
    assert isinstance(d.module, WanDiT) and d.family == "wan_dit" and d.module is not tiny_dit
    assert loads[-1] == ([patcher], True)  # fully loaded first, so weight patches are baked in
    assert M.as_denoiser(patcher, need_module=True) is d  # cached per core object
    # a wrapped core model arriving where a module is needed is rebuilt from its patcher
    assert M.as_denoiser(M.as_denoiser(patcher), need_module=True) is d
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0])
    ctx = torch.randn(1, 3, tiny_dit.config.text_dim)
    torch.testing.assert_close(d.module(x, t, ctx), tiny_dit(x, t, ctx))
    w = dict(tiny_dit.named_parameters())["blocks.0.self_attn.q.weight"]
    assert dict(d.module.named_parameters())["blocks.0.self_attn.q.weight"].data_ptr() == w.data_ptr()


def test_rebuild_refuses_fp8_weights(tiny_dit, loads):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no fp8 dtype in this torch")
    from twinflow.models.wan_dit import random_wan_dit

    m = random_wan_dit("tiny", seed=1)
    m.blocks[0].ffn[0].weight.data = m.blocks[0].ffn[0].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(UnsupportedError, match="fp8"):
        M.as_denoiser(FakeModelPatcher(m), need_module=True)


def test_core_vae_becomes_our_wan_vae_sharing_weights():
    from twinflow.models.wan_vae import WanVAE, random_wan_vae

    ref = random_wan_vae("tiny", seed=2)
    core = FakeCoreVAE(ref.state_dict())
    vae = M.as_wan_vae(core)
    assert isinstance(vae, WanVAE) and M.as_wan_vae(core) is vae and M.as_wan_vae(vae) is vae
    assert vae.encoder.conv1.weight.data_ptr() == core.first_stage_model.encoder.conv1.weight.data_ptr()
    z = torch.randn(1, 16, 1, 1, 1)
    torch.testing.assert_close(vae.decode(z, tiling="off"), ref.decode(z, tiling="off"))


def test_core_wan22_vae_becomes_our_wan22_vae_sharing_weights():
    from twinflow.models.wan22_vae import Wan22VAE, random_wan22_vae

    ref = random_wan22_vae("tiny", seed=2)
    core = FakeCoreVAE(ref.state_dict())
    vae = M.as_wan_vae(core)
    assert isinstance(vae, Wan22VAE) and vae.cfg == ref.cfg and M.as_wan_vae(core) is vae
    assert vae.encoder.conv1.weight.data_ptr() == core.first_stage_model.encoder.conv1.weight.data_ptr()
    z = torch.randn(1, 48, 1, 1, 1)
    torch.testing.assert_close(vae.decode(z, tiling="off"), ref.decode(z, tiling="off"))


def test_core_vae_refusals():
    with pytest.raises(UnsupportedError, match="not a Wan2.1"):
        M.as_wan_vae(FakeCoreVAE({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}))
    with pytest.raises(TypeError, match="TWINFLOW_VAE"):
        M.as_wan_vae("vae")


# ------------------------------------------------------------------------------------------------- guider
@pytest.mark.parametrize("sigma,step", [(1.0, 0), (0.95, 0), (0.9, 1), (0.7, 1), (0.5, 2), (0.2, 2), (0.0, 2)])
def test_step_index_assigns_intermediate_sigmas_to_their_step(sigma, step):
    assert G.step_index(torch.tensor([1.0, 0.9, 0.5, 0.0]), sigma) == step


def test_step_index_needs_a_grid():
    with pytest.raises(ValueError, match="at least 2"):
        G.step_index([1.0], 0.5)


def _counted(value, calls, name):
    def f():
        calls.append(name)
        return value
    return f


def test_fused_prediction_runs_only_the_needed_branches():
    from twinflow.sampling.gates import GateSchedule

    a, b = torch.randn(1, 16, 1, 8, 8), torch.randn(1, 16, 1, 8, 8)
    for gate, expect, want in ((GateSchedule("constant", alpha=1.0, cutoff=0.3), ["S"], a),
                               (GateSchedule("constant", alpha=0.0), ["D"], b),
                               (GateSchedule("constant", alpha=0.25), ["S", "D"], 0.25 * a + 0.75 * b)):
        calls, log = [], []
        out = G.fused_prediction(_counted(a, calls, "S"), _counted(b, calls, "D"), gate, 0, 0.5, 4, log=log)
        assert calls == expect and log[0][-1] == "+".join(expect)
        torch.testing.assert_close(out, want)


def test_fusing_denoised_equals_fusing_velocities():
    """x - sigma*fuse(v_S, v_D) == fuse(x - sigma*v_S, x - sigma*v_D): the guider may fuse x0 directly."""
    from twinflow.sampling.fusion import fuse
    from twinflow.sampling.gates import GateSchedule

    g = torch.Generator().manual_seed(0)
    x, vs, vd = (torch.randn(1, 16, 3, 8, 12, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = 0.37
    gate = GateSchedule("constant", alpha=0.3, cutoff=0.4)
    for over_time in (False, True):
        out = G.fused_prediction(lambda: x - sigma * vs, lambda: x - sigma * vd, gate, 0, sigma, 3,
                                 over_time=over_time)
        # the FFT mask is float32, so agreement is to float32 rounding, not float64
        torch.testing.assert_close(out, x - sigma * fuse(vs, vd, 0.3, 0.4, over_time=over_time), rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------------- nodes
def test_adapter_nodes_follow_the_conventions():
    for nid, cls in N.NODE_CLASS_MAPPINGS.items():
        assert nid.startswith("TwinFlow") and cls.CATEGORY.startswith("TwinFlow/") and cls.DESCRIPTION
        assert nid in N.NODE_DISPLAY_NAME_MAPPINGS
        spec = cls.INPUT_TYPES()
        for sec in ("required", "optional"):
            for name, entry in spec.get(sec, {}).items():
                opts = entry[1] if len(entry) > 1 else {}
                assert opts.get("tooltip"), f"{nid}.{name} has no tooltip"
                if entry[0] in ("INT", "FLOAT"):
                    assert {"min", "max", "step"} <= set(opts), f"{nid}.{name}"


def test_guider_node_checks_inputs_before_touching_comfyui():
    node = N.TwinFlowDualBranchGuider()
    with pytest.raises(TypeError, match="GATE_SCHEDULE"):
        node.build(None, None, "not a gate", [], [], 1.0, 1.0, "HW")
    from twinflow.sampling.gates import GateSchedule

    with pytest.raises(ValueError, match="split"):
        node.build(None, None, GateSchedule(), [], [], 1.0, 1.0, "XY")
    with pytest.raises(ValueError, match="mode"):
        N.TwinFlowFromCoreModel().convert(None, mode="other")


# ------------------------------------------------------------------------------------------ registry metadata
def test_pyproject_registry_metadata_and_requirements_agree():
    """Registry fields are present, and requirements.txt (what ComfyUI-Manager installs) lists the same runtime
    dependencies as pyproject, except torch, which the host provides and must never be replaced."""
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,99}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]) and project["description"]
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()}

    req = [ln for ln in (root / "requirements.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "torch" not in names(req) and "torchvision" not in names(req)
    assert names(req) == names(project["dependencies"]) - {"torch"}


def test_error_types_keep_the_package_import_path_under_a_hosts_module_name():
    """ComfyUI imports a pack under its folder path; our error types still name themselves twinflow.core.errors.*
    (ComfyUI's execution.full_type_name shows module + qualname in the UI)."""
    import importlib.util
    import pickle

    from twinflow.core import errors

    spec = importlib.util.spec_from_file_location("/x/custom_nodes/tf_pack.core.errors", errors.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Sub(mod.UnsupportedError):  # defined outside the package: left alone
        pass

    assert mod.UnsupportedError.__module__ == mod.TwinFlowError.__module__ == "twinflow.core.errors"
    assert Sub.__module__ == __name__
    assert errors.UnsupportedError.__module__ == "twinflow.core.errors"
    assert isinstance(pickle.loads(pickle.dumps(errors.UnsupportedError("x"))), errors.UnsupportedError)
