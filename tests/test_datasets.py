"""iaf_tf.datasets: the registry, and each dataset's spec (what it loads for training and for evaluation,
which pixels are scored, and the unit of its reported score)."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import cli, data, datasets
from iaf_tf.distributions import BERNOULLI, DISCRETIZED_LOGISTIC
from iaf_tf.errors import DataError
from tests.fixtures import ONE_BLOCK, cli_flags


def test_registry():
    assert datasets.names() == ("cifar10", "mnist", "imagenet32", "imagenet64")
    assert [datasets.get(name).name for name in datasets.names()] == ["cifar10", "mnist", "imagenet32", "imagenet64"]
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; expected one of cifar10, mnist, imagenet32, "
                                         "imagenet64"):
        datasets.get("svhn")


def test_cifar10_spec_loads_the_same_images_for_training_and_evaluation(cifar10_dir):
    spec = datasets.get("cifar10")
    assert (spec.channels, spec.image_size, spec.border, spec.likelihood, spec.unit) == \
        (3, 32, 0, DISCRETIZED_LOGISTIC, "bits_per_dim")
    test = spec.load("test", 32, cifar10_dir)
    assert test.shape == (10000, 32, 32, 3) and test.dtype == np.uint8
    assert spec.load("test", 32, cifar10_dir, evaluation=True) is test is data.load_cifar10("test", cifar10_dir)
    assert spec.load("train", 32, cifar10_dir).shape == (50000, 32, 32, 3)


def test_mnist_spec_trains_on_grey_digits_and_evaluates_one_fixed_binarization(mnist_dir):
    spec = datasets.get("mnist")
    assert (spec.channels, spec.image_size, spec.border, spec.likelihood, spec.unit) == \
        (1, 32, 2, BERNOULLI, "nats_per_image")
    grey = spec.load("test", 32, mnist_dir)
    np.testing.assert_array_equal(grey, data.load_mnist_padded("test", mnist_dir))
    assert len(np.unique(grey)) > 2
    images = spec.load("test", 32, mnist_dir, evaluation=True)
    assert images.shape == grey.shape == (10000, 32, 32, 1) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 255}
    np.testing.assert_array_equal(images, spec.load("test", 32, mnist_dir, evaluation=True))
    assert np.all(images[:, :2] == 0) and np.all(images[:, :, -2:] == 0)
    # Each pixel is on about as often as its grey level says (MNIST's mean pixel is ~0.13).
    assert abs((images == 255).mean() - grey.mean() / 255) < 0.002


@pytest.mark.parametrize("name, image_size, shape", [("cifar10", 64, "[N, 64, 64, 3]"), ("mnist", 28, "[N, 28, 28, 1]")])
def test_load_checks_the_image_size(name, image_size, shape, cifar10_dir, mnist_dir):
    folder = {"cifar10": cifar10_dir, "mnist": mnist_dir}[name]
    with pytest.raises(DataError, match="image_size") as err:
        datasets.get(name).load("test", image_size, folder)
    assert f"{name} images must be uint8 {shape}" in str(err.value)


def test_num_dims_leave_out_the_border():
    assert datasets.get("cifar10").num_dims(32) == 3 * 32 * 32
    assert datasets.get("cifar10").num_dims(64) == 3 * 64 * 64
    assert datasets.get("mnist").num_dims(32) == 28 * 28
    assert datasets.get("mnist").num_dims(64) == 60 * 60


def test_scores_in_each_unit():
    nll = np.array([2 * 3072 * math.log(2), 4 * 3072 * math.log(2)])
    score = datasets.get("cifar10").score(nll, 32)
    assert isinstance(score, tf.Tensor) and score.shape == ()
    assert float(score) == pytest.approx(3.0, rel=1e-12)  # bits per dimension of the mean image
    assert float(datasets.get("mnist").score(tf.constant([80.0, 100.0, 120.0]), 32)) == pytest.approx(100.0)


def test_dataset_mnist_alone_trains_and_evaluates_mnist(mnist_dir, tmp_path, monkeypatch, capsys, in_process_cli):
    # No image_size and no --data_dir: the spec gives the size and its folder variable the files.
    monkeypatch.setenv("MNIST_PATH", str(mnist_dir))
    run = ["--hpconfig", f"dataset=mnist,{ONE_BLOCK}", "--logdir", tmp_path]
    assert cli.main(["iaf.py"], cli_flags("--mode", "train", "--max_steps", 2, *run)) == 0
    assert cli.main(["iaf.py"], cli_flags("--mode", "eval_test", "--once", "--num_images", 20,
                                          "--logdir", tmp_path)) == 0
    assert "Step: 2 Score:" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval_test" / "result-2.json").read_text())
    assert (result["split"], result["images"]) == ("test", 20) and np.isfinite(result["nats_per_image"])
    assert "dataset=mnist" in (tmp_path / "train" / "hparams.cfg").read_text().splitlines()
    assert "image_size=32" in (tmp_path / "train" / "hparams.cfg").read_text().splitlines()
