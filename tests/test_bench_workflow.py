"""benchmarks/workflow.py (ComfyUI vs `twinflow run` on ComfyUI's Wan template): its arithmetic on injected
samples, its streaming safetensors writer read back by the safetensors library, its reading of ComfyUI's log
lines, the `twinflow run --dtype` knob it relies on, and (ComfyUI + slow) a real smoke run of both sides.
No timing is asserted anywhere."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twinflow.benchmarks import workflow as bench

HERE = Path(__file__).parent
PKG = HERE.parent


def _sample(wall, work, rss_gib, **phases):
    return bench.Sample(wall, work, int(rss_gib * 2 ** 30), phases, "d")


def test_table_median_ratio_and_rows():
    a = bench.Case("fp32", comfyui=[_sample(30.0, 20.0, 9.0), _sample(10.0, 8.0, 10.0), _sample(20.0, 15.0, 9.5)],
                   twinflow=[_sample(8.0, 6.0, 7.0, text=1.0, sample=4.0),
                             _sample(12.0, 9.0, 7.5, text=3.0, sample=5.0)],
                   latent_rel=2.5e-5, frames_255=1.0, video_255=40.0)
    assert bench.median([s.wall_s for s in a.comfyui]) == 20.0
    assert bench.median([s.wall_s for s in a.twinflow]) == 10.0  # even count: the mean of the middle two
    assert bench.speed_ratio(a) == pytest.approx(2.0)  # ComfyUI's median over TwinFlow's: > 1 = TwinFlow faster
    text = bench.format_table([a], {"machine": "test cpu"})
    row = next(line for line in text.splitlines() if line.startswith("| fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "20.00 (30.00, 10.00, 20.00)" and cells[2] == "10.00 (8.00, 12.00)"
    assert cells[3] == "2.00x"
    assert cells[4] == "10.00" and cells[5] == "7.50"  # the largest peak RSS of each side, GiB
    assert cells[6] == "2.50e-05" and cells[7] == "1" and cells[8] == "40"
    # phases: ComfyUI has none (dashes); TwinFlow's medians; start-up = median of wall - work
    comfy = next(line for line in text.splitlines() if line.startswith("| fp32 | ComfyUI |"))
    ours = next(line for line in text.splitlines() if line.startswith("| fp32 | TwinFlow |"))
    assert [c.strip() for c in comfy.strip("|").split("|")][2:5] == ["5.00", "15.00", "-"]  # 10, 2, 5
    ours_cells = [c.strip() for c in ours.strip("|").split("|")]
    assert ours_cells[2:4] == ["2.50", "7.50"] and ours_cells[5] == "2.00" and ours_cells[6] == "4.50"
    assert "- machine: test cpu" in text


def test_group_phases_sums_node_timings_by_class():
    timings = [{"class_type": "CLIPLoader", "seconds": 1.0}, {"class_type": "CLIPTextEncode", "seconds": 2.0},
               {"class_type": "CLIPTextEncode", "seconds": 3.0}, {"class_type": "KSampler", "seconds": 10.0},
               {"class_type": "VAEDecode", "seconds": 4.0}, {"class_type": "SaveVideo", "seconds": 0.5}]
    got = bench.group_phases(timings)
    assert got == {"load": 1.0, "text": 5.0, "sample": 10.0, "decode": 4.0, "save": 0.5}


def test_comfyui_log_lines_are_read():
    """The lines as ComfyUI 0.3.64 logs them (main.py, comfy/model_base.py, comfy/sd.py)."""
    log = ("model weight dtype torch.bfloat16, manual cast: None\n"
           "CLIP/text encoder model load device: cpu, offload device: cpu, current: cpu, dtype: torch.float32\n"
           "VAE load device: cpu, offload device: cpu, dtype: torch.bfloat16\nPrompt executed in 12.34 seconds\n")
    assert bench.comfy_dtypes(log) == "DiT bfloat16, text float32, VAE bfloat16"
    assert bench._executed_s(log) == pytest.approx(12.34)
    assert bench._executed_s("Prompt executed in 01:02:03") == 3723
    assert math.isnan(bench._executed_s("nothing"))
    cast = "model weight dtype torch.float16, manual cast: torch.float32\n"
    assert bench.comfy_dtypes(cast).startswith("DiT float32 (cast)")


def test_stream_writer_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    big = torch.randn(37, 5, generator=g).to(torch.bfloat16)
    tensors = {"a": torch.randn(3, 4, generator=g), "scalar": torch.tensor(0.25),
               "fp8": (torch.randn(6, 7, generator=g) * 10).to(torch.float8_e4m3fn),
               "empty": torch.empty(0, dtype=torch.float8_e4m3fn),
               "bytes": torch.arange(11, dtype=torch.uint8), "half": torch.randn(2, 3, generator=g).half()}
    specs = [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    specs.append(("chunked", torch.bfloat16, (37, 5), lambda: (big[i:i + 8] for i in range(0, 37, 8))))
    path = tmp_path / "x.safetensors"
    bench.stream_safetensors(path, specs)
    back = load_file(str(path))
    assert set(back) == set(tensors) | {"chunked"}
    for k, v in {**tensors, "chunked": big}.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k
    assert not list(tmp_path.glob("*.part"))


def test_umt5_file_loads_as_comfyuis_fp8_scaled_layout(tmp_path):
    """The generated umT5 file, small config: TwinFlow's loader detects the config from its shapes, keeps its
    Linears in fp8 with a scale, and its tokenizer comes from the file."""
    pytest.importorskip("sentencepiece")
    from safetensors import safe_open

    from twinflow.models import umt5

    cfg = umt5.UMT5Config(vocab_size=256, d_model=64, d_kv=8, num_heads=2, d_ff=16, num_layers=2)
    path = tmp_path / "umt5.safetensors"
    bench.write_umt5(path, cfg, chunk_rows=100)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.scale_weight").shape == ()
        assert f.get_tensor("shared.weight").dtype == torch.bfloat16
    assert {"scaled_fp8", "spiece_model"} <= keys
    model = umt5.load_umt5_file(path)
    assert model.encoder.cfg == cfg and model.tokenizer is not None
    z = model.encode("a fox in the snow")
    assert z.shape[-1] == 64 and torch.isfinite(z).all()


def test_run_dtype_override_reaches_core_loaders(tf_dirs):
    """`twinflow run --dtype`: UNETLoader/VAELoader load in the given dtype inside the override, ComfyUI's CPU
    default (float32) outside; the record says whether a loader consulted it."""
    pytest.importorskip("sentencepiece")
    spec = importlib.util.spec_from_file_location("core_files", HERE / "fixtures" / "core_files.py")
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    from twinflow.nodes import core_models

    cf.write_t2v_models(tf_dirs["models"])

    def load():
        unet = core_models.UNETLoader().load_unet(cf.T2V_FILES["unet"], "default")[0]
        vae = core_models.VAELoader().load_vae(cf.T2V_FILES["vae"])[0]
        return unet.module.blocks[0].self_attn.q.weight.dtype, next(vae.parameters()).dtype

    with core_models.compute_dtype_override("bf16") as used:
        assert not used
        assert load() == (torch.bfloat16, torch.bfloat16)
    assert used
    assert load() == (torch.float32, torch.float32)
    with core_models.compute_dtype_override(None) as none:
        assert load() == (torch.float32, torch.float32)
    assert not none
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        with core_models.compute_dtype_override("fp64"):
            pass


@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_smoke_run_has_both_sides_and_a_finite_difference(tmp_path):
    pytest.importorskip("comfyui_workflow_templates")
    pytest.importorskip("sentencepiece")
    out = tmp_path / "table.md"
    res = subprocess.run([sys.executable, str(PKG / "benchmarks" / "workflow.py"), "--smoke", "--repeats", "1",
                          "--files-dir", str(tmp_path / "files"), "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    table = out.read_text()
    assert table == res.stdout
    row = next(line for line in table.splitlines() if line.startswith("| smoke_fp32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    comfy_wall, ours_wall = (float(cells[i].split()[0]) for i in (1, 2))
    assert comfy_wall > 0 and ours_wall > 0 and re.fullmatch(r"\d+\.\d\dx", cells[3])
    assert float(cells[4]) > 0 and float(cells[5]) > 0  # peak RSS of each side
    latent, frames, video = float(cells[6]), float(cells[7]), float(cells[8])
    assert all(math.isfinite(x) for x in (latent, frames, video))
    # the same graph and files on both sides: the oracle test's tolerances hold here too
    assert latent < 1e-4 and frames <= 1
    sides = [line for line in table.splitlines() if line.startswith("| smoke_fp32") and "float32" in line]
    assert len(sides) == 2 and "| ComfyUI |" in sides[0] and "| TwinFlow |" in sides[1]
    assert "DiT float32, text float32, VAE float32" in sides[0]
    assert "DiT fp32" in sides[1] and "VAE fp32" in sides[1]
    for line in sides:  # both sides have per-node phases (ComfyUI's through the benchmark's timing custom node)
        phases = [c.strip() for c in line.strip("|").split("|")][4:9]
        assert all(float(x) >= 0 for x in phases), line


def test_compute_dtype_node_rewires_the_unet_consumers():
    prompt = {"37": {"class_type": "UNETLoader", "inputs": {"unet_name": "x", "weight_dtype": "default"}},
              "48": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["37", 0], "shift": 8}},
              "3": {"class_type": "KSampler", "inputs": {"model": ["48", 0], "seed": 1}}}
    out = bench.with_compute_dtype(prompt, "bf16")
    assert out["bench_dtype"] == {"class_type": "ModelComputeDtype", "inputs": {"model": ["37", 0], "dtype": "bf16"}}
    assert out["48"]["inputs"]["model"] == ["bench_dtype", 0] and out["3"]["inputs"]["model"] == ["48", 0]
    assert prompt["48"]["inputs"]["model"] == ["37", 0]  # the input prompt is not changed
    log = "model weight dtype torch.bfloat16, manual cast: torch.float32\n"
    assert bench.comfy_dtypes(log, "bf16").startswith("DiT bf16 (ModelComputeDtype; weights bfloat16)")


def test_run_dtype_without_core_loaders_warns(monkeypatch, tf_dirs, capsys, tmp_path):
    """`twinflow run --dtype` on a graph without core loaders says it changed nothing (no silent setting)."""
    from twinflow.runner import api, cli

    fix = HERE / "fixtures" / "runner"
    spec = importlib.util.spec_from_file_location("runner_testnodes", fix / "testnodes.py")
    tn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tn)
    monkeypatch.setattr(api, "default_registry", lambda: tn.REGISTRY)
    code = cli.main(["run", str(fix / "ui_sampler.json"), "--output-dir", str(tmp_path / "o"), "--no-progress",
                     "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert code == 0 and "--dtype bf16: no core UNETLoader or VAELoader ran" in err
