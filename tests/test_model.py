"""iaf_tf.model: the helpers against NumPy / TF1 ops, the original's parameter counts, the call contract,
multi-level models (depths), the Theano system's posterior variants and IAF depths (structure and the
autoregressive Jacobian of the IAF step), the Bernoulli likelihood of dataset=mnist, and Keras serialization."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data, train
from iaf_tf import programs as programs_module
from iaf_tf import noise as noise_streams
from iaf_tf import distributions as dist
from iaf_tf.checkpoints import named_variables
from iaf_tf.config import Config, load_preset
from iaf_tf.block import IAF_SCALE, IAFBlock, resize_nearest
from iaf_tf.layers import WNConv2D
from iaf_tf.model import count_trainable_parameters, input_to_unit_range, to_uint8_images
from tests.fixtures import (IAF_POSTERIORS, ONE_BLOCK_PER_LEVEL, POSTERIORS, ROOT, TWO_BLOCKS_PER_LEVEL, grey_images,
                            built_model, make_model, random_images, raster_allowed, run_model, seed, tiny_config)


def initialized_model(cfg, images=None):
    model = make_model(cfg)
    model.initialize(random_images(8, 1) if images is None else images, tf.constant([0, 1]))
    return model


def z_resolutions(model, channels=3):
    """The spatial size of each block's z, bottom-up, from an actual bottom-up pass."""
    images = tf.zeros([1, 32, 32, channels], tf.uint8)
    h = model.x_enc(input_to_unit_range(images))
    sizes = []
    for block in model.blocks:
        noise = tf.zeros(model._z_shape(1, len(sizes))) if block.bottom_up else None
        h, stats = block.up(h, noise)
        assert stats[0].shape[1] == stats[0].shape[2]
        sizes.append(int(stats[0].shape[1]))
    return sizes


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


# ---------------------------------------------------------------- parameter counts of the original


def test_parameter_count_tf1_small():
    model = built_model(load_preset("tf1_small"))
    assert count_trainable_parameters(model) == 357_671


def test_parameter_count_readme_recipe():
    model = built_model(load_preset("readme_recipe"))
    assert count_trainable_parameters(model) == 41_557_927


@pytest.mark.parametrize("posterior", ["down_iaf2_nl", "up_iaf2_nl", "down_diag"])
def test_build_makes_every_variable_a_call_uses_in_the_order_a_call_uses_them(posterior, monkeypatch):
    """CVAE.build makes the variables from shapes alone; a first call would have made them in the order it
    uses them, which (with Keras' seeded initializers) decides each V's initial values under a seed."""
    built, used = [], []
    build, call = WNConv2D.build, WNConv2D.call
    # Keras wraps each layer's build when the layer is made: patch the class first.
    monkeypatch.setattr(WNConv2D, "build", lambda self, shape: (built.append(self), build(self, shape))[1])
    model = make_model(tiny_config(TWO_BLOCKS_PER_LEVEL, f"posterior={posterior}"))
    model.build()
    variables = [v.path for v in model.variables]
    monkeypatch.setattr(WNConv2D, "call", lambda self, *a, **kw: (used.append(self), call(self, *a, **kw))[1])
    run_model(model, random_images(2), seed(0))
    assert [v.path for v in model.variables] == variables  # the call made none
    names = {id(conv): name for name, conv in model.named_convs().items()}
    built, used = [names[id(c)] for c in built], [names[id(c)] for c in used]
    assert sorted(built) == sorted(names.values())
    assert built == used


# ---------------------------------------------------------------- call contract


@pytest.mark.parametrize("k", [1, 3])
def test_call_output_shapes(tiny_model, k):
    b = 2
    out = run_model(tiny_model, random_images(b, 2), seed(3), k=k)
    n = b * k
    assert out["mean"].shape == (n, 32, 32, 3)
    for key in ("log_pxz", "kl_obj", "kl"):
        assert out[key].shape == (n,), key
    assert out["nll"].shape == (b,)
    # One KL map per stochastic layer, bottom-up: two at 16x16, two at 8x8; and the posterior's Gaussian.
    assert [tuple(m.shape) for m in out["kl_layers"]] == [(n, 16, 16, 4)] * 2 + [(n, 8, 8, 4)] * 2
    assert [(tuple(m.shape), tuple(s.shape)) for m, s in out["posterior"]] == \
        [(tuple(m.shape), tuple(m.shape)) for m in out["kl_layers"]]
    for key in ("mean", "log_pxz", "kl_obj", "kl", "nll"):
        assert np.all(np.isfinite(out[key].numpy())), key


def test_call_outputs_are_consistent(tiny_model):
    out = run_model(tiny_model, random_images(3, 3), seed(4))
    kl = sum(tf.reduce_sum(m, axis=[1, 2, 3]).numpy().astype(np.float64) for m in out["kl_layers"])
    np.testing.assert_allclose(out["kl"].numpy(), kl, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(out["nll"].numpy(), out["kl"].numpy() - out["log_pxz"].numpy(), rtol=1e-6)
    mean = out["mean"].numpy()
    assert mean.min() >= -0.5 + 1 / 512 - 1e-7 and mean.max() <= 0.5 - 1 / 512 + 1e-7


def test_call_k_repeats_images_consecutively(tiny_model):
    # With k samples per image, the repeated copies of image i are rows i*k .. i*k+k-1: their decoder
    # means differ only through the noise, and the group's nll is the logsumexp bound of its rows.
    images = random_images(2, 4)
    out = run_model(tiny_model, images, seed(5), k=3)
    log_w = (out["log_pxz"].numpy() - out["kl"].numpy()).astype(np.float64).reshape(2, 3)
    m = log_w.max(axis=1)
    want = -(m + np.log(np.exp(log_w - m[:, None]).sum(axis=1)) - np.log(3))
    np.testing.assert_allclose(out["nll"].numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("posterior", ["down_iaf2_nl", "up_iaf2_nl"])
def test_k_samples_are_a_pass_over_the_repeated_images_and_share_a_noiseless_bottom_up_pass(posterior, monkeypatch):
    # A down_* posterior draws no noise in the bottom-up pass, so it runs once per image, not per sample;
    # an up_* one draws z there, so it runs once per sample. Either way the numbers are those of k=1 on the
    # batch with each image repeated k times.
    model = make_model(tiny_config(TWO_BLOCKS_PER_LEVEL, f"posterior={posterior}"))
    images = random_images(2, 6)
    model.initialize(images, seed(0))
    up_batches = []
    up = IAFBlock.up
    monkeypatch.setattr(IAFBlock, "up", lambda block, x, *args, **kwargs: (
        up_batches.append(x.shape[0]), up(block, x, *args, **kwargs))[1])
    shared = model(tf.constant(images), seed(1), k=3)
    assert up_batches == [2 if posterior.startswith("down") else 6] * len(model.blocks)
    repeated = model(tf.constant(np.repeat(images, 3, axis=0)), seed(1))
    assert up_batches[len(model.blocks):] == [6] * len(model.blocks)
    for key in ("mean", "log_pxz", "kl"):
        np.testing.assert_allclose(shared[key].numpy(), repeated[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=key)


def test_call_is_deterministic_per_seed(tiny_model):
    images = random_images(2, 5)
    a = run_model(tiny_model, images, seed(11, 3))
    b = run_model(tiny_model, images, seed(11, 3))
    c = run_model(tiny_model, images, seed(12, 3))
    d = run_model(tiny_model, images, seed(11, 4))
    for key in ("mean", "log_pxz", "kl", "nll"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.allclose(a["kl"].numpy(), c["kl"].numpy())
    assert not np.allclose(a["kl"].numpy(), d["kl"].numpy())


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
    model = built_model(tiny_config(TWO_BLOCKS_PER_LEVEL))
    v_before = model.x_enc.V.numpy().copy()
    assert np.all(model.x_enc.g.numpy() == 0)
    model.initialize(images, seed(0))
    np.testing.assert_array_equal(model.x_enc.V.numpy(), v_before)
    assert np.all(model.x_enc.g.numpy() != 0)
    assert np.any(model.x_dec.b.numpy() != 0)
    for name, conv in model.named_convs().items():
        assert np.all(np.isfinite(conv.g.numpy())) and np.any(conv.g.numpy() != 0), name
    out = run_model(model, images, seed(1))
    for key in ("mean", "log_pxz", "kl", "nll"):
        assert np.all(np.isfinite(out[key].numpy())), key


def test_more_samples_tighten_the_bound(cifar10_dir):
    images = data.load_cifar10("test", cifar10_dir)[:16]
    model = make_model(tiny_config(TWO_BLOCKS_PER_LEVEL))
    model.initialize(images, seed(0))
    k = 8
    nll_k = run_model(model, images, seed(1), k=k)["nll"].numpy().astype(np.float64)
    # The same k draws per image, scored one at a time: the k-sample bound is below their mean per image.
    out = model(images, seed(1), k=k)
    one = (out["kl"].numpy() - out["log_pxz"].numpy()).astype(np.float64).reshape(-1, k)
    assert np.all(nll_k <= one.mean(axis=1) + 1e-2)
    # And below the average of independent 1-sample bounds on the same images.
    one_sample = np.mean([run_model(model, images, seed(100 + s))["nll"].numpy().astype(np.float64)
                          for s in range(4)], axis=0)
    assert nll_k.shape == one_sample.shape == (16,)
    assert nll_k.mean() <= one_sample.mean()


def test_gradients_reach_every_weight_but_the_top_up_conv3(tiny_model):
    # As in the original (whose reference checkpoint has no Adamax slots for it): the last block's
    # up_conv3 output is discarded at the top, every other variable gets a gradient.
    variables = named_variables(tiny_model)  # the original's names -> variables
    assert len(variables) == len(tiny_model.trainable_variables)
    with tf.GradientTape() as tape:
        objective, _ = train.loss_fn(tiny_model, random_images(2, 8), seed(9), Config().objective)
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


def test_a_traced_model_traces_each_kind_of_block_once_and_gives_the_inline_numbers(monkeypatch):
    # Traced, the blocks of a kind share one program (model.CVAE._run_block); its objective, its gradients
    # and which variables get one are those of the blocks traced one by one (inline, as inside XLA).
    tiny_model = initialized_model(tiny_config(TWO_BLOCKS_PER_LEVEL))  # its own: the tracing counts are asserted
    images, variables = random_images(2, 8), tiny_model.trainable_variables

    def objective_and_grads():
        with tf.GradientTape() as tape:
            objective, _ = train.loss_fn(tiny_model, images, seed(9), Config().objective)
        return objective, tape.gradient(objective, variables)

    traced_objective, traced_grads = tf.function(objective_and_grads, autograph=False)()
    programs = dict(tiny_model._block_programs.value)
    monkeypatch.setattr(programs_module, "inside_xla", lambda: True)
    inline_objective, inline_grads = tf.function(objective_and_grads, autograph=False)()
    np.testing.assert_allclose(traced_objective.numpy(), inline_objective.numpy(), rtol=1e-5)
    assert [g is None for g in traced_grads] == [g is None for g in inline_grads]
    assert sum(g is None for g in inline_grads) == 3  # the top block's up_conv3
    # Per variable, relative to its gradient's norm (measured: 7e-5; against eager ops, whose sums run in
    # another order than the graph's fused ones, about 1e-3).
    for traced, inline, variable in zip(traced_grads, inline_grads, variables):
        if inline is not None:
            assert np.linalg.norm(traced - inline) <= 1e-3 * np.linalg.norm(inline), variable.path
    # Two levels of two blocks. The top block's up pass runs as itself, and so do the passes of the one
    # downsampling block (a kind of its own, up and down); the two other up passes share a program traced
    # once (at 16x16), the three other down passes one traced at 8x8 (the top block) and at 16x16 (twice).
    assert sorted((method, downsample) for method, downsample, *_ in programs) == [("down", False), ("up", False)]
    assert sum(program.experimental_get_tracing_count() for program in programs.values()) == 3


def test_variable_paths_are_unique(tiny_model):
    paths = [v.path for v in tiny_model.trainable_variables]
    assert len(set(paths)) == len(paths)


# ---------------------------------------------------------------- levels (depths) and presets


def test_blocks_follow_depths_over_depth_and_num_blocks():
    model = make_model(Config().parse("depth=5,num_blocks=7,depths=3-1").replace(h_size=8, z_size=4))
    assert model.block_index == [(0, 0), (0, 1), (0, 2), (1, 0)]


@pytest.mark.parametrize("depths, sizes", [("3-1", [16] * 3 + [8]), ("1-2-3", [16, 8, 8, 4, 4, 4]),
                                           ("2", [16, 16])])
def test_unequal_levels_build_run_and_sample(depths, sizes):
    cfg = tiny_config(ONE_BLOCK_PER_LEVEL, f"depths={depths}")
    images = random_images(4, 0)
    model = initialized_model(cfg, images)
    assert z_resolutions(model) == sizes
    # The first block of every level above the first halves the resolution (and its decoder doubles it).
    assert [b.downsample for b in model.blocks] == [i > 0 and j == 0 for i, j in model.block_index]
    assert model.top_size == 32 // 2 ** len(cfg.model.level_depths)
    out = run_model(model, images, tf.constant([0, 2]), k=2)
    loss, _ = train.loss_fn(model, images, tf.constant([0, 2]), cfg.replace(k=2).objective)
    assert len(out["kl_layers"]) == len(sizes)
    for key in ("log_pxz", "kl", "nll"):
        assert np.all(np.isfinite(out[key].numpy())), key
    assert np.isfinite(loss.numpy())
    assert model.sample(2, tf.constant([1, 1])).shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_table3_preset_has_twenty_layers_at_16_and_8():
    model = built_model(load_preset("table3"))
    assert len(model.blocks) == 20
    assert z_resolutions(model) == [16] * 10 + [8] * 10
    # Arranging the 20 blocks in two levels changes strides, not weight shapes: the same count as the
    # TF1 README recipe (one level of 20).
    assert count_trainable_parameters(model) == 41_557_927


def test_theano_example_preset_has_three_levels():
    model = built_model(load_preset("theano_example"))
    assert z_resolutions(model) == [16, 16, 8, 8, 4, 4]


# ---------------------------------------------------------------- posterior variants: structure


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_posteriors_build_and_run(posterior):
    model = make_model(tiny_config(TWO_BLOCKS_PER_LEVEL, f"posterior={posterior}"))
    images = random_images(2, 6)
    model.initialize(images, seed(0))
    out = run_model(model, images, seed(1), k=2)
    assert out["nll"].shape == (2,) and out["kl"].shape == (4,)
    for key in ("mean", "log_pxz", "kl", "kl_obj", "nll"):
        assert np.all(np.isfinite(out[key].numpy())), key
    again = run_model(model, images, seed(1), k=2)
    np.testing.assert_array_equal(out["nll"].numpy(), again["nll"].numpy())
    assert not np.allclose(out["kl"].numpy(), model(images, seed(2), k=2)["kl"].numpy())
    samples = model.sample(2, seed(3)).numpy()
    assert samples.shape == (2, 32, 32, 3) and np.all(np.isfinite(samples))


@pytest.mark.parametrize("posterior", POSTERIORS)
@pytest.mark.parametrize("depth_ar", [0, 1, 2])
def test_layer_shapes_of_each_posterior(posterior, depth_ar):
    h, z = 8, 4
    model = built_model(tiny_config(ONE_BLOCK_PER_LEVEL, f"posterior={posterior},depth_ar={depth_ar}"))
    where, flow = posterior.split("_", 1)
    has_context = flow != "diag" and depth_ar > 0
    assert [b.name for b in model.blocks] == ["IAF_0_0", "IAF_1_0"]
    for block in model.blocks:
        convs = block.named_convs()
        assert convs["up_conv1"].filters == convs["up_conv1"].V.shape[-1] == 2 * z + (h if has_context else 0) + h
        # up_* feeds z upward beside the deterministic features.
        assert convs["up_conv3"].V.shape[2] == (z + h if where == "up" else h)
        # down_* adds top-down posterior parameters (and a top-down context) to the prior's.
        assert convs["down_conv1"].filters == convs["down_conv1"].V.shape[-1] == \
            2 * z + h + (0 if where == "up" else 2 * z + (h if has_context else 0))
        ar = sorted(n for n in convs if n.startswith("ar_multiconv2d/"))
        if flow == "diag":
            assert ar == []
            continue
        heads = 2 if flow == "iaf2_nl" else 1
        assert ar == sorted([f"ar_multiconv2d/layer_{i}" for i in range(depth_ar)]
                            + [f"ar_multiconv2d/layer_out_{i}" for i in range(heads)])
        for i in range(depth_ar):
            assert convs[f"ar_multiconv2d/layer_{i}"].filters == h
        assert all(convs[f"ar_multiconv2d/layer_out_{i}"].V.shape[-1] == z for i in range(heads))
        assert block.ar.use_context == has_context


def test_default_posterior_matches_tf1_layout():
    # The original's CVAE1: up_conv1 -> [qz_mean, qz_logsd, up_context, h], down_conv1 -> 4 z + 2 h.
    convs = built_model(tiny_config(TWO_BLOCKS_PER_LEVEL)).named_convs()
    assert convs["IAF_0_1/up_conv1"].V.shape == (3, 3, 16, 2 * 4 + 2 * 16)
    assert convs["IAF_0_1/down_conv1"].V.shape == (3, 3, 16, 4 * 4 + 2 * 16)
    assert convs["IAF_1_0/down_deconv2"].V.shape == (3, 3, 16, 4 + 16)
    assert convs["IAF_0_1/down_conv2"].V.shape == (3, 3, 4 + 16, 16)
    assert sorted(n.split("/")[-1] for n in convs if n.startswith("IAF_0_0/ar_multiconv2d/")) == [
        "layer_0", "layer_1", "layer_out_0", "layer_out_1"]


def test_diag_posterior_has_fewer_parameters():
    diag = count_trainable_parameters(built_model(tiny_config(TWO_BLOCKS_PER_LEVEL, "posterior=down_diag")))
    iaf = count_trainable_parameters(built_model(tiny_config(TWO_BLOCKS_PER_LEVEL)))
    assert diag < iaf


def test_up_posterior_z_is_fed_upward_and_down_posterior_z_is_not():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=[2, 16, 16, 8]).astype(np.float32))
    noise = tf.constant(rng.normal(size=[2, 16, 16, 4]).astype(np.float32))
    for posterior, feeds_up in (("up_iaf2_nl", True), ("down_iaf2_nl", False)):
        block = initialized_model(tiny_config(extra=f"posterior={posterior}")).blocks[0]
        with tf.GradientTape() as tape:
            tape.watch(noise)
            out, _ = block.up(x, noise)
        grad = tape.gradient(out, noise)
        assert (grad is not None and np.abs(grad.numpy()).max() > 0) == feeds_up, posterior


# ---------------------------------------------------------------- the IAF step is autoregressive


def check_triangular(jac, height, width, channels):
    n = height * width * channels
    jac = jac.reshape(n, n)
    allowed = raster_allowed(height, width, channels)
    off_diagonal = ~np.eye(n, dtype=bool)
    assert np.all(jac[off_diagonal & ~allowed] == 0), "z depends on noise at or before it in the ordering"
    # The flow is not trivially diagonal: most allowed dependencies are present.
    assert np.count_nonzero(jac[allowed]) / allowed.sum() > 0.3
    return np.diag(jac)


@pytest.mark.parametrize("depth_ar", [0, 2])
@pytest.mark.parametrize("posterior", IAF_POSTERIORS)
def test_iaf_step_jacobian_is_triangular(posterior, depth_ar):
    # z before the flow -> z after it, at a fixed (random) context: triangular in the raster/channel
    # ordering, with the diagonal and the log-density change of the flow's definition.
    cfg = tiny_config(extra=f"posterior={posterior},depth_ar={depth_ar}")
    z_size = cfg.model.z_size
    block = initialized_model(cfg).blocks[0]
    rng = np.random.default_rng(4)
    height = width = 4
    z = tf.constant(rng.normal(size=[1, height, width, z_size]).astype(np.float32))
    log_q = tf.constant(rng.normal(size=[1, height, width, z_size]).astype(np.float32))
    context = tf.constant(rng.normal(size=[1, height, width, block.context_size]).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(z)
        z_out, log_q_out = block.iaf(z, log_q, context)
    diag = check_triangular(tape.jacobian(z_out, z).numpy(), height, width, z_size)
    assert np.all(diag > 0)
    if posterior.endswith("iaf1_nl"):
        np.testing.assert_allclose(diag, 1.0, rtol=1e-6)  # mean-only: volume-preserving
        np.testing.assert_array_equal(log_q_out.numpy(), log_q.numpy())
    else:
        # log q(z_out) = log q(z) - log|dz_out/dz| elementwise, and the scale is exp(-0.1 s).
        np.testing.assert_allclose((log_q_out - log_q).numpy().ravel(), -np.log(diag), rtol=1e-4, atol=1e-6)
        log_scale = IAF_SCALE * block.ar(z, context)[1].numpy().ravel()
        np.testing.assert_allclose(diag, np.exp(-log_scale), rtol=1e-5)
    assert not np.allclose(z_out.numpy(), z.numpy())


@pytest.mark.parametrize("posterior", ["up_iaf1_nl", "up_iaf2_nl"])
def test_up_posterior_noise_to_z_jacobian_is_triangular(posterior):
    # In the bottom-up pass the whole map noise -> Gaussian sample -> IAF is autoregressive too.
    cfg = tiny_config(extra=f"posterior={posterior}")
    block = initialized_model(cfg).blocks[0]
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=[1, 8, 8, cfg.model.h_size]).astype(np.float32))  # -> z of 8x8 (stride 1)
    noise = tf.constant(rng.normal(size=[1, 8, 8, cfg.model.z_size]).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(noise)
        _, (z, *_) = block.up(x, noise)
    diag = check_triangular(tape.jacobian(z, noise).numpy(), 8, 8, cfg.model.z_size)
    assert np.all(diag > 0)


@pytest.mark.parametrize("posterior", IAF_POSTERIORS)
def test_iaf_context_comes_from_both_passes_for_down_and_the_up_pass_for_up(posterior):
    # Seeded weights: with some random draws the untrained iaf2_nl step's exp(-0.1 s) overflowed to an
    # infinite KL and NaN gradients (about one run in three).
    keras.utils.set_random_seed(0)
    cfg = tiny_config(extra=f"posterior={posterior}")
    h_size, z_size = cfg.model.h_size, cfg.model.z_size
    block = initialized_model(cfg).blocks[0]
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=[2, 16, 16, h_size]).astype(np.float32))
    noise = tf.constant(rng.normal(size=[2, 16, 16, z_size]).astype(np.float32))
    _, stats = block.up(x, noise)
    if posterior.startswith("up_"):
        # z and log q are final after the bottom-up pass; the top-down pass gets nothing else to sample from
        # (besides them, only the posterior's Gaussian, which it reports).
        assert len(stats) == 4 and all(t.shape == noise.shape for t in stats)
        return
    qz_mean, qz_logsd, up_context = stats
    assert up_context.shape[-1] == h_size
    down_input = tf.constant(rng.normal(size=[2, 16, 16, h_size]).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([up_context, down_input])
        _, kl_map, _ = block.down(down_input, (qz_mean, qz_logsd, up_context), noise)
        kl_cost = tf.reduce_sum(kl_map, axis=[1, 2, 3])
    # The top-down context enters through down_conv1's output, the bottom-up one directly.
    assert np.abs(tape.gradient(kl_cost, up_context).numpy()).max() > 0
    assert np.abs(tape.gradient(kl_cost, down_input).numpy()).max() > 0
    del tape


# ---------------------------------------------------------------- dataset=mnist: the Bernoulli likelihood


def test_model_binarizes_with_the_step_seed_and_scores_the_28x28_digit():
    model = initialized_model(tiny_config(extra="dataset=mnist"), grey_images(8, 1))
    assert model.channels == 1 and model.num_dims == 784 and model.bernoulli
    images = grey_images(4, 3)
    step_seed = tf.constant([7, 11])
    out = run_model(model, images, step_seed)
    assert out["mean"].shape == (4, 32, 32, 1)
    assert out["mean"].numpy().min() >= -0.5 and out["mean"].numpy().max() <= 0.5
    # The same step seed binarizes the same way: feeding that binarization gives the same numbers.
    binary = dist.binarize(images, dist.fold_in(step_seed, noise_streams.BINARIZE))
    again = run_model(model, binary, step_seed)
    for key in ("log_pxz", "kl", "nll"):
        np.testing.assert_array_equal(out[key].numpy(), again[key].numpy())
    # At the data-dependent init the logits are ~0, so every scored pixel costs ~log 2: 784 of them,
    # the 2-pixel border that pads MNIST to 32x32 is not scored.
    np.testing.assert_allclose(-out["log_pxz"].numpy() / 784, math.log(2), atol=0.01)


def test_cifar10_model_has_the_discretized_logistic(tiny_model):
    assert tiny_model.channels == 3 and tiny_model.num_dims == 3072 and not tiny_model.bernoulli


# ---------------------------------------------------------------- Keras serialization


def test_cvae_round_trips_through_keras_saving(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(tiny_model) and loaded.config == tiny_model.config
    assert [b.name for b in loaded.blocks] == [b.name for b in tiny_model.blocks]
    images = random_images(2, 9)
    want, got = tiny_model(images, seed(1)), loaded(images, seed(1))
    for key in ("mean", "log_pxz", "kl"):
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)


def test_iaf_block_config_round_trips():
    block = make_model(tiny_config(extra="posterior=up_iaf1_nl")).blocks[1]
    again = type(block).from_config(block.get_config())
    assert (again.model_config, again.downsample, again.conv_dtype, again.flow, again.bottom_up) == \
        (block.model_config, True, tf.float32, "iaf1_nl", True)


# ---------------------------------------------------------------- graph optimization

# A training step traced and run in a fresh interpreter with TensorFlow's C++ log on, where Grappler reports
# an optimizer pass that failed (its rewrites of the whole graph are then dropped).
_TRACE_STEP = """
import numpy as np, tensorflow as tf
from iaf_tf import config, train
trainer = train.Trainer(config.resolve(hpconfig={hpconfig!r}))
images = np.random.default_rng(0).integers(0, 256, size=[4, 32, 32, 3]).astype(np.uint8)
trainer.initialize(images)
print(float(trainer.train_step(tf.constant(images))[0]["objective"]))
"""


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.e2e
def test_grappler_remapper_succeeds_on_the_training_step(precision):
    hpconfig = TWO_BLOCKS_PER_LEVEL + (",mixed_precision=True" if precision == "bfloat16" else "")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _TRACE_STEP.format(hpconfig=hpconfig)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = [line for line in done.stderr.splitlines() if "remapper failed" in line]
    assert not failures, "\n".join(failures)
