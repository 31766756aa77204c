"""The evidence measures of bindings/evidence.py on cases whose answers are known without them."""

from __future__ import annotations

import numpy as np
import pytest

import clearmaps
from clearmaps import ClearmapsError, builtin, evidence
from clearmaps.reference import Conv, ReLU


def test_spearman_with_ties_and_constant_rows():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    b = np.array([[10.0, 20.0, 30.0, 45.0], [4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    got = evidence.spearman(a, b)
    # row 2 by hand: ranks (1.5, 1.5, 3, 4) and (1, 2.5, 2.5, 4); centred (-1, -1, .5, 1.5) and (-1.5, 0, 0, 1.5)
    by_hand = (1.5 + 0 + 0 + 2.25) / np.sqrt((1 + 1 + .25 + 2.25) * (2.25 + 0 + 0 + 2.25))
    np.testing.assert_allclose(got[:3], [1.0, -1.0, by_hand], rtol=1e-12)
    assert np.isnan(got[3])  # a constant map has no ranking


def _two_class_net(favourite):
    """A 1×1 conv whose class ``favourite`` gets 3·x and the other x: on positive images the favourite
    dominates every pixel."""
    w = np.ones((2, 1, 1, 1))
    w[favourite] = 3.0
    return clearmaps.Network([Conv(w, np.zeros(2)), ReLU()], input_shape=(1, 4, 4))


@pytest.mark.parametrize("method", ["deconvnet", "gradient"])
def test_true_class_share_is_one_or_zero_when_one_class_owns_the_map(method):
    x = np.random.default_rng(0).uniform(0.5, 1.0, size=(3, 1, 4, 4))
    net = _two_class_net(1)
    owned = evidence.true_class_share(net, x, np.array([1, 1, 1]), method, backend="reference")
    np.testing.assert_allclose(owned["share"], 1.0)
    assert owned["correct"].all() and owned["correct_mean"] == 1.0 and np.isnan(owned["misclassified_mean"])
    other = evidence.true_class_share(net, x, np.array([0, 0, 0]), method, backend="reference")
    np.testing.assert_allclose(other["share"], 0.0)
    assert not other["correct"].any() and other["misclassified_mean"] == 0.0


def test_randomisation_redraws_from_the_top_down():
    net = builtin.load_model()
    weighted = evidence._weighted_nodes(net)
    assert weighted[0] == len(net.layers) - 2  # the head conv (before its ReLU) comes first
    one = evidence.randomised(net, 1)
    changed = [i for i, (a, b) in enumerate(zip(net.layers, one.layers)) if a is not b]
    assert changed == [weighted[0]]
    assert not np.array_equal(one.layers[weighted[0]].weight, net.layers[weighted[0]].weight)
    np.testing.assert_allclose(one.layers[weighted[0]].weight.std(), net.layers[weighted[0]].weight.std(), rtol=0.2)
    every = evidence.randomised(net, len(weighted))
    assert all(a is not b for i, (a, b) in enumerate(zip(net.layers, every.layers)) if i in weighted)


def test_randomising_a_model_changes_a_gradient_map_and_every_row_is_there():
    images, labels = builtin.heldout()
    sel = np.arange(0, 1000, 100)
    rows = evidence.evaluate_methods(builtin.load_model(), (images[sel] / 255.0)[:, None], labels[sel],
                                     methods=["gradient"], backend="cpu", sanity_images=5)
    assert len(rows) == 1 and rows[0]["method"] == "gradient" and rows[0]["n"] == 10
    steps = rows[0]["randomisation"]
    assert len(steps) == len(evidence._weighted_nodes(builtin.load_model()))
    assert -1 <= rows[0]["spearman_all_layers"] < 0.95  # a destroyed model's gradient is not the trained one's
    assert 0 <= rows[0]["share_correct"] <= 1 and rows[0]["full"] >= 80
    with pytest.raises(ClearmapsError, match="labels must be"):
        evidence.true_class_share(builtin.load_model(), builtin.to_input(images[:2]), np.array([1, 11]))
