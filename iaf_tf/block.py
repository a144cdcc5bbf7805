"""One stochastic layer of the IAF-VAE (`IAFBlock`): a bottom-up and a top-down residual block around a
posterior, a prior and (optionally) an IAF step. iaf_tf.model stacks them. NHWC throughout."""

import contextlib
import dataclasses
import functools

import keras
import tensorflow as tf

from iaf_tf import distributions as dist
from iaf_tf.layers import ARMultiConv, IAFShift, WNConv2D

# Residual branches and IAF shifts are scaled down by this constant in the original.
RESIDUAL_SCALE = 0.1
IAF_SCALE = 0.1


def resize_nearest(x, factor):
    """TF1 resize_nearest_neighbor without half-pixel centres: halving keeps even rows and columns,
    doubling repeats each pixel."""
    if factor == 0.5:
        return x[:, ::2, ::2, :]
    if factor == 2:
        return tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
    raise ValueError(f"unsupported resize factor {factor}")


def _in_own_scope(method):
    """Run a layer method (not __call__) inside the layer's name scope, so that the sublayers it builds
    get paths like cvae/IAF_0_1/up_conv1/V rather than colliding at cvae/up_conv1/V."""
    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with keras.name_scope(self.name):
            return method(self, *args, **kwargs)
    return scoped


@keras.saving.register_keras_serializable(package="iaf_tf")
class IAFBlock(keras.layers.Layer):
    """One stochastic layer: a bottom-up residual block that emits q(z|x) statistics, and a top-down
    residual block with the prior and (for `down_*` posteriors) the posterior and its IAF step.

    `model_config.posterior` is `<where>_<flow>` as in the original's Theano system:

    - `down_*` (the TF1 model): q is the Gaussian with the sum of the bottom-up and top-down parameters,
      sampled in the top-down pass; the IAF network's context is the sum of a bottom-up and a top-down
      context.
    - `up_*`: z is drawn in the bottom-up pass from the bottom-up parameters alone, the IAF step runs
      there with only the bottom-up context, and z is fed upward beside the deterministic features (the
      input of `up_conv3` is [z, hidden]); the top-down pass only scores that z under the prior.
    - flow `diag`: no IAF; `iaf1_nl`: a mean-only step z - 0.1 m (volume-preserving); `iaf2_nl`:
      (z - 0.1 m) / exp(0.1 s) with log q += 0.1 s.

    Channels that would go unused get no weights: the contexts when there is no IAF network reading
    them (diag, or depth_ar = 0), the top-down posterior parameters for `up_*`, and the log-scale head
    for `iaf1_nl` (as the Theano code). Unlike the Theano code, every variant keeps the TF1 path's
    choices: ELU nonlinearities, the TF1 channel layouts and the TF1 data-dependent init.
    """

    def __init__(self, model_config, downsample, conv_dtype=tf.float32, **kwargs):
        super().__init__(**kwargs)
        self.model_config = model_config
        self.h_size, self.z_size = h, z = model_config.h_size, model_config.z_size
        self.downsample = downsample
        self.posterior = model_config.posterior
        where, self.flow = self.posterior.split("_", 1)  # flow: diag, iaf1_nl or iaf2_nl
        self.bottom_up = where == "up"
        self.context_size = h if self.flow != "diag" and model_config.depth_ar > 0 else 0
        stride = (2, 2) if downsample else (1, 1)
        # Mixed precision: the block's convolutions and the activations between them in bfloat16; the
        # residual stream, the Gaussians and the KL stay float32.
        self.conv_dtype = tf.as_dtype(conv_dtype)
        conv = dict(conv_dtype=self.conv_dtype)
        self.up_conv1 = WNConv2D(2 * z + self.context_size + h, strides=stride, name="up_conv1", **conv)
        self.up_conv3 = WNConv2D(h, name="up_conv3", **conv)
        posterior_size = 0 if self.bottom_up else 2 * z + self.context_size
        self.down_conv1 = WNConv2D(2 * z + posterior_size + h, name="down_conv1", **conv)
        if self.flow != "diag":
            heads = [z, z] if self.flow == "iaf2_nl" else [z]
            self.shift = IAFShift(IAF_SCALE)
            self.ar = ARMultiConv(z, [h] * model_config.depth_ar, heads, use_context=self.context_size > 0,
                                  name="ar_multiconv2d", **conv)
        if downsample:
            self.down_conv2 = WNConv2D(h, strides=(2, 2), transpose=True, name="down_deconv2", **conv)
        else:
            self.down_conv2 = WNConv2D(h, name="down_conv2", **conv)

    def get_config(self):
        return dict(super().get_config(), model_config=dataclasses.asdict(self.model_config),
                    downsample=self.downsample, conv_dtype=self.conv_dtype.name)

    @classmethod
    def from_config(cls, config):
        from iaf_tf.settings import ModelConfig
        return cls(**dict(config, model_config=ModelConfig(**config["model_config"])))

    def _float32(self, *tensors):
        return [tf.cast(t, tf.float32) for t in tensors]

    def iaf(self, z, log_q, context, init=False):
        """The IAF step on a posterior sample: returns (z, log q(z)) after it (unchanged for diag)."""
        if self.flow == "diag":
            return z, log_q
        heads = self._float32(*self.ar(z, context, init=init))
        if self.flow == "iaf1_nl":  # volume-preserving: log q does not change
            return self.shift(z, heads[0])[0], log_q
        z, log_scale = self.shift(z, *heads)
        return z, log_q + log_scale

    @_in_own_scope
    def up(self, x, noise=None, init=False):
        """Returns (output, stats for `down`): (qz_mean, qz_logsd, context) for down_* posteriors,
        (z, log q(z), qz_mean, qz_logsd) for up_* ones, which need `noise`."""
        h, z_size = self.h_size, self.z_size
        out = self.up_conv1(x, init=init, elu_input=True)
        qz_mean, qz_logsd, context, hidden = tf.split(out, [z_size, z_size, self.context_size, h], axis=-1)
        qz_mean, qz_logsd = self._float32(qz_mean, qz_logsd)
        if self.bottom_up:
            z = dist.gaussian_sample(qz_mean, qz_logsd, noise)
            log_q = dist.gaussian_log_density(z, qz_mean, qz_logsd)
            z, log_q = self.iaf(z, log_q, context, init=init)
            stats = (z, log_q, qz_mean, qz_logsd)
            hidden = tf.concat([tf.cast(z, hidden.dtype), hidden], axis=-1)
        else:
            stats = (qz_mean, qz_logsd, context)
        if self.downsample:
            x = resize_nearest(x, 0.5)
        # x + RESIDUAL_SCALE * conv(...), with the scale folded into the conv (see WNConv2D.call).
        return self.up_conv3(tf.nn.elu(hidden), init=init, residual=x, gain=RESIDUAL_SCALE), stats

    @_in_own_scope
    def down(self, x, up_stats, noise, sample_prior=False, init=False):
        """Returns (output, KL map log q(z|x) - log p(z) [n, h, w, z], (mean, log-scale) of the posterior's
        Gaussian, before its IAF step); the last two are None when sampling."""
        h, z_size = self.h_size, self.z_size
        out = self.down_conv1(x, init=init, elu_input=True)
        if self.bottom_up:
            pz_mean, pz_logsd, h_det = tf.split(out, [z_size, z_size, h], axis=-1)
        else:
            pz_mean, pz_logsd, rz_mean, rz_logsd, down_context, h_det = tf.split(
                out, [z_size] * 4 + [self.context_size, h], axis=-1)
            rz_mean, rz_logsd = self._float32(rz_mean, rz_logsd)
        pz_mean, pz_logsd = self._float32(pz_mean, pz_logsd)

        kl_map = posterior = None
        if sample_prior:
            z = dist.gaussian_sample(pz_mean, pz_logsd, noise)
        else:
            if self.bottom_up:
                z, log_q, *posterior = up_stats
            else:
                qz_mean, qz_logsd, up_context = up_stats
                post_mean, post_logsd = rz_mean + qz_mean, rz_logsd + qz_logsd
                posterior = (post_mean, post_logsd)
                # The data-dependent init feeds the prior's sample through the posterior path, as the original.
                z = dist.gaussian_sample(pz_mean if init else post_mean, pz_logsd if init else post_logsd, noise)
                log_q = dist.gaussian_log_density(z, post_mean, post_logsd)
                z, log_q = self.iaf(z, log_q, up_context + down_context, init=init)
            kl_map = log_q - dist.gaussian_log_density(z, pz_mean, pz_logsd)

        hidden = tf.nn.elu(tf.concat([tf.cast(z, h_det.dtype), h_det], axis=-1))
        if self.downsample:
            x = resize_nearest(x, 2)
        return self.down_conv2(hidden, init=init, residual=x, gain=RESIDUAL_SCALE), kl_map, posterior

    @_in_own_scope
    def build_up(self, input_shape):
        """Create the variables of `up` for an input of `input_shape`, in the order its first call would
        (so with the same initial values under a seed), without running it; returns its output shape."""
        self.up_conv1.build(input_shape)
        grid = self.up_conv1.compute_output_shape(input_shape)[:3]
        if self.bottom_up and self.flow != "diag":
            self.ar.build((*grid, self.z_size))
        self.up_conv3.build((*grid, self.h_size + (self.z_size if self.bottom_up else 0)))
        return (*grid, self.h_size)

    @_in_own_scope
    def build_down(self, input_shape):
        """`build_up` for `down`."""
        self.down_conv1.build(input_shape)
        if not self.bottom_up and self.flow != "diag":
            self.ar.build((*input_shape[:3], self.z_size))
        self.down_conv2.build((*input_shape[:3], self.z_size + self.h_size))
        return self.down_conv2.compute_output_shape(input_shape)

    def named_convs(self):
        convs = {c.name: c for c in (self.up_conv1, self.up_conv3, self.down_conv1, self.down_conv2)}
        if self.flow != "diag":
            convs.update({f"{self.ar.name}/{n}": c for n, c in self.ar.named_convs().items()})
        return convs

    def weight_tensors(self):
        """Every conv's (V, g, b, mask) as tensors, in named_convs' order."""
        return [conv.weight_tensors() for conv in self.named_convs().values()]

    @contextlib.contextmanager
    def given_weights(self, weights):
        """The block computes with `weights` (another block's weight_tensors()) for the duration."""
        with contextlib.ExitStack() as stack:
            for conv, conv_weights in zip(self.named_convs().values(), weights):
                stack.enter_context(conv.given_weights(conv_weights))
            yield
