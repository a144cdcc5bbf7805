"""A test of iaf_tf.layers waiting to move into tests/test_layers.py (the rest of mixed precision is tested
where its code is: test_train.py for the step, test_tf1_checkpoint.py for the reference in bfloat16)."""

import pytest
import tensorflow as tf

from iaf_tf.layers import ARMultiConv, WNConv2D


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
