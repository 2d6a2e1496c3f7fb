"""VAE nodes: load (random preset and file), encode IMAGE -> LATENT, decode LATENT -> IMAGE, tiling modes."""
import pytest
import torch

from twinflow.models import wan_vae
from twinflow.nodes import NODE_CLASS_MAPPINGS
from twinflow.nodes.vae import TwinFlowLoadVAE, TwinFlowVAEDecode, TwinFlowVAEEncode


@pytest.fixture(scope="module")
def vae():
    return TwinFlowLoadVAE().load("random:tiny", "default", 0)[0]


def test_registered_with_conventions():
    for name in ("TwinFlowLoadVAE", "TwinFlowVAEEncode", "TwinFlowVAEDecode", "TwinFlowImageToVideo"):
        cls = NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "TwinFlow/vae"
        req = cls.INPUT_TYPES()["required"]
        for spec in req.values():
            if spec[0] in ("INT", "FLOAT"):
                assert {"min", "max", "step", "tooltip"} <= set(spec[1])
    assert TwinFlowLoadVAE.RETURN_TYPES == ("TWINFLOW_VAE",)
    # our own type first; the core VAE type too, converted by comfy_adapter inside ComfyUI
    assert TwinFlowVAEEncode.INPUT_TYPES()["required"]["vae"][0] == "TWINFLOW_VAE,VAE"
    assert TwinFlowVAEDecode.INPUT_TYPES()["required"]["vae"][0] == "TWINFLOW_VAE,VAE"
    assert TwinFlowVAEDecode.RETURN_TYPES == ("IMAGE",) and TwinFlowVAEEncode.RETURN_TYPES == ("LATENT",)


def test_encode_decode_roundtrip_formats(vae):
    images = torch.rand(5, 34, 41, 3, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    (latent,) = TwinFlowVAEEncode().encode(vae, images)
    assert torch.equal(images, before)  # inputs are never mutated
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 16, 2, 4, 5)
    assert latent["samples"].dtype == torch.float32
    # same as calling the model on the centre-cropped, [-1, 1] video (crop offsets (34%8)//2, (41%8)//2)
    video = images[:, 1:33, 0:40].permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1
    assert torch.equal(latent["samples"], vae.encode(video))
    # exact row bands in the encoder: same latents as whole frames (float summation order only)
    assert "row_bands" in TwinFlowVAEEncode.INPUT_TYPES()["optional"]
    (banded,) = TwinFlowVAEEncode().encode(vae, images, row_bands=3)
    (whole,) = TwinFlowVAEEncode().encode(vae, images, row_bands=1)
    torch.testing.assert_close(banded["samples"], whole["samples"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="row_bands"):
        TwinFlowVAEEncode().encode(vae, images, row_bands=-1)
    kept = latent["samples"].clone()
    (out,) = TwinFlowVAEDecode().decode(vae, latent, "off", 512, 64)
    assert torch.equal(latent["samples"], kept)
    assert out.shape == (5, 32, 40, 3) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    expect = (vae.decode(latent["samples"])[0].permute(1, 2, 3, 0) + 1) / 2
    torch.testing.assert_close(out, expect.clamp(0, 1), rtol=0, atol=1e-6)


def test_decode_tiling_modes(vae):
    z = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(1))
    latent = {"samples": z}
    (plain,) = TwinFlowVAEDecode().decode(vae, latent, "auto", 512, 64)  # fits: untiled
    (off,) = TwinFlowVAEDecode().decode(vae, latent, "off", 512, 64)
    assert torch.equal(plain, off)
    (tiled,) = TwinFlowVAEDecode().decode(vae, latent, "custom", 32, 16)
    expect = (vae.decode(z, tiling="on", tile=(4, 2))[0].permute(1, 2, 3, 0) + 1) / 2
    torch.testing.assert_close(tiled, expect.clamp(0, 1), rtol=0, atol=1e-6)
    assert not torch.equal(tiled, plain)
    with pytest.raises(ValueError, match="overlap"):
        TwinFlowVAEDecode().decode(vae, latent, "custom", 64, 96)
    # exact row bands: same frames as whole-frame decoding (float summation order only)
    assert "row_bands" in TwinFlowVAEDecode.INPUT_TYPES()["optional"]
    (banded,) = TwinFlowVAEDecode().decode(vae, latent, "off", 512, 64, row_bands=3)
    (whole,) = TwinFlowVAEDecode().decode(vae, latent, "off", 512, 64, row_bands=1)
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="row_bands"):
        TwinFlowVAEDecode().decode(vae, latent, "off", 512, 64, row_bands=-1)


def test_image_latent_and_bad_inputs(vae):
    (out,) = TwinFlowVAEDecode().decode(vae, {"samples": torch.randn(2, 16, 3, 3)}, "off", 512, 64)
    assert out.shape == (2, 24, 24, 3)  # 4-D image latents are one frame each
    with pytest.raises(ValueError, match="16"):
        TwinFlowVAEDecode().decode(vae, {"samples": torch.randn(1, 4, 1, 3, 3)}, "off", 512, 64)
    with pytest.raises(TypeError, match="TWINFLOW_VAE"):
        TwinFlowVAEEncode().encode(object(), torch.rand(1, 8, 8, 3))
    with pytest.raises(ValueError, match="IMAGE"):
        TwinFlowVAEEncode().encode(vae, torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="random"):
        TwinFlowLoadVAE().load("random:nope", "default", 0)


def test_load_from_models_folder(tf_dirs, vae):
    from safetensors.torch import save_file

    (tf_dirs["models"] / "vae").mkdir()
    save_file({"first_stage_model." + k: v.half().contiguous() for k, v in vae.state_dict().items()},
              str(tf_dirs["models"] / "vae" / "wan_tiny.safetensors"))
    names = TwinFlowLoadVAE.INPUT_TYPES()["required"]["vae_name"][0]
    assert names[:2] == ["random:tiny", "random:wan2.1"] and "wan_tiny.safetensors" in names
    (loaded,) = TwinFlowLoadVAE().load("wan_tiny.safetensors", "default", 0)
    assert isinstance(loaded, wan_vae.WanVAE) and loaded.dtype == torch.float16
    (as32,) = TwinFlowLoadVAE().load("wan_tiny.safetensors", "fp32", 0)
    assert as32.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        TwinFlowLoadVAE().load("missing.safetensors", "default", 0)


def test_roundtrip_workflow_runs_headless(tf_dirs):
    from pathlib import Path

    api = pytest.importorskip("twinflow.runner.api")
    wf = Path(__file__).resolve().parents[1] / "workflows" / "vae_roundtrip.json"
    result = api.run_workflow(str(wf), output_dir=tf_dirs["output"], cache=False)
    saved = result["6"]["images"]
    assert len(saved) == 1 and result["6"]["animated"] == [True]
    assert (tf_dirs["output"] / saved[0]["subfolder"] / saved[0]["filename"]).is_file()
