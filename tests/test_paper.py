"""clearmaps.paper's Python API (Fig. 3 and Table 1) on a network small enough to work out by hand.

The network: one head conv with a 1x4 kernel per class on 1x4 images, no bias, so z_c = w_c . x is one
number per class (its own logit) and the attentive response is r(x|c) = z_c * w_c (the transposed conv of
a single value; no layer below the head). With w_left = [1, .5, 0, 0] and w_right = [0, 0, .5, 1] the
strong-feature mask of a positive z_c is the kernel's support above tau: {0} (left) / {3} (right) for
tau = 0.6, {0, 1} / {2, 3} for tau = 0.3. Every expected value below follows from that by hand.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from clearmaps import ClearmapsError, Conv, Network, palette_rgb
from clearmaps.images import Preprocess
from clearmaps.paper import (TABLE1_COLUMNS, Figure3Example, classify, figure3, figure3_example, figure3_layout,
                             figure3_picks, table1)

REF = "reference"
W_LEFT, W_RIGHT = [1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def net():
    weight = np.array([W_LEFT, W_RIGHT]).reshape(2, 1, 1, 4)
    return Network([Conv(weight, np.zeros(2))], class_names=("left", "right"), input_shape=(1, 1, 4))


# image: (z_left, z_right), label, prediction; the masked images below are worked out per tau
ROWS = [([1.0, 1.0, 0.2, 0.0], 0),   # z = (1.5, 0.1): left, correct
        ([1.0, 0.0, 0.0, 0.8], 0),   # z = (1.0, 0.8): left, correct
        ([0.2, 0.0, 0.0, 1.0], 0),   # z = (0.2, 1.0): right, misclassified
        ([0.4, 0.0, 1.0, 1.0], 1)]   # z = (0.4, 1.5): right, correct


def dataset():
    pixels = np.array([r[0] for r in ROWS]).reshape(4, 1, 1, 4)
    return pixels, np.array([r[1] for r in ROWS])


def test_the_hand_worked_network_classifies_as_the_comments_say(net):
    pixels, labels = dataset()
    np.testing.assert_array_equal(classify(net, pixels), [0, 0, 1, 1])


def test_table1_on_a_network_worked_out_by_hand(net):
    pixels, labels = dataset()
    rows = table1(net, pixels, labels, taus=[0.6, 0.3], backend=REF)
    assert [tuple(r) for r in rows] == [TABLE1_COLUMNS] * 2
    # tau 0.6, black fill. only strong keeps pixel 0 (left) / 3 (right):
    #   [1,0,0,0] left ok; [1,0,0,0] left ok; [.2,0,0,0] left ok; [0,0,0,1] right ok        -> 4/4
    # without strong zeroes it:
    #   [0,1,.2,0] z=(.5,.1) ok; [0,0,0,.8] right wrong; [0,0,0,1] wrong; [.4,0,1,0] z=(.4,.5) ok -> 2/4
    # ink (> 0.5) under the masks: pixel 0 of images 1, 2; not of 3 (0.2); pixel 3 of image 4   -> 3/4
    assert rows[0] == {"tau": 0.6, "n": 4, "full": 75.0, "only_strong": 100.0, "without_strong": 50.0,
                       "strong_pixels_pct": 25.0, "strong_on_bright_pct": 75.0}
    # tau 0.3: masks {0, 1} / {2, 3}. only strong: [1,1,0,0] [1,0,0,0] [.2,0,0,0] [0,0,1,1], all right -> 4/4
    # without: [0,0,.2,0] z=(0,.1) wrong; [0,0,0,.8] wrong; [0,0,0,1] wrong; [.4,0,0,0] z=(.4,0) wrong -> 0/4
    # ink under the masks: 2 + 1 + 0 + 2 of 8 pixels
    assert rows[1] == {"tau": 0.3, "n": 4, "full": 75.0, "only_strong": 100.0, "without_strong": 0.0,
                       "strong_pixels_pct": 50.0, "strong_on_bright_pct": 62.5}


def test_table1_background_fill_in_pixel_units_through_the_preprocessing(net):
    pixels, labels = dataset()
    # tau 0.6, grey fill 0.5. only strong: [1,.5,.5,.5] z=(1.25,.75) ok; the same ok;
    #   [.2,.5,.5,.5] z=(.45,.75) wrong; [.5,.5,.5,1] z=(.75,1.25) ok                           -> 3/4
    # without: [.5,1,.2,.5] z=(1,.6) ok; [.5,0,0,.8] z=(.5,.8) wrong; [.5,0,0,1] wrong;
    #   [.4,0,1,.5] z=(.4,1) ok                                                                   -> 2/4
    grey = table1(net, pixels, labels, taus=[0.6], background=0.5, backend=REF)[0]
    assert (grey["only_strong"], grey["without_strong"]) == (75.0, 50.0)
    # the same images stored inverted and given with Preprocess(invert=True): the network sees the same
    # input, and a white fill (1.0 before inversion) is black after it; only the ink statistic, taken on the
    # pixels as given, differs
    inverted = table1(net, 1.0 - pixels, labels, taus=[0.6], background=1.0, preprocess=Preprocess(invert=True),
                      backend=REF)[0]
    black = table1(net, pixels, labels, taus=[0.6], background=0.0, backend=REF)[0]
    assert {k: v for k, v in inverted.items() if k != "strong_on_bright_pct"} == \
        {k: v for k, v in black.items() if k != "strong_on_bright_pct"}


def test_table1_reports_progress_per_batch(net):
    pixels, labels = dataset()
    seen = []
    table1(net, pixels, labels, backend=REF, batch_size=2, progress=seen.append)
    # images are explained per true class (three of class 0, one of class 1), at most two at a time
    assert sorted(seen) == [1, 1, 2] and sum(seen) == 4


@pytest.mark.parametrize("kwargs, needle", [
    (dict(taus=[1.0]), "taus=[1.0]"),
    (dict(taus=[]), "taus=[]"),
    (dict(background=2.0), "background=2.0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(backend="gpu"), "backend='gpu'"),
    (dict(progress="bar"), "progress is str"),
    (dict(preprocess="invert"), "preprocess is str"),
])
def test_table1_refuses_bad_arguments(net, kwargs, needle):
    pixels, labels = dataset()
    with pytest.raises(ClearmapsError) as exc:
        table1(net, pixels, labels, **({"backend": REF} | kwargs))
    assert needle in str(exc.value)


def test_table1_refuses_bad_data(net):
    pixels, labels = dataset()
    with pytest.raises(ClearmapsError, match=r"labels run 0 \.\. 2; the network has classes 0 \.\. 1"):
        table1(net, pixels, np.array([0, 0, 2, 1]), backend=REF)
    with pytest.raises(ClearmapsError, match=r"shape \(3,\)"):
        table1(net, pixels, labels[:3], backend=REF)
    with pytest.raises(ClearmapsError, match=r"expected pixels in\s+\[0, 1\]"):
        table1(net, pixels * 255, labels, backend=REF)
    with pytest.raises(ClearmapsError, match="pixels has 3 channels"):
        table1(net, np.repeat(pixels, 3, axis=1), labels, backend=REF)
    with pytest.raises(ClearmapsError, match="expected a clearmaps.Network"):
        table1("net", pixels, labels, backend=REF)


# ---- Fig. 3 -------------------------------------------------------------------------------------------------

def test_figure3_picks_a_correct_and_a_misclassified_example_of_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2])
    seen = {c: (set(), set()) for c in range(4)}
    for seed in range(40):
        picks = figure3_picks(labels, predicted, 4, seed)
        assert [p[0] for p in picks] == [0, 1, 2, 3]
        assert picks == figure3_picks(labels, predicted, 4, seed)  # a seed always picks the same
        for c, good, bad in picks:
            if good is not None:
                assert labels[good] == c and predicted[good] == c
                seen[c][0].add(good)
            if bad is not None:
                assert labels[bad] == c and predicted[bad] != c
                seen[c][1].add(bad)
    # every candidate is drawn by some seed; a class without such an example gets None
    assert seen == {0: ({0, 1}, {2, 3}), 1: ({4, 5}, set()), 2: ({7, 8}, {6}), 3: (set(), set())}


def test_figure3_picks_refuses_bad_input():
    with pytest.raises(ClearmapsError, match=r"labels run 0 \.\. 3; the network has classes 0 \.\. 1"):
        figure3_picks([0, 3], [0, 0], 2)
    with pytest.raises(ClearmapsError, match="predicted has shape"):
        figure3_picks([0, 1], [0], 2)
    with pytest.raises(ClearmapsError, match="seed=-1"):
        figure3_picks([0, 1], [0, 1], 2, seed=-1)


def _contains(figure: np.ndarray, block: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(figure, block.shape)
    return bool((windows == block).all(axis=(-3, -2, -1)).any())


def test_figure3_end_to_end_on_the_hand_worked_network(net):
    pixels, labels = dataset()
    fig, rows = figure3(net, pixels, labels, seed=3, backend=REF, scale=4, noun="side")
    (c0, good0, bad0), (c1, good1, bad1) = rows
    assert (c0, c1) == (0, 1)
    # class 0: images 0, 1 are right, image 2 is read as "right"; class 1: image 3, never misclassified
    assert good0.index in (0, 1) and bad0.index == 2 and good1.index == 3 and bad1 is None
    assert (good0.predicted, bad0.predicted, good1.predicted) == (0, 1, 1)
    # image 2: z = (0.2, 1.0), softmax
    assert bad0.probability == pytest.approx(np.exp(1.0) / (np.exp(0.2) + np.exp(1.0)))
    a = np.asarray(fig.convert("RGB"))
    for ex in (good0, bad0, good1):  # each example's three pictures are in the figure at 4x
        assert ex.heatmap.shape[:2] == (4, 16)  # drawn at 4x already: its hatching needs the room
        for picture in (ex.image, ex.clear):
            assert _contains(a, np.repeat(np.repeat(picture, 4, axis=0), 4, axis=1))
        assert _contains(a, ex.heatmap)
    for rgb in palette_rgb(np.arange(2) / 2):  # the legend's swatches
        assert (a.reshape(-1, 3) == rgb).all(axis=1).any()
    assert (a.reshape(-1, 3) == (225, 225, 225)).all(axis=1).sum() > 100  # the grey box for class 1


def test_figure3_refuses_bad_arguments_before_any_work(net):
    pixels, labels = dataset()
    for kwargs, needle in ((dict(seed=-1), "seed=-1"), (dict(backend="gpu"), "backend='gpu'"),
                           (dict(labels=np.array([0, 1])), r"labels has shape \(2,\)"),
                           (dict(pixels=pixels[:, :, :, :3]), "pixels has size 1x3; the network was built for 1x4")):
        args = dict(pixels=pixels, labels=labels, backend=REF) | kwargs
        with pytest.raises(ClearmapsError, match=needle):
            figure3(net, **args)


def test_figure3_example_draws_the_heatmap_of_the_true_class_wherever_it_is(net):
    rng = np.random.default_rng(0)
    responses = rng.random((3, 2, 5))
    rgb = np.zeros((2, 5, 3), np.uint8)
    probs = np.array([0.1, 0.7, 0.2])
    ex = figure3_example(7, 2, np.full((1, 2, 5), 0.5), probs, np.array([1, 2, 0]), responses, rgb)
    assert isinstance(ex, Figure3Example) and (ex.index, ex.predicted, ex.probability) == (7, 1, 0.7)
    # class 2 sits at position 1: its response against the strongest of the other two, in matplotlib's own bone
    # colour map, each map pixel a 4x4 block: solid where class 2's response is the largest, hatched (the
    # other's colour and black, both in the block) where another class beats it
    true, other = responses[1], np.maximum(responses[0], responses[2])
    level = np.maximum(true, other).max()
    against = other > true
    colour = matplotlib.colormaps["bone"](np.where(against, other, true) / level, bytes=True)[..., :3]
    assert ex.heatmap.shape == (8, 20, 3) and against.any() and not against.all()
    for (r, c), beaten in np.ndenumerate(against):
        block = ex.heatmap[4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1, 3)
        seen = {tuple(p) for p in block}
        assert seen == ({tuple(colour[r, c]), (0, 0, 0)} if beaten else {tuple(colour[r, c])}), (r, c, seen)
    assert (ex.image == 128).all()  # 0.5 grey, round half up
    with pytest.raises(ClearmapsError, match=r"expected \(C, H, W\) and uint8 \(H, W, 3\) with \(H, W\) = \(2, 5\)"):
        figure3_example(7, 2, np.zeros((1, 5, 2)), probs, np.array([1, 2, 0]), responses, rgb)
    with pytest.raises(ClearmapsError, match="without the true class 2"):
        figure3_example(7, 2, np.zeros((1, 2, 5)), probs, np.array([1, 0, 0]), responses, rgb)


def test_figure3_layout_refuses_what_it_cannot_draw():
    ex = Figure3Example(0, 0, 0, 1.0, *(np.zeros((2, 2, 3), np.uint8),) * 3)
    with pytest.raises(ClearmapsError, match="palette has 3 hues for 2 class names"):
        figure3_layout([(0, ex, None)], [0.0, 0.3, 0.6], ["a", "b"])
    with pytest.raises(ClearmapsError, match=r"class_id in 0 \.\. 1"):
        figure3_layout([(5, ex, None)], [0.0, 0.5], ["a", "b"])
    with pytest.raises(ClearmapsError, match="no example"):
        figure3_layout([(0, None, None)], [0.0, 0.5], ["a", "b"])
