"""The original's Adamax, as a Keras optimizer.

It differs from Keras' Adamax (and the paper's): no bias correction, and eps is added to the decayed
running max *before* taking the max with |grad|, not to the denominator:
    v <- b1 * v + (1 - b1) * g;  m <- max(b2 * m + eps, |g|);  w <- w - lr * v / m
"""

import keras
import tensorflow as tf


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

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        first_moment, running_max = self.first_moments[index], self.running_maxes[index]
        gradient = tf.cast(gradient, variable.dtype)
        lr = tf.cast(learning_rate, variable.dtype)
        self.assign(first_moment, self.beta_1 * first_moment + (1.0 - self.beta_1) * gradient)
        self.assign(running_max, tf.maximum(self.beta_2 * running_max + self.epsilon, tf.abs(gradient)))
        self.assign_sub(variable, lr * first_moment / running_max)

    def slots_for(self, variable):
        """(first moment, running max) of one trainable variable."""
        index = self._get_variable_index(variable)
        return self.first_moments[index], self.running_maxes[index]

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config
