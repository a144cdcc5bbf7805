"""iaf_tf.api (`iaf_tf.load`): a trained model from a run folder, a native or a TF1 checkpoint, with the
hyper-parameters its run recorded (or read off a TF1 checkpoint), and what to do with it."""

import numpy as np
import pytest

import iaf_tf
from iaf_tf import api, convert, data
from iaf_tf.checkpoints import named_variables
from iaf_tf.config import Config, load_preset
from iaf_tf.errors import ConfigError


@pytest.fixture(scope="module")
def trained(reference_prefix):
    return iaf_tf.load(reference_prefix)


def test_load_a_tf1_checkpoint_reads_its_architecture_and_takes_its_averages(trained, tf1_reference):
    assert trained.step == 3000 and trained.checkpoint.endswith("model.ckpt-3000")
    model = trained.config.model
    assert (model.level_depths, model.h_size, model.z_size, model.depth_ar) == ([2, 2], 32, 8, 2)
    for name, var in named_variables(trained.model).items():
        np.testing.assert_array_equal(var.numpy(), tf1_reference.ema[name], err_msg=name)
    raw = api.load(trained.checkpoint, weights="raw")
    np.testing.assert_array_equal(raw.model.x_enc.V.numpy(), tf1_reference.weights["x_enc/V"])


@pytest.mark.slow
def test_load_a_run_folder_uses_its_record_and_allows_what_may_change(reference_dir, tmp_path):
    _, converted = convert.convert(reference_dir, tmp_path)
    for path in (tmp_path, tmp_path / "train", tmp_path / "train" / "ckpt-3000"):
        assert api.load(path).config == converted
    assert api.load(tmp_path, hpconfig="k=5", eval_batch_size=50).config == converted.replace(k=5, eval_batch_size=50)
    with pytest.raises(ConfigError, match="h_size=16 contradicts the run in"):
        api.load(tmp_path, h_size=16)


def test_config_for_a_folder_without_a_run_is_the_defaults_with_what_is_given(tmp_path):
    assert api.config_for(tmp_path, {"h_size": 8}) == (Config().replace(h_size=8), {})


def test_scores_samples_reconstructions_and_codes(trained, cifar10_dir):
    images = data.load_cifar10("test", cifar10_dir)[:4]
    nll = trained.nll(images, k=1, seed=3)
    assert nll.shape == (4,) and np.all(np.isfinite(nll))
    np.testing.assert_array_equal(nll, trained.nll(images, k=1, seed=3))
    assert trained.score(nll) == pytest.approx(nll.mean() / (np.log(2) * 3072), rel=1e-6)
    assert trained.bits_per_dim(images, k=1, seed=3) == pytest.approx(trained.score(nll), rel=1e-6)
    assert 4 < trained.score(nll) < 8
    samples = trained.sample(3, seed=1)
    assert samples.shape == (3, 32, 32, 3) and samples.dtype == np.uint8
    np.testing.assert_array_equal(samples, trained.sample(3, seed=1))
    assert not np.array_equal(samples, trained.sample(3, seed=2))
    recon = trained.reconstruct(images, seed=1)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    assert np.abs(recon.astype(int) - images.astype(int)).mean() < 40  # a reconstruction of them
    code = trained.encode(images)
    assert [layer["layer"] for layer in code] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [layer["mean"].shape for layer in code] == [(4, 16, 16, 8)] * 2 + [(4, 8, 8, 8)] * 2
    assert all(layer["log_scale"].shape == layer["mean"].shape for layer in code)


def test_trained_model_of_a_config_has_no_optimizer():
    state = api.TrainedModel(load_preset("tf1_small")).state
    assert state.optimizer is None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tf1 checkpoint", "converted run folder"])
def test_the_api_reproduces_the_reference_bits_per_dim(how, reference_dir, cifar10_dir, tmp_path, expected):
    path = reference_dir
    if how == "converted run folder":
        convert.convert(reference_dir, tmp_path)
        path = tmp_path
    images = data.load_cifar10("test", cifar10_dir)[:2000]
    bits = iaf_tf.load(path).bits_per_dim(images, k=1)
    want = next(r["bits_per_dim"] for r in expected["results"]
                if (r["weights"], r["k"], r["test_images"]) == ("ema", 1, "first 2000"))
    assert abs(bits - want) <= 0.01  # the fidelity tests' tolerance for fewer than 10,000 images


def test_k_samples_are_drawn_in_passes_of_at_most_eval_batch_size(reference_prefix, cifar10_dir):
    """Memory flat in k: no forward pass holds more than eval_batch_size (image, sample) pairs."""
    trained = iaf_tf.load(reference_prefix, eval_batch_size=50)
    seen = []
    call = trained.model.call

    def recording(images, seed, k=1, **kwargs):
        seen.append(int(images.shape[0]) * k)
        return call(images, seed, k=k, **kwargs)

    trained.model.call = recording
    trained._evaluator = type(trained._evaluator)(trained.model)  # trace again through the recorder
    nll = trained.nll(data.load_cifar10("test", cifar10_dir)[:2], k=400)
    assert nll.shape == (2,) and np.all(np.isfinite(nll))
    assert seen and max(seen) <= 50


@pytest.mark.parametrize("given", [{"depth": 1}, {"posterior": "down_iaf1_nl"}, {"num_blocks": 3},
                                   {"dataset": "mnist"}])
def test_evaluating_a_run_under_another_architecture_is_refused(given, reference_dir, tmp_path):
    _, converted = convert.convert(reference_dir, tmp_path)
    key, value = next(iter(given.items()))
    with pytest.raises(ConfigError, match=f"^{key}={value} contradicts the run in .* which has {key}="
                                          f"{converted.get(key)}:"):
        api.config_for(tmp_path, given)
