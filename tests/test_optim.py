import keras
import numpy as np
import pytest
import tensorflow as tf

from iaf_tf.ema import move_towards
from iaf_tf.optim import OriginalAdamax, adamax_update


def test_matches_the_original_update_rule_over_several_steps():
    rng = np.random.RandomState(0)
    w0 = rng.randn(5).astype(np.float32)
    var = keras.Variable(w0)
    opt = OriginalAdamax(learning_rate=0.01)
    opt.build([var])
    w, v, m = w0.astype(np.float64), np.zeros(5), np.zeros(5)
    grads = [rng.randn(5).astype(np.float32) * s for s in (1.0, 0.001, 10.0, 0.0)]
    for g in grads:
        opt.apply([tf.constant(g)], [var])
        v = 0.9 * v + 0.1 * g
        m = np.maximum(0.999 * m + 1e-8, np.abs(g))
        w = w - 0.01 * v / m
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-7)
    first, running_max = opt.slots_for(var)
    np.testing.assert_allclose(first.numpy(), v, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(running_max.numpy(), m, rtol=1e-5)
    assert int(opt.iterations.numpy()) == 4


def test_differs_from_keras_adamax():
    # Keras' Adamax corrects the bias of the first moment; the original does not.
    a, b = keras.Variable(np.ones(3, np.float32)), keras.Variable(np.ones(3, np.float32))
    ours, theirs = OriginalAdamax(0.1), keras.optimizers.Adamax(0.1)
    g = tf.constant([1.0, -2.0, 0.5])
    ours.apply([g], [a])
    theirs.apply([g], [b])
    np.testing.assert_allclose(a.numpy(), 1 - 0.1 * 0.1 * np.sign(g.numpy()), rtol=1e-5)
    assert not np.allclose(a.numpy(), b.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_skipped_update_keeps_every_value_even_before_any_applied_step(jit_compile):
    # Fresh slots are 0, so a skipped step's 0 / 0 must not reach the weights; nor may a NaN gradient.
    weights, firsts, maxes = (tf.Variable(tf.constant(values, tf.float32)) for values in
                              ([0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]))
    shadow = tf.Variable([0.25, -0.5, 1.0])

    @tf.function(jit_compile=jit_compile, autograph=False)
    def update(gradient, applied):
        move_towards([shadow], [weights], 0.01, applied)
        adamax_update([gradient], [weights], [firsts], [maxes], 0.002, 0.9, 0.999, 1e-8, applied)

    state = lambda: [v.numpy().copy() for v in (weights, firsts, maxes, shadow)]
    before = state()
    update(tf.constant([float("nan"), 1.0, float("inf")]), tf.constant(False))
    for old, new in zip(before, state()):
        np.testing.assert_array_equal(new, old)
    # Applied, it is the original's rule: m = 0.1 g, u = max(1e-8, |g|), w -= lr m / u; the average moves
    # towards the weights from before the update.
    gradient = np.array([0.3, -2.0, 0.0], np.float32)
    update(tf.constant(gradient), tf.constant(True))
    weights_now, firsts_now, maxes_now, shadow_now = state()
    np.testing.assert_allclose(firsts_now, 0.1 * gradient, rtol=1e-6)
    np.testing.assert_allclose(maxes_now, np.maximum(1e-8, np.abs(gradient)), rtol=1e-6)
    np.testing.assert_allclose(weights_now, before[0] - 0.002 * 0.1 * gradient / np.maximum(1e-8, np.abs(gradient)),
                               rtol=1e-6)
    np.testing.assert_allclose(shadow_now, before[3] - 0.01 * (before[3] - before[0]), rtol=1e-6)


def test_each_term_of_the_rule_is_one_pass_over_the_weights_and_the_numbers_are_the_rules_bit_for_bit():
    # Without XLA each element-wise op of the update is a pass over the weights, every step, for every
    # variable: a skipped step costs scalar selects and the gradient's select, nothing more.
    n = 1000
    rng = np.random.default_rng(0)
    start = [rng.normal(size=n).astype(np.float32) * scale for scale in (1.0, 1e-3, 1e-3, 1.0)]
    start[2] = np.abs(start[2])
    weights, firsts, maxes, shadow = (tf.Variable(values) for values in start)

    @tf.function(autograph=False)
    def update(gradient, applied):
        move_towards([shadow], [weights], 0.01, applied)
        adamax_update([gradient], [weights], [firsts], [maxes], 0.002, 0.9, 0.999, 1e-8, applied)

    graph = update.get_concrete_function(tf.TensorSpec([n]), tf.TensorSpec([], tf.bool)).graph
    passes = sorted(op.type for op in graph.get_operations()
                    if op.outputs and op.outputs[0].shape == [n] and op.type not in ("ReadVariableOp", "Placeholder"))
    assert passes == sorted(["SelectV2",  # the gradient, zeroed when skipped (it may be NaN)
                             "Mul", "Mul", "AddV2",  # first moment
                             "Mul", "AddV2", "Abs", "Maximum",  # running max
                             "Mul", "DivNoNan",  # step
                             "Sub"])  # moving average: the difference (ResourceApplyGradientDescent scales it)

    gradient = rng.normal(size=n).astype(np.float32) * 1e-3
    update(tf.constant(gradient), tf.constant(True))
    w, v, m, s = start
    f32 = np.float32
    v_new = f32(0.9) * v + f32(0.1) * gradient
    m_new = np.maximum(f32(0.999) * m + f32(1e-8), np.abs(gradient))
    for variable, want in ((firsts, v_new), (maxes, m_new), (weights, w - f32(0.002) * v_new / m_new),
                           (shadow, s - f32(0.01) * (s - w))):
        np.testing.assert_array_equal(variable.numpy(), want)
