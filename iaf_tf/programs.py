"""Small XLA programs for arithmetic that would otherwise be a dozen kernel launches.

Without jit_compile the step runs op by op, and every small element-wise op or reduction is a kernel
launch of its own: on a GPU 5 to 20 us of host time each, more than the arithmetic. A weight-normed
kernel and its gradient, or a draw of Gaussian noise, are a dozen or more such ops. `compiled` makes each
of them one XLA program while `enabled` is on (the trainer turns it on for GPUs: on CPUs the plain ops
are as fast, and the programs only add compile time and memory). Inside a jit-compiled step they are
part of the step's program either way.
"""

import contextlib
import contextvars
import functools

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

# Per thread (MirroredStrategy traces each replica in a thread of its own): the trainer sets it where
# a replica's computation is traced.
_ENABLED = contextvars.ContextVar("xla_programs", default=False)


@contextlib.contextmanager
def enabled(on=True):
    """While tracing inside this block, `compiled` functions are XLA programs (if `on`), else plain ops."""
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def inside_xla():
    """Whether the function being traced is compiled by XLA (jit_compile, or inside a compiled function).
    XLA does not see through calls of `_noinline` functions: there they would run op by op, so callers
    that make such calls trace their body inline instead."""
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def enabled_now():
    """Whether `compiled` functions traced here become XLA programs."""
    return _ENABLED.get()


def compiled(fn):
    """fn as one XLA program when called from a traced function inside `enabled()`; else op by op.

    Eager calls (building the model, its data-dependent init) keep the plain ops: there each new shape
    would be a new trace of the program, and TensorFlow warns on the console about frequent retracing.
    Python arguments (flags, constants) are part of the program's signature, as for any tf.function.
    """
    program = tf.function(fn, jit_compile=True, autograph=False)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        use_program = enabled_now() and not tf.executing_eagerly()
        return program(*args, **kwargs) if use_program else fn(*args, **kwargs)

    run.program = program
    return run
