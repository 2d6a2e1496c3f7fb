"""Wan I2V / FLF2V / TI2V DiTs against ComfyUI's own `comfy.ldm.wan.model.WanModel` (a second oracle beside
diffusers, for ComfyUI's conventions: `clip_fea` of the first and last frame concatenated on tokens, FLF2V's
position embedding on a single image, and TI2V's per-frame timesteps as WAN22 `process_timestep` builds them).

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (0.3.64); ComfyUI's model runs in its own interpreter
($COMFYUI_PYTHON, else a venv beside the checkout) on the CPU in fp32, with our state dict loaded strictly. Its
image embedding is fixed at CLIP width 1280, so these small configs use 1280 there."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from twinflow.models import wan_dit as W

from test_wan_dit import _padded, _randomize, _rel

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout (see docs/comfyui.md)")]

def _run_comfy(tmp_path: Path, cases: dict) -> dict:
    from test_comfyui_integration import _comfy_python

    src = tmp_path / "cases.pt"
    dst = tmp_path / "out.pt"
    torch.save(cases, src)
    code = (
        "import sys, torch; sys.argv = ['x', '--cpu']; import comfy.options; comfy.options.enable_args_parsing(); "
        "import comfy.ops; from comfy.ldm.wan.model import WanModel; "
        f"cases = torch.load({str(src)!r}, weights_only=True); out = {{}}\n"
        "for name, c in cases.items():\n"
        "    m = WanModel(operations=comfy.ops.disable_weight_init, **c['kwargs'])\n"
        "    missing, unexpected = m.load_state_dict(c['sd'], strict=True)\n"
        "    with torch.no_grad():\n"
        "        out[name] = m(c['x'], c['t'], c['ctx'], clip_fea=c.get('clip')).float()\n"
        f"torch.save(out, {str(dst)!r})\n")
    res = subprocess.run([os.environ.get("COMFYUI_PYTHON") or _comfy_python(), "-c", code], cwd=COMFYUI,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(dst, weights_only=True)


def _kwargs(cfg, model_type):
    kw = dict(model_type=model_type, dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
              num_layers=cfg.num_layers, in_dim=cfg.in_dim, out_dim=cfg.out_dim, text_dim=cfg.text_dim,
              freq_dim=cfg.freq_dim, eps=cfg.eps)
    if cfg.image_pos_tokens:
        kw["flf_pos_embed_token_number"] = cfg.image_pos_tokens
    return kw


def test_image_models_match_comfyui_wan_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    i2v_cfg = W.with_config(W.get_config("i2v-tiny"), image_dim=1280)
    flf_cfg = W.with_config(i2v_cfg, image_pos_tokens=2 * 257)
    models = {"i2v": _randomize(W.random_wan_dit(config=i2v_cfg), seed=21),
              "flf2v": _randomize(W.random_wan_dit(config=flf_cfg), seed=22),
              "ti2v": _randomize(W.random_wan_dit("ti2v-tiny"), seed=23)}
    for m in models.values():
        with torch.no_grad():  # img_emb LayerNorm weights near 1 (see test_wan_dit_i2v._model)
            for name in ("img_emb.proj.0.weight", "img_emb.proj.4.weight"):
                if name in m.state_dict():
                    m.get_parameter(name).add_(1.0)
    ctx = torch.randn(2, 6, 4096, generator=g)
    x36 = torch.randn(2, 36, 3, 8, 10, generator=g)
    t = torch.tensor([900.0, 350.0])
    ours_in = {
        "i2v": (models["i2v"], x36, t, torch.randn(2, 257, 1280, generator=g)),
        "flf2v": (models["flf2v"], x36, t, torch.randn(2, 514, 1280, generator=g)),
        "flf2v_one_image": (models["flf2v"], x36, t, torch.randn(2, 257, 1280, generator=g)),
        # per-frame timesteps: the first (conditioning) frame at 0, as WAN22.process_timestep gives them
        "ti2v": (models["ti2v"], torch.randn(2, 48, 3, 8, 10, generator=g),
                 torch.tensor([[0.0, 900.0, 900.0], [0.0, 350.0, 350.0]]), None),
    }
    cases, ours = {}, {}
    for name, (model, x, ts, clip) in ours_in.items():
        cfg = model.config
        cases[name] = {"kwargs": _kwargs(cfg, "i2v" if cfg.image_dim else "t2v"), "x": x, "t": ts,
                       "ctx": _padded(ctx), "sd": {k: v.contiguous() for k, v in model.state_dict().items()}}
        if clip is not None:
            cases[name]["clip"] = clip
        with torch.no_grad():
            ours[name] = model(x, ts, ctx, clip_fea=clip)
    theirs = _run_comfy(tmp_path, cases)
    errs = {name: _rel(ours[name], theirs[name]) for name in ours}
    assert all(e <= 1e-5 for e in errs.values()), json.dumps(errs)
    assert _rel(ours["flf2v"], ours["flf2v_one_image"]) > 1e-3  # the image tokens matter
