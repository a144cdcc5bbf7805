"""The training loop (`run`): resume or start a run, then steps until max_steps, a signal or too many
non-finite steps in a row, with checkpoints, summaries and pictures at their intervals."""

import contextlib
import dataclasses
import os
import signal
import time

import tensorflow as tf

from iaf_tf import checkpoints, datasets, distribute, files, run_record
from iaf_tf import data as data_lib
from iaf_tf.checkpoint_writer import CheckpointWriter, roll_back
from iaf_tf.errors import CheckpointError, NonFiniteError
from iaf_tf.model import count_trainable_parameters
from iaf_tf.signals import StopRequest
from iaf_tf.train import Trainer
from iaf_tf.train_log import PICTURES, TrainLog


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


def run(config, trainer=None, on_step=None, print_fn=print):
    """Train until max_steps (or SIGTERM/SIGINT), resuming from the newest readable checkpoint in
    logdir/train, or starting from `config.runtime.checkpoint` / a fresh initialization in an empty one.

    Everything that can be wrong with the inputs is checked before anything is written. `trainer`: a
    train.Trainer for `config` to use (default: a new one); `on_step(StepRecord)` is called after every step.
    """
    train_dir = os.path.join(config.runtime.logdir, "train")
    files.check_writable(train_dir)
    images = _training_images(config)
    trainer = trainer or Trainer(config)
    is_chief = distribute.is_chief(trainer.strategy)
    say = print_fn if is_chief else (lambda *_: None)
    _check_start(train_dir, config.runtime.checkpoint)
    started_from = _load_start(trainer, train_dir, config.runtime.checkpoint, say)
    with files.RunLock(train_dir) if is_chief else contextlib.nullcontext():
        saver = CheckpointWriter(trainer.state, train_dir, trainer.strategy, is_chief)
        say(f"Num trainable variables: {count_trainable_parameters(trainer.model)}")
        _restore_or_start(trainer, saver, images, say, started_from)
        if is_chief:
            run_record.record(train_dir, config, int(trainer.state.step.numpy()), say)
        log = TrainLog(trainer.state, train_dir, is_chief, say, images[:PICTURES // 2])
        streak = SkipStreak(config.training.max_skips)
        status, metrics = _loop(trainer, images, saver, log, streak, on_step, say)
        log.close()
        if status == "non_finite":
            kept = roll_back(trainer.state, saver, streak.start)
            remedy = ("a higher skip_threshold, a lower learning_rate or grad_clip>0" if
                      config.optimization.skip_threshold else "a lower learning_rate, grad_clip>0 or skip_threshold>0")
            raise NonFiniteError(
                f"stopped at step {int(trainer.state.step.numpy())}: {streak.length} consecutive steps had a "
                f"{log.skip_reason} (max_skips={config.training.max_skips}). {kept} Try {remedy} in --hpconfig.")
    result = TrainResult(int(trainer.state.step.numpy()), status, {k: float(v) for k, v in metrics.items()},
                         int(trainer.state.skipped.numpy()))
    say(f"Stopped at step {result.step} ({status}).")
    return result


def _training_images(config):
    spec = datasets.get(config.data.dataset)
    return spec.load("train", config.data.image_size, config.data.data_dir, allow_download=config.data.download)


def _loop(trainer, images, saver, log, streak, on_step, say):
    """Steps until max_steps, a signal or max_skips skipped steps in a row; returns (status, last metrics).
    Each host call runs up to steps_per_loop steps on the device and ends at the next step that logs,
    saves or writes pictures; the host waits for the device once per call."""
    training = trainer.config.training
    step = int(trainer.state.step.numpy())
    batches = distribute.replica_batches(trainer.strategy, images, trainer.config.optimization.batch_size,
                                         trainer.config.runtime.seed, step)
    global_batch = trainer.config.optimization.batch_size * trainer.num_replicas
    status, metrics = "max_steps", {}
    with StopRequest(say) as stop:
        while not training.max_steps or step < training.max_steps:
            begin = time.time()
            packed, applied = trainer.train_loop(batches, tf.constant(_steps_to_boundary(step, training, log)))
            applied = applied.numpy()
            metrics = dict(zip(trainer.metric_names, packed.numpy()))
            seconds = (time.time() - begin) / len(applied)
            for flag in applied:
                step += 1
                log.step(step, bool(flag), global_batch)
                if streak.add(step, bool(flag)):
                    log.skipped_update(step, streak.length)
                if on_step:
                    on_step(StepRecord(step, seconds, global_batch, bool(flag), len(applied)))
            log.report(step, metrics, in_a_skip_streak=streak.length > 0)
            if streak.too_long:
                status = "non_finite"
                break
            if step % training.checkpoint_every == 0:
                saver.save(step)
            if stop.signal is not None:
                status = f"signal {signal.Signals(stop.signal).name}"
                break
        saver.save_if_unsaved(step)
    return status, metrics


class SkipStreak:
    """The current run of skipped (non-finite) steps: training stops when it reaches max_skips."""

    def __init__(self, max_skips):
        self.max_skips = max_skips
        self.length = 0
        self.start = None  # its first step

    @property
    def too_long(self):
        return self.length >= self.max_skips

    def add(self, step, applied):
        """Count a step; returns whether it was skipped within the streak to report. A host call may run
        past max_skips: the first streak that long is the one to report, so it no longer changes."""
        if self.too_long:
            return False
        self.length = 0 if applied else self.length + 1
        if self.length == 1:
            self.start = step
        return self.length > 0


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


# ------------------------------------------------------------------- starting or resuming a run

def _load_start(trainer, train_dir, start_from, say):
    """The --checkpoint a new run starts from, restored (so checked against the config) before anything is
    written; returns its prefix, or None."""
    if not start_from or checkpoints.find_all(train_dir):
        return None
    prefix = checkpoints.newest_readable(start_from, say)
    checkpoints.restore(trainer.state, prefix)
    return prefix


def _restore_or_start(trainer, saver, images, say, started_from):
    """Resume from the newest readable checkpoint of the run; in a folder with no checkpoint files at all,
    start from --checkpoint (already restored: `started_from`) or from the data-dependent init (saved as
    the first checkpoint)."""
    if checkpoints.find_all(saver.train_dir):
        prefix = checkpoints.newest_readable(saver.train_dir, say)
        checkpoints.restore(trainer.state, prefix)
        saver.saved_step = int(trainer.state.step.numpy())
        say(f"Resumed from {prefix} at step {saver.saved_step}")
        return
    if started_from:
        step = int(trainer.state.step.numpy())
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
