"""Distribution: the strategy of a run (`make_strategy`), the per-replica batches (`replica_batches`), which
worker writes (`is_chief`) and whether the step runs its small XLA programs (`uses_xla_programs`)."""

import itertools
import json
import os

import tensorflow as tf

from iaf_tf import data as data_lib
from iaf_tf.devices import replica_devices
from iaf_tf.errors import ConfigError
from iaf_tf.variables import local_copies


def uses_xla_programs(runtime):
    """Whether the step runs its small programs (runtime.xla_programs; auto: when the replicas are GPUs).
    Measured on CPUs (BUILD.md, "What the CPU says"): no faster there, and seconds more to compile."""
    if runtime.xla_programs != "auto":
        return runtime.xla_programs == "on"
    return bool(tf.config.list_logical_devices("GPU")) and not runtime.cpu_replicas


def make_strategy(runtime):
    """`mirrored`: replicas on this machine. `multi_worker`: the same loop across the machines that
    TF_CONFIG describes (each with its own GPUs, or its CPU)."""
    if runtime.strategy == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = replica_devices(runtime.num_gpus, runtime.cpu_replicas)
    if len(devices) == 1:
        return tf.distribute.get_strategy()  # the default strategy: no distribution overhead
    return mirrored_strategy(devices)


_mirrored_made = itertools.count(1)


def mirrored_strategy(devices):
    """A MirroredStrategy whose collectives have keys of their own. Every MirroredStrategy numbers its
    collectives from the same first key, and TensorFlow remembers each key's shapes for the process: a
    second strategy of the process whose model has other shapes failed its first all-reduce ("Shape
    mismatch in the collective instance"). The class attribute that offsets the keys is TensorFlow's own
    (meant for its tests); each strategy here gets a range of 100,000 keys."""
    tf.distribute.MirroredStrategy._collective_key_base = 100_000 * next(_mirrored_made)
    return tf.distribute.MirroredStrategy(devices)


def _check_tf_config(text):
    howto = "see BUILD.md, 'Several machines'"
    if not text:
        raise ConfigError(f"--strategy=multi_worker needs TF_CONFIG describing the cluster and this task ({howto})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}); {howto}") from None
    task = value.get("task") if isinstance(value, dict) else None
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict) or not isinstance(task, dict) \
            or task.get("type") not in value["cluster"] or not isinstance(task.get("index"), int):
        raise ConfigError(f'TF_CONFIG must be {{"cluster": {{"worker": ["host:port", ...]}}, "task": {{"type": '
                          f'"worker", "index": N}}}} with the task in the cluster, got {text!r}; {howto}')


def replica_batches(strategy, images, batch_size, seed, start_step):
    """Per-replica uint8 batches: replica r of step s gets rows [r*B, (r+1)*B) of global batch s, on one
    machine or several, so the data stream depends only on (seed, step), not on the cluster layout."""
    num_replicas = strategy.num_replicas_in_sync
    shape = images.shape[1:]

    def dataset_fn(context):
        local = num_replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        stream = data_lib.train_dataset(images, batch_size * num_replicas, seed, start_step)
        return stream.flat_map(lambda batch: tf.data.Dataset.from_tensor_slices(
            tf.reshape(batch[first * batch_size:(first + local) * batch_size], [local, batch_size, *shape])))

    # TensorFlow's default input, one pipeline per worker prefetching to each device, starts an autotuning
    # tf.data thread per device, and deleting the iterator (at the end of a run) waits for those threads'
    # next wake-up, up to tens of seconds. Neither strategy here has it: the device reads its batch within
    # the step (a batch is a few hundred KB), from pipelines with autotuning off (data.train_dataset).
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return _WorkerBatches(strategy, dataset_fn)  # it has only the default input
    options = None
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        options = tf.distribute.InputOptions(  # one pipeline per replica
            experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA,
            experimental_fetch_to_device=False)
    return iter(strategy.distribute_datasets_from_function(dataset_fn, options))


class _WorkerBatches:
    """MultiWorkerMirroredStrategy's per-replica batches from this worker's pipeline, which yields its
    replicas' batches one after the other."""

    def __init__(self, strategy, dataset_fn):
        self._strategy = strategy
        replicas = local_copies(strategy.experimental_distribute_values_from_function(
            lambda context: context.replica_id_in_sync_group))
        self._first, self._local = min(replicas), len(replicas)  # this worker's are first, first + 1, ...
        workers = strategy.num_replicas_in_sync // self._local
        self._batches = iter(dataset_fn(tf.distribute.InputContext(
            workers, self._first // self._local, strategy.num_replicas_in_sync)))

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(self._batches) for _ in range(self._local)]
        return self._strategy.experimental_distribute_values_from_function(
            lambda context: batches[context.replica_id_in_sync_group - self._first])


def is_chief(strategy):
    """Whether this worker writes checkpoints, summaries and pictures (the chief, or worker 0 without one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    return task_type in (None, "chief") or (task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())
