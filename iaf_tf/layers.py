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


class WNConv2D(keras.layers.Layer):
    """Weight-normalized 2-D convolution (or transposed convolution) with data-dependent init.

    Variables as in the original: `V` is [kh, kw, in, out] for a convolution and [kh, kw, out, in] for a
    transposed one; `g` and `b` are per output channel. In both cases the norm runs over the first three
    axes of `V` (for the transposed kernel that is kh, kw, out per input channel, as the original does).
    """

    def __init__(self, filters, kernel_size=(3, 3), strides=(1, 1), transpose=False, init_scale=0.1,
                 mask=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.transpose = transpose
        self.init_scale = init_scale
        self.mask = None if mask is None else np.asarray(mask, np.float32)
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

    def direction(self):
        """The masked, unit-norm kernel direction."""
        v = tf.convert_to_tensor(self.V)
        if self.mask is not None:
            v = v * self.mask
        return _l2_normalize(v, [0, 1, 2])

    def kernel(self):
        scale = tf.exp(tf.convert_to_tensor(self.g))
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

    def call(self, x, init=False):
        if init:
            return self._data_dependent_init(x)
        return self._apply(x, self.kernel()) + tf.cast(self.b, x.dtype)

    def _data_dependent_init(self, x):
        """Standardize the output on this batch to `init_scale` and store the matching g and b.

        The original stores g = log(scale) / 3 (so the trained layer starts at scale**(1/3), not at the
        scale it just measured) while returning the exactly standardized output for the layers above it.
        Both quirks change the numbers, so both are kept.
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


def ar_conv(filters, in_channels, zerodiagonal, name, kernel_size=(3, 3)):
    """A masked 3x3 weight-normed conv as the IAF network uses them (data-dependent init scale 1.0)."""
    mask = conv_ar_mask(*kernel_size, in_channels, filters, zerodiagonal)
    return WNConv2D(filters, kernel_size, init_scale=1.0, mask=mask, name=name)


class ARMultiConv(keras.layers.Layer):
    """The IAF step's autoregressive network: masked hidden layers (context added after the first), ELU,
    then one masked head per output (mean and log-scale shifts), each blind to its own channel."""

    def __init__(self, in_channels, hidden_sizes, output_sizes, use_context=True, **kwargs):
        super().__init__(**kwargs)
        self.use_context = use_context
        self.hidden = []
        channels = in_channels
        for i, size in enumerate(hidden_sizes):
            self.hidden.append(ar_conv(size, channels, zerodiagonal=False, name=f"layer_{i}"))
            channels = size
        self.heads = [ar_conv(size, channels, zerodiagonal=True, name=f"layer_out_{i}")
                      for i, size in enumerate(output_sizes)]

    def call(self, z, context=None, init=False):
        x = z
        for i, layer in enumerate(self.hidden):
            x = layer(x, init=init)
            if i == 0 and self.use_context:
                x = x + context
            x = tf.nn.elu(x)
        return [head(x, init=init) for head in self.heads]

    def named_convs(self):
        return {layer.name: layer for layer in self.hidden + self.heads}
