"""Turn a checkpoint of the original TF1 code into a native one that every mode of bin/iaf.py reads."""

import os

import tensorflow as tf

from iaf_tf import checkpoints, tf1_checkpoint
from iaf_tf.config import Config


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
    if config is None:
        config = config_from_checkpoint(tf1_checkpoint.read(prefix))
    state = checkpoints.TrainState(config)
    checkpoints.restore(state, prefix)
    manager = tf.train.CheckpointManager(state.checkpoint, os.path.join(logdir, "train"), max_to_keep=None)
    return manager.save(checkpoint_number=int(state.step.numpy())), config
