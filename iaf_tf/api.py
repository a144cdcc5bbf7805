"""Use a trained IAF-VAE from Python: load it from a run folder, a native checkpoint or one of the original
TF1 code, then score images, draw samples, reconstruct and encode. The CLI's eval and sample modes call
these same functions (README, "Use from Python").
"""

import os

import tensorflow as tf

from iaf_tf import checkpoints, noise, tf1_checkpoint
from iaf_tf import config as cfg_lib
from iaf_tf import distributions as dist
from iaf_tf import images as images_lib
from iaf_tf.errors import CheckpointError
from iaf_tf.likelihood import Evaluator


def load(path, weights="ema", hpconfig="", **settings):
    """A TrainedModel from a run folder (a logdir or its train/), a native checkpoint or a TF1 one.

    The hyper-parameters come from the run's record (hparams.cfg), or off a TF1 checkpoint's shapes;
    `hpconfig` / `settings` change what may change (k, eval_batch_size, ...). weights="ema" (the default,
    what evaluation uses) loads the moving averages, "raw" the last weights.
    """
    given = dict(cfg_lib.parse_entries(hpconfig), **settings)
    trained = TrainedModel(config_for(path, given)[0])
    trained.load_weights(checkpoints.resolve(path), weights)
    return trained


def config_for(path, given):
    """(config, {key: (recorded, given)}) for the weights at `path`: its run's record with `given` on top
    (a change of architecture refused), else the architecture of a TF1 checkpoint, else the defaults,
    with `given` on top."""
    folder = run_folder(path)
    saved = cfg_lib.read_run_config(folder)
    if saved is not None:
        return cfg_lib.on_top_of(saved, given, folder)
    try:
        prefix = checkpoints.resolve(path)
    except CheckpointError:
        return cfg_lib.Config().replace(**given), {}  # no checkpoint yet: the caller says so, or waits
    base = cfg_lib.Config()
    if checkpoints.is_tf1(prefix):
        from iaf_tf.convert import config_from_checkpoint
        base = config_from_checkpoint(tf1_checkpoint.read(prefix))
    return base.replace(**given), {}


def run_folder(path):
    """The folder whose hparams.cfg describes the checkpoint(s) at `path`."""
    path = os.fspath(path).removesuffix(".index")
    if os.path.isdir(path):
        return os.path.join(path, "train") if os.path.isdir(os.path.join(path, "train")) else path
    return os.path.dirname(os.path.abspath(path))


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
        k = k or self.config.objective.k
        return self._evaluator.nll(images, k=k, seed=seed, max_batch=self.config.evaluation.eval_batch_size,
                                   progress=progress, desc=f"k={k}")

    def score(self, nll):
        """The dataset's reported number for per-image NLLs: bits/dim (CIFAR-10) or nats/image (MNIST)."""
        return float(self.model.score(nll))

    def bits_per_dim(self, images, k=None, seed=0):
        return float(dist.bits_per_dim(self.nll(images, k, seed).sum(), len(images), self.model.num_dims))

    def sample(self, num_images, temperature=1.0, seed=0):
        """uint8 images decoded from z drawn from the prior (its noise scaled by `temperature`)."""
        return images_lib.samples(self.model, num_images, temperature, seed)

    def reconstruct(self, images, seed=0):
        """uint8 decoder means for one posterior sample of each image."""
        return images_lib.reconstructions(self.model, images, seed)

    def encode(self, images, seed=0):
        """The latent code: per stochastic layer, bottom-up, {"layer": (level, block), "mean", "log_scale"}
        of q(z|x)'s Gaussian before its IAF step ([N, h, w, z_size] arrays). A layer's posterior depends
        on the z drawn in the layers before it (`seed` keys those draws)."""
        out = self.model(tf.constant(images), noise.key(seed, noise.ENCODE))
        return [{"layer": index, "mean": mean.numpy(), "log_scale": log_scale.numpy()}
                for index, (mean, log_scale) in zip(self.model.block_index, out["posterior"])]

