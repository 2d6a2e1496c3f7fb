"""Write the UI-format workflows in `workflows/` from compact descriptions.

The ComfyUI frontend stores a node's widget values positionally (`widgets_values`), including the
values of widgets it never sends (`control_after_generate`), so hand-editing them is error-prone.
This tool lays each workflow out from our node classes' `INPUT_TYPES`, exactly as the frontend saves
it (format version 0.4). Run: `python tools/build_workflows.py` (rewrites workflows/*.json; from any
directory, with TwinFlow installed); `--check` writes nothing and exits 1 if a file is stale.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _registry():
    """TwinFlow's nodes plus the core nodes the runner knows headless (same inputs and outputs as ComfyUI's)."""
    import twinflow
    from twinflow.nodes import core_headless

    return ({**core_headless.NODE_CLASS_MAPPINGS, **twinflow.NODE_CLASS_MAPPINGS},
            {**core_headless.NODE_DISPLAY_NAME_MAPPINGS, **twinflow.NODE_DISPLAY_NAME_MAPPINGS})


def build(spec: dict) -> dict:
    """spec: {"nodes": [{"id", "class", "widgets": {name: value}, "links": {input: (src_id, out_idx)},
    "pos": (col, row), "title"?}], "groups": [...]?, "note"?: str}."""
    from twinflow.runner.formats import widget_default, widget_slots
    from twinflow.runner.spec import iter_inputs, return_types

    registry, display = _registry()
    links, nodes = [], []
    out_links: dict = {}
    link_id = 0
    by_id = {n["id"]: n for n in spec["nodes"]}
    for n in spec["nodes"]:
        for inp, (src, idx) in n.get("links", {}).items():
            link_id += 1
            src_cls = registry[by_id[src]["class"]]
            ltype = return_types(src_cls)[idx]
            links.append([link_id, src, idx, n["id"], inp, ltype])
            out_links.setdefault((src, idx), []).append(link_id)
    for order, n in enumerate(spec["nodes"]):
        cls = registry[n["class"]]
        inputs, values = [], []
        widgets = n.get("widgets", {})
        unknown = set(widgets) - {s.name for s in iter_inputs(cls, n["class"])} - {"__control__"}
        if unknown:
            raise SystemExit(f"{n['class']}: unknown widgets {sorted(unknown)}")
        for s in iter_inputs(cls, n["class"]):
            link = next((l for l in links if l[3] == n["id"] and l[4] == s.name), None)
            if s.is_widget:
                if link is not None:
                    inputs.append({"name": s.name, "type": s.kind if s.kind != "COMBO" else "COMBO",
                                   "widget": {"name": s.name}, "link": link[0]})
            else:
                inputs.append({"name": s.name, "type": s.type, "link": link[0] if link else None,
                               **({"shape": 7} if s.category == "optional" else {})})
        for name, s in widget_slots(cls, n["class"]):
            if name is None:
                values.append(widgets.get("__control__", "fixed"))
            else:
                values.append(widgets.get(name, widget_default(s)))
        outputs = []
        for i, t in enumerate(return_types(cls)):
            names = getattr(cls, "RETURN_NAMES", None) or return_types(cls)
            outputs.append({"name": names[i], "type": t, "slot_index": i,
                            "links": out_links.get((n["id"], i), [])})
        col, row = n.get("pos", (order, 0))
        nodes.append({
            "id": n["id"], "type": n["class"], "pos": [40 + 400 * col, 40 + 480 * row], "size": [360, 420],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "title": n.get("title", display.get(n["class"], n["class"])),
            "properties": {"Node name for S&R": n["class"],
                           "cnr_id": "comfyui-twinflow" if n["class"].startswith("TwinFlow") else "comfy-core"},
            "widgets_values": values,
        })
    for l in links:  # UI links store the target *slot index*, not the input name
        target = next(x for x in nodes if x["id"] == l[3])
        l[4] = next(i for i, inp in enumerate(target["inputs"]) if inp["link"] == l[0])
    extra_nodes = []
    if spec.get("note"):
        extra_nodes.append({"id": 1000, "type": "Note", "pos": [40, -200], "size": [700, 160], "flags": {},
                            "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                            "properties": {}, "widgets_values": [spec["note"]]})
    return {
        "id": spec["uuid"], "revision": 0,
        "last_node_id": max(n["id"] for n in nodes + extra_nodes), "last_link_id": link_id,
        "nodes": nodes + extra_nodes, "links": links, "groups": spec.get("groups", []),
        "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


TINY_NOTE = ("TwinFlow quickstart. The 'random:tiny' models have seeded RANDOM weights: the video is "
             "noise-like by design; the workflow shows the pipeline end to end on a laptop CPU. Replace "
             "them with your own Wan2.1 files (models/diffusion_models, models/vae) for real output.")

WAN22_NOTE = ("TwinFlow Wan2.2 A14B dual-expert quickstart: the high-noise expert runs while sigma >= 0.875, "
              "the low-noise expert below (one expert per step), with Wan2.2's published settings (preset "
              "wan22_t2v_a14b: shift 12, cfg 4 / 3; steps set to 12 here for a quick CPU run, 0 = the preset's "
              "40). The 'random:tiny' models have seeded RANDOM weights (noise-like video, runs on a laptop CPU). "
              "For real output load wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors and "
              "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors (models/diffusion_models), umT5 and "
              "wan_2.1_vae.safetensors: docs/sampling.md, 'Wan2.2 A14B experts'.")

WORKFLOWS = {
    "dual_branch_t2v.json": {
        "uuid": "5f0b7a52-2d7e-4a55-9d43-0a1f3c0c1a01",
        "note": TINY_NOTE,
        "nodes": [
            {"id": 1, "class": "TwinFlowLoadDiT", "pos": (0, 0), "title": "Semantic DiT (tiny, random)",
             "widgets": {"ckpt_name": "random:tiny", "dtype": "default", "preset": "auto", "seed": 0}},
            {"id": 2, "class": "TwinFlowLoadRefiner", "pos": (0, 1), "title": "Detail refiner (tiny, random)",
             "widgets": {"refiner_name": "random:tiny", "dtype": "default", "seed": 0}},
            {"id": 3, "class": "TwinFlowTinyTextEncode", "pos": (0, 2), "title": "Positive",
             "widgets": {"text": "a red fox running through fresh snow, cinematic", "width": 4096}},
            {"id": 4, "class": "TwinFlowTinyTextEncode", "pos": (0, 3), "title": "Negative",
             "widgets": {"text": "blurry, low quality", "width": 4096}},
            {"id": 5, "class": "TwinFlowGateSchedule", "pos": (1, 0),
             "widgets": {"kind": "steps", "alpha": 0.5, "fuse_steps": "3,6,9", "cutoff": 0.25, "preview_steps": 12}},
            {"id": 6, "class": "TwinFlowEmptyLatentVideo", "pos": (1, 1),
             "widgets": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
            {"id": 7, "class": "TwinFlowDualBranchSampler", "pos": (2, 0),
             "widgets": {"seed": 42, "__control__": "fixed", "steps": 12, "cfg_semantic": 5.0, "cfg_detail": 1.0,
                         "sampler": "uni_pc", "scheduler": "simple", "shift": 8.0, "denoise": 1.0, "split": "HW"},
             "links": {"semantic": (1, 0), "detail": (2, 0), "gate": (5, 0), "latent": (6, 0),
                       "positive": (3, 0), "negative": (4, 0)}},
            {"id": 8, "class": "TwinFlowLoadVAE", "pos": (2, 1), "title": "VAE (tiny, random)",
             "widgets": {"vae_name": "random:tiny", "dtype": "default", "seed": 0}},
            {"id": 9, "class": "TwinFlowVAEDecode", "pos": (3, 0),
             "widgets": {"tiling": "auto"}, "links": {"vae": (8, 0), "samples": (7, 0)}},
            {"id": 10, "class": "TwinFlowSaveVideo", "pos": (4, 0),
             "widgets": {"filename_prefix": "twinflow/dual_branch", "fps": 16.0},
             "links": {"images": (9, 0)}},
            {"id": 11, "class": "TwinFlowSaveImage", "pos": (4, 1), "title": "Gate schedule plot",
             "widgets": {"filename_prefix": "twinflow/gate"}, "links": {"images": (5, 1)}},
        ],
    },
    "wan22_dual_expert_t2v.json": {
        "uuid": "5f0b7a52-2d7e-4a55-9d43-0a1f3c0c1a22",
        "note": WAN22_NOTE,
        "nodes": [
            {"id": 1, "class": "TwinFlowLoadDiT", "pos": (0, 0), "title": "High-noise expert (tiny, random)",
             "widgets": {"ckpt_name": "random:tiny", "dtype": "default", "preset": "auto", "seed": 0}},
            {"id": 2, "class": "TwinFlowLoadDiT", "pos": (0, 1), "title": "Low-noise expert (tiny, random)",
             "widgets": {"ckpt_name": "random:tiny", "dtype": "default", "preset": "auto", "seed": 1}},
            {"id": 3, "class": "TwinFlowTinyTextEncode", "pos": (0, 2), "title": "Positive",
             "widgets": {"text": "a red fox running through fresh snow, cinematic", "width": 4096}},
            {"id": 4, "class": "TwinFlowTinyTextEncode", "pos": (0, 3), "title": "Negative",
             "widgets": {"text": "blurry, low quality", "width": 4096}},
            {"id": 5, "class": "TwinFlowEmptyLatentVideo", "pos": (1, 0),
             "widgets": {"width": 48, "height": 48, "length": 5, "batch_size": 1}},
            {"id": 6, "class": "TwinFlowDualExpertSampler", "pos": (2, 0),
             "widgets": {"preset": "wan22_t2v_a14b", "seed": 42, "__control__": "fixed", "steps": 12},
             "links": {"high_noise": (1, 0), "low_noise": (2, 0), "latent": (5, 0), "positive": (3, 0),
                       "negative": (4, 0)}},
            {"id": 7, "class": "TwinFlowLoadVAE", "pos": (2, 1), "title": "VAE (tiny, random)",
             "widgets": {"vae_name": "random:tiny", "dtype": "default", "seed": 0}},
            {"id": 8, "class": "TwinFlowVAEDecode", "pos": (3, 0),
             "widgets": {"tiling": "auto"}, "links": {"vae": (7, 0), "samples": (6, 0)}},
            {"id": 9, "class": "TwinFlowSaveVideo", "pos": (4, 0),
             "widgets": {"filename_prefix": "twinflow/wan22_dual_expert", "fps": 16.0},
             "links": {"images": (8, 0)}},
        ],
    },
}


# The quickstart's models: "random" (seeded random weights) or "trained" (the shipped trained:tiny family,
# tools/train_fixtures.py). Switch to "trained" only once weights/trained_tiny/ holds the files, then rerun this tool.
QUICKSTART_MODELS = "trained"
TRAINED_NOTE = ("TwinFlow quickstart on the 'trained:tiny' models: a Wan VAE, a Wan DiT and the detail refiner "
                "trained on TwinFlow's procedural data set (textured shapes moving over textured backgrounds; "
                "tools/train_fixtures.py). Prompts use the data set's words: shape, colour, texture, motion, spin, "
                "background, camera pan. Replace them with your own Wan2.1 files for real output.")
TRAINED_WIDGETS = {  # node id -> widget changes for QUICKSTART_MODELS = "trained"
    1: {"ckpt_name": "trained:tiny"}, 2: {"refiner_name": "trained:tiny-refiner"}, 8: {"vae_name": "trained:tiny"},
    3: {"text": "a red checkered square moving right spinning clockwise on a teal background camera panning up",
        "width": 64},
    4: {"text": "", "width": 64},
    5: {"cutoff": 0.5},  # the cutoff the refiner was trained for
    7: {"cfg_semantic": 6.0, "shift": 3.0},  # CFG against the zero conditioning (node 12); shift of the training draws
}
# The DiTs were trained with dropped captions as all-zero conditioning, so that is their unconditional: the
# negative goes through ConditioningZeroOut (a core node, in ComfyUI and headless).
TRAINED_NODES = [{"id": 12, "class": "ConditioningZeroOut", "pos": (1, 2), "title": "Negative = zeros",
                  "widgets": {}, "links": {"conditioning": (4, 0)}}]
TRAINED_LINKS = {7: {"negative": (12, 0)}}


def quickstart_spec(models: str = QUICKSTART_MODELS) -> dict:
    """The quickstart workflow on random or on the shipped trained models."""
    spec = WORKFLOWS["dual_branch_t2v.json"]
    if models == "random":
        return spec
    if models != "trained":
        raise ValueError(f"quickstart models must be 'random' or 'trained', got {models!r}")
    nodes = []
    for n in spec["nodes"]:
        n = {**n, "widgets": {**n["widgets"], **TRAINED_WIDGETS.get(n["id"], {})}}
        if n["id"] in TRAINED_LINKS:
            n["links"] = {**n["links"], **TRAINED_LINKS[n["id"]]}
        if "title" in n:
            n["title"] = n["title"].replace("random", "trained")
        nodes.append(n)
        if n["id"] == 4:  # the zeroed negative right after the node it reads
            nodes += TRAINED_NODES
    return {**spec, "note": TRAINED_NOTE, "nodes": nodes}


def spec_for(name: str) -> dict:
    """The spec a shipped workflow is built from (the quickstart's on QUICKSTART_MODELS)."""
    return quickstart_spec() if name == "dual_branch_t2v.json" else WORKFLOWS[name]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 and name the stale files if workflows/*.json differ from what "
                         "this tool would write")
    args = ap.parse_args(argv)
    out_dir = ROOT / "workflows"
    stale = []
    for name, spec in WORKFLOWS.items():
        wf = build(spec_for(name))
        path = out_dir / name
        if args.check:
            if not path.is_file() or json.loads(path.read_text()) != wf:
                stale.append(f"workflows/{name}")
            continue
        out_dir.mkdir(exist_ok=True)
        path.write_text(json.dumps(wf, indent=1) + "\n")
        print(f"wrote workflows/{name}", file=sys.stderr)
    if stale:
        print(f"stale (run `python tools/build_workflows.py` to rewrite): {', '.join(stale)}", file=sys.stderr)
        return 1
    if args.check:
        print("current: " + ", ".join(f"workflows/{name}" for name in WORKFLOWS), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
