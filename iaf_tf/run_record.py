"""A run's record, `<logdir>/train/hparams.cfg`: its hyper-parameters in the --hpconfig syntax, one per line,
after a comment line for each change made on resume. This module is the one place that reads the record,
puts settings given on top of it, and writes it: training, eval, sample, export, conversion and
`iaf_tf.load` all get their configuration here."""

import os

from iaf_tf import checkpoints, files, tf1_checkpoint
from iaf_tf.config import HPARAM_KEYS, Config, _format
from iaf_tf.errors import CheckpointError, ConfigError

FILE = "hparams.cfg"


def read(folder):
    """The hyper-parameters recorded in a run folder (logdir/train), or None if it has none."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return None
    lines = open(path).read().splitlines()
    try:
        return Config().parse(",".join(s for s in map(str.strip, lines) if s and not s.startswith("#")))
    except ConfigError as e:
        raise ConfigError(f"{path} is not a valid run record ({e}); restore it or pass --hpconfig "
                          "in a new --logdir") from None


def text(cfg, history=()):
    """The record: a header, the history of changes as comments, then one key=value per line."""
    lines = ["# Hyper-parameters of this run, in the --hpconfig syntax (written by iaf-tf; eval, sample and "
             "resume read them).", *history]
    return "\n".join(lines + [f"{k}={_format(v)}" for k, v in cfg.hparams().items()]) + "\n"


def write(folder, cfg, history=()):
    files.write_atomically(os.path.join(folder, FILE), text(cfg, history))


def _history(folder):
    """The change lines ("# step N: ...") of a record."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return []
    return [line for line in open(path).read().splitlines() if line.startswith("# step ")]


def on_top_of(saved, given, source):
    """The recorded config with the given settings applied: (config, {key: (saved, given)} of the
    hyper-parameters that changed). A change of the architecture or dataset is refused."""
    merged = saved.replace(**given)
    old, new = saved.architecture(), merged.architecture()
    if old != new:
        attribute = next(a for a in old if old[a] != new[a])
        keys = ("depth", "num_blocks", "depths") if attribute == "level_depths" else (attribute,)
        key = next((k for k in keys if k in given), keys[0])
        raise ConfigError(f"{key}={_format(merged.get(key))} contradicts the run in {source}, which has "
                          f"{key}={_format(saved.get(key))}: a run's architecture and dataset cannot change; "
                          "drop it, or use another --logdir for a new run")
    changes = {k: (saved.get(k), merged.get(k)) for k in HPARAM_KEYS if saved.get(k) != merged.get(k)}
    return merged, changes


def for_training(train_dir, given):
    """The config a training run in train_dir uses: the record with `given` on top, or `given` on the
    defaults for a new run (`record` prints and writes what changed)."""
    saved = read(train_dir)
    return Config().replace(**given) if saved is None else on_top_of(saved, given, train_dir)[0]


def record(train_dir, config, step, say):
    """Write the run's hyper-parameters beside its checkpoints; on resume, record what changed."""
    saved = read(train_dir)
    history = _history(train_dir)
    if saved is not None:
        _, changes = on_top_of(saved, config.hparams(), train_dir)
        if not changes:
            return
        for key, (old, new) in changes.items():
            say(f"{key}: {old} → {new} (was saved in {train_dir})")
        history.append(f"# step {step}: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()))
    write(train_dir, config, history)


def config_for(path, given):
    """(config, {key: (recorded, given)}) for the weights at `path`: its run's record with `given` on top
    (a change of architecture refused), else the architecture of a TF1 checkpoint, else the defaults,
    with `given` on top."""
    folder = folder_of(path)
    saved = read(folder)
    if saved is not None:
        return on_top_of(saved, given, folder)
    try:
        prefix = checkpoints.resolve(path)
    except CheckpointError:
        return Config().replace(**given), {}  # no checkpoint yet: the caller says so, or waits
    base = Config()
    if checkpoints.is_tf1(prefix):
        from iaf_tf.convert import config_from_checkpoint
        base = config_from_checkpoint(tf1_checkpoint.read(prefix))
    return base.replace(**given), {}


def folder_of(path):
    """The folder whose record describes the checkpoint(s) at `path`."""
    path = os.fspath(path).removesuffix(".index")
    if os.path.isdir(path):
        return os.path.join(path, "train") if os.path.isdir(os.path.join(path, "train")) else path
    return os.path.dirname(os.path.abspath(path))
