"""Exponential moving average of the trainable weights; evaluation uses the averages, as the original.

`tf.train.ExponentialMovingAverage` rejects Keras 3 variables, hence this small module. The update is
the original's: shadow <- shadow - (1 - decay) * (shadow - weight), constant decay.
"""

import contextlib

import tensorflow as tf

from iaf_tf.optim import when_applied
from iaf_tf.variables import Untracked


class WeightAverages(tf.Module):
    """The averages (`shadows`, mirrored like the weights); the trainer's update moves each device's copies
    with `move_towards`."""

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


def move_towards(shadows, weights, rate, applied=True):
    """The original's update of many averages (plain tf.Variables on one device); where `applied` (a bool
    scalar) is False they keep their values (see optim.adamax_update)."""
    rate = tf.cast(when_applied(applied, rate, 0.0), tf.float32)  # a scalar select: see optim.adamax_update
    for shadow, weight in zip(shadows, weights):
        # shadow -= rate * difference, without a pass that writes the product (see optim.adamax_update).
        tf.raw_ops.ResourceApplyGradientDescent(var=shadow.handle, alpha=rate,
                                                delta=shadow - tf.cast(weight, shadow.dtype))


def _short_name(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.replace(":", "_").replace("/", "_")
