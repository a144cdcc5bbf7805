"""`--mode eval_<split>|sample|export`: evaluate, sample or export the moving-average weights of
checkpoints.

Like the original, evaluation watches `logdir/train` and evaluates each new checkpoint as it appears;
`once` evaluates the latest (or a given) checkpoint and returns. A checkpoint of the original TF1 code
is accepted wherever a native one is.
"""

import io
import json
import math
import os
import time

import numpy as np
import tensorflow as tf

from iaf_tf import api, checkpoints, datasets, files, images
from iaf_tf.errors import CheckpointError, ConfigError, NonFiniteError

NUM_PICTURES = 36  # per image summary, as the original


def _checkpoints_to_evaluate(config, say):
    """Yields checkpoint prefixes: the given/latest one, or each new one in logdir/train as it appears.
    Which one is the newest is the checkpoint policy's call (`checkpoints.newest_readable`)."""
    evaluation, logdir = config.evaluation, config.runtime.logdir
    if config.runtime.checkpoint or evaluation.once:
        yield checkpoints.newest_readable(config.runtime.checkpoint or logdir, say)
        return
    train_dir = os.path.join(logdir, "train")
    last, waited, said = None, 0.0, set()

    def say_once(message):  # the same unreadable checkpoint is met at every poll
        if message not in said:
            said.add(message)
            say(message)

    while True:
        try:
            # The state file is looked at once: a trainer writes it just after each new checkpoint.
            latest = checkpoints.newest_readable(train_dir, say_once, state_file_warning=last is None and not waited)
        except CheckpointError as e:
            latest = None
            if checkpoints.find_all(train_dir):
                say_once(f"warning: {e}")
        if latest and latest != last:
            last, waited = latest, 0.0
            yield latest
            continue
        if evaluation.wait_seconds and waited >= evaluation.wait_seconds:
            say(f"No new checkpoint in {train_dir} for {waited:.0f}s; stopping.")
            return
        say("Waiting for a new checkpoint..." if last else f"No checkpoint in {train_dir} yet. Waiting...")
        time.sleep(evaluation.poll_seconds)
        waited += evaluation.poll_seconds


def run_eval(config, split, print_fn=print, progress=False):
    """Evaluate checkpoints on a split of the dataset ("test", "train", "valid"...); returns the list of result
    dicts."""
    evaluation, logdir, seed = config.evaluation, config.runtime.logdir, config.runtime.seed
    spec = datasets.get(config.data.dataset)
    split_images = spec.load(split, config.data.image_size, config.data.data_dir,
                             allow_download=config.data.download, evaluation=True)
    if evaluation.num_images > len(split_images):
        raise ConfigError(f"invalid flag --num_images={evaluation.num_images}: the {spec.name} {split} split has "
                          f"{len(split_images)} images (0 = all of them)")
    if evaluation.num_images:
        split_images = split_images[:evaluation.num_images]
    trained = api.TrainedModel(config)
    mode = f"eval_{split}"
    out_dir = os.path.join(logdir, mode)
    k = config.objective.k
    writer = None
    results = []
    for prefix in _checkpoints_to_evaluate(config, print_fn):
        step = trained.load_weights(prefix)
        print_fn(f"Successfully loaded model at step={step} from {checkpoints.describe(prefix)}: its moving-average "
                 "weights.")
        begin = time.time()
        nll = trained.nll(split_images, k=k, seed=seed, progress=progress)
        seconds = time.time() - begin
        score = trained.score(nll)
        if not math.isfinite(score):
            raise NonFiniteError(f"the {spec.unit} of {prefix} on the {split} split is {score}: its weights are not "
                                 "usable; no result was written. Evaluate an older checkpoint with --checkpoint")
        print_fn(f"Step: {step} Score: {score:.4f}")
        result = {"step": step, "split": split, "k": k, spec.unit: score, "images": len(split_images),
                  "seconds": round(seconds, 3), "checkpoint": prefix, "seed": seed}
        with files.nothing_left_on_failure(out_dir, close=lambda: writer and writer.close()):
            writer = writer or tf.summary.create_file_writer(out_dir)
            with writer.as_default(step=step):
                tf.summary.scalar(f"eval_{spec.unit}", score)
            pictures = split_images[:NUM_PICTURES // 2]
            images.write_pictures(writer, out_dir, step, {
                "reconstructions": images.tile(images.interleave(pictures, trained.reconstruct(pictures, seed))),
                "samples": images.tile(trained.sample(NUM_PICTURES, seed=seed)),
            })
            writer.flush()
            files.write_atomically(os.path.join(out_dir, f"result-{step}.json"), json.dumps(result, indent=2))
        results.append(result)
    return results


def _load_usable(config, say, doing):
    """A TrainedModel holding the moving-average weights of the checkpoint the policy picks; weights that
    are not all finite are refused (exit 3, as an evaluation whose score is not finite)."""
    trained = api.TrainedModel(config)
    prefix = checkpoints.newest_readable(config.runtime.checkpoint or config.runtime.logdir, say)
    step = trained.load_weights(prefix)
    broken = [v.path for v in trained.model.variables if not np.isfinite(v.numpy()).all()]
    if broken:
        raise NonFiniteError(f"the moving-average weights of {prefix} are not finite ({len(broken)} variables, "
                             f"such as {broken[0]}): nothing was {doing}. Use an older checkpoint with --checkpoint")
    return trained, step


def run_sample(config, print_fn=print):
    """Write N prior samples of the latest (or given) checkpoint as a PNG grid and a uint8 .npy."""
    evaluation = config.evaluation
    trained, step = _load_usable(config, print_fn, "sampled")
    pictures = trained.sample(evaluation.num_samples, evaluation.temperature, config.runtime.seed)
    out_dir = os.path.join(config.runtime.logdir, "sample")
    stem = os.path.join(out_dir, f"samples-{step}-t{evaluation.temperature:g}")
    array = io.BytesIO()
    np.save(array, pictures)
    with files.nothing_left_on_failure(out_dir):
        images.write_png(stem + ".png", images.tile(pictures))
        files.write_atomically(stem + ".npy", array.getvalue())
    print_fn(f"Wrote {len(pictures)} samples of step {step} to {stem}.png and {stem}.npy")
    return stem


def run_export(config, print_fn=print):
    """Write a SavedModel of the latest (or given) checkpoint's moving-average weights (iaf_tf.export)."""
    from iaf_tf import export

    trained, step = _load_usable(config, print_fn, "exported")
    out_dir = export.export(trained, os.path.join(config.runtime.logdir, "export", f"step-{step}"))
    print_fn(f"Wrote a SavedModel of the moving-average weights of step {step} to {out_dir}")
    return out_dir
