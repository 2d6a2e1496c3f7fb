"""Block streaming (models/block_stream.py) on the CPU, through a counting device shim.

CPU -> CPU copies are invisible, so the tests give the streamer a copy engine of their own (`CountingEngine`,
the same strategy slot the CUDA engine fills): it hands out fresh clones as "device" tensors, records which
blocks hold such copies at every moment and counts copies. Independent checks, not the streamer's own
bookkeeping: a probe hook on every block (run after the streamer's) checks that every tensor the block is
about to use is one of the shim's live device copies of that very block, and that no more blocks than the
budget hold copies; the output is compared bit for bit with the original, resident model.
"""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from twinflow.models import block_stream as BS
from twinflow.models import wan_dit as W


class CountingEngine(BS.CopyEngine):
    """A fake device: copies are clones; which blocks hold copies, and how many copies, are recorded."""

    def __init__(self, budget_limit=None):
        self.device = torch.device("cpu")
        self.live = {}  # label -> list of device tensors
        self.copies = {}  # label -> count
        self.peak = 0
        self.budget_limit = budget_limit
        self.events = []

    def host(self, t):
        return t.detach().clone()  # the streamer's host copy (separate memory, so the probes can tell them apart)

    def start(self, label, hosts):
        assert label not in self.live, f"{label} copied while still resident"
        self.live[label] = [h.clone() for h in hosts]
        self.copies[label] = self.copies.get(label, 0) + 1
        self.peak = max(self.peak, len(self.live))
        self.events.append(("copy", label))
        if self.budget_limit is not None:
            assert len(self.live) <= self.budget_limit, f"{len(self.live)} blocks resident: {sorted(self.live)}"
        return BS.Transfer(label, self.live[label])

    def ready(self, transfer):
        assert self.live.get(transfer.label) is transfer.tensors
        return transfer.tensors

    def release(self, transfer):
        del self.live[transfer.label]
        self.events.append(("release", transfer.label))
        transfer.tensors = []


def _cfg(layers=5):
    return replace(W.get_config("tiny"), num_layers=layers)


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx


def _probe(streamed, engine, name, budget):
    """Before each block runs: all its tensors are live shim copies of this block, within the budget."""
    seen = []

    def make(i):
        def hook(block, args):
            live = engine.live.get((name, i))
            assert live is not None, f"block {i} runs without a device copy"
            ptrs = {t.data_ptr() for t in live}
            used = [t.data_ptr() for t in list(block.parameters()) + list(block.buffers())]
            assert used and all(p in ptrs for p in used), f"block {i} would read weights that are not its device copy"
            assert len(engine.live) <= budget
            seen.append(i)
        return hook

    for i, blk in enumerate(streamed.blocks):
        blk.register_forward_pre_hook(make(i))
    return seen


@pytest.fixture(scope="module")
def ref5():
    return W.random_wan_dit(config=_cfg(5), seed=0)


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_streamed_output_is_bit_exact_and_within_budget(budget, ref5):
    cfg, ref = ref5.config, ref5
    before = {k: (v.data_ptr(), v.clone()) for k, v in ref.state_dict().items()}
    engine = CountingEngine(budget_limit=budget)
    streamed = BS.stream_blocks(ref, budget, engine=engine, name="expert")
    seen = _probe(streamed, engine, "expert", budget)
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx)
        for n in (1, 2):
            got = streamed(x, t, ctx)
            assert torch.equal(got, want)
            assert engine.copies == {("expert", i): n for i in range(5)}  # every block once per forward
            assert engine.live == {}  # nothing resident between forwards
    assert seen == list(range(5)) * 2
    assert engine.peak == min(budget, 5)  # the prefetch fills the budget
    # the input model is untouched: same tensors, same values
    for k, v in ref.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k
    # between forwards the streamed blocks point at the streamer's host copies, not at the original's tensors
    s = BS.streamer_of(streamed)
    host = {sl.host.data_ptr() for b in s.blocks for sl in b.slots}
    assert {p.data_ptr() for p in streamed.blocks.parameters()} <= host
    assert "streaming 5 blocks" in s.status() and f"at most {budget} resident" in s.status()


def test_prefetch_order_copies_ahead_and_releases_after_use():
    cfg = _cfg(4)
    engine = CountingEngine(budget_limit=2)
    streamed = BS.stream_blocks(W.random_wan_dit(config=cfg, seed=0), 2, engine=engine, name="m")
    with torch.no_grad():
        streamed(*_inputs(cfg))
    ev = [(kind, label[1]) for kind, label in engine.events]
    assert ev == [("copy", 0), ("copy", 1), ("release", 0), ("copy", 2), ("release", 1), ("copy", 3),
                  ("release", 2), ("release", 3)]


def test_budget_one_copies_each_block_only_after_the_previous_left():
    cfg = _cfg(3)
    engine = CountingEngine(budget_limit=1)
    streamed = BS.stream_blocks(W.random_wan_dit(config=cfg, seed=0), 1, engine=engine, name="m")
    with torch.no_grad():
        streamed(*_inputs(cfg))
    assert [k for k, _ in engine.events] == ["copy", "release"] * 3 and engine.peak == 1


def test_two_experts_share_one_budget():
    cfg = _cfg(4)
    high, low = W.random_wan_dit(config=cfg, seed=1), W.random_wan_dit(config=cfg, seed=2)
    budget = BS.StreamBudget(3, "experts")
    engine = CountingEngine(budget_limit=3)  # one fake device: the count of live copies spans both models
    sh = BS.stream_blocks(high, budget=budget, engine=engine, name="high")
    sl = BS.stream_blocks(low, budget=budget, engine=engine, name="low")
    _probe(sh, engine, "high", 3)
    _probe(sl, engine, "low", 3)
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want_h, want_l = high(x, t, ctx), low(x, t, ctx)
        for model, want in ((sh, want_h), (sl, want_l), (sh, want_h), (sl, want_l)):
            assert torch.equal(model(x, t, ctx), want)
    assert engine.copies == {(n, i): 2 for n in ("high", "low") for i in range(4)}
    assert engine.peak == 3 and budget.peak == 3 and budget.resident == 0
    assert "shared by 2 models" in BS.streamer_of(sl).status()


def test_models_sharing_a_budget_cannot_run_at_once_and_an_error_leaves_nothing_resident():
    cfg = _cfg(3)
    budget = BS.StreamBudget(1, "one")
    engine = CountingEngine(budget_limit=1)
    a = BS.stream_blocks(W.random_wan_dit(config=cfg, seed=1), budget=budget, engine=engine, name="a")
    b = BS.stream_blocks(W.random_wan_dit(config=cfg, seed=2), budget=budget, engine=engine, name="b")
    x, t, ctx = _inputs(cfg)
    a.blocks[1].register_forward_pre_hook(lambda m, args: b(x, t, ctx))  # b runs inside a's forward
    with torch.no_grad(), pytest.raises(RuntimeError, match="held by other models"):
        a(x, t, ctx)
    assert engine.live == {} and budget.resident == 0  # always_call hooks released every block
    host = {sl.host.data_ptr() for blk in BS.streamer_of(a).blocks for sl in blk.slots}
    assert {p.data_ptr() for p in a.blocks.parameters()} <= host


def test_text_cache_is_off_for_a_streamed_model_and_the_result_unchanged():
    from twinflow.core.handles import enter_text_caches
    import contextlib

    cfg = _cfg(3)
    ref = W.random_wan_dit(config=cfg, seed=0)
    engine = CountingEngine(budget_limit=2)
    streamed = BS.stream_blocks(ref, 2, engine=engine, name="m")
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx)
        with contextlib.ExitStack() as stack:
            enter_text_caches(stack, W.make_denoiser(streamed))
            assert streamed._text_cache is None  # the precompute of every block's K/V never runs
            assert torch.equal(streamed(x, t, ctx), want) and torch.equal(streamed(x, t, ctx), want)
    assert engine.copies == {("m", i): 2 for i in range(3)}


def test_streaming_adds_no_hook_to_the_linears_so_the_onednn_path_stays():
    streamed = BS.stream_blocks(W.random_wan_dit(config=_cfg(2), seed=0), 1, engine=CountingEngine(), name="m")
    linears = [m for m in streamed.modules() if isinstance(m, nn.Linear)]
    assert linears and not W._has_hooks(*linears)
    assert not W._has_hooks(*[blk.ffn for blk in streamed.blocks])
    assert all(W._has_hooks(blk) for blk in streamed.blocks)


def test_a_quantized_model_streams_bit_exactly():
    from twinflow.quant.swap import Recipe, quantize_module

    cfg = _cfg(3)
    qm, _ = quantize_module(W.random_wan_dit(config=cfg, seed=0), Recipe("int8_weight_only"))
    engine = CountingEngine(budget_limit=2)
    streamed = BS.stream_blocks(qm, 2, engine=engine, name="q")
    _probe(streamed, engine, "q", 2)
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(streamed(x, t, ctx), qm(x, t, ctx))
    assert engine.copies == {("q", i): 1 for i in range(3)}


def test_bad_budgets_and_models_are_refused():
    m = W.random_wan_dit(config=_cfg(2), seed=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_resident_blocks must be an integer >= 1"):
            BS.stream_blocks(m, bad, engine=CountingEngine())
    with pytest.raises(ValueError, match="non-empty `blocks` ModuleList"):
        BS.stream_blocks(nn.Linear(4, 4), 2, engine=CountingEngine(), name="lin")
    empty = nn.Module()
    empty.blocks = nn.ModuleList()
    with pytest.raises(ValueError, match="non-empty `blocks` ModuleList"):
        BS.stream_blocks(empty, 2, engine=CountingEngine())
    tied = W.random_wan_dit(config=_cfg(2), seed=0)
    tied.blocks[1].ffn[0].weight = tied.blocks[0].ffn[0].weight
    with pytest.raises(ValueError, match="1 tensor.s. or module.s. are shared"):
        BS.stream_blocks(tied, 2, engine=CountingEngine())
    tied = W.random_wan_dit(config=_cfg(2), seed=0)
    tied.blocks[0].norm3.weight = tied.head.modulation
    with pytest.raises(ValueError, match="are shared between blocks or with the embeddings/head"):
        BS.stream_blocks(tied, 2, engine=CountingEngine())
    with pytest.raises(ValueError, match="compute device is the CPU"):
        BS.stream_blocks(m, 2, device="cpu")
    with pytest.raises(ValueError, match="exactly one of"):
        BS.stream_blocks(m, 2, budget=BS.StreamBudget(2), engine=CountingEngine())
    streamed = BS.stream_blocks(m, 2, engine=CountingEngine(), name="m")
    with pytest.raises(ValueError, match="already block-streamed"):
        BS.stream_blocks(streamed, 2, engine=CountingEngine())
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(streamed)
    with pytest.raises(ValueError, match="apply it to the model before streaming"):
        BS.refuse_streamed(streamed, "TwinFlow Quantize Model")
    BS.refuse_streamed(m, "TwinFlow Quantize Model")  # the plain model passes


def test_shared_budget_groups():
    a = BS.shared_budget("test-group-x", 3)
    assert BS.shared_budget("test-group-x", 3) is a
    with pytest.raises(ValueError, match="already holds 3 resident blocks"):
        BS.shared_budget("test-group-x", 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_side_stream_is_exact_and_within_budget():
    """The real CUDA engine (pinned host copies, side stream, events, record_stream) on a small model: the same
    output as the resident model on the GPU, at most `budget` blocks on the GPU whenever a block runs, none
    between forwards, and the host copies pinned. (Written without a GPU; `./dev gpu` runs it.)"""
    cfg = _cfg(6)
    ref = W.random_wan_dit(config=cfg, seed=0)
    resident = copy.deepcopy(ref).cuda()
    x, t, ctx = (v.cuda() for v in _inputs(cfg))
    streamed = BS.stream_blocks(ref, 2, device="cuda", name="m")
    s = BS.streamer_of(streamed)
    assert isinstance(s.engine, BS.CudaCopyEngine) and all(sl.host.is_pinned() for b in s.blocks for sl in b.slots)
    on_gpu = []

    def probe(block, args):
        on_gpu.append(sum(any(p.is_cuda for p in blk.parameters()) for blk in streamed.blocks))
        assert all(p.is_cuda for p in block.parameters())

    for blk in streamed.blocks:
        blk.register_forward_pre_hook(probe)
    with torch.no_grad():
        want = resident(x, t, ctx)
        for _ in range(2):
            assert torch.equal(streamed(x, t, ctx), want)
            torch.cuda.synchronize()
            assert not any(p.is_cuda for p in streamed.blocks.parameters())
    assert len(on_gpu) == 12 and max(on_gpu) <= 2  # active blocks (prefetched ones are not yet pointed at)
    assert s.budget.peak == 2 and s.budget.resident == 0 and s.copies == 12
    assert streamed.patch_embedding.weight.is_cuda and streamed.head.head.weight.is_cuda


def test_cuda_engine_frees_a_block_only_after_the_gpu_is_past_it(monkeypatch):
    """CudaCopyEngine's memory bound with torch.cuda's Stream/Event replaced by fakes (the GPU "finishes" a block
    only when the CPU waits for its event): released blocks stay allocated until their compute-stream event,
    and a copy that would make more than the budget hold device memory first waits for the oldest one."""
    import contextlib

    waits = []

    class FakeEvent:
        def __init__(self):
            self.done = False

        def record(self, stream=None):
            pass

        def query(self):
            return self.done

        def synchronize(self):
            if not self.done:
                waits.append(self)
            self.done = True

    class FakeStream:
        def wait_event(self, event):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    unpinned = BS.CudaCopyEngine("cuda:0", pin=False)
    w = torch.ones(4)
    assert unpinned.host(w) is not None and unpinned.host(w).data_ptr() == w.data_ptr()  # no second host copy
    engine = BS.CudaCopyEngine("cuda:0")
    engine.device = torch.device("cpu")  # the fake GPU's memory
    engine.host = lambda t: t.detach().clone()  # (pinning needs a real GPU)
    engine.limit = 2
    held = []
    real_start = engine.start

    def start(label, hosts):
        tr = real_start(label, hosts)
        held.append(engine._live + len(engine._retiring))
        return tr

    engine.start = start
    h = [torch.ones(3)]
    a, b = engine.start("a", h), engine.start("b", h)
    engine.release(a)
    assert waits == [] and len(engine._retiring) == 1  # a's kernels may still be queued: its memory is kept
    c = engine.start("c", h)  # a third block would exceed 2: wait for a first
    assert len(waits) == 1 and held == [1, 2, 2]
    engine.release(b)
    engine._retiring[0][0].done = True  # the GPU finished b on its own: freed without a wait
    engine.release(c)
    engine.start("d", h)
    assert len(waits) == 1
    engine.settle()
    assert len(waits) == 2 and not engine._retiring  # c waited for at the end of the forward

    # through the streamer: never more than the budget's blocks holding device memory, none after a forward
    cfg = _cfg(4)
    engine2 = BS.CudaCopyEngine("cuda:0")
    engine2.device = torch.device("cpu")
    engine2.host = lambda t: t.detach().clone()
    outstanding = []
    real_start2 = engine2.start

    def start2(label, hosts):
        tr = real_start2(label, hosts)
        outstanding.append(engine2._live + len(engine2._retiring))
        return tr

    engine2.start = start2
    ref = W.random_wan_dit(config=cfg, seed=0)
    streamed = BS.stream_blocks(ref, 2, engine=engine2, name="m")
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(streamed(x, t, ctx), ref(x, t, ctx))
    assert len(outstanding) == 4 and max(outstanding) <= 2 and not engine2._retiring and engine2._live == 0


def test_sync_engine_streams_exactly():
    """SyncCopyEngine (non-CUDA accelerators: a plain `.to(device)`), here with the CPU as its device."""
    cfg = _cfg(3)
    ref = W.random_wan_dit(config=cfg, seed=0)
    streamed = BS.stream_blocks(ref, 2, engine=BS.SyncCopyEngine("cpu"), name="m")
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(streamed(x, t, ctx), ref(x, t, ctx))
    s = BS.streamer_of(streamed)
    assert s.copies == 3 and s.budget.peak == 2 and s.budget.resident == 0
