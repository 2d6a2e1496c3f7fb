"""The measured peak RSS of VAE decodes in a fresh process, against the VAE's own decode estimate (the
memory-plan tests of both VAE families). Each decode's peak is the RSS high-water mark above the RSS before
it (Linux /proc/self/clear_refs resets the mark), after oneDNN primitives and lazy inits have been made by a
small warm-up decode, one thread."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = """
import ctypes, gc, importlib, json, sys
import torch

module, factory, z_shape, modes = json.loads(sys.argv[1])

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

torch.set_num_threads(1)
vae = getattr(importlib.import_module(module), factory)("tiny", seed=0)
vae.decode(torch.zeros(1, z_shape[1], 2, 2, 2))  # oneDNN primitives and lazy inits are not the decode's
z = torch.randn(*z_shape, generator=torch.Generator().manual_seed(0))
rows = []
for tile, bands in modes:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = vae.decode(z, bands=bands) if tile is None else vae.decode(z, tiling="on", tile=(tile, 2))
    rows.append([[tile, bands], status("VmHWM") - before, vae.estimate_decode_bytes(z.shape, tile=tile, bands=bands)])
    del out
print(json.dumps(rows))
"""


def decode_peaks(cwd, module: str, factory: str, z_shape, modes) -> list:
    """[(tile, bands), peak bytes, estimate bytes] per mode, decoding `factory("tiny", seed=0)` of
    `twinflow.models.<module>` on seeded latents of `z_shape`; modes: (tile or None, bands)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    arg = json.dumps([f"twinflow.models.{module}", factory, list(z_shape), [list(m) for m in modes]])
    res = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return [(tuple(mode), peak, est) for mode, peak, est in json.loads(res.stdout.splitlines()[-1])]
