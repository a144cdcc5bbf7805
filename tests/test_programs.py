import logging

import numpy as np
import tensorflow as tf

from iaf_tf.programs import compiled


@compiled
def _scaled_norms(x, gain):
    return gain * tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=0), 1e-12))


def _calls_in(graph):
    """The function-call ops of a traced graph, with whether each calls an XLA-compiled function."""
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    calls = [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    return [library[op.get_attr("f").name].attr["_XlaMustCompile"].b for op in calls]


def test_a_traced_call_is_one_xla_program_and_an_eager_call_plain_ops_with_the_same_values():
    x = tf.constant(np.random.default_rng(0).normal(size=[5, 3]).astype(np.float32))
    traced = tf.function(lambda x: _scaled_norms(x, 0.5))
    assert _calls_in(traced.get_concrete_function(x).graph) == [True]
    np.testing.assert_allclose(traced(x), _scaled_norms(x, 0.5), rtol=1e-6)


def test_eager_calls_with_ever_new_shapes_print_no_retracing_warning(caplog):
    with caplog.at_level(logging.WARNING):
        for n in range(1, 9):
            _scaled_norms(tf.ones([n, 2]), 1.0)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
