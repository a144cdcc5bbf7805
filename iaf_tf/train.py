"""Training: a MirroredStrategy custom loop with the original's objective, Adamax, EMA and checkpoints.

One step is: per-replica loss and gradients -> one MEAN all-reduce (the original's tower averaging)
-> skip the update if anything is non-finite -> Adamax -> moving averages. The update runs in
cross-replica context so that Keras does not sum the already-averaged gradients a second time.
"""

import dataclasses
import os
import signal
import time

import keras
import tensorflow as tf

from iaf_tf import checkpoints
from iaf_tf import data as data_lib
from iaf_tf import distributions as dist
from iaf_tf.devices import replica_devices
from iaf_tf.ema import WeightAverages
from iaf_tf.model import CVAE, count_trainable_parameters
from iaf_tf.optim import OriginalAdamax


@dataclasses.dataclass
class TrainConfig:
    logdir: str
    max_steps: int = 0            # 0: until stopped, as the original
    checkpoint_every: int = 100   # steps, as the original
    summary_every: int = 20       # steps, as the original
    seed: int = 0
    cpu_replicas: int = 0         # >0: run num_gpus replicas on logical CPU devices (testing)
    data_dir: str | None = None   # CIFAR10_PATH / MNIST_PATH when None
    allow_download: bool = False  # fall back to tensorflow-datasets when CIFAR-10 is not found
    max_to_keep: int = 5
    strategy: str = "mirrored"    # or multi_worker (TF_CONFIG)
    print_fn: callable = print


class NonFiniteError(RuntimeError):
    """Training met more consecutive non-finite steps than hps.max_skips allows."""


def make_strategy(num_replicas, cpu_replicas=0, kind="mirrored"):
    """`mirrored`: replicas on this machine. `multi_worker`: the same loop across the machines that
    TF_CONFIG describes (each with its own GPUs, or its CPU)."""
    if kind == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs TF_CONFIG describing the cluster and this task "
                             "(see BUILD.md, 'Several machines')")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind != "mirrored":
        raise ValueError(f"unknown strategy {kind!r}; use mirrored or multi_worker")
    devices = replica_devices(num_replicas, cpu_replicas)
    if len(devices) == 1:
        return tf.distribute.get_strategy()  # the default strategy: no distribution overhead
    return tf.distribute.MirroredStrategy(devices)


def step_metrics(model, out):
    """The original's training summaries (means over this replica's batch).

    MNIST adds nats_per_image, the paper's unit there; its bits_per_dim (over the 784 scored pixels)
    and dec_log_stdv (unused by the Bernoulli, so 0) stay because the training log line prints them.
    """
    metrics = {
        "bits_per_dim": dist.bits_per_dim(tf.reduce_mean(out["nll"]), 1, model.num_dims),
        "dec_log_stdv": tf.convert_to_tensor(model.dec_log_stdv),
        "kl_obj": tf.reduce_mean(out["kl_obj"]),
        "kl_cost": tf.reduce_mean(out["kl_cost"]),
        "log_pxz": -tf.reduce_mean(out["log_pxz"]),
        "objective": out["objective"],
    }
    if model.bernoulli:
        metrics["nats_per_image"] = tf.reduce_mean(out["nll"])
    for (i, j), kl_obj, kl_cost in zip(model.block_index, out["kl_obj_layers"], out["kl_cost_layers"]):
        metrics[f"kl_obj_{i:02d}_{j:02d}"] = tf.reduce_mean(kl_obj)
        metrics[f"kl_cost_{i:02d}_{j:02d}"] = tf.reduce_mean(kl_cost)
    return metrics


class Trainer:
    """Model, optimizer, averages and the compiled step, built under one strategy."""

    def __init__(self, hps, strategy, seed=0):
        self.hps = hps
        self.strategy = strategy
        self.seed = seed
        self.num_replicas = strategy.num_replicas_in_sync
        keras.utils.set_random_seed(seed)  # the initial directions V
        with strategy.scope():
            self.model = CVAE(hps).build_for(1)
            self.variables = list(self.model.trainable_variables)
            self.optimizer = OriginalAdamax(hps.learning_rate)
            self.optimizer.build(self.variables)
            self.averages = WeightAverages(self.variables, hps.ema_decay)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        self.checkpoint = checkpoints.make_checkpoint(self.model, self.averages, optimizer=self.optimizer,
                                                      step=self.step, skipped=self.skipped)
        self._train_step = tf.function(self._step, jit_compile=hps.jit_compile and self.num_replicas == 1)

    @property
    def num_parameters(self):
        return count_trainable_parameters(self.model)

    def initialize(self, images):
        """Data-dependent init on one replica-sized batch, then start the averages there."""
        with self.strategy.scope():
            self.model.initialize(tf.constant(images[:self.hps.batch_size]), tf.constant([self.seed, -1], tf.int64))
            self.averages.reset()

    def replica_gradients(self, images, step):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.stack([tf.constant(self.seed, tf.int64), step * self.num_replicas + tf.cast(replica, tf.int64)])
        with tf.GradientTape() as tape:
            out = self.model(images, seed, k=self.hps.k)
        grads = tape.gradient(out["objective"], self.variables)
        return grads, step_metrics(self.model, out)

    def _step(self, batch):
        grads, metrics = self.strategy.run(self.replica_gradients, args=(batch, self.step.read_value()))
        # Weights the loss does not reach (the top block's last up-pass conv) get no update, as in TF1.
        pairs = [(g, v) for g, v in zip(grads, self.variables) if g is not None]
        variables = [v for _, v in pairs]
        grads = self.strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.MEAN, [(g, v.value) for g, v in pairs])
        metrics = {name: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                   for name, value in metrics.items()}
        finite = tf.math.is_finite(metrics["objective"])
        for g in grads:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(g)))

        def apply():
            clipped = grads
            if self.hps.grad_clip > 0:
                clipped, _ = tf.clip_by_global_norm([tf.convert_to_tensor(g) for g in grads], self.hps.grad_clip)
            self.optimizer.apply(clipped, variables)
            self.averages.update()
            return tf.constant(True)

        def skip():
            self.skipped.assign_add(1)
            return tf.constant(False)

        applied = tf.cond(finite, apply, skip)
        self.step.assign_add(1)
        return metrics, applied

    def train_step(self, distributed_batch):
        return self._train_step(distributed_batch)


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (so a checkpoint is written)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _write_scalars(writer, metrics, step, images_per_second):
    with writer.as_default(step=step):
        for name, value in metrics.items():
            if name != "objective":
                tf.summary.scalar(f"model/{name}", value)
        if images_per_second is not None:
            tf.summary.scalar("images_per_second", images_per_second)
    writer.flush()


def check_writable(logdir):
    """Fail before anything is written if logdir cannot be created or written."""
    path = os.path.abspath(logdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"logdir {logdir} cannot be created: {path} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"logdir {logdir} is not writable ({path} does not allow writing); choose another --logdir")


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

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    return task_type in (None, "chief") or (task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


class _CheckpointWriter:
    """Saves on every worker (saving may need all of them), keeps only the chief's copy."""

    def __init__(self, trainer, train_dir, max_to_keep, is_chief):
        self.train_dir = train_dir
        self.is_chief = is_chief
        task_id = getattr(getattr(trainer.strategy, "cluster_resolver", None), "task_id", 0)
        self._dir = train_dir if is_chief else os.path.join(train_dir, f".worker{task_id}_tmp")
        self._manager = tf.train.CheckpointManager(trainer.checkpoint, self._dir, max_to_keep=max_to_keep)
        self.saved_step = None

    @property
    def latest(self):
        return tf.train.latest_checkpoint(self.train_dir)

    def save(self, step):
        self._manager.save(checkpoint_number=step)
        if not self.is_chief:
            tf.io.gfile.rmtree(self._dir)
        self.saved_step = step


def train(hps, config, trainer=None):
    """Train until config.max_steps (or SIGTERM/SIGINT); resumes from the latest checkpoint in logdir/train.

    Everything that can be wrong with the inputs is checked before anything is written. Returns a dict
    with the final step, the last metrics, how many steps were skipped and why it stopped.
    """
    check_writable(config.logdir)
    strategy = trainer.strategy if trainer else make_strategy(hps.num_gpus, config.cpu_replicas, config.strategy)
    images = data_lib.load_images(hps.dataset, "train", config.data_dir, allow_download=config.allow_download)
    data_lib.check_images(images, hps.image_size, hps.dataset)
    trainer = trainer or Trainer(hps, strategy, seed=config.seed)
    train_dir = os.path.join(config.logdir, "train")
    is_chief = _is_chief(strategy)
    saver = _CheckpointWriter(trainer, train_dir, config.max_to_keep, is_chief)
    say = config.print_fn if is_chief else (lambda *_: None)

    say(f"Num trainable variables: {trainer.num_parameters}")
    if saver.latest:
        checkpoints.check_shapes(saver.latest, checkpoints.saved_keys(trainer.model))
        trainer.checkpoint.restore(saver.latest).assert_consumed()
        say(f"Resumed from {saver.latest} at step {int(trainer.step.numpy())}")
        saver.saved_step = int(trainer.step.numpy())
    else:
        say("Initializing parameters.")
        first = next(iter(data_lib.train_dataset(images, hps.batch_size * trainer.num_replicas, config.seed)))
        trainer.initialize(first.numpy())
        saver.save(0)
        say("Initialized!")

    batches = replica_batches(strategy, images, hps.batch_size, config.seed, int(trainer.step.numpy()))
    writer = tf.summary.create_file_writer(train_dir) if is_chief else tf.summary.create_noop_writer()
    global_batch = hps.batch_size * trainer.num_replicas
    status, metrics, consecutive_skips = "max_steps", {}, 0
    local_step, begin, window_start, window_images = 0, time.time(), time.time(), 0
    with _StopRequest() as stop:
        while not config.max_steps or int(trainer.step.numpy()) < config.max_steps:
            metrics, applied = trainer.train_step(next(batches))
            step = int(trainer.step.numpy())
            window_images += global_batch
            consecutive_skips = 0 if bool(applied) else consecutive_skips + 1
            if consecutive_skips:
                say(f"Iteration {step}: non-finite loss or gradient, update skipped "
                    f"({consecutive_skips} in a row, {int(trainer.skipped.numpy())} in all)")
            if local_step < 10 or step % config.summary_every == 0:
                score = (f"train nats_per_image = {float(metrics['nats_per_image']):.2f}" if "nats_per_image" in metrics
                         else f"train bits_per_dim = {float(metrics['bits_per_dim']):.4f}")
                say(f"Iteration {step}, time = {time.time() - begin:.2f}s, {score}, "
                    f"dec_log_stdv = {float(metrics['dec_log_stdv']):.4f}")
                begin = time.time()
            if step % config.summary_every == 0 or consecutive_skips:
                elapsed = time.time() - window_start
                _write_scalars(writer, metrics, step, window_images / elapsed if elapsed > 0 else None)
                with writer.as_default(step=step):
                    tf.summary.scalar("train/skipped_steps", trainer.skipped)
                window_start, window_images = time.time(), 0
            if consecutive_skips >= hps.max_skips:
                status = "non_finite"
                break
            if step % config.checkpoint_every == 0:
                saver.save(step)
            local_step += 1
            if stop.signal is not None:
                status = f"signal {signal.Signals(stop.signal).name}"
                break
        final_step = int(trainer.step.numpy())
        if saver.saved_step != final_step:
            saver.save(final_step)
    writer.close()
    result = {"step": final_step, "status": status, "metrics": {k: float(v) for k, v in metrics.items()},
              "skipped": int(trainer.skipped.numpy()), "trainer": trainer}
    if status == "non_finite":
        raise NonFiniteError(
            f"stopped at step {final_step}: {consecutive_skips} consecutive steps had a non-finite loss or "
            f"gradient (max_skips={hps.max_skips}); the last good weights are saved in {train_dir}. "
            "Try a lower learning_rate, or grad_clip>0 in --hpconfig.")
    say(f"Stopped at step {final_step} ({status}).")
    return result
