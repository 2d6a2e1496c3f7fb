"""Where model files are found and where outputs go.

Headless: a models directory with ComfyUI's layout (`vae/`, `diffusion_models/`, `text_encoders/`,
`checkpoints/`, ...): `--models-dir`, else `$TWINFLOW_MODELS_DIR`, else `./models`; plus the folders of a
ComfyUI `extra_model_paths.yaml` given by `--extra-model-paths` / `$TWINFLOW_EXTRA_MODEL_PATHS`. Inside ComfyUI the
adapter installs a resolver backed by `folder_paths`, so the same loader nodes list ComfyUI's files.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

# Our folder kinds -> the sub-folders searched (first is canonical; ComfyUI aliases follow).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "vae": ("vae",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "checkpoints": ("checkpoints",),
    "text_embeddings": ("text_embeddings",),
    "twinflow": ("twinflow",),  # refiners, gate nets, quantized files, compile cache
    "latents": ("latents",),
    "loras": ("loras",),  # ComfyUI's LoRA folder (LoraLoaderModelOnly)
    "clip_vision": ("clip_vision",),  # CLIP vision encoders (CLIPVisionLoader)
}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin", ".json")

_models_dir: Optional[Path] = None
_output_dir: Optional[Path] = None
_input_dir: Optional[Path] = None
# Host hooks (ComfyUI): kind -> list of names / kind, name -> path or None
_list_hook: Optional[Callable[[str], list[str]]] = None
_find_hook: Optional[Callable[[str, str], Optional[str]]] = None


def set_models_dir(path) -> None:
    global _models_dir
    _models_dir = Path(path) if path is not None else None


def models_dir() -> Path:
    if _models_dir is not None:
        return _models_dir
    return Path(os.environ.get("TWINFLOW_MODELS_DIR", "models"))


def set_output_dir(path) -> None:
    global _output_dir
    _output_dir = Path(path) if path is not None else None


def output_dir() -> Path:
    return _output_dir if _output_dir is not None else Path(os.environ.get("TWINFLOW_OUTPUT_DIR", "output"))


def temp_dir() -> Path:
    """Where preview images go headless (ComfyUI's temp folder): $TWINFLOW_TEMP_DIR, else `temp/` inside the
    output folder."""
    env = os.environ.get("TWINFLOW_TEMP_DIR")
    return Path(env) if env else output_dir() / "temp"


def set_input_dir(path) -> None:
    global _input_dir
    _input_dir = Path(path) if path is not None else None


def input_dir() -> Path:
    return _input_dir if _input_dir is not None else Path(os.environ.get("TWINFLOW_INPUT_DIR", "input"))


@contextmanager
def using(*, output_dir=None, models_dir=None, input_dir=None):
    """Set some folders for the duration of a block (None leaves one as it is); the previous settings
    come back afterwards, also when the block raises."""
    global _output_dir, _models_dir, _input_dir
    prev = _output_dir, _models_dir, _input_dir
    try:
        if output_dir is not None:
            set_output_dir(output_dir)
        if models_dir is not None:
            set_models_dir(models_dir)
        if input_dir is not None:
            set_input_dir(input_dir)
        yield
    finally:
        _output_dir, _models_dir, _input_dir = prev


def set_host_hooks(list_hook=None, find_hook=None) -> None:
    """ComfyUI adapter: route listing/finding through `folder_paths`."""
    global _list_hook, _find_hook
    _list_hook, _find_hook = list_hook, find_hook


_extra_paths_file: Optional[Path] = None


def set_extra_model_paths(path) -> None:
    """Also search the folders of a ComfyUI `extra_model_paths.yaml` (None: $TWINFLOW_EXTRA_MODEL_PATHS, if set)."""
    global _extra_paths_file
    _extra_paths_file = Path(path) if path is not None else None


def extra_model_folders(yaml_path=None) -> dict[str, list[Path]]:
    """kind -> folders listed for it in a ComfyUI `extra_model_paths.yaml`, read as ComfyUI reads it
    (utils/extra_config.py): per section an optional `base_path` (relative to the YAML's folder), then one
    key per ComfyUI folder name whose value holds one path per line (joined to base_path). ComfyUI's folder
    names are mapped to ours (`unet` -> diffusion_models, `clip` -> text_encoders); others are ignored."""
    path = yaml_path or _extra_paths_file or os.environ.get("TWINFLOW_EXTRA_MODEL_PATHS")
    if not path:
        return {}
    path = Path(path).expanduser()
    try:
        import yaml
    except ImportError:
        raise RuntimeError(f"reading {path} needs PyYAML (pip install pyyaml)") from None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"extra model paths file {path} not found (--extra-model-paths / "
                                f"TWINFLOW_EXTRA_MODEL_PATHS)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected sections of folder names (ComfyUI's extra_model_paths.yaml format)")
    here = path.resolve().parent
    kind_of = {sub: kind for kind, subs in MODEL_FOLDERS.items() for sub in subs}
    out: dict[str, list[Path]] = {}
    for section, entries in config.items():
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section {section!r} must map folder names to paths")
        base = entries.get("base_path")
        if base:
            base = Path(os.path.expandvars(str(base))).expanduser()
            base = base if base.is_absolute() else here / base
        for name, value in entries.items():
            if name in ("base_path", "is_default") or name not in kind_of or value is None:
                continue
            for line in str(value).split("\n"):
                line = os.path.expandvars(line.strip())
                if not line:
                    continue
                p = Path(line).expanduser()
                p = base / p if base else (p if p.is_absolute() else here / p)
                out.setdefault(kind_of[name], []).append(Path(os.path.normpath(p)))
    return out


def _folders(kind: str) -> list[Path]:
    if kind not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder kind {kind!r}; expected one of {sorted(MODEL_FOLDERS)}")
    root = models_dir()
    return [root / sub for sub in MODEL_FOLDERS[kind]] + extra_model_folders().get(kind, [])


def list_models(kind: str) -> list[str]:
    """Names (relative paths, `/`-separated) of the model files of `kind`, sorted."""
    if _list_hook is not None:
        return sorted(_list_hook(kind))
    names = set()
    for folder in _folders(kind):
        if not folder.is_dir():
            continue
        for p in folder.rglob("*"):
            if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS:
                names.add(p.relative_to(folder).as_posix())
    return sorted(names)


def find_model(kind: str, name: str) -> Path:
    """Resolve a model file name; raise FileNotFoundError that lists every place searched."""
    if _find_hook is not None:
        found = _find_hook(kind, name)
        if found:
            return Path(found)
    searched = []
    for folder in _folders(kind):
        candidate = (folder / name)
        searched.append(str(candidate))
        try:
            candidate.resolve().relative_to(folder.resolve())
        except ValueError:
            raise ValueError(f"model name {name!r} escapes the {kind} folder {folder}") from None
        if candidate.is_file():
            return candidate
    available = list_models(kind)
    hint = f"; available: {', '.join(available[:20])}" if available else f"; the {kind} folder is empty or missing"
    raise FileNotFoundError(
        f"{kind} file {name!r} not found. Searched: {', '.join(searched)}{hint}. "
        f"Put the file there or point --models-dir / TWINFLOW_MODELS_DIR at your models folder."
    )


# Model names: a file in a models folder, or `random:<preset>` (seeded random weights of a built-in preset:
# demos, CI). Every loader, the compile plan and the CLI model specs parse the prefix here.
RANDOM_PREFIX = "random:"


def random_preset(name: str, valid: Iterable[str], what: str = "preset",
                  offered: Optional[Iterable[str]] = None) -> Optional[str]:
    """The preset of a `random:<preset>` model name, or None for a file name.

    Raises ValueError when the preset is not in `valid`, listing the `offered` names (default: `valid`)."""
    if not isinstance(name, str) or not name.startswith(RANDOM_PREFIX):
        return None
    preset = name[len(RANDOM_PREFIX):]
    if preset not in valid:
        shown = [RANDOM_PREFIX + p for p in (valid if offered is None else offered)]
        raise ValueError(f"unknown random {what} {name!r}; expected one of {shown}")
    return preset
