"""Precise RoI Pooling in TensorFlow (IoU-Net; spec §6), the twin of ``instseg.ops.prroi_pool2d``.

Semantics of the official binding (``vacancy/PreciseRoIPooling``, ``tensorflow/``): each bin's
value is the exact integral of the zero-extended bilinear feature surface over the bin, divided
by the bin area. Feature pixel ``(i, j)`` sits at the continuous point ``(y=i, x=j)``; RoIs are
``(batch_index, x0, y0, x1, y1)`` with ``[L, R)`` extents (width ``x1 - x0``), multiplied by
``spatial_scale``; a zero-area bin reads 0; area outside the map integrates to 0 but still
counts in the area (dilution). ``data_format`` names the layout of the features and of the
result: ``channels_first`` gives ``(K, C, PH, PW)``, ``channels_last`` ``(K, PH, PW, C)``.

How it is computed, in plain TensorFlow ops (no compiled op, any device):

* Forward (spec §6.2, O(1)-per-bin form). ``S`` is the 2-D prefix sum of the map, in float64.
  ``G(x, y)``, the integral of the surface over ``(-inf, x] x (-inf, y]``, is nine taps of ``S``
  with quadratic B-spline weights of the coordinates' fractional parts. A RoI needs ``G`` on
  its ``(PH+1) x (PW+1)`` bin corners only, and each bin integral is a 2-D difference of ``G``.
  All corners of all RoIs are one sparse-times-dense product (nine weights per corner row).
* Feature gradient (§6.3): the adjoint of the same linear map: corner gradients go back
  through the transposed sparse product and a reverse 2-D prefix sum.
* Box gradient (§6.4), written out, not autodiff: the edge integral ``int f(a, y) dy`` between
  two corners is a difference of ``dG/dx`` there, which is the same nine taps weighted by the
  spline weights' derivatives; then ``dO/da1 = (-int_{b1}^{b2} f(a1, y) dy + (b2 - b1) O) / A``
  and its three siblings, chained to ``x0, y0, x1, y1`` through the bin fractions. The batch
  column gets 0.

Float16/bfloat16/float32/float64 features; the work is done in float64 (float32 prefix sums
over large maps lose about 1e-2 relative precision) and the result has the features' dtype.
"""

from __future__ import annotations

import math
import operator

import keras
import tensorflow as tf

DATA_FORMATS = ("channels_first", "channels_last")
_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_ACC = tf.float64


def _positive_int(value: object, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def _finite_float(value: object, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _check_data_format(data_format: object) -> str:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    return data_format


def _spline_taps(coord: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Table rows (shifted by one for the zero row), weights of ``G`` and weights of ``dG/dcoord``
    along one axis, each ``coord.shape + (3,)``.

    ``coord`` is clamped to ``[-2, size + 1]``: beyond ``-1`` and ``size`` ``G`` is constant (0,
    or the full integral), and at the clamped point the rows coincide so the derivative weights
    (which sum to 0) give exactly 0 there too.
    """
    coord = tf.clip_by_value(coord, -2.0, tf.cast(size, _ACC) + 1.0)
    start = tf.floor(coord)
    t = coord - start
    weights = tf.stack([(1 - t) ** 2 / 2, 0.5 + t - t * t, t * t / 2], axis=-1)
    slopes = tf.stack([t - 1, 1 - 2 * t, t], axis=-1)
    taps = tf.constant([-1, 0, 1], dtype=tf.int64)
    rows = tf.clip_by_value(tf.cast(start, tf.int64)[..., None] + taps, -1, size - 1) + 1
    return rows, weights, slopes


def _pad_hw(x: tf.Tensor, top: int, left: int) -> tf.Tensor:
    """Pad axes 1 and 2 of a ``(K, h, w, C)`` tensor by one, before (1) or after (0)."""
    return tf.pad(x, [[0, 0], [top, 1 - top], [left, 1 - left], [0, 0]])


def _pool_nhwc(features: tf.Tensor, rois: tf.Tensor, ph: int, pw: int, scale: float) -> tf.Tensor:
    """``(K, PH, PW, C)`` from ``(B, H, W, C)`` features, with the closed-form gradients."""

    @tf.custom_gradient
    def pool(features: tf.Tensor, rois: tf.Tensor):
        shape = tf.shape(features, out_type=tf.int64)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        table = tf.pad(tf.cast(features, _ACC), [[0, 0], [1, 0], [1, 0], [0, 0]])
        table = tf.reshape(tf.cumsum(tf.cumsum(table, axis=1), axis=2), [-1, channels])

        coords = tf.cast(rois[:, 1:], _ACC) * scale
        x0, y0 = coords[:, 0], coords[:, 1]
        bin_w = tf.maximum(coords[:, 2] - x0, 0.0) / pw
        bin_h = tf.maximum(coords[:, 3] - y0, 0.0) / ph
        corner_x = x0[:, None] + tf.range(pw + 1, dtype=_ACC) * bin_w[:, None]  # (K, PW+1)
        corner_y = y0[:, None] + tf.range(ph + 1, dtype=_ACC) * bin_h[:, None]  # (K, PH+1)
        rows_x, weights_x, slopes_x = _spline_taps(corner_x, width)
        rows_y, weights_y, slopes_y = _spline_taps(corner_y, height)
        area = bin_w * bin_h
        positive = area > 0
        inv_area = tf.where(positive, 1 / tf.where(positive, area, 1.0), 0.0)

        # Sparse (K*(PH+1)*(PW+1), B*(H+1)*(W+1)) matrix: nine table columns per bin corner.
        k = tf.shape(rois, out_type=tf.int64)[0]
        image = tf.cast(rois[:, 0], tf.int64)  # truncated toward zero, as the official kernel
        image_rows = (image[:, None, None] * (height + 1) + rows_y)[:, :, None, :, None]
        columns = tf.reshape(image_rows * (width + 1) + rows_x[:, None, :, None, :], [-1])
        n_corners = k * (ph + 1) * (pw + 1)
        corner_rows = tf.repeat(tf.range(n_corners), 9)
        indices = tf.stack([corner_rows, columns], axis=1)
        dense_shape = tf.stack([n_corners, batch * (height + 1) * (width + 1)])

        def taps(along_y: tf.Tensor, along_x: tf.Tensor) -> tf.SparseTensor:
            values = along_y[:, :, None, :, None] * along_x[:, None, :, None, :]
            return tf.SparseTensor(indices, tf.reshape(values, [-1]), dense_shape)

        def at_corners(along_y: tf.Tensor, along_x: tf.Tensor) -> tf.Tensor:
            flat = tf.sparse.sparse_dense_matmul(taps(along_y, along_x), table)
            return tf.reshape(flat, [k, ph + 1, pw + 1, channels])

        g = at_corners(weights_y, weights_x)
        integral = g[:, 1:, 1:] - g[:, :-1, 1:] - g[:, 1:, :-1] + g[:, :-1, :-1]
        pooled = integral * inv_area[:, None, None, None]

        def gradient(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            up = tf.cast(upstream, _ACC)
            # §6.3: d(bin integral)/d(corner G) is +-1, then the transposed taps, then the
            # adjoint of the prefix sum (a reverse prefix sum).
            d_integral = up * inv_area[:, None, None, None]
            d_g = (
                _pad_hw(d_integral, 1, 1)
                - _pad_hw(d_integral, 0, 1)
                - _pad_hw(d_integral, 1, 0)
                + _pad_hw(d_integral, 0, 0)
            )
            d_table = tf.sparse.sparse_dense_matmul(
                taps(weights_y, weights_x), tf.reshape(d_g, [-1, channels]), adjoint_a=True
            )
            d_table = tf.reshape(d_table, [batch, height + 1, width + 1, channels])
            d_table = tf.cumsum(tf.cumsum(d_table, axis=1, reverse=True), axis=2, reverse=True)
            d_features = tf.cast(d_table[:, 1:, 1:], features.dtype)

            # §6.4: edge integrals from dG/dx and dG/dy at the corners.
            g_x = at_corners(weights_y, slopes_x)
            g_y = at_corners(slopes_y, weights_x)
            vertical = g_x[:, 1:] - g_x[:, :-1]  # int f(a_p, y) dy over row q: (K, PH, PW+1, C)
            horizontal = g_y[:, :, 1:] - g_y[:, :, :-1]  # int f(x, b_q) dx: (K, PH+1, PW, C)
            value = tf.reduce_sum(up * pooled, axis=-1)  # (K, PH, PW), upstream-weighted
            left = tf.reduce_sum(up * vertical[:, :, :-1], axis=-1)
            right = tf.reduce_sum(up * vertical[:, :, 1:], axis=-1)
            top = tf.reduce_sum(up * horizontal[:, :-1], axis=-1)
            bottom = tf.reduce_sum(up * horizontal[:, 1:], axis=-1)
            inv, bw, bh = (v[:, None, None] for v in (inv_area, bin_w, bin_h))
            d_a1 = (-left + bh * value) * inv
            d_a2 = (right - bh * value) * inv
            d_b1 = (-top + bw * value) * inv
            d_b2 = (bottom - bw * value) * inv
            # Bin edges: a1 = xs + p (xe - xs) / PW, a2 = xs + (p + 1) (xe - xs) / PW.
            fx1 = tf.range(pw, dtype=_ACC) / pw
            fx2 = (tf.range(pw, dtype=_ACC) + 1) / pw
            fy1 = (tf.range(ph, dtype=_ACC) / ph)[:, None]
            fy2 = ((tf.range(ph, dtype=_ACC) + 1) / ph)[:, None]
            d_x0 = tf.reduce_sum(d_a1 * (1 - fx1) + d_a2 * (1 - fx2), axis=[1, 2])
            d_x1 = tf.reduce_sum(d_a1 * fx1 + d_a2 * fx2, axis=[1, 2])
            d_y0 = tf.reduce_sum(d_b1 * (1 - fy1) + d_b2 * (1 - fy2), axis=[1, 2])
            d_y1 = tf.reduce_sum(d_b1 * fy1 + d_b2 * fy2, axis=[1, 2])
            d_rois = tf.stack([tf.zeros_like(d_x0), d_x0, d_y0, d_x1, d_y1], axis=1) * scale
            # The batch column is exactly 0 (0 * scale).
            return d_features, tf.cast(d_rois, rois.dtype)

        return tf.cast(pooled, features.dtype), gradient

    return pool(features, rois)


def _check_inputs(features: tf.Tensor, rois: tf.Tensor) -> list[tf.Operation]:
    """Static checks (shapes, dtypes) that raise ``ValueError`` naming the problem; value
    checks (batch index in range, finite coordinates) raise ``ValueError`` in eager mode and
    are graph assertions under ``tf.function``."""
    if features.shape.rank != 4:
        raise ValueError(f"features must be 4-D (B, C, H, W) or (B, H, W, C), got {features.shape}")
    if features.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"features must be floating point, got {features.dtype.name}")
    if rois.shape.rank != 2 or rois.shape[1] not in (None, 5):
        raise ValueError(f"rois must be [K, 5] (batch_index, x0, y0, x1, y1), got {rois.shape}")
    if rois.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rois must be floating point, got {rois.dtype.name}")
    batch = tf.shape(features, out_type=tf.int64)[0]
    image = tf.cast(rois[:, 0], tf.int64)
    in_range = tf.reduce_all((image >= 0) & (image < batch))
    finite = tf.reduce_all(tf.math.is_finite(rois))
    range_message = "rois batch index out of range for the batch of features"
    finite_message = "rois contain NaN or inf coordinates"
    if tf.executing_eagerly():
        if not bool(in_range):
            lo, hi = int(tf.reduce_min(image)), int(tf.reduce_max(image))
            raise ValueError(f"{range_message}: got [{lo}, {hi}] for a batch of {int(batch)}")
        if not bool(finite):
            raise ValueError(finite_message)
        return []
    return [
        tf.debugging.Assert(in_range, [range_message, image, batch]),
        tf.debugging.Assert(finite, [finite_message]),
    ]


def prroi_pool2d(
    features: tf.Tensor,
    rois: tf.Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    data_format: str = "channels_first",
    name: str | None = None,
) -> tf.Tensor:
    """Precise RoI pooling, differentiable in ``features`` and in the four coordinates of
    ``rois``.

    Args:
        features: ``(B, C, H, W)`` (``channels_first``) or ``(B, H, W, C)`` (``channels_last``),
            float16/bfloat16/float32/float64.
        rois: ``(K, 5)`` float ``(batch_index, x0, y0, x1, y1)`` in input-image coordinates;
            the batch index is truncated to int and must lie in ``[0, B)``.
        pooled_height, pooled_width: bins per RoI.
        spatial_scale: factor from RoI coordinates to feature-map coordinates (e.g. 1/16).
        data_format: the layout of ``features`` and of the result.

    Returns:
        ``(K, C, PH, PW)`` for ``channels_first``, ``(K, PH, PW, C)`` for ``channels_last``,
        in the features' dtype.
    """
    ph = _positive_int(pooled_height, "pooled_height")
    pw = _positive_int(pooled_width, "pooled_width")
    scale = _finite_float(spatial_scale, "spatial_scale")
    data_format = _check_data_format(data_format)
    with tf.name_scope(name or "prroi_pool2d"):
        features = tf.convert_to_tensor(features)
        rois = tf.convert_to_tensor(rois)
        with tf.control_dependencies(_check_inputs(features, rois)):
            if data_format == "channels_first":
                features = tf.transpose(features, [0, 2, 3, 1])
            pooled = _pool_nhwc(features, rois, ph, pw, scale)
        if data_format == "channels_first":
            pooled = tf.transpose(pooled, [0, 3, 1, 2])
        return pooled


@keras.saving.register_keras_serializable(package="instseg")
class PreciseRoIPooling(keras.layers.Layer):
    """Keras layer form of :func:`prroi_pool2d`, called as ``layer([features, rois])`` like the
    official binding's ``PreciseRoIPooling(pooled_height, pooled_width, spatial_scale,
    data_format)``. It has no weights; inputs keep their dtype (no autocast), so float64
    features give float64 results.
    """

    def __init__(
        self,
        pooled_height: int,
        pooled_width: int,
        spatial_scale: float,
        data_format: str = "channels_first",
        **kwargs,
    ) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "instseg.tf.PreciseRoIPooling runs TensorFlow ops and needs Keras' TensorFlow "
                f"backend, but KERAS_BACKEND is {keras.backend.backend()!r}"
            )
        self.pooled_height = _positive_int(pooled_height, "pooled_height")
        self.pooled_width = _positive_int(pooled_width, "pooled_width")
        self.spatial_scale = _finite_float(spatial_scale, "spatial_scale")
        self.data_format = _check_data_format(data_format)

    @staticmethod
    def _split(inputs: object) -> tuple[object, object]:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                "PreciseRoIPooling is called on a list of two tensors [features, rois], got "
                f"{type(inputs).__name__}"
            )
        return inputs[0], inputs[1]

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        features, rois = self._split(inputs)
        return prroi_pool2d(
            features,
            rois,
            self.pooled_height,
            self.pooled_width,
            self.spatial_scale,
            self.data_format,
        )

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        feature_shape, roi_shape = self._split(input_shape)
        k = roi_shape[0]
        bins = (self.pooled_height, self.pooled_width)
        if self.data_format == "channels_first":
            return (k, feature_shape[1], *bins)
        return (k, *bins, feature_shape[3])

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "pooled_height": self.pooled_height,
            "pooled_width": self.pooled_width,
            "spatial_scale": self.spatial_scale,
            "data_format": self.data_format,
        }
