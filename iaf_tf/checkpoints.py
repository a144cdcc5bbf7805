"""Native checkpoints: what they hold, under which names, and how each mode restores them.

Variables are saved under the original's scope names (`x_enc/V`, `IAF_0_1/up_conv1/g`, `h_top`, ...),
both for the weights (`model/...`) and their moving averages (`averages/...`). Naming them explicitly,
rather than through Keras' attribute tracking, keeps every weight in the checkpoint: Keras 3 lists of
layers are not followed by tf.train.Checkpoint.
"""

import os

import tensorflow as tf


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


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


def make_checkpoint(model, averages, **extra):
    """tf.train.Checkpoint of the weights and their averages (plus e.g. optimizer=, step=)."""
    named = named_variables(model)
    return tf.train.Checkpoint(model=named, averages={n: averages.shadow_for(v) for n, v in named.items()},
                               **extra)


def resolve(path):
    """A checkpoint prefix from a prefix, a logdir (its train/ folder) or a checkpoint folder."""
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


def check_shapes(prefix, checkpoint_names):
    """Name each variable whose saved shape differs from the model's ({key: shape} of the model)."""
    saved = dict(tf.train.list_variables(prefix))
    wrong = [f"{key} is {saved[key]} in the checkpoint but {list(shape)} in the model"
             for key, shape in checkpoint_names.items() if key in saved and list(saved[key]) != list(shape)]
    if wrong:
        raise CheckpointError(f"{prefix} was written by another configuration: " + "; ".join(wrong[:8])
                              + (f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else "")
                              + ". Pass the hpconfig the checkpoint was trained with.")


def saved_keys(model):
    """{checkpoint key: shape} of the weights as make_checkpoint names them."""
    return {f"model/{name.replace('/', '.S')}/.ATTRIBUTES/VARIABLE_VALUE": tuple(v.shape)
            for name, v in named_variables(model).items()}
