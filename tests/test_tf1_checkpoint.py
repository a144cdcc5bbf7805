"""The contract with the original: read the reference TF1 checkpoint of openai/iaf, load it, and
reproduce the bits/dim that the original code computes on the CIFAR-10 test set (expected.json)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data, distributions
from iaf_tf.hparams import load_preset
from iaf_tf.model import CVAE, count_trainable_parameters
from iaf_tf.checkpoints import named_variables
from iaf_tf.tf1_checkpoint import CheckpointError, load_into_model, read_tf1_checkpoint

EVAL_SEED = 1234
# The same place conftest's reference_dir fixture looks (../shared/reference beside the checkout).
REFERENCE_EXPECTED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tf1-small" / "expected.json"


@pytest.fixture(scope="module")
def ckpt(reference_dir):
    return read_tf1_checkpoint(reference_dir)


@pytest.fixture(scope="module")
def expected(reference_dir):
    return json.loads((reference_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def reference_model():
    return CVAE(load_preset("tf1_small"), name="model").build_for(1)


@pytest.fixture(scope="module")
def test_images(cifar10_dir):
    return data.load_cifar10("test", cifar10_dir)


# ---------------------------------------------------------------- reading


def test_read_reference_checkpoint(ckpt, expected):
    assert ckpt.global_step == 3000 == expected["global_step"]
    assert ckpt.architecture() == {"level_depths": [2, 2], "h_size": 32, "z_size": 8, "depth_ar": 2}
    assert ckpt.path.endswith("model.ckpt-3000")
    assert "global_step" not in ckpt.weights
    assert {"h_top", "dec_log_stdv", "x_enc/V", "x_dec/g", "IAF_1_0/down_deconv2/V",
            "IAF_0_1/ar_multiconv2d/layer_out_1/b"} <= set(ckpt.weights)
    # Every weight has a moving average. The Adamax slots exist for every weight that gets a gradient in
    # the original: the top block's up_conv3 feeds nothing (the top of the up pass is replaced by h_top),
    # so TF1's optimizer never created slots for it.
    unused = {"IAF_1_1/up_conv3/V", "IAF_1_1/up_conv3/g", "IAF_1_1/up_conv3/b"}
    assert set(ckpt.ema) == set(ckpt.weights)
    assert set(ckpt.adamax_max) == set(ckpt.adamax_mean) == set(ckpt.weights) - unused
    for slots in (ckpt.ema, ckpt.adamax_max, ckpt.adamax_mean):
        for name, value in slots.items():
            assert np.shape(value) == np.shape(ckpt.weights[name]), name
    for name, value in ckpt.adamax_max.items():
        assert np.all(np.asarray(value) >= 0), name
    # After 3000 steps the moving averages and the first moments are not the weights themselves.
    assert not np.allclose(ckpt.ema["x_enc/V"], ckpt.weights["x_enc/V"])
    assert np.any(np.asarray(ckpt.adamax_mean["x_enc/V"]) < 0)
    # Layouts: transposed kernels are [kh, kw, out, in].
    assert ckpt.weights["x_dec/V"].shape == (5, 5, 3, 32)
    assert ckpt.weights["x_enc/V"].shape == (5, 5, 3, 32)


def test_read_accepts_a_prefix(reference_dir, ckpt):
    by_prefix = read_tf1_checkpoint(str(reference_dir / "model.ckpt-3000"))
    assert by_prefix.global_step == 3000
    assert set(by_prefix.weights) == set(ckpt.weights)
    np.testing.assert_array_equal(by_prefix.ema["h_top"], ckpt.ema["h_top"])


def test_weight_count_matches_expected(ckpt, expected, reference_model):
    total = sum(int(np.prod(np.shape(v))) for v in ckpt.weights.values())
    assert total == expected["trainable_parameters"] == count_trainable_parameters(reference_model)
    assert set(named_variables(reference_model)) == set(ckpt.weights)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_load_into_model(ckpt, reference_model, which):
    variables = load_into_model(reference_model, ckpt, weights=which)
    source = ckpt.ema if which == "ema" else ckpt.weights
    assert set(variables) == set(source)
    for name, var in variables.items():
        np.testing.assert_array_equal(var.numpy(), source[name], err_msg=name)
    np.testing.assert_array_equal(reference_model.x_dec.V.numpy(), source["x_dec/V"])
    np.testing.assert_array_equal(reference_model.blocks[2].ar.heads[1].g.numpy(),
                                  source["IAF_1_0/ar_multiconv2d/layer_out_1/g"])


def test_load_rejects_unknown_weights_kind(ckpt, reference_model):
    with pytest.raises(ValueError):
        load_into_model(reference_model, ckpt, weights="average")


def test_load_mismatched_h_size(ckpt):
    model = CVAE(load_preset("tf1_small").parse("h_size=16")).build_for(1)
    with pytest.raises(CheckpointError, match="h_size"):
        load_into_model(model, ckpt)


def test_load_mismatched_depth(ckpt):
    model = CVAE(load_preset("tf1_small").parse("num_blocks=1,z_size=4")).build_for(1)
    with pytest.raises(CheckpointError, match="level_depths") as info:
        load_into_model(model, ckpt)
    assert "z_size: checkpoint has 8" in str(info.value) and "h_size:" not in str(info.value)


def test_bogus_directories_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        read_tf1_checkpoint(tmp_path)  # empty directory
    with pytest.raises(CheckpointError):
        read_tf1_checkpoint(tmp_path / "does-not-exist")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
    (junk / "model.ckpt-1.index").write_bytes(b"not a checkpoint index")
    (junk / "model.ckpt-1.data-00000-of-00001").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError):
        read_tf1_checkpoint(junk)


def test_non_iaf_checkpoint_is_rejected(tmp_path, reference_model):
    prefix = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(str(tmp_path / "other"))
    other = read_tf1_checkpoint(prefix)
    with pytest.raises(CheckpointError, match="h_top"):
        other.architecture()
    with pytest.raises(CheckpointError):
        load_into_model(reference_model, other)


# ---------------------------------------------------------------- fidelity

def _result_id(result):
    return f"{result['weights']}-k{result['k']}-{result['test_images'].replace(' ', '')}"


def _expected_results():
    # Read at collection time so every published number is its own test id; the fixtures skip when absent.
    path = REFERENCE_EXPECTED
    if not path.is_file():
        return [pytest.param(None, id="reference-missing")]
    return [pytest.param(r, id=_result_id(r)) for r in json.loads(path.read_text())["results"]]


def _num_images(text):
    if text.startswith("all "):
        return int(text.split()[1])
    if text.startswith("first "):
        return int(text.split()[1])
    raise ValueError(f"unknown test_images {text!r}")


def evaluate_bits_per_dim(model, images, k, seed=EVAL_SEED):
    batch = max(1, 100 // k)

    @tf.function
    def batch_nll(x, batch_seed):
        return tf.reduce_sum(tf.cast(model(x, seed=batch_seed, k=k)["nll"], tf.float64))

    total = 0.0
    for start in range(0, len(images), batch):
        total += float(batch_nll(tf.constant(images[start:start + batch]), tf.constant([seed, start], tf.int32)))
    return distributions.bits_per_dim(total, len(images), 32 * 32 * 3)


@pytest.mark.slow
@pytest.mark.parametrize("result", _expected_results())
def test_bits_per_dim_matches_original(result, ckpt, reference_model, test_images, expected):
    assert result is not None
    assert expected["hpconfig"] == "depth=2,num_blocks=2,h_size=32,z_size=8,batch_size=16,num_gpus=1," \
                                   "learning_rate=0.002,kl_min=0.1"
    n = _num_images(result["test_images"])
    load_into_model(reference_model, ckpt, weights=result["weights"])
    bpd = evaluate_bits_per_dim(reference_model, test_images[:n], result["k"])
    tolerance = 0.005 if n == 10000 else 0.01
    assert math.isfinite(bpd)
    assert abs(bpd - result["bits_per_dim"]) <= tolerance, (
        f"{_result_id(result)}: port gives {bpd:.4f}, original {result['bits_per_dim']:.4f}")
