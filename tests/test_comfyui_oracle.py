"""The oracle for the headless core node set: ComfyUI's own Wan templates run in a real ComfyUI and with
`twinflow run` (the Runner) on the same small random files, unchanged except widgets for size/steps/sampler.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (0.3.64). Strategy for the text encoder: ComfyUI
builds umT5 from `comfy/text_encoders/umt5_config_xxl.json` whenever a file looks like umT5-XXL (block 23's
gated FFN input width 4096), so the test runs a COPY of the checkout (the given one is never modified) whose
JSON carries the small sizes of the test file: 24 blocks, d_model 4096, d_kv 1, 64 heads, d_ff 8, vocab 256.
The Wan2.1 VAE is saved at its real width (ComfyUI builds it at 96 whatever the file holds) and the DiT with
text width 4096 (fixed in ComfyUI's Wan model). ComfyUI runs with --cpu and fp32 weights for all three models
(--fp32-unet/--fp32-vae/--fp32-text-enc; on the CPU it would otherwise run the text encoder in fp16).

What is compared (ComfyUI's side is observed through a core SaveLatent on the sampler output and a core
SaveImage on the VAEDecode output, added next to the template's nodes): the final latent within 1e-4 relative
(max abs difference over max abs value), the decoded frames within 1/255 (ComfyUI's PNGs are 8-bit).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")]

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("core_files", HERE / "fixtures" / "core_files.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

SMALL_UMT5 = {"d_ff": 8, "d_kv": 1, "num_heads": 64, "vocab_size": 256, "d_model": 4096, "num_layers": 24,
              "num_decoder_layers": 24}
COPY_IGNORE = ("venv", ".venv", ".git", "models", "output", "input", "temp", "user", "custom_nodes", "__pycache__")


def _comfy_copy(dest: Path) -> Path:
    """A copy of the ComfyUI checkout with the small umT5 config (the original is left untouched)."""
    top = os.path.realpath(COMFYUI)

    def ignore(folder, names):  # the checkout's own data folders and venv, at its top level only
        return [n for n in names if n == "__pycache__" or (os.path.realpath(folder) == top and n in COPY_IGNORE)]

    shutil.copytree(COMFYUI, dest, ignore=ignore, symlinks=True)
    cfg_path = dest / "comfy" / "text_encoders" / "umt5_config_xxl.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(SMALL_UMT5)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (dest / "custom_nodes").mkdir()
    return dest


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    pytest.importorskip("sentencepiece")
    from test_comfyui_integration import Server

    from twinflow.models import umt5

    tmp = tmp_path_factory.mktemp("oracle")
    root = _comfy_copy(tmp / "ComfyUI")
    base = tmp / "base"
    (base / "custom_nodes").mkdir(parents=True)
    ucfg = umt5.UMT5Config(**{k: v for k, v in SMALL_UMT5.items() if k != "num_decoder_layers"})
    files = cf.write_t2v_22_models(base / "models", text_dim=ucfg.d_model, umt5_cfg=ucfg, vae_preset="wan2.1")
    srv = Server(base, root=root, args=["--fp32-unet", "--fp32-vae", "--fp32-text-enc"])
    try:
        srv.start()
        yield srv, base / "models", files
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _template_prompt(template: str, overrides: list) -> dict:
    from twinflow.runner.api import Runner, apply_overrides

    runner = Runner()
    return apply_overrides(runner.load(cf.template(template)).prompt, overrides, runner.registry)


def _run_both(oracle, template: str, overrides: list, latent_node: str, decode_node: str, tmp_path):
    return _run_prompt(oracle, _template_prompt(template, overrides), latent_node, decode_node, tmp_path,
                       label=f"{template} {overrides}")


def _run_prompt(oracle, prompt: dict, latent_node: str, decode_node: str, tmp_path, label: str = ""):
    """Run one API prompt in ComfyUI (plus a SaveLatent and a SaveImage to observe it) and in the Runner."""
    import copy

    from PIL import Image
    from safetensors.torch import load_file

    from twinflow.runner.api import Runner

    srv, models, _files = oracle
    observed = copy.deepcopy(prompt)
    observed["tf_oracle_latent"] = {"class_type": "SaveLatent",
                                    "inputs": {"samples": [latent_node, 0], "filename_prefix": "oracle/latent"}}
    observed["tf_oracle_images"] = {"class_type": "SaveImage",
                                    "inputs": {"images": [decode_node, 0], "filename_prefix": "oracle/frames"}}
    entry = srv.run(observed)
    item = entry["outputs"]["tf_oracle_latent"]["latents"][0]
    c_lat = load_file(str(srv.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"].float()
    c_img = np.stack([np.asarray(Image.open(srv.base / "output" / i["subfolder"] / i["filename"]).convert("RGB"))
                      for i in entry["outputs"]["tf_oracle_images"]["images"]])

    res = Runner().run(copy.deepcopy(prompt), output_dir=tmp_path / "out", models_dir=models)
    t_lat = res.results[latent_node][0][0]["samples"].float()
    t_img = res.results[decode_node][0][0]
    assert t_lat.shape == c_lat.shape, (t_lat.shape, c_lat.shape)
    rel = ((t_lat - c_lat).abs().max() / c_lat.abs().max()).item()
    assert rel < 1e-4, f"final latents differ by {rel:.2e} relative"
    # ComfyUI's SaveImage: clip(255 * x, 0, 255).astype(uint8) (truncation)
    t_u8 = np.clip(255.0 * t_img.numpy(), 0, 255).astype(np.uint8)
    assert t_u8.shape == c_img.shape
    diff = np.abs(t_u8.astype(int) - c_img.astype(int)).max()
    assert diff <= 1, f"decoded frames differ by {diff}/255"
    print(f"\n{label}: latent rel diff {rel:.2e}, frames max diff {diff}/255")
    return rel, diff


SIZE_21 = ["40.width=32", "40.height=32", "40.length=5", "3.steps=3", "3.seed=123"]


@pytest.mark.parametrize("sampler", ["uni_pc", "euler"])
def test_text_to_video_wan_matches_comfyui(oracle, sampler, tmp_path):
    _run_both(oracle, "text_to_video_wan.json", SIZE_21 + [f"3.sampler_name={sampler}"], "3", "8", tmp_path)


def test_sampler_custom_advanced_graph_matches_comfyui(oracle, tmp_path):
    """The template's KSampler replaced by SamplerCustomAdvanced + RandomNoise + CFGGuider + KSamplerSelect +
    BasicScheduler (ComfyUI's custom-sampling nodes), same settings."""
    prompt = _template_prompt("text_to_video_wan.json", SIZE_21)
    ks = prompt.pop("3")["inputs"]
    prompt.update({
        "sca_noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 123}},
        "sca_guider": {"class_type": "CFGGuider", "inputs": {"model": ks["model"], "positive": ks["positive"],
                                                             "negative": ks["negative"], "cfg": ks["cfg"]}},
        "sca_sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sca_sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ks["model"], "scheduler": "simple",
                                                                   "steps": 3, "denoise": 1.0}},
        "3": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["sca_noise", 0], "guider": ["sca_guider", 0], "sampler": ["sca_sampler", 0],
            "sigmas": ["sca_sigmas", 0], "latent_image": ks["latent_image"]}},
    })
    _run_prompt(oracle, prompt, "3", "8", tmp_path, label="SamplerCustomAdvanced")


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_unet_fp8_weight_dtype_matches_comfyui(oracle, weight_dtype, tmp_path):
    """UNETLoader's fp8 modes: ComfyUI builds the whole Wan model in fp8 (but the patch embedding) and upcasts
    every weight to float32 on the CPU (manual cast); TwinFlow stores the same parameters rounded the same way
    (round to nearest on load) and computes in float32 too, so the tolerance is the default case's 1e-4: the
    same fp8 values on both sides leave only fp32 summation-order differences (measured 1.7e-5, euler, 3 steps).
    It discriminates: the earlier storage (only Linears in fp8, norms and modulation in float32) already
    differs by 4.6e-3 relative in one denoiser call of the tiny unit-test model."""
    _run_both(oracle, "text_to_video_wan.json", SIZE_21 + ["3.sampler_name=euler", f"37.weight_dtype={weight_dtype}"],
              "3", "8", tmp_path)


def test_vae_decode_tiled_matches_comfyui(oracle, tmp_path):
    """The template's VAEDecode replaced by VAEDecodeTiled with ComfyUI's smallest tiles: a 96x80x9 video
    (latent 12x10x3) is cut into 2 x 2 spatial tiles of 8 latent px (overlap 32 px capped to 64/4 = 16 px)
    and 2 temporal tiles of 2 latent frames overlapping by 1, blended with ComfyUI's feathered masks."""
    prompt = _template_prompt("text_to_video_wan.json", ["40.width=96", "40.height=80", "40.length=9", "3.steps=2",
                                                         "3.seed=5"])
    prompt["8"] = {"class_type": "VAEDecodeTiled", "inputs": {**prompt["8"]["inputs"], "tile_size": 64, "overlap": 32,
                                                              "temporal_size": 8, "temporal_overlap": 4}}
    _run_prompt(oracle, prompt, "3", "8", tmp_path, label="VAEDecodeTiled")


def _apng(path: Path, frames: int, w: int, h: int, seed: int) -> np.ndarray:
    """An animated RGBA PNG (LoadImage returns every frame as one batch, MASK = 1 - alpha)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, size=(frames, h, w, 4), dtype=np.uint8)
    px[..., 3] = np.where(rng.random((frames, h, w)) < 0.3, 255, px[..., 3])  # opaque, partial and clear alpha
    imgs = [Image.fromarray(f, "RGBA") for f in px]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return px


def test_vae_encode_matches_comfyui(oracle, tmp_path):
    """LoadImage (a 5-frame 35x27 animated PNG) -> VAEEncode (centred crop to 32x24, the frames as one video:
    latent [1, 16, 2, 3, 4]) -> SaveLatent in ComfyUI; the same nodes headless; same VAE file, fp32."""
    from safetensors.torch import load_file

    from twinflow.core import paths
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    srv, models, files = oracle
    (srv.base / "input").mkdir(exist_ok=True)
    _apng(srv.base / "input" / "tf_encode.png", 5, 35, 27, seed=11)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "tf_encode.png"}},
              "2": {"class_type": "VAELoader", "inputs": {"vae_name": cf.T2V_FILES["vae"]}},
              "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
              "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "oracle/encode"}}}
    entry = srv.run(json.loads(json.dumps(prompt)))
    item = entry["outputs"]["4"]["latents"][0]
    c_lat = load_file(str(srv.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"].float()
    core = NODE_CLASS_MAPPINGS  # the headless runner's classes, called as its executor would (no Save node for a LATENT)
    with paths.using(input_dir=srv.base / "input", models_dir=models):
        (pixels, _mask) = core["LoadImage"]().load_image("tf_encode.png")
        (vae,) = core["VAELoader"]().load_vae(cf.T2V_FILES["vae"])
        (lat,) = core["VAEEncode"]().encode(vae, pixels)
    t_lat = lat["samples"].float()
    assert t_lat.shape == c_lat.shape == (1, 16, 2, 3, 4), (t_lat.shape, c_lat.shape)
    rel = ((t_lat - c_lat).abs().max() / c_lat.abs().max()).item()
    print(f"\nVAEEncode: latent rel diff {rel:.2e}")
    assert rel < 1e-4, f"VAEEncode latents differ by {rel:.2e} relative"


def test_load_image_matches_comfyui(oracle, tmp_path):
    """ComfyUI's own LoadImage node run in ComfyUI's interpreter (folder_paths pointed at the test's input
    folder) on an animated RGBA PNG and a palette PNG with a transparent index: IMAGE and MASK bit-identical."""
    import subprocess

    from safetensors.torch import load_file
    from PIL import Image

    from test_comfyui_integration import _comfy_python

    from twinflow.core import paths
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    srv, _models, _files = oracle
    inp = tmp_path / "input"
    inp.mkdir()
    _apng(inp / "anim.png", 3, 9, 7, seed=5)
    pal = Image.fromarray(np.random.default_rng(2).integers(0, 8, size=(6, 10), dtype=np.uint8), "P")
    pal.putpalette([v for i in range(8) for v in (30 * i, 255 - 30 * i, 7 * i)])
    pal.save(inp / "pal.png", transparency=3)
    names = ["anim.png", "pal.png"]
    code = ("import sys; sys.argv=['x','--cpu']; import comfy.options; comfy.options.enable_args_parsing(); "
            "import folder_paths; folder_paths.set_input_directory(%r); import nodes; "
            "from safetensors.torch import save_file; out={}\n"
            "for n in %r:\n"
            "    img, mask = nodes.LoadImage().load_image(n); out[n+':image']=img.contiguous(); "
            "out[n+':mask']=mask.contiguous()\n"
            "save_file(out, %r)" % (str(inp), names, str(tmp_path / "comfy.safetensors")))
    run = subprocess.run([os.environ.get("COMFYUI_PYTHON") or _comfy_python(), "-c", code], cwd=str(srv.root),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(str(tmp_path / "comfy.safetensors"))
    with paths.using(input_dir=inp):
        for n in names:
            img, mask = NODE_CLASS_MAPPINGS["LoadImage"]().load_image(n)
            assert img.dtype == theirs[n + ":image"].dtype and torch.equal(img, theirs[n + ":image"]), n
            assert mask.dtype == theirs[n + ":mask"].dtype and torch.equal(mask, theirs[n + ":mask"]), n
    assert theirs["anim.png:image"].shape == (3, 7, 9, 3) and theirs["anim.png:mask"].shape == (3, 7, 9)


SIZE_22 = ["74.width=32", "74.height=32", "74.length=5", "81.noise_seed=77"]


@pytest.mark.parametrize("lora", [1.0, 0.0], ids=["lora", "no_lora"])
def test_wan2_2_two_expert_split_matches_comfyui(oracle, lora, tmp_path):
    over = SIZE_22 + [f"83.strength_model={lora}", f"85.strength_model={lora}"]
    _run_both(oracle, "video_wan2_2_14B_t2v.json", over, "78", "87", tmp_path)


def test_wan2_2_split_uni_pc_matches_comfyui(oracle, tmp_path):
    over = SIZE_22 + ["81.sampler_name=uni_pc", "78.sampler_name=uni_pc"]
    _run_both(oracle, "video_wan2_2_14B_t2v.json", over, "78", "87", tmp_path)


def test_stochastic_rounding_and_key_seed_equal_comfyuis():
    """quant.storage's fp8 re-rounding of LoRA-patched weights against ComfyUI's own comfy/float.py (it imports
    only torch, so it is loaded from the checkout by path) and the patcher's string_to_seed (run in ComfyUI's
    interpreter: comfy/model_patcher.py imports the rest of ComfyUI)."""
    import subprocess

    from test_comfyui_integration import _comfy_python

    from twinflow.quant import storage

    spec = importlib.util.spec_from_file_location("comfy_float", Path(COMFYUI) / "comfy" / "float.py")
    comfy_float = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_float)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.cat([torch.randn(64, 48, generator=g) * 3, torch.randn(8, 48, generator=g) * 1e-3,
                       torch.full((2, 48), 600.0), torch.zeros(1, 48)])
        ours = storage.stochastic_round_fp8(x, dtype, seed=1234)
        theirs = comfy_float.stochastic_rounding(x, dtype, seed=1234)
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), dtype
    keys = ["diffusion_model.blocks.0.self_attn.q.weight", "diffusion_model.head.head.bias"]
    code = ("import sys, json; sys.argv=['x','--cpu']; import comfy.options; comfy.options.enable_args_parsing(); "
            "from comfy.model_patcher import string_to_seed; print(json.dumps([string_to_seed(k) for k in %r]))" % keys)
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON") or _comfy_python(), "-c", code], cwd=COMFYUI,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [storage.comfy_key_seed(k) for k in keys]
