"""The training loop (`run`): resume or start a run, then steps until max_steps, a signal or too many
non-finite steps in a row, with checkpoints, summaries and pictures at their intervals."""

import contextlib
import dataclasses
import os
import signal
import time

import tensorflow as tf

from iaf_tf import checkpoints, datasets, distribute, files
from iaf_tf import config as cfg_lib
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
    with files.RunLock(train_dir) if is_chief else contextlib.nullcontext():
        saver = CheckpointWriter(trainer.state, train_dir, trainer.strategy, is_chief)
        say(f"Num trainable variables: {count_trainable_parameters(trainer.model)}")
        _restore_or_start(trainer, saver, images, say)
        if is_chief:
            _record_config(train_dir, config, int(trainer.state.step.numpy()), say)
        log = TrainLog(trainer.state, train_dir, is_chief, say, images[:PICTURES // 2])
        streak = SkipStreak(config.training.max_skips)
        status, metrics = _loop(trainer, images, saver, log, streak, on_step, say)
        log.close()
        if status == "non_finite":
            kept = roll_back(trainer.state, saver, streak.start)
            raise NonFiniteError(
                f"stopped at step {int(trainer.state.step.numpy())}: {streak.length} consecutive steps had a "
                f"non-finite loss or gradient (max_skips={config.training.max_skips}). {kept} Try a lower "
                "learning_rate, grad_clip>0 or skip_threshold>0 in --hpconfig.")
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


# ------------------------------------------------------- starting or resuming a run (moved as a block)

def _restore_or_start(trainer, saver, images, say):
    """Resume from the newest readable checkpoint of the run; in a folder with no checkpoint files at all,
    start from --checkpoint or from the data-dependent init (saved as the first checkpoint)."""
    existing = checkpoints.find_all(saver.train_dir)
    start_from = trainer.config.runtime.checkpoint
    if existing:
        prefix = _restore_newest_readable(trainer.state, saver.train_dir, existing, say)
        saver.saved_step = int(trainer.state.step.numpy())
        say(f"Resumed from {prefix} at step {saver.saved_step}")
        return
    if start_from:
        prefix = checkpoints.resolve(start_from)
        step = checkpoints.restore(trainer.state, prefix)
        say(f"Starting a new run from {checkpoints.describe(prefix)}: weights, moving averages, optimizer state "
            f"and step {step}")
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
            "bin/convert_checkpoint.py")
    if existing and start_from:
        raise CheckpointError(f"--checkpoint {start_from} starts a new run, but {train_dir} already holds one: drop "
                              "--checkpoint to resume it, or choose another --logdir")


def _restore_newest_readable(trainer, train_dir, existing, say):
    """Restore the newest checkpoint that reads; say which newer ones did not, and where the state file
    disagrees with the files. Returns the prefix restored."""
    named = checkpoints.named_in_state_file(train_dir)
    if named is None or os.path.basename(named) != os.path.basename(existing[0]):
        say(f"warning: the 'checkpoint' state file of {train_dir} is missing or does not name the newest "
            f"checkpoint; trusting the files: {os.path.basename(existing[0])} is the newest")
    failures = []
    for prefix in existing:
        try:
            checkpoints.restore(trainer, prefix)
            for bad, why in failures:
                say(f"warning: {bad} is unreadable ({why}); resumed from the newest readable checkpoint instead")
            return prefix
        except CheckpointError:
            raise
        except (tf.errors.OpError, ValueError, IndexError, AssertionError) as e:
            failures.append((prefix, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
    raise CheckpointError(f"none of the checkpoints in {train_dir} can be read: "
                          + "; ".join(f"{os.path.basename(p)} ({why})" for p, why in failures)
                          + ". Nothing was changed; restore a copy, or use another --logdir")


def _record_config(train_dir, config, step, say):
    """Write the run's hyper-parameters beside its checkpoints; on resume, record what changed."""
    saved = cfg_lib.read_run_config(train_dir)
    history = cfg_lib.run_config_history(train_dir)
    if saved is not None:
        _, changes = cfg_lib.on_top_of(saved, config.hparams(), train_dir)
        if not changes:
            return
        for key, (old, new) in changes.items():
            say(f"{key}: {old} → {new} (was saved in {train_dir})")
        history.append(f"# step {step}: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()))
    files.write_atomically(os.path.join(train_dir, cfg_lib.RUN_CONFIG), cfg_lib.run_config_text(config, history))
