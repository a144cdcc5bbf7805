"""Mixed precision (hps.mixed_precision: bfloat16 convolutions, float32 weights, likelihood, KL and
optimizer state) and XLA (hps.jit_compile) against the float32 default.

Tolerances:
- bfloat16 evaluation of the reference TF1 checkpoint: within 0.02 bits/dim of float32 on the first 500
  test images (measured: 0.002).
- bfloat16 training: finite, falling, and within 0.01 bits/dim of float32 at each of the first steps
  (measured: 0.002).
- jit_compile=true: the same objective as jit_compile=false to 1e-4 relative (measured: ~1e-6) when both
  draw the same noise. XLA's stateless RNG kernels give other numbers than TensorFlow's, so the test feeds
  both a deterministic stand-in for the Gaussian noise.
"""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data, evaluate, hparams, train
from iaf_tf.layers import ARMultiConv, WNConv2D
from iaf_tf.likelihood import Evaluator
from iaf_tf.model import CVAE

TINY = "depth=2,num_blocks=1,h_size=8,z_size=4,batch_size=4,num_gpus=1,learning_rate=0.002"


def _conv_dtypes(concrete_function):
    found = set()
    graphs = [concrete_function.graph]
    while graphs:
        graph = graphs.pop()
        graphs += [f.graph for f in graph._functions.values() if hasattr(f, "graph")]
        found |= {op.get_attr("T") for op in graph.get_operations() if op.type.startswith("Conv2D")}
    return found


def test_mixed_precision_computes_convs_in_bfloat16_and_keeps_float32_state():
    hps = hparams.get_default_hparams().parse(TINY).replace(mixed_precision=True)
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    images = tf.zeros([4, 32, 32, 3], tf.uint8)
    concrete = trainer._train_step.get_concrete_function(images)
    # The IAF blocks compute in bfloat16; the 3-channel input and output convs stay float32 (the
    # decoder's mean must resolve 1/256 bins, which bfloat16 cannot near +-0.5).
    assert _conv_dtypes(concrete) == {tf.bfloat16, tf.float32}
    assert {tf.as_dtype(v.dtype) for v in trainer.variables} == {tf.float32}
    assert {tf.as_dtype(s.dtype) for s in trainer.averages.shadows} == {tf.float32}
    assert {tf.as_dtype(v.dtype) for v in trainer.optimizer.variables} <= {tf.float32, tf.int64}
    out = trainer.model(images, tf.constant([0, 0], tf.int32))
    for key in ("log_pxz", "kl_obj", "kl_cost", "objective", "nll"):
        assert out[key].dtype == tf.float32, key
    assert all(t.dtype == tf.float32 for t in out["kl_cost_layers"])


def test_float32_default_has_no_bfloat16():
    hps = hparams.get_default_hparams().parse(TINY)
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    concrete = trainer._train_step.get_concrete_function(tf.zeros([4, 32, 32, 3], tf.uint8))
    assert _conv_dtypes(concrete) == {tf.float32}


@pytest.mark.slow
def test_reference_checkpoint_in_bfloat16_is_within_0_02_bits_per_dim(reference_dir, cifar10_dir):
    images = data.load_cifar10("test", cifar10_dir)[:500]
    results = {}
    for mixed in (False, True):
        averaged = evaluate.AveragedModel(hparams.load_preset("tf1_small").replace(mixed_precision=mixed))
        averaged.restore(str(reference_dir / "model.ckpt-3000"))
        results[mixed] = Evaluator(averaged.model).bits_per_dim(images, k=1, seed=0)[0]
    assert abs(results[True] - results[False]) < 0.02, results
    assert abs(results[False] - 6.1069) < 0.002, results  # this port's float32 number on these images


@pytest.mark.slow
def test_bfloat16_training_is_finite_falls_and_tracks_float32(cifar10_dir):
    steps = 12
    images = data.load_cifar10("train", cifar10_dir)[:16 * steps]
    curves = {}
    for mixed in (False, True):
        hps = hparams.load_preset("cpu_quick").replace(mixed_precision=mixed)
        trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
        trainer.initialize(images[:16])
        curve = []
        for i in range(steps):
            metrics, applied = trainer.train_step(tf.constant(images[16 * i:16 * (i + 1)]))
            assert bool(applied)
            curve.append(float(metrics["bits_per_dim"]))
        curves[mixed] = np.array(curve)
    bf16, f32 = curves[True], curves[False]
    assert np.all(np.isfinite(bf16))
    assert bf16[-4:].mean() < bf16[:4].mean() - 0.05
    np.testing.assert_allclose(bf16, f32, atol=0.01)


def _deterministic_noise(self, seed, index, shape, temperature=1.0):
    """A noise stand-in that XLA and TensorFlow compute alike (their stateless RNGs differ)."""
    count = tf.reduce_prod(shape)
    positions = tf.cast(tf.range(count), tf.float32)
    noise = tf.reshape(tf.sin(positions * 0.7 + tf.cast(index, tf.float32)) * 1.5, shape)
    return noise * temperature


@pytest.mark.slow
def test_jit_compile_gives_the_same_loss(monkeypatch, cifar10_dir):
    monkeypatch.setattr(CVAE, "_noise", _deterministic_noise)
    images = data.load_cifar10("train", cifar10_dir)[:4 * 3]
    losses = {}
    for jit in (False, True):
        hps = hparams.get_default_hparams().parse(TINY).replace(jit_compile=jit)
        trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
        trainer.initialize(images[:4])
        losses[jit] = [float(trainer.train_step(tf.constant(images[4 * i:4 * (i + 1)]))[0]["objective"])
                       for i in range(3)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][0] != losses[True][1]  # the steps really trained


@pytest.mark.parametrize("make_layer", [
    lambda: WNConv2D(8, conv_dtype="bfloat16"),
    lambda: ARMultiConv(8, [8], [8, 8], conv_dtype="bfloat16"),
], ids=["WNConv2D", "ARMultiConv"])
def test_bfloat16_layers_take_bfloat16_inputs_without_a_float32_round_trip(make_layer):
    # Keras casts a layer's floating inputs to its float32 compute dtype unless told not to; that would
    # keep a float32 and a bfloat16 copy of each activation in a mixed-precision step.
    layer = make_layer()
    x = tf.random.normal([2, 4, 4, 8])
    args = (x, x) if isinstance(layer, ARMultiConv) else (x,)
    layer(*args)  # builds the float32 variables
    bf16 = [tf.TensorSpec(a.shape, tf.bfloat16) for a in args]
    graph = tf.function(lambda *a: layer(*a)).get_concrete_function(*bf16).graph
    up_casts = [op.name for op in graph.get_operations()
                if op.type == "Cast" and op.get_attr("SrcT") == tf.bfloat16 and op.get_attr("DstT") == tf.float32]
    assert up_casts == []
    outputs = tf.nest.flatten(graph.structured_outputs)
    assert outputs and all(t.dtype == tf.bfloat16 for t in outputs)
