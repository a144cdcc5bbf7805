"""The weight-normed convolution as functions: the kernel gain * exp(g) * (V * mask) / ||V * mask||
(`wn_kernel`), and a conv (or transposed conv) with it whose gradient recomputes the kernel instead of
keeping it from the forward pass (`wn_conv2d`). iaf_tf.layers.WNConv2D is the Keras layer around them.
"""

import tensorflow as tf

from iaf_tf.programs import compiled

# tf.nn.l2_normalize's floor on the squared norm, which the original's kernels go through.
_L2_EPSILON = 1e-12


def wn_kernel(v, g=None, mask=None, gain=1.0, transpose=False):
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
    """(d/dv, d/dg) of `wn_kernel` given d/dkernel, from its per-channel outputs and the kernel.

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


def plain_conv(x, kernel, strides, transpose, filters):
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
    """wn_kernel, and the bias times gain."""
    return wn_kernel(v, g, mask, gain, transpose), b * gain


@compiled
def _weight_norm_grads(dk, db, kernel, v, mask, scale, sq_norm, floored, gain, transpose):
    """_wn_kernel_grad's (d/dv, d/dg), and d/db from the bias-add's gradient db."""
    return (*_wn_kernel_grad(dk, kernel, v, mask, scale, sq_norm, floored, transpose), db * gain)


@compiled
def _recomputed_kernel(dy, v, scale, mask):
    """The backward pass's kernel, and the scale it is made with (see wn_conv2d's grad)."""
    scale_now = _after(dy, scale)
    return (v * scale_now if mask is None else v * scale_now * mask), scale_now


def _static_shape(x):
    """x's shape as a list when it is fully known (no Shape op to run), else the tensor."""
    return x.shape.as_list() if x.shape.is_fully_defined() else tf.shape(x)


def wn_conv2d(x, v, g, b, residual, mask, strides, gain, transpose=False):
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
        out = plain_conv(x, kernel, strides, transpose, filters)
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


def elu_of_shared(x, after):
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
