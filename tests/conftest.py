"""Shared test setup: deterministic torch, isolated model/output folders, hypothesis profile."""
import os

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=150, deadline=None)
    settings.load_profile("ci")
except ImportError:  # hypothesis is a test extra
    pass

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tf_dirs(tmp_path):
    """Point TwinFlow's models/output/input folders at fresh temporary folders."""
    from twinflow.core import paths

    models, output, inp = tmp_path / "models", tmp_path / "output", tmp_path / "input"
    for d in (models, output, inp):
        d.mkdir()
    paths.set_models_dir(models)
    paths.set_output_dir(output)
    paths.set_input_dir(inp)
    yield {"models": models, "output": output, "input": inp}
    paths.set_models_dir(None)
    paths.set_output_dir(None)
    paths.set_input_dir(None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """An in-process `cli.main` call sets the package logger's level (WARNING by default) and adds its stderr
    handler, for the rest of the process: later tests that read INFO records with caplog then saw nothing.
    Put both back after every test."""
    import logging

    log = logging.getLogger("twinflow")
    level, handlers = log.level, list(log.handlers)
    yield
    log.setLevel(level)
    for h in list(log.handlers):
        if h not in handlers:
            log.removeHandler(h)
