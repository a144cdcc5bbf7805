import numpy as np
import tensorflow as tf
import keras

from iaf_tf.optim import OriginalAdamax


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
