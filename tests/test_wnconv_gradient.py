"""WNConv2D's hand-written gradient (which recomputes the kernel instead of keeping it) against autodiff
through the plain formula: residual + gain * (conv(x, exp(g) * (V*mask) / ||V*mask||) + b)."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf.layers import WNConv2D, conv_ar_mask


def _autodiff_reference(layer, x, residual, gain):
    v = tf.convert_to_tensor(layer.V)
    if layer.mask is not None:
        v = v * layer.mask
    direction = v / tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(v), [0, 1, 2], keepdims=True), 1e-12))
    kernel = tf.reshape(tf.exp(tf.convert_to_tensor(layer.g)), [1, 1, 1, -1]) * direction
    out = tf.nn.conv2d(x, kernel, [1, *layer.strides, 1], "SAME") + layer.b
    return out if residual is None else residual + gain * out


@pytest.mark.parametrize("in_ch,out_ch,kernel_size,stride,masked,with_residual,gain", [
    (4, 8, (3, 3), 1, True, True, 0.1),     # IAF hidden layer with the context as residual
    (8, 4, (3, 3), 1, True, False, 1.0),    # IAF head
    (6, 6, (3, 3), 2, False, False, 1.0),   # downsampling up_conv1
    (3, 5, (5, 5), 2, False, False, 1.0),   # x_enc
    (4, 4, (3, 3), 1, False, True, 0.1),    # residual conv of a block
])
def test_gradient_matches_autodiff(in_ch, out_ch, kernel_size, stride, masked, with_residual, gain):
    rng = np.random.default_rng(0)
    mask = conv_ar_mask(*kernel_size, in_ch, out_ch) if masked else None
    layer = WNConv2D(out_ch, kernel_size, (stride, stride), mask=mask)
    x = tf.constant(rng.normal(size=[2, 8, 8, in_ch]), tf.float32)
    layer.build(x.shape)
    layer.g.assign(rng.normal(size=[out_ch]) * 0.3)
    layer.b.assign(rng.normal(size=[out_ch]))
    out_shape = [2, 8 // stride, 8 // stride, out_ch]
    residual = tf.constant(rng.normal(size=out_shape), tf.float32) if with_residual else None
    weights = tf.constant(rng.normal(size=out_shape), tf.float32)
    sources = [x, layer.V, layer.g, layer.b] + ([residual] if with_residual else [])

    results = []
    for fn in (lambda: layer(x, residual=residual, gain=gain), lambda: _autodiff_reference(layer, x, residual, gain)):
        with tf.GradientTape() as tape:
            tape.watch([x] + ([residual] if with_residual else []))
            out = fn()
            loss = tf.reduce_sum(out * weights)
        results.append([out] + tape.gradient(loss, sources))
    for got, want, name in zip(*results, ["output", "x", "V", "g", "b", "residual"]):
        scale = np.abs(want.numpy()).max()
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-6 * scale, err_msg=name)
    if masked:  # taps the mask cuts get no gradient
        np.testing.assert_array_equal(results[0][2].numpy()[mask == 0], 0.0)


def test_bfloat16_conv_gradient_is_close_to_float32():
    rng = np.random.default_rng(1)
    layers = {dtype: WNConv2D(16, conv_dtype=dtype) for dtype in ("float32", "bfloat16")}
    x = tf.constant(rng.normal(size=[2, 8, 8, 16]), tf.float32)
    for layer in layers.values():
        layer.build(x.shape)
    layers["bfloat16"].set_weights(layers["float32"].get_weights())
    weights = tf.constant(rng.normal(size=[2, 8, 8, 16]), tf.float32)
    grads = {}
    for dtype, layer in layers.items():
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            assert out.dtype == dtype
            loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
        grads[dtype] = tape.gradient(loss, [x, layer.V, layer.g, layer.b])
    for got, want in zip(grads["bfloat16"], grads["float32"]):
        assert got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=0.02 * np.abs(want.numpy()).max())
