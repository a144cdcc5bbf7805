"""iaf_tf.ema: the original's moving averages of the weights (mirrored: test_train's two-replica test)."""

import keras
import numpy as np
import pytest

from iaf_tf.ema import WeightAverages, move_towards
from iaf_tf.variables import tf_variable


def test_update_rule_reset_and_copy_to_weights():
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    averages = WeightAverages([var], decay=0.9)
    var.assign([3.0, 2.0])
    averages.reset()  # averages start at the (initialized) weights
    np.testing.assert_allclose(averages.shadows[0].numpy(), [3.0, 2.0])
    expected = np.array([3.0, 2.0])
    for value in ([5.0, 0.0], [1.0, 1.0]):
        var.assign(value)
        move_towards(averages.shadows, [tf_variable(var)], 1.0 - averages.decay)
        expected = expected - 0.1 * (expected - np.array(value))
    np.testing.assert_allclose(averages.shadows[0].numpy(), expected, rtol=1e-6)
    assert averages.shadow_for(var) is averages.shadows[0]
    np.testing.assert_allclose(var.numpy(), [1.0, 1.0])
    averages.copy_to_weights()  # what evaluation does (checkpoints.restore(..., weights="ema"))
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(averages.shadows[0].numpy(), expected, rtol=1e-6)


def test_shadow_for_an_unknown_variable_raises():
    averages = WeightAverages([keras.Variable(np.zeros(2, np.float32))])
    with pytest.raises(KeyError, match="no moving average"):
        averages.shadow_for(keras.Variable(np.zeros(2, np.float32)))


def test_swapped_in_puts_the_averages_in_the_weights_for_the_duration():
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    averages = WeightAverages([var], decay=0.5)
    var.assign([3.0, 4.0])
    with averages.swapped_in():
        np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(var.numpy(), [3.0, 4.0])
    with pytest.raises(RuntimeError):
        with averages.swapped_in():
            raise RuntimeError("the weights come back even so")
    np.testing.assert_array_equal(var.numpy(), [3.0, 4.0])
