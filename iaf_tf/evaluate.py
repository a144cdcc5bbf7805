"""`--mode eval_test|eval_train|sample`: evaluate or sample the moving-average weights of checkpoints.

Like the original, evaluation watches `logdir/train` and evaluates each new checkpoint as it appears;
`once` evaluates the latest (or a given) checkpoint and returns. A checkpoint of the original TF1 code
is accepted wherever a native one is.
"""

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from iaf_tf import checkpoints, data, images, tf1_checkpoint
from iaf_tf import distributions as dist
from iaf_tf.ema import WeightAverages
from iaf_tf.likelihood import Evaluator
from iaf_tf.model import CVAE, to_uint8_images

NUM_PICTURES = 36  # per image summary, as the original


@dataclasses.dataclass
class EvalConfig:
    logdir: str
    mode: str = "eval_test"
    checkpoint: str | None = None   # a prefix or folder; default: watch logdir/train
    once: bool = False
    num_images: int = 0             # 0: the whole split
    seed: int = 0
    data_dir: str | None = None
    allow_download: bool = False
    poll_seconds: float = 60.0
    wait_seconds: float = 0.0       # >0: stop watching after this long without a new checkpoint
    progress: bool = True
    num_samples: int = 64           # --mode sample
    temperature: float = 1.0        # --mode sample
    print_fn: callable = print


class AveragedModel:
    """A built model with its moving averages, restorable from native or TF1 checkpoints."""

    def __init__(self, hps):
        self.hps = hps
        self.model = CVAE(hps).build_for(1)
        self.averages = WeightAverages(self.model.trainable_variables, hps.ema_decay)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self._checkpoint = checkpoints.make_checkpoint(self.model, self.averages, step=self.step)

    def restore(self, prefix):
        """Load a checkpoint and put its moving averages into the weights; returns its step."""
        if checkpoints.is_tf1(prefix):
            ckpt = tf1_checkpoint.read_tf1_checkpoint(prefix)
            tf1_checkpoint.load_into_model(self.model, ckpt, weights="ema")
            self.step.assign(ckpt.global_step)
        else:
            checkpoints.check_shapes(prefix, checkpoints.saved_keys(self.model))
            self._checkpoint.restore(prefix).expect_partial().assert_existing_objects_matched()
            self.averages.copy_to_weights()
        return int(self.step.numpy())


def _checkpoints_to_evaluate(config, say):
    """Yields checkpoint prefixes: the given/latest one, or each new one in logdir/train as it appears."""
    if config.checkpoint or config.once:
        yield checkpoints.resolve(config.checkpoint or config.logdir)
        return
    train_dir = os.path.join(config.logdir, "train")
    last, waited = None, 0.0
    while True:
        latest = tf.train.latest_checkpoint(train_dir) if os.path.isdir(train_dir) else None
        if latest and latest != last:
            last, waited = latest, 0.0
            yield latest
            continue
        if config.wait_seconds and waited >= config.wait_seconds:
            say(f"No new checkpoint in {train_dir} for {waited:.0f}s; stopping.")
            return
        say("Waiting for a new checkpoint..." if last else f"No checkpoint in {train_dir} yet. Waiting...")
        time.sleep(config.poll_seconds)
        waited += config.poll_seconds


def reconstructions(model, pictures, seed):
    """Inputs interleaved with the decoder means for posterior samples of them (uint8)."""
    out = model(tf.constant(pictures), tf.constant([seed, 1 << 30], tf.int64))
    return images.interleave(pictures, to_uint8_images(out["mean"]).numpy())


def prior_samples(model, num, seed, temperature=1.0):
    mean = model.sample(num, tf.constant([seed, (1 << 30) + 1], tf.int64), temperature)
    return to_uint8_images(mean).numpy()


def _write_pictures(writer, out_dir, step, named_grids):
    with writer.as_default(step=step):
        for name, grid in named_grids.items():
            tf.summary.image(name, grid[None], max_outputs=1)
            images.write_png(os.path.join(out_dir, f"{name}-{step}.png"), grid)


def _write_json(path, result):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def run_eval(hps, config):
    """Evaluate checkpoints on config.mode's split; returns the list of result dicts."""
    split = config.mode.split("_", 1)[1]
    split_images = data.load_eval_images(hps.dataset, split, config.data_dir, allow_download=config.allow_download)
    if config.num_images:
        split_images = split_images[:config.num_images]
    out_dir = os.path.join(config.logdir, config.mode)
    say = config.print_fn
    averaged = AveragedModel(hps)
    evaluator = Evaluator(averaged.model, jit_compile=hps.jit_compile)
    writer = None
    results = []
    for prefix in _checkpoints_to_evaluate(config, say):
        step = averaged.restore(prefix)
        say(f"Successfully loaded model at step={step} from {prefix}.")
        begin = time.time()
        nll = evaluator.nll(split_images, k=hps.k, seed=config.seed, max_batch=hps.eval_batch_size,
                            progress=config.progress, desc=f"{config.mode} k={hps.k}")
        seconds = time.time() - begin
        # CIFAR-10 is reported in bits/dim, binarized MNIST in nats per image, as in the paper.
        metric = "nats_per_image" if averaged.model.bernoulli else "bits_per_dim"
        score = float(nll.mean()) if averaged.model.bernoulli else float(
            dist.bits_per_dim(nll.sum(), len(nll), averaged.model.num_dims))
        say(f"Step: {step} Score: {score:.4f}")
        os.makedirs(out_dir, exist_ok=True)
        writer = writer or tf.summary.create_file_writer(out_dir)
        with writer.as_default(step=step):
            tf.summary.scalar(f"eval_{metric}", score)
        pictures = split_images[:NUM_PICTURES // 2]
        _write_pictures(writer, out_dir, step, {
            "reconstructions": images.tile(reconstructions(averaged.model, pictures, config.seed)),
            "samples": images.tile(prior_samples(averaged.model, NUM_PICTURES, config.seed)),
        })
        writer.flush()
        result = {"step": step, "split": split, "k": hps.k, metric: score, "images": len(split_images),
                  "seconds": round(seconds, 3), "checkpoint": prefix, "seed": config.seed}
        _write_json(os.path.join(out_dir, f"result-{step}.json"), result)
        results.append(result)
    return results


def run_sample(hps, config):
    """Write N prior samples of the latest (or given) checkpoint as a PNG grid and a uint8 .npy."""
    averaged = AveragedModel(hps)
    step = averaged.restore(checkpoints.resolve(config.checkpoint or config.logdir))
    pictures = prior_samples(averaged.model, config.num_samples, config.seed, config.temperature)
    out_dir = os.path.join(config.logdir, "sample")
    stem = os.path.join(out_dir, f"samples-{step}-t{config.temperature:g}")
    images.write_png(stem + ".png", images.tile(pictures))
    np.save(stem + ".npy", pictures)
    config.print_fn(f"Wrote {len(pictures)} samples of step {step} to {stem}.png and {stem}.npy")
    return stem
