"""The samplers run each Wan DiT inside `WanDiT.text_cache()`: same result, text side computed once, cache gone after.

The oracle is the same run with the model behind a plain wrapper that has no `text_cache` (so nothing is cached);
the text embedding's forward hook counts how often the text side is computed.
"""
import pytest
import torch
from torch import nn

from twinflow.core.errors import Interrupted
from twinflow.core.handles import Denoiser
from twinflow.core.progress import clear_interrupt, request_interrupt
from twinflow.models.wan_dit import random_wan_dit
from twinflow.sampling.dual import sample
from twinflow.sampling.gates import GateSchedule
from twinflow.sampling.guidance import Branch

SHAPE = (1, 16, 2, 4, 6)  # B, C, T, H, W: one latent of the tiny DiT (patch 1x2x2)


class Uncached(nn.Module):
    """The same model without `text_cache` (the sampler then has nothing to enter): the reference run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, context):
        return self.inner(x, t, context)


def wan(seed):
    model = random_wan_dit("tiny", seed=seed)
    model.text_calls = 0

    def count(*_):
        model.text_calls += 1
    model.text_embedding.register_forward_hook(count)  # one call per text-side computation
    return model


def denoiser(module, name):
    cfg = (module.inner if isinstance(module, Uncached) else module).config
    return Denoiser(module=module, family="wan_dit", in_channels=cfg.in_dim, text_dim=cfg.text_dim, name=name,
                    info={"latent_format": "wan21"})


def prompts(seed):
    g = torch.Generator().manual_seed(seed)
    # positive and negative of different lengths: the batched CFG call zero-pads and concatenates them per step
    return [[torch.randn(1, 5, 4096, generator=g), {}]], [[torch.randn(1, 3, 4096, generator=g), {}]]


def run(sem, det=None, batch_cfg="auto", sampler="uni_pc", steps=4):
    pos, neg = prompts(1)
    branch = lambda m, name: Branch(denoiser(m, name), positive=pos, negative=neg, cfg=4.0, name=name,
                                    batch_cfg=batch_cfg)
    out, report = sample(branch(sem, "semantic"), {"samples": torch.zeros(SHAPE)}, seed=3, steps=steps,
                         sampler=sampler, scheduler="simple", shift=5.0,
                         detail=branch(det, "detail") if det is not None else None,
                         gate=GateSchedule("constant", alpha=0.5) if det is not None else None)
    return out["samples"], report


@pytest.mark.parametrize("batch_cfg, contexts", [("auto", 1), ("never", 2)])
def test_single_branch_same_result_text_computed_once(batch_cfg, contexts):
    model = wan(7)
    with torch.no_grad():
        want, rep_ref = run(Uncached(model), batch_cfg=batch_cfg)
    forwards = rep_ref.branches["semantic"]["forwards"]
    assert model.text_calls == forwards > contexts  # reference: text side recomputed on every forward
    model.text_calls = 0
    got, rep = run(model, batch_cfg=batch_cfg)
    assert rep.branches["semantic"]["forwards"] == forwards
    assert model.text_calls == contexts  # once per distinct context (cond+uncond batch, or each prompt)
    assert torch.equal(got, want)
    assert model._text_cache is None  # left on exit
    x, t, c = torch.randn(SHAPE), torch.tensor([500.0]), prompts(1)[0][0][0]
    with torch.no_grad():
        model(x, t, c), model(x, t, c)
    assert model.text_calls == contexts + 2  # no cache active after the run


def test_dual_branch_caches_each_model():
    sem, det = wan(7), wan(8)
    with torch.no_grad():
        want, rep_ref = run(Uncached(sem), Uncached(det), sampler="euler")
    assert rep_ref.branches["semantic"]["forwards"] == rep_ref.branches["detail"]["forwards"] == 4  # alpha 0.5
    assert sem.text_calls == det.text_calls == 4
    sem.text_calls = det.text_calls = 0
    got, _ = run(sem, det, sampler="euler")
    assert sem.text_calls == det.text_calls == 1
    assert torch.equal(got, want)
    assert sem._text_cache is None and det._text_cache is None


def test_same_model_in_both_branches_is_entered_once():
    model = wan(7)
    with torch.no_grad():
        want, _ = run(Uncached(model), Uncached(model), sampler="euler")
    model.text_calls = 0
    got, _ = run(model, model, sampler="euler")
    assert model.text_calls == 1  # one cache shared by both branches (same prompts)
    assert torch.equal(got, want) and model._text_cache is None


@pytest.mark.parametrize("stop", ["interrupt", "error"])
def test_cache_left_on_interrupt_and_error(stop):
    model = wan(7)
    seen = []

    def after_forward(*_):
        seen.append(model._text_cache)
        if len(seen) == 2:
            if stop == "error":
                raise RuntimeError("boom")
            request_interrupt()  # the sampler raises Interrupted before the next step
    model.register_forward_hook(after_forward)
    with model.text_cache():  # a caller's own cache around the sampler is restored, not dropped
        outer = model._text_cache
        try:
            with pytest.raises(Interrupted if stop == "interrupt" else RuntimeError):
                run(model, sampler="euler", steps=6)
        finally:
            clear_interrupt()
        assert isinstance(seen[0], list) and seen[0] is not outer  # the run had its own cache
        assert len(seen) == 2 and model._text_cache is outer
    assert model._text_cache is None


def test_fit_gate_reuses_the_text_side_with_the_same_result():
    from twinflow.sampling.fit import bucket_alphas

    sem, det = wan(0), wan(1)
    ctx_s, ctx_d = (torch.randn(1, 5, 4096, generator=torch.Generator().manual_seed(s)) for s in (7, 8))
    lat = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))]
    kw = dict(buckets=2, draws=2, seed=0, context_semantic=ctx_s, context_detail=ctx_d)
    with torch.no_grad():
        want = bucket_alphas(denoiser(Uncached(sem), "s"), denoiser(Uncached(det), "d"), lat, **kw)
        assert sem.text_calls == det.text_calls == 4  # reference: every call computes the text side
        sem.text_calls = det.text_calls = 0
        got = bucket_alphas(denoiser(sem, "s"), denoiser(det, "d"), lat, **kw)
    assert sem.text_calls == det.text_calls == 1
    assert got.alphas == want.alphas and got.losses_fused == want.losses_fused
    assert sem._text_cache is None and det._text_cache is None
