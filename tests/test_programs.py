import logging
import threading

import numpy as np
import tensorflow as tf

from iaf_tf import programs
from iaf_tf.programs import compiled


@compiled
def _scaled_norms(x, gain):
    return gain * tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=0), 1e-12))


def _calls_in(graph):
    """The function-call ops of a traced graph, with whether each calls an XLA-compiled function."""
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    calls = [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    return [library[op.get_attr("f").name].attr["_XlaMustCompile"].b for op in calls]


def test_a_traced_call_is_one_xla_program_when_enabled_else_plain_ops_with_the_same_values():
    x = tf.constant(np.random.default_rng(0).normal(size=[5, 3]).astype(np.float32))
    eager = _scaled_norms(x, 0.5)
    for on, calls in ((True, [True]), (False, [])):
        traced = tf.function(lambda x: _scaled_norms(x, 0.5))
        with programs.enabled(on):
            graph = traced.get_concrete_function(x).graph
        assert _calls_in(graph) == calls
        assert any(op.type == "Rsqrt" for op in graph.get_operations()) == (not on)
        np.testing.assert_allclose(traced(x), eager, rtol=1e-6)
    traced = tf.function(lambda x: _scaled_norms(x, 0.5))
    assert _calls_in(traced.get_concrete_function(x).graph) == []  # off unless enabled


def test_enabled_is_per_thread():
    # MirroredStrategy traces each replica in a thread of its own: the trainer enables the programs there.
    seen = []
    with programs.enabled():
        worker = threading.Thread(target=lambda: seen.append(programs._ENABLED.get()))
        worker.start()
        worker.join()
        seen.append(programs._ENABLED.get())
    assert seen == [False, True] and programs._ENABLED.get() is False


def test_eager_calls_with_ever_new_shapes_print_no_retracing_warning(caplog):
    with caplog.at_level(logging.WARNING):
        for n in range(1, 9):
            _scaled_norms(tf.ones([n, 2]), 1.0)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
