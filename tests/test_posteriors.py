"""The Theano system's posterior variants (hps.posterior) and IAF depths (hps.depth_ar): structure, the
autoregressive Jacobian of the IAF step, and short training runs of every variant."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data, hparams, train
from iaf_tf.model import CVAE, IAF_SCALE

TINY = "depth=2,num_blocks=1,h_size=8,z_size=4,batch_size=8,num_gpus=1,learning_rate=0.002"
IAF_POSTERIORS = ["up_iaf1_nl", "up_iaf2_nl", "down_iaf1_nl", "down_iaf2_nl"]


def tiny_hps(extra=""):
    return hparams.get_default_hparams().parse(TINY + ("," + extra if extra else ""))


def random_images(n, rng_seed=0):
    return np.random.default_rng(rng_seed).integers(0, 256, size=[n, 32, 32, 3]).astype(np.uint8)


def initialized_model(hps):
    model = CVAE(hps)
    model.initialize(random_images(8, 1), tf.constant([0, 1]))
    return model


def raster_allowed(height, width, channels):
    """allowed[(p, c), (q, d)]: output (p, c) of an IAF step may depend on input (q, d), p and q raster
    indices: on later positions, and on earlier channels at its own position (the ARMultiConv ordering,
    see layers.conv_ar_mask). The diagonal is checked separately."""
    p = np.repeat(np.arange(height * width), channels)
    c = np.tile(np.arange(channels), height * width)
    return (p[None, :] > p[:, None]) | ((p[None, :] == p[:, None]) & (c[None, :] < c[:, None]))


def check_triangular(jac, height, width, channels):
    n = height * width * channels
    jac = jac.reshape(n, n)
    allowed = raster_allowed(height, width, channels)
    off_diagonal = ~np.eye(n, dtype=bool)
    assert np.all(jac[off_diagonal & ~allowed] == 0), "z depends on noise at or before it in the ordering"
    # The flow is not trivially diagonal: most allowed dependencies are present.
    assert np.count_nonzero(jac[allowed]) / allowed.sum() > 0.3
    return np.diag(jac)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("posterior", hparams.POSTERIORS)
@pytest.mark.parametrize("depth_ar", [0, 1, 2])
def test_layer_shapes_of_each_posterior(posterior, depth_ar):
    h, z = 8, 4
    model = CVAE(tiny_hps(f"posterior={posterior},depth_ar={depth_ar}")).build_for(1)
    where, flow = posterior.split("_", 1)
    has_context = flow != "diag" and depth_ar > 0
    for block in model.blocks:
        convs = block.named_convs()
        assert convs["up_conv1"].filters == 2 * z + (h if has_context else 0) + h
        # up_* feeds z upward beside the deterministic features.
        assert convs["up_conv3"].V.shape[2] == (z + h if where == "up" else h)
        # down_* adds top-down posterior parameters (and a top-down context) to the prior's.
        assert convs["down_conv1"].filters == 2 * z + h + (0 if where == "up" else 2 * z + (h if has_context else 0))
        ar = sorted(n for n in convs if n.startswith("ar_multiconv2d/"))
        if flow == "diag":
            assert ar == []
            continue
        heads = 2 if flow == "iaf2_nl" else 1
        assert ar == sorted([f"ar_multiconv2d/layer_{i}" for i in range(depth_ar)]
                            + [f"ar_multiconv2d/layer_out_{i}" for i in range(heads)])
        for i in range(depth_ar):
            assert convs[f"ar_multiconv2d/layer_{i}"].filters == h
        assert block.ar.use_context == has_context


def test_default_posterior_is_the_tf1_model():
    hps = hparams.get_default_hparams()
    assert (hps.posterior, hps.depth_ar, hps.prior) == ("down_iaf2_nl", 2, "diag")


def test_up_posterior_z_is_fed_upward_and_down_posterior_z_is_not():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=[2, 16, 16, 8]).astype(np.float32))
    noise = tf.constant(rng.normal(size=[2, 16, 16, 4]).astype(np.float32))
    for posterior, feeds_up in (("up_iaf2_nl", True), ("down_iaf2_nl", False)):
        block = initialized_model(tiny_hps(f"posterior={posterior}")).blocks[0]
        with tf.GradientTape() as tape:
            tape.watch(noise)
            out, _ = block.up(x, noise)
        grad = tape.gradient(out, noise)
        assert (grad is not None and np.abs(grad.numpy()).max() > 0) == feeds_up, posterior


# ---------------------------------------------------------------- the IAF step is autoregressive


@pytest.mark.parametrize("depth_ar", [0, 2])
@pytest.mark.parametrize("posterior", IAF_POSTERIORS)
def test_iaf_step_jacobian_is_triangular(posterior, depth_ar):
    # z before the flow -> z after it, at a fixed (random) context: triangular in the raster/channel
    # ordering, with the diagonal and the log-density change of the flow's definition.
    hps = tiny_hps(f"posterior={posterior},depth_ar={depth_ar}")
    block = initialized_model(hps).blocks[0]
    rng = np.random.default_rng(4)
    height = width = 4
    z = tf.constant(rng.normal(size=[1, height, width, hps.z_size]).astype(np.float32))
    log_q = tf.constant(rng.normal(size=[1, height, width, hps.z_size]).astype(np.float32))
    context = tf.constant(rng.normal(size=[1, height, width, block.context_size]).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(z)
        z_out, log_q_out = block.iaf(z, log_q, context)
    diag = check_triangular(tape.jacobian(z_out, z).numpy(), height, width, hps.z_size)
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
    hps = tiny_hps(f"posterior={posterior}")
    block = initialized_model(hps).blocks[0]
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=[1, 8, 8, hps.h_size]).astype(np.float32))  # -> z of 8x8 (stride 1)
    noise = tf.constant(rng.normal(size=[1, 8, 8, hps.z_size]).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(noise)
        _, (z, _) = block.up(x, noise)
    diag = check_triangular(tape.jacobian(z, noise).numpy(), 8, 8, hps.z_size)
    assert np.all(diag > 0)


@pytest.mark.parametrize("posterior", IAF_POSTERIORS)
def test_iaf_context_comes_from_both_passes_for_down_and_the_up_pass_for_up(posterior):
    hps = tiny_hps(f"posterior={posterior}")
    block = initialized_model(hps).blocks[0]
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=[2, 16, 16, hps.h_size]).astype(np.float32))
    noise = tf.constant(rng.normal(size=[2, 16, 16, hps.z_size]).astype(np.float32))
    _, stats = block.up(x, noise)
    if posterior.startswith("up_"):
        # z and log q are final after the bottom-up pass; the top-down pass gets nothing else.
        assert len(stats) == 2 and stats[0].shape == noise.shape
        return
    qz_mean, qz_logsd, up_context = stats
    assert up_context.shape[-1] == hps.h_size
    down_input = tf.constant(rng.normal(size=[2, 16, 16, hps.h_size]).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([up_context, down_input])
        _, _, kl_cost = block.down(down_input, (qz_mean, qz_logsd, up_context), noise)
    # The top-down context enters through down_conv1's output, the bottom-up one directly.
    assert np.abs(tape.gradient(kl_cost, up_context).numpy()).max() > 0
    assert np.abs(tape.gradient(kl_cost, down_input).numpy()).max() > 0
    del tape


# ---------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("posterior", hparams.POSTERIORS)
def test_each_posterior_trains(posterior, cifar10_dir):
    hps = tiny_hps(f"posterior={posterior}")
    images = data.load_cifar10("train", cifar10_dir)
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    batches = iter(data.train_dataset(images, hps.batch_size, seed=0))
    trainer.initialize(next(batches).numpy())
    bpd, objective = [], []
    for _ in range(200):
        metrics, applied = trainer.train_step(next(batches))
        assert bool(applied), "a step had a non-finite loss or gradient"
        values = {k: float(v) for k, v in metrics.items()}
        assert all(np.isfinite(v) for v in values.values()), values
        bpd.append(values["bits_per_dim"])
        objective.append(values["objective"])
    assert np.mean(bpd[-20:]) < np.mean(bpd[:20]) - 0.2, (bpd[:20], bpd[-20:])
    assert np.mean(objective[-20:]) < np.mean(objective[:20])
    for v in trainer.variables:
        assert np.all(np.isfinite(v.numpy())), v.path
