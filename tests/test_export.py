"""iaf_tf.export: a SavedModel of a model's weights that plain TensorFlow loads and runs."""

import math

import numpy as np
import pytest
import tensorflow as tf

import iaf_tf
from iaf_tf import data, datasets, export, noise
from iaf_tf.api import TrainedModel
from iaf_tf.model import to_uint8_images
from tests.fixtures import ONE_BLOCK, tiny_config, without_iaf_tf


@pytest.fixture(scope="module")
def exported(reference_prefix, tmp_path_factory):
    trained = iaf_tf.load(reference_prefix)
    return trained, export.export(trained, str(tmp_path_factory.mktemp("export") / "step-3000"))


@pytest.mark.slow
def test_score_signature_is_the_negative_elbo(exported, cifar10_dir):
    trained, out_dir = exported
    images = data.load_cifar10("test", cifar10_dir)[:3]
    score = tf.saved_model.load(out_dir).signatures["score"]
    got = score(images=tf.constant(images), seed=tf.constant(5, tf.int64))
    out = trained.model(tf.constant(images), noise.key(5, 0))
    nll = (out["kl"] - out["log_pxz"]).numpy()
    np.testing.assert_allclose(got["nll"].numpy(), nll, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_dim"].numpy(), nll / (math.log(2) * 3072), rtol=1e-5)
    assert sorted(got) == ["bits_per_dim", "nll"]


def test_score_signature_equals_the_api_nll_for_the_same_seed(exported, cifar10_dir):
    trained, out_dir = exported
    images = data.load_cifar10("test", cifar10_dir)[:6]
    got = tf.saved_model.load(out_dir).signatures["score"](images=tf.constant(images), seed=tf.constant(7, tf.int64))
    np.testing.assert_allclose(got["nll"].numpy(), trained.nll(images, k=1, seed=7), rtol=1e-5)


def test_sample_signature_gives_the_api_samples_for_the_same_seed(exported):
    trained, out_dir = exported
    sample = tf.saved_model.load(out_dir).signatures["sample"]
    for seed in (0, 3):
        got = sample(num_images=tf.constant(5), temperature=tf.constant(0.8), seed=tf.constant(seed, tf.int64))
        np.testing.assert_array_equal(got["images"].numpy(), trained.sample(5, temperature=0.8, seed=seed))


def test_an_exported_mnist_model_scores_in_nats_per_image(mnist_dir, tmp_path):
    cfg = tiny_config(ONE_BLOCK, "dataset=mnist", seed=4)
    trained = TrainedModel(cfg)
    images = datasets.get("mnist").load("test", 32, mnist_dir, evaluation=True)[:5]
    trained.model.initialize(tf.constant(images[:4]), noise.key(4, noise.INITIALIZATION))
    out_dir = export.export(trained, str(tmp_path / "step-0"))
    got = tf.saved_model.load(out_dir).signatures["score"](images=tf.constant(images), seed=tf.constant(1, tf.int64))
    assert sorted(got) == ["nats_per_image", "nll"]
    nll = trained.nll(images, k=1, seed=1)
    np.testing.assert_allclose(got["nll"].numpy(), nll, rtol=1e-5)
    np.testing.assert_allclose(got["nats_per_image"].numpy(), nll, rtol=1e-5)
    assert float(np.mean(got["nats_per_image"].numpy())) == pytest.approx(trained.score(nll), rel=1e-5)
    assert np.all(got["nats_per_image"].numpy() > 100)  # ~log 2 a pixel for an untrained model, not bits/dim


@pytest.mark.slow
def test_sample_signature_draws_uint8_images(exported):
    trained, out_dir = exported
    sample = tf.saved_model.load(out_dir).signatures["sample"]
    got = sample(num_images=tf.constant(4), temperature=tf.constant(1.0), seed=tf.constant(2, tf.int64))["images"]
    assert got.shape == (4, 32, 32, 3) and got.dtype == tf.uint8
    want = to_uint8_images(trained.model.sample(4, noise.key(2, noise.SAMPLE), 1.0)).numpy()
    assert np.abs(got.numpy().astype(int) - want.astype(int)).max() <= 1
    cold = sample(num_images=tf.constant(3), temperature=tf.constant(0.0), seed=tf.constant(2, tf.int64))["images"]
    assert np.abs(cold.numpy().astype(int) - cold.numpy()[:1].astype(int)).max() <= 1


@pytest.mark.e2e
def test_plain_tensorflow_loads_it_without_iaf_tf(exported, cifar10_dir, expected):
    """In a process where iaf_tf cannot be imported: the reference's bits/dim on the first 200 test images
    (with the SavedModel's own noise), and samples of the right shape and dtype."""
    _, out_dir = exported
    script = ("import json, pickle, tensorflow as tf\n"
              f"batch = pickle.load(open({str(cifar10_dir / 'test_batch')!r}, 'rb'), encoding='bytes')[b'data']\n"
              "images = batch[:200].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)\n"
              f"m = tf.saved_model.load({str(out_dir)!r})\n"
              "out = m.signatures['score'](images=tf.constant(images), seed=tf.constant(0, tf.int64))\n"
              "drawn = m.signatures['sample'](num_images=tf.constant(5), temperature=tf.constant(1.0),\n"
              "                               seed=tf.constant(0, tf.int64))['images']\n"
              "print(json.dumps([float(tf.reduce_mean(out['bits_per_dim'])), drawn.shape.as_list(), "
              "drawn.dtype.name]))\n")
    bits, shape, dtype = without_iaf_tf(script)
    want = next(r["bits_per_dim"] for r in expected["results"]
                if (r["weights"], r["k"], r["test_images"]) == ("ema", 1, "first 200"))
    assert abs(bits - want) <= 0.01
    assert (shape, dtype) == ([5, 32, 32, 3], "uint8")
