"""The original's Adamax, as a Keras optimizer.

It differs from Keras' Adamax (and the paper's): no bias correction, and eps is added to the decayed
running max *before* taking the max with |grad|, not to the denominator:
    v <- b1 * v + (1 - b1) * g;  m <- max(b2 * m + eps, |g|);  w <- w - lr * v / m
"""

import keras
import tensorflow as tf

from iaf_tf.variables import tf_variable


class OriginalAdamax(keras.optimizers.Optimizer):

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

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if tf.distribute.has_strategy() or any(_is_distributed(v) for v in trainable_variables):
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        # Without a strategy: one call of a small function (traced once per shape) per variable. Keras' generic
        # path writes about 26 graph ops per variable, which for the README recipe's 488 variables is a
        # third of the training step's graph: tracing time, and memory to hold the graph.
        lr = tf.cast(learning_rate, tf.float32)
        for gradient, variable in zip(grads, trainable_variables):
            first_moment, running_max = self.slots_for(variable)
            _adamax_update(gradient, tf_variable(variable), tf_variable(first_moment), tf_variable(running_max),
                           lr, self.beta_1, self.beta_2, self.epsilon)

    def update_step(self, gradient, variable, learning_rate):
        first_moment, running_max = self.slots_for(variable)
        _adamax_update_fn(gradient, tf_variable(variable), tf_variable(first_moment), tf_variable(running_max),
                          learning_rate, self.beta_1, self.beta_2, self.epsilon)

    def slots_for(self, variable):
        """(first moment, running max) of one trainable variable."""
        index = self._get_variable_index(variable)
        return self.first_moments[index], self.running_maxes[index]

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config


def _is_distributed(variable):
    return isinstance(tf_variable(variable), tf.distribute.DistributedValues)


def _adamax_update_fn(gradient, variable, first_moment, running_max, lr, beta_1, beta_2, epsilon):
    """OriginalAdamax's update of one variable and its slots (plain tf.Variables, or under a strategy the
    variables `extended.update` hands over)."""
    gradient = tf.cast(gradient, variable.dtype)
    lr = tf.cast(lr, variable.dtype)
    first_moment.assign(beta_1 * first_moment + (1.0 - beta_1) * gradient)
    running_max.assign(tf.maximum(beta_2 * running_max + epsilon, tf.abs(gradient)))
    variable.assign_sub(lr * first_moment / running_max)


# _noinline keeps one body per traced shape in the runtime graph too (grappler would otherwise paste a
# copy into every call site); reduce_retracing traces few shapes.
_adamax_update = tf.function(_adamax_update_fn, reduce_retracing=True, experimental_attributes={"_noinline": True})
