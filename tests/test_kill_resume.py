"""Kill test (issue 20): ``clearmaps explain`` on a few hundred images, killed at random points with SIGKILL,
SIGTERM and SIGINT, then rerun to the end. Afterwards every output is whole, nothing stale is left, and
everything was done exactly once: an image whose record was complete after one run keeps that record (the
same run wrote it) through every later run, and a last run finds nothing to do.

The first run is killed during start-up (imports, reading the model and the images); the others when a
drawn number of images has been started, a few milliseconds later, so that the signal lands among the files
of an image whatever the machine's speed. The draws come from ``CLEARMAPS_KILL_SEED`` (default fixed, so CI
sees the same schedule). About 20 s on 2 cores: six processes, four killed, one to finish, one that finds
nothing to do.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import clearmaps
from clearmaps import render
from clearmaps.cli_outputs import FILES, RECORD, _sha256, read_record

from .test_hostile_inputs import digit, tiny_checkpoint

IMAGES = 200
SEED = int(os.environ.get("CLEARMAPS_KILL_SEED", "20"))


def command(tiny: Path, inputs: Path, out: Path) -> list:
    return [sys.executable, "-m", "clearmaps", "explain", str(inputs), "--checkpoint", str(tiny), "--out", str(out),
            "--outputs", "png", "--backend", "reference", "--scale", "1", "--batch-size", "7", "--quiet"]


def whole(folder: Path) -> dict:
    """The folder's record when every output it lists is there with the recorded bytes, else None; and every
    file present, recorded or not, must be readable to the end (written atomically)."""
    for path in folder.iterdir():
        if path.name.endswith(render.TMP_SUFFIX):
            continue
        if path.suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as m:
                for key in m.files:
                    m[key]
    record = read_record(folder)
    if record is None:
        return None
    for name in FILES:
        if _sha256(folder / name) != (record["files"][name]["bytes"], record["files"][name]["sha256"]):
            return None
    return record


def snapshot(out: Path) -> dict:
    """{folder name: the run that wrote its complete record}."""
    done = {}
    if not out.is_dir():
        return done
    for folder in out.iterdir():
        if folder.is_dir():
            record = whole(folder)
            if record is not None:
                done[folder.name] = record["run"]
    return done


def temps(out: Path) -> list:
    return [p for p in out.rglob("*") if p.name.endswith(render.TMP_SUFFIX) or p.name.endswith(".tmp")]


def started(out: Path) -> int:
    """How many images a run has started (their folders exist)."""
    try:
        return sum(1 for entry in os.scandir(out) if entry.is_dir())
    except FileNotFoundError:
        return 0


def test_killed_runs_resume_to_whole_outputs_done_exactly_once(tmp_path):
    rng = random.Random(SEED)
    tiny = tiny_checkpoint(tmp_path)
    batch = np.stack([digit(i) for i in range(IMAGES)])
    np.savez(tmp_path / "digits.npz", images=batch)
    out = tmp_path / "out"
    argv = command(tiny, tmp_path / "digits.npz", out)
    first_done: dict = {}
    history = []
    for kill, sig in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGKILL)):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kill == 0:
            time.sleep(rng.uniform(0.05, 1.0))  # during start-up
        else:
            target = min(IMAGES - 20, started(out) + rng.randint(10, 45))
            deadline = time.monotonic() + 120
            while started(out) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.03))  # somewhere among that image's files
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal came: nothing was interrupted
            history.append((sig.name, "finished"))
        else:
            history.append((sig.name, proc.returncode))
            # a way out like Ctrl-C: one line, no temps. (A signal that lands while the interpreter starts or
            # exits, outside the command's handler, ends the process by its default action instead: a
            # negative status, and the outputs are checked below all the same.)
            if sig in (signal.SIGINT, signal.SIGTERM) and kill > 0 and proc.returncode > 0:
                word, status = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
                assert proc.returncode == status and f"clearmaps: {word}" in stderr, (history, stderr)
                assert "Traceback" not in stderr and not [p for p in temps(out) if f"-{proc.pid}-" in p.name]
        now = snapshot(out)
        for name, run in first_done.items():  # done once, never redone
            assert now.get(name) == run, (f"seed {SEED}: {name} was done by run {run}, now {now.get(name)}", history)
        first_done.update({k: v for k, v in now.items() if k not in first_done})
    assert len(first_done) < IMAGES, f"seed {SEED}: every image was done before the last kill ({history})"

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {len(first_done)} already done" in proc.stdout or not first_done, proc.stdout
    final = snapshot(out)
    assert len(final) == IMAGES and sorted(final) == sorted(f"digits-{i:04d}" for i in range(IMAGES))
    for name, run in first_done.items():
        assert final[name] == run, f"seed {SEED}: {name} was redone"
    assert not temps(out), f"seed {SEED}: stale temp files {temps(out)[:5]} after {history}"
    assert not any(p for p in out.rglob("*") if p.is_file() and p.parent == out)

    # a last run has nothing to do, and the outputs are the maps explain gives
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"explained 0 image(s), skipped {IMAGES}" in proc.stdout, proc.stdout
    net = clearmaps.load_checkpoint(tiny)
    picks = rng.sample(range(IMAGES), 7) + [0, IMAGES - 1]
    e = clearmaps.explain(net, (batch[picks][:, None] / 255.0).astype(np.float32), backend="reference")
    for b, i in enumerate(picks):
        with np.load(out / f"digits-{i:04d}" / "maps.npz") as m:
            np.testing.assert_array_equal(m["rgb"], e.rgb[b])
        assert (out / f"digits-{i:04d}" / RECORD).is_file()
