"""Densities of the IAF-VAE, written to give the original's numbers exactly.

TFP's Normal.log_prob gives the same values as `gaussian_log_density` (tested), but its
QuantizedDistribution over a logistic has no `+1e-7` inside the log and treats the edge bins as open
intervals, which changes bits/dim; so the discretized logistic is written out here.
"""

import math

import tensorflow as tf

from iaf_tf.programs import compiled

_LOG_2PI = math.log(2.0 * math.pi)
# The likelihood families of a dataset spec (iaf_tf.datasets).
DISCRETIZED_LOGISTIC = "discretized_logistic"
BERNOULLI = "bernoulli"
BIN_SIZE = 1.0 / 256.0


def gaussian_log_density(sample, mean, log_std):
    """Elementwise log N(sample; mean, exp(log_std)^2), in the original's form (variance = exp(2*log_std))."""
    logvar = 2.0 * log_std
    return -0.5 * (_LOG_2PI + logvar + tf.square(sample - mean) / tf.exp(logvar))


def gaussian_sample(mean, log_std, noise):
    return mean + tf.exp(log_std) * noise


def discretized_logistic_log_prob(mean, log_scale, sample, bin_size=BIN_SIZE):
    """Per-image log-probability of `sample` under a logistic discretized to bins of `bin_size`.

    The sample is snapped down to its bin's lower edge; every bin, the edge bins included, gets the
    logistic mass of [edge, edge + bin_size] plus 1e-7, as in the original (it does not give the edge
    bins the tails).
    """
    scale = tf.exp(log_scale)
    lower = (tf.floor(sample / bin_size) * bin_size - mean) / scale
    prob = tf.sigmoid(lower + bin_size / scale) - tf.sigmoid(lower)
    return tf.reduce_sum(tf.math.log(prob + 1e-7), axis=[1, 2, 3])


def bernoulli_log_prob(logits, sample):
    """Per-image log-probability of a 0/1 `sample` under independent Bernoullis with these logits
    (computed from the logits, so it stays finite where a probability would round to 0 or 1)."""
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=sample, logits=logits), axis=[1, 2, 3])


def importance_sampled_nll(log_pxz, kl_cost, k):
    """-log p(x) bound per image from k samples per image laid out consecutively ([b*k] -> [b]).

    With k = 1 this is the negative ELBO, kl_cost - log_pxz; otherwise -(logsumexp(log w) - log k)
    with log w = log p(x|z) + log p(z) - log q(z|x).
    """
    if k == 1:
        return kl_cost - log_pxz
    log_weights = tf.reshape(log_pxz - kl_cost, [-1, k])
    return -(tf.reduce_logsumexp(log_weights, axis=1) - math.log(k))


def bits_per_dim(total_nll, num_images, num_dims):
    """The original's report: summed negative log-likelihood in nats over images * dimensions * ln 2."""
    return total_nll / (math.log(2.0) * num_dims * num_images)


def binarize(images, seed):
    """uint8 0/255 images with each pixel on with probability pixel / 255, drawn statelessly from `seed`
    (a [2] int tensor): the Bernoulli likelihood's inputs. 0/255 images come back unchanged whatever the seed."""
    images = tf.convert_to_tensor(images)
    on = stateless_uniform(tf.shape(images), seed) < tf.cast(images, tf.float32) / 255.0
    return tf.cast(on, tf.uint8) * 255


# Noise. TensorFlow's and XLA's stateless Philox kernels draw the same 32-bit words from a seed (with
# entries in [0, 2**32)) but turn them into floats differently, so a jit-compiled step would see other
# noise than a plain one. These functions make the floats from the words with ordinary ops, the way
# TensorFlow's CPU kernels do (tf.random.stateless_uniform / stateless_normal with alg="philox"): the
# same numbers as those kernels, to float rounding in log/sin/cos, with and without XLA.

def _philox_words(shape, seed, dtype=tf.uint32):
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
    return tf.raw_ops.StatelessRandomUniformFullIntV2(shape=shape, key=key, counter=counter, alg=1, dtype=dtype)


def fold_in(seed, data):
    """A new int64 seed from `seed` and a non-negative integer `data`. Its entries are kept in [0, 2**32):
    XLA makes the Philox key from the low 32 bits of each seed entry, TensorFlow from all 64."""
    # data as a tensor: a Python int would be part of the program's signature, one compile per value.
    return _fold_in(seed, tf.convert_to_tensor(data, tf.int64))


@compiled
def _fold_in(seed, data):
    return tf.stack([tf.cast(_philox_words([], seed), tf.int64), data])


def _unit_floats(words):
    """[0, 1) from the 23 low bits of each word, as a float in [1, 2) minus 1."""
    return tf.bitcast(tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(words, 0x7FFFFF), 0x3F800000), tf.float32) - 1.0


def stateless_uniform(shape, seed):
    """Uniform [0, 1) float32 noise of `shape` from `seed` ([2] int tensor)."""
    return _unit_floats(_philox_words(shape, seed))


def stateless_normal(shape, seed):
    """Standard normal float32 noise of `shape` from `seed`: Box-Muller on consecutive pairs of words.

    The words come from TensorFlow's kernel unless the whole step is compiled: XLA's Philox is far slower
    on CPUs (BUILD.md, "What a step launches"); only the float arithmetic is a program of its own.
    """
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    return _box_muller(_philox_words(tf.stack([(size + 1) // 2, 2]), seed), shape)


@compiled
def _box_muller(words, shape):
    """[size] standard normals of `shape` from [(size + 1) // 2, 2] words."""
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    pairs = _unit_floats(words)
    radius = tf.sqrt(-2.0 * tf.math.log(tf.maximum(pairs[:, 0], 1e-7)))
    angle = (2.0 * math.pi) * pairs[:, 1]
    normals = tf.reshape(tf.stack([radius * tf.sin(angle), radius * tf.cos(angle)], axis=1), [-1])
    return tf.reshape(normals[:size], shape)
