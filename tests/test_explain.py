"""explain(): class selection, what it returns, and one clear error for every bad input."""

from __future__ import annotations

import numpy as np
import pytest

import clearmaps
from clearmaps import ClearmapsError
from clearmaps import reference as ref
from clearmaps.reference import Add, Affine, Cat, Conv, MaxPool, Network, Reduce, ReLU


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(0)
    return Network([Conv(rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4), 1, 1), ReLU(), MaxPool(3, 2, 1),
                    Conv(rng.normal(size=(5, 4, 3, 3)), rng.normal(size=5), 1, 1)],
                   class_names=["cat", "dog", "fox", "owl", "yak"], input_shape=(2, None, None))


def explain_ref(*args, **kwargs):
    """explain on the float64 reference, which these tests compare with the reference's own pieces."""
    return clearmaps.explain(*args, **{"backend": "reference", **kwargs})


def test_the_default_backend_is_auto(net, x, monkeypatch):
    """The Python API is fast by default (issue 15): a NumPy batch goes to the Numba CPU backend, and the
    float64 oracle is one argument away."""
    import clearmaps.kernels.cpu as cpu

    calls = []
    real = cpu.clear_from_trace
    monkeypatch.setattr(cpu, "clear_from_trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = clearmaps.explain(net, x)
    assert calls and fast.responses.dtype == np.float32
    assert explain_ref(net, x).responses.dtype == np.float64


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).normal(size=(3, 2, 9, 8))


def test_explain_assembles_the_reference_pieces(net, x):
    out = explain_ref(net, x)
    responses = ref.attentive_responses(net, x)
    index, response = ref.dominant(responses)
    np.testing.assert_array_equal(out.responses, responses)
    np.testing.assert_array_equal(out.classes, np.tile(np.arange(5), (3, 1)))
    np.testing.assert_array_equal(out.dominant_class, index)
    np.testing.assert_array_equal(out.dominant_response, response)
    np.testing.assert_array_equal(out.rgb, ref.compose(index, response, num_classes=5))
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0)
    assert out.rgb.dtype == np.uint8 and out.rgb.shape == (3, 9, 8, 3)
    assert out.predicted.tolist() == out.logits.argmax(axis=1).tolist()


def test_classes_by_name_id_and_order(net, x):
    out = explain_ref(net, x, classes=["owl", 0, "dog"])
    assert out.classes[0].tolist() == [3, 0, 1]
    all_maps = explain_ref(net, x).responses
    np.testing.assert_array_equal(out.responses, all_maps[:, [3, 0, 1]])
    # dominant_class holds class ids, not positions
    assert set(np.unique(out.dominant_class)) <= {3, 0, 1}
    assert explain_ref(net, x, classes="fox").classes.tolist() == [[2]] * 3


def test_per_image_classes_as_a_2d_array(net, x):
    rows = np.array([[4, 0], [1, 2], [3, 3 - 3]])
    out = explain_ref(net, x, classes=rows)
    np.testing.assert_array_equal(out.classes, rows)
    full = explain_ref(net, x).responses
    for b in range(3):
        np.testing.assert_array_equal(out.responses[b], full[b, rows[b]])
    again = explain_ref(net, x, classes=out.classes)  # what an Explanation gives back goes back in
    np.testing.assert_array_equal(again.rgb, out.rgb)
    with pytest.raises(ClearmapsError, match=r"one row per image: shape \(3, K\)"):
        explain_ref(net, x, classes=rows[:2])


def test_top_k_follows_each_images_logits(net, x):
    out = explain_ref(net, x, classes="top2")
    order = np.argsort(-out.logits, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out.classes, order)
    full = explain_ref(net, x).responses
    for b in range(3):
        np.testing.assert_array_equal(out.responses[b], full[b, order[b]])
    assert explain_ref(net, x, classes="top-5").classes.shape == (3, 5)


def test_palette_and_vmax_reach_the_composite(net, x):
    hues = [0.1, 0.3, 0.5, 0.7, 0.9]
    out = explain_ref(net, x, palette=hues, vmax="batch")
    idx = np.argmax(out.responses, axis=1)
    np.testing.assert_array_equal(out.rgb, ref.compose(idx, out.dominant_response, hues, "batch"))


def test_keep_responses_false_drops_only_the_maps(net, x):
    a = explain_ref(net, x, keep_responses=False)
    b = explain_ref(net, x)
    assert a.responses is None
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.dominant_class, b.dominant_class)


@pytest.mark.parametrize("reduce", ["sum", "max", "norm"])
@pytest.mark.parametrize("rectify", [True, False])
def test_options_pass_through(net, x, reduce, rectify):
    out = explain_ref(net, x, reduce=reduce, rectify=rectify)
    want = ref.reduce_channels(ref.backproject(net, ref.forward(net, x), None, rectify), reduce)
    np.testing.assert_array_equal(out.responses, want)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 9, 8)), r"rank 3\); expected rank 4 .* add a batch axis: x\[None\]"),
    (np.zeros((1, 3, 9, 8)), "has 3 channels"),
    (np.zeros((1, 2, 9, 8), dtype=np.uint8), "dtype uint8; expected floating point"),
    (np.zeros((1, 2, 9, 8), dtype=np.float16), "float32 or float64"),
    (np.full((1, 2, 9, 8), np.nan), "NaN or Inf"),
    (np.full((1, 2, 9, 8), np.inf), "NaN or Inf"),
    (np.broadcast_to(np.float64(np.nan), (1, 2, 9, 8)), "NaN or Inf"),  # one value, every stride 0
    (np.zeros((0, 2, 9, 8)), "empty batch"),
    ([[1, 2], [3]], "could not be read as an array"),
    (None, "missing"),
])
def test_bad_images_get_one_clear_error(net, bad, message):
    with pytest.raises(ClearmapsError, match=message):
        explain_ref(net, bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ["wolf"]}, r"unknown class name 'wolf'; the network's classes are \['cat'"),
    ({"classes": [7]}, "class id 7 is out of range"),
    ({"classes": []}, "classes is empty"),
    ({"classes": [1, "dog"]}, "name a class twice"),
    ({"classes": "top9"}, "top 9"),
    ({"classes": [1.5]}, "expected class ids"),
    ({"classes": np.zeros((3, 2, 1), int)}, r"expected \(K,\) or \(B, K\)"),
    ({"backend": "tpu"}, "backend='tpu'"),
    ({"reduce": "mean"}, "reduce='mean'"),
    ({"rectify": "yes"}, "rectify='yes'"),
    ({"palette": [0.1, 0.2]}, "2 hues for 5 classes"),
    ({"palette": [0, 0, 0, 0, 2.0]}, r"hues in \[0, 1\]"),
    ({"vmax": -1.0}, "finite and positive"),
    ({"vmax": "p200"}, "percentile"),
    ({"vmax": "loud"}, "expected None"),
])
def test_bad_options_get_one_clear_error(net, x, kwargs, message):
    with pytest.raises(ClearmapsError, match=message):
        explain_ref(net, x, **kwargs)


def test_fixed_size_networks_say_how_to_resize():
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(3, 1, 3, 3)), np.zeros(3))], input_shape=(1, 28, 28))
    with pytest.raises(ClearmapsError, match="resize the images to 28x28"):
        explain_ref(net, np.zeros((1, 1, 32, 32)))
    small = Network([Conv(rng.normal(size=(3, 1, 5, 5)), np.zeros(3))])
    with pytest.raises(ClearmapsError, match="too small for this network"):
        explain_ref(small, np.zeros((1, 1, 4, 9)))
    with pytest.raises(ClearmapsError, match="expected a clearmaps Network"):
        clearmaps.explain("model.pt", np.zeros((1, 1, 28, 28)))


@pytest.mark.parametrize("make, message", [
    (lambda: Network([]), "no layers"),
    (lambda: Network([ReLU(), MaxPool(2)]), "no Conv layer"),
    (lambda: Network([Conv(np.ones((2, 1, 1, 1)), np.zeros(2)), Conv(np.ones((2, 3, 1, 1)), np.zeros(2))]),
     "takes 3 channels"),
    (lambda: Network([Conv(np.ones((2, 1, 1, 1)), np.zeros(2))], class_names=["a"]), "1 class names"),
    (lambda: Network([Conv(np.ones((2, 1, 1, 1)), np.zeros(2))], class_names=["a", "a"]), "unique"),
    (lambda: Network(["linear"]), "holds clearmaps layers"),
    (lambda: Network(None), "expected a sequence of layers"),
    (lambda: Network([Conv(np.ones((2, 1, 1, 1)), np.zeros(2))], class_names=5), "expected a sequence of 2 names"),
    # graphs: inputs that name later nodes, unused nodes, a class map that is not (N, h, w)
    (lambda: Network([ReLU(), ReLU()], input_shape=(1, 4, 4), inputs=[(1,), (0,)]), "reads only earlier"),
    (lambda: Network([ReLU(), ReLU(), Add()], input_shape=(1, 4, 4), inputs=[(-1,), (-1,), (0, -1)]),
     "never used"),
    (lambda: Network([Add()], input_shape=(1, 4, 4), inputs=[(-1,)]), "takes 2 input"),
    (lambda: Network([Reduce((2, 3))], input_shape=(2, 4, 4)), "class map z_L"),
    (lambda: Network([Affine(scale=np.ones((1, 1, 1)))]), "input_shape is needed"),
    (lambda: Network([Cat(1)], input_shape=(2, 4, 4), inputs=[(-1, -1)], class_names=["a"]), "1 class names"),
    (lambda: Network([Conv(np.ones((2, 1, 5, 5)), np.zeros(2))], input_shape=(1, 3, 3)), "too small"),
    (lambda: Conv(np.ones((2, 1, 3)), np.zeros(2)), r"rank 3\); expected rank 4"),
    (lambda: Conv(np.ones((2, 1, 3, 3)), np.zeros(3)), r"expected \(2,\)"),
    (lambda: Conv(np.ones((2, 1, 3, 3)), np.zeros(2), stride=0), "at least 1"),
    (lambda: MaxPool(2, 2, 2), "more than half the kernel"),
])
def test_bad_networks_get_one_clear_error(make, message):
    with pytest.raises(ClearmapsError, match=message):
        make()


def test_figures():
    """The paper's heatmap and binary map, and the strong-feature masks of Table 1."""
    r = np.array([[[[3.0, 0.0, 1.0, -1.0]], [[1.0, 2.0, 1.0, -2.0]]]])  # (1, K=2, 1, 4), true = 0
    binary = clearmaps.binary_map(r, np.array([0]))
    assert binary[0, 0].tolist() == [[255, 0, 0], [0, 0, 255], [255, 0, 0], [0, 0, 0]]
    hot = clearmaps.heatmap(r, np.array([0]))
    assert hot[0, 0, 0].tolist() == [255, 255, 255]  # the strongest true response is white-hot
    assert hot[0, 0, 1].tolist() == [0, 170, 0]  # another class wins: green at 2/3 of the level
    assert hot[0, 0, 3].tolist() == [0, 0, 0]
    mask = clearmaps.strong_feature_mask(r[:, 0], 0.5)
    assert mask.tolist() == [[[True, False, False, False]]]
    img = np.arange(4.0).reshape(1, 1, 1, 4)
    kept, removed = clearmaps.keep_strong(img, mask, 9.0), clearmaps.remove_strong(img, mask, 9.0)
    assert kept.tolist() == [[[[0.0, 9.0, 9.0, 9.0]]]] and removed.tolist() == [[[[9.0, 1.0, 2.0, 3.0]]]]
    np.testing.assert_array_equal(kept + removed, img + 9.0)
    with pytest.raises(ClearmapsError, match="tau"):
        clearmaps.strong_feature_mask(r[:, 0], 1.5)
    with pytest.raises(ClearmapsError, match="one value per channel"):
        clearmaps.keep_strong(img, mask, [1.0, 2.0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("vmax", [None, "batch", "p90", 2.0])
def test_chunked_batches_equal_one_batch(net, x, monkeypatch, backend, vmax):
    """explain splits big host batches into chunks (memory flat in the batch size); the results are those of
    one batch, byte for byte, whatever vmax (the batch's maximum is taken over all chunks) and classes."""
    from clearmaps import explanation

    rows = np.array([[0, 4], [3, 1], [2, 0]])
    whole = [clearmaps.explain(net, x, backend=backend, vmax=vmax, classes=c, keep_responses=k)
             for c, k in ((None, False), ("top2", True), (rows, True))]
    monkeypatch.setattr(explanation, "CHUNK_BYTES", 1)  # one image per chunk
    assert explanation._images_per_chunk(net, x, None, clearmaps.get_backend(backend)) == 1
    chunked = [clearmaps.explain(net, x, backend=backend, vmax=vmax, classes=c, keep_responses=k)
               for c, k in ((None, False), ("top2", True), (rows, True))]
    for a, b in zip(whole, chunked):
        for name in ("rgb", "dominant_class", "dominant_response", "classes", "logits", "probabilities", "responses"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
