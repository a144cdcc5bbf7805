import numpy as np
import tensorflow as tf
import keras

from iaf_tf.ema import WeightAverages


def test_update_rule_reset_and_swap():
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    averages = WeightAverages([var], decay=0.9)
    var.assign([3.0, 2.0])
    averages.reset()  # averages start at the (initialized) weights
    np.testing.assert_allclose(averages.shadows[0].numpy(), [3.0, 2.0])
    expected = np.array([3.0, 2.0])
    for value in ([5.0, 0.0], [1.0, 1.0]):
        var.assign(value)
        averages.update()
        expected = expected - 0.1 * (expected - np.array(value))
    np.testing.assert_allclose(averages.shadows[0].numpy(), expected, rtol=1e-6)
    with averages.averaged_weights():
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), [1.0, 1.0])


def test_update_under_mirrored_strategy_moves_every_copy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        var = keras.Variable(np.zeros(3, np.float32))
        averages = WeightAverages([var], decay=0.5)
    var.assign(np.ones(3, np.float32))

    @tf.function
    def update():
        averages.update()

    update()
    copies = averages.shadows[0].values
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_allclose(copy.numpy(), [0.5, 0.5, 0.5])
