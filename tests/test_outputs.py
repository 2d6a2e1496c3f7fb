"""Output safety: confined prefixes, ComfyUI counters, atomic never-overwrite writes, no partial files."""
import errno
import os
import threading

import pytest

from twinflow.core import outputs
from twinflow.core.outputs import atomic_numbered, atomic_output, resolve_prefix


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _comfy_counter(names, prefix):
    """ComfyUI's folder_paths.get_save_image_path counter rule, re-derived independently."""
    best = None
    for name in names:
        if name[:len(prefix) + 1] != prefix + "_":
            continue
        try:
            digits = int(name[len(prefix) + 1:].split("_")[0])
        except ValueError:
            digits = 0
        best = digits if best is None else max(best, digits)
    return 1 if best is None else best + 1


# --- resolve_prefix ---------------------------------------------------------------------------

def test_prefix_with_subfolders_is_created(tmp_path):
    t = resolve_prefix("video/run1/clip", tmp_path)
    assert t.folder == (tmp_path / "video" / "run1").resolve() and t.folder.is_dir()
    assert (t.filename, t.subfolder, t.counter) == ("clip", "video/run1", 1)
    assert t.name(1, ".png") == "clip_00001_.png"


def test_backslash_and_dot_parts(tmp_path):
    t = resolve_prefix("a\\b/./c", tmp_path)
    assert t.subfolder == "a/b" and t.filename == "c"


@pytest.mark.parametrize("names", [
    [],
    ["x_00001_.png", "x_00007_.png", "x_00003_.webp"],
    ["x_00002_.png", "xy_00009_.png", "X_00011_.png", "x_abc_.png", "other.txt"],
    ["x_00004", "x_00005.png", "x__.png", "x_12_extra_.mp4"],
])
def test_counter_matches_comfyui(tmp_path, names):
    for n in names:
        (tmp_path / n).write_bytes(b"1")
    t = resolve_prefix("x", tmp_path)
    assert t.counter == _comfy_counter(names, "x")


def test_counter_ignores_temp_files(tmp_path):
    (tmp_path / (outputs.TEMP_PREFIX + "abc.png")).write_bytes(b"")
    assert resolve_prefix("x", tmp_path).counter == 1


def test_percent_vars(tmp_path):
    t = resolve_prefix("img_%width%x%height%", tmp_path, image_width=64, image_height=32)
    assert t.filename == "img_64x32"


@pytest.mark.parametrize("prefix", [
    "../x", "a/../../x", "a/..", "..\\x", "/etc/x", "\\x", "C:\\x", "C:x", "//server/share/x", "", "/", "a\x00b",
])
def test_traversal_and_bad_prefixes_rejected(tmp_path, prefix):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError) as e:
        resolve_prefix(prefix, out)
    assert repr(prefix) in str(e.value)
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


def test_symlink_escape_rejected(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / "link")
    with pytest.raises(ValueError, match="outside the output folder"):
        resolve_prefix("link/x", out)
    with pytest.raises(ValueError, match="outside the output folder"):
        resolve_prefix("link/deeper/x", out)
    assert list(outside.iterdir()) == []
    # a symlink that stays inside the output folder is fine
    (out / "real").mkdir()
    os.symlink(out / "real", out / "inner")
    assert resolve_prefix("inner/x", out).folder == (out / "real").resolve()


def test_non_string_prefix(tmp_path):
    with pytest.raises(TypeError):
        resolve_prefix(5, tmp_path)


# --- atomic writes ----------------------------------------------------------------------------

def test_atomic_numbered_writes_and_advances(tmp_path):
    t = resolve_prefix("x", tmp_path)
    names = []
    for i in range(3):
        with atomic_numbered(t, ".bin") as out:
            out.tmp_path.write_bytes(bytes([i]) * 10)
        names.append(out.filename)
        assert out.path.read_bytes() == bytes([i]) * 10
    assert names == ["x_00001_.bin", "x_00002_.bin", "x_00003_.bin"]
    assert _files(tmp_path) == names


def test_never_overwrites_a_file_that_appears_concurrently(tmp_path):
    t = resolve_prefix("x", tmp_path)
    with atomic_numbered(t, ".png") as out:
        out.tmp_path.write_bytes(b"ours")
        # another process takes the name we were about to use, and the one after
        (tmp_path / "x_00001_.png").write_bytes(b"theirs1")
        (tmp_path / "x_00002_.png").write_bytes(b"theirs2")
    assert out.filename == "x_00003_.png" and out.path.read_bytes() == b"ours"
    assert (tmp_path / "x_00001_.png").read_bytes() == b"theirs1"
    assert (tmp_path / "x_00002_.png").read_bytes() == b"theirs2"
    assert t.counter == 4
    assert _files(tmp_path) == ["x_00001_.png", "x_00002_.png", "x_00003_.png"]


def test_dangling_symlink_at_target_is_not_followed(tmp_path):
    out_dir, victim = tmp_path / "out", tmp_path / "victim.txt"
    out_dir.mkdir()
    t = resolve_prefix("x", out_dir)
    os.symlink(victim, out_dir / "x_00001_.png")  # dangling: writing through it would create victim
    with atomic_numbered(t, ".png") as out:
        out.tmp_path.write_bytes(b"data")
    assert out.filename == "x_00002_.png" and not victim.exists()


def test_concurrent_writers_get_distinct_files(tmp_path):
    errors = []

    def worker(tag):
        try:
            for i in range(12):
                t = resolve_prefix("race", tmp_path)  # both threads see the same next counter
                with atomic_numbered(t, ".txt") as out:
                    out.tmp_path.write_text(f"{tag}-{i}")
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in "ab"]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    files = _files(tmp_path)
    assert len(files) == 24
    contents = sorted((tmp_path / f).read_text() for f in files)
    assert contents == sorted(f"{k}-{i}" for k in "ab" for i in range(12))


@pytest.mark.parametrize("exc", [RuntimeError("encoder failed"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, exc):
    (tmp_path / "keep.txt").write_text("k")
    t = resolve_prefix("x", tmp_path)
    with pytest.raises(type(exc)):
        with atomic_numbered(t, ".png") as out:
            out.tmp_path.write_bytes(b"partial data")
            raise exc
    assert _files(tmp_path) == ["keep.txt"]
    assert t.counter == 1
    with pytest.raises(type(exc)):
        with atomic_output(tmp_path / "fixed.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    assert _files(tmp_path) == ["keep.txt"]


def test_interrupted_error_leaves_nothing(tmp_path):
    from twinflow.core.errors import Interrupted
    from twinflow.core.progress import check_interrupt, clear_interrupt, request_interrupt

    t = resolve_prefix("x", tmp_path)
    request_interrupt()
    try:
        with pytest.raises(Interrupted):
            with atomic_numbered(t, ".png") as out:
                out.tmp_path.write_bytes(b"half")
                check_interrupt()
    finally:
        clear_interrupt()
    assert _files(tmp_path) == []


def test_atomic_output_refuses_existing(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"two")
    assert target.read_bytes() == b"one" and _files(tmp_path) == ["a.bin"]


def test_fallback_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(outputs.os, "link", no_link)
    t = resolve_prefix("x", tmp_path)
    (tmp_path / "x_00001_.png").write_bytes(b"theirs")
    with atomic_numbered(t, ".png") as out:
        out.tmp_path.write_bytes(b"ours")
    assert out.filename == "x_00002_.png" and out.path.read_bytes() == b"ours"
    assert (tmp_path / "x_00001_.png").read_bytes() == b"theirs"
    assert _files(tmp_path) == ["x_00001_.png", "x_00002_.png"]


def test_bad_extension(tmp_path):
    with pytest.raises(ValueError, match="must start with"):
        with atomic_numbered(resolve_prefix("x", tmp_path), "png"):
            pass


# --- fuzz: any prefix either is refused with ValueError or lands inside the output folder ---------

def test_fuzz_prefix_never_escapes():
    import tempfile
    from pathlib import Path

    from hypothesis import given, strategies as st

    parts = st.sampled_from(["..", ".", "", "a", "b", "C:", "~", "%width%", " ", "x\\..", "..\\..", "é"])
    prefixes = st.one_of(st.text(max_size=30), st.lists(parts, max_size=6).map("/".join),
                         st.lists(parts, max_size=6).map("\\".join))

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "out"
        root.mkdir()
        outside_before = sorted(p.name for p in Path(d).iterdir())

        @given(prefixes)
        def check(prefix):
            try:
                t = resolve_prefix(prefix, root)
            except ValueError as e:
                assert repr(prefix) in str(e) or "filename_prefix" in str(e)
                return
            assert t.folder.resolve().is_relative_to(root.resolve())
            assert "/" not in t.filename and "\\" not in t.filename and t.filename not in ("", ".", "..")

        check()
        assert sorted(p.name for p in Path(d).iterdir()) == outside_before


def test_prefix_folder_blocked_by_a_file(tmp_path):
    (tmp_path / "a").write_text("i am a file")
    with pytest.raises(ValueError, match="cannot create the folder"):
        resolve_prefix("a/x", tmp_path)
    with pytest.raises(ValueError, match="longer than 255"):
        resolve_prefix("d" * 300 + "/x", tmp_path)


def test_published_file_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    t = resolve_prefix("x", tmp_path)
    with atomic_numbered(t, ".bin") as out:
        out.tmp_path.write_bytes(b"1")
    assert (out.path.stat().st_mode & 0o777) == (0o666 & ~umask)


# --- all-or-nothing batches (issue 15) --------------------------------------------------------

def test_batch_publishes_all_at_the_end(tmp_path):
    t = resolve_prefix("b", tmp_path)
    outs = []
    with outputs.output_batch():
        for i in range(3):
            with atomic_numbered(t, ".txt") as out:
                out.tmp_path.write_text(str(i))
            outs.append(out)
            assert [n for n in _files(tmp_path) if not n.startswith(".")] == []  # nothing visible yet
    assert _files(tmp_path) == ["b_00001_.txt", "b_00002_.txt", "b_00003_.txt"]
    assert [(tmp_path / o.filename).read_text() for o in outs] == ["0", "1", "2"]


@pytest.mark.parametrize("exc", [RuntimeError("disk"), KeyboardInterrupt()])
def test_batch_failure_keeps_nothing(tmp_path, exc):
    t = resolve_prefix("b", tmp_path)
    with pytest.raises(type(exc)):
        with outputs.output_batch():
            with atomic_numbered(t, ".txt") as out:
                out.tmp_path.write_text("done")
            with atomic_numbered(t, ".txt") as out:
                out.tmp_path.write_text("half")
                raise exc
    assert _files(tmp_path) == []


def test_batch_publish_failure_takes_back_what_it_published(tmp_path, monkeypatch):
    t = resolve_prefix("b", tmp_path)
    real = outputs._publish
    calls = []

    def publish(tmp, final):
        calls.append(final)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, final)
    monkeypatch.setattr(outputs, "_publish", publish)
    with pytest.raises(OSError, match="No space"):
        with outputs.output_batch():
            for i in range(3):
                with atomic_numbered(t, ".txt") as out:
                    out.tmp_path.write_text(str(i))
    assert len(calls) == 2 and _files(tmp_path) == []


def test_batch_name_taken_meanwhile_moves_on_and_the_ui_entry_follows(tmp_path):
    t = resolve_prefix("b", tmp_path)
    with outputs.output_batch():
        with atomic_numbered(t, ".txt") as out:
            out.tmp_path.write_text("ours")
        entry = outputs.ui_entry(t, out)
        assert entry["filename"] == "b_00001_.txt"
        (tmp_path / "b_00001_.txt").write_text("another writer")  # appears before the batch publishes
    assert (tmp_path / "b_00001_.txt").read_text() == "another writer"
    assert entry["filename"] == out.filename == "b_00002_.txt"
    assert (tmp_path / "b_00002_.txt").read_text() == "ours"


def test_control_characters_in_prefix_refused(tmp_path):
    for bad in ("a\nb", "a\tb", "x/\x1b[31mred", "a\rb", "a\x7fb"):
        with pytest.raises(ValueError, match="control character"):
            resolve_prefix(bad, tmp_path)
        with pytest.raises(ValueError, match="control character"):
            outputs.check_prefix(bad)
    assert _files(tmp_path) == []


def test_check_output_dir(tmp_path):
    outputs.check_output_dir(tmp_path)  # exists
    outputs.check_output_dir(tmp_path / "new" / "deeper")  # creatable
    assert not (tmp_path / "new").exists()  # ... and not created by the check
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        outputs.check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="is a file"):
        outputs.check_output_dir(tmp_path / "f" / "sub")
    with pytest.raises(ValueError, match="cannot be created"):
        outputs.check_output_dir("/proc/nope")
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_leftover_temp_files_are_swept(tmp_path):
    # a second Ctrl-C can cut a writer's own cleanup short: the CLI sweeps what this process left
    from twinflow.core import outputs

    t = outputs._make_temp(tmp_path, ".mp4")
    kept = outputs._make_temp(tmp_path, ".png")
    outputs._remove(kept)
    assert t.exists() and not kept.exists()
    assert outputs.remove_leftover_temps() == 1
    assert not t.exists() and list(tmp_path.iterdir()) == [] and outputs.remove_leftover_temps() == 0
