"""What bin/iaf.py runs: turns parsed flags into library calls and user errors into one clear line."""

import sys

from iaf_tf import checkpoints, data, hparams
from iaf_tf.devices import configure_cpu

MODES = ["train", "eval_test", "eval_train", "sample"]


def resolve_flags_hparams(flag_values):
    hps = hparams.resolve_hparams(flag_values.preset or None, flag_values.hpconfig)
    if flag_values.num_gpus is not None:
        hps = hps.replace(num_gpus=flag_values.num_gpus)
    return hps


def _run(flag_values):
    from iaf_tf import train  # imports TensorFlow models only once flags are known to be good

    hps = resolve_flags_hparams(flag_values)
    configure_cpu(max(1, flag_values.cpu_replicas), intra_op_threads=flag_values.threads)
    if flag_values.cpu_replicas and flag_values.cpu_replicas != hps.num_gpus:
        raise ValueError(f"--cpu_replicas={flag_values.cpu_replicas} must equal --num_gpus={hps.num_gpus}")
    if flag_values.mode == "train":
        config = train.TrainConfig(
            logdir=flag_values.logdir, max_steps=flag_values.max_steps,
            checkpoint_every=flag_values.checkpoint_every, summary_every=flag_values.summary_every,
            seed=flag_values.seed, cpu_replicas=flag_values.cpu_replicas, data_dir=flag_values.data_dir,
            strategy=flag_values.strategy, allow_download=flag_values.download)
        try:
            train.train(hps, config)
        except train.NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        return 0
    from iaf_tf import evaluate

    config = evaluate.EvalConfig(
        logdir=flag_values.logdir, mode=flag_values.mode, checkpoint=flag_values.checkpoint,
        once=flag_values.once, num_images=flag_values.num_images, seed=flag_values.seed,
        data_dir=flag_values.data_dir, allow_download=flag_values.download, poll_seconds=flag_values.poll_seconds,
        wait_seconds=flag_values.wait_seconds, num_samples=flag_values.num_samples,
        temperature=flag_values.temperature, progress=sys.stderr.isatty())
    if flag_values.mode == "sample":
        evaluate.run_sample(hps, config)
    else:
        evaluate.run_eval(hps, config)
    return 0


USER_ERRORS = (hparams.HParamsError, data.DataError, checkpoints.CheckpointError, ValueError)


def main(argv, flag_values):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        return _run(flag_values)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
