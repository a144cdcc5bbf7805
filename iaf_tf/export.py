"""`--mode export`: a SavedModel of a checkpoint's moving-average weights that plain TensorFlow can use,
without iaf_tf installed (README, "Export").

Signatures:
- `score(images uint8 [N, H, W, C], seed int64 [])` -> {"nll": per-image negative ELBO in nats [N], and
  the same per image in the dataset's reported unit under its name: "bits_per_dim" (CIFAR-10) or
  "nats_per_image" (MNIST) [N]};
- `sample(num_images int32 [], temperature float32 [], seed int64 [])` -> {"images": uint8 [n, H, W, C]}.

Both draw their noise as iaf_tf does for the same seed (iaf_tf.noise): `sample` gives the images of
`iaf_tf.load(...).sample(n, seed=s)`, and `score` the `nll(images, k=1, seed=s)` of a batch of up to
eval_batch_size images.
"""

import os
import shutil

import tensorflow as tf

from iaf_tf import files, noise
from iaf_tf import distributions as dist
from iaf_tf.errors import ConfigError
from iaf_tf.model import to_uint8_images
from iaf_tf.variables import Untracked


class _Servable(tf.Module):
    def __init__(self, model):
        super().__init__(name="iaf_vae")
        # Not tracked: saving a tracked Keras model would also trace its own serving function. The
        # variables are tracked below instead.
        self._model = Untracked(model)
        shape = [None, model.image_size, model.image_size, model.channels]
        self.score = tf.function(self._score, input_signature=[tf.TensorSpec(shape, tf.uint8, name="images"),
                                                               tf.TensorSpec([], tf.int64, name="seed")])
        self.sample = tf.function(self._sample, input_signature=[
            tf.TensorSpec([], tf.int32, name="num_images"), tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int64, name="seed")])
        # A SavedModel holds the variables its functions read only if the module tracks them; the model's
        # masks are kept out of Keras' tracking on purpose, so collect what the traced functions capture.
        captured = {}
        for function in (self.score.get_concrete_function(), self.sample.get_concrete_function()):
            captured.update({id(v): v for v in function.variables})
        self.captured_variables = list(captured.values())

    def _score(self, images, seed):
        model = self._model.value
        shape = [model.image_size, model.image_size, model.channels]
        want = f"images must be uint8 [N, {', '.join(map(str, shape))}] with N >= 1"
        with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(images)[1:], shape, message=want),
                                      tf.debugging.assert_positive(tf.shape(images)[0], message=want)]):
            images = tf.identity(images)
        out = model(images, noise.likelihood_key(seed, 0, 1, 0))  # the first pass of a k=1 evaluation
        nll = dist.importance_sampled_nll(out["log_pxz"], out["kl"], 1)
        return {"nll": nll, model.spec.unit: model.score(nll, per_image=True)}

    def _sample(self, num_images, temperature, seed):
        with tf.control_dependencies([
                tf.debugging.assert_positive(num_images, message="num_images must be a positive number of images"),
                tf.debugging.assert_all_finite(temperature, "temperature must be finite (0 = the prior's mean)"),
                tf.debugging.assert_non_negative(temperature, message="temperature must be 0 or more")]):
            num_images, temperature = tf.identity(num_images), tf.identity(temperature)
        mean = self._model.value.sample(num_images, noise.key(seed, noise.SAMPLE), temperature)
        return {"images": to_uint8_images(mean)}


def export(trained, out_dir):
    """Write a SavedModel of `trained` (an api.TrainedModel with its weights loaded) to out_dir, which must
    not exist: an export is never replaced. On a failure nothing of it is left, nor a folder made for it."""
    out_dir = out_dir.rstrip("/")
    files.check_writable(out_dir, "--logdir")
    if os.path.exists(out_dir):
        raise ConfigError(f"{out_dir} already exists: an export is never replaced; remove it to export again, "
                          "or use another --logdir")
    servable = _Servable(trained.model)
    tmp = out_dir + ".tmp"
    with files.nothing_left_on_failure(os.path.dirname(out_dir)):
        try:
            tf.saved_model.save(servable, tmp, signatures={"score": servable.score, "sample": servable.sample})
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
