"""What the model loader nodes share: the file list with the built-in `random:<preset>` models, the
weight-seed widget, and resolving a `random:` name to its preset."""
from __future__ import annotations

from typing import Iterable, Optional

from ..core import paths

RANDOM_PREFIX = "random:"
DTYPE_CHOICES = ("default", "fp32", "fp16", "bf16")


def model_names(kind: str, presets: Iterable[str]) -> list[str]:
    """The loader's choices: the offered random presets, then the files of models folder `kind`."""
    return [RANDOM_PREFIX + p for p in presets] + paths.list_models(kind)


def weight_seed(maximum: int = 0xFFFFFFFFFFFFFFFF) -> tuple:
    """The `seed` widget of a loader: it sets random weights, so it has no control_after_generate."""
    return ("INT", {"default": 0, "min": 0, "max": maximum, "step": 1, "control_after_generate": False,
                    "tooltip": "Seed of the random weights (random:<preset> only)."})


def random_preset(name: str, offered: Iterable[str], valid, what: str) -> Optional[str]:
    """The preset of a `random:<preset>` name (checked against `valid`), or None for a file name."""
    if not name.startswith(RANDOM_PREFIX):
        return None
    preset = name[len(RANDOM_PREFIX):]
    if preset not in valid:
        raise ValueError(f"unknown random {what} {name!r}; expected one of {[RANDOM_PREFIX + p for p in offered]}")
    return preset
