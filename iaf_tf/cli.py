"""What bin/iaf.py and the `iaf-tf` command run: flags in, library calls out, user errors as one line."""

import os
import sys

from iaf_tf import errors  # no TensorFlow: its log level is set in run() before TensorFlow is imported

MODES = ["train", "eval_test", "eval_train", "sample"]


def define_flags(flags):
    from iaf_tf import config

    flags.DEFINE_enum("mode", "train", MODES, "What to run.")
    config.define_flags(flags)


def _run(mode, cfg):
    from iaf_tf import evaluate, train
    from iaf_tf.devices import configure_cpu

    runtime = cfg.runtime
    if runtime.cpu_replicas and runtime.cpu_replicas != runtime.num_gpus:
        raise errors.ConfigError(f"--cpu_replicas={runtime.cpu_replicas} must equal --num_gpus={runtime.num_gpus}")
    configure_cpu(max(1, runtime.cpu_replicas), intra_op_threads=runtime.threads)
    if mode == "train":
        train.train(cfg)
    elif mode == "sample":
        evaluate.run_sample(cfg)
    else:
        evaluate.run_eval(cfg, mode.split("_", 1)[1], progress=sys.stderr.isatty())


def main(argv, flag_values):
    from iaf_tf import config

    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        _run(flag_values.mode, config.from_flags(flag_values))
    except errors.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    """The `iaf-tf` console command (the same flags as bin/iaf.py)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app, flags

    from iaf_tf import config

    define_flags(flags)
    # absl's --help lists the main module's flags; ours are defined here, so make them the main module's.
    for name in ["mode", "hpconfig", "preset"] + [s.name for s in config.SETTINGS.values() if s.flag]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    app.run(lambda argv: main(argv, flags.FLAGS))
