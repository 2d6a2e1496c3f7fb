"""Fit the gate: the alpha per noise level that makes the fused prediction best, then a small MLP on it.

For clean latents x0, noise n and sigma in a bucket, x = (1-sigma) x0 + sigma n and the flow-matching
target is v* = n - x0. The fused prediction (fusion.py) is
    v(alpha) = v_S - (1 - alpha) * u,   u = HP_c(v_S - v_D)   (u = v_S - v_D when c = 0),
so the loss |v(alpha) - v*|^2 is quadratic in beta = 1 - alpha with the closed-form minimiser
    beta = <v_S - v*, u> / <u, u>,
accumulated over all draws of a bucket (numerator and denominator summed, then divided) and clipped to
[0, 1]. The gate MLP (`gates.GateNet`) is then fitted to those (sigma, alpha) pairs, weighted by <u, u>
(buckets where the branches agree say little about alpha).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.handles import Denoiser, enter_text_caches
from ..core.progress import Progress
from .fusion import DEFAULT_WIDTH, split
from .gates import GateNet, GateNetConfig, save_gate_net, timestep_embedding
from .noise import latent_format_for

logger = logging.getLogger(__name__)

LATENT_KEYS = ("latent_tensor", "samples", "latent")  # ComfyUI SaveLatent writes "latent_tensor"


@dataclass
class GateFit:
    sigmas: list  # bucket centres
    alphas: list  # least-squares alpha per bucket
    weights: list  # sum <u, u> per bucket
    losses_semantic: list = field(default_factory=list)  # mean |v_S - v*|^2 per bucket
    losses_detail: list = field(default_factory=list)
    losses_fused: list = field(default_factory=list)
    net: Optional[GateNet] = None
    net_alphas: list = field(default_factory=list)  # sigmoid(net(sigma)) at the bucket centres

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "net"}


def load_latent_folder(folder, limit: int = 0) -> list[torch.Tensor]:
    """Clean latents [B, C, T, H, W] from every .safetensors file in `folder` (raw VAE space, as LATENT)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"latent folder {folder} does not exist; point --latents at a folder of "
                                f".safetensors latents (ComfyUI Save Latent files work)")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".latent"))
    if not files:
        raise ValueError(f"latent folder {folder} holds no .safetensors / .latent files")
    out = []
    for p in files[: limit or None]:
        sd = load_file(str(p))
        key = next((k for k in LATENT_KEYS if k in sd), None)
        if key is None and len(sd) == 1:
            key = next(iter(sd))
        if key is None:
            raise ValueError(f"{p}: no latent tensor found; expected one of {LATENT_KEYS} or a single tensor, "
                             f"got keys {sorted(sd)[:10]}")
        t = sd[key].float()
        if t.ndim == 4:  # one latent [C, T, H, W]
            t = t.unsqueeze(0)
        if t.ndim != 5:
            raise ValueError(f"{p}: latent {key!r} has shape {tuple(t.shape)}; expected [B, C, T, H, W]")
        out.append(t)
    return out


def _velocity(d: Denoiser, x: torch.Tensor, sigma: float, context: Optional[torch.Tensor]) -> torch.Tensor:
    s = torch.full((x.shape[0],), sigma, device=d.device)
    ctx = None
    if d.text_dim is not None:
        if context is None:
            raise ValueError(f"model {d.name or d.family!r} needs a text context; pass one (fit_gate context_* / "
                             f"twinflow fit-gate --context)")
        ctx = context.to(device=d.device, dtype=d.dtype).expand(x.shape[0], -1, -1)
    return d.velocity(x.to(device=d.device, dtype=d.dtype), s, ctx).float()


@torch.no_grad()
def bucket_alphas(semantic: Denoiser, detail: Denoiser, latents: Sequence[torch.Tensor], *, buckets: int = 10,
                  draws: int = 4, cutoff: float = 0.0, width: float = DEFAULT_WIDTH, seed: int = 0,
                  context_semantic: Optional[torch.Tensor] = None, context_detail: Optional[torch.Tensor] = None,
                  over_time: bool = False) -> GateFit:
    """Least-squares alpha per sigma bucket (see module docstring)."""
    if buckets < 1 or draws < 1:
        raise ValueError(f"buckets and draws must be >= 1, got {buckets}, {draws}")
    if not latents:
        raise ValueError("no latents to fit on")
    cs = int(semantic.info.get("latent_channels", semantic.in_channels))
    cd = int(detail.info.get("latent_channels", detail.in_channels))
    if cs != cd:
        raise ValueError(f"the semantic model works on {cs} latent channels, the detail model on {cd}; they must "
                         f"share a latent space")
    fmt = latent_format_for(semantic)
    gen = torch.Generator().manual_seed(seed)
    edges = torch.linspace(0.0, 1.0, buckets + 1, dtype=torch.float64)
    fit = GateFit(sigmas=[float((edges[b] + edges[b + 1]) / 2) for b in range(buckets)], alphas=[], weights=[])
    device = semantic.device
    # the contexts are fixed for the whole fit: the Wan DiT reuses its text side across the calls
    with contextlib.ExitStack() as caches, Progress(total=buckets * draws * len(latents), desc="fit-gate") as bar:
        enter_text_caches(caches, semantic, detail)
        for b in range(buckets):
            num = den = rr = dd = 0.0
            numel = 0
            for lat in latents:
                if lat.shape[1] != cs:
                    raise ValueError(f"a latent has {lat.shape[1]} channels but the models use {cs}")
                x0 = fmt.process_in(lat.float()).to(device)
                for _ in range(draws):
                    # sigma uniform inside the bucket, kept away from 0 where v is ill-conditioned
                    u01 = float(torch.rand((), generator=gen, dtype=torch.float64))
                    sigma = max(1e-3, float(edges[b] + u01 * (edges[b + 1] - edges[b])))
                    n = torch.randn(x0.shape, generator=gen).to(device)
                    x = (1 - sigma) * x0 + sigma * n
                    target = n - x0
                    v_s = _velocity(semantic, x, sigma, context_semantic)
                    v_d = _velocity(detail, x, sigma, context_detail)
                    u = v_s - v_d
                    if cutoff > 0:
                        u = split(u, cutoff, width, over_time)[1]  # only the high band is blended
                    r = v_s - target
                    num += float((r * u).sum())
                    den += float((u * u).sum())
                    rr += float((r * r).sum())
                    dd += float(((v_d - target) ** 2).sum())
                    numel += r.numel()
                    bar.update(1)
            beta = num / den if den > 0 else 0.0
            alpha = min(1.0, max(0.0, 1.0 - beta))
            # fused loss at the clipped alpha from the same sums: |r - b u|^2 = |r|^2 - 2b<r,u> + b^2 |u|^2
            b_ = 1.0 - alpha
            fit.alphas.append(alpha)
            fit.weights.append(den)
            fit.losses_semantic.append(rr / numel)
            fit.losses_detail.append(dd / numel)
            fit.losses_fused.append((rr - 2 * b_ * num + b_ * b_ * den) / numel)
    return fit


def fit_gate_net(sigmas: Sequence[float], alphas: Sequence[float], weights: Optional[Sequence[float]] = None, *,
                 config: GateNetConfig = GateNetConfig(), iters: int = 400, lr: float = 3e-2,
                 seed: int = 0) -> GateNet:
    """Fit sigmoid(GateNet(sigma)) to (sigma, alpha) pairs by weighted MSE with Adam (CPU, a second or so)."""
    s = torch.tensor(list(sigmas), dtype=torch.float32)
    a = torch.tensor(list(alphas), dtype=torch.float32)
    w = torch.ones_like(s) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    w = w / w.sum().clamp_min(1e-12) * len(w)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GateNet(config)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    emb = timestep_embedding(s * config.timestep_scale, config.freq_dim)  # fixed inputs: embed once
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad()
            loss = (w * (torch.sigmoid(net.mlp(emb).reshape(-1)) - a) ** 2).mean()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def fit_gate(semantic: Denoiser, detail: Denoiser, latents, out_path=None, *, buckets: int = 10, draws: int = 4,
             cutoff: float = 0.0, seed: int = 0, context_semantic=None, context_detail=None,
             net_config: GateNetConfig = GateNetConfig(), iters: int = 400) -> GateFit:
    """Bucket alphas + gate MLP; saves the net (safetensors, config and fit in metadata) when `out_path` is given.

    `latents` is a folder of .safetensors latents or a list of tensors [B, C, T, H, W].
    """
    if isinstance(latents, (str, Path)):
        latents = load_latent_folder(latents)
    fit = bucket_alphas(semantic, detail, latents, buckets=buckets, draws=draws, cutoff=cutoff, seed=seed,
                        context_semantic=context_semantic, context_detail=context_detail)
    fit.net = fit_gate_net(fit.sigmas, fit.alphas, fit.weights, config=net_config, iters=iters, seed=seed)
    fit.net_alphas = [fit.net.alpha(s) for s in fit.sigmas]
    logger.info("gate fit: %s", json.dumps({"sigma": [round(s, 3) for s in fit.sigmas],
                                            "alpha": [round(a, 3) for a in fit.alphas]}))
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        save_gate_net(fit.net, out_path, extra={**fit.summary(), "cutoff": cutoff, "semantic": semantic.name,
                                                "detail": detail.name})
    return fit
