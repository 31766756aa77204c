"""Fuzzing the promise of issue 20 with hypothesis: hostile JSON architectures, checkpoints, image and array
files, file names, API arguments and command lines, drawn around valid ones so that both sides of every
check are reached.

The promise, for every draw: the API raises ``ClearmapsError`` or returns the right result; the command
exits 0, or 1 with one ``clearmaps: error:`` line (2 with argparse's usage); never a traceback, never a file
outside ``--out``, never code run from a file, never a wrong map without an error ("right" is checked
against what does not share the code under test: torch's forward pass and autograd oracle for networks, the
drawn pixels for lossless image files, the file's tensors for checkpoints).

Bounded for CI: about 25 s on 2 cores. ``CLEARMAPS_FUZZ_EXAMPLES=N`` multiplies every test's examples by N
(and draws at random instead of from the fixed seed) for a longer hunt.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, currently_in_test_context, given, note, settings
from hypothesis import strategies as st
from PIL import Image

import clearmaps
from clearmaps import ClearmapsError, reference
from clearmaps.checkpoints import SpecModule
from clearmaps.cli import main
from clearmaps.cli_outputs import FILES
from clearmaps.images import Preprocess, load_images, parse_size

from .oracle import switch_flips, torch_responses
from .test_hostile_inputs import TINY, digit, tiny_checkpoint
from .tolerances import RTOL_F64, assert_close

SCALE = max(1, int(os.environ.get("CLEARMAPS_FUZZ_EXAMPLES", "1")))


def fuzz(examples: int):
    """hypothesis settings for one fuzzer: a fixed seed in CI (the same draws every run), at random when
    CLEARMAPS_FUZZ_EXAMPLES asks for a longer hunt."""
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tiny(base):
    return tiny_checkpoint(base)


def fresh(base: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=base))


HOSTILE = st.sampled_from([
    -5, -1, 0, 1, 2, 3, 7, 1025, 65537, 2 ** 31, 10 ** 9, 2.5, 3.0, -0.0, float("nan"), float("inf"), "3", "", "a..b",
    "__class__", "spec", "training", "forward", "features.0", "0", "a.b.c", ".", "..", "/etc/passwd", "a\nb", True,
    False, None, [], [3], [3, 3], [3, 3, 3], [[3, 3]], [2.5, 3], {}, {"type": "conv"}, ["a", "a"], ["a", 5],
    [1, 28.7, 28], [1, None, 8], [1, 8, None], [0, 8, 8]]) | st.integers(-3, 70) | st.text(max_size=6)
FIELD_NAMES = ["type", "name", "in", "out", "kernel", "stride", "padding", "bias", "channels", "eps", "p", "extra"]


@st.composite
def valid_chains(draw):
    """A spec that read_arch must take: convs (with batch norms, pools, dropouts between) into a conv head or a
    gap + linear head, with consistent channels."""
    c, layers, pools, i = draw(st.sampled_from([1, 3])), [], 0, 0
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 5))
        k = draw(st.sampled_from([1, 3]))
        layers.append({"type": "conv", "name": f"f.{i}", "in": c, "out": out, "kernel": k,
                       "padding": draw(st.integers(0, k // 2)), "bias": draw(st.booleans())})
        c, i = out, i + 1
        if draw(st.booleans()):
            layers.append({"type": "batchnorm", "name": f"f.{i}", "channels": c})
            i += 1
        layers.append({"type": "relu"})
        if pools < 2 and draw(st.booleans()):
            layers.append({"type": "maxpool", "kernel": 2, "stride": draw(st.sampled_from([1, 2]))})
            pools += 1
        if draw(st.booleans()):
            layers.append({"type": "dropout", "p": 0.5})
    n = draw(st.integers(2, 4))
    if draw(st.booleans()):
        layers += [{"type": "gap"}, {"type": "flatten"}, {"type": "linear", "name": "fc", "in": c, "out": n}]
    else:
        layers += [{"type": "conv", "name": "head", "in": c, "out": n, "kernel": 1}, {"type": "relu"}]
    spec = {"layers": layers, "input_shape": [layers[0]["in"], 12, 12]}
    if draw(st.booleans()):
        spec["class_names"] = [f"k{j}" for j in range(n)]
    return spec


@st.composite
def hostile_archs(draw):
    """A valid chain, then none or several hostile edits: a field set to a hostile value, a field deleted or
    added, a layer replaced, top-level fields changed; sometimes as JSON text cut short or nested deeply."""
    spec = draw(valid_chains())
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["value", "delete", "layer", "top", "top-extra"]))
        layers = spec.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers):
            edit = "top-extra"  # an earlier edit replaced the layers: edit around them
        else:
            layer = draw(st.sampled_from(layers))
        if edit == "value":
            layer[draw(st.sampled_from(FIELD_NAMES))] = draw(HOSTILE)
        elif edit == "delete" and layer:
            layer.pop(draw(st.sampled_from(sorted(layer))))
        elif edit == "layer":
            spec["layers"][draw(st.integers(0, len(spec["layers"]) - 1))] = draw(HOSTILE)
        elif edit == "top":
            spec[draw(st.sampled_from(["layers", "input_shape", "class_names"]))] = draw(HOSTILE)
        else:
            spec[draw(st.sampled_from(["input", "names", "classes"]))] = draw(HOSTILE)
    form = draw(st.sampled_from(["dict", "dict", "json", "cut", "deep"]))
    if form == "json":
        return json.dumps(spec)
    if form == "cut":
        text = json.dumps(spec)
        return text[:draw(st.integers(1, max(1, len(text) - 1)))]
    if form == "deep":
        depth = draw(st.sampled_from([10, 1000, 100000]))
        return "[" * depth + json.dumps(spec) + "]" * depth
    return spec


def why(text: str) -> None:
    if currently_in_test_context():
        note(text)


def architecture_outcome(arch, seed: int) -> str:
    """"refused" (one ClearmapsError, at read_arch, load or explain), or "matched": the network built from
    the spec gives torch's logits and the autograd oracle's maps. Anything else fails."""
    try:
        spec = clearmaps.read_arch(arch)
    except ClearmapsError:
        return "refused"
    with torch.device("meta"):
        SpecModule(spec)  # everything read_arch lets through builds, without allocating
    torch.manual_seed(seed)
    module = clearmaps.build_module(spec).double().eval()
    with tempfile.TemporaryDirectory() as d:
        path = clearmaps.save_checkpoint(Path(d) / "m.safetensors", module)
        try:
            net = clearmaps.load_checkpoint(path)
        except ClearmapsError as exc:
            why(f"refused at load: {exc}")
            return "refused"
    c, h, w = net.input_shape
    x = np.random.default_rng(seed).uniform(size=(2, c, h or 12, w or 12))
    try:
        e = clearmaps.explain(net, x, backend="reference")
    except ClearmapsError as exc:
        why(f"refused at explain: {exc}")
        return "refused"
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert_close(e.logits, want, RTOL_F64, "logits vs the torch module")
    # R(x|c) against autograd where both pick the same switches: overlapping pools feeding 1x1 convs make
    # exact ties, which torch's conv can round apart (tests/oracle.py, switch_flips)
    if net.is_chain and switch_flips(net, x, reference.forward(net, x)) == 0:
        assert_close(e.responses, torch_responses(net, x, e.classes[0]).sum(axis=2), RTOL_F64, "R(x|c) vs autograd")
    return "matched"


@fuzz(80)
@given(arch=hostile_archs(), seed=st.integers(0, 2 ** 16))
def test_fuzz_architectures(arch, seed):
    """An architecture is refused whole, or builds, loads and gives torch's logits and the oracle's maps."""
    architecture_outcome(arch, seed)


def test_the_architecture_fuzzer_reaches_both_sides():
    """Positive and negative twins of the fuzzer's draws: a valid chain matches, its hostile edits are refused."""
    spec = {"layers": [{"type": "conv", "name": "f.0", "in": 1, "out": 2, "kernel": 3, "padding": 1},
                       {"type": "relu"}, {"type": "maxpool", "kernel": 2},
                       {"type": "conv", "name": "head", "in": 2, "out": 3, "kernel": 1}], "input_shape": [1, 12, 12]}
    assert architecture_outcome(spec, 1) == "matched"
    assert architecture_outcome(json.dumps(spec), 2) == "matched"
    for edit in ({"kernel": 2.5}, {"out": -5}, {"name": "__class__"}, {"in": 2}):
        bad = json.loads(json.dumps(spec))
        bad["layers"][0].update(edit)
        assert architecture_outcome(bad, 1) == "refused", edit


PAYLOADS = [("builtins", "open"), ("builtins", "exec"), ("builtins", "eval"), ("os", "system"),
            ("subprocess", "check_call"), ("shutil", "copyfile")]


class Payload:
    """An object whose unpickling calls module.name with arguments that create the file ``marker``: what a
    malicious checkpoint carries."""

    def __init__(self, module: str, name: str, marker: str):
        self.call = (module, name, marker)

    def __reduce__(self):
        import importlib

        module, name, marker = self.call
        args = {"open": (marker, "w"), "exec": (f"open({marker!r}, 'w').close()",),
                "eval": (f"open({marker!r}, 'w').close()",), "system": (f"touch '{marker}'",),
                "check_call": (["touch", marker],), "copyfile": (os.devnull, marker)}[name]
        return getattr(importlib.import_module(module), name), args


def save_payload(path: Path, module: str, name: str, form: str) -> None:
    obj = {"c1.weight": Payload(module, name, str(path.parent / "ran"))}
    if form == "zip":
        torch.save(obj, path)
    elif form == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("module, name", PAYLOADS)
def test_the_payloads_are_live(tmp_path, module, name):
    """Negative control of the checkpoint fuzzer's payloads: an unsafe load runs each one."""
    save_payload(tmp_path / "m.pt", module, name, "pickle")
    pickle.loads((tmp_path / "m.pt").read_bytes())
    assert (tmp_path / "ran").exists()


@st.composite
def hostile_checkpoints(draw):
    """(file bytes, suffix, arch to pass or None, what the file's weights are). Starts from TINY's state dict
    and changes dtypes, shapes, values, keys, layouts, wrappers and metadata, or the bytes of the file, or
    writes a pickle that would run code."""
    torch.manual_seed(draw(st.integers(0, 99)))
    sd = {k: v.clone() for k, v in clearmaps.build_module(TINY).state_dict().items()}
    kind = draw(st.sampled_from(["edit", "edit", "edit", "bytes", "payload", "wrapper"]))
    if kind == "payload":
        module, name = draw(st.sampled_from(PAYLOADS))
        return "payload", (module, name, draw(st.sampled_from(["zip", "legacy", "pickle"]))), ".pt", TINY, None
    key = draw(st.sampled_from(sorted(sd)))
    for _ in range(draw(st.integers(0, 2))):
        edit = draw(st.sampled_from(["dtype", "shape", "nan", "drop", "add", "intkey", "value", "sparse"]))
        current = sd.get(key)
        if edit in ("dtype", "nan", "sparse") and not (isinstance(current, torch.Tensor) and current.is_floating_point()
                                                       and current.layout == torch.strided and current.numel()):
            continue  # an earlier edit removed or replaced it
        if edit == "dtype":
            dtype = draw(st.sampled_from([torch.int8, torch.int64, torch.uint8, torch.bool, torch.float16,
                                          torch.bfloat16, torch.float64, torch.complex64]))
            sd[key] = (sd[key] * 10).to(dtype)
        elif edit == "shape":
            sd[key] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=4)))
        elif edit == "nan":
            sd[key] = sd[key].clone().reshape(-1).index_fill(0, torch.tensor([0]), float("nan")).reshape(sd[key].shape)
        elif edit == "drop":
            sd.pop(key, None)
        elif edit == "add":
            sd[draw(st.sampled_from(["x", "c1.weight.x", "module.c1.weight"]))] = torch.zeros(1)
        elif edit == "intkey":
            sd[draw(st.sampled_from([1, None, ("a",)]))] = torch.zeros(1)
        elif edit == "value":
            sd[key] = draw(st.sampled_from([1, "x", [1.0], {"a": torch.zeros(1)}, None]))
        elif edit == "sparse" and sd[key].ndim:
            sd[key] = sd[key].to_sparse()
    suffix = draw(st.sampled_from([".pt", ".safetensors"]))
    meta = {}
    if kind == "wrapper":
        meta = {"arch": draw(st.sampled_from([TINY, json.dumps(TINY), 5, "{", [], "resnet"])),
                "class_names": draw(st.sampled_from([None, ["a", "b", "c"], "abc", 5, ["a", "a", "b"], [1, 2, 3],
                                                     ["a", "b"]]))}
    corrupt = None
    if kind == "bytes":
        corrupt = (draw(st.sampled_from(["cut", "flip", "zero"])), draw(st.floats(0.0, 1.0)))
    return kind, (sd, meta, corrupt), suffix, None if meta else TINY, sd


def write_checkpoint(path: Path, drawn) -> None:
    kind, body, suffix = drawn[0], drawn[1], drawn[2]
    if kind == "payload":
        save_payload(path, *body)
        return
    sd, meta, corrupt = body
    if suffix == ".pt":
        torch.save({"state_dict": sd, **meta} if meta else sd, path)
    else:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
                   and v.layout == torch.strided}
        arch = meta.get("arch")
        metadata = {"clearmaps.arch": arch if isinstance(arch, str) else json.dumps(arch),
                    "clearmaps.class_names": json.dumps(meta.get("class_names"))} if meta else None
        save_file(tensors, path, metadata=metadata)
    if corrupt:
        how, where = corrupt
        data = bytearray(path.read_bytes())
        at = min(len(data) - 1, int(where * len(data)))
        if how == "cut":
            data = data[:at]
        elif how == "flip":
            data[at] ^= 0xFF
        else:
            data[at:at + 64] = bytes(len(data[at:at + 64]))
        path.write_bytes(bytes(data))


@fuzz(80)
@given(drawn=hostile_checkpoints())
def test_fuzz_checkpoints(base, drawn):
    """A checkpoint is refused, or loads into exactly its float weights; no pickle runs code."""
    folder = fresh(base)
    path = folder / f"m{drawn[2]}"
    write_checkpoint(path, drawn)
    try:
        net = clearmaps.load_checkpoint(path, arch=drawn[3])
    except ClearmapsError as exc:
        assert "\n" not in str(exc) and "\x1b" not in str(exc), str(exc)
        return
    finally:
        assert not (folder / "ran").exists(), "a checkpoint ran code"
    assert drawn[0] != "payload"
    sd = drawn[4]
    if sd is not None and drawn[0] != "bytes":  # the file's own tensors, upcast exactly, nothing truncated
        weight = sd["c1.weight"]
        assert weight.is_floating_point(), f"{weight.dtype} weights were accepted"
        np.testing.assert_array_equal(net.layers[0].weight, weight.double().numpy())


# ---- image and array files ------------------------------------------------------------------------------

MODES = {"L": (np.uint8, 255.0), "I;16": (np.uint16, 65535.0), "F": (np.float32, 1.0), "RGB": (np.uint8, 255.0),
         "RGBA": (np.uint8, 255.0), "1": (np.bool_, 1.0), "LA": (np.uint8, 255.0), "P": (np.uint8, None),
         "I": (np.int32, None), "CMYK": (np.uint8, None)}
FORMATS = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp", "JPEG": ".jpg",
           "PPM": ".ppm"}


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    dtype, _ = MODES[mode]
    if mode == "F":
        top = draw(st.sampled_from([1.0, 1.0, 7.0, float("nan"), float("inf")]))
        data = (rng.uniform(-0.0, 1.0, (h, w)) * (1.0 if math.isnan(top) or math.isinf(top) else top)).astype(dtype)
        if not np.isfinite(top):
            data.flat[0] = top
    elif mode == "I":
        data = rng.integers(0, 70000, (h, w)).astype(dtype)
    elif mode == "1":
        data = rng.integers(0, 2, (h, w)).astype(bool)
    else:
        hi = 65536 if mode == "I;16" else 256
        data = rng.integers(0, hi, (h, w, len(mode)) if mode in ("RGB", "RGBA", "LA", "CMYK") else (h, w)).astype(dtype)
    corrupt = draw(st.sampled_from([None, None, None, "cut", "flip", "header", "garbage"]))
    return mode, fmt, data, corrupt, draw(st.floats(0, 1)), draw(st.integers(1, 100000))


def save_image(path: Path, mode: str, fmt: str, data: np.ndarray) -> bool:
    """Save ``data`` in ``mode`` as ``fmt``; False when Pillow cannot write that combination."""
    try:
        if mode == "P":
            img = Image.fromarray(data, "L").convert("P")
        elif mode == "CMYK":
            img = Image.fromarray(data, "CMYK")
        elif mode in ("I;16", "I", "F", "1"):
            img = Image.fromarray(data)
        else:
            img = Image.fromarray(data, mode)
        # exact: WebP would otherwise zero the colour of transparent pixels, and the file not hold the draw
        img.save(path, format=fmt, **({"lossless": True, "exact": True} if fmt == "WEBP" else {}))
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stored_mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def expected_pixels(mode: str, fmt: str, data: np.ndarray, saved: Path):
    """What a lossless file holds, as (C, H, W) in [0, 1], from the drawn data and the mode's bit depth; None
    where the format changes the data (JPEG, palettes, colour conversions, formats that narrow the mode)."""
    with Image.open(saved) as back:
        if back.mode != mode or fmt in ("JPEG",) or mode in ("P", "CMYK", "I"):
            return None
    _, scale = MODES[mode]
    if mode == "1":
        return data[None].astype(np.float64)
    if mode in ("RGB", "RGBA"):
        return data[..., :3].transpose(2, 0, 1).astype(np.float64) / scale
    if mode == "LA":
        return data[None, ..., 0].astype(np.float64) / scale
    return data[None].astype(np.float64) / scale


@fuzz(120)
@given(drawn=image_files(), channels=st.sampled_from([1, 3]), mode=st.sampled_from([None, "grayscale", "rgb"]),
       resize=st.sampled_from([None, None, (4, 5), (9, 9)]), fixed=st.booleans())
def test_fuzz_image_files(base, drawn, channels, mode, resize, fixed):
    """An image file is refused, or read into the model's channels and size, in [0, 1], and (lossless,
    unconverted, not resized) exactly the drawn samples over the file's bit depth."""
    kind, fmt, data, corrupt, where, side = drawn
    path = fresh(base) / f"x{FORMATS[fmt]}"
    if corrupt == "header":  # a PNG whose header promises side x side pixels and holds none
        from .test_hostile_inputs import png_header_only

        png_header_only(path.with_suffix(".png"), side, side)
        path = path.with_suffix(".png")
    elif corrupt == "garbage":
        path.write_bytes(bytes(np.random.default_rng(side).integers(0, 256, side % 500 + 1, dtype=np.uint8)))
    else:
        assume(save_image(path, kind, fmt, data))
        if corrupt:
            raw = bytearray(path.read_bytes())
            at = min(len(raw) - 1, int(where * len(raw)))
            if corrupt == "cut":
                raw = raw[:at]
            else:
                raw[at] ^= 0x5A
            path.write_bytes(bytes(raw))
    h, w = data.shape[:2]
    size = (resize or (h, w)) if fixed else None
    pre = Preprocess(mode=mode, resize=resize)
    try:
        items, _ = load_images([path], pre, channels, size)
    except ClearmapsError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    a = items[0].pixels
    assert a.dtype == np.float64 and a.shape[0] == channels and np.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1 + 1e-6, (a.min(), a.max())
    if size:
        assert a.shape[1:] == tuple(size)
    if kind == "F" and corrupt is None and stored_mode(path) == "F":
        assert np.isfinite(data).all() and data.max() <= 1 + 1e-6, "out-of-range floats were accepted"
    if corrupt is None and resize is None and mode is None:
        want = expected_pixels(kind, fmt, data, path)
        if want is not None:
            np.testing.assert_array_equal(a, want)


@st.composite
def array_files(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=5))
    dtype = draw(st.sampled_from(["u1", "i8", "u2", "f4", "f8", "f2", "b1", "c8", "O", "U3", "V4", "M8[s]"]))
    container = draw(st.sampled_from(["npy", "npz", "npz-labels", "npz-two"]))
    corrupt = draw(st.sampled_from([None, None, "cut", "flip", "header"]))
    return shape, dtype, container, corrupt, draw(st.integers(0, 2 ** 16)), draw(st.floats(0, 1))


def _array(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if dtype == "O":
        a = np.empty(shape, dtype=object)
        a.flat[:] = [None] * a.size
        return a
    return rng.uniform(-0.5, 2, shape).astype(np.float64).astype(dtype) if dtype[0] in "fc" else \
        rng.integers(0, 300, shape).astype(dtype)


@fuzz(100)
@given(drawn=array_files())
def test_fuzz_array_files(base, drawn):
    shape, dtype, container, corrupt, seed, where = drawn
    folder = fresh(base)
    a = _array(shape, dtype, seed)
    if container == "npy":
        path = folder / "a.npy"
        np.save(path, a, allow_pickle=True)
    else:
        path = folder / "a.npz"
        extra = {"labels": np.arange(a.shape[0] if a.ndim else 1)} if container == "npz-labels" else \
            {"other": a} if container == "npz-two" else {}
        np.savez(path, images=a, **extra) if container != "npz-two" else np.savez(path, a=a, **extra)
    if corrupt == "header":  # a header promising more than the file holds, or more than is allowed
        header = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, %d, %d), }" % (seed + 1, seed + 1, 2 ** 20)
        path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.encode().ljust(117) + b"\n")
    elif corrupt:
        raw = bytearray(path.read_bytes())
        at = min(len(raw) - 1, int(where * len(raw)))
        raw = raw[:at] if corrupt == "cut" else raw[:at] + bytes([raw[at] ^ 0xA5]) + raw[at + 1:]
        path.write_bytes(bytes(raw))
    try:
        items, _ = load_images([path], Preprocess(), None, None)
    except ClearmapsError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    for it in items:
        assert np.isfinite(it.pixels).all() and it.pixels.min() >= -1e-6 and it.pixels.max() <= 1 + 1e-6
        assert it.pixels.ndim == 3 and min(it.pixels.shape) >= 1


# ---- API arguments --------------------------------------------------------------------------------------

ARGUMENT = st.sampled_from([None, 0, 1, 2, -1, 3.0, 2.5, float("nan"), "a", "b", "top2", "top0", "top-9", "batch",
                            "p50", "p0", "abc", True, False, "no", [], [0], [0, 0], [2, 1], ["a", 2], {1, 2}, {0: 1},
                            (1,), np.array([1, 0]), np.array([[0, 1]]), np.array([0.5]), object(),
                            torch.tensor([1]), "reference", "cpu", "gpu", "sum", "max", "norm", "mean", [0.1, 0.9],
                            [0.1, 2.0], np.float64(2.0), 10 ** 30])


@functools.lru_cache(maxsize=4)
def load_net(path):
    return clearmaps.load_checkpoint(path)


@fuzz(150)
@given(kwargs=st.dictionaries(st.sampled_from(["classes", "backend", "rectify", "reduce", "palette", "vmax",
                                               "keep_responses"]), ARGUMENT, max_size=4),
       x=st.sampled_from(["ok", "ok", "ok", "nan", "int", "3d", "channels", "list", "none", "empty", "f16", "inf"]))
def test_fuzz_explain_arguments(tiny, kwargs, x):
    """explain with hostile arguments: a ClearmapsError, or maps of the right shapes from classes that were
    asked for."""
    net = load_net(tiny)
    rng = np.random.default_rng(0)
    good = rng.uniform(size=(2, 1, 8, 8))
    images = {"ok": good, "nan": np.where(good > 0.5, np.nan, good), "int": (good * 255).astype(np.int64),
              "3d": good[0], "channels": np.repeat(good, 3, axis=1), "list": good.tolist(), "none": None,
              "empty": good[:0], "f16": good.astype(np.float16), "inf": good * np.inf}[x]
    kwargs.setdefault("backend", "reference")
    if isinstance(kwargs["backend"], str) and kwargs["backend"] == "cpu":
        kwargs["backend"] = "reference"  # the Numba compile would take the whole budget; the checks come first
    try:
        e = clearmaps.explain(net, images, **kwargs)
    except ClearmapsError:
        return
    assert x in ("ok", "list")
    assert e.rgb.shape == (2, 8, 8, 3) and e.rgb.dtype == np.uint8
    assert np.isin(e.dominant_class, e.classes).all() and np.isfinite(e.logits).all()
    if kwargs.get("keep_responses") is False:
        assert e.responses is None


# Found by the fuzzers in explain's and the command's checks (issue 20's note): each is refused now
FOUND = {
    "reduce=array": (dict(reduce=np.array([1, 0])), "ok"),
    "backend=array": (dict(backend=np.array([1, 0])), "ok"),
    "classes=object": (dict(classes=object()), "ok"),
    "list x, torch classes": (dict(classes=torch.tensor([1])), "list"),
    "None x, torch classes": (dict(classes=torch.tensor([1])), "none"),
    "vmax=10**30": (dict(vmax=10 ** 30), "ok"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_earlier_findings_are_refused(tiny, case):
    """Each ends in a ClearmapsError or a result (vmax=10**30 is a valid number), never another exception."""
    kwargs, x = FOUND[case]
    images = {"ok": np.ones((1, 1, 8, 8)), "list": np.ones((1, 1, 8, 8)).tolist(), "none": None}[x]
    try:
        clearmaps.explain(load_net(tiny), images, backend=kwargs.pop("backend", "reference"), **kwargs)
    except ClearmapsError:
        pass


@fuzz(150)
@given(call=st.sampled_from(["network", "preprocess", "parse_size", "read_arch", "upscale", "load_images"]),
       a=ARGUMENT | st.text(max_size=12), b=ARGUMENT)
def test_fuzz_other_public_functions(call, a, b):
    """Constructors and helpers with hostile arguments raise ClearmapsError or work."""
    layers = [clearmaps.Conv(np.ones((3, 1, 1, 1)), np.zeros(3))]
    try:
        if call == "network":
            clearmaps.Network(layers if b is None else b, class_names=a)
            clearmaps.Network(layers, input_shape=a)
        elif call == "preprocess":
            Preprocess(mode=a if isinstance(a, str) and len(a) < 3 else None, resize=b,
                       mean=a if b is not None else None)
        elif call == "parse_size":
            h, w = parse_size(a)
            assert h >= 1 and w >= 1
        elif call == "read_arch":
            clearmaps.read_arch(a)
        elif call == "upscale":
            clearmaps.render.upscale(np.zeros((4, 4, 3), np.uint8), a)
        else:  # names are not drawn: a drawn name could be a folder of this checkout
            load_images([] if isinstance(a, str) else a, Preprocess(), 1, None)
    except ClearmapsError:
        pass


# ---- the command line -----------------------------------------------------------------------------------

def tree(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def run_cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: usage and exit status 2
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_promise(rc, out, err, root: Path, before: set, out_dir: Path):
    assert rc in (0, 1, 2), (rc, err)
    assert "Traceback" not in out + err, err
    if rc == 1:
        assert err.startswith("clearmaps: error: ") and err.count("\n") == 1, err
    if rc == 2:
        assert err.startswith("usage: clearmaps"), err
    outside = [p for p in tree(root) - before if not str(root / p).startswith(str(out_dir))]
    assert not outside, outside


OPTION_VALUES = st.sampled_from(["0", "1", "3", "-1", "2.5", "nan", "inf", "1e9", "99999999", "", "a", "a,b",
                                 ",,,", "top3", "p50", "p200", "batch", "8x8", "4x6", "0x0", "x", "2x2x2", "-",
                                 "../up", "/", "\n", "é", "b,a", "c", "3,3"])
OPTIONS = ["--classes", "--top-k", "--true-label", "--vmax", "--binary-threshold", "--scale", "--batch-size",
           "--resize", "--mean", "--std", "--reduce", "--backend", "--class-names", "--arch"]


@fuzz(30)
@given(options=st.lists(st.tuples(st.sampled_from(OPTIONS), OPTION_VALUES), max_size=3),
       flags=st.lists(st.sampled_from(["--invert", "--grayscale", "--rgb", "--no-rectify", "--force"]), max_size=2))
def test_fuzz_command_lines(base, tiny, options, flags):
    root = fresh(base)
    Image.fromarray(digit(1)).save(root / "d.png")
    out_dir = root / "out"
    argv = ["explain", root / "d.png", "--checkpoint", tiny, "--out", out_dir, "--quiet"]
    have = {o for o, _ in options}
    if "--backend" not in have:
        argv += ["--backend", "reference"]
    if "--scale" not in have:
        argv += ["--scale", "1"]
    for option, value in options:
        if option == "--backend" and value not in ("reference",):
            value = "gpu"  # an invalid choice (argparse); the Numba backends would take the budget
        argv += [option, value]
    argv += flags
    before = tree(root)
    rc, out, err = run_cli(argv)
    assert_promise(rc, out, err, root, before, out_dir)
    if rc == 0:
        folders = [p for p in out_dir.iterdir() if p.is_dir()]
        assert len(folders) == 1 and all((folders[0] / f).is_file() for f in FILES)


@pytest.mark.parametrize("case", ["--vmax newline", "--class-names deep JSON"])
def test_earlier_cli_findings(base, tiny, case):
    """Once: the command pasted --vmax's text, newline and all, into its message (two lines); a --class-names
    JSON file nested deeply ended in a RecursionError traceback."""
    root = fresh(base)
    Image.fromarray(digit(1)).save(root / "d.png")
    (root / "names.json").write_text("[" * 100000 + "]" * 100000)
    extra = ["--vmax", "\n"] if case == "--vmax newline" else ["--class-names", root / "names.json"]
    argv = ["explain", root / "d.png", "--checkpoint", tiny, "--out", root / "out", "--backend", "reference", *extra]
    try:
        rc, out, err = run_cli(argv)
    except RecursionError:
        rc, out, err = "traceback", "", "RecursionError"
    assert rc == 1 and err.startswith("clearmaps: error: ") and err.count("\n") == 1, (rc, err)


NAME_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))


@fuzz(12)
@given(names=st.lists(st.text(NAME_CHARS, min_size=1, max_size=40), min_size=1, max_size=4, unique=True),
       suffix=st.sampled_from([".png", ".PNG", ".npy"]))
def test_fuzz_file_names(base, tiny, names, suffix):
    """Whatever the input files are called, every output lands in its own folder inside --out."""
    root = fresh(base)
    src, out_dir = root / "in", root / "out"
    src.mkdir()
    for i, name in enumerate(names):
        path = src / (name + suffix)
        try:
            if suffix == ".npy":
                np.save(path, digit(i))
            else:
                Image.fromarray(digit(i)).save(path, format="PNG")
        except (OSError, ValueError):  # a name this file system refuses (too long)
            pass
    files = [p for p in src.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".npy")]
    assume(files)
    before = tree(root)
    rc, out, err = run_cli(["explain", src, "--checkpoint", tiny, "--out", out_dir, "--backend", "reference",
                            "--scale", "1", "--quiet"])
    assert_promise(rc, out, err, root, before, out_dir)
    assert rc == 0, err
    folders = [p for p in out_dir.iterdir()]
    assert len(folders) == len(files) and all(p.is_dir() and not p.name.startswith(".") for p in folders)
