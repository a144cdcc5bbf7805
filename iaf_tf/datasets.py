"""The datasets, one spec each: what the model, training and evaluation need to know about a dataset.

Nothing outside this module tests a dataset's name; BUILD.md ("Adding a dataset") says what a new one
costs: a loader (in data.py or a module of its own) and an entry here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from iaf_tf import data, imagenet
from iaf_tf import distributions as dist
from iaf_tf.errors import ConfigError

from iaf_tf.distributions import BERNOULLI, DISCRETIZED_LOGISTIC


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    image_size: int          # height and width of what the loaders return (dataset=X alone picks it)
    border: int              # rows and columns on each side that the likelihood does not score
    likelihood: str          # DISCRETIZED_LOGISTIC (uint8 levels) or BERNOULLI (inputs binarized to 0/255)
    unit: str                # how a score is reported: "bits_per_dim" or "nats_per_image"
    splits: tuple[str, ...]  # what the files hold ("train" is trained on); `--mode eval_<split>` takes any
    folder_variable: str     # the environment variable naming the data folder when --data_dir is not given
    # (split, folder or None, allow_download) -> uint8 [N, image_size, image_size, channels]; may be a
    # memory-mapped file (data.train_dataset then reads only the rows of each batch)
    load_train_images: Callable[..., np.ndarray]
    # The same for the images that likelihoods are reported on (e.g. one fixed binarization).
    load_eval_images: Callable[..., np.ndarray]
    download: str | None = None  # where the loader fetches the files from when they are missing, if it does

    def load(self, split: str, image_size: int, path=None, allow_download=False, evaluation=False) -> np.ndarray:
        """The split's images (those scored by evaluation when `evaluation`), checked against image_size."""
        self.check_split(split)
        loader = self.load_eval_images if evaluation else self.load_train_images
        folder = path if path is not None else (os.environ.get(self.folder_variable) or None)
        images = loader(split, folder, allow_download and self.download is not None)
        data.check_images(images, image_size, self.channels, self.name)
        return images

    def check_split(self, split: str):
        if split not in self.splits:
            raise ConfigError(f"the {self.name} dataset has no {split!r} split; it has "
                              f"{', '.join(self.splits)} (--mode {' or '.join('eval_' + s for s in self.splits)})")

    def num_dims(self, image_size: int) -> int:
        """Dimensions the likelihood scores per image."""
        return self.channels * (image_size - 2 * self.border) ** 2

    def score(self, nll, image_size: int, per_image=False):
        """The reported number (in `unit`) for per-image NLLs in nats: a scalar tensor for all of them,
        or with `per_image` one number per image."""
        nll = tf.convert_to_tensor(nll)
        if self.unit == "nats_per_image":
            return nll if per_image else tf.reduce_mean(nll)
        if per_image:
            return dist.bits_per_dim(nll, 1, self.num_dims(image_size))
        return dist.bits_per_dim(tf.reduce_sum(nll), tf.cast(tf.size(nll), nll.dtype), self.num_dims(image_size))


def _mnist_train_images(split, path=None, allow_download=False):
    del allow_download  # MNIST is never downloaded
    return data.load_mnist_padded(split, path)


def _mnist_eval_images(split, path=None, allow_download=False):
    return data.binarize_for_evaluation(_mnist_train_images(split, path, allow_download))


def _imagenet_images(size, split, path=None, allow_download=False):
    del allow_download  # the files need an ImageNet account; never downloaded
    return imagenet.load(split, size, path)


def _imagenet(size):
    load = functools.partial(_imagenet_images, size)
    return DatasetSpec(
        name=f"imagenet{size}", channels=3, image_size=size, border=0, likelihood=DISCRETIZED_LOGISTIC,
        unit="bits_per_dim", splits=imagenet.SPLITS, folder_variable=imagenet.FOLDER_VARIABLE,
        load_train_images=load, load_eval_images=load)


REGISTRY = {
    "cifar10": DatasetSpec(
        name="cifar10", channels=3, image_size=32, border=0, likelihood=DISCRETIZED_LOGISTIC,
        unit="bits_per_dim", splits=data.SPLITS, folder_variable="CIFAR10_PATH",
        load_train_images=data.load_cifar10, load_eval_images=data.load_cifar10,
        download="tensorflow-datasets"),
    # The Theano system's binarized MNIST: digits padded with zeros to 32x32 (the strided layers need it),
    # binarized afresh at every training step, scored on the 28x28 digit only, reported in nats per image.
    "mnist": DatasetSpec(
        name="mnist", channels=1, image_size=32, border=(32 - data.MNIST_SIZE) // 2, likelihood=BERNOULLI,
        unit="nats_per_image", splits=data.SPLITS, folder_variable="MNIST_PATH",
        load_train_images=_mnist_train_images, load_eval_images=_mnist_eval_images),
    # Downsampled ImageNet (van den Oord et al., 2016), the benchmark of the IAF-VAE's successors.
    "imagenet32": _imagenet(32),
    "imagenet64": _imagenet(64),
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]
