"""`twinflow fit-gate`: fit the dual-branch gate on a folder of clean latents and save the gate net.

    twinflow fit-gate --semantic wan:random:tiny --detail refiner:random:tiny --latents latents/ \
        --out models/twinflow/gate.safetensors --prompt "a cat"

Model specs: `wan:<file>` (Wan2.1 DiT, plain or quantized; diffusion_models folder or a path),
`refiner:<file>` (TwinFlow detail refiner; twinflow folder or a path), or `wan:random:<preset>` /
`refiner:random:<preset>` (seeded random weights, for trying the pipeline). Runs on `--device` (cuda when
available, else cpu). Each family builds its Denoiser with its own `make_denoiser`, as the loader nodes do.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _resolve(kind: str, name: str) -> Path:
    from ..core import paths

    p = Path(name)
    return p if p.is_file() else paths.find_model(kind, name)


def load_denoiser(spec: str, device: str, dtype=None):
    """'wan:random:tiny' | 'wan:<file>' | 'refiner:random:<preset>' | 'refiner:<file>' -> Denoiser."""
    from ..core.paths import random_preset

    family, _, name = spec.partition(":")
    if family not in ("wan", "refiner") or not name:
        raise ValueError(f"model spec {spec!r}: expected 'wan:<file>', 'wan:random:<preset>', 'refiner:<file>' or "
                         f"'refiner:random:<preset>'")
    if family == "wan":
        from ..models import wan_dit

        preset = random_preset(name, wan_dit.PRESETS, "preset")
        if preset is not None:
            module, source = wan_dit.random_wan_dit(preset), "random seed 0"
        else:
            from ..quant.load import load_wan_dit

            path = _resolve("diffusion_models", name)
            module, source = load_wan_dit(path, dtype=dtype), str(path)
        d = wan_dit.make_denoiser(module, name=spec, source=source)
    else:
        from ..models import refiner

        preset = random_preset(name, refiner.PRESETS, "refiner")
        if preset is not None:
            (module, cfg), source = refiner.random_refiner(preset), "random seed 0"
        else:
            path = _resolve("twinflow", name)
            (module, cfg), source = refiner.load_refiner(path, dtype=dtype), str(path)
        d = refiner.make_denoiser(module, cfg, name=spec, source=source)
    d.module.to(device)
    return d


def _context(args, d):
    if d.text_dim is None:
        return None
    if args.context:
        from ..models.text import load_text_embeddings

        return load_text_embeddings(args.context, width=d.text_dim)
    if args.prompt is not None:
        from ..models.text import tiny_text_encode

        logger.info("encoding --prompt with the tiny hashed text encoder (for random demo weights only)")
        return tiny_text_encode(args.prompt, width=d.text_dim)
    raise ValueError(f"{d.name} needs text: pass --context <embeddings.safetensors> (or --prompt for random "
                     f"demo weights)")


def cmd_fit_gate(args) -> int:
    import torch

    from ..sampling.fit import fit_gate
    from ..sampling.gates import GATE_NET_PRESETS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = load_denoiser(args.semantic, device)
    d = load_denoiser(args.detail, device)
    fit = fit_gate(s, d, args.latents, args.out, buckets=args.buckets, draws=args.draws, cutoff=args.cutoff,
                   seed=args.seed, context_semantic=_context(args, s), context_detail=_context(args, d),
                   net_config=GATE_NET_PRESETS[args.net], iters=args.iters)
    summary = {"out": str(args.out), "sigma": [round(x, 4) for x in fit.sigmas],
               "alpha": [round(x, 4) for x in fit.alphas], "net_alpha": [round(x, 4) for x in fit.net_alphas],
               "loss_semantic": fit.losses_semantic, "loss_detail": fit.losses_detail,
               "loss_fused": fit.losses_fused}
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")  # the command's result, for scripts
    return 0


def add_parser(sub) -> None:
    """The `fit-gate` subcommand (registered by runner/cli.py)."""
    from ..sampling.gates import GATE_NET_PRESETS

    p = sub.add_parser("fit-gate", help="fit the dual-branch gate (alpha per sigma + gate MLP) on latents")
    p.add_argument("--semantic", required=True, help="semantic model spec, e.g. wan:wan2.1_t2v_14B_bf16.safetensors")
    p.add_argument("--detail", required=True, help="detail model spec, e.g. wan:wan2.1_t2v_1.3B_bf16.safetensors")
    p.add_argument("--latents", required=True, help="folder of clean latents (.safetensors, e.g. ComfyUI Save Latent)")
    p.add_argument("--out", required=True, help="where to write the gate net (.safetensors)")
    p.add_argument("--context", help="text embeddings (.safetensors) for models that take text")
    p.add_argument("--prompt", help="prompt for the tiny hashed text encoder (random demo weights only)")
    p.add_argument("--buckets", type=int, default=10, help="sigma buckets (default 10)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per latent and bucket (default 4)")
    p.add_argument("--cutoff", type=float, default=0.0, help="FFT cutoff the gate will run with (default 0)")
    p.add_argument("--net", choices=sorted(GATE_NET_PRESETS), default="default", help="gate MLP size")
    p.add_argument("--iters", type=int, default=400, help="Adam iterations for the MLP (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
