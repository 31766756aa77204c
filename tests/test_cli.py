"""The ``clearmaps`` command end to end (demo, explain, evaluate), through its real entry points, on small
inputs with the NumPy reference backend; and every bad input ending in one message and a non-zero exit."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clearmaps
from clearmaps import builtin
from clearmaps.cli import cli_words, main
from clearmaps.cli_outputs import FILES
from clearmaps.paper import classify

REF = ["--backend", "reference"]


@pytest.fixture(scope="module")
def digits():
    images, labels = builtin.heldout()
    return images, labels


def run_main(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(capsys, argv, *needles):
    rc, out, err = run_main(capsys, *argv)
    assert rc == 1, (rc, out, err)
    assert err.startswith("clearmaps: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err + out, err
    for n in needles:
        assert n in err, (n, err)
    return err


def save_png(path, array):
    Image.fromarray(array).save(path)
    return path


# ---- demo -----------------------------------------------------------------------------------------------

def test_demo_writes_figure3_and_per_image_outputs_then_skips_on_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    # a pool of 100 held-out digits keeps the run small; most digits then have no misclassified example
    rc, stdout, _ = run_main(capsys, "demo", "--out", str(out), "--limit", "100", "--quiet", *REF)
    assert rc == 0
    fig = Image.open(out / "figure3.png")
    assert fig.mode == "RGB" and fig.width > 600 and fig.height > 10 * 112
    examples = sorted(p.name for p in (out / "images").iterdir())
    assert sum("correct" in e and "misclassified" not in e for e in examples) == 10  # one per digit
    for e in examples:
        assert all((out / "images" / e / f).is_file() for f in FILES)
    n_mis = sum("misclassified" in e for e in examples)
    pixels = np.asarray(fig).reshape(-1, 3)
    # the legend shows all ten palette colours
    for rgb in clearmaps.palette_rgb(np.arange(10) / 10):
        assert (pixels == rgb).all(axis=1).any(), rgb
    if n_mis < 10:  # a digit without a misclassified example gets a grey box saying so
        assert "no misclassified example exists for digit(s)" in stdout
        assert (pixels == (225, 225, 225)).all(axis=1).sum() > 1000
    assert f"per-image outputs for {len(examples)} examples" in stdout
    # each example's saved maps agree with its folder name
    for e in examples:
        with np.load(out / "images" / e / "maps.npz") as m:
            digit, pred = int(e[5]), int(np.argmax(m["logits"]))
            assert int(m["true_class"]) == digit
            assert (pred == digit) == ("-correct-" in e)

    rc, stdout, _ = run_main(capsys, "demo", "--out", str(out), "--limit", "100", "--quiet", *REF)
    assert rc == 0 and f"(0 explained, {len(examples)} already done)" in stdout


# ---- explain ----------------------------------------------------------------------------------------------

def test_explain_pngs_folders_and_npz_batches(tmp_path, capsys, digits):
    images, labels = digits
    src = tmp_path / "in"
    src.mkdir()
    save_png(src / "a.png", images[0])
    save_png(src / "b.png", images[500])
    np.savez(tmp_path / "batch.npz", images=images[[100, 900]], labels=labels[[100, 900]])
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "explain", str(src), str(tmp_path / "batch.npz"), "--out", str(out), *REF)
    assert rc == 0, stdout
    assert "preprocessing for a 1-channel model:" in stdout and "/ 255 -> [0, 1]" in stdout
    assert "explained 4 image(s)" in stdout and "2/2 correctly classified" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a", "b", "batch-0000", "batch-0001"]
    # the saved maps are what clearmaps.explain gives for the same input
    x = builtin.to_input(images[[0, 500, 100, 900]])
    ref = clearmaps.explain(builtin.load_model(), x, backend="reference")
    for b, name in enumerate(names):
        for f in FILES:
            assert (out / name / f).is_file()
        with np.load(out / name / "maps.npz") as m:
            np.testing.assert_array_equal(m["rgb"], ref.rgb[b])
            np.testing.assert_array_equal(m["dominant_class"], ref.dominant_class[b])
            np.testing.assert_allclose(m["responses"], ref.responses[b], rtol=1e-6, atol=1e-6)
            assert int(m["true_class"]) == (-1 if name in "ab" else labels[[100, 900]][b - 2])
        clear = np.asarray(Image.open(out / name / "clear.png"))
        assert clear.shape == (224, 224, 3)  # 28x28 upscaled x8, nearest neighbour
        np.testing.assert_array_equal(clear[::8, ::8], ref.rgb[b])
    # a rerun skips what is done; --force redoes it
    rc, stdout, _ = run_main(capsys, "explain", str(src), "--out", str(out), *REF)
    assert rc == 0 and "explained 0 image(s), skipped 2 already done" in stdout
    rc, stdout, _ = run_main(capsys, "explain", str(src / "a.png"), "--out", str(out), "--force", *REF)
    assert rc == 0 and "explained 1 image(s)" in stdout and "skipped" not in stdout


def test_explain_classes_top_k_and_changed_settings(tmp_path, capsys, digits):
    images, _ = digits
    png = save_png(tmp_path / "seven.png", images[700])
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--out", str(out), "--classes", "7,1", "--true-label",
                             "7", *REF)
    assert rc == 0, stdout
    with np.load(out / "seven" / "maps.npz") as m:
        assert m["classes"].tolist() == [7, 1] and m["responses"].shape == (2, 28, 28)
        assert set(np.unique(m["dominant_class"])) <= {7, 1}
    # other settings are not "already done": the image is explained again
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--out", str(out), "--top-k", "3", *REF)
    assert rc == 0 and "explained 1 image(s)" in stdout
    with np.load(out / "seven" / "maps.npz") as m:
        logits = m["logits"]
        assert m["classes"].tolist() == np.argsort(-logits, kind="stable")[:3].tolist()


def test_resize_and_colour_conversion_on_request(tmp_path, capsys, digits):
    images, _ = digits
    big = np.asarray(Image.fromarray(images[300]).resize((56, 56), Image.Resampling.BILINEAR))
    rgb = save_png(tmp_path / "rgb.png", np.stack([big] * 3, axis=-1))
    err = assert_error(capsys, ["explain", str(rgb), "--out", str(tmp_path / "o"), *REF], "RGB (3 channels)",
                       "takes grayscale", "--grayscale")
    assert "--resize 28" in err
    err = assert_error(capsys, ["explain", str(rgb), "--grayscale", "--out", str(tmp_path / "o"), *REF],
                       "56x56", "takes 28x28", "--resize 28")
    rc, stdout, _ = run_main(capsys, "explain", str(rgb), "--grayscale", "--resize", "28", "--out",
                             str(tmp_path / "o"), *REF)
    assert rc == 0 and "converted to grayscale" in stdout and "resized to 28x28" in stdout
    assert "predicted 3" in stdout  # a 3, blown up and back down, is still read as a 3


# ---- evaluate ---------------------------------------------------------------------------------------------

def test_evaluate_table1_on_a_small_subset(tmp_path, capsys, digits):
    out = tmp_path / "ev"
    rc, stdout, _ = run_main(capsys, "evaluate", "--limit", "20", "--tau", "0.2", "0.6", "--out", str(out),
                             "--quiet", *REF)
    assert rc == 0, stdout
    assert "paper, MNIST (other data/model)" in stdout and "99.26" in stdout
    rows = list(csv.DictReader(open(out / "table1.csv")))
    report = json.loads((out / "table1.json").read_text())
    assert [float(r["tau"]) for r in rows] == [0.2, 0.6] and report["paper_mnist_row"]["full"] == 99.26
    # recompute the protocol from the public pieces for the same 20 digits
    images, labels = digits
    keep = np.unique(np.linspace(0, len(labels) - 1, 20).round().astype(int))
    net = builtin.load_model()
    x = builtin.to_input(images[keep]).astype(np.float64)
    r_true = np.stack([clearmaps.explain(net, x[i:i + 1], classes=[int(labels[k])], backend="reference")
                       .responses[0, 0] for i, k in enumerate(keep)])
    full = classify(net, x)
    for row in report["rows"]:
        mask = clearmaps.strong_feature_mask(r_true, row["tau"])
        only = classify(net, clearmaps.keep_strong(x, mask, 0.0))
        without = classify(net, clearmaps.remove_strong(x, mask, 0.0))
        assert row["n"] == 20
        assert row["full"] == pytest.approx(100 * np.mean(full == labels[keep]))
        assert row["only_strong"] == pytest.approx(100 * np.mean(only == labels[keep]))
        assert row["without_strong"] == pytest.approx(100 * np.mean(without == labels[keep]))
        assert row["strong_pixels_pct"] == pytest.approx(100 * mask.mean())
    assert report["rows"][0]["strong_pixels_pct"] > report["rows"][1]["strong_pixels_pct"]


def test_evaluate_on_a_labelled_npz(tmp_path, capsys, digits):
    images, labels = digits
    np.savez(tmp_path / "set.npz", images=images[::100], labels=labels[::100])
    rc, stdout, _ = run_main(capsys, "evaluate", "--data", str(tmp_path / "set.npz"), "--out", str(tmp_path / "e"),
                             "--quiet", *REF)
    assert rc == 0 and "10 images" in stdout
    np.savez(tmp_path / "nolabels.npz", images=images[:3])
    assert_error(capsys, ["evaluate", "--data", str(tmp_path / "nolabels.npz"), "--out", str(tmp_path / "e"), *REF],
                 "no labels")
    assert_error(capsys, ["evaluate", "--tau", "1.5", "--out", str(tmp_path / "e"), *REF], "--tau 1.5")


# ---- bad inputs -------------------------------------------------------------------------------------------

def test_bad_inputs_each_give_one_message_and_exit_1(tmp_path, capsys, digits):
    images, _ = digits
    good = save_png(tmp_path / "good.png", images[0])
    out = str(tmp_path / "out")
    assert_error(capsys, ["explain", str(tmp_path / "missing.png"), "--out", out], "does not exist")
    (tmp_path / "junk.png").write_text("not a picture")
    assert_error(capsys, ["explain", str(tmp_path / "junk.png"), "--out", out], "could not be read")
    (tmp_path / "empty").mkdir()
    assert_error(capsys, ["explain", str(tmp_path / "empty"), "--out", out], "holds no images")
    np.save(tmp_path / "floats.npy", np.full((2, 28, 28), 3.0))
    assert_error(capsys, ["explain", str(tmp_path / "floats.npy"), "--out", out], "[0, 1]")
    assert_error(capsys, ["explain", str(good), "--classes", "cat", "--out", out], "unknown class name 'cat'")
    assert_error(capsys, ["explain", str(good), "--classes", "12", "--out", out], "out of range")
    assert_error(capsys, ["explain", str(good), "--true-label", "dog", "--out", out], "'dog' is not a class name")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_error(capsys, ["explain", str(good), "--out", str(blocker / "sub")], "cannot write to output folder")
    assert_error(capsys, ["explain", str(good), "--out", str(blocker)], "is a file")
    # a checkpoint that does not match the architecture it is read with
    assert_error(capsys, ["explain", str(good), "--checkpoint", str(builtin.WEIGHTS), "--arch", "vgg16-fcn",
                          "--out", out], "does not match the architecture")
    small = clearmaps.build_module([{"type": "conv", "name": "c", "in": 1, "out": 10, "kernel": 3}])
    clearmaps.save_checkpoint(tmp_path / "small.safetensors", small, class_names=[str(i) for i in range(10)])
    assert_error(capsys, ["explain", str(good), "--checkpoint", str(tmp_path / "small.safetensors"), "--arch",
                          "allcnn-mnist", "--out", out], "does not match the architecture")
    assert_error(capsys, ["explain", str(good), "--checkpoint", str(tmp_path / "nope.pt"), "--out", out],
                 "does not exist")
    assert_error(capsys, ["explain", "--checkpoint", str(tmp_path / "small.safetensors"), "--out", out],
                 "no images given")
    # none of the failed runs left a picture behind
    assert not Path(out).exists() or not list(Path(out).glob("**/*.png"))


def test_checkpoint_with_its_own_arch_and_class_names(tmp_path, capsys, digits):
    images, _ = digits
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit-{i}" for i in range(10)) + "\n")
    good = save_png(tmp_path / "good.png", images[0])
    rc, stdout, _ = run_main(capsys, "explain", str(good), "--checkpoint", str(builtin.WEIGHTS), "--class-names",
                             str(names), "--classes", "digit-0,digit-6", "--out", str(tmp_path / "o"), *REF)
    assert rc == 0 and "predicted digit-0" in stdout
    with np.load(tmp_path / "o" / "good" / "maps.npz") as m:
        assert m["classes"].tolist() == [0, 6] and m["class_names"][6] == "digit-6"


def test_python_dash_m_and_console_script_are_the_same_command(tmp_path, digits):
    images, _ = digits
    np.save(tmp_path / "one.npy", images[0])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "clearmaps", "explain", str(tmp_path / "one.npy"), "--out",
                           str(tmp_path / "o"), *REF], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "explained 1 image(s)" in proc.stdout
    exe = Path(sys.executable).with_name("clearmaps")
    if not exe.exists():
        pytest.fail(f"the console script {exe} is missing: pip install -e . should have made it")
    proc = subprocess.run([str(exe), "explain", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("clearmaps: error:") and "Traceback" not in proc.stderr


def test_bad_usage_exits_2_with_argparse_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--no-such-flag"])
    assert exc.value.code == 2 and "usage:" in capsys.readouterr().err


# ---- arguments are checked before anything heavy is imported ----------------------------------------------

# Runs the command as `python -m clearmaps.cli` would, with torch and Numba made unimportable: a bad argument
# must still end in argparse's usage line or one `clearmaps: error:` line, which shows that the arguments are
# checked before either is imported (issue 19: a typo used to wait ~2-3.5 s for them)
WITHOUT_TORCH = r"""
import importlib.abc, runpy, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numba"):
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, Blocked())
sys.argv = ["clearmaps", *sys.argv[1:]]
runpy.run_module("clearmaps.cli", run_name="__main__")
"""


def run_without_torch(*argv, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("argv, rc, message", [
    (["explain", "--top-k", "0"], 2, "clearmaps: error: --top-k must be at least 1."),
    (["explain", "--no-such-flag"], 2, "clearmaps: error: unrecognized arguments: --no-such-flag"),
    (["evaluate", "--backend", "gpu"], 2, "clearmaps evaluate: error: argument --backend: invalid choice: 'gpu'"),
    (["evaluate", "--tau", "1.5"], 1, "clearmaps: error: --tau 1.5; tau is a fraction"),
    (["explain", "--vmax", "p200"], 1, "clearmaps: error: --vmax p200; expected a positive number"),
    (["explain", "--std", "0"], 1, "clearmaps: error: --std 0.0; every std must be positive."),
    (["explain", "--classes", "3", "--top-k", "2"], 1, "clearmaps: error: give --classes or --top-k, not both."),
    (["explain", "--arch", "vgg16-fcn"], 1, "clearmaps: error: --arch and --class-names describe a --checkpoint"),
    (["explain", "--palette", "rainbow"], 1, "clearmaps: error: --palette rainbow; expected hues"),
    (["demo", "--palette", "0.2,1.5"], 1, "clearmaps: error: --palette 0.2,1.5; expected hues"),
    (["explain", "--palette", "colorblind", "--outputs", "store"], 1, "clearmaps: error: --palette colours the "
                                                                      "per-image pictures"),
])
def test_bad_arguments_fail_before_torch_or_numba_is_imported(tmp_path, argv, rc, message):
    proc = run_without_torch(*argv, cwd=tmp_path)
    assert proc.returncode == rc, proc.stderr
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith(message), proc.stderr
    # exit 2: argparse's usage (a subcommand's may wrap over several lines), then the error; exit 1: one line
    assert lines[0].startswith("usage: clearmaps") if rc == 2 else len(lines) == 1, lines
    assert not list(tmp_path.iterdir())  # no output folder was made


def test_the_torch_blocker_bites(tmp_path):
    # the control: a good command needs torch, and under the blocker it cannot get it
    proc = run_without_torch("evaluate", "--limit", "2", "--out", str(tmp_path / "e"), cwd=tmp_path)
    assert proc.returncode != 0 and "is blocked for this test" in proc.stderr, proc.stderr


# ---- errors in the command line's words ---------------------------------------------------------------------

def test_errors_from_the_python_api_are_reworded_as_options(tmp_path, capsys, digits):
    import torch

    images, _ = digits
    good = save_png(tmp_path / "good.png", images[0])
    out = str(tmp_path / "out")
    # a state dict that does not say its architecture: load_checkpoint says "pass arch="
    small = clearmaps.build_module([{"type": "conv", "name": "c", "in": 1, "out": 10, "kernel": 3}])
    torch.save(small.state_dict(), tmp_path / "bare.pt")
    err = assert_error(capsys, ["explain", str(good), "--checkpoint", str(tmp_path / "bare.pt"), "--out", out],
                       "give --arch one of")
    assert "arch=" not in err
    err = assert_error(capsys, ["explain", str(good), "--checkpoint", str(tmp_path / "bare.pt"), "--arch",
                                "no-such-preset", "--out", out], "--arch 'no-such-preset' is neither a preset")
    err = assert_error(capsys, ["explain", str(good), "--top-k", "20", "--out", out, *REF],
                       "--top-k 20 asks for the 20 most likely classes", "use --top-k 1 .. 10")
    # the backend's messages, as the Python API gives them (the CLI cannot reach these two: it passes NumPy
    # arrays and names only known backends)
    net = builtin.load_model()
    for call in (lambda: clearmaps.explain(net, torch.zeros(1, 1, 28, 28), backend="cuda"),
                 lambda: clearmaps.get_backend("gpu")):
        with pytest.raises(clearmaps.ClearmapsError) as exc:
            call()
        assert "backend=" in str(exc.value)  # the API's words ...
        worded = cli_words(str(exc.value))
        assert "backend=" not in worded and ("--backend gpu" in worded or "--backend cpu or --backend auto" in worded)
    # ... and text that only looks similar is left alone
    for text in ("Conv.stride is (0, 1)", "features.0 has groups=2, dilation=(1, 1)",
                 "backend 'cuda' is not available"):
        assert cli_words(text) == text
    assert cli_words("classes='top20' asks for the top 20") == "--top-k 20 asks for the top 20"
    assert cli_words("mean=(1.0, nan); expected finite numbers.") == "--mean 1.0 nan; expected finite numbers."


# ---- a user's own torch model (--model MODULE:FACTORY) -----------------------------------------------------

_OWN_MODEL = '''
import torch, torch.nn as nn, torch.nn.functional as F


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        y = F.relu(self.b(y) + y)  # a skip connection and functional ReLUs: the chain could not take this
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def build():
    torch.manual_seed(3)
    return Residual()
'''


def test_explain_with_a_users_own_torch_model(tmp_path, capsys, digits):
    """--model file.py:factory with --checkpoint its state dict: the maps are those of clearmaps.explain on
    from_torch of the same module with the same weights."""
    import torch

    (tmp_path / "own.py").write_text(_OWN_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import own  # noqa: F401  (the same file the CLI loads, for the expected maps)
        module = own.build()
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(1.5)  # weights that differ from the factory's own, so the checkpoint must be read
            module.bn.running_mean.uniform_(-0.5, 0.5)
        torch.save(module.state_dict(), tmp_path / "w.pt")
    finally:
        sys.path.remove(str(tmp_path))
    png = save_png(tmp_path / "seven.png", digits[0][np.flatnonzero(digits[1] == 7)[0]])
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--model", f"{tmp_path / 'own.py'}:build", "--checkpoint",
                             str(tmp_path / "w.pt"), "--out", str(out), "--quiet", *REF)
    assert rc == 0 and "own.py:build with weights" in stdout
    got = np.load(out / "seven" / "maps.npz")
    want = clearmaps.explain(clearmaps.from_torch(module), builtin.to_input(digits[0][np.flatnonzero(digits[1] == 7)[:1]]),
                             backend="reference")
    np.testing.assert_allclose(got["logits"], want.logits[0], rtol=1e-5)
    np.testing.assert_array_equal(got["dominant_class"], want.dominant_class[0])


def test_bad_own_models_get_one_clear_error(tmp_path, capsys):
    (tmp_path / "own.py").write_text(_OWN_MODEL + "\ndef broken():\n    raise RuntimeError('no weights here')\n")
    png = save_png(tmp_path / "d.png", np.zeros((28, 28), np.uint8))
    out = str(tmp_path / "o")
    own = f"{tmp_path / 'own.py'}"
    assert_error(capsys, ["explain", str(png), "--model", "own", "--out", out], "expected MODULE:FACTORY")
    assert_error(capsys, ["explain", str(png), "--model", "no_such_module_here:build", "--out", out],
                 "importing 'no_such_module_here' failed (ModuleNotFoundError")
    assert_error(capsys, ["explain", str(png), "--model", f"{own}:nothing", "--out", out], "has no function or class")
    assert_error(capsys, ["explain", str(png), "--model", f"{own}:broken", "--out", out],
                 "calling the factory failed (RuntimeError: no weights here)")
    assert_error(capsys, ["explain", str(png), "--model", f"{own}:build", "--arch", "allcnn-mnist", "--out", out],
                 "not both")
    import torch

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    assert_error(capsys, ["explain", str(png), "--model", f"{own}:build", "--checkpoint", str(tmp_path / "bad.pt"),
                          "--out", out], "does not match the architecture", "missing keys")


# ---- response methods on the command line ------------------------------------------------------------------

def test_explain_method_is_what_the_api_gives(tmp_path, capsys, digits):
    png = save_png(tmp_path / "three.png", digits[0][np.flatnonzero(digits[1] == 3)[0]])
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--method", "gradient", "--out", str(out), "--quiet", *REF)
    assert rc == 0 and "method=gradient" in stdout
    want = clearmaps.explain(builtin.load_model(), builtin.to_input(digits[0][np.flatnonzero(digits[1] == 3)[:1]]),
                             backend="reference", method="gradient")
    with np.load(out / "three" / "maps.npz") as m:
        np.testing.assert_array_equal(m["rgb"], want.rgb[0])
    # another method is another setting: the rerun redoes the image instead of skipping it
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--method", "guided", "--out", str(out), "--quiet", *REF)
    assert rc == 0 and "explained 1 image(s)" in stdout
    assert_error(capsys, ["explain", str(png), "--method", "guided", "--no-rectify", "--out", str(out)],
                 "--no-rectify applies to --method deconvnet")


def test_evaluate_every_method(tmp_path, capsys):
    out = tmp_path / "ev"
    rc, stdout, _ = run_main(capsys, "evaluate", "--method", "all", "--limit", "30", "--sanity-images", "4",
                             "--out", str(out), "--quiet", "--backend", "cpu")
    assert rc == 0
    rows = list(csv.DictReader(open(out / "evidence.csv")))
    assert [r["method"] for r in rows] == ["deconvnet", "guided", "gradient", "input_x_gradient"]
    for r in rows:
        assert 0 <= float(r["share_correct"]) <= 1 and -1 <= float(r["spearman_all_layers"]) <= 1
        assert r["method"] in stdout
    assert json.loads((out / "evidence.json").read_text())["rows"][0]["randomisation"]


# ---- pictures a reader cannot misread (issue 19) ------------------------------------------------------------

def test_class_colours_follow_the_class_and_the_palette_option(tmp_path, capsys, digits):
    images, labels = digits
    png = save_png(tmp_path / "four.png", images[int(np.flatnonzero(labels == 4)[0])])
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--top-k", "3", "--out", str(out), "--quiet", *REF)
    assert rc == 0 and "palette=hues" in stdout
    with np.load(out / "four" / "maps.npz") as m:
        np.testing.assert_allclose(m["hues"], m["classes"] / 10)  # class c of 10 has hue c/10, whatever its rank
    rc, stdout, _ = run_main(capsys, "explain", str(png), "--palette", "colorblind", "--out", str(out), "--quiet",
                             *REF)
    assert rc == 0 and "palette=colorblind" in stdout and "explained 1 image(s)" in stdout  # a new setting
    legend = np.asarray(Image.open(out / "four" / "legend.png").convert("RGB")).reshape(-1, 3)
    from clearmaps.palettes import COLORBLIND_720

    for rgb in clearmaps.palette_rgb(np.array(COLORBLIND_720[10]) / 720):
        assert (legend == rgb).all(axis=1).sum() >= 100, rgb  # a swatch of each class
    rc, _, _ = run_main(capsys, "explain", str(png), "--classes", "4,9", "--palette", "0.3,0.8", "--out", str(out),
                        "--quiet", *REF)
    with np.load(out / "four" / "maps.npz") as m:
        assert rc == 0 and m["hues"].tolist() == [0.3, 0.8]


def test_the_overlay_is_drawn_on_the_users_image_at_its_own_size(tmp_path, capsys, digits):
    images, labels = digits
    big = Image.fromarray(255 - images[int(np.flatnonzero(labels == 6)[0])]).resize((150, 120))  # ink on paper
    big.save(tmp_path / "six.png")
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "explain", str(tmp_path / "six.png"), "--resize", "28", "--out", str(out), *REF)
    assert rc == 0 and "hint: 1 of 1 image(s) (six) reach the model with a light background" in stdout
    assert "add --invert" in stdout
    overlay = np.asarray(Image.open(out / "six" / "overlay.png").convert("RGB"))
    assert overlay.shape == (120, 150, 3)
    assert overlay[0, 0].tolist() == [255, 255, 255] or overlay[0, 0].min() > 200  # the paper stays light
    rc, stdout, _ = run_main(capsys, "explain", str(tmp_path / "six.png"), "--resize", "28", "--invert", "--out",
                             str(out), *REF)
    assert rc == 0 and "hint:" not in stdout
