"""CIFAR-10 and MNIST files as uint8 NHWC arrays, and the training batches drawn from them (in memory or from
a memory-mapped file)."""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import tensorflow as tf

from iaf_tf.distributions import binarize
from iaf_tf.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", 60000), "test": ("t10k-images-idx3-ubyte.gz", 10000)}
SPLITS = ("train", "test")
MNIST_SIZE = 28
# The one binarization of the MNIST test images that likelihoods are reported on.
MNIST_EVAL_BINARIZATION_SEED = (2016, 0)

_CIFAR10_HOWTO = (f"set CIFAR10_PATH to the folder holding cifar-10-batches-py "
                  f"(download {CIFAR10_URL} and extract it)")
_MNIST_HOWTO = ("set MNIST_PATH to the folder holding train-images-idx3-ubyte.gz and "
                "t10k-images-idx3-ubyte.gz (the official MNIST IDX files)")




def _check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------- CIFAR-10

def find_cifar10_dir(path: str | os.PathLike | None = None) -> Path:
    given = path if path is not None else os.environ.get("CIFAR10_PATH")
    if not given:
        raise DataError(f"no CIFAR-10 location given: {_CIFAR10_HOWTO}")
    root = Path(given).expanduser().resolve()
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            missing = [n for names in CIFAR10_FILES.values() for n in names
                       if not (candidate / n).is_file()]
            if missing:
                raise DataError(f"CIFAR-10 folder {candidate} lacks {', '.join(missing)}; {_CIFAR10_HOWTO}")
            return candidate
    raise DataError(f"no CIFAR-10 batches in {root} or {root / 'cifar-10-batches-py'}; {_CIFAR10_HOWTO}")


class _ArrayUnpickler(pickle.Unpickler):
    # The batches are pickles; only allow what a numpy array needs, so a bad file cannot run code.
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar10_batch(file: Path) -> np.ndarray:
    try:
        with open(file, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncation shows up as EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"cannot read CIFAR-10 batch {file}: {type(e).__name__}: {e}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (10000, 3072):
        found = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                 else "no b'data' array" if data is None else type(data).__name__)
        raise DataError(f"CIFAR-10 batch {file} is corrupt: expected b'data' uint8 (10000, 3072), found {found}")
    # Rows are planar R, G, B 32x32 planes.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=4)
def _load_cifar10_dir(folder: Path, split: str) -> np.ndarray:
    images = np.concatenate([_read_cifar10_batch(folder / n) for n in CIFAR10_FILES[split]])
    images.flags.writeable = False  # shared by every caller through the cache
    return images


# Where tensorflow-datasets fetches CIFAR-10 from; looked up first so that a host without a network
# fails in a second instead of after minutes of retries.
_CIFAR10_HOST = "www.cs.toronto.edu"


def _host_resolves(host: str, timeout: float = 5.0) -> bool:
    import concurrent.futures
    import socket

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def _download_cifar10(split: str) -> np.ndarray:
    if not _host_resolves(_CIFAR10_HOST):
        raise DataError(f"cannot download CIFAR-10: {_CIFAR10_HOST} is not reachable from here")
    import tensorflow_datasets as tfds

    print(f"CIFAR-10 not found locally; downloading it with tensorflow-datasets ({split} split)")

    data = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1))
    images = np.ascontiguousarray(data["image"], dtype=np.uint8)
    images.flags.writeable = False
    return images


def load_cifar10(split: str, path: str | os.PathLike | None = None,
                 allow_download: bool = False) -> np.ndarray:
    """uint8 [N, 32, 32, 3]; train is data_batch_1..5 in order, test the official test_batch order."""
    _check_split(split)
    try:
        folder = find_cifar10_dir(path)
    except DataError as missing:
        if not allow_download or os.environ.get("IAF_TF_NO_DOWNLOAD") == "1":
            raise
        try:
            return _download_cifar10(split)
        except Exception as e:
            raise DataError(f"{missing} (the download fallback failed too: {e})") from e
    return _load_cifar10_dir(folder, split)


# ---------------------------------------------------------------- MNIST

@functools.lru_cache(maxsize=4)
def _load_mnist_file(file: Path, count: int) -> np.ndarray:
    try:
        with gzip.open(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # missing, truncated, or corrupt deflate data
        raise DataError(f"cannot read MNIST file {file}: {type(e).__name__}: {e}") from e
    if len(raw) < 16:
        raise DataError(f"MNIST file {file} is too short for an IDX header")
    magic, n, rows, cols = np.frombuffer(raw, ">u4", count=4)
    if magic != 2051 or (n, rows, cols) != (count, 28, 28) or len(raw) != 16 + n * rows * cols:
        raise DataError(f"MNIST file {file} is corrupt: magic {magic}, header {n}x{rows}x{cols}, "
                        f"{len(raw) - 16} pixel bytes; expected magic 2051 and {count}x28x28")
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, 28, 28, 1)
    images.flags.writeable = False
    return images


def load_mnist(split: str, path: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 [N, 28, 28, 1] from the official IDX gz files."""
    _check_split(split)
    given = path if path is not None else os.environ.get("MNIST_PATH")
    if not given:
        raise DataError(f"no MNIST location given: {_MNIST_HOWTO}")
    name, count = MNIST_FILES[split]
    file = Path(given).expanduser().resolve() / name
    if not file.is_file():
        raise DataError(f"MNIST file {file} not found; {_MNIST_HOWTO}")
    return _load_mnist_file(file, count)


def load_mnist_padded(split: str, path: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 [N, 32, 32, 1]: the digits centred in zero borders, since the model's strided layers need 32x32."""
    border = (32 - MNIST_SIZE) // 2
    return np.pad(load_mnist(split, path), ((0, 0), (border, border), (border, border), (0, 0)))


def binarize_for_evaluation(images: np.ndarray) -> np.ndarray:
    """The one binarization of MNIST that likelihoods are reported on (training binarizes afresh at
    every step instead)."""
    return binarize(images, tf.constant(MNIST_EVAL_BINARIZATION_SEED, tf.int64)).numpy()


# ---------------------------------------------------------------- tf.data

def _check_batch_size(batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def train_dataset(images: np.ndarray, batch_size: int, seed: int | None = None,
                  start_step: int = 0) -> tf.data.Dataset:
    """Endless uint8 [batch_size, H, W, C] batches, reshuffled every epoch.

    Batch number s is a pure function of (seed, s): epoch e = s // (n // batch_size) visits the images in
    a stateless permutation keyed by (seed, e), and the last n % batch_size images of each permutation are
    left out. So a resumed run continues the very same stream from `start_step`, with no iterator state to
    checkpoint.
    """
    _check_batch_size(batch_size)
    n = len(images)
    if n < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} images, got {n}")
    if seed is None:
        seed = int(np.random.randint(2**31 - 1))
    take = _row_reader(images) if isinstance(images, np.memmap) else None
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"train_dataset takes uint8 images, got {images.dtype}")
    steps_per_epoch = n // batch_size

    def take_rows(rows):
        return images[rows]
    take = take or take_rows

    def batch_at(step):
        epoch, position = step // steps_per_epoch, step % steps_per_epoch
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        # Gathered from the NumPy array itself: a tf.constant of it would be a second copy of the whole
        # training set (150 MB for CIFAR-10) for every dataset made from it.
        batch = tf.numpy_function(take, [order[position * batch_size:(position + 1) * batch_size]], tf.uint8,
                                  stateful=False)
        return tf.ensure_shape(batch, [batch_size, *images.shape[1:]])

    # Fixed parallelism and no autotuning: a batch is one gather, and tf.data's autotuning thread sleeps up
    # to tens of seconds between wake-ups, which deleting the iterator (at the end of a run) waits for.
    options = tf.data.Options()
    options.autotune.enabled = False
    return (tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
            .map(batch_at, num_parallel_calls=2, deterministic=True)
            .prefetch(2)
            .with_options(options))


def _row_reader(images: np.memmap):
    """rows -> images[rows], read from the file with one pread per row, when `images` maps a whole file:
    pages of a memory map that training touches count towards the process's memory, until the whole
    split would; reads do not. Any other array is indexed in memory."""
    whole_file = (images.filename and images.flags.c_contiguous and images.dtype == np.uint8
                  and os.path.getsize(images.filename) == images.offset + images.nbytes)
    if not whole_file:
        return None
    path, offset, shape = images.filename, images.offset, images.shape[1:]
    row_bytes = int(np.prod(shape))

    def take(rows):
        out = np.empty((len(rows), *shape), np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows):
                out[i] = np.frombuffer(os.pread(fd, row_bytes, offset + int(row) * row_bytes), np.uint8).reshape(shape)
        finally:
            os.close(fd)
        return out
    return take


def check_images(images, image_size: int, channels: int, dataset: str) -> None:
    """Raise DataError unless images are uint8 [N, image_size, image_size, channels]."""
    expected = (image_size, image_size, channels)
    if getattr(images, "dtype", None) != np.uint8 or getattr(images, "ndim", 0) != 4 \
            or tuple(images.shape[1:]) != expected:
        raise DataError(f"{dataset} images must be uint8 [N, {image_size}, {image_size}, {channels}], got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
                        f"; check image_size in --hpconfig (the {dataset} images here are "
                        f"{tuple(getattr(images, 'shape', ())[1:3])})")
