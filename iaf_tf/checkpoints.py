"""What a run holds (`TrainState`), how checkpoints are found (`resolve`) and loaded (`restore`).

Native checkpoints save every variable under the original's scope names (`x_enc/V`, `IAF_0_1/up_conv1/g`,
`h_top`, ...), both the weights (`model/...`) and their moving averages (`averages/...`). Naming them
explicitly, rather than through Keras' attribute tracking, keeps every weight in the checkpoint: Keras 3
lists of layers are not followed by tf.train.Checkpoint. Checkpoints of the original TF1 code are read
by iaf_tf.tf1_checkpoint; training, evaluation, sampling and the converter all load through `restore`.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from iaf_tf import datasets, tf1_checkpoint
from iaf_tf.ema import WeightAverages
from iaf_tf.errors import CheckpointError
from iaf_tf.model import CVAE
from iaf_tf.optim import OriginalAdamax


class TrainState:
    """The model, the moving averages of its weights, the optimizer (unless `with_optimizer` is False, as
    for evaluation) and the step counters, created under the current strategy's scope."""

    def __init__(self, config, with_optimizer=True):
        self.config = config
        self.spec = datasets.get(config.data.dataset)
        keras.utils.set_random_seed(config.runtime.seed)  # the initial directions V
        self.model = CVAE(config, self.spec).build_for(1)
        self.variables = list(self.model.trainable_variables)
        self.optimizer = None
        if with_optimizer:
            self.optimizer = OriginalAdamax(config.optimization.learning_rate)
            self.optimizer.build(self.variables)
        self.averages = WeightAverages(self.variables, config.optimization.ema_decay)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        named = named_variables(self.model)
        extra = {} if self.optimizer is None else {"optimizer": self.optimizer}
        self.checkpoint = tf.train.Checkpoint(
            model=named, averages={n: self.averages.shadow_for(v) for n, v in named.items()},
            step=self.step, skipped=self.skipped, **extra)


def named_variables(model):
    """The model's variables under their names in the original's checkpoints; every variable once."""
    variables = {"h_top": model.h_top, "dec_log_stdv": model.dec_log_stdv}
    for scope, conv in model.named_convs().items():
        for var in ("V", "g", "b"):
            variables[f"{scope}/{var}"] = getattr(conv, var)
    unnamed = {id(v) for v in model.variables} - {id(v) for v in variables.values()}
    if unnamed or len(variables) != len(model.variables):
        paths = [v.path for v in model.variables if id(v) in unnamed]
        raise RuntimeError(f"model.named_convs() misses variables {paths[:5]}: they would not be checkpointed")
    return variables


def resolve(path):
    """A checkpoint prefix (native or TF1) from a prefix, a checkpoint folder or a logdir (its train/)."""
    path = os.fspath(path)
    if os.path.exists(path + ".index"):
        return path
    for folder in (os.path.join(path, "train"), path):
        if os.path.isdir(folder):
            prefix = tf.train.latest_checkpoint(folder)
            if prefix:
                return prefix
    raise CheckpointError(f"no checkpoint at {path}: give a checkpoint prefix (like .../ckpt-300 or "
                          "model.ckpt-3000), a folder holding a 'checkpoint' file, or a logdir with train/")


def is_tf1(prefix):
    """True for a checkpoint written by the original TF1 code."""
    return any(name == "model/h_top" for name, _ in tf.train.list_variables(prefix))


def restore(state, prefix, weights="raw"):
    """Load a native or TF1 checkpoint into `state`; returns its step.

    Loads the weights, their averages, the step and, where the state has an optimizer, its slots (a
    training state must find every one of its variables in a native checkpoint). weights="ema" then puts
    the averages into the model's weights, as evaluation does.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if is_tf1(prefix):
        _restore_tf1(state, tf1_checkpoint.read(prefix))
    else:
        _check_shapes(prefix, state.model)
        status = state.checkpoint.restore(prefix)
        if state.optimizer is None:
            status.expect_partial().assert_existing_objects_matched()
        else:
            status.assert_consumed()
    if weights == "ema":
        state.averages.copy_to_weights()
    return int(state.step.numpy())


def _restore_tf1(state, ckpt):
    """The TF1 checkpoint's raw weights into the model, its moving averages into the averages, its Adamax
    slots into the optimizer."""
    tf1_checkpoint.check_compatible(ckpt, state.config.model)
    variables = named_variables(state.model)
    for kind, values in (("raw", ckpt.weights), ("ema", ckpt.ema)):
        missing = sorted(set(variables) - set(values))
        if missing:
            raise CheckpointError(f"{ckpt.path}: no {kind} values for {missing[:8]}")
    unused = sorted(set(ckpt.weights) - set(variables))
    if unused:
        raise CheckpointError(f"{ckpt.path}: weights the model has no place for: {unused[:8]}")
    for name, var in variables.items():
        value = np.asarray(ckpt.weights[name])
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"{ckpt.path}: {name} has shape {value.shape}, the model expects {tuple(var.shape)}")
        var.assign(value)
        state.averages.shadow_for(var).assign(ckpt.ema[name])
        if state.optimizer is not None and name in ckpt.adamax_mean and name in ckpt.adamax_max:
            first_moment, running_max = state.optimizer.slots_for(var)
            first_moment.assign(ckpt.adamax_mean[name])
            running_max.assign(ckpt.adamax_max[name])
    state.step.assign(ckpt.global_step)
    if state.optimizer is not None:
        state.optimizer.iterations.assign(ckpt.global_step)


def _check_shapes(prefix, model):
    """Name each variable whose saved shape differs from the model's."""
    saved = dict(tf.train.list_variables(prefix))
    wanted = {f"model/{name.replace('/', '.S')}/.ATTRIBUTES/VARIABLE_VALUE": tuple(v.shape)
              for name, v in named_variables(model).items()}
    wrong = [f"{key} is {saved[key]} in the checkpoint but {list(shape)} in the model"
             for key, shape in wanted.items() if key in saved and list(saved[key]) != list(shape)]
    if wrong:
        raise CheckpointError(f"{prefix} was written by another configuration: " + "; ".join(wrong[:8])
                              + (f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else "")
                              + ". Pass the hpconfig the checkpoint was trained with.")
