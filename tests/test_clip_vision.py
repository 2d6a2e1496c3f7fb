"""CLIP vision (models/clip_vision.py): parity with transformers' CLIPVisionModelWithProjection on small random
configs (keys mapped one to one), the real ViT-H key table, ComfyUI's clip_preprocess, open_clip layout, bad files."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from twinflow.core.errors import CheckpointError
from twinflow.models import clip_vision as C

REF = Path(__file__).resolve().parent / "fixtures" / "reference" / "clip_vision_h_keys.tsv"  # vendored (README.md)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _hf_model(act, layers=3, width=32, heads=4, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width + 8, num_hidden_layers=layers,
                                        num_attention_heads=heads, image_size=20, patch_size=4, projection_dim=24,
                                        hidden_act=act, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():  # transformers initialises norms to 1/0: move them so the norms are exercised
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def _hf_outputs(hf, pixels):
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states[-2], out.image_embeds


def _save(sd, path, **meta):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={k: str(v) for k, v in meta.items()})
    return path


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_matches_transformers(act, tmp_path):
    hf = _hf_model(act)
    sd = hf.state_dict()
    path = _save(sd, tmp_path / "cv.safetensors", hidden_act=act, num_attention_heads=4)
    model = C.load_clip_vision(path)
    assert model.cfg == C.ClipVisionConfig(width=32, layers=3, heads=4, mlp=72, patch=4, image_size=20,
                                           projection_dim=24, activation=act)
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    ours = model(pixels)
    for name, a, b in zip(("last_hidden_state", "penultimate", "image_embeds"), ours, _hf_outputs(hf, pixels)):
        assert a.shape == b.shape, name
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def test_activation_and_heads_arguments_and_defaults(tmp_path):
    """Without metadata a small file gets ViT-H's gelu and ComfyUI's 16 heads; arguments override both."""
    hf = _hf_model("quick_gelu", width=32, heads=4)
    path = _save(hf.state_dict(), tmp_path / "plain.safetensors")
    plain = C.load_clip_vision(path)
    assert (plain.cfg.heads, plain.cfg.activation) == (16, "gelu")
    model = C.load_clip_vision(path, heads=4, activation="quick_gelu")
    pixels = torch.randn(1, 3, 20, 20)
    assert _rel(model(pixels)[2], _hf_outputs(hf, pixels)[2]) <= 1e-5
    with pytest.raises(CheckpointError, match="not a multiple of 5 attention heads"):
        C.load_clip_vision(path, heads=5)
    with pytest.raises(CheckpointError, match="activation 'relu' is not supported"):
        C.load_clip_vision(path, activation="relu")


def test_depth_rule_follows_comfyui_config_choice():
    """ComfyUI picks its JSON by depth: 23-30 blocks -> ViT-L (quick_gelu), 31+ -> ViT-H/G (gelu)."""
    for layers, act in ((24, "quick_gelu"), (32, "gelu"), (48, "gelu"), (4, "gelu")):
        cfg = C.ClipVisionConfig(width=16, layers=layers, heads=4, mlp=8, patch=2, image_size=4, projection_dim=4)
        sd = {k: torch.empty(s, device="meta") for k, s in _meta_shapes(cfg).items()}
        assert C.detect_config(sd).activation == act, layers


def test_penultimate_is_second_to_last_block(tmp_path):
    """penultimate_hidden_states is the output of block N-2 (0-based), before any norm: check by truncation."""
    model = C.random_model("tiny", seed=3)
    pixels = torch.randn(1, 3, 16, 16)
    last, pen, _ = model(pixels)
    vm = model.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    for layer in list(vm.encoder.layers)[:-1]:
        x = layer(x)
    assert torch.equal(x, pen)
    assert torch.equal(vm.encoder.layers[-1](x), last)


def test_open_clip_layout_loads_to_the_same_model(tmp_path):
    """open_clip's visual.* keys (fused in_proj, transposed proj), built here from the transformers keys."""
    hf = _hf_model("gelu")
    sd = hf.state_dict()
    oc = {"visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
          "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
          "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
          "visual.proj": sd["visual_projection.weight"].t()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            oc[f"visual.{theirs}.{p}"] = sd[f"vision_model.{ours}.{p}"]
    for i in range(3):
        pre = f"vision_model.encoder.layers.{i}."
        blk = f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            oc[blk + f"attn.in_proj_{p}"] = torch.cat([sd[pre + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                oc[blk + f"{a}.{p}"] = sd[pre + f"{b}.{p}"]
    text_tower = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4), "token_embedding.weight":
                  torch.zeros(5, 4), "positional_embedding": torch.zeros(3, 4), "ln_final.weight": torch.ones(4),
                  "text_projection": torch.zeros(4, 4), "logit_scale": torch.ones(())}
    oc.update(text_tower)  # a full open_clip model: its text tower is dropped, as ComfyUI ignores it
    oc["text.token_embedding.weight"] = torch.zeros(3)  # not open_clip's: must be reported, not silently dropped
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): text.token_embedding"):
        C.load_clip_vision(_save(oc, tmp_path / "bad.safetensors", num_attention_heads=4))
    oc.pop("text.token_embedding.weight")
    model = C.load_clip_vision(_save(oc, tmp_path / "oc.safetensors", num_attention_heads=4))
    pixels = torch.randn(1, 3, 20, 20)
    for a, b in zip(model(pixels), _hf_outputs(hf, pixels)):
        assert _rel(a, b) <= 1e-5


def test_fp16_file_keeps_storage_and_computes_in_float32(tmp_path):
    sd = C.random_state_dict(C.PRESETS["tiny"], seed=2)
    p16 = _save({k: v.half() for k, v in sd.items()}, tmp_path / "h.safetensors", num_attention_heads=4)
    p32 = _save({k: v.half().float() for k, v in sd.items()}, tmp_path / "f.safetensors", num_attention_heads=4)
    m16, m32 = C.load_clip_vision(p16), C.load_clip_vision(p32)
    assert m16.visual_projection.weight.dtype == torch.float16
    img = torch.rand(1, 24, 18, 3)
    a, b = m16.encode_image(img), m32.encode_image(img)
    assert a.last_hidden_state.dtype == torch.float32
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)  # fp16 -> fp32 cast is exact


def test_extra_keys_of_a_full_clip_file_are_ignored(tmp_path):
    sd = C.random_state_dict(C.PRESETS["tiny"])
    full = {**sd, "vision_model.embeddings.position_ids": torch.arange(17)[None].float(),
            "text_model.embeddings.token_embedding.weight": torch.zeros(4, 4), "logit_scale": torch.ones(())}
    model = C.load_clip_vision(_save(full, tmp_path / "full.safetensors", num_attention_heads=4))
    prefixed = C.load_clip_vision(_save({"clip_vision." + k: v for k, v in sd.items()}, tmp_path / "p.safetensors",
                                        num_attention_heads=4))
    x = torch.randn(1, 3, 16, 16)
    assert _rel(model(x)[2], prefixed(x)[2]) <= 1e-6


# ---------------------------------------------------------------------------------------------- real ViT-H layout


def _meta_shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in C.ClipVisionModel(cfg).state_dict().items()}


def _reference_table():
    rows = [line.split("\t") for line in REF.read_text().splitlines() if line.strip()]
    return {k: tuple(ast.literal_eval(s)) for k, s, *_ in rows}


def test_vit_h_key_table():
    """The key/shape table of transformers' CLIPVisionModelWithProjection at ComfyUI's clip_vision_config_h.json
    (520 tensors, 632M parameters): our ViT-H preset has exactly these, and the config detected from them is it."""
    ref = _reference_table()
    assert len(ref) == 520 and sum(math.prod(s) for s in ref.values()) == 632_076_800
    assert _meta_shapes(C.PRESETS["vit_h14"]) == ref
    sd = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert C.detect_config(sd, "table") == C.PRESETS["vit_h14"]
    assert C.PRESETS["vit_h14"].tokens == 257


# ---------------------------------------------------------------------------------------------- preprocessing


def _reference_preprocess(image, size, crop):
    """ComfyUI 0.3.64 comfy/clip_vision.py clip_preprocess, restated from its source with torch ops (the test's
    own copy, so a change in the library is caught): RGB, bicubic+antialias resize (short side to `size` and
    center crop, or the whole image to size x size), 8-bit quantisation, CLIP mean/std."""
    x = image[:, :, :, :3].permute(0, 3, 1, 2)
    h, w = x.shape[2:]
    if (h, w) != (size, size):
        out = (round(size / min(h, w) * h), round(size / min(h, w) * w)) if crop else (size, size)
        x = F.interpolate(x, size=out, mode="bicubic", antialias=True)
        t, l = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, t:t + size, l:l + size]
    x = (x * 255).clamp(0, 255).round() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("hw", [(300, 400), (401, 233), (224, 224), (100, 224), (50, 60)])
def test_preprocess_matches_comfyui_formula(crop, hw):
    g = torch.Generator().manual_seed(hw[0] + crop)
    image = torch.rand(2, *hw, 4, generator=g)  # with an alpha channel, which is dropped
    ours = C.preprocess(image, 224, crop=crop)
    assert ours.shape == (2, 3, 224, 224)
    assert torch.equal(ours, _reference_preprocess(image, 224, crop))


def test_preprocess_crop_modes_differ_and_center_is_centered():
    """A wide image with a bright left and right edge: center crop drops the edges, 'none' squeezes them in."""
    image = torch.zeros(1, 224, 448, 3)
    image[:, :, :100] = 1.0
    image[:, :, -100:] = 1.0
    center = C.preprocess(image, 224, crop=True)
    squeezed = C.preprocess(image, 224, crop=False)
    black = (0 - C.CLIP_MEAN[0]) / C.CLIP_STD[0]
    assert torch.allclose(center[0, 0, :, 20:-20], torch.full((224, 184), black), atol=1e-6)
    assert squeezed[0, 0, :, :30].min() > 1.5  # the bright edges survive the squeeze


def test_encode_image_output_and_crop_names():
    model = C.random_model("tiny", seed=1)
    image = torch.rand(3, 40, 24, 3)
    out = model.encode_image(image, crop="center")
    assert isinstance(out, C.ClipVisionOutput)
    assert out.last_hidden_state.shape == (3, 17, 32) and out.penultimate_hidden_states.shape == (3, 17, 32)
    assert out.image_embeds.shape == (3, 24) and out.mm_projected is None
    assert out["penultimate_hidden_states"] is out.penultimate_hidden_states and "image_embeds" in out
    pixels = C.preprocess(image, 16, crop=True)
    assert torch.equal(out.image_embeds, model(pixels)[2])
    assert torch.equal(model.encode_image(image, crop=True).image_embeds, out.image_embeds)
    none = model.encode_image(image, crop="none")
    assert torch.equal(none.image_embeds, model(C.preprocess(image, 16, crop=False))[2])
    assert not torch.equal(none.image_embeds, out.image_embeds)
    with pytest.raises(ValueError, match="crop must be one of"):
        model.encode_image(image, crop="left")
    with pytest.raises(ValueError, match=r"IMAGE \[B, H, W, C>=3\]"):
        model.encode_image(torch.rand(1, 3, 16, 16)[..., :1])


# ---------------------------------------------------------------------------------------------- bad files


def test_bad_files_name_file_and_key(tmp_path):
    from twinflow.models import umt5

    good = C.random_state_dict(C.PRESETS["tiny"])
    path = _save(good, tmp_path / "good.safetensors", num_attention_heads=4)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*truncated"):
        C.load_clip_vision(trunc)
    t5 = _save(umt5.random_state_dict(umt5.PRESETS["tiny"]), tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match=r"t5.safetensors: not a CLIP vision model: missing key "
                                              r"'vision_model.embeddings.patch_embedding.weight'.*umT5"):
        C.load_clip_vision(t5)
    siglip = {k: v for k, v in good.items() if k != "vision_model.embeddings.class_embedding"}
    siglip["vision_model.embeddings.patch_embedding.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match="siglip.safetensors.*SigLIP"):
        C.load_clip_vision(_save(siglip, tmp_path / "siglip.safetensors"))
    missing = {k: v for k, v in good.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing.*layers.1.mlp.fc2.bias"):
        C.load_clip_vision(_save(missing, tmp_path / "missing.safetensors", num_attention_heads=4))
    wrong = {**good, "vision_model.post_layernorm.weight": torch.ones(31)}
    with pytest.raises(CheckpointError, match=r"wrong.safetensors.*shape mismatch.*post_layernorm.weight"):
        C.load_clip_vision(_save(wrong, tmp_path / "wrong.safetensors", num_attention_heads=4))
    ints = {**good, "vision_model.post_layernorm.bias": torch.zeros(32, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="post_layernorm.bias.*floating point"):
        C.load_clip_vision(_save(ints, tmp_path / "ints.safetensors", num_attention_heads=4))
