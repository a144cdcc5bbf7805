"""Training: the objective (`loss_fn`), one step (`Trainer.train_step`), many steps in one host call
(`Trainer.train_loop`) and the loop (`train`).

A step is: per-replica loss and gradients -> one MEAN all-reduce (the original's tower averaging) ->
on every device, skip the update if anything is non-finite, else the moving averages (of the weights
before this update, as the original's) and Adamax.
"""

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import signal
import time

import tensorflow as tf

from iaf_tf import api, checkpoints, datasets, ema, files, optim, programs, run_record
from iaf_tf import images as images_lib
from iaf_tf import data as data_lib
from iaf_tf import distributions as dist
from iaf_tf.checkpoints import TrainState
from iaf_tf.devices import replica_devices
from iaf_tf.errors import CheckpointError, ConfigError, NonFiniteError
from iaf_tf.model import count_trainable_parameters
from iaf_tf.variables import local_copies, tf_variable


PICTURES, PICTURE_SCALE = 36, 4  # images per grid (half of them inputs, for reconstructions); enlargement


def free_bits_kl(kl_map, kl_min):
    """Per-image KL objective of one layer with the original's free bits: each channel's KL, summed over
    positions and averaged over the batch, is floored at kl_min; every image is charged the floored total."""
    if kl_min <= 0:
        return tf.reduce_sum(kl_map, axis=[1, 2, 3])
    per_channel = tf.reduce_mean(tf.reduce_sum(kl_map, axis=[1, 2]), axis=0)
    total = tf.reduce_sum(tf.maximum(per_channel, kl_min))
    return tf.fill([tf.shape(kl_map)[0]], total)


def loss_fn(model, images, seed, objective):
    """The original's objective on one replica's batch (summed over it), and the training summaries
    (means over the batch). `objective` is the config's objective section (kl_min, k)."""
    out = model(images, seed, k=objective.k)
    kl_obj_layers = [free_bits_kl(kl_map, objective.kl_min) for kl_map in out["kl_layers"]]
    kl_obj = tf.add_n(kl_obj_layers)
    loss = tf.reduce_sum(kl_obj - out["log_pxz"])
    nll = dist.importance_sampled_nll(out["log_pxz"], out["kl"], objective.k)
    metrics = {
        "bits_per_dim": dist.bits_per_dim(tf.reduce_mean(nll), 1, model.num_dims),
        model.spec.unit: model.score(nll),  # the dataset's reported unit (bits_per_dim again for CIFAR-10)
        "dec_log_stdv": tf.convert_to_tensor(model.dec_log_stdv),
        "kl_obj": tf.reduce_mean(kl_obj),
        "kl_cost": tf.reduce_mean(out["kl"]),
        "log_pxz": -tf.reduce_mean(out["log_pxz"]),
    }
    for (i, j), layer_obj, kl_map in zip(model.block_index, kl_obj_layers, out["kl_layers"]):
        metrics[f"kl_obj_{i:02d}_{j:02d}"] = tf.reduce_mean(layer_obj)
        metrics[f"kl_cost_{i:02d}_{j:02d}"] = tf.reduce_mean(tf.reduce_sum(kl_map, axis=[1, 2, 3]))
    return loss, metrics


class Trainer(TrainState):
    """A TrainState under a strategy, with the compiled training step and loop.

    A step is three parts: each replica's loss and gradients (`_gradients`, compiled with XLA when
    jit_compile is on), one MEAN all-reduce of gradients and summaries across replicas, and on every
    device copy of the state the update (`_update`: finiteness check, moving averages, Adamax). Keeping
    the all-reduce between two compiled functions is what lets jit_compile work under MirroredStrategy
    and MultiWorkerMirroredStrategy. With xla_programs (on GPUs by default) the update is compiled even
    without jit_compile: a dozen small element-wise ops for each of hundreds of variables, which XLA
    fuses into a few loops per variable; so are the weight norm and the noise (iaf_tf.programs).
    """

    def __init__(self, config, strategy=None):
        self.strategy = strategy or make_strategy(config.runtime)
        self.num_replicas = self.strategy.num_replicas_in_sync
        with self.strategy.scope():
            super().__init__(config)
        # The variables that get gradients: set when the gradient function is first traced. The top
        # block's last up-pass conv does not reach the loss; it gets no update, as in TF1.
        self._updated = None
        self.metric_names = None  # the order of train_loop's metrics vector, set when it is traced
        # No AutoGraph anywhere: nothing here has tensor-dependent Python control flow, and AutoGraph's
        # cache of converted functions once handed a test the conversion of another (freed) function.
        compiled = dict(autograph=False)
        self.xla_programs = uses_xla_programs(config.runtime)
        self._gradients = tf.function(self._gradients, jit_compile=config.runtime.jit_compile, **compiled)
        self._update = tf.function(self._update, jit_compile=config.runtime.jit_compile or self.xla_programs,
                                   **compiled)
        self.train_step = tf.function(self.train_step, **compiled)
        self.train_loop = tf.function(self.train_loop, **compiled)

    def train_step(self, batch):
        """One step on a distributed batch; returns (metrics averaged over replicas, whether applied)."""
        step = self.step.read_value()
        grads, metrics = self.strategy.run(self._replica_gradients, args=(batch, step))
        grads, metrics = self._all_reduce(grads, metrics)
        applied = self._update_every_copy(grads, metrics["objective"])
        self.step.assign_add(1)
        self.skipped.assign_add(1 - tf.cast(applied, tf.int64))
        return metrics, applied

    def train_loop(self, batches, num_steps):
        """`num_steps` steps from the distributed iterator `batches` in one call from the host. Returns the
        last step's metrics as one vector (in the order of `self.metric_names`, so that the host reads
        them at once) and whether each step was applied. Nothing in the loop's condition depends on the
        steps, so a GPU can run them back to back; the host judges the skips afterwards."""
        metrics, applied = self.train_step(next(batches))
        flags = tf.TensorArray(tf.bool, size=num_steps).write(0, applied)

        def another(done, flags, _):
            metrics, applied = self.train_step(next(batches))
            return done + 1, flags.write(done, applied), self._packed(metrics)

        _, flags, packed = tf.while_loop(lambda done, *_: done < num_steps, another,
                                         (tf.constant(1), flags, self._packed(metrics)))
        return packed, flags.stack()

    def _packed(self, metrics):
        self.metric_names = sorted(metrics)
        return tf.stack([metrics[name] for name in self.metric_names])

    def _replica_gradients(self, images, step):
        # The replica's noise seed is made here, outside the compiled function, which is traced once per
        # device: a seed made inside it could be one replica's constant.
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.stack([tf.constant(self.config.runtime.seed, tf.int64),
                         step * self.num_replicas + tf.cast(replica, tf.int64)])
        return self._gradients(images, seed)

    def _gradients(self, images, seed):
        with programs.enabled(self.xla_programs):
            with tf.GradientTape() as tape:
                loss, metrics = loss_fn(self.model, images, seed, self.config.objective)
            grads = tape.gradient(loss, self.variables)
        self._updated = [i for i, g in enumerate(grads) if g is not None]
        return [grads[i] for i in self._updated], dict(metrics, objective=loss)

    def _all_reduce(self, grads, metrics):
        """The mean over replicas of gradients and summaries, in one batch (the original's tower averaging)."""
        names = sorted(metrics)
        values = list(grads) + [metrics[name] for name in names]
        destinations = [tf_variable(self.variables[i]) for i in self._updated] + [metrics[name] for name in names]
        reduced = self.strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.MEAN, list(zip(values, destinations)))
        grads = reduced[:len(grads)]
        metrics = {name: local_copies(value)[0] for name, value in zip(names, reduced[len(grads):])}
        return grads, metrics

    def _update_every_copy(self, grads, objective):
        """`_update` on each device's copy of the state (mirrored copies stay equal: every device applies
        the same reduced gradients); returns whether the update was applied."""
        weights = [tf_variable(self.variables[i]) for i in self._updated]
        state = [[local_copies(v) for v in group] for group in (
            weights,
            [tf_variable(self.optimizer.first_moments[i]) for i in self._updated],
            [tf_variable(self.optimizer.running_maxes[i]) for i in self._updated],
            [self.averages.shadow_for(self.variables[i]) for i in self._updated])]
        grads = [local_copies(g) for g in grads]
        learning_rate = tf.convert_to_tensor(self.optimizer.learning_rate)
        applied = []
        for device in range(len(grads[0])):
            with tf.device(state[0][0][device].device):
                applied.append(self._update([g[device] for g in grads], objective, learning_rate,
                                            *[[v[device] for v in group] for group in state]))
        self.optimizer.iterations.assign_add(tf.cast(applied[0], self.optimizer.iterations.dtype))
        return applied[0]

    def _update(self, grads, objective, learning_rate, weights, first_moments, running_maxes, shadows):
        """One device's update: skip it if anything is non-finite (or the norm is over skip_threshold);
        else clip, move the averages towards the weights before this update (as the original's: its EMA op
        reads the variables in the same step as Adamax writes them, and TF1 runs the read first), Adamax.
        Skipped by scalar selects that leave every value as it was, not by a branch (see optim.adamax_update)."""
        opt = self.config.optimization
        # Their global norm is finite exactly when every gradient is (short of float32 overflow of the
        # squares, far beyond any usable update): one check for all.
        norm = tf.linalg.global_norm(grads)
        usable = tf.logical_and(tf.math.is_finite(objective), tf.math.is_finite(norm))
        if opt.skip_threshold > 0:
            usable = tf.logical_and(usable, norm < opt.skip_threshold)
        clipped = grads
        if opt.grad_clip > 0:
            clipped, _ = tf.clip_by_global_norm(grads, opt.grad_clip, use_norm=norm)
        ema.move_towards(shadows, weights, 1.0 - self.averages.decay, usable)
        optim.adamax_update(clipped, weights, first_moments, running_maxes, learning_rate, self.optimizer.beta_1,
                            self.optimizer.beta_2, self.optimizer.epsilon, usable)
        return usable

    def initialize(self, images):
        """Data-dependent init on one replica-sized batch, then start the averages there."""
        with self.strategy.scope():
            self.model.initialize(tf.constant(images[:self.config.optimization.batch_size]),
                                  tf.constant([self.config.runtime.seed, -1], tf.int64))
            self.averages.reset()


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

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass
class StepRecord:
    """What `train` reports after each step to its `on_step` callback."""
    step: int
    seconds: float      # wall time of this step, data included (its share of the host call that ran it)
    images: int         # images in this step, all replicas
    applied: bool       # False for a skipped (non-finite) step
    steps_in_call: int = 1  # steps run by that host call (steps_per_loop, or fewer up to a boundary)


@dataclasses.dataclass
class TrainResult:
    step: int
    status: str         # "max_steps", "signal SIGTERM", ...
    metrics: dict       # the last step's, as floats
    skipped: int        # non-finite steps skipped over the whole run


def train(config, trainer=None, on_step=None, print_fn=print):
    """Train until max_steps (or SIGTERM/SIGINT), resuming from the newest readable checkpoint in
    logdir/train, or starting from `config.runtime.checkpoint` / a fresh initialization in an empty one.

    Everything that can be wrong with the inputs is checked before anything is written. `trainer`: a
    Trainer for `config` to use (default: a new one); `on_step(StepRecord)` is called after every step.
    """
    train_dir = os.path.join(config.runtime.logdir, "train")
    files.check_writable(train_dir)
    images = _training_images(config)
    trainer = trainer or Trainer(config)
    is_chief = _is_chief(trainer.strategy)
    say = print_fn if is_chief else (lambda *_: None)
    _check_start(train_dir, config.runtime.checkpoint)
    started_from = _load_start(trainer, train_dir, config.runtime.checkpoint, say)
    with files.RunLock(train_dir) if is_chief else contextlib.nullcontext():
        saver = _CheckpointWriter(trainer, train_dir, is_chief)
        say(f"Num trainable variables: {count_trainable_parameters(trainer.model)}")
        _restore_or_start(trainer, saver, images, say, started_from)
        if is_chief:
            run_record.record(train_dir, config, int(trainer.step.numpy()), say)
        log = _Log(trainer, train_dir, is_chief, say, images[:PICTURES // 2])
        status, metrics = _loop(trainer, images, saver, log, on_step)
        log.close()
        if status == "non_finite":
            kept = _roll_back(trainer, saver, log.streak_start)
            raise NonFiniteError(
                f"stopped at step {int(trainer.step.numpy())}: {log.consecutive_skips} consecutive steps had a "
                f"{log.skip_reason} (max_skips={config.training.max_skips}). {kept} Try a lower "
                "learning_rate, grad_clip>0 or skip_threshold>0 in --hpconfig.")
    result = TrainResult(int(trainer.step.numpy()), status, {k: float(v) for k, v in metrics.items()},
                         int(trainer.skipped.numpy()))
    say(f"Stopped at step {result.step} ({status}).")
    return result


def _training_images(config):
    spec = datasets.get(config.data.dataset)
    return spec.load("train", config.data.image_size, config.data.data_dir, allow_download=config.data.download)


def _load_start(trainer, train_dir, start_from, say):
    """The --checkpoint a new run starts from, restored (so checked against the config) before anything is
    written; returns its prefix, or None."""
    if not start_from or checkpoints.find_all(train_dir):
        return None
    prefix = checkpoints.newest_readable(start_from, say)
    checkpoints.restore(trainer, prefix)
    return prefix


def _restore_or_start(trainer, saver, images, say, started_from):
    """Resume from the newest readable checkpoint of the run; in a folder with no checkpoint files at all,
    start from --checkpoint (already restored: `started_from`) or from the data-dependent init (saved as
    the first checkpoint)."""
    existing = checkpoints.find_all(saver.train_dir)
    if existing:
        prefix = checkpoints.newest_readable(saver.train_dir, say)
        checkpoints.restore(trainer, prefix)
        saver.saved_step = int(trainer.step.numpy())
        say(f"Resumed from {prefix} at step {saver.saved_step}")
        return
    if started_from:
        step = int(trainer.step.numpy())
        say(f"Starting a new run from {checkpoints.describe(started_from)}: weights, moving averages, optimizer "
            f"state and step {step}")
        saver.save(step)
        return
    say("Initializing parameters.")
    config = trainer.config
    global_batch = config.optimization.batch_size * trainer.num_replicas
    first = next(iter(data_lib.train_dataset(images, global_batch, config.runtime.seed)))
    trainer.initialize(first.numpy())
    saver.save(0)
    say("Initialized!")


def _check_start(train_dir, start_from):
    """Refuse, before anything is written, what training cannot do with the checkpoints in train_dir."""
    existing = checkpoints.find_all(train_dir)
    original = [p for p in existing if os.path.basename(p).startswith("model.ckpt-")]
    if original:
        raise CheckpointError(
            f"{train_dir} holds checkpoints of the original TF1 code ({os.path.basename(original[0])}): train "
            f"from them in a new logdir with --checkpoint {original[0]} --logdir NEW, or convert them with "
            f"--mode convert --checkpoint {original[0]} --logdir NEW (bin/convert_checkpoint.py)")
    if existing:
        checkpoints.newest_readable(train_dir, say=lambda *_: None)  # none readable: refused before the lock
    if existing and start_from:
        raise CheckpointError(f"--checkpoint {start_from} starts a new run, but {train_dir} already holds one: drop "
                              "--checkpoint to resume it, or choose another --logdir")


def _roll_back(trainer, saver, streak_start):
    """After a non-finite stop: the update just before the first non-finite step may be what broke the
    weights, so make the newest checkpoint hold the weights of one saved before it. Returns what to say."""
    final_step, skipped = int(trainer.step.numpy()), int(trainer.skipped.numpy())
    good = [p for p in checkpoints.find_all(saver.train_dir) if _step_of(p) < streak_start - 1]
    if not good:
        saver.save_if_unsaved(final_step)
        return (f"No checkpoint from before step {streak_start - 1} is left; ckpt-{final_step} holds the last "
                "weights, which may be the broken ones.")
    checkpoints.restore(trainer, good[0])
    trainer.step.assign(final_step)
    trainer.skipped.assign(skipped)
    saver.save(final_step)
    return (f"ckpt-{final_step}, the newest checkpoint in {saver.train_dir}, holds the weights of {good[0]} "
            f"(from before the last update ahead of the first non-finite step, {streak_start}).")


def _step_of(prefix):
    return int(prefix.rsplit("-", 1)[1])


def _loop(trainer, images, saver, log, on_step):
    """Steps until max_steps, a signal or too many non-finite steps; returns (status, last metrics).
    Each host call runs up to steps_per_loop steps on the device and ends at the next step that logs,
    saves or writes pictures; the host waits for the device once per call."""
    training = trainer.config.training
    step = int(trainer.step.numpy())
    batches = replica_batches(trainer.strategy, images, trainer.config.optimization.batch_size,
                              trainer.config.runtime.seed, step)
    global_batch = trainer.config.optimization.batch_size * trainer.num_replicas
    status, metrics = "max_steps", {}
    with _StopRequest() as stop:
        while not training.max_steps or step < training.max_steps:
            begin = time.time()
            packed, applied = trainer.train_loop(batches, tf.constant(_steps_to_boundary(step, training, log)))
            applied = applied.numpy()
            metrics = dict(zip(trainer.metric_names, packed.numpy()))
            seconds = (time.time() - begin) / len(applied)
            for flag in applied:
                step += 1
                log.step(step, bool(flag), global_batch)
                if on_step:
                    on_step(StepRecord(step, seconds, global_batch, bool(flag), len(applied)))
            log.report(step, metrics)
            if log.gave_up:
                status = "non_finite"
                break
            if step % training.checkpoint_every == 0:
                saver.save(step)
            if stop.signal is not None:
                status = f"signal {signal.Signals(stop.signal).name}"
                break
        saver.save_if_unsaved(step)
    return status, metrics


def _steps_to_boundary(step, training, log):
    """Steps for the next host call: steps_per_loop, cut at the next step that logs, saves, writes pictures
    or stops; one at a time for the first console lines."""
    if log.calls_reported < log.FIRST_LINES:
        return 1
    count = training.steps_per_loop
    for every in (training.summary_every, training.checkpoint_every, training.image_every):
        if every:
            count = min(count, every - step % every)
    if training.max_steps:
        count = min(count, training.max_steps - step)
    return count


class _Log:
    """The console lines and TensorBoard summaries of the training loop."""

    FIRST_LINES = 10  # the first steps of a run are logged one by one

    def __init__(self, trainer, train_dir, is_chief, say, pictures):
        self.trainer = trainer
        self.train_dir = train_dir
        self.say = say
        # Training images to reconstruct; none on other workers than the chief, which writes nothing.
        self.pictures = pictures if is_chief else None
        self.image_every = trainer.config.training.image_every
        self.summary_every = trainer.config.training.summary_every
        self.unit = trainer.spec.unit
        self.writer = tf.summary.create_file_writer(train_dir) if is_chief else tf.summary.create_noop_writer()
        self.consecutive_skips = 0
        self.max_skips = trainer.config.training.max_skips
        self.gave_up = False  # max_skips steps in a row were skipped
        self.streak_start = None  # the first step of the current run of skipped steps
        self.skip_reason = "non-finite loss or gradient" + (
            " or gradient norm over skip_threshold" if trainer.config.optimization.skip_threshold else "")
        self.skipped = int(trainer.skipped.numpy())
        self.calls_reported = 0
        self.line_start = self.window_start = time.time()
        self.window_images = 0

    def step(self, step, applied, images):
        """After each step: count it, and say so when its update was skipped."""
        self.window_images += images
        if not applied:
            self.skipped += 1
        if self.gave_up:  # a host call may run past max_skips; the first such streak is the one to report
            return
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        self.gave_up = self.consecutive_skips >= self.max_skips
        if self.consecutive_skips == 1:
            self.streak_start = step
        if self.consecutive_skips:
            self.say(f"Iteration {step}: {self.skip_reason}, update skipped ({self.consecutive_skips} "
                     f"in a row, {self.skipped} in all)")

    def report(self, step, metrics):
        """After each host call, with the metrics of its last step."""
        if self.calls_reported < self.FIRST_LINES or step % self.summary_every == 0:
            score = f"{float(metrics[self.unit]):.2f}" if self.unit == "nats_per_image" \
                else f"{float(metrics[self.unit]):.4f}"
            self.say(f"Iteration {step}, time = {time.time() - self.line_start:.2f}s, train {self.unit} = {score}, "
                     f"dec_log_stdv = {float(metrics['dec_log_stdv']):.4f}")
            self.line_start = time.time()
        if step % self.summary_every == 0 or self.consecutive_skips:
            self._summaries(step, metrics)
        if self.image_every and step % self.image_every == 0 and self.pictures is not None:
            self._write_pictures(step)
        self.calls_reported += 1

    def _summaries(self, step, metrics):
        elapsed = time.time() - self.window_start
        with self.writer.as_default(step=step):
            for name, value in metrics.items():
                if name != "objective":
                    tf.summary.scalar(f"model/{name}", value)
            if elapsed > 0:
                tf.summary.scalar("images_per_second", self.window_images / elapsed)
            tf.summary.scalar("train/skipped_steps", self.skipped)
        self.writer.flush()
        self.window_start, self.window_images = time.time(), 0

    def _write_pictures(self, step):
        """Reconstructions and prior samples of the moving-average weights, what evaluation will score."""
        seed = self.trainer.config.runtime.seed
        with self.trainer.averages.swapped_in():
            grids = {"reconstructions": images_lib.interleave(
                         self.pictures, api.reconstructions(self.trainer.model, self.pictures, seed)),
                     "samples": api.samples(self.trainer.model, PICTURES, seed=seed)}
        images_lib.write_pictures(self.writer, self.train_dir, step,
                                  {name: images_lib.tile(grid) for name, grid in grids.items()}, scale=PICTURE_SCALE)
        self.writer.flush()

    def close(self):
        self.writer.close()


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


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    return task_type in (None, "chief") or (task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


class _CheckpointWriter:
    """Saves on every worker (saving may need all of them), keeps only the chief's copy."""

    def __init__(self, trainer, train_dir, is_chief):
        self.train_dir = train_dir
        self.is_chief = is_chief
        task_id = getattr(getattr(trainer.strategy, "cluster_resolver", None), "task_id", 0)
        self._dir = train_dir if is_chief else os.path.join(train_dir, f".worker{task_id}_tmp")
        self._manager = tf.train.CheckpointManager(trainer.checkpoint, self._dir,
                                                   max_to_keep=trainer.config.training.max_to_keep)
        self.saved_step = None

    @property
    def latest(self):
        return tf.train.latest_checkpoint(self.train_dir)

    def save(self, step):
        """Write ckpt-<step>; on any failure (a full disk, a signal) remove what this save wrote, so the
        previous checkpoint stays the latest and no temporary folder is left."""
        prefix = os.path.join(self._dir, f"ckpt-{step}")
        before = set(glob.glob(prefix + "[._]*"))
        try:
            self._manager.save(checkpoint_number=step)
        except BaseException as e:
            for path in set(glob.glob(prefix + "[._]*")) - before:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            if isinstance(e, (tf.errors.ResourceExhaustedError, OSError)):
                raise CheckpointError(f"cannot write checkpoint {prefix}: {e}; nothing of it is left, and "
                                      f"{self.latest or 'no checkpoint'} is still the latest") from e
            raise
        if not self.is_chief:
            tf.io.gfile.rmtree(self._dir)
        self.saved_step = step

    def save_if_unsaved(self, step):
        if self.saved_step != step:
            self.save(step)
