"""iaf_tf.variables: the tf.Variable behind a Keras variable, and a holder that tracking does not follow."""

import keras
import numpy as np
import tensorflow as tf

from iaf_tf import distribute
from iaf_tf.variables import Untracked, tf_variable


def test_tf_variable_of_a_keras_variable_is_the_backing_tf_variable():
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    backing = tf_variable(var)
    assert isinstance(backing, tf.Variable) and not isinstance(backing, keras.Variable)
    backing.assign([3.0, 4.0])
    np.testing.assert_array_equal(var.numpy(), [3.0, 4.0])  # the same storage


def test_tf_variable_passes_other_values_through():
    plain = tf.Variable([1.0])
    assert tf_variable(plain) is plain
    tensor = tf.constant([1.0])
    assert tf_variable(tensor) is tensor


def test_tf_variable_under_a_strategy_is_the_mirrored_variable():
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        var = keras.Variable(np.zeros(2, np.float32))
    mirrored = tf_variable(var)
    assert isinstance(mirrored, tf.distribute.DistributedValues)
    assert len(strategy.experimental_local_results(mirrored)) == 2


def test_untracked_values_are_not_checkpointed_or_listed(tmp_path):
    class Holder(tf.Module):
        def __init__(self):
            super().__init__()
            self.own = tf.Variable([1.0], name="own")
            self.other = Untracked([tf.Variable([2.0], name="other")])

    holder = Holder()
    assert [v.name for v in holder.variables] == ["own:0"]
    assert holder.other.value[0].numpy() == 2.0
    prefix = tf.train.Checkpoint(holder=holder).write(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(prefix)]
    assert any(name.startswith("holder/own") for name in saved)
    assert not any("other" in name for name in saved)
    # Without the holder, tracking would follow the list and save the variable in it.
    tracked = tf.Module()
    tracked.other = [tf.Variable([2.0])]
    assert any("other" in name for name, _ in tf.train.list_variables(
        tf.train.Checkpoint(holder=tracked).write(str(tmp_path / "tracked"))))
