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


def when_applied(applied, value, otherwise):
    """`value` if the step is applied, else `otherwise`: a scalar select (`value` itself when applied is True)."""
    return value if applied is True else tf.where(applied, tf.cast(value, tf.float32), otherwise)


def adamax_update(gradients, variables, first_moments, running_maxes, lr, beta_1, beta_2, epsilon, applied=True):
    """The update of many variables and their slots (plain tf.Variables on one device).

    Where `applied` (a bool scalar) is False everything keeps its value, by a select rather than a branch
    (on a GPU a branch waits for its predicate before running either side). The selects are of scalars
    and of the gradient: with it zeroed, a decay of 1, epsilon 0 and a learning rate of 0, each slot's new
    value is its old one and the step is 0. A select between a variable's new and old values would make
    XLA copy the variable first, to keep the old value while the new one is written in place (two copies
    of the state per step). Without XLA each element-wise op is a pass over the weights, so there are as
    few as the rule allows.
    """
    apply_adamax(gradients, variables, first_moments, running_maxes,
                 adamax_coefficients(lr, beta_1, beta_2, epsilon, applied), applied)


def adamax_coefficients(lr, beta_1, beta_2, epsilon, applied=True):
    """The update's scalars (lr, first moment's decay and mix, running max's decay and floor), where `applied`
    is False those that keep every value: selected once a step, not once per variable (each select is an op,
    a kernel launch on a GPU)."""
    return (when_applied(applied, tf.cast(lr, tf.float32), 0.0), when_applied(applied, beta_1, 1.0),
            when_applied(applied, 1.0 - beta_1, 0.0), when_applied(applied, beta_2, 1.0),
            when_applied(applied, epsilon, 0.0))


def apply_adamax(gradients, variables, first_moments, running_maxes, coefficients, applied=True):
    """adamax_update with its scalars from adamax_coefficients."""
    lr, keep_first, mix_first, keep_max, floor = coefficients
    for gradient, variable, first_moment, running_max in zip(gradients, variables, first_moments, running_maxes):
        gradient = tf.cast(gradient, variable.dtype)
        if applied is not True:
            gradient = tf.where(applied, gradient, 0.0)  # a skipped step's gradient may be NaN
        new_first = keep_first * first_moment + mix_first * gradient
        new_max = tf.maximum(keep_max * running_max + floor, tf.abs(gradient))
        first_moment.assign(new_first)
        running_max.assign(new_max)
        # The running max is at least epsilon once a step was applied; before that both slots are 0, and
        # a skipped step's 0 / 0 is no step.
        variable.assign_sub(tf.math.divide_no_nan(lr * new_first, new_max))
