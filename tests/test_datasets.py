"""Datasets in (clearmaps.datasets): ImageFolder trees, globs, CSVs and .npz files listed and read a batch at
a time, Resize + CenterCrop, and every bad dataset ending in one clear error or skipped and listed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clearmaps import ClearmapsError, builtin
from clearmaps.cli import main
from clearmaps.datasets import Transform, open_dataset
from clearmaps.images import Preprocess

NAMES = tuple(str(i) for i in range(10))


@pytest.fixture(scope="module")
def digits():
    return builtin.heldout()


def tree(root, images, labels, picks):
    """An ImageFolder tree: root/<label>/<index>.png."""
    for i in picks:
        folder = root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    return root


def test_image_folder_tree_lists_class_folders_sorted_with_their_labels(tmp_path, digits):
    images, labels = digits
    picks = [0, 5, 110, 220, 905, 990]
    tree(tmp_path / "ds", images, labels, picks)
    (tmp_path / "ds" / "3" / "deeper").mkdir(parents=True)
    Image.fromarray(images[300]).save(tmp_path / "ds" / "3" / "deeper" / "x.png")
    ds = open_dataset(tmp_path / "ds", NAMES)
    assert ds.kind == "imagefolder" and len(ds) == 7
    want = sorted([(str(labels[i]), f"{labels[i]}/{i:04d}.png") for i in picks] + [("3", "3/deeper/x.png")])
    assert list(ds.names) == [name for _, name in want]
    assert ds.labels.tolist() == [int(label) for label, _ in want]
    pixels, errors = ds.read(0, len(ds), Transform(), 1, (28, 28))
    assert errors == [None] * 7
    first = int(want[0][1].split("/")[1][:4])
    np.testing.assert_array_equal(pixels[0, 0], images[first] / 255.0)


def test_glob_csv_and_npz(tmp_path, digits):
    images, labels = digits
    tree(tmp_path / "ds", images, labels, [1, 2, 150])
    ds = open_dataset(str(tmp_path / "ds" / "**" / "*.png"), NAMES)
    assert ds.kind == "glob" and len(ds) == 3 and (ds.labels == -1).all()

    (tmp_path / "list.csv").write_text("path,label\nds/0/0001.png,0\nds/1/0150.png,\nds/0/0002.png,seven\n"
                                       .replace("seven", "7"))
    ds = open_dataset(tmp_path / "list.csv", NAMES)
    assert ds.kind == "csv" and ds.labels.tolist() == [0, -1, 7]
    pixels, _ = ds.read(1, 2, Transform(), 1, (28, 28))
    np.testing.assert_array_equal(pixels[0, 0], images[150] / 255.0)

    for saver in (np.savez, np.savez_compressed):
        saver(tmp_path / "set.npz", images=images[:50], labels=labels[:50])
        ds = open_dataset(tmp_path / "set.npz", NAMES)
        assert ds.kind == "npz" and len(ds) == 50 and ds.labels.tolist() == labels[:50].tolist()
        # batches in order and out of order read the same rows as the array
        for start, stop in ((0, 16), (16, 32), (40, 50), (3, 7)):
            pixels, _ = ds.read(start, stop, Transform(), 1, (28, 28))
            np.testing.assert_array_equal(pixels[:, 0], images[start:stop] / 255.0)


def test_short_side_resize_then_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    (tmp_path / "p").mkdir()
    Image.fromarray(photo).save(tmp_path / "p" / "a.png")
    ds = open_dataset([tmp_path / "p" / "a.png"], NAMES)
    t = Transform(Preprocess(mode="grayscale"), short_side=30, crop=(28, 28))
    pixels, _ = ds.read(0, 1, t, 1, (28, 28))
    # by hand: ITU-R 601 luma, shorter side 40 -> 30 so 60 -> 45 (bilinear), crop 28x28 at top 1, left 8
    grey = (photo / 255.0) @ np.array([0.299, 0.587, 0.114])
    small = np.asarray(Image.fromarray(grey.astype(np.float32)).resize((45, 30), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(pixels[0, 0], small[1:29, 8:36], rtol=0, atol=1e-6)
    with pytest.raises(ClearmapsError, match="smaller than the crop 50x50"):
        ds.read(0, 1, Transform(Preprocess(mode="grayscale"), crop=(50, 50)), 1, (50, 50))
    with pytest.raises(ClearmapsError, match="not both"):
        Transform(Preprocess(resize=(28, 28)), short_side=30)


def test_bad_datasets_one_clear_error_each_or_skipped_and_listed(tmp_path, digits):
    images, labels = digits
    root = tree(tmp_path / "ds", images, labels, [0, 1, 110])
    (root / "5").mkdir()  # an empty class folder
    with pytest.raises(ClearmapsError, match=r"class folder .*ds/5' holds no images.*--skip-bad leaves"):
        open_dataset(root, NAMES)
    ds = open_dataset(root, NAMES, skip_bad=True)
    assert len(ds) == 3 and any("ds/5'" in s and "holds no images" in s for s in ds.skipped)
    (root / "5").rmdir()

    (root / "cat").mkdir()  # a label the model does not have
    Image.fromarray(images[2]).save(root / "cat" / "c.png")
    with pytest.raises(ClearmapsError, match=r"class folder .*ds/cat' is not one of the model's classes"):
        open_dataset(root, NAMES)
    assert any("ds/cat'" in s for s in open_dataset(root, NAMES, skip_bad=True).skipped)
    (root / "cat" / "c.png").unlink()
    (root / "cat").rmdir()

    (root / "1" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = open_dataset(root, NAMES)
    with pytest.raises(ClearmapsError, match=r"broken\.png.*could not be read.*--skip-bad"):
        ds.read(0, len(ds), Transform(), 1, (28, 28))
    pixels, errors = ds.read(0, len(ds), Transform(), 1, (28, 28), skip_bad=True)
    bad = [i for i, e in enumerate(errors) if e is not None]
    assert [ds.names[i] for i in bad] == ["1/broken.png"] and not pixels[bad[0]].any()

    (tmp_path / "nolabel.csv").write_text("path\nds/0/0000.png\n")
    with pytest.raises(ClearmapsError, match=r"needs a header with the columns 'path' and 'label' \(missing: 'label'\)"):
        open_dataset(tmp_path / "nolabel.csv", NAMES)
    (tmp_path / "unknown.csv").write_text("path,label\nds/0/0000.png,0\nds/0/0001.png,zebra\n")
    with pytest.raises(ClearmapsError, match=r"line 3: label 'zebra' is not one of the model's classes"):
        open_dataset(tmp_path / "unknown.csv", NAMES)
    assert len(open_dataset(tmp_path / "unknown.csv", NAMES, skip_bad=True)) == 1

    np.savez(tmp_path / "wrong.npz", images=images[:4], labels=np.array([0, 1, 2, 12]))
    with pytest.raises(ClearmapsError, match=r"labels run 0 \.\. 12; the model has classes 0 \.\. 9"):
        open_dataset(tmp_path / "wrong.npz", NAMES)
    np.savez(tmp_path / "trunc.npz", images=images[:40])
    data = (tmp_path / "trunc.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ClearmapsError, match="trunc.npz"):
        ds = open_dataset(tmp_path / "trunc.npz", NAMES)
        ds.read(0, 40, Transform(), 1, (28, 28))
    with pytest.raises(ClearmapsError, match="matches no images"):
        open_dataset(str(tmp_path / "nothing" / "*.png"), NAMES)


def test_cli_bad_dataset_errors_are_one_line(tmp_path, capsys, digits):
    images, labels = digits
    root = tree(tmp_path / "ds", images, labels, [0, 110])
    (root / "7").mkdir()
    rc = main(["explain", str(root), "--out", str(tmp_path / "o"), "--backend", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("clearmaps: error: class folder") and err.count("\n") == 1, err
    (tmp_path / "bad.csv").write_text("file,label\na.png,1\n")
    rc = main(["explain", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o"), "--backend", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "missing: 'path'" in err and err.count("\n") == 1, err
