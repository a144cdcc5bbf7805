"""Exponential moving average of the trainable weights; evaluation uses the averages, as the original.

`tf.train.ExponentialMovingAverage` rejects Keras 3 variables, hence this small module. The update is
the original's: shadow <- shadow - (1 - decay) * (shadow - weight), constant decay.
"""

import contextlib

import tensorflow as tf

from iaf_tf.variables import Untracked, tf_variable


class WeightAverages(tf.Module):

    def __init__(self, variables, decay=0.999, name="weight_averages"):
        super().__init__(name=name)
        self.decay = decay
        # Not tracked: the weights belong to the model in checkpoints; this only points at them.
        self._weights = Untracked(list(variables))
        # Created under the caller's strategy scope, so they are mirrored like the weights.
        self.shadows = [tf.Variable(tf.convert_to_tensor(v), trainable=False, name=_short_name(v))
                        for v in self._weights.value]

    def shadow_for(self, variable):
        for shadow, var in zip(self.shadows, self._weights.value):
            if var is variable:
                return shadow
        raise KeyError(f"no moving average for {getattr(variable, 'path', variable.name)}")

    def reset(self):
        """Start the averages at the current weights (after the data-dependent init)."""
        for shadow, var in zip(self.shadows, self._weights.value):
            shadow.assign(tf.convert_to_tensor(var))

    def update(self):
        """Call in cross-replica context (or without a strategy): each device's copy of a shadow moves
        towards the same device's copy of its weight, so no cross-device traffic."""
        rate = 1.0 - self.decay
        for shadow, var in zip(self.shadows, self._weights.value):
            if not isinstance(shadow, tf.distribute.DistributedValues):
                # One small function call per variable keeps the training step's graph small.
                _move_towards(shadow, tf_variable(var), rate)
                continue
            for shadow_copy, var_copy in zip(_copies(shadow), _copies(tf_variable(var))):
                with tf.device(shadow_copy.device):
                    _move_towards_fn(shadow_copy, var_copy, rate)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averages in the weights for the duration (pictures during training), then the weights back."""
        saved = [tf.identity(tf.convert_to_tensor(v)) for v in self._weights.value]
        self.copy_to_weights()
        try:
            yield
        finally:
            for value, var in zip(saved, self._weights.value):
                var.assign(value)

    def copy_to_weights(self):
        for shadow, var in zip(self.shadows, self._weights.value):
            var.assign(tf.convert_to_tensor(shadow))


def _move_towards_fn(shadow, variable, rate):
    shadow.assign_sub(rate * (shadow - tf.cast(variable, shadow.dtype)))


_move_towards = tf.function(_move_towards_fn, reduce_retracing=True, experimental_attributes={"_noinline": True})


def _copies(variable):
    """Per-device components of a mirrored variable, or the variable itself."""
    return list(variable.values) if isinstance(variable, tf.distribute.DistributedValues) else [variable]


def _short_name(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.replace(":", "_").replace("/", "_")
