"""iaf_tf.data: the CIFAR-10 and MNIST files (layouts, caching, every way a file can be missing or bad), the
image check, and the training batches drawn from them."""

import gzip
import os
import pickle
import time

import numpy as np
import pytest

from iaf_tf import data
from iaf_tf.errors import DataError

# Published per-channel means of the official CIFAR-10 files (0..255 scale).
TRAIN_MEAN = [125.307, 122.950, 113.865]
TEST_MEAN = [126.025, 123.709, 114.854]


def _fake_cifar_dir(tmp_path, cifar10_dir, test_batch_bytes):
    """Real train batches (symlinked, to avoid copying 150 MB) and a given test_batch."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in data.CIFAR10_FILES["train"]:
        (folder / name).symlink_to(cifar10_dir / name)
    (folder / "test_batch").write_bytes(test_batch_bytes)
    return folder


def test_cifar10_test_split(cifar10_dir):
    x = data.load_cifar10("test", cifar10_dir)
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0), TEST_MEAN, atol=0.01)
    assert data.load_cifar10("test", cifar10_dir) is x  # cached
    assert not x.flags.writeable


def test_cifar10_train_split(cifar10_dir):
    x = data.load_cifar10("train", cifar10_dir.parent)
    assert x.shape == (50000, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0), TRAIN_MEAN, atol=0.01)


def test_cifar10_layout_matches_planar_rows(cifar10_dir):
    with open(cifar10_dir / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    x = data.load_cifar10("test", cifar10_dir)[0]
    np.testing.assert_array_equal(x[..., 0].ravel(), row[:1024])
    np.testing.assert_array_equal(x[..., 2].ravel(), row[2048:])


def test_cifar10_dir_from_env_either_folder(cifar10_dir, monkeypatch):
    for given in (cifar10_dir, cifar10_dir.parent):
        monkeypatch.setenv("CIFAR10_PATH", str(given))
        assert data.find_cifar10_dir() == cifar10_dir.resolve()
        assert data.find_cifar10_dir(given) == cifar10_dir.resolve()


def test_cifar10_missing(tmp_path, no_data_env):
    with pytest.raises(DataError, match="CIFAR10_PATH"):
        data.load_cifar10("test")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        data.load_cifar10("test", missing)
    assert str(missing) in str(err.value) and "CIFAR10_PATH" in str(err.value)


def test_cifar10_incomplete_folder(tmp_path, cifar10_dir):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").symlink_to(cifar10_dir / "data_batch_1")
    with pytest.raises(DataError, match="lacks data_batch_2.*test_batch"):
        data.find_cifar10_dir(tmp_path)


def test_cifar10_download_fallback_failure_keeps_data_error(no_data_env, monkeypatch):
    def offline(split):
        raise OSError("offline")

    monkeypatch.setattr(data, "_download_cifar10", offline)
    with pytest.raises(DataError, match="CIFAR10_PATH") as err:
        data.load_cifar10("test", allow_download=True)
    assert isinstance(err.value.__cause__, OSError)
    assert "download fallback failed too: offline" in str(err.value)


def test_cifar10_no_download_setting_is_honoured(no_data_env, monkeypatch):
    def must_not_download(split):
        raise AssertionError("downloaded although IAF_TF_NO_DOWNLOAD=1")

    monkeypatch.setattr(data, "_download_cifar10", must_not_download)
    monkeypatch.setenv("IAF_TF_NO_DOWNLOAD", "1")
    with pytest.raises(DataError, match="CIFAR10_PATH") as err:
        data.load_cifar10("test", allow_download=True)
    assert "download fallback" not in str(err.value) and err.value.__cause__ is None


def test_cifar10_download_without_a_network_fails_fast(no_data_env, monkeypatch):
    monkeypatch.setattr(data, "_host_resolves", lambda host, timeout=5.0: False)
    began = time.time()
    with pytest.raises(DataError, match="CIFAR10_PATH.*not reachable from here"):
        data.load_cifar10("test", allow_download=True)
    assert time.time() - began < 5


def test_cifar10_truncated_batch(tmp_path, cifar10_dir):
    good = (cifar10_dir / "test_batch").read_bytes()
    folder = _fake_cifar_dir(tmp_path, cifar10_dir, good[: len(good) // 2])
    with pytest.raises(DataError, match="test_batch") as err:
        data.load_cifar10("test", tmp_path)
    assert str(folder / "test_batch") in str(err.value)


@pytest.mark.parametrize("content,fragment", [
    ({b"data": np.zeros((10, 3072), np.uint8)}, "(10, 3072)"),
    ({b"data": np.zeros((10000, 3072), np.float32)}, "float32"),
    ({b"labels": [0] * 10000}, "no b'data'"),
    ([1, 2, 3], "no b'data'"),
])
def test_cifar10_wrong_content(tmp_path, cifar10_dir, content, fragment):
    _fake_cifar_dir(tmp_path, cifar10_dir, pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match="test_batch") as err:
        data.load_cifar10("test", tmp_path)
    assert fragment in str(err.value)


def test_cifar10_refuses_code_in_pickle(tmp_path, cifar10_dir):
    _fake_cifar_dir(tmp_path, cifar10_dir, pickle.dumps({b"data": os.getcwd}, protocol=2))
    with pytest.raises(DataError, match="unexpected global"):
        data.load_cifar10("test", tmp_path)


def test_bad_split(tmp_path):
    with pytest.raises(ValueError):
        data.load_cifar10("valid", tmp_path)
    with pytest.raises(ValueError):
        data.load_mnist("valid", tmp_path)


def test_mnist(mnist_dir):
    train, test = data.load_mnist("train", mnist_dir), data.load_mnist("test", mnist_dir)
    assert train.shape == (60000, 28, 28, 1) and test.shape == (10000, 28, 28, 1)
    assert test.dtype == np.uint8
    assert train.mean() == pytest.approx(33.318, abs=0.001)
    padded = data.load_mnist_padded("test", mnist_dir)
    assert padded.shape == (10000, 32, 32, 1) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], test)
    assert padded.sum() == test.sum()


def test_mnist_env_and_errors(mnist_dir, tmp_path, monkeypatch, no_data_env):
    with pytest.raises(DataError, match="MNIST_PATH"):
        data.load_mnist("test")
    monkeypatch.setenv("MNIST_PATH", str(mnist_dir))
    assert data.load_mnist("test").shape == (10000, 28, 28, 1)
    with pytest.raises(DataError, match="MNIST_PATH"):
        data.load_mnist("test", tmp_path)
    bad = np.array([2049, 10000, 28, 28], ">u4").tobytes() + bytes(10000 * 784)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bad))
    with pytest.raises(DataError, match="magic 2049"):
        data.load_mnist("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="t10k-images"):
        data.load_mnist("test", tmp_path)
    good = gzip.compress(np.array([2051, 10000, 28, 28], ">u4").tobytes() + bytes(10000 * 784))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(good[:20] + b"\xff" * 64 + good[84:])  # bad deflate data
    with pytest.raises(DataError, match="t10k-images"):
        data.load_mnist("test", tmp_path)


def test_train_dataset_shuffles_each_epoch():
    images = np.broadcast_to(np.arange(12, dtype=np.uint8)[:, None, None, None], (12, 4, 4, 3)).copy()
    ds = data.train_dataset(images, batch_size=4, seed=0)
    batches = [b.numpy() for b in ds.take(6)]  # two epochs
    assert all(b.shape == (4, 4, 4, 3) and b.dtype == np.uint8 for b in batches)
    order = np.concatenate([b[:, 0, 0, 0] for b in batches])
    first, second = order[:12], order[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert not np.array_equal(first, second)
    again = np.concatenate([b.numpy()[:, 0, 0, 0] for b in data.train_dataset(images, 4, seed=0).take(6)])
    np.testing.assert_array_equal(order, again)  # seeded


def test_train_dataset_real_batches(cifar10_dir):
    batch = next(iter(data.train_dataset(data.load_cifar10("test", cifar10_dir), 16, seed=1)))
    assert batch.shape == (16, 32, 32, 3) and batch.dtype.name == "uint8"


def test_check_images_rejects_wrong_arrays():
    with pytest.raises(DataError, match="uint8"):
        data.check_images(np.zeros([2, 32, 32, 3], np.float32), 32, 3, "cifar10")
    with pytest.raises(DataError, match=r"\[N, 32, 32, 3\]"):
        data.check_images(np.zeros([2, 32, 32, 1], np.uint8), 32, 3, "cifar10")
    data.check_images(np.zeros([2, 32, 32, 3], np.uint8), 32, 3, "cifar10")
