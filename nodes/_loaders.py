"""What the model loader nodes share: the file list with the built-in `random:<preset>` models, the shipped
`trained:<name>` models and the weight-seed widget. `random:` names are parsed by `core.paths.random_preset`;
`trained:` names resolve in `core.paths.find_model`."""
from __future__ import annotations

from typing import Iterable

from ..core import paths
from ..core.paths import RANDOM_PREFIX, random_preset  # noqa: F401  (the loaders' one parser)

DTYPE_CHOICES = ("default", "fp32", "fp16", "bf16")


def model_names(kind: str, presets: Iterable[str]) -> list[str]:
    """The loader's choices: the offered random presets, the shipped trained models, then the files of models
    folder `kind`."""
    return [RANDOM_PREFIX + p for p in presets] + paths.trained_names(kind) + paths.list_models(kind)


def weight_seed(maximum: int = 0xFFFFFFFFFFFFFFFF) -> tuple:
    """The `seed` widget of a loader: it sets random weights, so it has no control_after_generate."""
    return ("INT", {"default": 0, "min": 0, "max": maximum, "step": 1, "control_after_generate": False,
                    "tooltip": "Seed of the random weights (random:<preset> only)."})
