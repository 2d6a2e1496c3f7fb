"""umT5-XXL text encoder (Wan2.1's), read from the one safetensors file ComfyUI ships, with its own tokenizer.

Architecture (T5 v1.1 encoder, "umt5" flavour): token embedding `shared`, N blocks of
[RMSNorm -> self-attention with a per-block relative position bias -> residual,
 RMSNorm -> gated-GELU(tanh) FFN (wi_0 gate, wi_1 linear, wo) -> residual], a final RMSNorm.
Attention is unscaled (no 1/sqrt(d_kv)), as in T5. The config is read from tensor shapes, so small
test files load; the real file is d_model 4096, 24 blocks, 64 heads of 64, d_ff 10240, vocab 256384.

ComfyUI's file layout (`umt5_xxl_fp16.safetensors`, `..._fp8_e4m3fn_scaled.safetensors`):
`shared.weight`, `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`,
`encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight`, `encoder.block.N.layer.0.layer_norm.weight`,
`encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`, `encoder.block.N.layer.1.layer_norm.weight`,
`encoder.final_layer_norm.weight`, the sentencepiece model as a uint8 tensor `spiece_model`, and in fp8
"scaled" files a marker `scaled_fp8` plus a `<linear>.scale_weight` per Linear (weight = fp8 * scale).

Numerics follow ComfyUI's text-encoder path: weights stay in the file's dtype and are cast to the input's
dtype at each Linear (fp8 weights times their scale); activations run in float32.

Prompt handling follows ComfyUI's tokenizer for umT5 (`SDTokenizer` with `(text:1.2)` weights): segments are
tokenized separately without their end token, one end token (id 1) closes the prompt, and the sequence is
padded with id 0 to at least 512 tokens. The attention mask covers the tokens up to and including the end
token; positions after it are zeroed in the output. Weighted tokens are pushed away from the encoding of an
empty prompt: z = (z - z_empty) * w + z_empty.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError
from .loading import load_file

logger = logging.getLogger(__name__)

END_TOKEN, PAD_TOKEN = 1, 0  # umT5's </s> and <pad>, as ComfyUI appends/pads them
MIN_LENGTH = 512  # ComfyUI pads umT5 prompts to at least 512 tokens (Wan's text_len)
EMBEDDING_WORD = "embedding:"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
INSTALL_HINT = "pip install sentencepiece"


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.d_kv * self.num_heads


PRESETS = {
    "xxl": UMT5Config(),
    "tiny": UMT5Config(vocab_size=256, d_model=32, d_kv=8, num_heads=2, d_ff=48, num_layers=2),
}


# ------------------------------------------------------------------------------------------ blocks


class CastLinear(nn.Module):
    """A bias-free Linear whose weight keeps the file's dtype and is cast to the input's dtype per call.

    fp8 "scaled" weights carry `scale_weight` (a scalar): the effective weight is weight * scale."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.scale_weight: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(device=w.device, dtype=x.dtype)
        return F.linear(x, w)


class RMSNorm(nn.Module):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucket of (key - query): half the buckets per sign, exact below num_buckets/4,
    logarithmic up to max_distance, the last bucket beyond."""
    half = num_buckets // 2
    out = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    # log bins; computed in float32 and truncated, as the Mesh-TensorFlow original
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return out + torch.where(n < exact, n, large)


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.q = CastLinear(cfg.d_model, cfg.inner_dim)
        self.k = CastLinear(cfg.d_model, cfg.inner_dim)
        self.v = CastLinear(cfg.d_model, cfg.inner_dim)
        self.o = CastLinear(cfg.inner_dim, cfg.d_model)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)  # umT5: one per block
        self.relative_attention_bias.weight.requires_grad_(False)

    def position_bias(self, length: int, device, dtype) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        bias = self.relative_attention_bias.weight.to(dtype)[bucket]  # (L, L, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (lin(x).view(b, n, h, d).transpose(1, 2) for lin in (self.q, self.k, self.v))  # (B, H, L, d)
        bias = self.position_bias(n, x.device, x.dtype) + mask_bias
        # T5 attention is unscaled: SDPA's 1/sqrt(d) is cancelled by scale=1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


class GatedFFN(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.wi_0 = CastLinear(cfg.d_model, cfg.d_ff)
        self.wi_1 = CastLinear(cfg.d_model, cfg.d_ff)
        self.wo = CastLinear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class _AttnLayer(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class _FFLayer(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.DenseReluDense = GatedFFN(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.layer = nn.ModuleList([_AttnLayer(cfg), _FFLayer(cfg)])

    def forward(self, x, mask_bias):
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), mask_bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


class _Stack(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class UMT5Encoder(nn.Module):
    """The encoder: token ids [B, L] + mask [B, L] -> hidden states [B, L, d_model] (float32)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.shared.weight.requires_grad_(False)
        self.encoder = _Stack(cfg)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.shared.weight[ids].to(torch.float32)  # (B, L, D)
        if self.shared.weight.dtype in FP8_DTYPES:
            x = torch.nan_to_num(x)  # fp8 tables may hold NaN codes (ComfyUI does the same)
        # key mask as an additive bias: masked keys get -max (not -inf, so fully masked rows stay finite)
        mask_bias = (1.0 - mask.to(x.dtype))[:, None, None, :] * -torch.finfo(x.dtype).max  # (B, 1, 1, L)
        for blk in self.encoder.block:
            x = blk(x, mask_bias)
        return self.encoder.final_layer_norm(x)


# -------------------------------------------------------------------------------------- loading


def _key(i: int, rest: str) -> str:
    return f"encoder.block.{i}.{rest}"


def detect_config(sd: dict, source: str = "state dict") -> UMT5Config:
    """The encoder's size from tensor shapes (as ComfyUI's detection reads block widths)."""
    def need(k):
        if k not in sd:
            raise CheckpointError(f"{source}: not a umT5 text encoder: missing key {k!r} (expected ComfyUI's "
                                  f"umt5_xxl_*.safetensors layout: shared.weight, encoder.block.N.layer...)")
        return sd[k]

    vocab, d_model = need("shared.weight").shape
    n = 0
    while _key(n, "layer.0.SelfAttention.q.weight") in sd:
        n += 1
    if n == 0:
        need(_key(0, "layer.0.SelfAttention.q.weight"))
    inner = need(_key(0, "layer.0.SelfAttention.q.weight")).shape[0]
    heads = need(_key(0, "layer.0.SelfAttention.relative_attention_bias.weight")).shape[1]
    buckets = sd[_key(0, "layer.0.SelfAttention.relative_attention_bias.weight")].shape[0]
    d_ff = need(_key(0, "layer.1.DenseReluDense.wi_0.weight")).shape[0]
    if inner % heads:
        raise CheckpointError(f"{source}: attention width {inner} is not a multiple of {heads} heads")
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads, d_ff=d_ff,
                      num_layers=n, num_buckets=buckets)


def _expected(model: UMT5Encoder) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def encoder_from_state_dict(sd: dict, source: str = "state dict") -> UMT5Encoder:
    """Build the encoder from a state dict in ComfyUI's layout (fp32/fp16/bf16/fp8-scaled); weights keep their
    dtype (fp8 keeps fp8 plus its scale)."""
    sd = {k: v for k, v in sd.items() if k not in ("spiece_model", "scaled_fp8")}
    sd.pop("encoder.embed_tokens.weight", None)  # transformers' tied copy of shared.weight
    scales = {k[: -len(".scale_weight")]: sd.pop(k) for k in [k for k in sd if k.endswith(".scale_weight")]}
    for k in [k for k in sd if k.endswith(".scale_input")]:
        sd.pop(k)  # only used by fp8 matmul kernels; the weight math does not need it
    cfg = detect_config(sd, source)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    expected = _expected(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in wrong[:5]))
        raise CheckpointError(f"{source}: does not match a umT5 encoder of the detected size "
                              f"({cfg.num_layers} blocks, d_model {cfg.d_model}): {'; '.join(parts)}")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}; expected floating point weights")
    model.load_state_dict(sd, assign=True)
    for name, mod in model.named_modules():
        if isinstance(mod, CastLinear) and name in scales:
            mod.scale_weight = scales.pop(name).to(torch.float32)
    if scales:
        raise CheckpointError(f"{source}: scale_weight for unknown layers {sorted(scales)[:5]}")
    return model.eval()


class Tokenizer:
    """ComfyUI's umT5 prompt tokenization on top of the file's own sentencepiece model."""

    def __init__(self, proto: bytes, source: str = "tokenizer"):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(f"the umT5 tokenizer needs the sentencepiece package: {INSTALL_HINT}") from None
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto, add_bos=False, add_eos=True)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise CheckpointError(f"{source}: the spiece_model entry is not a valid sentencepiece model: {e}") from None

    def pieces(self, text: str) -> list[int]:
        """Token ids of one text segment without the end token the processor appends."""
        return list(self.sp.encode(text))[:-1]

    def __call__(self, text: str, min_length: int = MIN_LENGTH) -> list[tuple[int, float]]:
        """(token id, weight) pairs for a prompt, closed by the end token and padded to `min_length`."""
        out: list[tuple[int, float]] = []
        for segment, weight in parse_weights(text):
            for word in _split_embeddings(segment):
                if word.startswith(EMBEDDING_WORD):
                    raise ValueError(f"the prompt uses a textual-inversion embedding ({word.split()[0]!r}); the "
                                     f"headless umT5 encoder has no embeddings folder. Remove it from the prompt.")
                out += [(t, weight) for t in self.pieces(word)]
        out.append((END_TOKEN, 1.0))
        out += [(PAD_TOKEN, 1.0)] * max(0, min_length - len(out))
        return out


def _split_embeddings(segment: str) -> list[str]:
    """ComfyUI splits a segment before every ' embedding:' / newline+'embedding:' and drops empty pieces."""
    parts = re.split(" " + EMBEDDING_WORD + "|\n" + EMBEDDING_WORD, segment)
    words = [parts[0]] + [EMBEDDING_WORD + p for p in parts[1:]]
    return [w for w in words if w != ""]


_ESC = (("\\)", "\0\1"), ("\\(", "\0\2"))


def _parenthesised(text: str) -> list[str]:
    """Split into top-level runs: plain text and balanced `( ... )` groups (the parentheses kept)."""
    out, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if cur:
                    out.append(cur)
                cur = ""
            cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(cur + ")")
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for run in _parenthesised(text):
        if len(run) >= 2 and run[0] == "(" and run[-1] == ")":
            inner = run[1:-1]
            w = weight * 1.1  # a bare (group) multiplies by 1.1; (text:1.3) sets 1.3
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weights(inner, w)
        else:
            out.append((run, weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """ComfyUI's prompt weighting: `(a:1.3)` sets a weight, `(a)` multiplies by 1.1, `\\(` is a literal."""
    for a, b in _ESC:
        text = text.replace(a, b)
    out = []
    for seg, w in _weights(text, 1.0):
        for a, b in _ESC:
            seg = seg.replace(b, a[1:])
        out.append((seg, w))
    return out


class UMT5TextModel:
    """The loaded text encoder (type CLIP headless): `encode(text) -> [1, L, d_model]` float32."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: Optional[Tokenizer], source: str, device="cpu"):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.source = source
        self.device = torch.device(device)

    @property
    def width(self) -> int:
        return self.encoder.cfg.d_model

    def tokenize(self, text: str) -> list[tuple[int, float]]:
        if self.tokenizer is None:
            raise CheckpointError(
                f"{self.source}: the file has no 'spiece_model' entry, so it carries no tokenizer. ComfyUI's "
                f"repackaged umT5 files (umt5_xxl_fp16 / fp8_e4m3fn_scaled .safetensors from Comfy-Org's "
                f"Wan_2.1_ComfyUI_repackaged) include it; use one of those.")
        return self.tokenizer(text)

    def _run(self, ids: list[int]) -> torch.Tensor:
        """ComfyUI's masked encode (keys masked after the first end token, the outputs there zeroed), computed
        on the unmasked tokens only: in T5 a token sees the others through attention alone, masked keys add
        nothing to it, and the relative position bias depends on distances only, so the unmasked tokens' outputs
        are the same as in the padded pass (to rounding) and the rest are zeros. A prompt of 40 tokens padded to
        ComfyUI's 512 costs 40 tokens instead of 512."""
        eos = ids.index(END_TOKEN) if END_TOKEN in ids else len(ids) - 1
        n = eos + 1  # up to and including the first end token
        t = torch.tensor([ids[:n]], dtype=torch.long, device=self.device)
        z = self.encoder(t, torch.ones_like(t)).float().cpu()
        out = torch.zeros(1, len(ids), z.shape[-1], dtype=z.dtype)
        out[:, :n] = z
        return out

    def encode(self, text: str) -> torch.Tensor:
        pairs = self.tokenize(text)
        z = self._run([t for t, _ in pairs])
        if any(w != 1.0 for _, w in pairs):
            empty = self._run([END_TOKEN] + [PAD_TOKEN] * (len(pairs) - 1))
            w = torch.tensor([w for _, w in pairs], dtype=z.dtype)[None, :, None]
            z = torch.where(w != 1.0, (z - empty) * w + empty, z)
        return z


def load_umt5_file(path, device="cpu") -> UMT5TextModel:
    """Load ComfyUI's single-file umT5 (fp32/fp16/bf16/fp8_scaled) with the tokenizer it carries."""
    source = str(path)
    sd, _meta = load_file(Path(path))
    for prefix in ("umt5xxl.transformer.", "text_encoders.umt5xxl.transformer."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    spiece = sd.get("spiece_model")
    tokenizer = None
    if spiece is not None:
        tokenizer = Tokenizer(spiece.cpu().numpy().tobytes(), source)
    encoder = encoder_from_state_dict(sd, source).to(device)
    cfg = encoder.cfg
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in encoder.state_dict().values()})
    logger.info("umT5 loaded from %s: %d blocks, d_model %d, %d heads, dtypes %s, tokenizer %s", source,
                cfg.num_layers, cfg.d_model, cfg.num_heads, dtypes, "from file" if tokenizer else "none")
    return UMT5TextModel(encoder, tokenizer, source, device)


def random_state_dict(cfg: UMT5Config, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.05) -> dict:
    """Seeded random weights in ComfyUI's layout (tests, demos); norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = _expected(UMT5Encoder(cfg))
    out = {}
    for k, shape in shapes.items():
        if k.endswith("layer_norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif k == "shared.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        out[k] = t.to(dtype)
    return out
