# Shared pytest fixtures (plain helpers are in fixtures.py). Real datasets live in ../shared/data beside the
# checkout (also in CI); CIFAR10_PATH / MNIST_PATH override that, and tests needing data skip when it is absent.
import os
from pathlib import Path

# Before TensorFlow runs its first op: quiet logs and two logical CPUs (so MirroredStrategy tests have two
# replicas). Thread pools keep TensorFlow's defaults: one intra-op thread per xdist worker measured no faster
# over the whole suite (BUILD.md, Tests).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["IAF_TF_NO_DOWNLOAD"] = "1"  # tests never download (bin/iaf.py subprocesses inherit this)

import pytest  # noqa: E402

from iaf_tf.devices import configure_cpu  # noqa: E402

configure_cpu(num_logical_devices=2)

from iaf_tf import api, checkpoints, config, tf1_checkpoint  # noqa: E402
from tests.fixtures import (REFERENCE_DIR, REFERENCE_PREFIX, SHARED_DATA, TWO_BLOCKS_PER_LEVEL,  # noqa: E402
                            make_model, random_images, read_expected, seed, tiny_config)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The cifar-10-batches-py folder itself."""
    root = Path(os.environ.get("CIFAR10_PATH") or SHARED_DATA)
    folder = root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"
    if not (folder / "test_batch").is_file():
        pytest.skip(f"CIFAR-10 not found in {root} (set CIFAR10_PATH to the folder holding cifar-10-batches-py)")
    return folder


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    folder = Path(os.environ.get("MNIST_PATH") or SHARED_DATA / "mnist")
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {folder} (set MNIST_PATH to the folder holding the IDX .gz files)")
    return folder


@pytest.fixture
def no_data_env(monkeypatch):
    """No dataset location in the environment, and downloads allowed (the tests that use this stub them)."""
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    monkeypatch.delenv("MNIST_PATH", raising=False)
    monkeypatch.delenv("IAF_TF_NO_DOWNLOAD", raising=False)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference/tf1-small: a checkpoint of the original TF1 code and its expected numbers."""
    if read_expected() is None:
        pytest.skip(f"reference checkpoint not found in {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_prefix(reference_dir) -> str:
    return str(reference_dir / REFERENCE_PREFIX)


@pytest.fixture(scope="session")
def expected(reference_dir) -> dict:
    """expected.json: the reference's hpconfig, parameter count and the original's bits/dim."""
    return read_expected()


@pytest.fixture(scope="session")
def tf1_reference(reference_dir):
    """The reference checkpoint as tf1_checkpoint reads it."""
    return tf1_checkpoint.read(checkpoints.resolve(reference_dir))


@pytest.fixture(scope="session")
def averaged_reference(reference_prefix):
    """A tf1_small model with the reference checkpoint's moving averages as its weights."""
    trained = api.TrainedModel(config.load_preset("tf1_small"))
    trained.load_weights(reference_prefix, weights="ema")
    return trained.model


@pytest.fixture(scope="session")
def tiny_model():
    """A TWO_BLOCKS_PER_LEVEL CIFAR-10 model after the data-dependent init on noise images (not trained)."""
    model = make_model(tiny_config(TWO_BLOCKS_PER_LEVEL), name="model")
    model.initialize(random_images(8, 1), seed(7))
    return model


@pytest.fixture
def in_process_cli(monkeypatch):
    """cli.main in this process, whose TensorFlow is already set up with two logical CPUs: a one-replica run
    keeps them (cli would otherwise refuse a configuration it can no longer set)."""
    import tensorflow as tf

    from iaf_tf import devices

    monkeypatch.setattr(devices, "configure_cpu", lambda *args, **kwargs: tf.config.list_logical_devices("CPU"))
