"""What bin/iaf.py and the `iaf-tf` command run: flags in, library calls out, and every way a run can end
as a documented exit code with at most one `error:` line (README, "Exit codes")."""

import os
import signal
import sys
import threading
import traceback

from iaf_tf import errors  # no TensorFlow here: its log level is set in run() before it is imported

# eval_<split> for every split of some dataset (a dataset refuses the splits it does not have).
MODES = ["train", "eval_test", "eval_train", "eval_valid", "sample", "export", "convert"]
EXIT_USER_ERROR, EXIT_NON_FINITE, EXIT_BUG = 2, 3, 1


def define_flags(flags):
    from iaf_tf import config

    flags.DEFINE_enum("mode", "train", MODES, "What to run.")
    config.define_flags(flags)


def _run(mode, cfg):
    from iaf_tf import convert, evaluate, files, train
    from iaf_tf.devices import configure_cpu

    runtime = cfg.runtime
    if mode == "convert" and not runtime.checkpoint:
        raise errors.ConfigError("--mode convert needs --checkpoint: the TF1 checkpoint to convert (a folder, or a "
                                 "prefix like model.ckpt-3000), and --logdir: a new folder for the native one")
    files.check_writable(os.path.join(runtime.logdir, "train" if mode in ("train", "convert") else mode))
    if runtime.strategy == "multi_worker":
        # MultiWorkerMirroredStrategy sets up its collective ops before TensorFlow starts, which listing the
        # CPU devices (configure_cpu) would do.
        if runtime.threads:
            import tensorflow as tf
            tf.config.threading.set_intra_op_parallelism_threads(runtime.threads)
    else:
        configure_cpu(max(1, runtime.cpu_replicas), intra_op_threads=runtime.threads)
    if mode == "train":
        train.train(cfg)
    elif mode == "sample":
        evaluate.run_sample(cfg)
    elif mode == "export":
        evaluate.run_export(cfg)
    elif mode == "convert":
        path, converted = convert.convert(runtime.checkpoint, runtime.logdir, cfg)
        print(f"wrote {path}")
        print(f"hpconfig: {converted.to_hpconfig()}")
    else:
        evaluate.run_eval(cfg, mode.split("_", 1)[1], progress=sys.stderr.isatty())


def _config(mode, flag_values):
    """The command line's settings on top of the run's record (iaf_tf.run_record)."""
    from iaf_tf import config, run_record

    given = config.given_on_command_line(flag_values)
    runtime = config.Config().replace(**{k: v for k, v in given.items() if k in ("logdir", "checkpoint")}).runtime
    if mode != "train":  # the record of the run at --checkpoint or --logdir, or the architecture of a TF1 checkpoint
        cfg, changes = run_record.config_for(runtime.checkpoint or runtime.logdir, given)
        for key, (old, new) in changes.items():
            print(f"{key}: {old} → {new} (given on the command line; the run recorded {old})")
        return cfg
    # Training prints and records what changed on resume (run_record.record).
    return run_record.for_training(os.path.join(runtime.logdir, "train"), given)


def _raise_on_signals():
    """From here on SIGINT and SIGTERM raise errors.Interrupted wherever the run is (the training loop
    catches them itself, to save a checkpoint and exit 0)."""
    def interrupt(signum, _frame):
        raise errors.Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    _deliver_swallowed_signals_again()


def _deliver_swallowed_signals_again():
    """A handler's exception raised inside a weakref callback or __del__ cannot propagate: Python hands it
    to sys.unraisablehook and goes on, and the signal would be lost. Send it again from a helper thread a
    moment later, by which time this hook has returned and it lands in ordinary code (or here again)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        swallowed = unraisable.exc_value
        while True:
            try:  # a signal can land in this hook too: catch it here, or it would be swallowed as well
                if isinstance(swallowed, errors.Interrupted):
                    resend = threading.Timer(0.01, signal.pthread_kill,
                                             (threading.main_thread().ident, swallowed.signum))
                    resend.daemon = True
                    resend.start()
                else:
                    previous(unraisable)
                return
            except errors.Interrupted as e:
                swallowed = e

    sys.unraisablehook = hook


def _exit_on_signals(code):
    """The work is done: a signal while the process tears down ends it at once with the run's code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os._exit(code))


def main(argv, flag_values):
    """Run one mode; returns the exit code."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        _quiet_python_logs(flag_values)
        _run(flag_values.mode, _config(flag_values.mode, flag_values))
    except errors.Interrupted as e:
        return _interrupted(e)
    except errors.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if errors.is_disk_full(e):
            print(f"error: no space left on the device of --logdir {flag_values.logdir}: "
                  f"{str(e).strip().splitlines()[0]}; free some and run again (checkpoints are intact)",
                  file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print("error: this is a bug in iaf-tf, not something you did; please report it with the traceback "
              "above and the command line", file=sys.stderr)
        return EXIT_BUG
    return 0


def _interrupted(e):
    print(f"error: stopped by {signal.Signals(e.signum).name} before the run finished; nothing half-written "
          "is left", file=sys.stderr)
    return 128 + e.signum


def _quiet_python_logs(flag_values):
    """No INFO lines from TensorFlow or absl unless --verbosity asks for them."""
    from absl import logging

    if not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run():
    """The `iaf-tf` console command (the same flags as bin/iaf.py)."""
    # TensorFlow's C++ log: level 3 also hides the cuInit failure of every host without a GPU (README,
    # "Log lines"); set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _raise_on_signals()
    try:
        from absl import app, flags

        from iaf_tf import config

        define_flags(flags)
        # absl's --help lists the main module's flags; ours are defined here, so make them its flags.
        for name in ["mode", "hpconfig", "preset"] + [s.name for s in config.SETTINGS.values() if s.flag]:
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
        app.run(_main_then_exit, flags_parser=_parse_flags)
    except errors.Interrupted as e:  # before main(): importing TensorFlow, parsing flags, absl's init callbacks
        sys.exit(_interrupted(e))


def _main_then_exit(argv):
    from absl import flags

    code = main(argv, flags.FLAGS)
    _exit_on_signals(code)
    # Everything is written and closed: end here. Python's own teardown puts the default signal
    # handlers back before TensorFlow's is done, and a SIGTERM then killed the process (exit -15)
    # instead of ending it with the run's code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parse_flags(argv):
    """absl's parsing, with its errors (an unknown flag, --max_steps=abc, --mode=evaluate) as one
    `error:` line and exit code 2 (absl's own ends with a FATAL line and exit code 1), and --help as 0."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; see {os.path.basename(argv[0])} --helpfull", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except SystemExit as e:  # --help and --helpfull: absl prints the flags, then exits 1, our code for a bug
        sys.exit(0 if e.code == 1 else e.code)
