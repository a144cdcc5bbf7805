"""Likelihood evaluation with k importance samples per image, in memory that does not grow with k.

Each forward pass holds at most `max_batch` (image, sample) pairs; an image's k log-weights are folded
chunk by chunk into a running log-sum-exp, so k = 10,000 costs time, not memory.
"""

import math

import numpy as np
import tensorflow as tf
import tqdm

from iaf_tf import noise


def plan_chunks(k, max_batch):
    """(images per forward pass, samples per image per pass)."""
    if k <= max_batch:
        return max(1, max_batch // k), k
    return 1, max_batch


class Evaluator:
    """Compiled forward passes of one model for importance-sampled evaluation."""

    def __init__(self, model, jit_compile=False):
        self.model = model
        self._log_weights = tf.function(self._log_weights_fn, jit_compile=jit_compile, autograph=False)  # see Trainer

    def _log_weights_fn(self, images, seed, samples):
        out = self.model(images, seed, k=samples)
        return tf.reshape(out["log_pxz"] - out["kl"], [tf.shape(images)[0], samples])

    def nll(self, images, k=1, seed=0, max_batch=100, progress=False, desc="eval"):
        """Per-image -log p(x) bound (nats) for uint8 images [N, H, W, C]."""
        images = np.asarray(images)
        per_pass, samples = plan_chunks(k, max_batch)
        chunks = math.ceil(k / samples)
        result = np.empty(len(images), np.float64)
        bar = tqdm.tqdm(total=len(images) * k, unit="sample", desc=desc, disable=not progress, smoothing=0.1)
        for start in range(0, len(images), per_pass):
            batch = tf.constant(images[start:start + per_pass])
            total = tf.fill([batch.shape[0]], -np.inf)
            for chunk in range(chunks):
                count = min(samples, k - chunk * samples)
                log_w = self._log_weights(batch, noise.likelihood_key(seed, start, chunks, chunk), count)
                total = tf.reduce_logsumexp(tf.stack([total, tf.reduce_logsumexp(log_w, axis=1)]), axis=0)
                bar.update(batch.shape[0] * count)
            result[start:start + per_pass] = -(total.numpy().astype(np.float64) - math.log(k))
        bar.close()
        return result
