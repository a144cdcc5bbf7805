"""The original's Adamax: the Keras optimizer that owns its slots, and the update over many variables.

It differs from Keras' Adamax (and the paper's): no bias correction, and eps is added to the decayed
running max *before* taking the max with |grad|, not to the denominator:
    v <- b1 * v + (1 - b1) * g;  m <- max(b2 * m + eps, |g|);  w <- w - lr * v / m
"""

import keras
import tensorflow as tf

from iaf_tf.variables import tf_variable


class OriginalAdamax(keras.optimizers.Optimizer):
    """Holds the slots (checkpointed under the optimizer) and works as any Keras optimizer. The trainer
    does not call `apply`: it updates every variable of a device at once with `adamax_update`."""

    def __init__(self, learning_rate=0.002, beta_1=0.9, beta_2=0.999, epsilon=1e-8, name="original_adamax",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Slot names say which of the original's two slots each is ("v" first moment, "m" running max).
        self.first_moments = [self.add_variable_from_reference(v, "first_moment") for v in var_list]
        self.running_maxes = [self.add_variable_from_reference(v, "running_max") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        first_moment, running_max = self.slots_for(variable)
        adamax_update([gradient], [tf_variable(variable)], [tf_variable(first_moment)], [tf_variable(running_max)],
                      learning_rate, self.beta_1, self.beta_2, self.epsilon)

    def slots_for(self, variable):
        """(first moment, running max) of one trainable variable."""
        index = self._get_variable_index(variable)
        return self.first_moments[index], self.running_maxes[index]

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config


def adamax_update(gradients, variables, first_moments, running_maxes, lr, beta_1, beta_2, epsilon, applied=True):
    """The update of many variables and their slots (plain tf.Variables on one device). Where `applied`
    (a bool scalar) is False, everything keeps its value: a select rather than a branch, which on a GPU
    would wait for its predicate before running either side."""
    lr = tf.cast(lr, tf.float32)
    for gradient, variable, first_moment, running_max in zip(gradients, variables, first_moments, running_maxes):
        gradient = tf.cast(gradient, variable.dtype)
        new_first = beta_1 * first_moment + (1.0 - beta_1) * gradient
        new_max = tf.maximum(beta_2 * running_max + epsilon, tf.abs(gradient))
        first_moment.assign(tf.where(applied, new_first, first_moment))
        running_max.assign(tf.where(applied, new_max, running_max))
        variable.assign(tf.where(applied, variable - lr * new_first / new_max, variable))
