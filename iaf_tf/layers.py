"""Weight-normalized (masked) convolutions and the autoregressive network of an IAF step.

Everything is NHWC. The parameterization is the original's: a direction `V`, a log-scale `g` and a
bias `b`, with kernel = exp(g) * V / ||V||. Masks and the normalization are applied functionally in
`call()`, so the variables only ever hold what the optimizer wrote (safe under MirroredStrategy).
"""

import math

import keras
import numpy as np
import tensorflow as tf

# tf.nn.l2_normalize's floor on the squared norm, which the original's kernels go through.
_L2_EPSILON = 1e-12


def _l2_normalize(v, axes):
    return v * tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(v), axes, keepdims=True), _L2_EPSILON))


def linear_ar_mask(n_in, n_out, zerodiagonal=False):
    """[n_in, n_out] 0/1 mask that lets output group i see input groups up to i (before i if zerodiagonal).

    Channel groups: when n_out >= n_in each input channel owns n_out // n_in consecutive outputs, and the
    other way round when n_in > n_out.
    """
    if n_in % n_out and n_out % n_in:
        raise ValueError(f"autoregressive mask needs one channel count to divide the other, got {n_in} and {n_out}")
    rows = np.arange(n_in)[:, None]
    cols = np.arange(n_out)[None, :]
    if n_out >= n_in:
        group = cols // (n_out // n_in)  # the input channel each output belongs to
        allowed = rows < group if zerodiagonal else rows <= group
    else:
        ratio = n_in // n_out
        limit = cols * ratio if zerodiagonal else (cols + 1) * ratio
        allowed = rows < limit
    return allowed.astype(np.float32)


def conv_ar_mask(kh, kw, n_in, n_out, zerodiagonal=False):
    """[kh, kw, n_in, n_out] mask of the original: rows above the centre and taps left of it are cut, the
    centre tap carries the channel ordering. With cross-correlation this makes position (y, x) depend on
    the inputs after it in raster order (rows below, and to the right in its own row)."""
    mask = np.ones([kh, kw, n_in, n_out], dtype=np.float32)
    cy, cx = (kh - 1) // 2, (kw - 1) // 2
    mask[:cy] = 0.0
    mask[cy, :cx] = 0.0
    mask[cy, cx] = linear_ar_mask(n_in, n_out, zerodiagonal)
    return mask


def _weight_norm(v, g, mask, gain):
    """Kernel gain * exp(g) * w / ||w|| of a [kh, kw, in, out] direction w = v * mask (norms per output
    channel), with the ops of `_l2_normalize`, and what its gradient needs."""
    w = v if mask is None else v * mask
    sq_norm = tf.reduce_sum(tf.square(w), [0, 1, 2], keepdims=True)
    inv_norm = tf.math.rsqrt(tf.maximum(sq_norm, _L2_EPSILON))
    scale = tf.reshape(tf.exp(g), [1, 1, 1, -1])
    if gain != 1.0:
        scale = scale * gain
    return scale * (w * inv_norm), (sq_norm, inv_norm, scale)


def _weight_norm_grad(dk, v, mask, sq_norm, inv_norm, scale):
    """(d/dv, d/dg) of `_weight_norm` given d/dkernel.

    kernel = s w r with r = max(|w|^2, eps)^-1/2, so d/dw = s r dk - s r^3 <dk, w> w (no second term where
    the floor holds) and d/dg = s r <dk, w>; the mask zeroes what it cut (w = v * mask, mask is 0/1).
    """
    w = v if mask is None else v * mask
    dot = tf.reduce_sum(dk * w, [0, 1, 2], keepdims=True)
    scaled = scale * inv_norm
    norm_term = tf.where(sq_norm > _L2_EPSILON, -scaled * tf.square(inv_norm) * dot, tf.zeros_like(dot))
    dv = dk * scaled + v * norm_term
    if mask is not None:
        dv = dv * mask
    return dv, tf.reshape(scaled * dot, [-1])


def _wn_conv2d(x, v, g, b, residual, mask, strides, gain):
    """[residual +] conv2d(x, gain * weight-normed kernel) + gain * b, 'SAME' padding, computed in x.dtype.

    The gradient is written out so that the backward pass recomputes the kernel from v and g (a few
    passes over the weights) instead of keeping every layer's kernel alive from the forward pass, and
    the masked and normalized copies that autodiff would keep as well: for the README recipe that is
    160 MB per copy. The forward ops are those of the autodiff version (Conv2D, BiasAdd, AddV2, which
    oneDNN fuses into one op) and so are the backward convolutions.
    """
    strides = [1, *strides, 1]
    has_residual = residual is not None

    @tf.custom_gradient
    def conv(x, v, g, b, *rest):
        kernel, _ = _weight_norm(v, g, mask, gain)
        out = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), strides=strides, padding="SAME")
        out = tf.nn.bias_add(out, tf.cast(b * gain if gain != 1.0 else b, x.dtype))
        if has_residual:
            out = rest[0] + tf.cast(out, rest[0].dtype)

        def grad(dy):
            kernel, (sq_norm, inv_norm, scale) = _weight_norm(v, g, mask, gain)
            dy_conv = tf.cast(dy, x.dtype)
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=tf.cast(kernel, x.dtype),
                                                out_backprop=dy_conv, strides=strides, padding="SAME")
            dk = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(kernel), out_backprop=dy_conv,
                                                 strides=strides, padding="SAME")
            # In float32 even when the conv is bfloat16: a bfloat16 sum over batch and positions is too coarse.
            db = tf.raw_ops.BiasAddGrad(out_backprop=tf.cast(dy, b.dtype))
            if gain != 1.0:
                db = db * gain
            dv, dg = _weight_norm_grad(tf.cast(dk, v.dtype), v, mask, sq_norm, inv_norm, scale)
            return (dx, dv, dg, db) + ((dy,) if has_residual else ())

        return out, grad

    return conv(x, v, g, b, *((residual,) if has_residual else ()))


class WNConv2D(keras.layers.Layer):
    """Weight-normalized 2-D convolution (or transposed convolution) with data-dependent init.

    Variables as in the original: `V` is [kh, kw, in, out] for a convolution and [kh, kw, out, in] for a
    transposed one; `g` and `b` are per output channel. In both cases the norm runs over the first three
    axes of `V` (for the transposed kernel that is kh, kw, out per input channel, as the original does).

    `conv_dtype` is the dtype the convolution computes in (bfloat16 for mixed precision): the input and
    the kernel are cast to it, the kernel itself is always computed from the float32 variables.
    """

    def __init__(self, filters, kernel_size=(3, 3), strides=(1, 1), transpose=False, init_scale=0.1,
                 mask=None, conv_dtype="float32", **kwargs):
        # Keras would cast floating inputs to the layer's float32 compute dtype; the dtypes here are ours.
        super().__init__(autocast=False, **kwargs)
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.transpose = transpose
        self.init_scale = init_scale
        self.mask = None if mask is None else np.asarray(mask, np.float32)
        self.conv_dtype = tf.as_dtype(conv_dtype)
        if transpose and mask is not None:
            raise ValueError("masked transposed convolutions are not supported")

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        kh, kw = self.kernel_size
        shape = [kh, kw, self.filters, in_channels] if self.transpose else [kh, kw, in_channels, self.filters]
        if self.mask is not None and list(self.mask.shape) != shape:
            raise ValueError(f"{self.name}: mask shape {self.mask.shape} does not match kernel shape {shape}")
        # 'mean' aggregation: the data-dependent init assigns these inside replicas.
        self.V = self.add_weight(name="V", shape=shape, initializer=keras.initializers.RandomNormal(0.0, 0.05),
                                 aggregation="mean")
        self.g = self.add_weight(name="g", shape=[self.filters], initializer="zeros", aggregation="mean")
        self.b = self.add_weight(name="b", shape=[self.filters], initializer="zeros", aggregation="mean")
        # The mask is held in a variable (one copy per device under a strategy, outside checkpoints): as a
        # NumPy constant it would be written into every traced graph (1.5 MB per IAF block at h_size 160),
        # as a captured eager tensor it would be copied to each GPU at every step.
        self._mask_variable = None
        if self.mask is not None:
            with tf.init_scope():
                self._mask_variable = _Untracked(tf.Variable(self.mask, trainable=False, name="mask"))

    @property
    def _mask(self):
        return None if self._mask_variable is None else tf.convert_to_tensor(self._mask_variable.item)

    def direction(self):
        """The masked, unit-norm kernel direction."""
        v = tf.convert_to_tensor(self.V)
        if self.mask is not None:
            v = v * self._mask
        return _l2_normalize(v, [0, 1, 2])

    def kernel(self, gain=1.0):
        """exp(g) * direction (times a constant `gain`), float32."""
        scale = tf.exp(tf.convert_to_tensor(self.g))
        if gain != 1.0:
            scale = scale * gain
        scale = tf.reshape(scale, [1, 1, -1, 1] if self.transpose else [1, 1, 1, -1])
        return scale * self.direction()

    def _apply(self, x, kernel):
        kernel = tf.cast(kernel, x.dtype)
        if not self.transpose:
            return tf.nn.conv2d(x, kernel, strides=[1, *self.strides, 1], padding="SAME")
        batch = tf.shape(x)[0]
        height, width = x.shape[1] * self.strides[0], x.shape[2] * self.strides[1]
        return tf.nn.conv2d_transpose(x, kernel, output_shape=[batch, height, width, self.filters],
                                      strides=[1, *self.strides, 1], padding="SAME")

    def call(self, x, init=False, residual=None, gain=1.0):
        """conv(x) + b in `conv_dtype`; with `residual`: residual + gain * (conv(x) + b) in the residual's
        dtype, the constant gain folded into kernel and bias so that the sum is one fused op."""
        if init:
            out = self._data_dependent_init(x)
            if residual is None:
                return out
            return residual + (gain * out if gain != 1.0 else tf.cast(out, residual.dtype))
        x = tf.cast(x, self.conv_dtype)
        if not self.transpose:
            return _wn_conv2d(x, tf.convert_to_tensor(self.V), tf.convert_to_tensor(self.g),
                              tf.convert_to_tensor(self.b), residual, self._mask, self.strides, gain)
        bias = tf.convert_to_tensor(self.b)
        out = tf.nn.bias_add(self._apply(x, self.kernel(gain)), tf.cast(bias * gain if gain != 1.0 else bias, x.dtype))
        return out if residual is None else residual + tf.cast(out, residual.dtype)

    def _data_dependent_init(self, x):
        """Standardize the output on this batch to `init_scale` and store the matching g and b.

        The original stores g = log(scale) / 3 (so the trained layer starts at scale**(1/3), not at the
        scale it just measured) while returning the exactly standardized output for the layers above it.
        Both quirks change the numbers, so both are kept. It runs in float32 whatever `conv_dtype` is.
        """
        x = tf.cast(x, tf.float32)
        out = self._apply(x, self.direction())
        mean, variance = tf.nn.moments(out, axes=[0, 1, 2])
        scale = self.init_scale / tf.sqrt(variance + 1e-10)
        self.g.assign(tf.math.log(scale) / 3.0)
        self.b.assign(-mean * scale)
        return scale * (out - mean)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        if self.transpose:
            h, w = h * self.strides[0], w * self.strides[1]
        else:
            h, w = math.ceil(h / self.strides[0]), math.ceil(w / self.strides[1])
        return (input_shape[0], h, w, self.filters)


class _Untracked:
    """Hides a variable from Keras and checkpoint tracking."""

    def __init__(self, item):
        self.item = item


def ar_conv(filters, in_channels, zerodiagonal, name, kernel_size=(3, 3), conv_dtype="float32"):
    """A masked 3x3 weight-normed conv as the IAF network uses them (data-dependent init scale 1.0)."""
    mask = conv_ar_mask(*kernel_size, in_channels, filters, zerodiagonal)
    return WNConv2D(filters, kernel_size, init_scale=1.0, mask=mask, name=name, conv_dtype=conv_dtype)


class ARMultiConv(keras.layers.Layer):
    """The IAF step's autoregressive network: masked hidden layers (context added after the first), ELU,
    then one masked head per output (mean and log-scale shifts), each blind to its own channel."""

    def __init__(self, in_channels, hidden_sizes, output_sizes, use_context=True, conv_dtype="float32", **kwargs):
        super().__init__(autocast=False, **kwargs)  # keeps a bfloat16 context bfloat16
        self.use_context = use_context
        self.hidden = []
        channels = in_channels
        for i, size in enumerate(hidden_sizes):
            self.hidden.append(ar_conv(size, channels, zerodiagonal=False, name=f"layer_{i}", conv_dtype=conv_dtype))
            channels = size
        self.heads = [ar_conv(size, channels, zerodiagonal=True, name=f"layer_out_{i}", conv_dtype=conv_dtype)
                      for i, size in enumerate(output_sizes)]

    def call(self, z, context=None, init=False):
        """Outputs in the convs' `conv_dtype` (float32 during the data-dependent init)."""
        x = z
        for i, layer in enumerate(self.hidden):
            # The context joins as the conv's residual: (conv + b) + context in one fused op.
            x = layer(x, init=init, residual=context if i == 0 and self.use_context else None)
            x = tf.nn.elu(x)
        return [head(x, init=init) for head in self.heads]

    def named_convs(self):
        return {layer.name: layer for layer in self.hidden + self.heads}
