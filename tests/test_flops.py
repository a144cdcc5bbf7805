"""The analytic FLOP counts of iaf_tf.flops on small layers counted by hand."""

import pytest
import tensorflow as tf

from iaf_tf.flops import conv_forward_flops, forward_flops_per_image, training_flops_per_image
from iaf_tf.layers import WNConv2D, ar_conv


def built(layer, height, width, channels):
    layer(tf.zeros([2, height, width, channels]))
    return layer


def test_plain_conv():
    # 3x3, 4 -> 8 channels, 'SAME' on 6x5: 30 output positions of 9 * 4 * 8 multiply-adds.
    assert conv_forward_flops(built(WNConv2D(8, (3, 3)), 6, 5, 4)) == 2 * 9 * 4 * 8 * 30


def test_strided_conv_counts_output_positions():
    # 5x5 stride 2 on 7x8: ceil(7/2) * ceil(8/2) = 4 * 4 outputs.
    layer = built(WNConv2D(6, (5, 5), (2, 2)), 7, 8, 3)
    assert conv_forward_flops(layer) == 2 * 25 * 3 * 6 * 16


def test_transposed_conv_counts_input_positions():
    # 3x3 stride 2, 5 -> 3 channels, 4x3 input (8x6 output): each input position scatters 9 * 5 * 3.
    layer = built(WNConv2D(3, (3, 3), (2, 2), transpose=True), 4, 3, 5)
    assert conv_forward_flops(layer) == 2 * 9 * 5 * 3 * 12


def test_masked_conv_is_counted_dense():
    layer = built(ar_conv(8, zerodiagonal=True, name="ar"), 5, 5, 4)
    assert conv_forward_flops(layer) == 2 * 9 * 4 * 8 * 25


def test_unbuilt_layer_is_rejected():
    with pytest.raises(ValueError):
        conv_forward_flops(WNConv2D(8))


class _TinyModel:
    """Stands in for CVAE: the counters only use named_convs()."""

    def __init__(self):
        self.convs = {
            "x_enc": built(WNConv2D(4, (5, 5), (2, 2)), 8, 8, 3),  # 4x4 outputs
            "block/up_conv1": built(WNConv2D(6, (3, 3)), 4, 4, 4),
            "block/ar/layer_0": built(ar_conv(6, zerodiagonal=False, name="layer_0"), 4, 4, 6),
            "x_dec": built(WNConv2D(3, (5, 5), (2, 2), transpose=True), 4, 4, 6),  # 4x4 inputs
        }

    def named_convs(self):
        return self.convs


def test_model_counts_are_sums_over_named_convs():
    model = _TinyModel()
    forward = 2 * (25 * 3 * 4 * 16 + 9 * 4 * 6 * 16 + 9 * 6 * 6 * 16 + 25 * 6 * 3 * 16)
    assert forward_flops_per_image(model) == forward
    assert training_flops_per_image(model) == 3 * forward
