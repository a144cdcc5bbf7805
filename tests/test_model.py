"""The CVAE: helpers against NumPy / TF1 ops, parameter counts of the original, and the call contract."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data
from iaf_tf.checkpoints import named_variables
from iaf_tf.hparams import get_default_hparams, load_preset
from iaf_tf.model import (CVAE, count_trainable_parameters, free_bits_kl, input_to_unit_range,
                          resize_nearest, to_uint8_images)

TINY = "depth=2,num_blocks=2,h_size=16,z_size=4,num_gpus=1,batch_size=4"


def tiny_hps(extra=""):
    return get_default_hparams().parse(TINY + ("," + extra if extra else ""))


def seed(a, b=0):
    return tf.constant([a, b], tf.int32)


def random_images(n, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return rng.integers(0, 256, size=[n, 32, 32, 3]).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_model():
    model = CVAE(tiny_hps(), name="model")
    model.initialize(random_images(8, 1), seed(7))
    return model


# ---------------------------------------------------------------- helpers


def test_resize_nearest_half_keeps_even_rows_and_columns():
    x = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3)
    got = resize_nearest(tf.constant(x), 0.5).numpy()
    np.testing.assert_array_equal(got, x[:, [0, 2, 4]][:, :, [0, 2, 4]])


def test_resize_nearest_double_repeats_pixels():
    x = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    got = resize_nearest(tf.constant(x), 2).numpy()
    assert got.shape == (2, 6, 8, 2)
    for i in range(6):
        for j in range(8):
            np.testing.assert_array_equal(got[:, i, j], x[:, i // 2, j // 2])


@pytest.mark.parametrize("factor", [0.5, 2])
def test_resize_nearest_equals_tf1_op(factor):
    x = tf.random.stateless_normal([3, 8, 8, 5], seed=[1, 2])
    size = [int(8 * factor), int(8 * factor)]
    want = tf.compat.v1.image.resize_nearest_neighbor(x, size, align_corners=False, half_pixel_centers=False)
    np.testing.assert_array_equal(resize_nearest(x, factor).numpy(), want.numpy())


def test_resize_nearest_rejects_other_factors():
    with pytest.raises(ValueError):
        resize_nearest(tf.zeros([1, 4, 4, 1]), 3)


def test_input_to_unit_range():
    got = input_to_unit_range(tf.constant([0, 1, 128, 255], tf.uint8)).numpy()
    np.testing.assert_allclose(got, [-0.5 + 1 / 512, -0.5 + 3 / 512, 1 / 512, 0.5 - 1 / 512], atol=1e-7)
    assert got.dtype == np.float32


def test_to_uint8_images_inverts_input_to_unit_range():
    pixels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8_images(input_to_unit_range(pixels)).numpy(), pixels)


def test_free_bits_kl_without_floor_is_per_image_sum():
    rng = np.random.default_rng(0)
    kl = rng.normal(0.1, 0.2, size=[5, 4, 4, 3]).astype(np.float32)
    np.testing.assert_allclose(free_bits_kl(tf.constant(kl), 0.0).numpy(),
                               kl.astype(np.float64).sum(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("kl_min", [0.1, 0.5, 2.0])
def test_free_bits_kl_floors_batch_mean_per_channel(kl_min):
    rng = np.random.default_rng(1)
    kl = rng.normal(0.02, 0.05, size=[5, 4, 4, 6])
    kl[..., :2] += 0.3  # some channels above the floor, others below
    got = free_bits_kl(tf.constant(kl, tf.float32), kl_min).numpy()
    per_channel = kl.sum(axis=(1, 2)).mean(axis=0)
    want = np.maximum(per_channel, kl_min).sum()
    assert got.shape == (5,)
    np.testing.assert_allclose(got, np.full(5, want), rtol=1e-5)


# ---------------------------------------------------------------- parameter counts of the original


def test_parameter_count_tf1_small():
    model = CVAE(load_preset("tf1_small")).build_for(1)
    assert count_trainable_parameters(model) == 357_671


def test_parameter_count_readme_recipe():
    model = CVAE(load_preset("readme_recipe")).build_for(1)
    assert count_trainable_parameters(model) == 41_557_927


# ---------------------------------------------------------------- call contract


@pytest.mark.parametrize("k", [1, 3])
def test_call_output_shapes(tiny_model, k):
    b = 2
    out = tiny_model(random_images(b, 2), seed(3), k=k)
    n = b * k
    assert out["mean"].shape == (n, 32, 32, 3)
    for key in ("log_pxz", "kl_obj", "kl_cost"):
        assert out[key].shape == (n,), key
    assert out["nll"].shape == (b,)
    assert out["objective"].shape == ()
    assert len(out["kl_cost_layers"]) == len(out["kl_obj_layers"]) == 4
    for key in ("mean", "log_pxz", "kl_obj", "kl_cost", "nll", "objective"):
        assert np.all(np.isfinite(out[key].numpy())), key


def test_call_outputs_are_consistent(tiny_model):
    out = tiny_model(random_images(3, 3), seed(4))
    kl_cost = sum(t.numpy().astype(np.float64) for t in out["kl_cost_layers"])
    kl_obj = sum(t.numpy().astype(np.float64) for t in out["kl_obj_layers"])
    np.testing.assert_allclose(out["kl_cost"].numpy(), kl_cost, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(out["kl_obj"].numpy(), kl_obj, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(out["nll"].numpy(), out["kl_cost"].numpy() - out["log_pxz"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["objective"].numpy(), np.sum(out["kl_obj"].numpy() - out["log_pxz"].numpy()),
                               rtol=1e-5)
    mean = out["mean"].numpy()
    assert mean.min() >= -0.5 + 1 / 512 - 1e-7 and mean.max() <= 0.5 - 1 / 512 + 1e-7


def test_call_k_repeats_images_consecutively(tiny_model):
    # With k samples per image, the repeated copies of image i are rows i*k .. i*k+k-1: their decoder
    # means differ only through the noise, and the group's nll is the logsumexp bound of its rows.
    images = random_images(2, 4)
    out = tiny_model(images, seed(5), k=3)
    log_w = (out["log_pxz"].numpy() - out["kl_cost"].numpy()).astype(np.float64).reshape(2, 3)
    m = log_w.max(axis=1)
    want = -(m + np.log(np.exp(log_w - m[:, None]).sum(axis=1)) - np.log(3))
    np.testing.assert_allclose(out["nll"].numpy(), want, rtol=1e-5)


def test_call_is_deterministic_per_seed(tiny_model):
    images = random_images(2, 5)
    a = tiny_model(images, seed(11, 3))
    b = tiny_model(images, seed(11, 3))
    c = tiny_model(images, seed(12, 3))
    d = tiny_model(images, seed(11, 4))
    for key in ("mean", "log_pxz", "kl_cost", "nll"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.allclose(a["kl_cost"].numpy(), c["kl_cost"].numpy())
    assert not np.allclose(a["kl_cost"].numpy(), d["kl_cost"].numpy())


def test_sample_shape_range_and_seeds(tiny_model):
    x = tiny_model.sample(3, seed(1)).numpy()
    assert x.shape == (3, 32, 32, 3)
    assert x.min() >= -0.5 + 1 / 512 - 1e-7 and x.max() <= 0.5 - 1 / 512 + 1e-7
    np.testing.assert_array_equal(x, tiny_model.sample(3, seed(1)).numpy())
    assert not np.allclose(x, tiny_model.sample(3, seed(2)).numpy())


def test_sample_temperature_zero_ignores_seed(tiny_model):
    a = tiny_model.sample(2, seed(1), temperature=0.0).numpy()
    b = tiny_model.sample(2, seed(2), temperature=0.0).numpy()
    np.testing.assert_array_equal(a, b)
    # Both images are the same deterministic decoding of the prior means.
    np.testing.assert_array_equal(a[0], a[1])


def test_initialize_on_real_data(cifar10_dir):
    images = data.load_cifar10("test", cifar10_dir)[:8]
    model = CVAE(tiny_hps()).build_for(1)
    v_before = model.x_enc.V.numpy().copy()
    assert np.all(model.x_enc.g.numpy() == 0)
    model.initialize(images, seed(0))
    np.testing.assert_array_equal(model.x_enc.V.numpy(), v_before)
    assert np.all(model.x_enc.g.numpy() != 0)
    assert np.any(model.x_dec.b.numpy() != 0)
    for name, conv in model.named_convs().items():
        assert np.all(np.isfinite(conv.g.numpy())) and np.any(conv.g.numpy() != 0), name
    out = model(images, seed(1))
    for key in ("mean", "log_pxz", "kl_cost", "nll"):
        assert np.all(np.isfinite(out[key].numpy())), key


def test_more_samples_tighten_the_bound(cifar10_dir):
    images = data.load_cifar10("test", cifar10_dir)[:16]
    model = CVAE(tiny_hps())
    model.initialize(images, seed(0))
    k = 8
    nll_k = model(images, seed(1), k=k)["nll"].numpy().astype(np.float64)
    # The same k draws per image, scored one at a time: the k-sample bound is below their mean per image.
    out = model(images, seed(1), k=k)
    one = (out["kl_cost"].numpy() - out["log_pxz"].numpy()).astype(np.float64).reshape(-1, k)
    assert np.all(nll_k <= one.mean(axis=1) + 1e-2)
    # And below the average of independent 1-sample bounds on the same images.
    one_sample = np.mean([model(images, seed(100 + s))["nll"].numpy().astype(np.float64) for s in range(4)], axis=0)
    assert nll_k.shape == one_sample.shape == (16,)
    assert nll_k.mean() <= one_sample.mean()


def test_gradients_reach_every_weight_but_the_top_up_conv3(tiny_model):
    # As in the original (whose reference checkpoint has no Adamax slots for it): the last block's
    # up_conv3 output is discarded at the top, every other variable gets a gradient.
    variables = named_variables(tiny_model)  # the original's names -> variables
    assert len(variables) == len(tiny_model.trainable_variables)
    with tf.GradientTape() as tape:
        objective = tiny_model(random_images(2, 8), seed(9))["objective"]
    grads = dict(zip(variables, tape.gradient(objective, list(variables.values()))))
    top = "IAF_1_1/up_conv3/"
    # h_top starts at zero, so the top block's down_conv1 sees elu(0) = 0 and its V and g get exactly
    # zero gradients until h_top moves (the same in the original).
    zero_input = {"IAF_1_1/down_conv1/V", "IAF_1_1/down_conv1/g"}
    for name, grad in grads.items():
        if name.startswith(top):
            assert grad is None, name
        elif name in zero_input:
            assert grad is not None and np.all(grad.numpy() == 0), name
        else:
            assert grad is not None and np.any(grad.numpy() != 0), name
    assert sum(name.startswith(top) for name in grads) == 3


def test_variable_paths_are_unique(tiny_model):
    paths = [v.path for v in tiny_model.trainable_variables]
    assert len(set(paths)) == len(paths)


# ---------------------------------------------------------------- posterior variants


POSTERIORS = ["down_diag", "down_iaf1_nl", "down_iaf2_nl", "up_diag", "up_iaf1_nl", "up_iaf2_nl"]


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_posteriors_build_and_run(posterior):
    model = CVAE(tiny_hps(f"posterior={posterior}"))
    images = random_images(2, 6)
    model.initialize(images, seed(0))
    out = model(images, seed(1), k=2)
    assert out["nll"].shape == (2,) and out["kl_cost"].shape == (4,)
    for key in ("mean", "log_pxz", "kl_cost", "kl_obj", "nll"):
        assert np.all(np.isfinite(out[key].numpy())), key
    again = model(images, seed(1), k=2)
    np.testing.assert_array_equal(out["nll"].numpy(), again["nll"].numpy())
    assert not np.allclose(out["kl_cost"].numpy(), model(images, seed(2), k=2)["kl_cost"].numpy())
    samples = model.sample(2, seed(3)).numpy()
    assert samples.shape == (2, 32, 32, 3) and np.all(np.isfinite(samples))


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_posterior_channel_layouts(posterior):
    h, z = 16, 4
    model = CVAE(tiny_hps(f"posterior={posterior}")).build_for(1)
    where, flow = posterior.split("_", 1)
    context = h if flow != "diag" else 0
    convs = model.named_convs()
    for block in ("IAF_0_0", "IAF_1_0"):
        assert convs[f"{block}/up_conv1"].V.shape[-1] == 2 * z + context + h
        # up_* feeds its z upward beside the deterministic features.
        assert convs[f"{block}/up_conv3"].V.shape[2] == (z + h if where == "up" else h)
        # down_* adds the top-down posterior parameters (and context) to the prior's.
        assert convs[f"{block}/down_conv1"].V.shape[-1] == 2 * z + (2 * z + context if where == "down" else 0) + h
        heads = sorted(n for n in convs if n.startswith(f"{block}/ar_multiconv2d/layer_out_"))
        assert len(heads) == {"diag": 0, "iaf1_nl": 1, "iaf2_nl": 2}[flow]
        assert all(convs[n].V.shape[-1] == z for n in heads)


def test_default_posterior_matches_tf1_layout():
    # The original's CVAE1: up_conv1 -> [qz_mean, qz_logsd, up_context, h], down_conv1 -> 4 z + 2 h.
    convs = CVAE(tiny_hps()).build_for(1).named_convs()
    assert convs["IAF_0_1/up_conv1"].V.shape == (3, 3, 16, 2 * 4 + 2 * 16)
    assert convs["IAF_0_1/down_conv1"].V.shape == (3, 3, 16, 4 * 4 + 2 * 16)
    assert convs["IAF_1_0/down_deconv2"].V.shape == (3, 3, 16, 4 + 16)
    assert convs["IAF_0_1/down_conv2"].V.shape == (3, 3, 4 + 16, 16)
    assert sorted(n.split("/")[-1] for n in convs if n.startswith("IAF_0_0/ar_multiconv2d/")) == [
        "layer_0", "layer_1", "layer_out_0", "layer_out_1"]


def test_diag_posterior_has_fewer_parameters():
    diag = count_trainable_parameters(CVAE(tiny_hps("posterior=down_diag")).build_for(1))
    iaf = count_trainable_parameters(CVAE(tiny_hps()).build_for(1))
    assert diag < iaf
