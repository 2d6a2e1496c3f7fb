"""TwinFlow: a ComfyUI custom-node pack and a headless runner for Wan2.1-class video workflows.

As a ComfyUI pack this file is the entry point: ComfyUI imports the folder by path and reads
`NODE_CLASS_MAPPINGS`. As the `twinflow` package it also offers `run_workflow`. Importing it is cheap:
no cupy, torch_tensorrt, diffusers or transformers are imported here.
"""
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "run_workflow", "__version__"]


def run_workflow(workflow, overrides=None, output_dir=None, models_dir=None, **kwargs):
    """Run a workflow (path, API dict or UI dict) headless; return the outputs per output node."""
    from .runner.api import run_workflow as _run

    return _run(workflow, overrides=overrides, output_dir=output_dir, models_dir=models_dir, **kwargs)


if not __package__:
    # Loaded as a lone file rather than as a package: pytest does this to the repository root when the
    # checkout's folder name is not a valid module name. Relative imports cannot work then, and nothing
    # needs registering.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .core.version import __version__
    from .comfy_adapter import is_comfyui as _is_comfyui
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    if _is_comfyui():  # inside a running ComfyUI only: host wiring + the nodes that take core MODEL/VAE/GUIDER
        from .comfy_adapter import install as _install, nodes as _comfy_nodes

        _install()
        NODE_CLASS_MAPPINGS = {**NODE_CLASS_MAPPINGS, **_comfy_nodes.NODE_CLASS_MAPPINGS}
        NODE_DISPLAY_NAME_MAPPINGS = {**NODE_DISPLAY_NAME_MAPPINGS, **_comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS}
