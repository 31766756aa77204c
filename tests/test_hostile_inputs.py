"""Issue 20, case by case: inputs a hostile user would try, each ending in one clear error or the right
result. Each test names the class of failure it keeps closed; tests/test_fuzz_hostile.py draws many more
members of each class, and tests/test_kill_resume.py kills runs.

The promise checked everywhere: the command exits 1 with one ``clearmaps: error:`` line (the API raises a
``ClearmapsError``), never a traceback, never a file outside ``--out``, never code run, never a wrong map
without an error.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clearmaps
from clearmaps import ClearmapsError, render
from clearmaps.checkpoints import MAX_LAYERS
from clearmaps.cli import main
from clearmaps.cli_outputs import FILES, RECORD, read_record
from clearmaps.images import MAX_PIXELS, Preprocess, load_images, parse_size, safe_name

# a tiny network (8x8 grayscale, 3 classes) keeps every CLI run here to a fraction of a second
TINY = {"input_shape": [1, 8, 8], "class_names": ["a", "b", "c"],
        "layers": [{"type": "conv", "name": "c1", "in": 1, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
                   {"type": "maxpool", "kernel": 2}, {"type": "conv", "name": "head", "in": 4, "out": 3, "kernel": 1},
                   {"type": "relu"}]}


def tiny_checkpoint(folder: Path) -> Path:
    """The TINY network with seeded weights, its arch in the file."""
    torch.manual_seed(20)
    module = clearmaps.build_module(TINY)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)  # mostly positive weights: maps that are not black
    return clearmaps.save_checkpoint(folder / "tiny.safetensors", module)


def digit(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def run_cli(capsys, *argv):
    """The command in this process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, out, err, *needles):
    assert rc == 1, (rc, out, err)
    assert err.startswith("clearmaps: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err and "\x1b" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def tree(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def explain_args(tiny, *inputs, out, extra=()):
    return ["explain", *inputs, "--checkpoint", tiny, "--out", out, "--backend", "reference", "--scale", "1",
            "--quiet", *extra]


# ---- unsafe: outputs escaping --out ------------------------------------------------------------------------

HOSTILE_NAMES = ["...png", "..png", ".hidden.png", "a\nb.png", "A.png", "a.png", "-rf.png", " space .png",
                 "x" * 200 + ".png", "é.png", "e\u0301.png", "con.png", "back\\slash.png", "star*?.png"]


def test_no_input_name_leaves_the_output_folder_or_shares_one(tmp_path, capsys, tiny):
    src, out = tmp_path / "in", tmp_path / "work" / "out"
    src.mkdir()
    (tmp_path / "work").mkdir()
    names = [n for n in HOSTILE_NAMES if not (n.startswith("back") and os.sep == "\\")]
    for i, name in enumerate(names):
        Image.fromarray(digit(i)).save(src / name, format="PNG")
    before = tree(tmp_path)
    rc, stdout, err = run_cli(capsys, *explain_args(tiny, src, out=out))
    assert rc == 0, err
    created = tree(tmp_path) - before
    assert all(str(p).startswith(os.path.join("work", "out")) for p in created), sorted(map(str, created))
    folders = [p for p in out.iterdir()]
    assert len(folders) == len(names)  # "A" and "a", "é" in its two Unicode spellings: each its own folder
    assert len({f.name.casefold() for f in folders}) == len(folders)
    for f in folders:
        assert f.is_dir() and not f.name.startswith(".") and f.name == safe_name(f.name)
        assert all((f / name).is_file() for name in FILES)


def test_safe_name_keeps_good_names_and_tames_the_rest():
    for good in ("a", "batch-0000", "sample-00-digit7", "my digit", "chiffre-é"):
        assert safe_name(good) == good
    for bad, want in (("..", "image"), (".", "image"), ("", "image"), ("a/b", "a_b"), ("..\\..\\x", "_.._x"),
                      ("a\x00b", "a_b"), (".bashrc", "bashrc")):
        assert safe_name(bad) == want
    assert len(safe_name("é" * 500).encode()) <= 120


def test_a_link_in_the_output_folder_is_refused(tmp_path, capsys, tiny):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "d").symlink_to(elsewhere, target_is_directory=True)
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    assert_one_error(*run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=out)), "symbolic link")
    assert not list(elsewhere.iterdir())


# ---- unsafe: decompression bombs ---------------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height and that holds no image data: reading it is refused for its
    header, or fails as truncated if anything tries to decode it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [8193, 10000, 20000, 65535])
def test_bombs_are_refused_from_their_header_without_decoding(tmp_path, side):
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    for pre in (Preprocess(resize=(8, 8)), Preprocess()):
        with pytest.raises(ClearmapsError, match="megapixels") as info:
            load_images([bomb], pre, 1, (8, 8))
        assert "truncated" not in str(info.value)  # refused from the header, nothing was decoded
    assert side * side > MAX_PIXELS


def test_a_wrong_size_is_refused_from_the_header(tmp_path):
    small_bomb = png_header_only(tmp_path / "big.png", 4000, 4000)  # under the limit, but not the model's size
    with pytest.raises(ClearmapsError, match="is 4000x4000 but the model takes 8x8; resize it with --resize 8"):
        load_images([small_bomb], Preprocess(), 1, (8, 8))


def npy_bytes(shape, dtype="|u1", data=b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_array_headers_are_checked_before_anything_is_allocated(tmp_path):
    (tmp_path / "huge.npy").write_bytes(npy_bytes((100000, 100000, 100)))
    with pytest.raises(ClearmapsError, match="declares shape"):
        load_images([tmp_path / "huge.npy"], Preprocess(), 1, (8, 8))
    (tmp_path / "short.npy").write_bytes(npy_bytes((10, 8, 8), data=b"\x00" * 100))
    with pytest.raises(ClearmapsError, match="truncated"):
        load_images([tmp_path / "short.npy"], Preprocess(), 1, (8, 8))
    import zipfile
    with zipfile.ZipFile(tmp_path / "huge.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", npy_bytes((1 << 20, 1 << 20)))
    with pytest.raises(ClearmapsError, match="declares shape"):
        load_images([tmp_path / "huge.npz"], Preprocess(), 1, (8, 8))


# ---- silently wrong: scales and dtypes ---------------------------------------------------------------------

def test_sixteen_bit_images_are_divided_by_65535_whatever_they_hold(tmp_path):
    dark = np.arange(64, dtype=np.uint16).reshape(8, 8) * 3  # every value <= 255
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(dark * 200).save(tmp_path / "bright.tif")
    items, _ = load_images([tmp_path / "dark.png", tmp_path / "bright.tif"], Preprocess(), 1, (8, 8))
    np.testing.assert_array_equal(items[0].pixels[0], dark / 65535.0)
    np.testing.assert_array_equal(items[1].pixels[0], dark * 200 / 65535.0)
    # a 16-bit PGM with maxval 1023: Pillow stretches it to 0..65535, so 1023 is white
    (tmp_path / "ten.pgm").write_bytes(b"P5 2 1 1023\n" + np.array([0, 1023], ">u2").tobytes())
    items, _ = load_images([tmp_path / "ten.pgm"], Preprocess(), 1, (1, 2))
    np.testing.assert_array_equal(items[0].pixels[0], [[0.0, 1.0]])


def test_float_images_outside_0_1_and_32_bit_integers_are_refused(tmp_path):
    good = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(good).save(tmp_path / "good.tif")
    items, _ = load_images([tmp_path / "good.tif"], Preprocess(), 1, (8, 8))
    np.testing.assert_array_equal(items[0].pixels[0], good.astype(np.float64))
    Image.fromarray(good * 7).save(tmp_path / "seven.tif")
    with pytest.raises(ClearmapsError, match=r"float pixels in \[0, 7\]"):
        load_images([tmp_path / "seven.tif"], Preprocess(), 1, (8, 8))
    np.savez(tmp_path / "seven.npz", images=good[None] * 7)  # the same floats in an array: the same answer
    with pytest.raises(ClearmapsError, match=r"floats in \[0, 7\]"):
        load_images([tmp_path / "seven.npz"], Preprocess(), 1, (8, 8))
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ClearmapsError, match="32-bit integer"):
        load_images([tmp_path / "i32.tif"], Preprocess(), 1, (8, 8))


def test_resizing_a_colour_image_gives_what_it_gave_before(tmp_path):
    """The row-block conversion computes each value as the whole-array formula did: luma of /255 values,
    cast to float32, resized bilinearly by Pillow."""
    rgb = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    items, _ = load_images([tmp_path / "c.png"], Preprocess(mode="grayscale", resize=(8, 6)), 1, (8, 6))
    a = rgb.astype(np.float64).transpose(2, 0, 1) / 255.0
    grey = (a * np.array([0.299, 0.587, 0.114])[:, None, None]).sum(axis=0).astype(np.float32)
    want = np.asarray(Image.fromarray(grey).resize((6, 8), Image.Resampling.BILINEAR)).astype(np.float64)
    np.testing.assert_array_equal(items[0].pixels[0], want)


def test_integer_weights_are_refused_and_half_precision_is_read_exactly(tmp_path):
    torch.manual_seed(0)
    sd = clearmaps.build_module(TINY).state_dict()
    torch.save({k: (v * 10).long() for k, v in sd.items()}, tmp_path / "int.pt")
    with pytest.raises(ClearmapsError, match="wrong kind.*int64.*expected floating point"):
        clearmaps.load_checkpoint(tmp_path / "int.pt", arch=TINY)
    half = {k: v.half() for k, v in sd.items()}
    torch.save(half, tmp_path / "half.pt")
    net = clearmaps.load_checkpoint(tmp_path / "half.pt", arch=TINY)
    np.testing.assert_array_equal(net.layers[0].weight, half["c1.weight"].double().numpy())


def test_vmax_batch_results_depend_on_how_images_were_grouped(tmp_path, capsys, tiny):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(digit(i)).save(src / f"{i}.png")
    out = tmp_path / "out"
    for batch, want in (("4", "explained 6"), ("3", "explained 6"), ("3", "explained 0"), ("4", "explained 6")):
        rc, stdout, err = run_cli(capsys, *explain_args(tiny, src, out=out, extra=("--vmax", "batch",
                                                                                  "--batch-size", batch)))
        assert rc == 0 and want in stdout, (batch, stdout, err)
    # the last run's bytes are those of explain on its groups, [0..3] and [4, 5]
    net = clearmaps.load_checkpoint(tiny)
    x = np.stack([digit(i)[None] / 255.0 for i in range(6)]).astype(np.float32)
    for group in ([0, 1, 2, 3], [4, 5]):
        e = clearmaps.explain(net, x[group], vmax="batch")
        for b, i in enumerate(group):
            with np.load(out / str(i) / "maps.npz") as m:
                np.testing.assert_array_equal(m["rgb"], e.rgb[b])


def test_loose_preprocessing_arguments_are_refused():
    for kwargs, needle in ((dict(resize="28"), "resize="), (dict(resize=(28.7, 28)), "resize="),
                           (dict(resize=(0, 5)), "resize="), (dict(resize=(99999999, 99999999)), "pixels"),
                           (dict(invert="no"), "invert="), (dict(mean="abc"), "mean="),
                           (dict(std=[float("nan")]), "std="), (dict(mode=["rgb"]), "mode=")):
        with pytest.raises(ClearmapsError, match=needle):
            Preprocess(**kwargs)
    assert Preprocess(resize=28).resize == (28, 28) and Preprocess(mean=0.5).mean == (0.5,)
    with pytest.raises(ClearmapsError, match="--resize 99999999"):
        parse_size("99999999")


# ---- tracebacks: architectures, checkpoints, arrays, arguments ---------------------------------------------

def conv(**change):
    layer = {"type": "conv", "name": "c", "in": 1, "out": 3, "kernel": 3}
    layer.update(change)
    return layer


BAD_ARCHS = [
    ([conv(out=-5)], "'out' is -5"), ([conv(kernel=2.5)], "'kernel' is 2.5"), ([conv(kernel="3")], "'kernel' is '3'"),
    ([conv(out=1000000000)], "'out' is 1000000000"), ([conv(name=5)], "'name' is 5"),
    ([conv(name="a..b")], "has the part ''"), ([conv(name="__class__")], "torch modules already use"),
    ([conv(name="spec")], "torch modules already use"), ([conv(bias="yes")], "'bias'"),
    ([conv(stride=0)], "'stride' is 0"), ([conv(padding=9)], "more than the kernel"),
    ([conv(kernel=True)], "'kernel' is True"), ([conv(out=3.0)], "'out' is 3.0"),
    ([conv(), {"type": "relu", "name": "c.x"}], "may not extend"), ([conv(), conv()], "reuses the name"),
    ([conv(inn=1)], "unknown fields"), ([{"type": "maxpool", "kernel": 2, "padding": 2}], "half the window"),
    ([{"type": "batchnorm", "name": "b", "channels": 2, "eps": -1}], "'eps'"),
    ([{"type": "dropout", "p": float("nan")}], "'p'"), ([conv(out=65536, **{"in": 65536})], "parameters"),
    ({"layers": [conv()], "class_names": 5}, "'class_names' is 5"),
    ({"layers": [conv()], "class_names": ["a", "a", "b"]}, "twice"),
    ({"layers": [conv()], "class_names": ["a\nb", "c", "d"]}, "printable"),
    ({"layers": [conv()], "input_shape": [1, 28.7, 28]}, "'input_shape'"),
    ({"layers": [conv()], "inputs_shape": [1, 8, 8]}, "unknown fields"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"), ('[{"out": ' + "9" * 5000 + "}]", "not valid JSON"),
    ([conv()] * (MAX_LAYERS + 1), "layers; at most"),
]


@pytest.mark.parametrize("arch, needle", BAD_ARCHS, ids=[str(i) for i in range(len(BAD_ARCHS))])
def test_bad_architectures_are_refused_before_anything_is_built(arch, needle):
    with pytest.raises(ClearmapsError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        clearmaps.read_arch(arch)


def test_a_bad_architecture_file_is_one_error_line(tmp_path, capsys, tiny):
    (tmp_path / "arch.json").write_text(json.dumps([conv(kernel=2.5)]))
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    assert_one_error(*run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=tmp_path / "o",
                                                    extra=("--arch", tmp_path / "arch.json"))), "'kernel' is 2.5")


def test_hostile_checkpoints_are_refused_in_one_line(tmp_path, capsys, tiny):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in clearmaps.build_module(TINY).state_dict().items()}
    save_file(sd, tmp_path / "names.safetensors", metadata={"clearmaps.arch": json.dumps(TINY),
                                                            "clearmaps.class_names": "[not json"})
    torch.save({k: v.to_sparse() for k, v in sd.items()}, tmp_path / "sparse.pt")
    torch.save({k: v.long() for k, v in sd.items()}, tmp_path / "int.pt")
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    for name, needle in (("names.safetensors", "not a JSON list of names"), ("sparse.pt", "sparse"),
                         ("int.pt", "wrong kind")):
        args = explain_args(tiny, tmp_path / "d.png", out=tmp_path / "o")
        args[args.index("--checkpoint") + 1] = tmp_path / name
        if name != "names.safetensors":
            args += ["--arch", json.dumps(TINY)]
        assert_one_error(*run_cli(capsys, *args), needle)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_weights_only_refusal_is_in_our_words(tmp_path, capsys, tiny):
    marker = tmp_path / "ran"
    torch.save({"c1.weight": _Payload(str(marker))}, tmp_path / "evil.pt")
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    args = explain_args(tiny, tmp_path / "d.png", out=tmp_path / "o") + ["--arch", json.dumps(TINY)]
    args[args.index("--checkpoint") + 1] = tmp_path / "evil.pt"
    err = assert_one_error(*run_cli(capsys, *args), "was refused", "(io.open)", "weights_only=True",
                           "state_dict()")
    assert "weights_only=False" not in err and "PyTorch 2.6" not in err and not marker.exists()


def test_broken_arrays_are_refused_in_one_line(tmp_path, capsys, tiny):
    np.savez(tmp_path / "good.npz", images=np.stack([digit(i) for i in range(3)]))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "objects.npz", images=np.array([digit(0), "x"], dtype=object))
    np.save(tmp_path / "empty.npy", np.zeros((2, 0, 8), np.uint8))
    (tmp_path / "pickle.npy").write_bytes(b"\x80\x04N.")
    for name, needle in (("cut.npz", "truncated or corrupt"), ("objects.npz", "Python objects"),
                         ("empty.npy", "no pixels"), ("pickle.npy", "not a NumPy")):
        assert_one_error(*run_cli(capsys, *explain_args(tiny, tmp_path / name, out=tmp_path / "o")), needle)


def test_huge_resize_and_scale_are_refused_before_any_allocation(tmp_path, capsys, tiny):
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    assert_one_error(*run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=tmp_path / "o",
                                                    extra=("--resize", "99999999"))), "--resize 99999999")
    args = explain_args(tiny, tmp_path / "d.png", out=tmp_path / "o")
    args[args.index("--scale") + 1] = "100000"
    assert_one_error(*run_cli(capsys, *args), "--scale 100000", "--scale 512 or less")
    assert not list((tmp_path / "o").glob("*/*.png"))


def test_loose_api_arguments_are_refused():
    net = clearmaps.Network([clearmaps.Conv(np.ones((3, 1, 1, 1)), np.zeros(3))])
    x = np.ones((1, 1, 4, 4))
    for call, needle in ((lambda: clearmaps.Network(None), "layers is NoneType"),
                         (lambda: clearmaps.Network(net.layers, class_names=5), "class_names is 5"),
                         (lambda: clearmaps.Network(net.layers, class_names="abc"), "class_names is 'abc'"),
                         (lambda: clearmaps.Network(net.layers, input_shape=(1, 28.7, 28)), "input_shape"),
                         (lambda: clearmaps.load_checkpoint(None), "checkpoint path is None"),
                         (lambda: clearmaps.load_checkpoint(5, arch=TINY), "checkpoint path is 5"),
                         (lambda: clearmaps.explain(net, x, classes=3.0), "classes"),
                         (lambda: clearmaps.explain(net, x, classes={1, 2}), "set"),
                         (lambda: clearmaps.explain(net, x, keep_responses="no"), "keep_responses")):
        with pytest.raises(ClearmapsError, match=needle):
            call()


# ---- left behind: temp files, records, modes, full disks ----------------------------------------------------

def test_stale_temp_files_are_cleaned_and_live_ones_kept(tmp_path, capsys, tiny):
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    out = tmp_path / "out"
    assert run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=out))[0] == 0
    host = render._HOST
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / "d" / f".panel.png.{host}-{dead}-0123abcd.clearmaps-tmp", out / "d" / ".clear.png.ab_12xyz.tmp",
                 out / f".table1.csv.{host}-{dead}-0123abcd.clearmaps-tmp"]
        keep = [out / "d" / f".clear.png.{host}-{live.pid}-0123abcd.clearmaps-tmp",  # still being written
                out / "d" / f".clear.png.ffffff-{dead}-0123abcd.clearmaps-tmp",  # another machine's
                out / "d" / ".notes.txt.ab_12xyz.tmp"]  # not ours
        for p in stale + keep:
            p.write_bytes(b"")
        rc, stdout, _ = run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=out))
        assert rc == 0 and "skipped 1" in stdout  # cleaned even where nothing had to be redone
        assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete", "record"])
def test_done_is_decided_by_a_record_covering_every_output(tmp_path, capsys, tiny, damage):
    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    out = tmp_path / "out"
    assert run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=out))[0] == 0
    record = read_record(out / "d")
    assert set(record["files"]) == set(FILES)
    target = out / "d" / ("clear.png" if damage != "truncate" else "maps.npz")
    good = target.read_bytes()
    if damage == "overwrite":
        target.write_bytes(b"\x00" * len(good))  # the same size: only the hash can tell
    elif damage == "truncate":
        target.write_bytes(good[:-10])
    elif damage == "delete":
        target.unlink()
    else:
        (out / "d" / RECORD).write_text("{")
    rc, stdout, _ = run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=out))
    assert rc == 0 and "explained 1" in stdout
    assert target.read_bytes() == good  # the same settings give the same bytes
    rc, stdout, _ = run_cli(capsys, *explain_args(tiny, tmp_path / "d.png", out=out))
    assert "explained 0" in stdout and "skipped 1" in stdout


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_the_umask_says(tmp_path, umask):
    old = os.umask(umask)
    try:
        render.save_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
        render.save_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    for name in ("x.png", "x.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_write_error_names_the_file(tmp_path):
    def full(f):
        raise OSError(28, "No space left on device")  # what a write to a full disk raises: no file name

    with pytest.raises(OSError) as info:
        render.atomic_write(tmp_path / "maps.npz", full)
    assert info.value.filename == str(tmp_path / "maps.npz") and info.value.errno == 28
    assert not list(tmp_path.iterdir())


def test_a_full_disk_ends_in_one_line_naming_the_file(tmp_path, tiny):
    """A real write failure: the file size limit (RLIMIT_FSIZE) makes writes fail as a full disk does."""
    Image.fromarray(digit(0)).save(tmp_path / "d.png")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    proc = subprocess.run([sys.executable, "-m", "clearmaps", *map(str, explain_args(tiny, tmp_path / "d.png",
                                                                                   out=tmp_path / "o"))],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("clearmaps: error: File too large: ") and "/o/d/" in line, proc.stderr
    assert not [p for p in (tmp_path / "o").rglob("*") if p.name.endswith(render.TMP_SUFFIX)]


def test_ctrl_c_at_any_moment_ends_in_one_line(tmp_path, tiny):
    """SIGINT at moments of the first second and a half (interpreter, imports, model, images): never a
    traceback; one line and status 130, or the run was over, or Python had not yet installed its handler."""
    import time

    Image.fromarray(digit(0)).save(tmp_path / "d.png")
    argv = [sys.executable, "-m", "clearmaps", *map(str, explain_args(tiny, tmp_path / "d.png", out=tmp_path / "o",
                                                                      extra=("--force",)))]
    for delay in (0.1, 0.2, 0.35, 0.5, 0.8, 1.2, 1.6):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if err.startswith("Fatal Python error: init_import_site"):
            continue  # Python itself was still starting (its site module), before any line of clearmaps
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err)
        if proc.returncode == 130:
            assert err.count("\n") == 1 and err.startswith("clearmaps: interrupted"), (delay, err)
