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


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Every 3x3 conv of a Wan VAE through Winograd F(2x2, 3x3) (its channel and pixel thresholds lowered so
    the tiny widths take it); yields the list its calls are counted in."""
    from twinflow.models import wan_vae_winograd

    monkeypatch.setattr(wan_vae_winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(wan_vae_winograd, "MIN_PIXELS", 1)
    calls = []
    real = wan_vae_winograd.conv3x3
    monkeypatch.setattr(wan_vae_winograd, "conv3x3", lambda *a: calls.append(1) or real(*a))
    yield calls


@pytest.fixture
def recorded_bands(monkeypatch) -> list:
    """Every `wan_vae_bands.Band` that the banded decodes and encodes after it make, in order (to inspect
    what each band carries to the next)."""
    from twinflow.models import wan_vae_bands

    bands = []

    class Recording(wan_vae_bands.Band):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bands.append(self)

    monkeypatch.setattr(wan_vae_bands, "Band", Recording)
    return bands
