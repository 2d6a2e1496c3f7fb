"""benchmarks/serve.py, tiny: its counts against what the server itself recorded and wrote (not what the
benchmark's client saw), its percentiles against numpy's."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("aiohttp")

from twinflow.benchmarks import serve as bench  # noqa: E402
from twinflow.runner.serve.app import ServeConfig, ServerThread  # noqa: E402


def test_serve_benchmark_smoke_counts(tmp_path, capsys):
    cfg = ServeConfig(port=0, output_dir=str(tmp_path / "output"), input_dir=str(tmp_path / "input"),
                      temp_dir=str(tmp_path / "temp"), models_dir=str(tmp_path / "models"))
    out = tmp_path / "res.json"
    with ServerThread(cfg) as st:
        # --pid: this process hosts the server thread, so its VmRSS is the server's
        rc = bench.main(["--smoke", "--url", st.url, "--pid", str(os.getpid()), "--json", str(out)])
        history = st.server.queue.history()
        done = st.server.worker.prompts_done
    res = json.loads(out.read_text())
    assert rc == 0 and res["prompts"] == 4 and res["clients"] == 2 and res["errors"] == []
    # the server ran warm-up + 4 prompts, each once, all successful
    assert done == 5 and len(history) == 5
    assert all(e["status"]["status_str"] == "success" for e in history.values())
    seeds = sorted(e["prompt"][2]["7"]["inputs"]["seed"] for e in history.values())
    assert seeds == [999, 1000, 1001, 1002, 1003]  # warm-up seed - 1, then seed + i
    # the files the server wrote, counted here
    pngs = sorted(p.name for p in (tmp_path / "output" / "bench").glob("img*.png"))
    assert len(pngs) == 4 and res["succeeded"] == 4 and res["distinct_prompt_ids"] == 4
    assert res["images_listed"] == 4 and res["distinct_images_listed"] == 4
    assert res["png_files_on_disk"] is None  # a server given by --url: the benchmark does not know its folders
    lat = res["latency_s"]
    assert len(lat) == 4 and all(x > 0 for x in lat)
    assert res["p50_s"] == pytest.approx(np.percentile(lat, 50)) and res["p95_s"] == pytest.approx(np.percentile(lat, 95))
    assert res["rss_before_bytes"] > 0 and res["rss_after_bytes"] > 0
    assert "4/4 prompts succeeded from 2 clients" in capsys.readouterr().out
