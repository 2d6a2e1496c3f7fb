"""The oracle for image-to-video: ComfyUI's own templates `image_to_video_wan.json` (Wan2.1 I2V 14B + CLIP
vision), `video_wan2_2_14B_i2v.json` (two Wan2.2 I2V experts, KSamplerAdvanced split, 4-step LoRAs, bypassed
groups) and `video_wan2_2_5B_ti2v.json` (Wan2.2 TI2V-5B, Wan22ImageToVideoLatent, Wan2.2 VAE; its LoadImage is
bypassed) run in a real ComfyUI and with `twinflow run` (the Runner) on the same small random files, unchanged
except widgets for size/steps/seed. Compared as in tests/test_comfyui_oracle.py: the final latent within 1e-4
relative, the decoded frames within 1/255.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (0.3.64). ComfyUI builds some modules at their real
configuration whatever the file holds; how each is met:
  * umT5-XXL: a COPY of the checkout whose `umt5_config_xxl.json` carries the test file's small sizes (as in
    test_comfyui_oracle.py); the DiTs take text width 4096 (fixed in ComfyUI's Wan model).
  * CLIP vision ViT-H: ComfyUI picks `clip_vision_config_h.json` by the key of block 30 and builds it from that
    JSON; the copy's JSON carries the test file's sizes: 32 blocks of width 1280 (ComfyUI's Wan `img_emb` takes
    1280-wide features, fixed), MLP width 8, 28x28 pixels (5 tokens). The file is fp16, as clip_vision_h ships.
  * Wan2.1 VAE at width 96 and Wan2.2 VAE at width 160 (ComfyUI's fixed configs): saved at those real configs.
The input images are PNG data under the templates' names (`input-18.jpg` included: both hosts open images by
content, so no JPEG decoder difference enters the comparison).

A fourth case runs the TI2V template with its bypassed LoadImage enabled (start image -> Wan2.2 VAE encode ->
noise mask + per-frame timestep), the path the template ships switched off.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")]

# ComfyUI's clip_vision_config_h.json keys; the sizes of the test file (see the module docstring)
SMALL_CLIP_H = {"hidden_size": 1280, "intermediate_size": 8, "projection_dim": 16, "num_attention_heads": 16,
                "num_hidden_layers": 32, "patch_size": 14, "image_size": 28}
TEXT_DIM = 4096
HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("i2v_files", HERE / "fixtures" / "i2v_files.py")
i2v_files = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(i2v_files)


def _write_models(models: Path) -> None:
    from twinflow.models import clip_vision, umt5
    from test_comfyui_oracle import SMALL_UMT5

    ucfg = umt5.UMT5Config(**{k: v for k, v in SMALL_UMT5.items() if k != "num_decoder_layers"})
    h = SMALL_CLIP_H
    ccfg = clip_vision.ClipVisionConfig(width=h["hidden_size"], layers=h["num_hidden_layers"],
                                        heads=h["num_attention_heads"], mlp=h["intermediate_size"],
                                        patch=h["patch_size"], image_size=h["image_size"],
                                        projection_dim=h["projection_dim"], activation="gelu")
    # ComfyUI's fixed sizes: Wan2.1 VAE width 96, Wan2.2 VAE width 160, DiT text width 4096, img_emb width 1280
    i2v_files.write_i2v_models(models, clip_cfg=ccfg, text_dim=TEXT_DIM, umt5_cfg=ucfg, vae21="wan2.1",
                               vae22="wan2.2")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    pytest.importorskip("comfyui_workflow_templates", reason="pip install comfyui-workflow-templates==0.1.95")
    pytest.importorskip("sentencepiece")
    from test_comfyui_integration import Server
    from test_comfyui_oracle import _comfy_copy

    tmp = tmp_path_factory.mktemp("i2v_oracle")
    root = _comfy_copy(tmp / "ComfyUI")
    cfg_path = root / "comfy" / "clip_vision_config_h.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(SMALL_CLIP_H)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    base = tmp / "base"
    (base / "custom_nodes").mkdir(parents=True)
    _write_models(base / "models")
    i2v_files.write_images(base / "input")
    srv = Server(base, root=root, args=["--fp32-unet", "--fp32-vae", "--fp32-text-enc"])
    try:
        srv.start()
        yield srv, base / "models", None
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(oracle, prompt: dict, latent_node: str, decode_node: str, tmp_path, label: str):
    from test_comfyui_oracle import _run_prompt

    from twinflow.core import paths

    with paths.using(input_dir=oracle[0].base / "input"):
        return _run_prompt(oracle, prompt, latent_node, decode_node, tmp_path, label=label)


def _prompt(template: str, overrides: list) -> dict:
    from test_comfyui_oracle import _template_prompt

    return _template_prompt(template, overrides)


def test_image_to_video_wan_matches_comfyui(oracle, tmp_path):
    """Wan2.1 I2V + CLIP vision (crop none), KSampler uni_pc at the template's cfg 6."""
    over = ["50.width=32", "50.height=32", "50.length=5", "3.steps=3", "3.seed=123"]
    _run(oracle, _prompt("image_to_video_wan.json", over), "3", "8", tmp_path, "image_to_video_wan")


@pytest.mark.parametrize("lora", [1.0, 0.0], ids=["lora", "no_lora"])
def test_wan2_2_14b_i2v_matches_comfyui(oracle, lora, tmp_path):
    """Two Wan2.2 I2V experts (fp8 scaled), WanImageToVideo without CLIP vision, KSamplerAdvanced 0-2 / 2-4."""
    over = ["98.width=32", "98.height=32", "98.length=5", "86.noise_seed=77",
            f"101.strength_model={lora}", f"102.strength_model={lora}"]
    _run(oracle, _prompt("video_wan2_2_14B_i2v.json", over), "85", "87", tmp_path, f"video_wan2_2_14B_i2v {lora}")


def test_wan2_2_5b_ti2v_matches_comfyui(oracle, tmp_path):
    """TI2V-5B as the template ships it (LoadImage bypassed: text to video on the 48-channel latent)."""
    over = ["55.width=64", "55.height=64", "55.length=5", "3.steps=3", "3.seed=123"]
    _run(oracle, _prompt("video_wan2_2_5B_ti2v.json", over), "3", "8", tmp_path, "video_wan2_2_5B_ti2v")


def test_wan2_2_5b_ti2v_with_start_image_matches_comfyui(oracle, tmp_path):
    """The same template with its LoadImage switched on: the Wan2.2 VAE encodes the start image into the latent,
    the noise mask keeps it and the model gets a per-frame timestep."""
    over = ["55.width=64", "55.height=64", "55.length=5", "3.steps=3", "3.seed=123"]
    prompt = _prompt("video_wan2_2_5B_ti2v.json", over)
    prompt["56"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    prompt["55"]["inputs"]["start_image"] = ["56", 0]
    _run(oracle, prompt, "3", "8", tmp_path, "video_wan2_2_5B_ti2v + start image")
