"""The io nodes, called directly: savers (PNG/WebP/MP4/latent), loaders, the empty video latent.

Oracles: files are read back with Pillow / PyAV / safetensors directly (not with our loaders), ComfyUI's
formulas (latent shape, `.latent` layout, legacy scale) are re-derived here, and loader inputs are files
this test writes with Pillow / PyAV.
"""
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from twinflow.core import progress
from twinflow.core.errors import CheckpointError, Interrupted, UnsupportedError
from twinflow.media import images as media_images
from twinflow.nodes import io as ionodes
from twinflow.nodes.io import (
    NODE_CLASS_MAPPINGS, TwinFlowEmptyLatentVideo, TwinFlowLoadImage, TwinFlowLoadLatent, TwinFlowLoadVideo,
    TwinFlowSaveAnimatedWEBP, TwinFlowSaveImage, TwinFlowSaveLatent, TwinFlowSaveVideo,
)

av = pytest.importorskip("av")

PROMPT = {"1": {"class_type": "TwinFlowEmptyLatentVideo", "inputs": {"width": 32}}, "2": {"class_type": "X", "inputs": {"t": "ünï \"q\""}}}
WORKFLOW = {"workflow": {"nodes": [{"id": 1, "type": "TwinFlowSaveImage"}], "links": [], "version": 0.4}}


def _frames(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def bar_hook():
    """Install a progress backend that raises `exc` on the `at`-th update (a user stopping mid-encode)."""
    state = {}

    class Bar:
        def __init__(self, total, desc, node):
            self.n = 0

        def update(self, n):
            self.n += n
            if state.get("exc") is not None and self.n >= state["at"]:
                raise state["exc"]

        def close(self):
            pass

    progress.set_backend(Bar)
    yield state
    progress.set_backend(None)


# --- node definitions --------------------------------------------------------------------------

def test_node_definitions(tf_dirs):
    savers = {"TwinFlowSaveImage", "TwinFlowSaveAnimatedWEBP", "TwinFlowSaveVideo", "TwinFlowSaveLatent"}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name.startswith("TwinFlow") and cls.CATEGORY == "TwinFlow/io"
        assert getattr(cls, "OUTPUT_NODE", False) == (name in savers)
        assert callable(getattr(cls, cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, (typ, *opts) in spec.get(section, {}).items():
                opts = opts[0] if opts else {}
                if typ in ("INT", "FLOAT"):
                    assert {"min", "max", "step", "default"} <= set(opts), (name, inp)
                assert "tooltip" in opts, (name, inp)
        if name in savers:
            assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert set(ionodes.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


# --- Save Image --------------------------------------------------------------------------------

def test_save_image_png_with_metadata(tf_dirs):
    imgs = _frames(2, 8, 12)
    res = TwinFlowSaveImage().save(imgs, "shots/run", prompt=PROMPT, extra_pnginfo=WORKFLOW)
    assert res["result"] == ()
    assert res["ui"]["images"] == [
        {"filename": "run_00001_.png", "subfolder": "shots", "type": "output"},
        {"filename": "run_00002_.png", "subfolder": "shots", "type": "output"}]
    for i, entry in enumerate(res["ui"]["images"]):
        with Image.open(tf_dirs["output"] / "shots" / entry["filename"]) as im:
            assert im.format == "PNG" and im.size == (12, 8) and im.mode == "RGB"
            assert json.loads(im.text["prompt"]) == PROMPT
            assert json.loads(im.text["workflow"]) == WORKFLOW["workflow"]
            px = np.asarray(im)
        expected = np.clip(np.rint(imgs[i].numpy() * 255.0), 0, 255).astype(np.uint8)
        assert np.array_equal(px, expected)
    # a second run continues the counter, never overwrites
    res2 = TwinFlowSaveImage().save(imgs[:1], "shots/run")
    assert res2["ui"]["images"][0]["filename"] == "run_00003_.png"
    with Image.open(tf_dirs["output"] / "shots" / "run_00003_.png") as im:
        assert "prompt" not in im.text and "workflow" not in im.text


def test_save_image_rejects_traversal_and_bad_input(tf_dirs):
    for bad in ("../x", "/tmp/x", "a/../../x"):
        with pytest.raises(ValueError, match="filename_prefix"):
            TwinFlowSaveImage().save(_frames(1, 4, 4), bad)
    with pytest.raises(ValueError, match="IMAGE"):
        TwinFlowSaveImage().save(torch.zeros(1, 4, 4, 5), "x")
    with pytest.raises(TypeError, match="IMAGE"):
        TwinFlowSaveImage().save(np.zeros((1, 4, 4, 3)), "x")
    assert _listing(tf_dirs["output"]) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_image_failure_in_encoder_leaves_no_file(tf_dirs, monkeypatch, exc):
    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n partial")  # the encoder got half way
        raise exc

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(type(exc)):
        TwinFlowSaveImage().save(_frames(1, 4, 4), "x")
    assert _listing(tf_dirs["output"]) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Interrupted("stop")])
def test_save_image_interrupted_between_frames_keeps_no_frame(tf_dirs, bar_hook, exc):
    # A frame sequence is one output: all frames or none (issue 15; it used to keep the frames before the stop).
    bar_hook.update(at=2, exc=exc)
    with pytest.raises(type(exc)):
        TwinFlowSaveImage().save(_frames(4, 4, 4), "x")
    assert _listing(tf_dirs["output"]) == []
    bar_hook.update(exc=None)
    res = TwinFlowSaveImage().save(_frames(3, 4, 4), "x")
    assert [e["filename"] for e in res["ui"]["images"]] == [f"x_0000{i}_.png" for i in (1, 2, 3)]
    assert _listing(tf_dirs["output"]) == [f"x_0000{i}_.png" for i in (1, 2, 3)]


# --- Save Animated WebP ------------------------------------------------------------------------

def test_save_animated_webp(tf_dirs):
    imgs = _frames(4, 16, 24)
    res = TwinFlowSaveAnimatedWEBP().save(imgs, "anim", fps=8.0, lossless=True, quality=80, method="fastest",
                                          prompt=PROMPT, extra_pnginfo=WORKFLOW)
    assert res["ui"]["images"] == [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}]
    assert res["ui"]["animated"] == (True,)
    with Image.open(tf_dirs["output"] / "anim_00001_.webp") as im:
        assert im.format == "WEBP" and im.n_frames == 4 and im.is_animated and im.size == (24, 16)
        exif = im.getexif()
        assert exif[0x0110] == "prompt:" + json.dumps(PROMPT)
        assert exif[0x010F] == "workflow:" + json.dumps(WORKFLOW["workflow"])
        for i in range(4):
            im.seek(i)
            im.load()
            assert im.info["duration"] == 125
            px = np.asarray(im.convert("RGB"))
            expected = np.clip(np.rint(imgs[i].numpy() * 255.0), 0, 255).astype(np.uint8)
            assert np.array_equal(px, expected)  # lossless


def test_save_webp_failure_leaves_no_file(tf_dirs, monkeypatch):
    def broken(path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"RIFF....WEBP")
        raise KeyboardInterrupt

    monkeypatch.setattr(media_images, "write_webp", broken)
    with pytest.raises(KeyboardInterrupt):
        TwinFlowSaveAnimatedWEBP().save(_frames(2, 4, 4), "anim", 8.0, True, 80, "default")
    assert _listing(tf_dirs["output"]) == []


# --- Save Video --------------------------------------------------------------------------------

def _decode(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        meta = dict(c.metadata)
        info = (s.codec_context.name, s.average_rate, s.width, s.height)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    return info, frames, meta


def test_save_video_mp4_decodes_back(tf_dirs):
    # smooth frames (H.264 is lossy): a per-frame grey level plus a gentle gradient
    t = torch.arange(5).view(5, 1, 1, 1) / 5.0
    ramp = torch.linspace(0, 0.15, 32).view(1, 1, 32, 1)
    imgs = (0.1 + 0.7 * t + ramp).expand(5, 32, 32, 3).contiguous()
    res = TwinFlowSaveVideo().save(imgs, "video/clip", fps=16.0, crf=10, prompt=PROMPT, extra_pnginfo=WORKFLOW)
    # the shape core SaveVideo reports (ui.PreviewVideo), which the frontend draws as a <video> on the node
    assert res["ui"] == {"images": [{"filename": "clip_00001_.mp4", "subfolder": "video", "type": "output"}],
                         "animated": (True,)}
    (codec, rate, w, h), frames, meta = _decode(tf_dirs["output"] / "video" / "clip_00001_.mp4")
    assert codec == "h264" and rate == Fraction(16) and (w, h) == (32, 32) and len(frames) == 5
    for i, f in enumerate(frames):
        assert np.abs(f.astype(np.float32) / 255.0 - imgs[i].numpy()).mean() < 0.02
    assert json.loads(meta["prompt"]) == PROMPT and json.loads(meta["workflow"]) == WORKFLOW["workflow"]


def test_save_video_odd_size_is_padded(tf_dirs):
    res = TwinFlowSaveVideo().save(torch.full((3, 17, 31, 3), 0.5), "odd", fps=8.0, crf=20)
    (_, _, w, h), frames, _ = _decode(tf_dirs["output"] / res["ui"]["images"][0]["filename"])
    assert (w, h) == (32, 18) and len(frames) == 3


def test_save_video_interrupted_mid_encode_leaves_no_file(tf_dirs, bar_hook):
    bar_hook.update(at=3, exc=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        TwinFlowSaveVideo().save(_frames(6, 16, 16), "video/clip", fps=16.0, crf=30)
    assert _listing(tf_dirs["output"]) == ["video"]
    progress.set_backend(None)
    progress.request_interrupt()
    try:
        with pytest.raises(Interrupted):
            TwinFlowSaveVideo().save(_frames(6, 16, 16), "video/clip", fps=16.0, crf=30)
    finally:
        progress.clear_interrupt()
    assert _listing(tf_dirs["output"]) == ["video"]


def test_save_video_without_av_names_install_command(tf_dirs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(UnsupportedError, match="pip install av"):
        TwinFlowSaveVideo().save(_frames(2, 8, 8), "video/clip", 16.0, 19)
    assert _listing(tf_dirs["output"]) == []


# --- latents -----------------------------------------------------------------------------------

def test_save_latent_comfyui_layout_and_roundtrip(tf_dirs):
    from safetensors import safe_open

    samples = torch.randn(1, 16, 3, 4, 6) * 3
    samples[0, 0, 0, 0, 0] = float("-0.0")
    lat = {"samples": samples}
    res = TwinFlowSaveLatent().save(lat, "latents/t", prompt=PROMPT, extra_pnginfo=WORKFLOW)
    assert res["ui"]["latents"] == [{"filename": "t_00001_.latent", "subfolder": "latents", "type": "output"}]
    path = tf_dirs["output"] / "latents" / "t_00001_.latent"
    # ComfyUI's SaveLatent layout, read with plain safetensors
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert f.get_tensor("latent_format_version_0").numel() == 0
        meta = f.metadata()
        stored = f.get_tensor("latent_tensor")
    assert torch.equal(stored, samples) and stored.dtype == torch.float32
    assert json.loads(meta["prompt"]) == PROMPT and json.loads(meta["workflow"]) == WORKFLOW["workflow"]
    # round trip through the loader, bit-exact (also reading from the output folder by annotation)
    (tf_dirs["input"] / "t.latent").write_bytes(path.read_bytes())
    for name in ("t.latent", "latents/t_00001_.latent [output]"):
        (out,) = TwinFlowLoadLatent().load(name)
        assert out["samples"].dtype == torch.float32
        assert torch.equal(out["samples"].view(torch.int32), samples.view(torch.int32))
    assert lat["samples"] is samples  # input not mutated
    assert "t.latent" in TwinFlowLoadLatent.INPUT_TYPES()["required"]["latent"][0]


def test_load_latent_written_by_comfyui(tf_dirs):
    from safetensors.torch import save_file

    x = torch.randn(2, 16, 2, 3, 3)
    # ComfyUI's SaveLatent: latent_tensor + empty latent_format_version_0, metadata prompt
    save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])}, str(tf_dirs["input"] / "c.latent"),
              metadata={"prompt": "{}"})
    # legacy ComfyUI latent (no version key): stored scaled by 0.18215, loaded as x / 0.18215
    save_file({"latent_tensor": x.half()}, str(tf_dirs["input"] / "old.latent"))
    (a,) = TwinFlowLoadLatent().load("c.latent")
    (b,) = TwinFlowLoadLatent().load("old.latent")
    assert torch.equal(a["samples"], x)
    assert torch.equal(b["samples"], x.half().float() * (1.0 / 0.18215))
    save_file({"weights": x}, str(tf_dirs["input"] / "notlatent.safetensors"))
    with pytest.raises(CheckpointError, match="latent_tensor"):
        TwinFlowLoadLatent().load("notlatent.safetensors")
    (tf_dirs["input"] / "broken.latent").write_bytes(b"\x10\x00\x00\x00")
    with pytest.raises(CheckpointError, match="broken.latent"):
        TwinFlowLoadLatent().load("broken.latent")


@pytest.mark.parametrize("w,h,length,b", [(832, 480, 33, 1), (16, 16, 1, 2), (64, 48, 2, 1), (128, 64, 5, 3), (24, 40, 81, 1)])
def test_empty_latent_video_shapes(w, h, length, b):
    (lat,) = TwinFlowEmptyLatentVideo().generate(w, h, length, b)
    # ComfyUI's EmptyHunyuanLatentVideo, re-derived: [B, 16, ((length - 1) // 4) + 1, H // 8, W // 8]
    expected = (b, 16, ((length - 1) // 4) + 1, h // 8, w // 8)
    assert tuple(lat["samples"].shape) == expected
    assert lat["samples"].dtype == torch.float32 and not lat["samples"].any()


def test_empty_latent_video_widgets_and_errors():
    req = TwinFlowEmptyLatentVideo.INPUT_TYPES()["required"]
    assert (req["width"][1]["step"], req["height"][1]["step"], req["length"][1]["step"]) == (16, 16, 4)
    assert req["length"][1]["min"] == 1 and req["batch_size"][1]["min"] == 1
    with pytest.raises(ValueError, match="length"):
        TwinFlowEmptyLatentVideo().generate(64, 64, 0, 1)


# --- Load Image --------------------------------------------------------------------------------

def test_load_image_rgb_and_alpha(tf_dirs):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tf_dirs["input"] / "a.png")
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tf_dirs["input"] / "b.png")
    assert TwinFlowLoadImage.INPUT_TYPES()["required"]["image"][0] == ["a.png", "b.png"]

    img, mask = TwinFlowLoadImage().load("a.png")
    assert img.shape == (1, 6, 10, 3) and img.dtype == torch.float32
    assert torch.equal(img[0], torch.from_numpy(rgb.astype(np.float32) / 255.0))
    assert mask.shape == (1, 6, 10) and not mask.any()

    img, mask = TwinFlowLoadImage().load("b.png")
    assert torch.equal(img[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0))
    assert torch.allclose(mask[0], torch.from_numpy(1.0 - rgba[..., 3].astype(np.float32) / 255.0))


def test_load_image_16bit_and_palette_transparency(tf_dirs):
    grey = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(grey).save(tf_dirs["input"] / "g16.png")
    img, _ = TwinFlowLoadImage().load("g16.png")
    expected = torch.from_numpy(grey.astype(np.float32) / 65535.0)
    assert img.shape == (1, 3, 4, 3) and torch.allclose(img[0, ..., 1], expected, atol=1e-6)
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette index 0 is transparent
    pal.save(tf_dirs["input"] / "p.png", transparency=0)
    img, mask = TwinFlowLoadImage().load("p.png")
    assert mask[0, 0, 1] == 0.0 and mask[0, 0, 0] == 1.0 and mask[0].sum() == 7
    assert img[0, 0, 1].tolist() == [1.0, 0.0, 0.0]


def test_load_image_applies_exif_orientation(tf_dirs):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # top-left red
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tf_dirs["input"] / "o.png", exif=exif)
    img, _ = TwinFlowLoadImage().load("o.png")
    assert img.shape == (1, 3, 2, 3)  # displayed upright: width and height swapped
    assert img[0, 0, 1].tolist() == [1.0, 0.0, 0.0]  # the red pixel moved to the top-right


def test_load_image_save_image_roundtrip(tf_dirs):
    imgs = _frames(1, 9, 7)
    res = TwinFlowSaveImage().save(imgs, "rt")
    img, _ = TwinFlowLoadImage().load(res["ui"]["images"][0]["filename"] + " [output]")
    assert (img - imgs).abs().max() <= 0.5 / 255 + 1e-6
    # and loading again then saving is lossless
    res2 = TwinFlowSaveImage().save(img, "rt")
    img2, _ = TwinFlowLoadImage().load(res2["ui"]["images"][0]["filename"] + " [output]")
    assert torch.equal(img, img2)


def test_load_image_multiframe_gif(tf_dirs):
    levels = [0, 120, 250]
    frames = [Image.new("RGB", (8, 6), (v, v, v)) for v in levels]
    frames[0].save(tf_dirs["input"] / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    img, mask = TwinFlowLoadImage().load("anim.gif")
    assert img.shape == (3, 6, 8, 3) and mask.shape[0] == 3
    assert [round(float(img[i].mean()) * 255) for i in range(3)] == levels


def test_load_image_missing_lists_folder_and_validates(tf_dirs):
    Image.new("RGB", (2, 2)).save(tf_dirs["input"] / "here.png")
    with pytest.raises(FileNotFoundError) as e:
        TwinFlowLoadImage().load("nope.png")
    assert "nope.png" in str(e.value) and "here.png" in str(e.value)
    assert TwinFlowLoadImage.VALIDATE_INPUTS(image="here.png") is True
    msg = TwinFlowLoadImage.VALIDATE_INPUTS(image="nope.png")
    assert isinstance(msg, str) and "here.png" in msg
    for bad in ("../x.png", "/etc/passwd"):
        with pytest.raises(ValueError, match="input folder"):
            TwinFlowLoadImage().load(bad)
        assert isinstance(TwinFlowLoadImage.VALIDATE_INPUTS(image=bad), str)


def test_load_image_is_changed_follows_content(tf_dirs):
    p = tf_dirs["input"] / "c.png"
    Image.new("RGB", (2, 2), (1, 2, 3)).save(p)
    a = TwinFlowLoadImage.IS_CHANGED(image="c.png")
    assert a == TwinFlowLoadImage.IS_CHANGED(image="c.png")
    Image.new("RGB", (2, 2), (9, 2, 3)).save(p)
    assert TwinFlowLoadImage.IS_CHANGED(image="c.png") != a
    assert "unavailable" in TwinFlowLoadImage.IS_CHANGED(image="missing.png")


# --- Load Video --------------------------------------------------------------------------------

LEVELS = [10, 40, 70, 100, 130, 160, 190, 220]


def _write_mp4_with_av(path, levels, fps=12):
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "5"})
        s.width, s.height, s.pix_fmt = 32, 16, "yuv420p"
        for v in levels:
            frame = av.VideoFrame.from_ndarray(np.full((16, 32, 3), v, np.uint8), format="rgb24")
            c.mux(s.encode(frame))
        c.mux(s.encode(None))


def _levels(images):
    return [round(float(images[i].mean()) * 255 / 10) * 10 for i in range(images.shape[0])]


def test_load_video_mp4_and_options(tf_dirs):
    _write_mp4_with_av(tf_dirs["input"] / "v.mp4", LEVELS)
    imgs, count, fps = TwinFlowLoadVideo().load("v.mp4")
    assert imgs.shape == (8, 16, 32, 3) and count == 8 and fps == pytest.approx(12.0)
    assert imgs.dtype == torch.float32 and 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    assert _levels(imgs) == LEVELS
    imgs, count, fps = TwinFlowLoadVideo().load("v.mp4", frame_load_cap=2, skip_first_frames=1, select_every_nth=3)
    assert count == 2 and _levels(imgs) == [LEVELS[1], LEVELS[4]] and fps == pytest.approx(4.0)
    imgs, count, _ = TwinFlowLoadVideo().load("v.mp4", 0, 6, 1)
    assert _levels(imgs) == LEVELS[6:]
    with pytest.raises(ValueError, match="no frames"):
        TwinFlowLoadVideo().load("v.mp4", 0, 20, 1)


def test_save_video_then_load_video(tf_dirs):
    imgs = torch.stack([torch.full((16, 16, 3), v / 255.0) for v in LEVELS[:5]])
    res = TwinFlowSaveVideo().save(imgs, "v", fps=10.0, crf=5)
    out, count, fps = TwinFlowLoadVideo().load(res["ui"]["images"][0]["filename"] + " [output]")
    assert count == 5 and out.shape == (5, 16, 16, 3) and fps == pytest.approx(10.0)
    assert _levels(out) == LEVELS[:5]


@pytest.mark.parametrize("ext", [".gif", ".webp"])
def test_load_video_gif_webp_with_pillow(tf_dirs, ext):
    frames = [Image.new("RGB", (12, 8), (v, v, v)) for v in LEVELS[:6]]
    kw = {"lossless": True} if ext == ".webp" else {}
    frames[0].save(tf_dirs["input"] / f"a{ext}", save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    imgs, count, fps = TwinFlowLoadVideo().load(f"a{ext}", 0, 0, 2)
    assert count == 3 and imgs.shape == (3, 8, 12, 3) and fps == pytest.approx(10.0)
    assert _levels(imgs) == LEVELS[0:6:2]
    res = TwinFlowSaveAnimatedWEBP().save(imgs, "w", 10.0, True, 80, "fastest")
    back, n, _ = TwinFlowLoadVideo().load(res["ui"]["images"][0]["filename"] + " [output]")
    assert n == 3 and torch.equal(back, imgs)


def test_load_video_missing_and_bad_file(tf_dirs):
    with pytest.raises(FileNotFoundError, match="no video files"):
        TwinFlowLoadVideo().load("none.mp4")
    (tf_dirs["input"] / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="junk.mp4"):
        TwinFlowLoadVideo().load("junk.mp4")
    assert TwinFlowLoadVideo.VALIDATE_INPUTS(video="junk.mp4") is True
    assert "none.mp4" in TwinFlowLoadVideo.VALIDATE_INPUTS(video="none.mp4")


# --- through the headless runner (UI workflow: upload widget value, embedded workflow) -----------

def test_ui_workflow_through_runner(tf_dirs):
    api = pytest.importorskip("twinflow.runner.api")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tf_dirs["input"] / "a.png")
    ui = {"last_node_id": 2, "last_link_id": 1, "version": 0.4, "groups": [], "links": [[1, 1, 0, 2, 0, "IMAGE"]],
          "nodes": [
              {"id": 1, "type": "TwinFlowLoadImage", "mode": 0, "inputs": [],
               "outputs": [{"name": "image", "type": "IMAGE", "links": [1]}, {"name": "mask", "type": "MASK", "links": None}],
               "widgets_values": ["a.png", "image"]},
              {"id": 2, "type": "TwinFlowSaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
               "outputs": [], "widgets_values": ["ui/img"]}]}
    out = api.run_workflow(ui, output_dir=tf_dirs["output"])
    assert out["2"]["images"] == [{"filename": "img_00001_.png", "subfolder": "ui", "type": "output"}]
    with Image.open(tf_dirs["output"] / "ui" / "img_00001_.png") as im:
        assert json.loads(im.text["workflow"]) == ui
        assert json.loads(im.text["prompt"])["1"]["inputs"]["image"] == "a.png"
        assert im.getpixel((0, 0)) == (10, 20, 30)
