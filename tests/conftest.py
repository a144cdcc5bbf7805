# Shared pytest fixtures. Real datasets live in ../shared/data beside the checkout (also in CI);
# CIFAR10_PATH / MNIST_PATH override that, and tests needing data skip when it is absent.
import os
from pathlib import Path

# Before TensorFlow runs its first op: quiet logs, two logical CPUs (so MirroredStrategy tests have two
# replicas) and modest thread pools on the 2-core CI machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["IAF_TF_NO_DOWNLOAD"] = "1"  # tests never download (bin/iaf.py subprocesses inherit this)

import pytest  # noqa: E402

from iaf_tf.devices import configure_cpu  # noqa: E402

configure_cpu(num_logical_devices=2)

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference/tf1-small: a checkpoint of the original TF1 code and its expected numbers."""
    folder = REFERENCE_DIR / "tf1-small"
    if not (folder / "expected.json").is_file():
        pytest.skip(f"reference checkpoint not found in {folder}")
    return folder
