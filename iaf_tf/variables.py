"""What every module that handles Keras 3 variables under tf.distribute needs."""

import keras
import tensorflow as tf


def tf_variable(variable):
    """The tf.Variable (a MirroredVariable under a strategy) behind a Keras 3 variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def local_copies(variable):
    """The per-device components of a mirrored variable (or value) on this worker, else [variable]."""
    if isinstance(variable, tf.distribute.DistributedValues):
        return list(variable.values)
    return [variable]


class Untracked:
    """Holds a value out of sight of Keras' and tf.train.Checkpoint's attribute tracking."""

    def __init__(self, value):
        self.value = value
