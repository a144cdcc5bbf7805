"""Weight-normalized (masked) convolutions and the autoregressive network of an IAF step.

Everything is NHWC. The parameterization is the original's: a direction `V`, a log-scale `g` and a
bias `b`, with kernel = exp(g) * V / ||V||. Masks and the normalization are applied functionally in
`call()`, so the variables only ever hold what the optimizer wrote (safe under MirroredStrategy).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from iaf_tf.programs import compiled
from iaf_tf.variables import Untracked

# tf.nn.l2_normalize's floor on the squared norm, which the original's kernels go through.
_L2_EPSILON = 1e-12


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


def _wn_kernel(v, g=None, mask=None, gain=1.0, transpose=False):
    """gain * exp(g) * w / ||w|| with w = v * mask, and what `_wn_kernel_grad` needs.

    The norm runs over the first three axes of v; exp(g) scales axis 3 of a conv's [kh, kw, in, out]
    kernel and axis 2 of a transposed conv's [kh, kw, out, in] one (its output channels). Without g
    (and gain 1) this is the unit direction. The squared norm is floored as tf.nn.l2_normalize floors it.

    Everything per channel is folded into one small `scale` (gain * exp(g) / ||w||: [out] for a conv,
    [out, in] for a transposed conv), so the kernel is one multiplication of w: kernel = w * scale.
    Returns (kernel, (scale, sq_norm, floored)), the last two per axis-3 channel.
    """
    w = v if mask is None else v * mask
    sq_norm = tf.reduce_sum(tf.square(w), axis=[0, 1, 2])  # one pass in XLA (an einsum is a transpose and a dot)
    floored = tf.maximum(sq_norm, _L2_EPSILON)
    scale = tf.math.rsqrt(floored)
    if g is not None:
        scale = (tf.reshape(tf.exp(g), [-1, 1]) if transpose else tf.exp(g)) * scale
    if gain != 1.0:
        scale = scale * gain
    return w * scale, (scale, sq_norm, floored)


def _wn_kernel_grad(dk, kernel, v, mask, scale, sq_norm, floored, transpose=False):
    """(d/dv, d/dg) of `_wn_kernel` given d/dkernel, from its per-channel outputs and the kernel.

    With r = max(|w|^2, eps)^-1/2 and s = scale: d/dw = s dk - r^2 <dk, kernel> w, the sum over the norm's
    axes and the second term absent where the floor holds. The mask zeroes what it cut (it is 0/1, so
    mask * w = mask * v). The kernel is proportional to exp(g), so d/dg is <dk, kernel> per scaled channel:
    the same sum for a conv, the sum over the other axes for a transposed conv.
    """
    product = dk * kernel
    dot = tf.reduce_sum(product, axis=[0, 1, 2])
    dg = tf.reduce_sum(product, axis=[0, 1, 3]) if transpose else dot
    coefficient = tf.where(sq_norm > _L2_EPSILON, dot / floored, 0.0)
    dv = scale * dk - coefficient * v
    if mask is not None:
        dv = dv * mask
    return dv, dg


def _conv(x, kernel, strides, transpose, filters):
    """'SAME' conv2d, or conv2d_transpose to stride times x's (static) size, computed in x.dtype."""
    kernel = tf.cast(kernel, x.dtype)
    if not transpose:
        return tf.nn.conv2d(x, kernel, strides=strides, padding="SAME")
    output_shape = [tf.shape(x)[0], x.shape[1] * strides[1], x.shape[2] * strides[2], filters]
    return tf.nn.conv2d_transpose(x, kernel, output_shape=output_shape, strides=strides, padding="SAME")


def _after(dy, v):
    """v, as a tensor that exists only once dy does.

    Without this data dependency the graph optimizers (Grappler's common-subexpression pass, XLA's CSE)
    merge the backward pass's kernel recomputation with the forward one, and the forward's kernel and
    masked copies stay alive until the backward pass after all. The added term, first - first for one
    element of dy, is 0 for finite dy (NaN otherwise, when the gradient is NaN anyway); TF's
    recompute_grad guards the same way.
    """
    first = tf.cast(dy[(0,) * dy.shape.rank], v.dtype)
    return v + (first - first)


# Without jit_compile each of the small ops of the weight norm would be a kernel launch of its own (about
# 20 a conv): as programs they are three a conv (iaf_tf.programs).
@compiled
def _forward_kernel_and_bias(v, g, b, mask, gain, transpose):
    """_wn_kernel, and the bias times gain."""
    return _wn_kernel(v, g, mask, gain, transpose), b * gain


@compiled
def _weight_norm_grads(dk, db, kernel, v, mask, scale, sq_norm, floored, gain, transpose):
    """_wn_kernel_grad's (d/dv, d/dg), and d/db from the bias-add's gradient db."""
    return (*_wn_kernel_grad(dk, kernel, v, mask, scale, sq_norm, floored, transpose), db * gain)


@compiled
def _recomputed_kernel(dy, v, scale, mask):
    """The backward pass's kernel, and the scale it is made with (see _wn_conv2d's grad)."""
    scale_now = _after(dy, scale)
    return (v * scale_now if mask is None else v * scale_now * mask), scale_now


def _static_shape(x):
    """x's shape as a list when it is fully known (no Shape op to run), else the tensor."""
    return x.shape.as_list() if x.shape.is_fully_defined() else tf.shape(x)


def _wn_conv2d(x, v, g, b, residual, mask, strides, gain, transpose=False):
    """[residual +] conv(x, gain * weight-normed kernel) + gain * b, 'SAME' padding, computed in x.dtype;
    conv is conv2d, or conv2d_transpose with `transpose`.

    The gradient is written out so that the backward pass recomputes the kernel from v and the forward's
    per-channel scale (a pass or two over the weights) instead of keeping every layer's kernel alive from the
    forward pass, and the masked and normalized copies that autodiff would keep as well: for the README
    recipe that is 160 MB per copy. The forward ops are those of the autodiff version (Conv2D or
    Conv2DBackpropInput, BiasAdd, AddV2, which oneDNN fuses for the conv) and so are the backward
    convolutions.
    """
    strides = [1, *strides, 1]
    has_residual = residual is not None
    filters = v.shape[2] if transpose else v.shape[3]

    @tf.custom_gradient
    def conv(x, v, g, b, *rest):
        # Unwatched: an eager tape would otherwise record the ops below and keep the kernel and its
        # intermediates alive until the backward pass, although the gradient comes from grad().
        x, v, g, b, *rest = (tf.stop_gradient(t) for t in (x, v, g, b, *rest))
        (kernel, (scale, sq_norm, floored)), bias = _forward_kernel_and_bias(v, g, b, mask, gain, transpose)
        out = _conv(x, kernel, strides, transpose, filters)
        out = tf.nn.bias_add(out, tf.cast(bias, x.dtype))
        if has_residual:
            out = rest[0] + tf.cast(out, rest[0].dtype)

        def grad(dy):
            # The per-channel numbers are the forward's (a few floats each); the kernel, as large as v, is
            # computed again, from a scale that depends on dy (the same numbers: the mask is 0/1).
            kernel, scale_now = _recomputed_kernel(dy, v, scale, mask)
            dy_conv = tf.cast(dy, x.dtype)
            kernel_conv = tf.cast(kernel, x.dtype)
            kernel_shape = v.shape.as_list()
            if transpose:
                # conv2d_transpose(x, K) is the input gradient of conv2d(., K): the gradients swap roles.
                dx = tf.nn.conv2d(dy_conv, kernel_conv, strides=strides, padding="SAME")
                dk = tf.raw_ops.Conv2DBackpropFilter(input=dy_conv, filter_sizes=kernel_shape, out_backprop=x,
                                                     strides=strides, padding="SAME")
            else:
                dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=_static_shape(x), filter=kernel_conv,
                                                    out_backprop=dy_conv, strides=strides, padding="SAME")
                dk = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=kernel_shape, out_backprop=dy_conv,
                                                     strides=strides, padding="SAME")
            # In float32 even when the conv is bfloat16: a bfloat16 sum over batch and positions is too coarse.
            db = tf.raw_ops.BiasAddGrad(out_backprop=tf.cast(dy, b.dtype))
            dv, dg, db = _weight_norm_grads(tf.cast(dk, v.dtype), db, kernel, v, mask, scale_now, sq_norm, floored,
                                            gain, transpose)
            return (dx, dv, dg, db) + ((dy,) if has_residual else ())

        return out, grad

    return conv(x, v, g, b, *((residual,) if has_residual else ()))


def _elu_of_shared(x, after):
    """elu(x), as an op with a control input from `after` (any tensor that x does not depend on).

    Grappler's remapper (TF 2.21, oneDNN CPU build) fuses Conv2D + BiasAdd + Add + Elu into one
    _FusedConv2D without checking that the Add has no other consumer, and deletes the Add: when x is a
    residual stream (a fused residual sum that the next residual sum or a resize reads too), that leaves
    those consumers without an input, the pass fails ("remapper failed: ... fanout ... exist for missing
    node .../add") and none of its rewrites of the graph are kept. The remapper leaves an activation that
    has control inputs alone, so the Add is fused into the conv alone (Conv2D + BiasAdd + Add) and the ELU
    runs on its own. The value is elu(x) exactly.
    """
    with tf.control_dependencies([after]):
        return tf.nn.elu(x)


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

    def get_config(self):
        mask = None if self.mask is None or self.ar_zerodiagonal is not None else self.mask.tolist()
        return dict(super().get_config(), filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                    transpose=self.transpose, init_scale=self.init_scale, mask=mask,
                    conv_dtype=self.conv_dtype.name, ar_zerodiagonal=self.ar_zerodiagonal)

    def direction(self):
        """The masked, unit-norm kernel direction."""
        return _wn_kernel(tf.convert_to_tensor(self.V), mask=self._mask)[0]

    def kernel(self, gain=1.0):
        """exp(g) * direction (times a constant `gain`), float32."""
        return _wn_kernel(tf.convert_to_tensor(self.V), tf.convert_to_tensor(self.g), self._mask, gain,
                          self.transpose)[0]

    def call(self, x, init=False, residual=None, gain=1.0, elu_input=False):
        """conv(x) + b in `conv_dtype`; with `residual`: residual + gain * (conv(x) + b) in the residual's
        dtype, the constant gain folded into kernel and bias so that the sum is one fused op. With
        `elu_input`, conv(elu(x)) (the ELU in `conv_dtype`), for an x that other ops read as well."""
        v, g, b = (tf.convert_to_tensor(w) for w in (self.V, self.g, self.b))
        if elu_input:
            x = _elu_of_shared(tf.cast(x, self.conv_dtype), b)
        if init:
            out = self._data_dependent_init(x)
            if residual is None:
                return out
            return residual + (gain * out if gain != 1.0 else tf.cast(out, residual.dtype))
        return _wn_conv2d(tf.cast(x, self.conv_dtype), v, g, b, residual, self._mask, self.strides, gain,
                          self.transpose)

    def _data_dependent_init(self, x):
        """Standardize the output on this batch to `init_scale` and store the matching g and b.

        The original stores g = log(scale) / 3 (so the trained layer starts at scale**(1/3), not at the
        scale it just measured) while returning the exactly standardized output for the layers above it.
        Both quirks change the numbers, so both are kept. It runs in float32 whatever `conv_dtype` is.
        """
        out = _conv(tf.cast(x, tf.float32), self.direction(), [1, *self.strides, 1], self.transpose, self.filters)
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
