"""Device setup that has to happen before TensorFlow runs its first op."""

import ctypes
import ctypes.util
import os

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from iaf_tf.errors import ConfigError

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(count=1):
    """Make glibc's malloc serve every thread from `count` heap(s); returns whether it could.

    By default each thread that allocates under contention gets its own heap ("arena"), and memory goes
    back to the arena it came from, which keeps it. TensorFlow frees tensors on other threads than the
    ones that allocated them, so every arena would grow towards the step's peak. Other allocators
    (jemalloc, tcmalloc, macOS) are left alone.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, count))


def use_system_allocator():
    """Have TensorFlow's oneDNN CPU builds allocate tensors with malloc (one arena, see above) instead of
    their own best-fit pool, which keeps every page it has grown to: README-recipe training peaks at
    3262 MiB resident instead of 3435 MiB, at the same speed (bench/speed.py on the 2-core CPU of BUILD.md).
    TensorFlow reads the variable when it makes its CPU allocator, at the first op; an explicit setting
    is kept."""
    os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "true")
    limit_malloc_arenas()


def skip_idle_graph_passes():
    """Leave out the graph optimizer (Grappler) passes that change none of this package's graphs but still run
    on every traced function at its first call: the MLIR round trip (`tfg_optimizer`) everywhere, and where
    no GPU is visible the layout and memory optimizers (layouts and host swapping are for GPUs). They are a
    large part of Grappler's time at a first step (BUILD.md, "Time to the first step").

    TensorFlow has no public setting for the first two, so they go into the eager context's base ConfigProto,
    which each function call copies its options from; `tf.config.optimizer.set_experimental_options` still
    overrides the layout optimizer. Call it before tracing: calls traced earlier keep their options.
    """
    ctx = context.context()
    base = config_pb2.ConfigProto()
    if ctx._config is not None:
        base.CopyFrom(ctx._config)
    rewrite = base.graph_options.rewrite_options
    rewrite.disable_tfg_optimizer = True
    if not tf.config.list_physical_devices("GPU"):
        rewrite.layout_optimizer = rewriter_config_pb2.RewriterConfig.OFF
        rewrite.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    ctx._config = base
    ctx._thread_local_data.function_call_options = None  # this thread's options are remade from the new base


def configure_cpu(num_logical_devices=1, intra_op_threads=0, inter_op_threads=0):
    """Split the host CPU into `num_logical_devices` logical devices (replicas for MirroredStrategy on a
    machine without GPUs; they share the same cores, so this tests distribution, it does not speed up).

    Idempotent: once TensorFlow is initialized a matching configuration is accepted, a different one
    raises RuntimeError. Also sets up host memory allocation (see `use_system_allocator`) and leaves out
    idle graph passes (`skip_idle_graph_passes`).
    """
    use_system_allocator()
    skip_idle_graph_passes()
    cpus = tf.config.list_physical_devices("CPU")
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(num_logical_devices)]
    try:
        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        # Set even for one device: it is how we learn whether TensorFlow is already initialized.
        tf.config.set_logical_device_configuration(cpus[0], wanted)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != num_logical_devices:
            raise RuntimeError(
                f"TensorFlow is already initialized with {have} logical CPU device(s); "
                f"{num_logical_devices} must be configured before the first TensorFlow op") from None
    return tf.config.list_logical_devices("CPU")


def replica_devices(num_gpus, cpu_replicas=0):
    """Devices for `num_gpus` data-parallel replicas.

    GPUs when present; with `cpu_replicas` > 0, that many logical CPU devices (for tests and debugging).
    A request for more GPUs than exist is an error, not a silent fallback.
    """
    if cpu_replicas:
        devices = configure_cpu(cpu_replicas)
        return [d.name for d in devices[:cpu_replicas]]
    gpus = tf.config.list_logical_devices("GPU")
    if num_gpus > len(gpus):
        if not gpus and num_gpus >= 1:
            if num_gpus == 1:
                return [tf.config.list_logical_devices("CPU")[0].name]
            raise ConfigError(
                f"--num_gpus={num_gpus} but this host has no GPU. Use --num_gpus=1 to train on the CPU, or "
                f"--cpu_replicas={num_gpus} to run {num_gpus} replicas on logical CPU devices (testing only).")
        raise ConfigError(f"--num_gpus={num_gpus} but only {len(gpus)} GPU(s) are visible: "
                         + ", ".join(d.name for d in gpus))
    return [d.name for d in gpus[:num_gpus]]
