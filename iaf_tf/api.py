"""Use a trained IAF-VAE from Python: load it from a run folder, a native checkpoint or one of the original
TF1 code, then score images, draw samples, reconstruct and encode. The CLI's eval and sample modes call
these same functions (README, "Use from Python").
"""

import math
import warnings

import numpy as np
import tensorflow as tf

from iaf_tf import checkpoints, noise, run_record
from iaf_tf import config as cfg_lib
from iaf_tf import distributions as dist
from iaf_tf import images as images_lib
from iaf_tf.errors import ArgumentError
from iaf_tf.likelihood import Evaluator


def load(path, weights="ema", hpconfig="", **settings):
    """A TrainedModel from a run folder (a logdir or its train/), a native checkpoint or a TF1 one.

    The checkpoint is the one every mode uses (`checkpoints.newest_readable`: a folder's newest readable
    checkpoint; a skipped one is a Python warning). The hyper-parameters come from the run's record
    (hparams.cfg), or off a TF1 checkpoint's shapes; `hpconfig` / `settings` change what may change (k,
    eval_batch_size, ...). weights="ema" (the default, what evaluation uses) loads the moving averages,
    "raw" the last weights.
    """
    given = dict(cfg_lib.parse_entries(hpconfig), **settings)
    prefix = checkpoints.newest_readable(path, say=lambda message: warnings.warn(message, stacklevel=3))
    trained = TrainedModel(config_for(path, given)[0])
    trained.load_weights(prefix, weights)
    return trained


config_for = run_record.config_for


class TrainedModel:
    """A model of `config` for evaluation (no optimizer), with what to do with it. Images are uint8
    [N, H, W, C] arrays, as the dataset loaders return them."""

    def __init__(self, config):
        self.config = config
        self.state = checkpoints.TrainState(config, with_optimizer=False)
        self.model = self.state.model
        self.step = None
        self.checkpoint = None
        self._evaluator = Evaluator(self.model, jit_compile=config.runtime.jit_compile)

    def load_weights(self, prefix, weights="ema"):
        """Load a checkpoint's moving-average ("ema") or last ("raw") weights; returns its step."""
        self.step = checkpoints.restore(self.state, prefix, weights=weights)
        self.checkpoint = prefix
        return self.step

    def nll(self, images, k=None, seed=0, progress=False):
        """Per-image negative log-likelihood bound in nats, from k importance samples (default: the
        config's k), in memory that does not grow with k."""
        images = self._checked(images)
        k = self.config.objective.k if k is None else k
        _check_count("k", k, "importance samples")
        return self._evaluator.nll(images, k=k, seed=seed, max_batch=self.config.evaluation.eval_batch_size,
                                   progress=progress, desc=f"k={k}")

    def _checked(self, images):
        """The images as a uint8 array of the model's shape; anything else (floats in [0, 1] would give a
        plausible but wrong number) is an ArgumentError."""
        array = images.numpy() if tf.is_tensor(images) else np.asarray(images)
        shape = (self.model.image_size, self.model.image_size, self.model.channels)
        want = f"uint8 images [N, {', '.join(map(str, shape))}] with N >= 1 (as the iaf_tf.datasets loaders give)"
        if array.dtype != np.uint8:
            hint = "; from floats in [0, 1]: (x * 255).round().astype(np.uint8)" if array.dtype.kind == "f" else ""
            raise ArgumentError(f"images must be {want}, got {array.dtype} {list(array.shape)}{hint}")
        if array.ndim != 4 or array.shape[1:] != shape or not len(array):
            raise ArgumentError(f"images must be {want}, got shape {list(array.shape)}")
        return array

    def score(self, nll):
        """The dataset's reported number for per-image NLLs: bits/dim (CIFAR-10) or nats/image (MNIST)."""
        return float(self.model.score(nll))

    def bits_per_dim(self, images, k=None, seed=0):
        return float(dist.bits_per_dim(self.nll(images, k, seed).sum(), len(images), self.model.num_dims))

    def sample(self, num_images, temperature=1.0, seed=0):
        """uint8 images decoded from z drawn from the prior (its noise scaled by `temperature`)."""
        _check_count("num_images", num_images, "images")
        if not isinstance(temperature, (int, float, np.number)) or not math.isfinite(temperature) \
                or temperature < 0:
            raise ArgumentError(f"temperature must be a finite number, 0 or more (0 = the prior's mean); "
                                f"got {temperature!r}")
        return images_lib.samples(self.model, num_images, temperature, seed)

    def reconstruct(self, images, seed=0):
        """uint8 decoder means for one posterior sample of each image."""
        return images_lib.reconstructions(self.model, self._checked(images), seed)

    def encode(self, images, seed=0):
        """The latent code: per stochastic layer, bottom-up, {"layer": (level, block), "mean", "log_scale"}
        of q(z|x)'s Gaussian before its IAF step ([N, h, w, z_size] arrays). A layer's posterior depends
        on the z drawn in the layers before it (`seed` keys those draws)."""
        out = self.model(tf.constant(self._checked(images)), noise.key(seed, noise.ENCODE))
        return [{"layer": index, "mean": mean.numpy(), "log_scale": log_scale.numpy()}
                for index, (mean, log_scale) in zip(self.model.block_index, out["posterior"])]


def _check_count(name, value, of):
    """A count the caller gives (k, num_images) must be a whole number >= 1 (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"{name} must be a whole number of {of}, 1 or more; got {value!r}")
