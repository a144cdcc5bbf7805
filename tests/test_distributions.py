"""Densities and bounds against TFP and float64 NumPy versions of the original's formulas
(openai/iaf tf_utils/dist.py)."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from iaf_tf import distributions as dist
from iaf_tf import programs
from iaf_tf.model import input_to_unit_range

BIN = 1.0 / 256.0


def np_sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def np_discretized_logistic(mean, log_scale, sample, binsize=BIN):
    mean, sample = np.asarray(mean, np.float64), np.asarray(sample, np.float64)
    scale = np.exp(np.float64(log_scale))
    s = (np.floor(sample / binsize) * binsize - mean) / scale
    logp = np.log(np_sigmoid(s + binsize / scale) - np_sigmoid(s) + 1e-7)
    return logp.sum(axis=(1, 2, 3))


def pixels_to_unit(pixels):
    return input_to_unit_range(tf.constant(np.asarray(pixels, np.uint8))).numpy()


# ---------------------------------------------------------------- Gaussian


def test_gaussian_log_density_matches_tfp():
    rng = np.random.default_rng(0)
    shape = [3, 4, 4, 5]
    mean = rng.normal(size=shape).astype(np.float32)
    log_std = rng.uniform(-3, 2, size=shape).astype(np.float32)
    sample = (mean + rng.normal(size=shape) * 3).astype(np.float32)
    got = dist.gaussian_log_density(sample, mean, log_std).numpy()
    want = tfp.distributions.Normal(mean, tf.exp(log_std)).log_prob(sample).numpy()
    assert got.shape == tuple(shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gaussian_log_density_numpy_and_sample():
    rng = np.random.default_rng(1)
    mean, log_std, sample = (rng.normal(size=[7]) for _ in range(3))
    want = -0.5 * np.log(2 * np.pi) - log_std - 0.5 * ((sample - mean) / np.exp(log_std)) ** 2
    got = dist.gaussian_log_density(sample.astype(np.float32), mean.astype(np.float32),
                                    log_std.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    noise = rng.normal(size=[7])
    np.testing.assert_allclose(dist.gaussian_sample(mean, log_std, noise), mean + np.exp(log_std) * noise,
                               rtol=1e-12)


# ---------------------------------------------------------------- discretized logistic


def test_discretized_logistic_matches_numpy_formula():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=[4, 5, 6, 3])
    x = pixels_to_unit(pixels)
    mean = np.clip(x + rng.normal(0, 0.05, size=x.shape), -0.5 + 1 / 512, 0.5 - 1 / 512).astype(np.float32)
    for log_scale in (-4.5, -3.0, -1.0):
        got = dist.discretized_logistic_log_prob(mean, tf.constant(log_scale, tf.float32), x).numpy()
        want = np_discretized_logistic(mean, log_scale, x)
        assert got.shape == (4,)
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_discretized_logistic_snaps_sample_to_its_bin():
    # Any point inside a bin gets the same probability as the bin's centre.
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=[2, 3, 3, 1])
    centre = pixels_to_unit(pixels)
    offset = (centre + rng.uniform(-0.49, 0.49, size=centre.shape) * BIN).astype(np.float32)
    mean = rng.uniform(-0.5, 0.5, size=centre.shape).astype(np.float32)
    a = dist.discretized_logistic_log_prob(mean, -3.0, centre).numpy()
    b = dist.discretized_logistic_log_prob(mean, -3.0, offset).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("pixel,edge_mean", [(0, -0.5 + 1 / 512), (255, 0.5 - 1 / 512)], ids=["pixel0", "pixel255"])
@pytest.mark.parametrize("log_scale", [math.log(1 / 256), math.log(1 / 512), -4.0],
                         ids=["scale=1/256", "scale=1/512", "log_scale=-4"])
def test_discretized_logistic_edge_bins_get_interior_mass_not_tails(pixel, edge_mean, log_scale):
    x = pixels_to_unit(np.full([1, 1, 1, 1], pixel))
    np.testing.assert_allclose(x, edge_mean, rtol=0, atol=1e-7)
    mean = np.full([1, 1, 1, 1], edge_mean, np.float32)  # the decoder's clipped extreme
    got = dist.discretized_logistic_log_prob(mean, tf.constant(log_scale, tf.float32), x).numpy()[0]

    scale = math.exp(log_scale)
    half = 0.5 * BIN / scale  # the mean sits at the centre of the edge bin
    interior = math.log(np_sigmoid(half) - np_sigmoid(-half) + 1e-7)
    tail = math.log(np_sigmoid(half) + 1e-7)  # what a CDF tail for the edge bin would give
    np.testing.assert_allclose(got, interior, rtol=1e-5)
    np.testing.assert_allclose(got, np_discretized_logistic(mean, log_scale, x)[0], rtol=1e-5)
    assert abs(got - tail) > 1e-2
    assert math.exp(got) < 1 - 1e-3


def test_discretized_logistic_floor_when_probability_underflows():
    # Pixel 0 under a sharp logistic at the top edge: the bin mass underflows to 0 in float32 and the
    # +1e-7 keeps the log finite at log(1e-7) per dimension.
    x = pixels_to_unit(np.zeros([2, 2, 2, 3]))
    mean = np.full(x.shape, 0.5 - 1 / 512, np.float32)
    got = dist.discretized_logistic_log_prob(mean, tf.constant(-12.0), x).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, 12 * math.log(1e-7), rtol=1e-5)
    # Never below the floor, even for moderately far means.
    got = dist.discretized_logistic_log_prob(np.full(x.shape, 0.3, np.float32), tf.constant(-5.0), x).numpy()
    assert np.all(got >= 12 * math.log(1e-7) - 1e-3)


def test_discretized_logistic_bins_sum_to_about_one():
    # Interior bins cover [-0.5, 0.5) except the tails: with a central mean and moderate scale the 256 bin
    # masses (each without the 1e-7) sum to ~1.
    pixels = np.arange(256).reshape(256, 1, 1, 1)
    x = pixels_to_unit(pixels)
    mean = np.zeros_like(x)
    logp = dist.discretized_logistic_log_prob(mean, tf.constant(math.log(0.05)), x).numpy()
    assert abs(np.sum(np.exp(logp) - 1e-7) - 1.0) < 1e-3


# ---------------------------------------------------------------- Bernoulli (binarized MNIST)


def test_binarize_draws_each_pixel_with_probability_pixel_over_255():
    images = np.full([4, 32, 32, 1], 64, np.uint8)
    a = dist.binarize(images, tf.constant([1, 2])).numpy()
    assert a.dtype == np.uint8 and set(np.unique(a)) == {0, 255}
    assert abs((a == 255).mean() - 64 / 255) < 0.02
    np.testing.assert_array_equal(a, dist.binarize(images, tf.constant([1, 2])).numpy())
    assert not np.array_equal(a, dist.binarize(images, tf.constant([1, 3])).numpy())
    # Binary images are fixed points, whatever the seed.
    for seed in ([0, 0], [5, 9]):
        np.testing.assert_array_equal(dist.binarize(a, tf.constant(seed)).numpy(), a)


def test_bernoulli_log_prob_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=[3, 5, 5, 1]).astype(np.float32)
    sample = (rng.random([3, 5, 5, 1]) < 0.4).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = (sample * np.log(p) + (1 - sample) * np.log1p(-p)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(dist.bernoulli_log_prob(logits, sample).numpy(), want, rtol=1e-5)
    # Stays finite where a probability rounds to 0 or 1 in float32.
    extreme = dist.bernoulli_log_prob(tf.constant([[[[40.0]]], [[[-40.0]]]]), tf.constant([[[[0.0]]], [[[1.0]]]]))
    np.testing.assert_allclose(extreme.numpy(), [-40.0, -40.0], rtol=1e-6)


# ---------------------------------------------------------------- importance sampling


def test_importance_sampled_nll_k1_is_negative_elbo():
    rng = np.random.default_rng(4)
    log_pxz = rng.normal(-3000, 50, size=[6]).astype(np.float32)
    kl = rng.uniform(0, 40, size=[6]).astype(np.float32)
    got = dist.importance_sampled_nll(tf.constant(log_pxz), tf.constant(kl), 1).numpy()
    np.testing.assert_allclose(got, kl.astype(np.float64) - log_pxz, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_importance_sampled_nll_matches_numpy_logsumexp(k):
    rng = np.random.default_rng(k)
    b = 3
    log_pxz = rng.normal(-3000, 5, size=[b * k])
    kl = rng.uniform(0, 40, size=[b * k])
    got = dist.importance_sampled_nll(tf.constant(log_pxz, tf.float32), tf.constant(kl, tf.float32), k).numpy()
    assert got.shape == (b,)
    w = (log_pxz - kl).reshape(b, k)  # consecutive groups of k
    m = w.max(axis=1, keepdims=True)
    want = -(m[:, 0] + np.log(np.exp(w - m).sum(axis=1))) + np.log(k)
    np.testing.assert_allclose(got, want, rtol=1e-6)

    # Jensen: the k-sample bound is at most the average of the group's 1-sample bounds.
    one_sample = dist.importance_sampled_nll(tf.constant(log_pxz, tf.float32), tf.constant(kl, tf.float32), 1)
    group_means = one_sample.numpy().astype(np.float64).reshape(b, k).mean(axis=1)
    assert np.all(got <= group_means + 1e-3)
    assert np.all(got < group_means)  # strict: the weights differ


def test_importance_sampled_nll_equal_weights_reduce_to_one_sample():
    log_pxz = tf.constant([-10.0] * 4 + [-20.0] * 4)
    kl = tf.constant([1.0] * 8)
    np.testing.assert_allclose(dist.importance_sampled_nll(log_pxz, kl, 4).numpy(), [11.0, 21.0], rtol=1e-6)


# ---------------------------------------------------------------- bits/dim


def test_bits_per_dim_formula():
    total = 123456.789
    assert dist.bits_per_dim(total, 10, 3072) == pytest.approx(total / (math.log(2) * 3072 * 10), rel=1e-12)
    # One image whose nll is 3072 * ln 2 nats is exactly one bit per dimension.
    assert dist.bits_per_dim(3072 * math.log(2.0), 1, 3072) == pytest.approx(1.0, rel=1e-12)
    assert dist.bits_per_dim(tf.constant(2 * 784 * math.log(2.0), tf.float64), 2, 784).numpy() == pytest.approx(1.0)


# ---------------------------------------------------------------- noise, the same with and without XLA

@pytest.mark.parametrize("shape", [[7, 5], [2, 4, 4, 3], [1]])
def test_noise_is_tensorflows_philox_noise_and_the_same_under_xla(shape):
    seed = tf.constant([3, 2**32 - 5], tf.int64)
    normal = dist.stateless_normal(shape, seed)
    np.testing.assert_allclose(normal, tf.random.stateless_normal(shape, seed, alg="philox"), atol=3e-6)
    # Traced, as plain ops or as its own XLA program (iaf_tf.programs), and inside a jit-compiled function:
    # the same numbers as the plain ops of an eager call.
    for as_programs in (False, True):
        with programs.enabled(as_programs):
            np.testing.assert_allclose(tf.function(dist.stateless_normal)(shape, seed), normal, atol=1e-6)
    np.testing.assert_allclose(tf.function(dist.stateless_normal, jit_compile=True)(shape, seed), normal, atol=1e-6)
    uniform = dist.stateless_uniform(shape, seed)
    np.testing.assert_array_equal(uniform, tf.random.stateless_uniform(shape, seed, alg="philox"))
    np.testing.assert_array_equal(tf.function(dist.stateless_uniform, jit_compile=True)(shape, seed), uniform)
    # XLA's own float conversion differs: the reason for these functions.
    assert not np.allclose(tf.function(lambda s: tf.random.stateless_normal(shape, s, alg="philox"),
                                       jit_compile=True)(seed), normal, atol=1e-3) or shape == [1]


def test_folded_in_seeds_stay_in_32_bits_and_agree_under_xla():
    folded = dist.fold_in  # eagerly: plain ops
    folded_xla = tf.function(dist.fold_in, jit_compile=True)
    firsts = set()
    for seed in ([0, 0], [3, 1], [2**32 - 1, 7], [5, 123456]):
        seed = tf.constant(seed, tf.int64)
        for data in (0, 1, 41):
            value = folded(seed, data).numpy()
            assert 0 <= value[0] < 2**32 and value[1] == data
            np.testing.assert_array_equal(folded_xla(seed, data), value)
            with programs.enabled():
                np.testing.assert_array_equal(tf.function(dist.fold_in)(seed, data), value)  # its own program
            firsts.add(int(value[0]))
    assert len(firsts) == 4  # every seed gives its own stream (and data tells the folded streams apart)


def test_folding_in_other_integers_reuses_one_program():
    traces = dist._fold_in.program.experimental_get_tracing_count()
    with programs.enabled():
        tf.function(lambda seed: [dist.fold_in(seed, data) for data in (0, 1, 41)])(tf.constant([3, 1], tf.int64))
    assert dist._fold_in.program.experimental_get_tracing_count() - traces <= 1
