"""Training: a MirroredStrategy custom loop with the original's objective, Adamax, EMA and checkpoints.

One step is: per-replica loss and gradients -> one MEAN all-reduce (the original's tower averaging)
-> skip the update if anything is non-finite -> Adamax -> moving averages. The update runs in
cross-replica context so that Keras does not sum the already-averaged gradients a second time.
"""

import dataclasses
import math
import os
import signal
import time

import keras
import numpy as np
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
    max_to_keep: int = 5
    print_fn: callable = print


class NonFiniteError(RuntimeError):
    """Training met more consecutive non-finite steps than hps.max_skips allows."""


def make_strategy(num_replicas, cpu_replicas=0):
    devices = replica_devices(num_replicas, cpu_replicas)
    if len(devices) == 1:
        return tf.distribute.get_strategy()  # the default strategy: no distribution overhead
    return tf.distribute.MirroredStrategy(devices)


def metric_names(model):
    names = ["bits_per_dim", "dec_log_stdv", "kl_obj", "kl_cost", "log_pxz", "objective"]
    for i, j in model.block_index:
        names += [f"kl_obj_{i:02d}_{j:02d}", f"kl_cost_{i:02d}_{j:02d}"]
    return names


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
        metrics = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, metrics, axis=None)
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


def train(hps, config):
    """Train until config.max_steps (or a signal); resumes from the latest checkpoint in logdir/train.

    Returns a dict with the final step, the last metrics and why it stopped.
    """
    strategy = make_strategy(hps.num_gpus, config.cpu_replicas)
    images = data_lib.load_images(hps.dataset, "train", config.data_dir)
    trainer = Trainer(hps, strategy, seed=config.seed)
    train_dir = os.path.join(config.logdir, "train")
    os.makedirs(train_dir, exist_ok=True)
    manager = tf.train.CheckpointManager(trainer.checkpoint, train_dir, max_to_keep=config.max_to_keep)
    say = config.print_fn

    say(f"Num trainable variables: {trainer.num_parameters}")
    if manager.latest_checkpoint:
        trainer.checkpoint.restore(manager.latest_checkpoint).assert_consumed()
        say(f"Resumed from {manager.latest_checkpoint} at step {int(trainer.step.numpy())}")
    else:
        say("Initializing parameters.")
        first_batch = next(iter(data_lib.train_dataset(images, hps.batch_size * trainer.num_replicas, config.seed)))
        trainer.initialize(first_batch.numpy())
        manager.save(checkpoint_number=0)
        say("Initialized!")
    saved_step = int(trainer.step.numpy())

    start = int(trainer.step.numpy())
    dataset = data_lib.train_dataset(images, hps.batch_size * trainer.num_replicas, config.seed, start_step=start)
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    writer = tf.summary.create_file_writer(train_dir)
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
                values = {k: float(v) for k, v in metrics.items()}
                say(f"Iteration {step}, time = {time.time() - begin:.2f}s, train bits_per_dim = "
                    f"{values['bits_per_dim']:.4f}, dec_log_stdv = {values['dec_log_stdv']:.4f}")
                begin = time.time()
            if step % config.summary_every == 0:
                elapsed = time.time() - window_start
                _write_scalars(writer, metrics, step, window_images / elapsed if elapsed > 0 else None)
                window_start, window_images = time.time(), 0
            if consecutive_skips >= hps.max_skips:
                status = "non_finite"
                break
            if step % config.checkpoint_every == 0:
                manager.save(checkpoint_number=step)
                saved_step = step
            local_step += 1
            if stop.signal is not None:
                status = f"signal {signal.Signals(stop.signal).name}"
                break
        final_step = int(trainer.step.numpy())
        if saved_step != final_step:
            manager.save(checkpoint_number=final_step)
    writer.close()
    result = {"step": final_step, "status": status, "metrics": {k: float(v) for k, v in metrics.items()},
              "skipped": int(trainer.skipped.numpy()), "trainer": trainer}
    if status == "non_finite":
        raise NonFiniteError(
            f"stopped at step {final_step}: {consecutive_skips} consecutive steps had a non-finite loss or "
            f"gradient (hps.max_skips={hps.max_skips}); the last good weights are saved in {train_dir}. "
            "Try a lower learning_rate or grad_clip>0.")
    say(f"Stopped at step {final_step} ({status}).")
    return result
