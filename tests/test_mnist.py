"""dataset=mnist: dynamic binarization, the Bernoulli likelihood on the 28x28 digit, nats per image."""

import math

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data, hparams, train
from iaf_tf import distributions as dist
from iaf_tf.likelihood import Evaluator
from iaf_tf.model import BINARIZE_STREAM, CVAE
from tests.helpers import scalar_series

TINY = "dataset=mnist,depth=2,num_blocks=1,h_size=8,z_size=4,batch_size=8,num_gpus=1,learning_rate=0.002"


def grey_images(n, rng_seed=0):
    images = np.zeros([n, 32, 32, 1], np.uint8)
    images[:, 2:30, 2:30] = np.random.default_rng(rng_seed).integers(0, 256, size=[n, 28, 28, 1])
    return images


def tiny_model(extra=""):
    model = CVAE(hparams.get_default_hparams().parse(TINY + ("," + extra if extra else "")))
    model.initialize(grey_images(8, 1), tf.constant([0, 1]))
    return model


def test_binarize_draws_each_pixel_with_probability_pixel_over_255():
    images = np.full([4, 32, 32, 1], 64, np.uint8)
    a = data.binarize(images, tf.constant([1, 2])).numpy()
    assert a.dtype == np.uint8 and set(np.unique(a)) == {0, 255}
    assert abs((a == 255).mean() - 64 / 255) < 0.02
    np.testing.assert_array_equal(a, data.binarize(images, tf.constant([1, 2])).numpy())
    assert not np.array_equal(a, data.binarize(images, tf.constant([1, 3])).numpy())
    # Binary images are fixed points, whatever the seed.
    for seed in ([0, 0], [5, 9]):
        np.testing.assert_array_equal(data.binarize(a, tf.constant(seed)).numpy(), a)


def test_eval_images_are_one_fixed_binarization(mnist_dir):
    grey = data.load_images("mnist", "test", mnist_dir)
    images = data.load_eval_images("mnist", "test", mnist_dir)
    assert images.shape == grey.shape == (10000, 32, 32, 1) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 255}
    np.testing.assert_array_equal(images, data.load_eval_images("mnist", "test", mnist_dir))
    assert np.all(images[:, :2] == 0) and np.all(images[:, :, -2:] == 0)
    # Each pixel is on about as often as its grey level says (MNIST's mean pixel is ~0.13).
    assert abs((images == 255).mean() - grey.mean() / 255) < 0.002


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


def test_model_binarizes_with_the_step_seed_and_scores_the_28x28_digit():
    model = tiny_model()
    assert model.channels == 1 and model.num_dims == 784
    images = grey_images(4, 3)
    seed = tf.constant([7, 11])
    out = model(images, seed)
    assert out["mean"].shape == (4, 32, 32, 1)
    assert out["mean"].numpy().min() >= -0.5 and out["mean"].numpy().max() <= 0.5
    # The same step seed binarizes the same way: feeding that binarization gives the same numbers.
    binary = data.binarize(images, tf.random.experimental.stateless_fold_in(seed, BINARIZE_STREAM))
    again = model(binary, seed)
    for key in ("log_pxz", "kl_cost", "nll"):
        np.testing.assert_array_equal(out[key].numpy(), again[key].numpy())
    # At the data-dependent init the logits are ~0, so every scored pixel costs ~log 2: 784 of them,
    # the 2-pixel border that pads MNIST to 32x32 is not scored.
    np.testing.assert_allclose(-out["log_pxz"].numpy() / 784, math.log(2), atol=0.01)


@pytest.mark.slow
def test_mnist_trains_and_reports_nats_per_image(tmp_path, mnist_dir):
    hps = hparams.get_default_hparams().parse(TINY)
    lines = []
    config = train.TrainConfig(logdir=str(tmp_path), max_steps=300, summary_every=20, checkpoint_every=300,
                               seed=1, data_dir=str(mnist_dir), print_fn=lines.append)
    result = train.train(hps, config)
    assert result["status"] == "max_steps" and result["skipped"] == 0
    assert np.isfinite(result["metrics"]["nats_per_image"])
    nats = scalar_series(tmp_path / "train", "model/nats_per_image")
    assert any(line.startswith("Iteration 20, ") and "train nats_per_image = " in line for line in lines)
    assert sorted(nats) == list(range(20, 301, 20))
    assert all(np.isfinite(v) for v in nats.values())
    # A fresh model pays ~log 2 per pixel (543 nats) plus the KL; 300 steps already take off a lot.
    assert nats[20] > 450
    assert np.mean([nats[s] for s in (260, 280, 300)]) < nats[20] - 100

    # The fixed test binarization evaluates in nats per image too (the trained weights: after 300 steps
    # the 0.999 moving averages are still mostly the initial ones).
    test = data.load_eval_images("mnist", "test", mnist_dir)[:200]
    nll = Evaluator(result["trainer"].model).nll(test, k=1)
    assert nll.shape == (200,) and np.all(np.isfinite(nll))
    assert 50 < nll.mean() < nats[20] - 100, (nll.mean(), nats)
