"""`--mode convert`: turn a checkpoint of the original TF1 code into a native one that every mode of
bin/iaf.py reads."""

import os

import tensorflow as tf

from iaf_tf import checkpoints, files, run_record, tf1_checkpoint
from iaf_tf.config import Config
from iaf_tf.errors import CheckpointError


def config_from_checkpoint(ckpt, base=None):
    """`base` (default: the original defaults) with the architecture read off the checkpoint."""
    arch = ckpt.architecture()
    levels = arch["level_depths"]
    shape = dict(depth=len(levels), num_blocks=levels[0], depths="") if len(set(levels)) == 1 else \
        dict(depths="-".join(map(str, levels)))
    return (base or Config()).replace(h_size=arch["h_size"], z_size=arch["z_size"], depth_ar=arch["depth_ar"],
                                      **shape)


def convert(tf1_path, logdir, config=None, say=print):
    """Write logdir/train/ckpt-<global_step> and its record from a TF1 checkpoint (the one the checkpoint
    policy picks at `tf1_path`); returns (path, config). Nothing is written before every check has passed,
    and a failed write (a full disk) leaves nothing.

    `config` given: its architecture must agree with the checkpoint's (CheckpointError otherwise).
    """
    prefix = checkpoints.newest_readable(tf1_path, say)
    train_dir = os.path.join(logdir, "train")
    if checkpoints.find_all(train_dir) or run_record.read(train_dir):
        raise CheckpointError(f"{train_dir} already holds a run; convert into a new --logdir")
    files.check_writable(train_dir)
    if config is None:
        config = config_from_checkpoint(tf1_checkpoint.read(prefix))
    state = checkpoints.TrainState(config)
    checkpoints.restore(state, prefix)
    with files.nothing_left_on_failure(train_dir):
        manager = tf.train.CheckpointManager(state.checkpoint, train_dir, max_to_keep=None)
        path = manager.save(checkpoint_number=int(state.step.numpy()))
        run_record.write(train_dir, config, [f"# converted from {prefix}; the architecture was read off it"])
    return path, config
