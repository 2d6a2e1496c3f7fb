"""Latent files: ComfyUI's `.latent` layout (safetensors with `latent_tensor` + `latent_format_version_0`)."""
from __future__ import annotations

import logging

import torch

from ..core.errors import CheckpointError
from ..core.log import log_once
from ..core.outputs import OutputTarget, PendingOutput, atomic_numbered

logger = logging.getLogger(__name__)

LATENT_EXTENSIONS = (".latent", ".safetensors")
# ComfyUI's legacy latents (saved before `latent_format_version_0`) were stored scaled by SD1's 0.18215.
LEGACY_LATENT_SCALE = 0.18215


def write_latent(path, samples: torch.Tensor, meta: dict) -> None:
    """ComfyUI's `.latent` layout: safetensors with `latent_tensor` and an empty `latent_format_version_0`."""
    from safetensors.torch import save_file

    tensors = {"latent_tensor": samples.detach().to("cpu").contiguous(),
               "latent_format_version_0": torch.tensor([])}
    save_file(tensors, str(path), metadata={"prompt": meta.get("prompt", ""), **meta})



def save_latent(target: OutputTarget, samples: torch.Tensor, meta: dict) -> PendingOutput:
    """One numbered `.latent` file."""
    with atomic_numbered(target, ".latent") as out:
        write_latent(out.tmp_path, samples, meta)
    return out


def read_latent_file(path) -> dict:
    """A `.latent` (ComfyUI's or ours) -> LATENT; legacy files without `latent_format_version_0` are unscaled."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if "latent_tensor" not in keys:
                raise CheckpointError(f"{path}: no 'latent_tensor' in this file (keys: {sorted(keys)[:10]}); "
                                      f"it is not a latent saved by Save Latent")
            samples = f.get_tensor("latent_tensor").float()
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{path}: not a readable latent file ({type(e).__name__}: {e})") from None
    if "latent_format_version_0" not in keys:
        log_once(logger, ("twinflow.io.legacy_latent", str(path)),
                 "Load Latent: %s is a legacy latent (no latent_format_version_0); scaled by 1/%s as ComfyUI does",
                 path, LEGACY_LATENT_SCALE)
        samples = samples * (1.0 / LEGACY_LATENT_SCALE)
    return {"samples": samples}

