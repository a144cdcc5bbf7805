"""Logical CPU devices and replica placement (conftest configures 2 logical CPUs before any op)."""

import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

from iaf_tf import devices, distribute
from iaf_tf.devices import configure_cpu, replica_devices


@pytest.fixture
def initialized():
    """Make sure TensorFlow's runtime is up (as it is after any op), so the device layout is fixed."""
    tf.constant(1.0) + 1.0
    return tf.config.list_logical_devices("CPU")


@pytest.fixture
def no_gpu():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this host has a GPU")


def test_configure_cpu_matching_layout_is_accepted(initialized):
    assert len(initialized) == 2
    devices = configure_cpu(2)
    assert len(devices) == 2
    assert all(d.device_type == "CPU" for d in devices)
    assert [d.name for d in devices] == [d.name for d in initialized]


def test_configure_cpu_after_initialization_raises(initialized):
    with pytest.raises(RuntimeError, match="before the first TensorFlow op"):
        configure_cpu(3)
    with pytest.raises(RuntimeError, match="already initialized with 2 logical CPU"):
        configure_cpu(4)
    # Nothing changed.
    assert len(tf.config.list_logical_devices("CPU")) == 2


def test_configure_cpu_one_device_after_two_raises(initialized):
    # The docstring: "once TensorFlow is initialized ... a different one raises RuntimeError".
    with pytest.raises(RuntimeError, match="before the first TensorFlow op"):
        configure_cpu(1)


def test_replica_devices_two_gpus_without_gpu_points_to_cpu_replicas(initialized, no_gpu):
    with pytest.raises(ValueError, match="--cpu_replicas") as info:
        replica_devices(2)
    assert "--num_gpus=2" in str(info.value)


def test_replica_devices_one_replica_on_cpu(initialized, no_gpu):
    devices = replica_devices(1)
    assert len(devices) == 1
    assert tf.DeviceSpec.from_string(devices[0]).device_type == "CPU"
    with tf.device(devices[0]):
        assert "CPU" in tf.constant(1.0).device


def test_replica_devices_cpu_replicas(initialized):
    devices = replica_devices(2, cpu_replicas=2)
    assert len(devices) == 2 and len(set(devices)) == 2
    assert all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices)
    # The names are usable as placements and as MirroredStrategy devices.
    for name in devices:
        with tf.device(name):
            assert tf.constant(1.0).device.endswith(tf.DeviceSpec.from_string(name).to_string().split("/")[-1])
    strategy = distribute.mirrored_strategy(devices)
    assert strategy.num_replicas_in_sync == 2
    with pytest.raises(RuntimeError, match="before the first TensorFlow op"):
        replica_devices(3, cpu_replicas=3)


_COUNT_HEAPS = r"""
import ctypes, ctypes.util, re, sys, tempfile, threading
sys.path.insert(0, {root!r})
from iaf_tf.devices import limit_malloc_arenas
if {limit}:
    assert limit_malloc_arenas(1)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = libc.fdopen.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def heaps():
    with tempfile.TemporaryFile() as out:
        stream = ctypes.c_void_p(libc.fdopen(libc.dup(out.fileno()), b"w"))
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        out.seek(0)
        return len(re.findall(rb"<heap nr=", out.read()))

barrier = threading.Barrier(8)
def work():
    barrier.wait()  # all threads allocate at once, which is when glibc hands out more arenas
    for _ in range(2000):
        libc.free(libc.malloc(4096))
before = heaps()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(before, heaps())
"""

_ALLOCATOR_STATS = r"""
import sys
sys.path.insert(0, {root!r})
from iaf_tf.devices import configure_cpu
configure_cpu(1)
import tensorflow as tf
tf.reduce_sum(tf.ones([1000, 1000]))
print(tf.config.experimental.get_memory_info("CPU:0")["peak"])
"""


def _run(script, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
            and k != "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**base, **env}).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc arenas are a glibc feature")
@pytest.mark.e2e
def test_limit_malloc_arenas_keeps_threads_on_one_heap():
    root = str(Path(__file__).resolve().parents[1])
    # Importing TensorFlow may already have made some heaps; the limit stops any more being made.
    before, after = map(int, _run(_COUNT_HEAPS.format(root=root, limit=True))[-2:])
    assert after == before
    # Without the limit the same threads get heaps of their own, so the test can tell the difference.
    before, after = map(int, _run(_COUNT_HEAPS.format(root=root, limit=False))[-2:])
    assert after > before


def test_limit_malloc_arenas_without_mallopt_says_so(monkeypatch):
    def no_libc(*_):
        raise OSError("no C library")

    monkeypatch.setattr(devices.ctypes, "CDLL", no_libc)
    assert devices.limit_malloc_arenas() is False


@pytest.mark.e2e
def test_configure_cpu_makes_tensorflow_allocate_with_malloc():
    root = str(Path(__file__).resolve().parents[1])
    # TensorFlow's own pool counts its bytes; with malloc there is nothing to count.
    assert int(_run(_ALLOCATOR_STATS.format(root=root))[-1]) == 0
    # An explicit setting wins, and shows that the check can tell the two apart.
    assert int(_run(_ALLOCATOR_STATS.format(root=root), TF_ONEDNN_USE_SYSTEM_ALLOCATOR="false")[-1]) >= 4_000_000


def _call_options(fn, *args):
    """The ConfigProto of each function call in fn's traced graph: the options Grappler optimizes it with."""
    graph = fn.get_concrete_function(*args).graph
    return [config_pb2.ConfigProto.FromString(op.get_attr("config_proto")) for op in graph.get_operations()
            if op.type in ("PartitionedCall", "StatefulPartitionedCall")]


def test_function_calls_leave_out_the_idle_graph_passes_in_replica_threads_too(initialized, no_gpu):
    strategy = distribute.mirrored_strategy([d.name for d in initialized])
    inner = tf.function(lambda x: tf.nn.elu(x * 2.0))
    threads = set()

    def replica(x):
        threads.add(threading.current_thread())
        return inner(x)

    @tf.function
    def outer(x):
        return strategy.run(replica, (x,))

    options = _call_options(outer, tf.constant([1.0, -1.0]))
    assert len(options) == 2 and len(threads) == 2  # each replica traced its call in a thread of its own
    for option in options:
        rewrite = option.graph_options.rewrite_options
        assert rewrite.disable_tfg_optimizer
        assert rewrite.layout_optimizer == rewriter_config_pb2.RewriterConfig.OFF
        assert rewrite.memory_optimization == rewriter_config_pb2.RewriterConfig.NO_MEM_OPT


_GRAPH_PASSES = r"""
import sys
sys.path.insert(0, {root!r})
import tensorflow as tf
from iaf_tf import devices

def step(x):
    return tf.reduce_sum(tf.nn.elu(x * 2.0 + 1.0) / (tf.abs(x) + 1.0))

tf.function(step)(tf.ones([8, 8]))
devices.skip_idle_graph_passes()
tf.function(step)(tf.ones([8, 8]))
"""


@pytest.mark.e2e
def test_grappler_runs_without_the_idle_passes_once_they_are_left_out(no_gpu):
    root = str(Path(__file__).resolve().parents[1])
    log = subprocess.run([sys.executable, "-c", _GRAPH_PASSES.format(root=root)], capture_output=True, text=True,
                         check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0",
                                          "TF_CPP_VMODULE": "meta_optimizer=1"}).stderr
    # Grappler logs "Starting optimization for grappler item: <function>", then a line per pass it ran.
    items = log.split("Starting optimization for grappler item:")[1:]
    assert len(items) == 2, log
    before, after = ({line.split("] ", 1)[1].split(":")[0].split("{")[0] for line in item.splitlines()
                      if "Graph size after" in line} for item in items)
    idle = {"tfg_optimizer", "layout", "memory_optimizer"}
    assert idle <= before
    assert not idle & after
    assert "remapper" in after and "constant_folding" in after  # the passes that change graphs still run
