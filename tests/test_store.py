"""The results store of ``clearmaps explain DATASET``: what it holds equals clearmaps.explain image by image,
a chunk is complete or absent (resume after ``kill -9`` of the driver loses nothing and doubles nothing, and
ends in the same bytes as one uninterrupted run), reruns do only what is missing, other settings are refused
unless --force."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

import clearmaps
from clearmaps import builtin
from clearmaps.cli import main
from clearmaps.cli_outputs import FILES
from clearmaps.dataset_run import RunProgress

CPU = ["--backend", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def digits():
    return builtin.heldout()


def make_tree(root: Path, images, labels, picks) -> list[int]:
    """An ImageFolder tree root/<label>/<index>.png; returns the picks in the order a sorted walk lists them."""
    for i in picks:
        (root / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / str(labels[i]) / f"{i:04d}.png")
    return [i for _, i in sorted((f"{labels[i]}/{i:04d}.png", i) for i in picks)]


def store_files(root: Path) -> dict:
    """Every file of a store (not its report) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "report" not in p.relative_to(root).parts}


def assert_same_bytes(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb), sorted(set(fa) ^ set(fb))
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, differ


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_store_equals_the_api_image_by_image(tmp_path, capsys, digits):
    images, labels = digits
    net = builtin.load_model()
    picks = list(range(0, 1000, 9))  # 112 digits of every class, a few of them misclassified
    order = make_tree(tmp_path / "ds", images, labels, picks)
    out = tmp_path / "res"
    stdout = run(capsys, "explain", tmp_path / "ds", "--out", out, "--batch-size", "32", "--responses", *CPU)
    assert "imagefolder" in stdout and "4 chunk(s) of 32 images; new" in stdout

    g = zarr.open_group(str(out / "maps.zarr"), mode="r")
    table = pq.read_table(out / "images.parquet").to_pylist()
    assert [r["index"] for r in table] == list(range(len(order)))
    x = builtin.to_input(images[order])
    for start in range(0, len(order), 32):  # the same batches as the run's chunks
        ref = clearmaps.explain(net, x[start:start + 32], backend="cpu")
        stop = start + len(ref.rgb)
        np.testing.assert_array_equal(g["rgb"][start:stop], ref.rgb)
        np.testing.assert_array_equal(g["dominant_class"][start:stop], ref.dominant_class)
        np.testing.assert_array_equal(g["dominant_response"][start:stop], ref.dominant_response)
        np.testing.assert_array_equal(g["responses"][start:stop], ref.responses)
        np.testing.assert_array_equal(g["logits"][start:stop], ref.logits)
        np.testing.assert_array_equal(g["classes"][start:stop], ref.classes)
        np.testing.assert_array_equal(g["thumbnails"][start:stop, ..., 0], images[order[start:stop]])
        for b in range(stop - start):
            row, i = table[start + b], order[start + b]
            assert row["file"] == f"{labels[i]}/{i:04d}.png" and row["label"] == labels[i]
            pred = int(np.argmax(ref.logits[b]))
            assert row["predicted"] == pred and row["correct"] == (pred == labels[i])
            assert row["probability"] == pytest.approx(float(ref.probabilities[b, pred]), rel=1e-6)
            assert row["top_classes"] == np.argsort(-ref.logits[b], kind="stable")[:5].tolist()
            d = np.maximum(ref.dominant_response[b].astype(np.float64), 0)
            mine = d[ref.dominant_class[b] == labels[i]].sum() / d.sum()
            assert row["true_share"] == pytest.approx(mine, rel=1e-5, abs=1e-7)
            np.testing.assert_allclose(g["class_share"][start + b][labels[i]], mine, rtol=1e-5, atol=1e-7)
            mask = clearmaps.strong_feature_mask(ref.responses[b:b + 1, labels[i]].astype(np.float64), 0.1)
            assert row["strong_fraction"] == pytest.approx(float(mask.mean()), abs=1e-7)
            assert row["error"] is None
    assert sum(r["correct"] for r in table) < len(table)  # the set has mistakes for the report to show


def _parts(out: Path) -> int:
    return len(list((out / "table").glob("part-*.parquet"))) if (out / "table").is_dir() else 0


def test_resume_after_kill_9_loses_nothing_doubles_nothing(tmp_path, capsys, digits):
    images, labels = digits
    order = make_tree(tmp_path / "ds", images, labels, list(range(0, 1000, 2)))  # 500 digits, 50 chunks
    out, ref = tmp_path / "killed", tmp_path / "whole"
    argv = ["explain", str(tmp_path / "ds"), "--out", str(out), "--batch-size", "10", *CPU]
    proc = subprocess.Popen([sys.executable, "-m", "clearmaps", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _parts(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)  # mid-chunk: nothing gets to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = _parts(out)
    assert 3 <= done < 50 and not (out / "images.parquet").exists()
    stdout = run(capsys, *argv)
    assert f"{done} already done, resuming" in stdout and f"{len(order) - 10 * done} image(s)" in stdout
    table = pq.read_table(out / "images.parquet")
    assert table.column("index").to_pylist() == list(range(len(order)))  # every image once, in order
    run(capsys, "explain", tmp_path / "ds", "--out", ref, "--batch-size", "10", *CPU)
    assert_same_bytes(out, ref)

    # a chunk whose arrays were half written (garbage) and never committed is written again
    victim = next((out / "maps.zarr" / "rgb" / "c").rglob("*"))
    while victim.is_dir():
        victim = next(victim.iterdir())
    chunk = int(victim.relative_to(out / "maps.zarr" / "rgb" / "c").parts[0])
    victim.write_bytes(b"half a chunk")
    (out / "table" / f"part-{chunk:05d}.parquet").unlink()
    (out / "images.parquet").unlink()
    stdout = run(capsys, *argv)
    assert "explained 10 image(s), 490 already done" in stdout
    assert_same_bytes(out, ref)


def test_rerun_does_what_is_missing_and_other_settings_need_force(tmp_path, capsys, digits):
    images, labels = digits
    make_tree(tmp_path / "ds", images, labels, range(0, 1000, 40))
    (tmp_path / "ds" / "3" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "res"
    base = ["explain", tmp_path / "ds", "--out", out, "--batch-size", "8", *CPU]
    rc = main([str(a) for a in base])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.png" in err and "--skip-bad" in err
    stdout = run(capsys, *base, "--skip-bad")
    assert "1 bad image(s) skipped" in stdout and "skipped: image" in stdout and "broken.png" in stdout
    row = [r for r in pq.read_table(out / "images.parquet").to_pylist() if r["error"]]
    assert len(row) == 1 and row[0]["file"] == "3/broken.png" and row[0]["predicted"] is None
    g = zarr.open_group(str(out / "maps.zarr"), mode="r")
    assert not g["rgb"][row[0]["index"]].any()
    before = store_files(out)

    stdout = run(capsys, *base, "--skip-bad")
    assert "explained 0 image(s), 26 already done" in stdout and store_files(out) == before
    rc = main([str(a) for a in base + ["--skip-bad", "--reduce", "max"]])
    err = capsys.readouterr().err
    assert rc == 1 and "other settings (explain.reduce: 'sum' then, 'max' now)" in err and "--force" in err
    assert store_files(out) == before  # refused without touching anything
    stdout = run(capsys, *base, "--skip-bad", "--reduce", "max", "--force")
    assert "explained 26 image(s)" in stdout and store_files(out) != before


def test_png_outputs_for_a_small_dataset_and_progress_lines(tmp_path, capsys, digits):
    images, labels = digits
    make_tree(tmp_path / "ds", images, labels, [3, 500])
    out = tmp_path / "png"
    stdout = run(capsys, "explain", tmp_path / "ds", "--out", out, "--outputs", "png", *CPU)
    assert "explained 2 image(s)" in stdout
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [f"{labels[3]}--0003", f"{labels[500]}--0500"]
    assert all((out / f / name).is_file() for f in folders for name in FILES)

    text = io.StringIO()
    bar = RunProgress(total=100, done=20, quiet=False, every=0, out=text)
    bar.update(30)
    bar.close()
    line = text.getvalue()
    assert line.startswith("explaining: 50/100 images, ") and " img/s, about " in line and line.endswith(" left\n")


# ---- what each path imports ------------------------------------------------------------------------------

BLOCKED = r"""
import importlib.abc, runpy, sys

BLOCK = set(sys.argv[1].split(","))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, Blocked())
sys.argv = ["clearmaps", *sys.argv[2:]]
runpy.run_module("clearmaps.cli", run_name="__main__")
"""


@pytest.mark.parametrize("argv, message", [
    (["explain", "--top-k", "0"], "--top-k must be at least 1."),
    (["explain", "ds", "--workers", "2", "--scheduler", "tcp://h:8786"], "give --workers N"),
    (["explain", "ds", "--scheduler", "h:8786"], "--scheduler 'h:8786'; expected a Dask scheduler address"),
    (["explain", "ds", "--workers", "2", "--outputs", "png"], "--workers and --scheduler write a results store"),
    (["explain", "ds", "--short-side", "256", "--resize", "224"], "give --resize (an exact size) or --short-side"),
    (["explain", "ds", "--crop", "big"], "--crop 'big'; expected a size like 224"),
    (["report", "res", "--page-size", "0"], "--page-size must be at least 1."),
])
def test_dataset_options_fail_before_anything_heavy_is_imported(tmp_path, argv, message):
    heavy = "torch,numba,dask,distributed,zarr,pyarrow"
    proc = subprocess.run([sys.executable, "-c", BLOCKED, heavy, *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("clearmaps: error: " + message), proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_in_process_run_never_imports_dask(tmp_path, digits):
    images, labels = digits
    np.savez(tmp_path / "set.npz", images=images[:20], labels=labels[:20])
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "dask,distributed", "explain", str(tmp_path / "set.npz"),
                           "--outputs", "store", "--out", str(tmp_path / "res"), *CPU], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "explained 20 image(s)" in proc.stdout, proc.stderr
    # the control: asked for a cluster, the same run needs Dask and says so
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "dask,distributed", "explain", str(tmp_path / "set.npz"),
                           "--workers", "1", "--out", str(tmp_path / "res2"), *CPU], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "pip install 'dask[distributed]'" in proc.stderr, proc.stderr
