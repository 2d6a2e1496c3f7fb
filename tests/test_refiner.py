"""Detail refiner: size, time causality, streaming, save/load round trip, metadata errors, nodes."""
import json

import pytest
import torch

from twinflow.core.errors import CheckpointError
from twinflow.core.handles import Denoiser
from twinflow.models import refiner as R


def test_default_param_count_about_37m():
    with torch.device("meta"):
        model = R.DetailRefiner(R.PRESETS["default"])
    n = R.param_count(model)
    assert n == 37_462_880  # the seed design asks for ~37M
    assert abs(n - 37e6) / 37e6 < 0.02


def _tiny(seed=0):
    model, cfg = R.random_refiner("tiny", seed=seed)
    return model, cfg


def test_causal_in_time():
    model, _ = _tiny()
    x = torch.randn(2, 16, 7, 8, 8)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        base = model(x, t)
        for k in (1, 3, 6):
            y = x.clone()
            y[:, :, k:] = torch.randn_like(y[:, :, k:]) * 3
            out = model(y, t)
            assert torch.equal(out[:, :, :k], base[:, :, :k]), f"frames < {k} changed when frames >= {k} changed"
            assert (out[:, :, k] - base[:, :, k]).abs().max() > 1e-4  # and frame k does see its own input


def test_streaming_chunks_match_whole_video():
    model, _ = _tiny(1)
    x = torch.randn(1, 16, 6, 8, 12)
    t = torch.tensor([400.0])
    with torch.no_grad():
        whole = model(x, t)
        state = {}
        parts = [model(x[:, :, a:b], t, stream_state=state) for a, b in ((0, 1), (1, 3), (3, 6))]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-5, atol=1e-6)


def test_time_conditioning_and_odd_sizes():
    model, _ = _tiny(2)
    x = torch.randn(1, 16, 2, 5, 7)  # H, W not multiples of the U-Net stride: padded then cropped
    with torch.no_grad():
        a = model(x, torch.tensor([10.0]))
        b = model(x, torch.tensor([990.0]))
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-4


def test_seeded_random_init_is_reproducible():
    a, _ = _tiny(5)
    b, _ = _tiny(5)
    c, _ = _tiny(6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_round_trip_bit_exact(tmp_path):
    model, cfg = _tiny(3)
    R.save_refiner(model, tmp_path / "r.safetensors")
    loaded, lcfg = R.load_refiner(tmp_path / "r.safetensors")
    assert lcfg == cfg
    s0, s1 = model.state_dict(), loaded.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    x, t = torch.randn(1, 16, 3, 4, 4), torch.tensor([123.0])
    with torch.no_grad():
        # weights are bit-exact; the conv kernels may pick another blocking for the new memory, so allow ulps
        torch.testing.assert_close(model(x, t), loaded(x, t), rtol=1e-6, atol=1e-6)
    half, _ = R.load_refiner(tmp_path / "r.safetensors", dtype=torch.bfloat16)
    assert half.conv_in.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert half(x, t).dtype == torch.float32


def test_metadata_errors(tmp_path):
    from safetensors.torch import save_file

    model, cfg = _tiny()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    cases = {
        "nometa.safetensors": (None, "no refiner config in the file metadata"),
        "badjson.safetensors": ({"twinflow.config": "{widths: [16"}, "not valid JSON"),
        "unknown.safetensors": ({"twinflow.config": json.dumps({"widths": [16, 32], "depthx": 3})},
                                "unknown refiner config fields"),
        "family.safetensors": ({"twinflow.family": "gate", "twinflow.config": cfg.to_json()}, "not a 'refiner'"),
        "badvalue.safetensors": ({"twinflow.config": json.dumps({"widths": [0]})}, "bad refiner config"),
        # a config that does not fit the weights: strict key/shape check
        "mismatch.safetensors": ({"twinflow.config": json.dumps({**json.loads(cfg.to_json()), "widths": [16, 48]})},
                                 "shape mismatch"),
    }
    for name, (meta, msg) in cases.items():
        save_file(sd, str(tmp_path / name), metadata=meta)
        with pytest.raises(CheckpointError, match=msg):
            R.load_refiner(tmp_path / name)
    broken = dict(sd)
    broken.pop("conv_out.bias")
    save_file(broken, str(tmp_path / "missing.safetensors"), metadata={"twinflow.config": cfg.to_json()})
    with pytest.raises(CheckpointError, match=r"missing \(1\): conv_out.bias"):
        R.load_refiner(tmp_path / "missing.safetensors")
    torch.save(sd, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="no metadata at all"):
        R.load_refiner(tmp_path / "r.pt")


def test_nodes_load_save_round_trip(tf_dirs):
    from twinflow.nodes.refiner import TwinFlowLoadRefiner, TwinFlowSaveRefiner

    spec = TwinFlowLoadRefiner.INPUT_TYPES()["required"]
    assert "random:tiny" in spec["refiner_name"][0] and "random:default" in spec["refiner_name"][0]
    (den,) = TwinFlowLoadRefiner().load("random:tiny", "default", 7)
    assert isinstance(den, Denoiser) and den.family == "refiner" and den.text_dim is None and den.in_channels == 16
    res = TwinFlowSaveRefiner().save(den, "refiners/r")
    fname = res["ui"]["refiners"][0]["filename"]
    saved = tf_dirs["output"] / "refiners" / fname
    assert saved.is_file()
    (tf_dirs["models"] / "twinflow").mkdir()
    saved.rename(tf_dirs["models"] / "twinflow" / fname)
    assert fname in TwinFlowLoadRefiner.INPUT_TYPES()["required"]["refiner_name"][0]
    (den2,) = TwinFlowLoadRefiner().load(fname, "default", 0)
    x = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        v1 = den.velocity(x, torch.tensor(0.3), None)
        v2 = den2.velocity(x, torch.tensor(0.3), torch.randn(1, 5, 8))  # text context is ignored
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="must be a detail refiner"):
        TwinFlowSaveRefiner().save(den.clone(family="wan_dit"), "x")
    with pytest.raises(ValueError, match="unknown random refiner"):
        TwinFlowLoadRefiner().load("random:huge", "default", 0)
