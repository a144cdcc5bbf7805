"""Turn a checkpoint of the original TF1 code into a native one that every mode of bin/iaf.py reads."""

import os

import tensorflow as tf

from iaf_tf import checkpoints, files, tf1_checkpoint
from iaf_tf import config as cfg_lib
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


def convert(tf1_path, logdir, config=None):
    """Write logdir/train/ckpt-<global_step> from a TF1 checkpoint; returns (path, config).

    `config` given: its architecture must agree with the checkpoint's (CheckpointError otherwise).
    """
    prefix = checkpoints.resolve(tf1_path)
    train_dir = os.path.join(logdir, "train")
    if checkpoints.find_all(train_dir) or cfg_lib.read_run_config(train_dir):
        raise CheckpointError(f"{train_dir} already holds a run; convert into a new --logdir")
    files.check_writable(train_dir)
    if config is None:
        config = config_from_checkpoint(tf1_checkpoint.read(prefix))
    state = checkpoints.TrainState(config)
    checkpoints.restore(state, prefix)
    manager = tf.train.CheckpointManager(state.checkpoint, train_dir, max_to_keep=None)
    path = manager.save(checkpoint_number=int(state.step.numpy()))
    files.write_atomically(os.path.join(train_dir, cfg_lib.RUN_CONFIG), cfg_lib.run_config_text(
        config, [f"# converted from {prefix}; the architecture was read off it"]))
    return path, config
