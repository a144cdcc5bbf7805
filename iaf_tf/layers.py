"""The Keras layers: weight-normalized (masked) convolutions (`WNConv2D`, computed by iaf_tf.weight_norm)
and the autoregressive network of an IAF step.

Everything is NHWC. The parameterization is the original's: a direction `V`, a log-scale `g` and a
bias `b`, with kernel = exp(g) * V / ||V||. Masks and the normalization are applied functionally in
`call()`, so the variables only ever hold what the optimizer wrote (safe under MirroredStrategy).
"""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from iaf_tf import weight_norm
from iaf_tf.variables import Untracked


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


@keras.saving.register_keras_serializable(package="iaf_tf")
class WNConv2D(keras.layers.Layer):
    """Weight-normalized 2-D convolution (or transposed convolution) with data-dependent init.

    Variables as in the original: `V` is [kh, kw, in, out] for a convolution and [kh, kw, out, in] for a
    transposed one; `g` and `b` are per output channel. In both cases the norm runs over the first three
    axes of `V` (for the transposed kernel that is kh, kw, out per input channel, as the original does).

    `conv_dtype` is the dtype the convolution computes in (bfloat16 for mixed precision): the input and
    the kernel are cast to it, the kernel itself is always computed from the float32 variables.

    `mask` is a fixed 0/1 array of V's shape; `ar_zerodiagonal` (True or False) makes it the IAF network's
    autoregressive mask (see conv_ar_mask) for whatever input channels the layer is built with.
    """

    def __init__(self, filters, kernel_size=(3, 3), strides=(1, 1), transpose=False, init_scale=0.1,
                 mask=None, conv_dtype="float32", ar_zerodiagonal=None, **kwargs):
        # Keras would cast floating inputs to the layer's float32 compute dtype; the dtypes here are ours.
        super().__init__(autocast=False, **kwargs)
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.transpose = transpose
        self.init_scale = init_scale
        self.mask = None if mask is None else np.asarray(mask, np.float32)
        self.ar_zerodiagonal = ar_zerodiagonal
        self.conv_dtype = tf.as_dtype(conv_dtype)
        self.input_grid = None  # (H, W) of the input, set by build
        self._given = None  # (V, g, b, mask) tensors that `call` uses instead of the variables (see given_weights)
        if transpose and (mask is not None or ar_zerodiagonal is not None):
            raise ValueError("masked transposed convolutions are not supported")
        if mask is not None and ar_zerodiagonal is not None:
            raise ValueError("give mask or ar_zerodiagonal, not both")

    def build(self, input_shape):
        # For the analytic FLOP count (iaf_tf.flops), which needs the grid the conv runs on.
        self.input_grid = tuple(input_shape[1:3])
        in_channels = int(input_shape[-1])
        kh, kw = self.kernel_size
        shape = [kh, kw, self.filters, in_channels] if self.transpose else [kh, kw, in_channels, self.filters]
        if self.ar_zerodiagonal is not None:
            self.mask = conv_ar_mask(kh, kw, in_channels, self.filters, self.ar_zerodiagonal)
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
                self._mask_variable = Untracked(tf.Variable(self.mask, trainable=False, name="mask"))

    @property
    def _mask(self):
        return None if self._mask_variable is None else tf.convert_to_tensor(self._mask_variable.value)

    def weight_tensors(self):
        """(V, g, b, mask or None) as tensors: what `call` computes with."""
        return (*(tf.convert_to_tensor(w) for w in (self.V, self.g, self.b)), self._mask)

    @contextlib.contextmanager
    def given_weights(self, weights):
        """`call` computes with `weights` (as from weight_tensors(), of another layer of the same shapes) for
        the duration: how one traced program serves every block of a model (model.CVAE)."""
        self._given = tuple(weights)
        try:
            yield
        finally:
            self._given = None

    def get_config(self):
        mask = None if self.mask is None or self.ar_zerodiagonal is not None else self.mask.tolist()
        return dict(super().get_config(), filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                    transpose=self.transpose, init_scale=self.init_scale, mask=mask,
                    conv_dtype=self.conv_dtype.name, ar_zerodiagonal=self.ar_zerodiagonal)

    def direction(self):
        """The masked, unit-norm kernel direction."""
        return weight_norm.wn_kernel(tf.convert_to_tensor(self.V), mask=self._mask)[0]

    def kernel(self, gain=1.0):
        """exp(g) * direction (times a constant `gain`), float32."""
        return weight_norm.wn_kernel(tf.convert_to_tensor(self.V), tf.convert_to_tensor(self.g), self._mask, gain,
                          self.transpose)[0]

    def call(self, x, init=False, residual=None, gain=1.0, elu_input=False):
        """conv(x) + b in `conv_dtype`; with `residual`: residual + gain * (conv(x) + b) in the residual's
        dtype, the constant gain folded into kernel and bias so that the sum is one fused op. With
        `elu_input`, conv(elu(x)) (the ELU in `conv_dtype`), for an x that other ops read as well."""
        v, g, b, mask = self._given or self.weight_tensors()
        if elu_input:
            x = weight_norm.elu_of_shared(tf.cast(x, self.conv_dtype), b)
        if init:
            out = self._data_dependent_init(x)
            if residual is None:
                return out
            return residual + (gain * out if gain != 1.0 else tf.cast(out, residual.dtype))
        return weight_norm.wn_conv2d(tf.cast(x, self.conv_dtype), v, g, b, residual, mask, self.strides, gain,
                          self.transpose)

    def _data_dependent_init(self, x):
        """Standardize the output on this batch to `init_scale` and store the matching g and b.

        The original stores g = log(scale) / 3 (so the trained layer starts at scale**(1/3), not at the
        scale it just measured) while returning the exactly standardized output for the layers above it.
        Both quirks change the numbers, so both are kept. It runs in float32 whatever `conv_dtype` is.
        """
        out = weight_norm.plain_conv(tf.cast(x, tf.float32), self.direction(), [1, *self.strides, 1], self.transpose,
                                     self.filters)
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


def ar_conv(filters, zerodiagonal, name, kernel_size=(3, 3), conv_dtype="float32"):
    """A masked 3x3 weight-normed conv as the IAF network uses them (data-dependent init scale 1.0)."""
    return WNConv2D(filters, kernel_size, init_scale=1.0, ar_zerodiagonal=zerodiagonal, name=name,
                    conv_dtype=conv_dtype)


@keras.saving.register_keras_serializable(package="iaf_tf")
class ARMultiConv(keras.layers.Layer):
    """The IAF step's autoregressive network: masked hidden layers (context added after the first), ELU,
    then one masked head per output (mean and log-scale shifts), each blind to its own channel."""

    def __init__(self, in_channels, hidden_sizes, output_sizes, use_context=True, conv_dtype="float32", **kwargs):
        super().__init__(autocast=False, **kwargs)  # keeps a bfloat16 context bfloat16
        self.in_channels, self.hidden_sizes, self.output_sizes = in_channels, list(hidden_sizes), list(output_sizes)
        self.use_context = use_context
        self.conv_dtype = tf.as_dtype(conv_dtype)
        self.hidden = [ar_conv(size, zerodiagonal=False, name=f"layer_{i}", conv_dtype=conv_dtype)
                       for i, size in enumerate(hidden_sizes)]
        self.heads = [ar_conv(size, zerodiagonal=True, name=f"layer_out_{i}", conv_dtype=conv_dtype)
                      for i, size in enumerate(output_sizes)]

    def build(self, z_shape, context_shape=None):
        shape = list(z_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + [layer.filters]
        for head in self.heads:
            head.build(shape)

    def get_config(self):
        return dict(super().get_config(), in_channels=self.in_channels, hidden_sizes=self.hidden_sizes,
                    output_sizes=self.output_sizes, use_context=self.use_context, conv_dtype=self.conv_dtype.name)

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


@keras.saving.register_keras_serializable(package="iaf_tf")
class IAFShift(keras.layers.Layer):
    """The IAF step's transform of a sample z, given the AR network's outputs for it: (z - scale * m) /
    exp(scale * s); returns (new z, scale * s, the log-density change per element). Without s (a mean-only
    step, the Theano system's iaf1_nl) it returns (z - scale * m, zeros). The original's scale is 0.1."""

    def __init__(self, scale=0.1, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.scale = scale

    def call(self, z, mean_shift, log_scale_shift=None):
        z = z - self.scale * tf.cast(mean_shift, z.dtype)
        if log_scale_shift is None:
            return z, tf.zeros_like(z)
        log_scale = self.scale * tf.cast(log_scale_shift, z.dtype)
        return z / tf.exp(log_scale), log_scale

    def get_config(self):
        return dict(super().get_config(), scale=self.scale)
