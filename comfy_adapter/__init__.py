"""The ComfyUI adapter: everything that touches `comfy`, `folder_paths` or `server` lives here.

The library never imports ComfyUI; this package imports it lazily, only when `is_comfyui()` says the
process is a running ComfyUI (its `folder_paths` and `comfy.model_management` modules are already
loaded — we never import them ourselves to find out, since importing `comfy.model_management` outside
ComfyUI's startup can crash on a CPU-only torch). Importing this package is cheap.

`install()` (called once from the pack's `__init__.py` inside ComfyUI) wires TwinFlow to the host:
  * progress: `core.progress` bars become `comfy.utils.ProgressBar`s (UI progress for sampling steps,
    VAE chunks, compile builds); ComfyUI's interrupt (`throw_exception_if_processing_interrupted`) is
    checked by every `check_interrupt()`, so Cancel stops our loops;
  * paths: `core.paths` lists and finds model files through `folder_paths` (so `extra_model_paths.yaml`
    works), with `twinflow`, `text_embeddings` and `latents` registered as model folders under
    `models/`; outputs and inputs go to ComfyUI's output/input folders;
  * the compile cache lives in `models/twinflow/compile` (`compiled.cache` finds it through
    `folder_paths.models_dir`; `$TWINFLOW_CACHE_DIR` still wins).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

logger = logging.getLogger(__name__)

# Our folder kinds that ComfyUI does not define itself; registered under <models>/<name>.
EXTRA_FOLDERS = ("twinflow", "text_embeddings", "latents")

_installed: dict = {}


def is_comfyui() -> bool:
    """True inside a running ComfyUI (its modules are already imported); never imports them."""
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


class ComfyBar:
    """`core.progress` backend bar over a `comfy.utils.ProgressBar` (which also raises ComfyUI's interrupt)."""

    def __init__(self, total: int, desc: str = "", node_id: Optional[str] = None, progress_bar_cls=None):
        if progress_bar_cls is None:
            import comfy.utils

            progress_bar_cls = comfy.utils.ProgressBar
        # node_id None lets ComfyUI attribute the bar to the node that is executing.
        self._bar = progress_bar_cls(max(1, int(total)), node_id=node_id)
        self.desc = desc
        self._previewer = None  # built on the first preview (False: none)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def preview(self, latent) -> None:
        """Send the sampler's denoised latent as the step's preview image, as core samplers' callback does
        (`latent_preview.prepare_callback`): ComfyUI's own previewer for Wan2.1 latents, so `--preview-method`
        decides (none: no preview; latent2rgb/auto: Wan21's `latent_rgb_factors`; taesd: its Wan decoder)."""
        if self._previewer is None:
            self._previewer = wan21_previewer(latent) or False
        if self._previewer is False:
            return
        image = self._previewer.decode_latent_to_preview_image("JPEG", latent)
        self._bar.update_absolute(self._bar.current, self._bar.total, image)

    def close(self) -> None:  # ComfyUI bars need no closing; the node's end marks them finished
        pass


def wan21_previewer(latent):
    """ComfyUI's latent previewer for a Wan2.1 latent [B, 16, T, H, W] (None: previews off, or not a Wan latent)."""
    import comfy.latent_formats
    import latent_preview  # ComfyUI's top-level module (its sampler previews)

    fmt = comfy.latent_formats.Wan21()
    if getattr(latent, "ndim", 0) != 5 or latent.shape[1] != fmt.latent_channels:
        from ..core.log import log_once

        log_once(logger, ("comfy_preview_shape", tuple(getattr(latent, "shape", ()))[1:2]), "TwinFlow: no step "
                 "previews for a latent of shape %s (ComfyUI's Wan2.1 previewer takes 16 channels)",
                 tuple(getattr(latent, "shape", ())))
        return None
    return latent_preview.get_previewer(latent.device, fmt)


def comfy_bar_factory(total: int, desc: str = "", node_id: Optional[str] = None) -> ComfyBar:
    return ComfyBar(total, desc, node_id)


def comfy_interrupt_check() -> None:
    """Raise ComfyUI's own InterruptProcessingException when the user pressed Cancel.

    We let ComfyUI's exception through (not our `Interrupted`): its executor recognises it and reports
    the prompt as interrupted instead of failed."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def folder_hooks(folder_paths_mod):
    """(list_hook, find_hook) for `core.paths.set_host_hooks`, backed by a `folder_paths` module."""
    from ..core.paths import MODEL_FOLDERS

    def known(folder: str) -> bool:
        return folder_paths_mod.map_legacy(folder) in folder_paths_mod.folder_names_and_paths

    def list_hook(kind: str) -> list[str]:
        if kind not in MODEL_FOLDERS:
            raise ValueError(f"unknown model folder kind {kind!r}; expected one of {sorted(MODEL_FOLDERS)}")
        names: set = set()
        for folder in MODEL_FOLDERS[kind]:
            if known(folder):
                names.update(n.replace(os.sep, "/") for n in folder_paths_mod.get_filename_list(folder))
        return sorted(names)

    def find_hook(kind: str, name: str) -> Optional[str]:
        if kind not in MODEL_FOLDERS:
            raise ValueError(f"unknown model folder kind {kind!r}; expected one of {sorted(MODEL_FOLDERS)}")
        for folder in MODEL_FOLDERS[kind]:
            if known(folder):
                found = folder_paths_mod.get_full_path(folder, name)
                if found:
                    return found
        return None

    return list_hook, find_hook


def register_folders(folder_paths_mod) -> list[str]:
    """Register our extra model folders (models/twinflow, ...) with our file extensions; returns their paths."""
    from ..core.paths import MODEL_EXTENSIONS

    made = []
    for name in EXTRA_FOLDERS:
        path = os.path.join(folder_paths_mod.models_dir, name)
        folder_paths_mod.add_model_folder_path(name, path, is_default=True)
        paths_, exts = folder_paths_mod.folder_names_and_paths[name]
        # add_model_folder_path creates the entry with no extensions, and an empty set lists every file.
        folder_paths_mod.folder_names_and_paths[name] = (paths_, set(exts) | set(MODEL_EXTENSIONS))
        made.append(path)
    return made


def install(folder_paths_mod=None, progress_bar_cls=None, interrupt_check=None) -> dict:
    """Wire TwinFlow to the running ComfyUI (idempotent); returns what was installed.

    The arguments exist for tests, which pass stand-ins; inside ComfyUI all three come from ComfyUI."""
    from ..core import paths, progress

    if _installed and folder_paths_mod is None:
        return dict(_installed)
    if folder_paths_mod is None:
        import folder_paths as folder_paths_mod  # noqa: PLC0415  (host module, present inside ComfyUI only)
    if progress_bar_cls is None:
        progress.set_backend(comfy_bar_factory)
    else:
        progress.set_backend(lambda total, desc="", node_id=None: ComfyBar(total, desc, node_id, progress_bar_cls))
    check = interrupt_check or comfy_interrupt_check
    progress.add_interrupt_check(check)
    folders = register_folders(folder_paths_mod)
    paths.set_host_hooks(*folder_hooks(folder_paths_mod))
    paths.set_output_dir(folder_paths_mod.get_output_directory())
    paths.set_input_dir(folder_paths_mod.get_input_directory())
    compile_cache = os.environ.get("TWINFLOW_CACHE_DIR") or os.path.join(folder_paths_mod.models_dir, "twinflow",
                                                                         "compile")
    _installed.clear()
    _installed.update({"progress": "comfy.utils.ProgressBar", "folders": folders, "compile_cache": compile_cache,
                       "output_dir": folder_paths_mod.get_output_directory(), "interrupt_check": check})
    logger.info("TwinFlow: ComfyUI adapter installed (progress -> ComfyUI, model folders via folder_paths, "
                "compile cache %s)", compile_cache)
    return dict(_installed)


def uninstall() -> None:
    """Undo `install()` (tests)."""
    from ..core import paths, progress

    progress.set_backend(None)
    check = _installed.get("interrupt_check")
    if check in progress._extra_interrupt_checks:
        progress._extra_interrupt_checks.remove(check)
    paths.set_host_hooks(None, None)
    paths.set_output_dir(None)
    paths.set_input_dir(None)
    _installed.clear()
