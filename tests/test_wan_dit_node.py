"""TwinFlow Load DiT node: random presets, files from the diffusion_models folder, dispatch and errors."""
import pytest
import torch

from twinflow.core.errors import CheckpointError
from twinflow.core.handles import Denoiser
from twinflow.models import wan_dit as W
from twinflow.nodes.dit import TwinFlowLoadDiT


def test_node_contract():
    req = TwinFlowLoadDiT.INPUT_TYPES()["required"]
    assert req["ckpt_name"][0][:2] == ["random:tiny", "random:wan2.1-1.3b"]
    seed = req["seed"][1]
    assert {"min", "max", "step"} <= set(seed)
    assert TwinFlowLoadDiT.RETURN_TYPES == ("TWINFLOW_MODEL",)
    assert TwinFlowLoadDiT.CATEGORY.startswith("TwinFlow/")
    from twinflow.nodes import NODE_CLASS_MAPPINGS
    assert NODE_CLASS_MAPPINGS["TwinFlowLoadDiT"] is TwinFlowLoadDiT


def test_random_tiny_velocity_runs():
    (model,) = TwinFlowLoadDiT().load("random:tiny", "default", "auto", 7)
    assert isinstance(model, Denoiser)
    assert model.family == "wan_dit" and model.in_channels == 16 and model.text_dim == 4096
    x = torch.randn(1, 16, 2, 8, 8)
    with torch.no_grad():
        v = model.velocity(x, torch.tensor(0.7), torch.randn(1, 4, 4096))
        v_direct = model.module(x, torch.tensor([700.0]), torch.randn(1, 4, 4096) * 0)  # differs: other prompt
    assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 0.1
    assert not torch.allclose(v, v_direct)
    (again,) = TwinFlowLoadDiT().load("random:tiny", "default", "auto", 7)
    assert torch.equal(again.module.head.head.weight, model.module.head.head.weight)  # seeded
    (bf,) = TwinFlowLoadDiT().load("random:tiny", "bf16", "auto", 7)
    assert bf.dtype == torch.bfloat16


def test_random_preset_conflict_is_an_error():
    with pytest.raises(ValueError, match="conflicts"):
        TwinFlowLoadDiT().load("random:tiny", "default", "wan2.1-1.3b", 0)


def test_load_file_from_models_folder(tf_dirs):
    folder = tf_dirs["models"] / "diffusion_models"
    folder.mkdir()
    tiny = W.random_wan_dit("tiny", seed=3)
    from safetensors.torch import save_file
    save_file({"model.diffusion_model." + k: v.half().contiguous() for k, v in tiny.state_dict().items()},
              str(folder / "wan_tiny_fp16.safetensors"))
    names = TwinFlowLoadDiT.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert "wan_tiny_fp16.safetensors" in names
    (model,) = TwinFlowLoadDiT().load("wan_tiny_fp16.safetensors", "fp32", "auto", 0)
    assert model.dtype == torch.float32 and model.config == tiny.config
    (half,) = TwinFlowLoadDiT().load("wan_tiny_fp16.safetensors", "default", "tiny", 0)
    assert half.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match="not found"):
        TwinFlowLoadDiT().load("nope.safetensors", "default", "auto", 0)


def test_vae_file_in_dit_slot(tf_dirs):
    folder = tf_dirs["models"] / "diffusion_models"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1)}, str(folder / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="Wan VAE"):
        TwinFlowLoadDiT().load("vae.safetensors", "default", "auto", 0)


def test_adaln_dit_file_is_dispatched(tf_dirs):
    dit = pytest.importorskip("twinflow.models.dit")
    if not hasattr(dit, "random_adaln_dit"):
        pytest.skip("models.dit has no random_adaln_dit")
    folder = tf_dirs["models"] / "diffusion_models"
    folder.mkdir()
    made = dit.random_adaln_dit("tiny", seed=0)
    module = made[0] if isinstance(made, tuple) else made
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "dit_tiny.safetensors"))
    (model,) = TwinFlowLoadDiT().load("dit_tiny.safetensors", "default", "auto", 0)
    assert model.family == "dit"
    with pytest.raises(ValueError, match="only applies to Wan"):
        TwinFlowLoadDiT().load("dit_tiny.safetensors", "default", "tiny", 0)


def test_image_model_presets_and_info():
    (i2v,) = TwinFlowLoadDiT().load("random:i2v-tiny", "default", "auto", 1)
    assert i2v.in_channels == 36 and i2v.info["model_kind"] == "i2v" and i2v.info["clip_vision"]
    assert i2v.info["latent_channels"] == 16 and i2v.info["latent_format_comfy"] == "wan21"
    (ti2v,) = TwinFlowLoadDiT().load("random:ti2v-tiny", "default", "auto", 1)
    assert ti2v.info["model_kind"] == "ti2v" and not ti2v.info["clip_vision"] and ti2v.info["latent_channels"] == 48
    assert ti2v.info["latent_format_comfy"] == "wan22" and ti2v.info["sampling_shift_comfy"] == 8.0


@pytest.mark.parametrize("preset,kind,fmt", [("i2v-tiny", "i2v", "wan21"), ("i2v-noclip-tiny", "i2v", "wan21"),
                                              ("ti2v-tiny", "ti2v", "wan22"), ("tiny", "t2v", "wan21")])
def test_unet_loader_loads_image_models(tf_dirs, preset, kind, fmt):
    """Core UNETLoader (headless) loads ComfyUI-repackaged I2V/TI2V files with ComfyUI's shift and latent format
    (supported_models: WAN21_I2V / WAN21_T2V shift 8, Wan21 latents; WAN22_T2V (TI2V-5B) shift 8, Wan22 latents)."""
    from safetensors.torch import save_file

    from twinflow.nodes.core_models import UNETLoader

    folder = tf_dirs["models"] / "diffusion_models"
    folder.mkdir()
    model = W.random_wan_dit(preset, seed=2)
    save_file({"model.diffusion_model." + k: v.half().contiguous() for k, v in model.state_dict().items()},
              str(folder / f"{preset}.safetensors"))
    (loaded,) = UNETLoader().load_unet(f"{preset}.safetensors", "default")
    assert loaded.config == model.config and loaded.info["model_kind"] == kind
    assert loaded.info["sampling_shift"] == 8.0 and loaded.info["latent_format"] == fmt
