"""Turn a checkpoint of the original TF1 code into a native one that every mode of bin/iaf.py reads."""

import os

import tensorflow as tf

from iaf_tf import tf1_checkpoint
from iaf_tf.hparams import get_default_hparams


def hparams_from_checkpoint(ckpt, base=None):
    """`base` (default: the original defaults) with the architecture read off the checkpoint."""
    arch = ckpt.architecture()
    base = base or get_default_hparams()
    levels = arch["level_depths"]
    shape = dict(depth=len(levels), num_blocks=levels[0], depths="") if len(set(levels)) == 1 else \
        dict(depths="-".join(map(str, levels)))
    return base.replace(h_size=arch["h_size"], z_size=arch["z_size"], depth_ar=arch["depth_ar"], **shape)


def load_tf1_into_trainer(trainer, ckpt):
    """Raw weights into the model, moving averages into the averages, Adamax slots into the optimizer."""
    variables = tf1_checkpoint.load_into_model(trainer.model, ckpt, weights="raw")
    for name, var in variables.items():
        if name in ckpt.ema:
            trainer.averages.shadow_for(var).assign(ckpt.ema[name])
        if name in ckpt.adamax_mean and name in ckpt.adamax_max:
            first_moment, running_max = trainer.optimizer.slots_for(var)
            first_moment.assign(ckpt.adamax_mean[name])
            running_max.assign(ckpt.adamax_max[name])
    trainer.step.assign(ckpt.global_step)
    trainer.optimizer.iterations.assign(ckpt.global_step)


def convert(tf1_path, logdir, hps=None):
    """Write logdir/train/ckpt-<global_step> from a TF1 checkpoint; returns (path, hps).

    `hps` given: it must agree with the checkpoint's architecture (CheckpointError otherwise).
    """
    from iaf_tf.train import Trainer  # heavy import, only when converting

    ckpt = tf1_checkpoint.read_tf1_checkpoint(tf1_path)
    if hps is None:
        hps = hparams_from_checkpoint(ckpt)
    tf1_checkpoint.check_compatible(ckpt, hps)
    trainer = Trainer(hps, tf.distribute.get_strategy())
    load_tf1_into_trainer(trainer, ckpt)
    train_dir = os.path.join(logdir, "train")
    manager = tf.train.CheckpointManager(trainer.checkpoint, train_dir, max_to_keep=None)
    return manager.save(checkpoint_number=ckpt.global_step), hps
