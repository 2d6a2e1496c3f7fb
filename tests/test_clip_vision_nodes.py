"""The headless core CLIP vision nodes (nodes/core_vision.py): ComfyUI 0.3.64's interface (written out here),
the clip_vision models folder (incl. extra_model_paths.yaml), loading + encoding through the nodes and the runner,
bad files; and, with COMFYUI_PATH, ComfyUI's own ClipVisionModel.encode_image as the oracle."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from twinflow.core import paths
from twinflow.core.errors import CheckpointError
from twinflow.models import clip_vision as C

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("core_files", FIX / "core_files.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

COMFYUI = os.environ.get("COMFYUI_PATH")


def _core(name):
    from twinflow.nodes.core_headless import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]


def test_interfaces_are_comfyuis(tf_dirs):
    """nodes.py of ComfyUI 0.3.64: CLIPVisionLoader(clip_name from clip_vision) -> CLIP_VISION, loaders;
    CLIPVisionEncode(clip_vision, image, crop [center, none]) -> CLIP_VISION_OUTPUT, conditioning."""
    from twinflow.nodes.core_headless import NODE_DISPLAY_NAME_MAPPINGS

    cf.write_clip_vision(tf_dirs["models"])
    loader, encode = _core("CLIPVisionLoader"), _core("CLIPVisionEncode")
    assert loader.INPUT_TYPES() == {"required": {"clip_name": (["clip_vision_h.safetensors"],)}}
    assert (loader.RETURN_TYPES, loader.FUNCTION, loader.CATEGORY) == (("CLIP_VISION",), "load_clip", "loaders")
    assert encode.INPUT_TYPES() == {"required": {"clip_vision": ("CLIP_VISION",), "image": ("IMAGE",),
                                                 "crop": (["center", "none"],)}}
    assert (encode.RETURN_TYPES, encode.FUNCTION, encode.CATEGORY) == (("CLIP_VISION_OUTPUT",), "encode",
                                                                        "conditioning")
    assert NODE_DISPLAY_NAME_MAPPINGS["CLIPVisionLoader"] == "Load CLIP Vision"
    assert NODE_DISPLAY_NAME_MAPPINGS["CLIPVisionEncode"] == "CLIP Vision Encode"


def test_clip_vision_folder_from_extra_model_paths(tmp_path, monkeypatch):
    (tmp_path / "shared" / "cv").mkdir(parents=True)
    (tmp_path / "shared" / "cv" / "x.safetensors").write_bytes(b"x")
    yml = tmp_path / "extra_model_paths.yaml"
    yml.write_text("comfyui:\n    base_path: shared\n    clip_vision: cv/\n")
    assert paths.extra_model_folders(yml) == {"clip_vision": [tmp_path / "shared" / "cv"]}
    monkeypatch.setenv("TWINFLOW_EXTRA_MODEL_PATHS", str(yml))
    with paths.using(models_dir=tmp_path / "models"):
        assert _core("CLIPVisionLoader").INPUT_TYPES()["required"]["clip_name"][0] == ["x.safetensors"]
        assert paths.find_model("clip_vision", "x.safetensors") == tmp_path / "shared" / "cv" / "x.safetensors"


def test_load_and_encode_through_the_nodes(tf_dirs):
    path = cf.write_clip_vision(tf_dirs["models"])
    (model,) = _core("CLIPVisionLoader")().load_clip("clip_vision_h.safetensors")
    assert isinstance(model, C.ClipVisionModel)
    assert (model.cfg.layers, model.cfg.heads, model.cfg.activation, model.cfg.tokens) == (32, 16, "gelu", 257)
    assert model.visual_projection.weight.dtype == torch.float16  # the file's storage, as ComfyUI keeps it
    image = torch.rand(2, 120, 200, 3, generator=torch.Generator().manual_seed(0))
    node = _core("CLIPVisionEncode")()
    (center,) = node.encode(model, image, "center")
    (none,) = node.encode(model, image, "none")
    assert center.penultimate_hidden_states.shape == (2, 257, 32) and center.image_embeds.shape == (2, 16)
    ref = C.load_clip_vision(path)
    for out, crop in ((center, True), (none, False)):
        last, pen, emb = ref(C.preprocess(image, 224, crop=crop))
        assert torch.equal(out.last_hidden_state, last) and torch.equal(out.penultimate_hidden_states, pen)
        assert torch.equal(out.image_embeds, emb)
    assert not torch.allclose(center.image_embeds, none.image_embeds)
    with pytest.raises(TypeError, match="'clip_vision' must be a CLIP_VISION"):
        node.encode(object(), image, "center")


def test_bad_files_through_the_loader(tf_dirs):
    from safetensors.torch import save_file

    from twinflow.models import umt5

    folder = tf_dirs["models"] / "clip_vision"
    good = cf.write_clip_vision(tf_dirs["models"])
    data = good.read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    save_file(umt5.random_state_dict(umt5.PRESETS["tiny"]), str(folder / "umt5.safetensors"))
    loader = _core("CLIPVisionLoader")()
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        loader.load_clip("cut.safetensors")
    with pytest.raises(CheckpointError, match=r"umt5.safetensors: not a CLIP vision model: missing key "
                                              r"'vision_model.embeddings.patch_embedding.weight'"):
        loader.load_clip("umt5.safetensors")
    with pytest.raises(FileNotFoundError, match="clip_vision file 'nope.safetensors' not found"):
        loader.load_clip("nope.safetensors")


class Probe:
    """An output node that keeps what it was given (the runner only runs what leads to an output)."""
    seen: list = []
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision_output": ("CLIP_VISION_OUTPUT",)}}

    def run(self, clip_vision_output):
        Probe.seen.append(clip_vision_output)
        return {"ui": {}}


def _prompt(crop="center", clip_name="clip_vision_h.safetensors"):
    return {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
            "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 0], "image": ["2", 0], "crop": crop}},
            "4": {"class_type": "Probe", "inputs": {"clip_vision_output": ["3", 0]}}}


def test_runner_executes_the_nodes_and_preflight_checks_the_file(tf_dirs):
    from PIL import Image

    from twinflow.core.errors import WorkflowError
    from twinflow.runner.api import Runner, default_registry

    path = cf.write_clip_vision(tf_dirs["models"])
    pixels = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tf_dirs["input"] / "start.png")
    runner = Runner({**default_registry(), "Probe": Probe})
    Probe.seen.clear()
    runner.run(_prompt("none"), output_dir=tf_dirs["output"])
    (out,) = Probe.seen
    image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    assert torch.equal(out.image_embeds, C.load_clip_vision(path).encode_image(image, crop="none").image_embeds)
    with pytest.raises(WorkflowError) as e:
        runner.run(_prompt("left"), output_dir=tf_dirs["output"])
    errors = json.dumps(e.value.node_errors)
    assert "CLIPVisionEncode" in errors and "crop" in errors and "left" in errors, errors
    (path.parent / "cut.safetensors").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WorkflowError, match=r"node #1 \(CLIPVisionLoader\).*cut.safetensors.*truncated"):
        runner.run(_prompt(clip_name="cut.safetensors"), output_dir=tf_dirs["output"])


# ------------------------------------------------------------------------------------- ComfyUI as the oracle

COMFY_SCRIPT = r"""
import json, sys
sys.argv = ["x", "--cpu"]  # ComfyUI's defaults otherwise: the file's fp16 weights, float32 compute
import comfy.options
comfy.options.enable_args_parsing()
import comfy.clip_vision, comfy.utils
from safetensors.torch import load_file, save_file
config, weights, images, out = sys.argv_rest
cv = comfy.clip_vision.ClipVisionModel(config)
missing, unexpected = cv.load_sd(comfy.utils.load_torch_file(weights))
assert not missing and not unexpected, (missing, unexpected)
result = {}
for name, image in load_file(images).items():
    for crop in (True, False):
        o = cv.encode_image(image, crop=crop)
        for key in ("last_hidden_state", "penultimate_hidden_states", "image_embeds"):
            result[f"{name}.{crop}.{key}"] = o[key].contiguous()
        assert o["mm_projected"] is None
save_file(result, out)
"""


@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")
def test_encode_matches_comfyuis_clip_vision(tmp_path):
    """ComfyUI's comfy.clip_vision.ClipVisionModel (its clip_preprocess, model and encode_image) built from its
    own clip_vision_config_h.json with the small sizes, fed the same fp16 file: both crop modes, several image
    shapes (one already 224x224), outputs <= 1e-5 relative."""
    from safetensors.torch import load_file, save_file
    from test_comfyui_integration import _comfy_python

    weights = cf.write_clip_vision(tmp_path / "models")
    config = json.loads((Path(COMFYUI) / "comfy" / "clip_vision_config_h.json").read_text())
    config.update(cf.SMALL_CLIP_VISION_H)
    (tmp_path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(7)
    images = {"wide": torch.rand(2, 150, 260, 3, generator=g), "tall": torch.rand(1, 301, 97, 4, generator=g),
              "square": torch.rand(1, 224, 224, 3, generator=g)}
    save_file(images, str(tmp_path / "images.safetensors"))
    script = COMFY_SCRIPT.replace("sys.argv_rest", repr([str(tmp_path / "config.json"), str(weights),
                                                          str(tmp_path / "images.safetensors"),
                                                          str(tmp_path / "out.safetensors")]))
    run = subprocess.run([os.environ.get("COMFYUI_PYTHON") or _comfy_python(), "-c", script], cwd=COMFYUI,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    model = C.load_clip_vision(weights)
    for name, image in images.items():
        for crop in (True, False):
            ours = model.encode_image(image, crop="center" if crop else "none")
            for key in ("last_hidden_state", "penultimate_hidden_states", "image_embeds"):
                a, b = ours[key], theirs[f"{name}.{crop}.{key}"]
                assert a.shape == b.shape, (name, crop, key)
                assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, (name, crop, key)
