"""Writing a run's checkpoints (`CheckpointWriter`): on every worker, kept only on the chief, and never
half-written; and, after a non-finite stop, rolling the newest one back to weights from before it (`roll_back`)."""

import glob
import os
import shutil

import tensorflow as tf

from iaf_tf import checkpoints
from iaf_tf.errors import CheckpointError


class CheckpointWriter:
    """Saves on every worker (saving may need all of them), keeps only the chief's copy."""

    def __init__(self, state, train_dir, strategy, is_chief):
        self.train_dir = train_dir
        self.is_chief = is_chief
        task_id = getattr(getattr(strategy, "cluster_resolver", None), "task_id", 0)
        self._dir = train_dir if is_chief else os.path.join(train_dir, f".worker{task_id}_tmp")
        self._manager = tf.train.CheckpointManager(state.checkpoint, self._dir,
                                                   max_to_keep=state.config.training.max_to_keep)
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


def roll_back(state, saver, streak_start):
    """After a non-finite stop: the update just before the first non-finite step may be what broke the
    weights, so make the newest checkpoint hold the weights of one saved before it. Returns what to say."""
    final_step, skipped = int(state.step.numpy()), int(state.skipped.numpy())
    good = [p for p in checkpoints.find_all(saver.train_dir) if _step_of(p) < streak_start - 1]
    if not good:
        saver.save_if_unsaved(final_step)
        return (f"No checkpoint from before step {streak_start - 1} is left; ckpt-{final_step} holds the last "
                "weights, which may be the broken ones.")
    checkpoints.restore(state, good[0])
    state.step.assign(final_step)
    state.skipped.assign(skipped)
    saver.save(final_step)
    return (f"ckpt-{final_step}, the newest checkpoint in {saver.train_dir}, holds the weights of {good[0]} "
            f"(from before the last update ahead of the first non-finite step, {streak_start}).")


def _step_of(prefix):
    return int(prefix.rsplit("-", 1)[1])
