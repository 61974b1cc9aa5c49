"""Tests for the TensorFlow Precise RoI Pooling (``instseg.tf``), CPU.

Independent references: the float64 loops of ``prroi_reference.py`` (forward, spec §6.4 box
gradient, feature gradient), finite differences in float64 (``tf.test.compute_gradient``),
the official test's avg-pool identity, and our PyTorch operator on the same random inputs
(itself tested against the same loops and the official CUDA outputs). Run by the README's
test command, which installs the ``tf`` extra; without TensorFlow the module is skipped with
the reason shown.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow", reason='TensorFlow missing: pip install "instseg[tf]"')

import keras  # noqa: E402
import torch  # noqa: E402

from instseg.ops import prroi_pool2d as torch_prroi_pool2d  # noqa: E402
from instseg.tf import PreciseRoIPooling, prroi_pool2d  # noqa: E402
from prroi_reference import (  # noqa: E402
    make_features,
    make_rois,
    ref_box_grad,
    ref_feature_grad,
    ref_prroi_pool,
    to_numpy,
)

SCALES = [1.0, 0.25, 1 / 16]


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def pool(features, rois, ph, pw, scale, data_format):
    """Our TF op on NCHW numpy features, in either layout; returns NCHW numpy and grads."""
    f = tf.constant(features if data_format == "channels_first" else to_nhwc(features))
    r = tf.constant(rois)
    with tf.GradientTape() as tape:
        tape.watch([f, r])
        out = prroi_pool2d(f, r, ph, pw, scale, data_format=data_format)
        if data_format == "channels_last":
            out = tf.transpose(out, [0, 3, 1, 2])
    return out, tape, f, r


def grads(features, rois, ph, pw, scale, data_format, upstream):
    out, tape, f, r = pool(features, rois, ph, pw, scale, data_format)
    with tape:
        loss = tf.reduce_sum(out * upstream)
    d_f, d_r = tape.gradient(loss, [f, r])
    d_f = d_f.numpy()
    if data_format == "channels_last":
        d_f = d_f.transpose(0, 3, 1, 2)
    return out.numpy(), d_f, d_r.numpy()


# --------------------------------------------------------------------------------------------
# Float64 loop references: forward, feature gradient, box gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("pooled", [(3, 2), (1, 1), (4, 4)])
def test_forward_matches_loop_reference(data_format, scale, pooled):
    ph, pw = pooled
    feats = to_numpy(make_features(0))
    rois = to_numpy(make_rois(scale, seed=ph * 10 + pw))  # inside, partly and wholly outside
    expected = ref_prroi_pool(feats, rois, ph, pw, scale)
    out, *_ = pool(feats, rois, ph, pw, scale, data_format)
    assert out.dtype == tf.float64
    assert out.shape == (rois.shape[0], feats.shape[1], ph, pw)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert np.count_nonzero(expected) > expected.size // 2
    assert np.all(expected[4] == 0) and np.all(expected[5] == 0)  # the wholly outside RoIs


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize(("scale", "pooled"), [(1.0, (3, 2)), (0.25, (2, 3)), (1 / 16, (2, 2))])
def test_gradients_match_loop_references(data_format, scale, pooled):
    ph, pw = pooled
    feats = to_numpy(make_features(16))
    rois = np.array(
        [
            [0, 1.3, 2.1, 7.6, 6.9],
            [1, -3.4, -2.2, 4.1, 5.5],  # partly outside
            [0, 6.5, 4.25, 14.7, 12.3],  # partly outside on the far side
            [0, 4.37, 3.61, 4.52, 3.83],  # tiny
            [1, 2.0, 1.0, 8.0, 7.0],  # integer corners
            [0, -6.3, -5.1, 18.2, 16.9],  # larger than the map
        ]
    )
    rois[:, 1:] /= scale
    upstream = np.random.default_rng(17).standard_normal((rois.shape[0], 2, ph, pw))
    _, d_features, d_rois = grads(feats, rois, ph, pw, scale, data_format, upstream)

    expected_box = ref_box_grad(feats, rois, ph, pw, scale, upstream)
    np.testing.assert_allclose(d_rois, expected_box, rtol=1e-8, atol=1e-9)
    assert np.all(d_rois[:, 0] == 0)
    assert np.abs(expected_box[:, 1:]).min() > 0  # every coordinate gets a gradient
    expected_features = ref_feature_grad(feats, rois, ph, pw, scale, upstream)
    np.testing.assert_allclose(d_features, expected_features, rtol=1e-9, atol=1e-10)


def test_gradients_match_finite_differences():
    feats = to_numpy(make_features(12, shape=(2, 1, 6, 7)))
    rois = np.array(
        [
            [0, 1.3, 2.1, 7.6, 6.9],
            [1, -1.4, -2.2, 4.1, 3.5],  # partly outside
            [1, 4.6, 3.7, 8.2, 8.9],  # partly outside on the far side
            [0, 2.35, 1.6, 3.05, 2.2],  # small
        ]
    )
    rois[:, 1:] /= 0.5
    batch = tf.constant(rois[:, :1])

    def of_features(f):
        return prroi_pool2d(f, tf.constant(rois), 3, 2, 0.5)

    def of_coords(c):
        return prroi_pool2d(tf.constant(feats), tf.concat([batch, c], 1), 3, 2, 0.5)

    for fn, x in ((of_features, feats), (of_coords, rois[:, 1:])):
        theoretical, numerical = tf.test.compute_gradient(fn, [tf.constant(x)], delta=1e-6)
        assert np.abs(theoretical[0]).max() > 0.1
        # The output is C1 in the box but not C2 (bin edges crossing pixel rows): central
        # differences that straddle such a point are off by O(delta).
        np.testing.assert_allclose(theoretical[0], numerical[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Our PyTorch operator on the same random inputs
# --------------------------------------------------------------------------------------------


def random_case(seed: int, scale: float, dtype=np.float64):
    """A 3-channel 2-image map and 40 RoIs in image coordinates: inside, partly outside and
    zero-size (every fifth has x1 == x0 or y1 < y0)."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((2, 3, 13, 17)).astype(dtype)
    n = 40
    start = rng.uniform([-4, -4], [15, 11], (n, 2))  # (x0, y0) on a 17 x 13 map
    size = rng.uniform(0.2, 9, (n, 2))
    size[::5, 0] = 0.0
    size[2::10, 1] = -1.5
    boxes = np.concatenate([start, start + size], 1) / scale
    image = rng.integers(0, 2, (n, 1)).astype(np.float64)
    return feats, np.concatenate([image, boxes], 1).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("scale", SCALES)
def test_matches_pytorch_operator(dtype, data_format, scale):
    feats, rois = random_case(int(1 / scale) + (dtype == np.float32), scale, dtype)
    upstream = np.random.default_rng(3).standard_normal((rois.shape[0], 3, 7, 5)).astype(dtype)
    out, d_features, d_rois = grads(feats, rois, 7, 5, scale, data_format, upstream)

    f_t = torch.from_numpy(feats).requires_grad_()
    r_t = torch.from_numpy(rois).requires_grad_()
    out_t = torch_prroi_pool2d(f_t, r_t, 7, 5, scale)
    (out_t * torch.from_numpy(upstream)).sum().backward()

    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert out.dtype == dtype and d_features.dtype == dtype and d_rois.dtype == dtype
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(d_features, f_t.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(d_rois, r_t.grad.numpy(), rtol=tol, atol=tol * 10)
    zero_size = (rois[:, 3] <= rois[:, 1]) | (rois[:, 4] <= rois[:, 2])
    assert zero_size.sum() >= 8
    assert np.all(out[zero_size] == 0) and np.all(d_rois[zero_size] == 0)
    # RoIs that overlap the map by half a pixel on both axes get a gradient on every coordinate.
    box = rois[:, 1:] * scale
    overlap_x = np.minimum(box[:, 2], 16) - np.maximum(box[:, 0], 0)
    overlap_y = np.minimum(box[:, 3], 12) - np.maximum(box[:, 1], 0)
    overlapping = ~zero_size & (overlap_x > 0.5) & (overlap_y > 0.5)
    assert overlapping.sum() >= 15
    assert np.abs(d_rois[overlapping, 1:]).min() > 1e-6


# --------------------------------------------------------------------------------------------
# The official test's identity, edge cases, dtypes, tf.function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_avg_pool_identity_of_the_official_test(data_format):
    # With scale 0.5 every bin of these RoIs is a unit cell: a 2x2 average, stride 1.
    feats = np.random.default_rng(4).uniform(size=(4, 16, 24, 32)).astype(np.float32)
    rois = np.array([[0, 0, 0, 14, 14], [1, 14, 14, 28, 28]], dtype=np.float32)
    out, *_ = pool(feats, rois, 7, 7, 0.5, data_format)
    averaged = tf.nn.avg_pool2d(to_nhwc(feats), 2, 1, "VALID").numpy().transpose(0, 3, 1, 2)
    expected = np.stack([averaged[0, :, :7, :7], averaged[1, :, 7:14, 7:14]])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "roi",
    [
        [0, 3.0, 2.0, 3.0, 6.5],  # x1 == x0
        [1, 1.5, 4.0, 7.5, 4.0],  # y1 == y0
        [0, 7.0, 2.0, 2.5, 6.0],  # x1 < x0
        [1, 8.0, 6.0, 1.0, 1.5],  # both inverted
    ],
)
def test_degenerate_boxes_give_zero_output_and_gradients(roi):
    feats = to_numpy(make_features(19))
    upstream = np.random.default_rng(0).standard_normal((1, 2, 3, 2))
    out, d_features, d_rois = grads(feats, np.array([roi]), 3, 2, 1.0, "channels_first", upstream)
    assert out.shape == (1, 2, 3, 2)
    assert np.all(out == 0) and np.all(d_features == 0) and np.all(d_rois == 0)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_no_rois(data_format):
    feats = to_numpy(make_features(22))
    out, d_features, d_rois = grads(
        feats, np.zeros((0, 5)), 3, 2, 0.5, data_format, np.zeros((0, 2, 3, 2))
    )
    assert out.shape == (0, 2, 3, 2)
    assert d_features.shape == feats.shape and np.all(d_features == 0)
    assert d_rois.shape == (0, 5)


def test_batch_index_is_truncated():
    feats = to_numpy(make_features(5))
    rois = np.array([[1.9, 1.0, 2.0, 6.5, 7.5], [0.7, 1.0, 2.0, 6.5, 7.5]])
    out, *_ = pool(feats, rois, 2, 2, 1.0, "channels_first")
    truncated = np.array([[1, 1.0, 2.0, 6.5, 7.5], [0, 1.0, 2.0, 6.5, 7.5]])
    np.testing.assert_allclose(out.numpy(), ref_prroi_pool(feats, truncated, 2, 2, 1.0), atol=1e-10)


@pytest.mark.parametrize(("dtype", "eps"), [(tf.float16, 2**-11), (tf.bfloat16, 2**-8)])
def test_low_precision_features_are_computed_in_float64(dtype, eps):
    feats, rois = random_case(7, 0.25, np.float32)
    low = tf.cast(feats, dtype)
    out = prroi_pool2d(low, tf.constant(rois), 3, 3, 0.25)
    assert out.dtype == dtype
    # Only the input and the result are rounded: the result is the float64 pooling of the
    # rounded input, rounded once (relative error at most half an ulp; below float16's normal
    # range, half of its subnormal step 2**-24).
    exact_of_rounded = torch_prroi_pool2d(
        torch.from_numpy(tf.cast(low, tf.float64).numpy()),
        torch.from_numpy(rois).double(),
        3,
        3,
        0.25,
    ).numpy()
    out64 = tf.cast(out, tf.float64).numpy()
    np.testing.assert_allclose(out64, exact_of_rounded, rtol=eps, atol=2**-25)
    assert np.abs(exact_of_rounded).max() > 0.5


def test_tf_function_with_unknown_roi_count_matches_eager():
    feats, rois = random_case(9, 0.5)
    spec = [
        tf.TensorSpec([None, None, None, 3], tf.float64),
        tf.TensorSpec([None, 5], tf.float64),
    ]

    @tf.function(input_signature=spec)
    def step(f, r):
        with tf.GradientTape() as tape:
            tape.watch([f, r])
            out = prroi_pool2d(f, r, 4, 3, 0.5, data_format="channels_last")
            loss = tf.reduce_sum(out * out)
        return (out, *tape.gradient(loss, [f, r]))

    nhwc = tf.constant(to_nhwc(feats))
    for count in (40, 7, 0):
        graph = step(nhwc, tf.constant(rois[:count]))
        with tf.GradientTape() as tape:
            f, r = nhwc, tf.constant(rois[:count])
            tape.watch([f, r])
            out = prroi_pool2d(f, r, 4, 3, 0.5, data_format="channels_last")
            loss = tf.reduce_sum(out * out)
        eager = (out, *tape.gradient(loss, [f, r]))
        for g, e in zip(graph, eager, strict=True):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-12)
    assert step.experimental_get_tracing_count() == 1


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------


def test_argument_errors_name_the_problem():
    feats = tf.constant(to_numpy(make_features(0)))
    rois = tf.constant([[0, 1.0, 1.0, 5.0, 5.0]], dtype=tf.float64)
    image_2 = rois + tf.constant([[2, 0, 0, 0, 0]], dtype=tf.float64)
    image_5 = rois + tf.constant([[5, 0, 0, 0, 0]], dtype=tf.float64)
    cases = [
        (lambda: prroi_pool2d(feats, rois, 2, 2, 1.0, data_format="NCHW"), "data_format"),
        (lambda: prroi_pool2d(feats, rois, 0, 2, 1.0), "pooled_height"),
        (lambda: prroi_pool2d(feats, rois, 2, 2.5, 1.0), "pooled_width"),
        (lambda: prroi_pool2d(feats, rois, 2, 2, "a"), "spatial_scale"),
        (lambda: prroi_pool2d(feats[0], rois, 2, 2, 1.0), "features must be 4-D"),
        (lambda: prroi_pool2d(tf.cast(feats, tf.int32), rois, 2, 2, 1.0), "floating point"),
        (lambda: prroi_pool2d(feats, rois[:, 1:], 2, 2, 1.0), r"rois must be \[K, 5\]"),
        (lambda: prroi_pool2d(feats, image_2, 2, 2, 1.0), "batch index"),
        (lambda: prroi_pool2d(feats, rois * [[1, np.nan, 1, 1, 1]], 2, 2, 1.0), "NaN"),
        (lambda: PreciseRoIPooling(2, 2, 1.0)(feats), "list of two tensors"),
        (lambda: PreciseRoIPooling(2, -1, 1.0), "pooled_width"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float64)])
    def graph(r):
        return prroi_pool2d(feats, r, 2, 2, 1.0)

    with pytest.raises(tf.errors.InvalidArgumentError, match="batch index out of range"):
        graph(image_5)


# --------------------------------------------------------------------------------------------
# Keras: a training step, .keras save and load
# --------------------------------------------------------------------------------------------


def small_model() -> keras.Model:
    """Conv -> PreciseRoIPooling -> Dense: a box-scoring head on a learned map."""
    features = keras.Input((12, 16, 3), name="image")
    rois = keras.Input((5,), name="rois", batch_size=None)
    mapped = keras.layers.Conv2D(4, 3, padding="same", name="conv")(features)
    pooled = PreciseRoIPooling(3, 3, 0.5, data_format="channels_last", name="prroi")([mapped, rois])
    score = keras.layers.Dense(1, name="score")(keras.layers.Flatten()(pooled))
    return keras.Model([features, rois], score)


def test_keras_layer_trains_and_round_trips_through_a_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    model = small_model()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 12, 16, 3)).astype(np.float32)
    rois = np.array(
        [[0, 2, 2, 20, 14], [1, -4, 3, 12, 30], [0, 10, 0, 31, 23], [1, 5, 5, 9, 8]], np.float32
    )
    targets = np.array([[1.0], [-1.0], [0.5], [2.0]], np.float32)
    assert model([images, rois]).shape == (4, 1)
    assert model.get_layer("prroi").compute_output_shape([(2, 12, 16, 4), (4, 5)]) == (4, 3, 3, 4)

    optimizer = keras.optimizers.SGD(0.05)

    def loss_value():
        return float(keras.ops.mean((model([images, rois]) - targets) ** 2))

    before = loss_value()
    with tf.GradientTape() as tape:
        loss = keras.ops.mean((model([images, rois]) - targets) ** 2)
    gradients = tape.gradient(loss, model.trainable_variables)
    conv_kernel = dict(zip([v.path for v in model.trainable_variables], gradients, strict=True))
    assert float(tf.reduce_max(tf.abs(conv_kernel["conv/kernel"]))) > 0  # through the pooling
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    assert loss_value() < before

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("prroi")
    assert isinstance(layer, PreciseRoIPooling)
    assert (layer.pooled_height, layer.pooled_width, layer.spatial_scale) == (3, 3, 0.5)
    assert layer.data_format == "channels_last"
    np.testing.assert_array_equal(loaded([images, rois]).numpy(), model([images, rois]).numpy())


def test_layer_keeps_float64_and_matches_the_function():
    feats, rois = random_case(11, 0.25)
    layer = PreciseRoIPooling(2, 3, 0.25)
    out = layer([tf.constant(feats), tf.constant(rois)])
    assert out.dtype == tf.float64
    np.testing.assert_array_equal(out.numpy(), prroi_pool2d(feats, rois, 2, 3, 0.25).numpy())
    config = layer.get_config()
    assert {k: config[k] for k in ("pooled_height", "pooled_width", "data_format")} == {
        "pooled_height": 2,
        "pooled_width": 3,
        "data_format": "channels_first",
    }
