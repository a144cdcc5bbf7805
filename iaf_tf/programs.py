"""Small XLA programs for arithmetic that would otherwise be a dozen kernel launches.

Without jit_compile the step runs op by op, and every small element-wise op or reduction is a kernel
launch of its own: on a GPU 5 to 20 us of host time each, more than the arithmetic. A weight-normed
kernel and its gradient, or a draw of Gaussian noise, are a dozen or more such ops. `compiled` makes each
of them one XLA program. Inside a jit-compiled step they are simply part of the step's program.
"""

import functools

import tensorflow as tf


def compiled(fn):
    """fn as one XLA program wherever it is called from a traced function; eagerly, op by op.

    Eager calls (building the model, its data-dependent init) keep the plain ops: there each new shape
    would be a new trace of the program, and TensorFlow warns on the console about frequent retracing.
    Python arguments (flags, constants) are part of the program's signature, as for any tf.function.
    """
    program = tf.function(fn, jit_compile=True, autograph=False)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return fn(*args, **kwargs) if tf.executing_eagerly() else program(*args, **kwargs)

    return run
