"""Weight-normed convolutions, autoregressive masks and the IAF network, checked against float64 NumPy
versions of the original's (openai/iaf tf_utils/layers.py) rules; the convolutions' hand-written
gradients against autodiff."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import programs
from iaf_tf.layers import ARMultiConv, WNConv2D, ar_conv, conv_ar_mask, linear_ar_mask
from tests.fixtures import raster_allowed

# ---------------------------------------------------------------- NumPy references


def ref_linear_ar_mask(n_in, n_out, zerodiagonal=False):
    """The original's rule, written as loops over channel groups.

    n_out >= n_in: each input channel i owns the k = n_out // n_in consecutive outputs of group i; inputs
    after i are cut from group i (and input i itself too when zerodiagonal).
    n_in > n_out: each output channel i owns the k = n_in // n_out consecutive inputs of group i; output i
    sees inputs of groups up to i (before i when zerodiagonal).
    """
    mask = np.ones([n_in, n_out], np.float64)
    if n_out >= n_in:
        k = n_out // n_in
        for i in range(n_in):
            for out in range(i * k, (i + 1) * k):
                for inp in range(n_in):
                    if inp > i or (zerodiagonal and inp == i):
                        mask[inp, out] = 0.0
    else:
        k = n_in // n_out
        for i in range(n_out):
            for inp in range(n_in):
                if inp >= (i + 1) * k or (zerodiagonal and i * k <= inp < (i + 1) * k):
                    mask[inp, i] = 0.0
    return mask


def ref_conv_ar_mask(kh, kw, n_in, n_out, zerodiagonal=False):
    mask = np.zeros([kh, kw, n_in, n_out], np.float64)
    cy, cx = (kh - 1) // 2, (kw - 1) // 2
    for dy in range(kh):
        for dx in range(kw):
            if dy > cy or (dy == cy and dx > cx):
                mask[dy, dx] = 1.0
            elif dy == cy and dx == cx:
                mask[dy, dx] = ref_linear_ar_mask(n_in, n_out, zerodiagonal)
    return mask


def same_padding(size_in, size_out, stride, k):
    total = max((size_out - 1) * stride + k - size_in, 0)
    return total // 2, total - total // 2


def np_conv2d_same(x, kernel, stride):
    """Cross-correlation with TF's SAME padding. x [N,H,W,Cin], kernel [kh,kw,Cin,Cout]."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    kh, kw, _, c_out = kernel.shape
    oh, ow = -(-h // stride), -(-w // stride)
    top, bottom = same_padding(h, oh, stride, kh)
    left, right = same_padding(w, ow, stride, kw)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = np.zeros([n, oh, ow, c_out])
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, dy:dy + (oh - 1) * stride + 1:stride, dx:dx + (ow - 1) * stride + 1:stride, :]
            out += np.einsum("nhwc,cd->nhwd", patch, kernel[dy, dx])
    return out


def np_conv2d_transpose_same(x, kernel, stride):
    """The adjoint of np_conv2d_same: x [N,h,w,Cin], kernel [kh,kw,Cout,Cin], output [N,h*s,w*s,Cout]."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    kh, kw, c_out, _ = kernel.shape
    big_h, big_w = h * stride, w * stride
    top, _ = same_padding(big_h, h, stride, kh)
    left, _ = same_padding(big_w, w, stride, kw)
    buf = np.zeros([n, (h - 1) * stride + kh, (w - 1) * stride + kw, c_out])
    for i in range(h):
        for j in range(w):
            for dy in range(kh):
                for dx in range(kw):
                    buf[:, i * stride + dy, j * stride + dx, :] += x[:, i, j, :] @ kernel[dy, dx].T
    return buf[:, top:top + big_h, left:left + big_w, :]


def np_direction(v, mask=None):
    v = np.asarray(v, np.float64)
    if mask is not None:
        v = v * mask
    return v / np.sqrt(np.maximum(np.sum(v ** 2, axis=(0, 1, 2), keepdims=True), 1e-12))


def np_kernel(layer):
    direction = np_direction(layer.V.numpy(), layer.mask)
    g = np.exp(layer.g.numpy().astype(np.float64))
    if layer.transpose:
        return g[None, None, :, None] * direction
    return g[None, None, None, :] * direction


def np_apply(layer, x, kernel):
    if layer.transpose:
        return np_conv2d_transpose_same(x, kernel, layer.strides[0])
    return np_conv2d_same(x, kernel, layer.strides[0])


def randomize(layer, rng):
    """Non-trivial g and b (fresh layers have g = b = 0)."""
    layer.g.assign(rng.normal(0, 0.3, layer.g.shape).astype(np.float32))
    layer.b.assign(rng.normal(0, 0.3, layer.b.shape).astype(np.float32))


# ---------------------------------------------------------------- masks

MASK_SIZES = [(8, 32), (32, 32), (32, 8), (4, 4), (1, 3), (6, 2), (2, 4)]


@pytest.mark.parametrize("zerodiagonal", [False, True])
@pytest.mark.parametrize("n_in,n_out", MASK_SIZES)
def test_linear_ar_mask_matches_original_rule(n_in, n_out, zerodiagonal):
    mask = linear_ar_mask(n_in, n_out, zerodiagonal)
    assert mask.shape == (n_in, n_out)
    np.testing.assert_array_equal(mask, ref_linear_ar_mask(n_in, n_out, zerodiagonal))


def test_linear_ar_mask_examples():
    # Square: lower-triangular-with-diagonal transposed (output j sees inputs <= j, or < j).
    np.testing.assert_array_equal(linear_ar_mask(3, 3), np.triu(np.ones([3, 3])))
    np.testing.assert_array_equal(linear_ar_mask(3, 3, True), np.triu(np.ones([3, 3]), 1))
    # 2 -> 4: outputs 0,1 belong to input 0; outputs 2,3 to input 1.
    np.testing.assert_array_equal(linear_ar_mask(2, 4), [[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(linear_ar_mask(2, 4, True), [[0, 0, 1, 1], [0, 0, 0, 0]])
    # 4 -> 2: output 0 owns inputs 0,1; output 1 owns 2,3.
    np.testing.assert_array_equal(linear_ar_mask(4, 2), [[1, 1], [1, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(linear_ar_mask(4, 2, True), [[0, 1], [0, 1], [0, 0], [0, 0]])


@pytest.mark.parametrize("zerodiagonal", [False, True])
@pytest.mark.parametrize("kh,kw", [(3, 3), (5, 5), (1, 1), (3, 5)])
@pytest.mark.parametrize("n_in,n_out", [(8, 32), (32, 32), (32, 8), (4, 4)])
def test_conv_ar_mask_matches_original_rule(kh, kw, n_in, n_out, zerodiagonal):
    mask = conv_ar_mask(kh, kw, n_in, n_out, zerodiagonal)
    assert mask.shape == (kh, kw, n_in, n_out)
    np.testing.assert_array_equal(mask, ref_conv_ar_mask(kh, kw, n_in, n_out, zerodiagonal))


@pytest.mark.parametrize("n_in,n_out", [(3, 4), (4, 6), (6, 4), (5, 7)])
def test_non_divisible_mask_sizes_raise(n_in, n_out):
    with pytest.raises(ValueError):
        linear_ar_mask(n_in, n_out)
    with pytest.raises(ValueError):
        conv_ar_mask(3, 3, n_in, n_out, True)


# ---------------------------------------------------------------- forward pass


@pytest.mark.parametrize("kernel_size,stride,in_ch,out_ch,size", [
    ((3, 3), 1, 3, 5, 6),
    ((5, 5), 2, 3, 4, 8),
    ((5, 5), 2, 2, 3, 7),   # odd size: ceil(7/2) = 4 outputs
    ((1, 1), 1, 4, 2, 5),
])
def test_wnconv2d_forward_matches_numpy(kernel_size, stride, in_ch, out_ch, size):
    rng = np.random.default_rng(0)
    layer = WNConv2D(out_ch, kernel_size, (stride, stride))
    x = rng.normal(size=[2, size, size, in_ch]).astype(np.float32)
    layer(x)  # build
    randomize(layer, rng)
    assert layer.V.shape == (*kernel_size, in_ch, out_ch)

    expected_kernel = np_kernel(layer)
    np.testing.assert_allclose(layer.kernel().numpy(), expected_kernel, rtol=1e-5, atol=1e-6)
    # The norm is over (kh, kw, in): every output channel's direction has unit norm.
    np.testing.assert_allclose(np.sqrt((layer.direction().numpy().astype(np.float64) ** 2).sum((0, 1, 2))),
                               1.0, rtol=1e-5)

    out = layer(x).numpy()
    expected = np_conv2d_same(x, expected_kernel, stride) + layer.b.numpy()
    assert out.shape == expected.shape == tuple(layer.compute_output_shape(x.shape))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size,in_ch,out_ch,size", [((5, 5), 4, 3, 4), ((3, 3), 3, 5, 3)])
def test_wnconv2d_transpose_forward_matches_numpy(kernel_size, in_ch, out_ch, size):
    rng = np.random.default_rng(1)
    layer = WNConv2D(out_ch, kernel_size, (2, 2), transpose=True)
    x = rng.normal(size=[2, size, size, in_ch]).astype(np.float32)
    layer(x)
    randomize(layer, rng)
    # V is [kh, kw, out, in]; the norm runs over (kh, kw, out) and exp(g) scales the OUTPUT axis (2).
    assert layer.V.shape == (*kernel_size, out_ch, in_ch)
    v = layer.V.numpy().astype(np.float64)
    g = layer.g.numpy().astype(np.float64)
    expected_kernel = np.exp(g)[None, None, :, None] * v / np.sqrt((v ** 2).sum(axis=(0, 1, 2), keepdims=True))
    kernel = layer.kernel().numpy()
    np.testing.assert_allclose(kernel, expected_kernel, rtol=1e-5, atol=1e-6)

    out = layer(x).numpy()
    assert out.shape == (2, 2 * size, 2 * size, out_ch) == tuple(layer.compute_output_shape(x.shape))
    # Against TF's own transposed conv given the NumPy kernel ...
    tf_expected = tf.nn.conv2d_transpose(x, expected_kernel.astype(np.float32), [2, 2 * size, 2 * size, out_ch],
                                         strides=[1, 2, 2, 1], padding="SAME").numpy() + layer.b.numpy()
    np.testing.assert_allclose(out, tf_expected, rtol=1e-4, atol=1e-5)
    # ... and against a NumPy one (the adjoint of the SAME stride-2 conv).
    np.testing.assert_allclose(out, np_conv2d_transpose_same(x, expected_kernel, 2) + layer.b.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_numpy_transpose_is_adjoint_of_numpy_conv():
    # Sanity check of the reference itself: <conv(z), x> == <z, conv_transpose(x)>.
    rng = np.random.default_rng(2)
    z = rng.normal(size=[1, 8, 8, 3])
    k = rng.normal(size=[5, 5, 3, 4])
    x = rng.normal(size=[1, 4, 4, 4])
    lhs = np.sum(np_conv2d_same(z, k, 2) * x)
    rhs = np.sum(z * np_conv2d_transpose_same(x, k, 2))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


def test_masked_conv_kernel_and_gradient_ignore_masked_taps():
    rng = np.random.default_rng(3)
    layer = ar_conv(8, zerodiagonal=True, name="ar")
    x = tf.constant(rng.normal(size=[2, 5, 5, 4]).astype(np.float32))
    layer(x)
    randomize(layer, rng)
    mask = conv_ar_mask(3, 3, 4, 8, True)
    np.testing.assert_array_equal(layer.mask, mask)
    kernel = layer.kernel().numpy()
    assert np.all(kernel * (1 - mask) == 0)
    assert np.count_nonzero(kernel * mask) == np.count_nonzero(mask)
    # The masked entries of V have no effect: zero gradient there, non-zero elsewhere.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(layer(x)))
    grad = tape.gradient(loss, layer.V).numpy()
    assert np.all(grad * (1 - mask) == 0)
    assert np.count_nonzero(grad * mask) > 0.9 * np.count_nonzero(mask)
    # And the output equals the NumPy conv with the masked, normalized kernel.
    np.testing.assert_allclose(layer(x).numpy(), np_conv2d_same(x.numpy(), np_kernel(layer), 1) + layer.b.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_masked_transposed_conv_is_rejected():
    with pytest.raises(ValueError):
        WNConv2D(4, (3, 3), (2, 2), transpose=True, mask=np.ones([3, 3, 4, 4]))


def test_mask_shape_mismatch_is_rejected():
    layer = WNConv2D(4, (3, 3), mask=conv_ar_mask(3, 3, 2, 4))
    with pytest.raises(ValueError):
        layer(tf.zeros([1, 4, 4, 3]))


# ---------------------------------------------------------------- gradient
# The layer's gradient is written out (it recomputes the kernel instead of keeping it); these compare it
# with autodiff through the plain formula residual + gain * (conv(x, exp(g) * (V*mask) / ||V*mask||) + b).


def autodiff_reference(layer, x, residual=None, gain=1.0):
    v = tf.convert_to_tensor(layer.V)
    if layer.mask is not None:
        v = v * layer.mask
    direction = v / tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(v), [0, 1, 2], keepdims=True), 1e-12))
    scale = tf.exp(tf.convert_to_tensor(layer.g))
    strides = [1, *layer.strides, 1]
    if layer.transpose:
        kernel = tf.reshape(scale, [1, 1, -1, 1]) * direction
        n, h, w, _ = x.shape
        out_shape = [n, h * layer.strides[0], w * layer.strides[1], layer.filters]
        out = tf.nn.conv2d_transpose(x, kernel, out_shape, strides, "SAME")
    else:
        kernel = tf.reshape(scale, [1, 1, 1, -1]) * direction
        out = tf.nn.conv2d(x, kernel, strides, "SAME")
    out = out + layer.b
    return out if residual is None else residual + gain * out


def _layer_and_inputs(rng, in_ch, out_ch, kernel_size, stride, transpose=False, masked=False, size=8):
    mask = conv_ar_mask(*kernel_size, in_ch, out_ch) if masked else None
    layer = WNConv2D(out_ch, kernel_size, (stride, stride), transpose=transpose, mask=mask)
    x = tf.constant(rng.normal(size=[2, size, size, in_ch]), tf.float32)
    layer.build(x.shape)
    randomize(layer, rng)
    return layer, x


@pytest.mark.parametrize("in_ch,out_ch,kernel_size,stride,transpose,masked,with_residual,gain", [
    (4, 8, (3, 3), 1, False, True, True, 0.1),    # IAF hidden layer with the context as residual
    (8, 4, (3, 3), 1, False, True, False, 1.0),   # IAF head
    (6, 6, (3, 3), 2, False, False, False, 1.0),  # downsampling up_conv1
    (3, 5, (5, 5), 2, False, False, False, 1.0),  # x_enc
    (4, 4, (3, 3), 1, False, False, True, 0.1),   # residual conv of a block
    (4, 4, (3, 3), 1, False, False, True, 1.0),
    (6, 3, (5, 5), 2, True, False, False, 1.0),   # x_dec
    (6, 6, (3, 3), 2, True, False, True, 0.1),    # down_deconv2 of a downsampling block
    (4, 5, (3, 3), 2, True, False, True, 1.0),
    (5, 4, (4, 4), 2, True, False, False, 1.0),   # an even kernel: asymmetric SAME padding
    (3, 4, (3, 3), 1, True, False, True, 0.1),
])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])  # traced: the XLA weight-norm programs
def test_gradient_matches_autodiff(in_ch, out_ch, kernel_size, stride, transpose, masked, with_residual, gain,
                                   traced):
    rng = np.random.default_rng(0)
    layer, x = _layer_and_inputs(rng, in_ch, out_ch, kernel_size, stride, transpose, masked, 4 if transpose else 8)
    out_shape = layer.compute_output_shape(x.shape)
    residual = tf.constant(rng.normal(size=out_shape), tf.float32) if with_residual else None
    weights = tf.constant(rng.normal(size=out_shape), tf.float32)
    sources = [x, layer.V, layer.g, layer.b] + ([residual] if with_residual else [])

    def output_and_gradients(fn):
        with tf.GradientTape() as tape:
            tape.watch([x] + ([residual] if with_residual else []))
            out = fn()
            loss = tf.reduce_sum(out * weights)
        return [out] + tape.gradient(loss, sources)

    results = []
    for fn in (lambda: layer(x, residual=residual, gain=gain), lambda: autodiff_reference(layer, x, residual, gain)):
        with programs.enabled():
            results.append(tf.function(output_and_gradients)(fn) if traced else output_and_gradients(fn))
    for got, want, name in zip(*results, ["output", "x", "V", "g", "b", "residual"]):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-6 * np.abs(want.numpy()).max(), err_msg=name)
    if masked:  # taps the mask cuts get no gradient
        np.testing.assert_array_equal(results[0][2].numpy()[layer.mask == 0], 0.0)


def test_transposed_conv_with_residual_and_gain_matches_numpy():
    rng = np.random.default_rng(10)
    layer, x = _layer_and_inputs(rng, 6, 4, (3, 3), 2, transpose=True, size=4)
    residual = rng.normal(size=[2, 8, 8, 4]).astype(np.float32)
    out = layer(x, residual=tf.constant(residual), gain=0.1).numpy()
    expected = residual + 0.1 * (np_conv2d_transpose_same(x.numpy(), np_kernel(layer), 2) + layer.b.numpy())
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("as_programs", [False, True], ids=["plain", "programs"])
@pytest.mark.parametrize("transpose", [False, True])
def test_backward_pass_recomputes_the_kernel_after_the_forward_pass(transpose, as_programs):
    # If the backward kernel did not depend on the upstream gradient, graph optimizers would merge it
    # with the forward one (common subexpressions), which would then stay alive until the backward pass.
    layer, x = _layer_and_inputs(np.random.default_rng(11), 4, 4, (3, 3), 2 if transpose else 1, transpose,
                                 size=4)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        return tape.gradient(loss, [x, layer.V])

    with programs.enabled(as_programs):
        graph = tf.function(step).get_concrete_function(tf.TensorSpec(x.shape)).graph
    forward_type, backward_type = ("Conv2DBackpropInput", "Conv2D") if transpose else ("Conv2D", "Conv2DBackpropInput")
    (forward,) = [op for op in graph.get_operations() if op.type == forward_type]
    (backward,) = [op for op in graph.get_operations() if op.type == backward_type]
    forward_kernel, backward_kernel = forward.inputs[1], backward.inputs[1]
    assert forward_kernel is not backward_kernel
    # The tensors the backward kernel is computed from, up to the forward conv's output (through dy). By
    # tensor, not by op: as programs, one gives the forward kernel and its small scale, and the backward
    # kernel is meant to use the scale.
    ancestors, todo = set(), [backward_kernel]
    while todo:
        tensor = todo.pop()
        if tensor.ref() not in ancestors:
            ancestors.add(tensor.ref())
            if tensor.op is not forward:
                todo += list(tensor.op.inputs) + [out for op in tensor.op.control_inputs for out in op.outputs]
    assert any(t.ref() in ancestors for t in forward.outputs)
    assert forward_kernel.ref() not in ancestors


@pytest.mark.parametrize("transpose", [False, True])
def test_eager_tape_keeps_no_kernel_copies(transpose):
    # In eager mode tf.custom_gradient runs the forward function under the caller's tape, which would
    # record its ops (and hold the kernel) unless their inputs are unwatched.
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        pytest.skip("this CPU allocator keeps no statistics (TF_ENABLE_ONEDNN_OPTS=0)")
    layer = WNConv2D(512, strides=(2, 2) if transpose else (1, 1), transpose=transpose)
    x = tf.random.normal([1, 2, 2, 512])
    layer.build(x.shape)
    kernel_bytes = 3 * 3 * 512 * 512 * 4
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
        kept = tf.config.experimental.get_memory_info("CPU:0")["current"] - before
    assert kept < kernel_bytes / 2, f"{kept} bytes held after the forward pass"
    assert tape.gradient(loss, layer.V) is not None


@pytest.mark.parametrize("transpose", [False, True])
def test_bfloat16_conv_gradient_is_close_to_float32(transpose):
    rng = np.random.default_rng(1)
    layers = {dtype: WNConv2D(16, strides=(2, 2) if transpose else (1, 1), transpose=transpose, conv_dtype=dtype)
              for dtype in ("float32", "bfloat16")}
    x = tf.constant(rng.normal(size=[2, 8, 8, 16]), tf.float32)
    for layer in layers.values():
        layer.build(x.shape)
    layers["bfloat16"].set_weights(layers["float32"].get_weights())
    weights = tf.constant(rng.normal(size=layers["float32"].compute_output_shape(x.shape)), tf.float32)
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


# ---------------------------------------------------------------- data-dependent init


def _check_data_dependent_init(layer, x, init_scale):
    layer(x)  # build with random V
    v_before = layer.V.numpy().copy()
    out_init = layer(x, init=True).numpy().astype(np.float64)
    np.testing.assert_array_equal(layer.V.numpy(), v_before)  # V untouched

    # Recompute the init in float64 from the unit-norm direction conv.
    direction_out = np_apply(layer, x, np_direction(v_before, layer.mask))
    mean = direction_out.mean(axis=(0, 1, 2))
    var = direction_out.var(axis=(0, 1, 2))
    scale = init_scale / np.sqrt(var + 1e-10)

    # The returned output is standardized: per-channel mean 0, std init_scale.
    np.testing.assert_allclose(out_init.mean(axis=(0, 1, 2)), 0.0, atol=1e-5 * max(init_scale, 1))
    np.testing.assert_allclose(out_init.std(axis=(0, 1, 2)), init_scale, rtol=1e-3)
    np.testing.assert_allclose(out_init, scale * (direction_out - mean), rtol=1e-3, atol=1e-4 * init_scale)

    # The stored parameters: g = log(scale) / 3 (the original's quirk), b = -mean * scale.
    np.testing.assert_allclose(layer.g.numpy(), np.log(scale) / 3.0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.b.numpy(), -mean * scale, rtol=1e-3, atol=1e-5)

    # A normal call afterwards applies exp(g) = scale**(1/3), so it is NOT the standardized output.
    out = layer(x).numpy().astype(np.float64)
    expected = scale ** (1.0 / 3.0) * direction_out - mean * scale
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)
    assert np.abs(out - out_init).max() > 1e-2
    return out_init


def test_data_dependent_init_plain_conv():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=[6, 8, 8, 3]) * 2.0 + 0.5).astype(np.float32)
    _check_data_dependent_init(WNConv2D(5, (3, 3)), x, 0.1)


def test_data_dependent_init_strided_conv():
    rng = np.random.default_rng(5)
    x = rng.normal(size=[4, 8, 8, 3]).astype(np.float32)
    _check_data_dependent_init(WNConv2D(6, (5, 5), (2, 2)), x, 0.1)


def test_data_dependent_init_transposed_conv():
    rng = np.random.default_rng(6)
    x = (rng.normal(size=[4, 4, 4, 5]) + 1.0).astype(np.float32)
    _check_data_dependent_init(WNConv2D(3, (5, 5), (2, 2), transpose=True), x, 0.1)


def test_data_dependent_init_masked_conv_uses_scale_one():
    rng = np.random.default_rng(7)
    x = rng.normal(size=[4, 6, 6, 4]).astype(np.float32)
    layer = ar_conv(8, zerodiagonal=False, name="ar_init")
    assert layer.init_scale == 1.0
    out = _check_data_dependent_init(layer, x, 1.0)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, rtol=1e-3)


# ---------------------------------------------------------------- autoregressive network


@pytest.mark.parametrize("context_kind", ["zero", "random"])
def test_ar_multiconv_jacobian_is_strictly_triangular(context_kind):
    rng = np.random.default_rng(8)
    height = width = 4
    channels, hidden = 4, 8
    net = ARMultiConv(in_channels=channels, hidden_sizes=[hidden, hidden], output_sizes=[channels, channels])
    init_z = tf.constant(rng.normal(size=[8, height, width, channels]).astype(np.float32))
    init_context = tf.constant(rng.normal(size=[8, height, width, hidden]).astype(np.float32))
    net(init_z, init_context, init=True)  # data-dependent init: weights and biases are non-trivial
    for conv in net.named_convs().values():
        assert np.abs(conv.g.numpy()).max() > 0 and np.abs(conv.b.numpy()).max() > 0

    z = tf.constant(rng.normal(size=[1, height, width, channels]).astype(np.float32))
    if context_kind == "zero":
        context = tf.zeros([1, height, width, hidden])
    else:
        context = tf.constant(rng.normal(size=[1, height, width, hidden]).astype(np.float32))

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        heads = net(z, context)
    assert len(heads) == 2
    allowed = raster_allowed(height, width, channels)
    n = height * width * channels
    for head in heads:
        assert head.shape == (1, height, width, channels)
        jac = tape.jacobian(head, z).numpy().reshape(n, n)  # rows: output (y, x, c); columns: input
        assert np.all(jac[~allowed] == 0), "output depends on an input at or before it in the ordering"
        nonzero = np.count_nonzero(jac[allowed]) / allowed.sum()
        assert nonzero > 0.5, f"only {nonzero:.2f} of the allowed dependencies are present"
        # In particular the same-position earlier channels are used.
        for c in range(1, channels):
            assert np.count_nonzero(jac[c, :c]) > 0
    del tape


def test_ar_multiconv_structure_matches_original():
    net = ARMultiConv(in_channels=4, hidden_sizes=[8, 8], output_sizes=[4, 4])
    convs = net.named_convs()
    assert sorted(convs) == ["layer_0", "layer_1", "layer_out_0", "layer_out_1"]
    net(tf.zeros([1, 3, 3, 4]), tf.zeros([1, 3, 3, 8]))
    np.testing.assert_array_equal(convs["layer_0"].mask, conv_ar_mask(3, 3, 4, 8, False))
    np.testing.assert_array_equal(convs["layer_1"].mask, conv_ar_mask(3, 3, 8, 8, False))
    np.testing.assert_array_equal(convs["layer_out_0"].mask, conv_ar_mask(3, 3, 8, 4, True))
    np.testing.assert_array_equal(convs["layer_out_1"].mask, conv_ar_mask(3, 3, 8, 4, True))
    assert all(c.init_scale == 1.0 for c in convs.values())


def test_ar_multiconv_adds_context_after_first_layer():
    rng = np.random.default_rng(9)
    net = ARMultiConv(in_channels=2, hidden_sizes=[4], output_sizes=[2])
    z = tf.constant(rng.normal(size=[1, 3, 3, 2]).astype(np.float32))
    context = tf.constant(rng.normal(size=[1, 3, 3, 4]).astype(np.float32))
    (out,) = net(z, context)
    layer0, head = net.hidden[0], net.heads[0]
    hidden = layer0(z).numpy().astype(np.float64) + context.numpy()
    hidden = np.where(hidden > 0, hidden, np.expm1(hidden))
    expected = np_conv2d_same(hidden, np_kernel(head), 1) + head.b.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_layer", [
    lambda: WNConv2D(8, conv_dtype="bfloat16"),
    lambda: ARMultiConv(8, [8], [8, 8], conv_dtype="bfloat16"),
], ids=["WNConv2D", "ARMultiConv"])
def test_bfloat16_layers_take_bfloat16_inputs_without_a_float32_round_trip(make_layer):
    # Keras casts a layer's floating inputs to its float32 compute dtype unless told not to; that would
    # keep a float32 and a bfloat16 copy of each activation in a mixed-precision step.
    layer = make_layer()
    x = tf.random.normal([2, 4, 4, 8])
    args = (x, x) if isinstance(layer, ARMultiConv) else (x,)
    layer(*args)  # builds the float32 variables
    bf16 = [tf.TensorSpec(a.shape, tf.bfloat16) for a in args]
    graph = tf.function(lambda *a: layer(*a)).get_concrete_function(*bf16).graph
    up_casts = [op.name for op in graph.get_operations()
                if op.type == "Cast" and op.get_attr("SrcT") == tf.bfloat16 and op.get_attr("DstT") == tf.float32]
    assert up_casts == []
    outputs = tf.nest.flatten(graph.structured_outputs)
    assert outputs and all(t.dtype == tf.bfloat16 for t in outputs)
