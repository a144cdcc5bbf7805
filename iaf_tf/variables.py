"""Two things every module that handles Keras 3 variables under tf.distribute needs."""

import keras


def tf_variable(variable):
    """The tf.Variable (a MirroredVariable under a strategy) behind a Keras 3 variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class Untracked:
    """Holds a value out of sight of Keras' and tf.train.Checkpoint's attribute tracking."""

    def __init__(self, value):
        self.value = value
