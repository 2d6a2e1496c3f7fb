"""Text conditioning: precomputed embeddings, a local umT5 encoder (via transformers), a deterministic tiny encoder.

Everything returns token embeddings `[B, L, D]` float32; nodes wrap them as ComfyUI's CONDITIONING
`[[tensor, {}]]`, so ComfyUI's own text encoders plug in when running inside ComfyUI.

Padding follows Wan2.1 / ComfyUI: the encoder sees an attention mask, the real tokens (the closing `</s>`
included) are kept, and every position beyond a prompt's length is exactly zero. By default the umT5 output
is padded to 512 tokens, Wan's `text_len` (ComfyUI pads to the same); `pad_to=0` pads to the longest prompt.
"""
from __future__ import annotations

import hashlib
import html
import logging
import math
import re
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.errors import CheckpointError
from ..core.log import log_once
from .loading import load_file

logger = logging.getLogger(__name__)

WAN_TEXT_LEN = 512  # Wan2.1's text_len: prompts are truncated to, and context padded to, 512 tokens
WAN_TEXT_DIM = 4096  # umT5-XXL width
EMBEDDING_KEYS = ("embeddings", "context", "prompt_embeds")  # names Load Text Embeddings looks for, in order
INSTALL_HINT = "pip install transformers sentencepiece"


def conditioning(emb: torch.Tensor) -> list:
    """ComfyUI's CONDITIONING form for token embeddings [B, L, D]."""
    return [[emb, {}]]


def pad_tokens(emb: torch.Tensor, lengths: Sequence[int], pad_to: int = 0) -> torch.Tensor:
    """Zero every position >= its prompt's length and pad (with zeros) to `pad_to` tokens (0: the longest)."""
    b, l, d = emb.shape
    target = max(max(lengths), pad_to) if pad_to else max(lengths)
    out = emb.new_zeros(b, target, d)
    for i, n in enumerate(lengths):
        out[i, :n] = emb[i, :n]
    return out


# ---------------------------------------------------------------------------------------------
# Precomputed embeddings (safetensors)
# ---------------------------------------------------------------------------------------------


def validate_embeddings(t, source: str, width: int = 0) -> torch.Tensor:
    """Check a [L, D] or [B, L, D] floating, finite tensor; return it as float32 [B, L, D]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{source}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{source}: text embeddings must be floating point, got {t.dtype}")
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or 0 in t.shape:
        raise ValueError(f"{source}: text embeddings must have shape [L, D] or [B, L, D] (tokens x width), "
                         f"got {tuple(t.shape)}")
    if width and t.shape[-1] != width:
        raise ValueError(f"{source}: embedding width {t.shape[-1]} does not match the expected {width} "
                         f"(Wan2.1 uses umT5-XXL, 4096)")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{source}: text embeddings contain NaN or infinity")
    return t


def load_text_embeddings(path, key: str = "auto", width: int = 0) -> torch.Tensor:
    """Read precomputed embeddings from a safetensors file.

    Args:
        path: the file. Key lookup with key="auto": the first of `embeddings`, `context`, `prompt_embeds`
            present, else the file's only tensor.
        key: an explicit tensor name instead.
        width: if non-zero, the required last dimension.
    Returns:
        float32 [B, L, D].
    """
    path = Path(path)
    if not path.name.lower().endswith((".safetensors", ".sft")):
        raise CheckpointError(f"{path}: text embeddings must be a .safetensors file")
    sd, _ = load_file(path)
    if not sd:
        raise CheckpointError(f"{path}: the file holds no tensors")
    if key and key != "auto":
        if key not in sd:
            raise CheckpointError(f"{path}: no tensor named {key!r}; the file has {sorted(sd)[:10]}")
        name = key
    else:
        name = next((k for k in EMBEDDING_KEYS if k in sd), None)
        if name is None:
            if len(sd) != 1:
                raise CheckpointError(f"{path}: cannot tell which tensor holds the embeddings; name it one of "
                                      f"{list(EMBEDDING_KEYS)} or set the key widget (file has {sorted(sd)[:10]})")
            name = next(iter(sd))
    return validate_embeddings(sd[name], f"{path}[{name}]", width)


def save_text_embeddings(emb: torch.Tensor, path) -> None:
    """Write embeddings [L, D] or [B, L, D] under the key `embeddings` (what Load Text Embeddings reads)."""
    from safetensors.torch import save_file

    emb = validate_embeddings(emb, str(path))
    save_file({"embeddings": emb.contiguous()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Deterministic tiny encoder (demos, CI)
# ---------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
TINY_EOS = "</s>"


def tiny_tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, then the end token (so empty text still has one token)."""
    return _TOKEN_RE.findall(text.lower()) + [TINY_EOS]


def _token_vector(token: str, width: int, salt: str) -> torch.Tensor:
    # A stable hash (blake2b, not Python's per-process salted hash()) seeds a CPU generator: the same token
    # gives the same vector in every process and on every machine.
    digest = hashlib.blake2b(f"{salt}\x00{token}".encode("utf-8"), digest_size=8).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(width, generator=gen)


def tiny_text_encode(text: str, width: int = WAN_TEXT_DIM, pad_to: int = 0, max_tokens: int = WAN_TEXT_LEN,
                     salt: str = "twinflow-tiny-text-v1") -> torch.Tensor:
    """Hashed tokens -> seeded unit-variance vectors plus a small sin-cos position code -> [1, L, width].

    Meaningless as language, but deterministic and prompt-dependent: same text -> same tensor anywhere."""
    if width < 2 or width % 2:
        raise ValueError(f"tiny text encoder width must be an even number >= 2, got {width}")
    tokens = tiny_tokenize(text)
    if len(tokens) > max_tokens:
        tokens = tokens[: max_tokens - 1] + [TINY_EOS]
    vecs = torch.stack([_token_vector(t, width, salt) for t in tokens])  # (L, D)
    pos = torch.arange(len(tokens), dtype=torch.float64)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(width // 2, dtype=torch.float64) / (width // 2))
    code = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=1).float()  # order matters too
    emb = (vecs + 0.1 * code)[None]  # (1, L, D)
    return pad_tokens(emb, [len(tokens)], pad_to)


# ---------------------------------------------------------------------------------------------
# umT5 encoder through transformers (optional extra)
# ---------------------------------------------------------------------------------------------


def require_transformers():
    """Import transformers lazily; raise a clear error naming the extra when it is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(f"the umT5 text encoder needs the optional packages transformers and sentencepiece: "
                          f"run `{INSTALL_HINT}` (or use TwinFlow Load Text Embeddings / the tiny encoder)") from None
    return transformers


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: unescape HTML entities (twice) and collapse whitespace (ftfy is not applied)."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"umT5 folder {folder} does not exist")
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("config.json")
    if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json",
                                                 "pytorch_model.bin", "pytorch_model.bin.index.json")):
        problems.append("weights (model.safetensors or pytorch_model.bin, or their .index.json)")
    if not any((folder / n).is_file() for n in ("spiece.model", "tokenizer.json")):
        problems.append("tokenizer (spiece.model or tokenizer.json)")
    if problems:
        raise CheckpointError(f"{folder}: not a usable umT5 encoder folder, missing {', '.join(problems)}. Put a "
                              f"transformers-format umT5 encoder (config.json + weights + spiece.model) there.")


class UMT5TextEncoder:
    """A umT5 encoder and its tokenizer loaded from a local folder (never from the hub)."""

    def __init__(self, folder, dtype: Optional[torch.dtype] = None, device="cpu"):
        transformers = require_transformers()
        folder = Path(folder)
        _check_folder(folder)
        try:
            if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            else:  # a bare spiece.model: T5's sentencepiece tokenizer (pad 0, </s> 1), no sentinel extras
                self.tokenizer = transformers.T5Tokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                          extra_ids=0)
            self.model = transformers.UMT5EncoderModel.from_pretrained(
                str(folder), local_files_only=True, dtype=dtype or torch.float32).to(device).eval()
        except ImportError as e:
            raise ImportError(f"{folder}: loading the umT5 tokenizer needs sentencepiece: run `{INSTALL_HINT}` "
                              f"({e})") from None
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{folder}: cannot load the umT5 encoder/tokenizer: {type(e).__name__}: {e}") from None
        self.folder = folder
        self.width = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_length: int = WAN_TEXT_LEN, pad_to: int = WAN_TEXT_LEN) -> torch.Tensor:
        """Last hidden state [B, L, D] float32: real tokens (with </s>) kept, zero beyond each prompt."""
        texts = [clean_prompt(t) for t in texts]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                             add_special_tokens=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, L, D)
        lengths = [int(n) for n in mask.sum(dim=1)]
        return pad_tokens(hidden, lengths, pad_to)


_cache_lock = threading.Lock()
_cache: dict = {}


def load_umt5(folder, dtype: Optional[torch.dtype] = None, device="cpu") -> UMT5TextEncoder:
    """Load (or reuse the last loaded) umT5 encoder; one is kept, keyed by folder, file times, dtype and device."""
    folder = Path(folder).resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())) \
        if folder.is_dir() else ()
    key = (str(folder), stamp, dtype, str(device))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    log_once(logger, ("umt5-load", str(folder)), "loading umT5 text encoder from %s (transformers, local files only)",
             folder)
    enc = UMT5TextEncoder(folder, dtype=dtype, device=device)
    with _cache_lock:
        _cache.clear()  # keep one encoder: umT5-XXL is ~11 GB in bf16
        _cache[key] = enc
    return enc


__all__ = ["conditioning", "pad_tokens", "validate_embeddings", "load_text_embeddings", "save_text_embeddings",
           "tiny_tokenize", "tiny_text_encode", "require_transformers", "clean_prompt", "UMT5TextEncoder",
           "load_umt5", "WAN_TEXT_LEN", "WAN_TEXT_DIM", "EMBEDDING_KEYS", "INSTALL_HINT"]
