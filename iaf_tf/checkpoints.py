"""What a run holds (`TrainState`), how checkpoints are found (`resolve`) and loaded (`restore`).

Native checkpoints save every variable under the original's scope names (`x_enc/V`, `IAF_0_1/up_conv1/g`,
`h_top`, ...), both the weights (`model/...`) and their moving averages (`averages/...`). Naming them
explicitly, rather than through Keras' attribute tracking, keeps every weight in the checkpoint: Keras 3
lists of layers are not followed by tf.train.Checkpoint. Checkpoints of the original TF1 code are read
by iaf_tf.tf1_checkpoint; training, evaluation, sampling and the converter all load through `restore`.
"""

import os
import re

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
        self.model = CVAE(config, self.spec)
        self.model.build()
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


_NUMBERED = re.compile(r"^(?:model\.)?ckpt-(\d+)(?:\.index|\.data-\d+-of-\d+)?$")
# What reading a broken checkpoint raises (a truncated .data file: IndexError; a garbage .index: OpError).
_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, AssertionError)


def find_all(folder):
    """The checkpoints in a folder, newest (highest step) first: native `ckpt-N` and the original's
    `model.ckpt-N`, as a V2 prefix (with .index, or only its .data files left) or a V1 single file."""
    steps = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = _NUMBERED.match(name)
        if match:
            steps[os.path.join(folder, name[:match.end(1)])] = int(match.group(1))
    return sorted(steps, key=lambda prefix: -steps[prefix])


def named_in_state_file(folder):
    """What the folder's `checkpoint` state file names as the latest (as written), or None."""
    state = os.path.join(folder, "checkpoint")
    if not os.path.isfile(state):
        return None
    match = re.search(r'^model_checkpoint_path:\s*"(.*)"', open(state, errors="replace").read(), re.M)
    return match.group(1) if match else None


def _exists(prefix):
    """A checkpoint by this prefix (any name with its .index), or files of a numbered one (V1 file, .data)."""
    folder, name = os.path.split(prefix)
    return os.path.isfile(prefix + ".index") or bool(re.match(r"^(?:model\.)?ckpt-\d+$", name)) and os.path.isdir(
        folder or ".") and any(n == name or n.startswith(name + ".") for n in os.listdir(folder or "."))


def newest_readable(path, say=print, state_file_warning=True):
    """THE checkpoint policy: which checkpoint `path` means, for every mode and the Python API.

    `path` is a checkpoint (prefix, .index or V1 file: that one, which must read), or a folder or logdir
    (its train/): the newest checkpoint of the folder whose every tensor reads. `say` gets a warning for
    a `checkpoint` state file that does not name the newest file (the files are trusted) and for each newer
    checkpoint that was skipped as unreadable. None readable: CheckpointError naming each and why.
    """
    path = os.fspath(path).removesuffix(".index")
    if _exists(path):
        why = _unreadable(path)
        if why:
            raise CheckpointError(f"{path} cannot be read ({why}); restore a copy, or give another checkpoint")
        return path
    for folder in (os.path.join(path, "train"), path):
        found = find_all(folder)
        if found:
            return _newest_readable_in(folder, found, say, state_file_warning)
    raise CheckpointError(f"no checkpoint at {path}: give a checkpoint (like .../ckpt-300 or model.ckpt-3000), "
                          "a folder holding one, or a logdir with train/")


def _newest_readable_in(folder, found, say, state_file_warning):
    named = named_in_state_file(folder)
    # The original's released model comes as a lone file, without a state file: nothing to warn about.
    native = not os.path.basename(found[0]).startswith("model.")
    if state_file_warning and (os.path.basename(named or "") != os.path.basename(found[0])) and (named or native):
        say(f"warning: the 'checkpoint' state file of {folder} is missing or does not name the newest "
            f"checkpoint; trusting the files: {os.path.basename(found[0])} is the newest")
    failures = []
    for prefix in found:
        why = _unreadable(prefix)
        if why is None:
            for bad, bad_why in failures:
                say(f"warning: {bad} is unreadable ({bad_why}); using the newest readable checkpoint, "
                    f"{os.path.basename(prefix)}, instead")
            return prefix
        failures.append((prefix, why))
    raise CheckpointError(f"none of the checkpoints in {folder} can be read: "
                          + "; ".join(f"{os.path.basename(p)} ({why})" for p, why in failures)
                          + ". Nothing was changed; restore a copy, or use another --logdir")


_READABLE = {}  # prefix -> the sizes and times of its files when every tensor of it last read


def _unreadable(prefix):
    """None when every tensor of the checkpoint reads, else why not (one line)."""
    folder, name = os.path.split(prefix)
    try:
        stats = {n: os.stat(os.path.join(folder, n)) for n in os.listdir(folder or ".")
                 if n == name or n.startswith(name + ".")}
    except FileNotFoundError:  # removed while listed (a trainer keeps max_to_keep checkpoints)
        return "its files were removed while it was read"
    stamp = sorted((n, st.st_size, st.st_mtime_ns) for n, st in stats.items())
    if _READABLE.get(prefix) == stamp:
        return None
    try:
        reader = tf.train.load_checkpoint(prefix)
        for tensor in reader.get_variable_to_shape_map():
            reader.get_tensor(tensor)
    except _READ_ERRORS as e:
        lines = str(e).strip().splitlines()
        if isinstance(e, tf.errors.NotFoundError) and not os.path.isfile(prefix + ".index"):
            return "its .index file is missing"
        return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
    _READABLE[prefix] = stamp
    return None


def resolve(path):
    """The checkpoint `path` means, by the checkpoint policy (`newest_readable`), without warnings."""
    return newest_readable(path, say=lambda *_: None)


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
        _check_names(prefix, state)
        status = state.checkpoint.restore(prefix)
        if state.optimizer is None:
            status.expect_partial()  # the weights and averages are all there (_check_names); the rest is unused
        else:
            status.assert_consumed()
            # The checkpoint holds the optimizer's learning rate too; the config's is the one to use (it
            # may be changed on resume, e.g. after a non-finite stop).
            state.optimizer.learning_rate = state.config.optimization.learning_rate
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


def _check_names(prefix, state):
    """Every weight and average of the model is in the checkpoint with its shape, and the checkpoint has no
    weight the model lacks; otherwise one error naming the first offenders."""
    saved = dict(tf.train.list_variables(prefix))
    wanted = {}
    for section in ("model", "averages"):
        for name, var in named_variables(state.model).items():
            wanted[f"{section}/{name.replace('/', '.S')}/.ATTRIBUTES/VARIABLE_VALUE"] = list(var.shape)
    in_sections = {k for k in saved if k.split("/", 1)[0] in ("model", "averages")}
    problems = [f"{_readable(k)} is {saved[k]} in the checkpoint but {shape} in the model"
                for k, shape in wanted.items() if k in saved and list(saved[k]) != shape]
    problems += [f"{_readable(k)} is missing from the checkpoint" for k in wanted if k not in saved]
    problems += [f"{_readable(k)} is in the checkpoint but not in the model" for k in sorted(in_sections - set(wanted))]
    if problems:
        raise CheckpointError(f"{prefix} was written by another configuration: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                              + ". Pass the hpconfig the checkpoint was trained with.")


def _readable(key):
    return key.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE").replace(".S", "/")


def describe(prefix):
    """What a checkpoint is, for messages: its path, format and step."""
    if is_tf1(prefix):
        version = "V2" if os.path.isfile(prefix + ".index") else "V1"
        return f"{prefix} (a checkpoint of the original TF1 code, {version} format, step {_step(prefix)})"
    return f"{prefix} (native, step {_step(prefix)})"


def _step(prefix):
    match = _NUMBERED.match(os.path.basename(prefix))
    return int(match.group(1)) if match else "unknown"
