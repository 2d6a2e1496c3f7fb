"""CLIP vision encoder (ViT-H/14 as Wan2.1 image-to-video uses it), read from ComfyUI's `clip_vision_h.safetensors`.

Architecture (OpenAI/OpenCLIP ViT, transformers' `CLIPVisionModelWithProjection` layout): a patch convolution
without bias, a learned class token and position table, `pre_layrnorm`, N pre-norm blocks [LayerNorm ->
multi-head self-attention (q/k/v/out projections with bias) -> residual, LayerNorm -> MLP fc1 -> activation -> fc2
-> residual], then `post_layernorm` on the class token and a bias-free `visual_projection`. ViT-H/14: width 1280,
32 blocks, 16 heads, MLP 5120, patch 14, image 224 (257 tokens), projection 1024, exact (erf) GELU.

File layouts: transformers' keys (`vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`,
`vision_model.pre_layrnorm`, `vision_model.post_layernorm`, `visual_projection`), which is what ComfyUI ships;
open_clip's `visual.*` layout (fused `in_proj` attention, `proj` stored transposed) is converted on load as
ComfyUI converts it. Text-tower keys of a full CLIP file and transformers' `position_ids` buffer are ignored.

Config from tensor shapes: width, layers, MLP width, patch, image size (from the position table) and projection.
Two things the shapes cannot tell are taken as ComfyUI's config files set them: 16 attention heads (every
ComfyUI CLIP vision config) and the activation by depth (ComfyUI picks its JSON by layer count: 31+ blocks are
ViT-H/G with `gelu`, 23-30 are ViT-L with `quick_gelu`). Smaller files (tests) get ViT-H's `gelu`. A safetensors
metadata entry `num_attention_heads` / `hidden_act` (transformers' names) or the loader's arguments override both.

Numerics follow ComfyUI's `comfy.clip_vision.ClipVisionModel`: weights keep their storage dtype and are cast to
the activations' dtype at each layer (ComfyUI's manual_cast); activations run in float32 (pixel values are cast
to float32 after preprocessing). Preprocessing is ComfyUI's `clip_preprocess` (see `preprocess`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError
from .loading import check_state_dict, expected_shapes, load_file

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (ComfyUI's clip_preprocess defaults)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROPS = ("center", "none")  # CLIPVisionEncode's crop choices
ACTIVATIONS = ("gelu", "quick_gelu")
COMFYUI_HEADS = 16  # num_attention_heads of every ComfyUI CLIP vision config (L, H, G)
ANCHOR = "vision_model.embeddings.patch_embedding.weight"
OPEN_CLIP_ANCHOR = "visual.transformer.resblocks.0.attn.in_proj_weight"
OPEN_CLIP_TEXT = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                  "logit_scale", "attn_mask")  # a full open_clip model's text tower: not used, as in ComfyUI


@dataclass(frozen=True)
class ClipVisionConfig:
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp: int = 5120
    patch: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    activation: str = "gelu"
    channels: int = 3
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1  # patches + the class token


PRESETS = {
    "vit_h14": ClipVisionConfig(),  # clip_vision_h.safetensors (Wan2.1 I2V / FLF2V)
    "vit_l14": ClipVisionConfig(width=1024, layers=24, heads=16, mlp=4096, projection_dim=768, activation="quick_gelu"),
    "tiny": ClipVisionConfig(width=32, layers=3, heads=4, mlp=64, patch=4, image_size=16, projection_dim=24),
}


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: what ComfyUI's CLIPVisionEncode returns, float32 on the CPU.

    `last_hidden_state` (B, T, width): the last block's output (no post_layernorm), `penultimate_hidden_states`
    (B, T, width): the second-to-last block's output, which Wan I2V consumes as `clip_fea` ((B, 257, 1280) for
    ViT-H); `image_embeds` (B, projection_dim): visual_projection(post_layernorm(class token)); `mm_projected`:
    a LLaVA projector's output in ComfyUI, always None here (no projector is loaded)."""

    last_hidden_state: torch.Tensor
    image_embeds: torch.Tensor
    penultimate_hidden_states: Optional[torch.Tensor]
    mm_projected: Optional[torch.Tensor] = None

    def __getitem__(self, key: str):  # ComfyUI's Output is also read as output["penultimate_hidden_states"]
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: str) -> bool:
        return key in ("last_hidden_state", "image_embeds", "penultimate_hidden_states", "mm_projected")


# ------------------------------------------------------------------------------------------ blocks
# Weights keep the file's dtype; every layer casts them to the activations' dtype (ComfyUI's manual_cast).


class _Linear(nn.Linear):
    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class _LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = _Linear(cfg.width, cfg.width)
        self.k_proj = _Linear(cfg.width, cfg.width)
        self.v_proj = _Linear(cfg.width, cfg.width)
        self.out_proj = _Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, d_head)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every token
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.fc1 = _Linear(cfg.width, cfg.mlp)
        self.fc2 = _Linear(cfg.mlp, cfg.width)
        self.act = F.gelu if cfg.activation == "gelu" else quick_gelu  # "gelu" is the exact (erf) form

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layer_norm1 = _LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = _LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width)

    def forward(self, pixels):
        w = self.patch_embedding.weight.to(pixels.dtype)
        x = F.conv2d(pixels, w, stride=self.patch_embedding.stride).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)  # (B, T, D)


class _Encoder(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.layers)])


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = _LayerNorm(cfg.width, eps=cfg.eps)  # sic: transformers' spelling, kept for the keys
        self.encoder = _Encoder(cfg)
        self.post_layernorm = _LayerNorm(cfg.width, eps=cfg.eps)


class ClipVisionModel(nn.Module):
    """CLIP_VISION: `encode_image(image [B, H, W, C] in 0..1, crop="center") -> ClipVisionOutput`."""

    def __init__(self, cfg: ClipVisionConfig, source: str = "clip vision"):
        super().__init__()
        self.cfg = cfg
        self.source = source
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = _Linear(cfg.width, cfg.projection_dim, bias=False)

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor):
        """Normalised pixels (B, 3, S, S) -> (last_hidden_state, penultimate_hidden_states, image_embeds)."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        penultimate = None
        n = len(vm.encoder.layers)
        for i, layer in enumerate(vm.encoder.layers):
            x = layer(x)
            if i == n - 2:  # ComfyUI's intermediate_output=-2 (None for a one-block model, as there)
                penultimate = x.clone()
        pooled = vm.post_layernorm(x[:, 0, :])  # the class token
        return x, penultimate, self.visual_projection(pooled)

    def encode_image(self, image: torch.Tensor, crop: Union[str, bool] = "center") -> ClipVisionOutput:
        """ComfyUI's ClipVisionModel.encode_image: preprocess, run in float32, outputs float32 on the CPU.

        `crop`: "center" (or True) scales the short side to the model's size and center-crops; "none" (or
        False) resizes the whole image to a square."""
        if isinstance(crop, str):
            if crop not in CROPS:
                raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
            crop = crop == "center"
        pixels = preprocess(image.to(self.device), self.cfg.image_size, crop=bool(crop)).float()
        last, penultimate, embeds = self(pixels)
        cpu = torch.device("cpu")
        return ClipVisionOutput(last_hidden_state=last.to(cpu), image_embeds=embeds.to(cpu),
                                penultimate_hidden_states=None if penultimate is None else penultimate.to(cpu))


# ------------------------------------------------------------------------------------------ preprocessing


def preprocess(image: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, crop: bool = True) -> torch.Tensor:
    """ComfyUI's `clip_preprocess`: IMAGE (B, H, W, C) in 0..1 -> normalised pixels (B, 3, size, size).

    Extra channels (alpha) are dropped. Unless the image is already size x size: with `crop`, bicubic +
    antialias resize so the short side is `size` (the other side rounded), then a center crop; without, a
    bicubic + antialias resize of the whole image to size x size. Pixels are then quantised to 8-bit levels
    (clip to 0..255, round, /255) and normalised with CLIP's mean/std. Runs in the image's dtype."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE [B, H, W, C>=3], got shape {tuple(image.shape)}")
    x = image[..., :3].movedim(-1, 1)  # (B, 3, H, W)
    h, w = x.shape[2], x.shape[3]
    if not (h == size and w == size):
        if crop:
            scale = size / min(h, w)
            target = (round(scale * h), round(scale * w))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------ loading


def _layer(i: int, rest: str) -> str:
    return f"vision_model.encoder.layers.{i}.{rest}"


def convert_open_clip(sd: dict, prefix: str = "visual.") -> dict:
    """open_clip's `visual.*` layout -> transformers' (ComfyUI's convert_to_transformers): split the fused
    in_proj into q/k/v, rename the blocks and norms, transpose `proj` into visual_projection.weight. A full
    model's text tower is dropped."""
    out = {}
    names = {"class_embedding": "vision_model.embeddings.class_embedding",
             "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for k, v in sd.items():
        if not k.startswith(prefix):
            if not k.startswith(OPEN_CLIP_TEXT):
                out[k] = v  # not open_clip's text tower: left for the unexpected-key check
            continue
        rest = k[len(prefix):]
        if rest in names:
            out[names[rest]] = v
        elif rest == "proj":
            out["visual_projection.weight"] = v.t().contiguous()  # open_clip stores x @ proj
        elif rest.startswith("transformer.resblocks."):
            i, tail = rest[len("transformer.resblocks."):].split(".", 1)
            if tail.startswith("attn.in_proj_"):
                kind = tail[len("attn.in_proj_"):]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[_layer(int(i), f"self_attn.{name}.{kind}")] = part.contiguous()
                continue
            mod, _, param = tail.rpartition(".")
            out[_layer(int(i), f"{block.get(mod, mod)}.{param}")] = v
        else:
            out[k] = v  # unknown visual key: reported as unexpected
    return out


def _ignored(key: str) -> bool:
    """Keys a CLIP vision file may carry that the vision tower does not use (ComfyUI drops them too)."""
    return (key == "vision_model.embeddings.position_ids" or key.startswith(("text_model.", "text_projection",
            "logit_scale", "multi_modal_projector.")))


def _family_hint(sd: dict) -> str:
    if any(".layer_scale2.lambda1" in k for k in sd):
        return " It looks like a DINOv2 image encoder, which the headless runner does not load."
    if "vision_model.embeddings.patch_embedding.bias" in sd and "vision_model.embeddings.class_embedding" not in sd:
        return " It looks like a SigLIP vision encoder (no class token), which the headless runner does not load."
    if any(k.startswith(("blocks.", "model.diffusion_model.", "encoder.conv1", "decoder.")) for k in sd):
        return " It looks like a diffusion model or VAE; put CLIP vision files (clip_vision_h.safetensors) in models/clip_vision."
    if any(k.startswith(("encoder.block.", "shared.")) for k in sd):
        return " It looks like a T5/umT5 text encoder (models/text_encoders)."
    return ""


def detect_config(sd: dict, source: str = "state dict", meta: Optional[dict] = None) -> ClipVisionConfig:
    """The encoder's size from tensor shapes (transformers' layout); heads/activation as the module doc says."""
    def need(k):
        if k not in sd:
            raise CheckpointError(f"{source}: not a CLIP vision model: missing key {k!r} (expected ComfyUI's "
                                  f"clip_vision_h.safetensors layout: vision_model.embeddings.*, "
                                  f"vision_model.encoder.layers.N.*, visual_projection.weight).{_family_hint(sd)}")
        return sd[k]

    pw = need(ANCHOR)
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise CheckpointError(f"{source}: {ANCHOR} has shape {tuple(pw.shape)}; expected (width, 3, patch, patch)")
    width, channels, patch = pw.shape[0], pw.shape[1], pw.shape[2]
    need("vision_model.embeddings.class_embedding")
    tokens = need("vision_model.embeddings.position_embedding.weight").shape[0]
    side = round((tokens - 1) ** 0.5)
    if side * side != tokens - 1:
        raise CheckpointError(f"{source}: position table has {tokens} rows; expected a square grid of patches + 1 "
                              f"class token")
    layers = 0
    while _layer(layers, "layer_norm1.weight") in sd:
        layers += 1
    mlp = need(_layer(0, "mlp.fc1.weight")).shape[0]
    proj = need("visual_projection.weight").shape[0]
    meta = meta or {}
    heads = int(meta.get("num_attention_heads", COMFYUI_HEADS))
    activation = meta.get("hidden_act") or ("quick_gelu" if 23 <= layers <= 30 else "gelu")
    cfg = ClipVisionConfig(width=width, layers=layers, heads=heads, mlp=mlp, patch=patch, image_size=side * patch,
                           projection_dim=proj, activation=activation, channels=channels)
    return _checked(cfg, source)


def _checked(cfg: ClipVisionConfig, source: str) -> ClipVisionConfig:
    if cfg.activation not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation {cfg.activation!r} is not supported; expected one of "
                              f"{list(ACTIVATIONS)}")
    if cfg.heads <= 0 or cfg.width % cfg.heads:
        raise CheckpointError(f"{source}: width {cfg.width} is not a multiple of {cfg.heads} attention heads; pass "
                              f"heads= to load_clip_vision (ComfyUI's configs all use {COMFYUI_HEADS})")
    return cfg


def model_from_state_dict(sd: dict, source: str = "state dict", meta: Optional[dict] = None,
                          heads: Optional[int] = None, activation: Optional[str] = None) -> ClipVisionModel:
    """Build the model from a state dict (transformers or open_clip layout); weights keep their dtype."""
    if OPEN_CLIP_ANCHOR in sd:
        sd = convert_open_clip(sd)
    elif ANCHOR not in sd:
        prefixed = [k for k in sd if k.endswith("." + ANCHOR)]  # e.g. a checkpoint's "clip_vision." section
        if len(prefixed) == 1:
            prefix = prefixed[0][: -len(ANCHOR)]
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    cfg = detect_config(sd, source, meta)
    overrides = {k: v for k, v in (("heads", heads), ("activation", activation)) if v is not None}
    cfg = _checked(replace(cfg, **overrides), source)
    if any(k.startswith("multi_modal_projector.") for k in sd):
        logger.warning("%s: the file's LLaVA multi_modal_projector is not loaded (mm_projected stays None)", source)
    sd = {k: v for k, v in sd.items() if not _ignored(k)}
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}; expected floating point weights")
    with torch.device("meta"):
        model = ClipVisionModel(cfg, source)
    check_state_dict(sd, expected_shapes(model), f"{source} (CLIP vision, {cfg.layers} layers, width {cfg.width})")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def load_clip_vision(path, device=None, dtype: Optional[torch.dtype] = None, heads: Optional[int] = None,
                     activation: Optional[str] = None) -> ClipVisionModel:
    """Load a CLIP vision file (ComfyUI's clip_vision_h.safetensors, transformers or open_clip layout).

    Args:
        path: the checkpoint file.
        device: where the weights go (default CPU).
        dtype: storage dtype of the weights (None keeps the file's; compute is float32 either way).
        heads, activation: override what the shapes cannot tell (see the module docstring).
    Raises:
        CheckpointError naming the file and the key when it is not a (supported) CLIP vision model.
    """
    source = str(path)
    sd, meta = load_file(Path(path))
    model = model_from_state_dict(sd, source, meta, heads=heads, activation=activation)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    cfg = model.cfg
    logger.info("CLIP vision loaded from %s: %d layers, width %d, %d heads, %s, image %d, patch %d", source,
                cfg.layers, cfg.width, cfg.heads, cfg.activation, cfg.image_size, cfg.patch)
    return model


def random_state_dict(cfg: ClipVisionConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                      std: float = 0.05) -> dict:
    """Seeded random weights in transformers' layout (tests, demos); norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = expected_shapes(ClipVisionModel(cfg))
    out = {}
    for k, shape in shapes.items():
        if "norm" in k and k.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif k.endswith(("class_embedding", "position_embedding.weight")):
            t = 0.5 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        out[k] = t.to(dtype)
    return out


def random_model(preset: str = "tiny", seed: int = 0) -> ClipVisionModel:
    """A model of a named preset with `random_state_dict` weights."""
    cfg = PRESETS[preset]
    return model_from_state_dict(random_state_dict(cfg, seed), f"random:{preset}",
                                 meta={"num_attention_heads": cfg.heads, "hidden_act": cfg.activation})
