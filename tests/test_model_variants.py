"""Multi-level models (hps.depths) and the presets of the original README's Theano commands."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import hparams
from iaf_tf.model import CVAE, count_trainable_parameters, input_to_unit_range

TINY = "h_size=8,z_size=4,num_gpus=1,batch_size=4"


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


def test_depths_is_authoritative_over_depth_and_num_blocks():
    hps = hparams.get_default_hparams().parse("depth=5,num_blocks=7,depths=3-1")
    assert hps.level_depths == [3, 1]
    assert hparams.get_default_hparams().parse("depth=3,num_blocks=2").level_depths == [2, 2, 2]
    model = CVAE(hps.replace(h_size=8, z_size=4))
    assert model.block_index == [(0, 0), (0, 1), (0, 2), (1, 0)]


@pytest.mark.parametrize("depths, sizes", [("3-1", [16] * 3 + [8]), ("1-2-3", [16, 8, 8, 4, 4, 4]),
                                           ("2", [16, 16])])
def test_unequal_levels_build_run_and_sample(depths, sizes):
    hps = hparams.get_default_hparams().parse(f"{TINY},depths={depths}")
    model = CVAE(hps)
    images = np.random.default_rng(0).integers(0, 256, size=[4, 32, 32, 3]).astype(np.uint8)
    model.initialize(images, tf.constant([0, 1]))
    assert z_resolutions(model) == sizes
    # The first block of every level above the first halves the resolution (and its decoder doubles it).
    assert [b.downsample for b in model.blocks] == [i > 0 and j == 0 for i, j in model.block_index]
    assert model.top_size == 32 // 2 ** len(hps.level_depths)
    out = model(images, tf.constant([0, 2]), k=2)
    assert len(out["kl_cost_layers"]) == len(sizes)
    for key in ("log_pxz", "kl_cost", "nll", "objective"):
        assert np.all(np.isfinite(out[key].numpy())), key
    assert model.sample(2, tf.constant([1, 1])).shape == (2, 32, 32, 3)


def test_table3_preset_has_twenty_layers_at_16_and_8():
    hps = hparams.load_preset("table3")
    assert (hps.h_size, hps.z_size, hps.level_depths, hps.depth_ar, hps.posterior, hps.prior, hps.kl_min) == \
        (160, 32, [10, 10], 2, "down_iaf2_nl", "diag", 0.25)
    model = CVAE(hps).build_for(1)
    assert len(model.blocks) == 20
    assert z_resolutions(model) == [16] * 10 + [8] * 10
    # Arranging the 20 blocks in two levels changes strides, not weight shapes: the same count as the
    # TF1 README recipe (one level of 20).
    assert count_trainable_parameters(model) == 41_557_927


def test_theano_presets():
    example = hparams.load_preset("theano_example")
    assert (example.h_size, example.z_size, example.level_depths, example.depth_ar, example.posterior,
            example.kl_min) == (64, 32, [2, 2, 2], 1, "down_iaf2_nl", 0.25)
    model = CVAE(example).build_for(1)
    assert z_resolutions(model) == [16, 16, 8, 8, 4, 4]
    mnist = hparams.load_preset("theano_mnist")
    assert (mnist.dataset, mnist.h_size, mnist.z_size, mnist.level_depths, mnist.posterior) == \
        ("mnist", 64, 32, [2, 2], "down_diag")
    for name in ("table3", "theano_example", "theano_mnist"):
        hps = hparams.load_preset(name)
        assert (hps.learning_rate, hps.batch_size, hps.num_gpus) == (0.002, 16, 1), name
