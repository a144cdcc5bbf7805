"""The IAF-VAE of the original's TF1 system (`CVAE1`): a ladder of IAF layers between a 5x5 stride-2
encoder and decoder, with a discretized-logistic likelihood. NHWC throughout.

Noise comes from stateless RNG ops keyed by an explicit `seed` ([2] int tensor) so that a step, an
evaluation batch or a sample is reproducible and the same on every replica layout.
"""

import math

import keras
import tensorflow as tf

from iaf_tf import distributions as dist
from iaf_tf import noise as noise_streams
from iaf_tf import programs
from iaf_tf.block import IAFBlock
from iaf_tf.layers import WNConv2D
from iaf_tf.variables import Untracked


def input_to_unit_range(x):
    """uint8 pixels -> the original's centred inputs, (x + 0.5) / 256 - 0.5."""
    x = tf.cast(x, tf.float32)
    return tf.clip_by_value((x + 0.5) / 256.0, 0.0, 1.0) - 0.5


@keras.saving.register_keras_serializable(package="iaf_tf")
class CVAE(keras.Model):
    """The whole model, for one dataset spec (iaf_tf.datasets). `call` returns, per image of the k-fold
    repeated batch (each image repeated k times consecutively), the likelihood and the KL of each
    stochastic layer; the training objective is made from them in train.loss_fn.

    With the Bernoulli likelihood (binarized MNIST, the Theano system's `px=bernoulli`) the uint8 grey
    levels are binarized inside `call` by a Bernoulli draw keyed by `seed` (so every training step sees a
    fresh binarization; an image that is already 0/255 stays as it is, which is how a fixed evaluation
    binarization goes through), the decoder's single output channel is a logit map and `log_pxz` is the
    Bernoulli log-likelihood inside the spec's border: unlike the Theano code, the zero border that pads
    MNIST to 32x32 is seen by the encoder but not scored, so the NLL is in nats per MNIST image. The
    Bernoulli is evaluated from the logits (no clipping of probabilities to [1e-7, 1 - 1e-7] as in
    Theano); `dec_log_stdv` exists but is unused (it gets no gradient and stays 0).

    With mixed_precision the IAF blocks compute in bfloat16 (see IAFBlock). The input and output
    convolutions stay float32: they cost little, and the decoder's mean has to resolve 1/256-wide bins,
    which bfloat16 cannot do near +-0.5.
    """

    def __init__(self, config, spec, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.model_config = model_config = config.model
        self.spec = spec
        self.image_size = config.data.image_size
        self.channels = spec.channels
        self.border = spec.border
        self.bernoulli = spec.likelihood == dist.BERNOULLI
        self.num_dims = spec.num_dims(self.image_size)  # dimensions that the likelihood scores
        conv_dtype = tf.bfloat16 if config.runtime.mixed_precision else tf.float32
        self.x_enc = WNConv2D(model_config.h_size, (5, 5), (2, 2), name="x_enc")
        self.blocks = []
        self.block_index = []  # (level, block) of each entry of self.blocks, bottom-up
        for i, num_blocks in enumerate(model_config.level_depths):
            for j in range(num_blocks):
                self.blocks.append(IAFBlock(model_config, downsample=(i > 0 and j == 0), conv_dtype=conv_dtype,
                                            name=f"IAF_{i}_{j}"))
                self.block_index.append((i, j))
        self.x_dec = WNConv2D(self.channels, (5, 5), (2, 2), transpose=True, name="x_dec")
        self.h_top = self.add_weight(name="h_top", shape=[model_config.h_size], initializer="zeros",
                                     aggregation="mean")
        # The Bernoulli does not read it, but every model keeps the same set of named variables.
        self.dec_log_stdv = self.add_weight(name="dec_log_stdv", shape=[], initializer="zeros",
                                            aggregation="mean")
        self.top_size = self.image_size // 2 ** len(model_config.level_depths)
        self._block_programs = Untracked({})  # see _run_block

    def score(self, nll, per_image=False):
        """The dataset's reported number (bits/dim or nats/image) for per-image NLLs in nats (with
        `per_image`, one number per image)."""
        return self.spec.score(nll, self.image_size, per_image)

    def build(self, input_shape=None):
        """Create every variable from the configuration's shapes (whatever `input_shape` says) without running
        a call, in the order a first call uses them, so with the same initial values under a seed. Keras 3
        restores only into built models."""
        shape = (None, self.image_size, self.image_size, self.channels)
        self.x_enc.build(shape)
        shape = self.x_enc.compute_output_shape(shape)
        for block in self.blocks:
            shape = block.build_up(shape)
        shape = (None, self.top_size, self.top_size, self.model_config.h_size)
        for block in reversed(self.blocks):
            shape = block.build_down(shape)
        self.x_dec.build(shape)

    def get_config(self):
        # The whole config in the --hpconfig syntax; the spec is found again by the dataset's name.
        return dict(super().get_config(), hpconfig=self.config.to_hpconfig())

    @classmethod
    def from_config(cls, config):
        from iaf_tf import config as cfg_lib
        from iaf_tf import datasets

        config = dict(config)
        settings = cfg_lib.Config().parse(config.pop("hpconfig"))
        return cls(settings, datasets.get(settings.data.dataset), **config)

    def get_build_config(self):
        return {"input_shape": None}  # non-empty, or Keras would not build the model before loading weights

    def build_from_config(self, config):
        self.build()

    def _noise(self, seed, index, shape, temperature=1.0):
        # The same noise with and without XLA (see distributions.stateless_normal).
        noise = dist.stateless_normal(shape, dist.fold_in(seed, index))
        return noise * temperature  # exact for 1.0; a tensor temperature for the exported sampler

    def _top(self, n):
        h_top = tf.reshape(tf.convert_to_tensor(self.h_top), [1, 1, 1, -1])
        return tf.tile(h_top, [n, self.top_size, self.top_size, 1])

    def _decode(self, h, init=False):
        """(Decoder mean in [-0.5, 0.5], the likelihood's location parameter: the mean itself for the
        discretized logistic, the logits for the Bernoulli)."""
        out = self.x_dec(tf.nn.elu(h), init=init)
        if self.bernoulli:
            return tf.sigmoid(out) - 0.5, out
        mean = tf.clip_by_value(out, -0.5 + 1 / 512.0, 0.5 - 1 / 512.0)
        return mean, mean

    def _log_likelihood(self, location, x):
        if not self.bernoulli:
            return dist.discretized_logistic_log_prob(location, self.dec_log_stdv, x)
        b, size = self.border, self.image_size
        inside = (slice(None), slice(b, size - b), slice(b, size - b))
        return dist.bernoulli_log_prob(location[inside], tf.cast(x[inside] > 0, tf.float32))

    def _run_block(self, block, method, *args, **kwargs):
        """block.up(...) or block.down(...); in a traced function, a call of one program per kind of block.

        The blocks of a model differ only in their weights (and whether they downsample), so a block's pass
        is traced once, as a function of its weights, and every block of its kind calls it with its own:
        the README recipe's 20 blocks cost one block's tracing, Grappler and executor set-up instead of 20
        (BUILD.md, "Time to the first step"). `_noinline` keeps them calls. Eagerly (building, the
        data-dependent init), in XLA programs and when it is the only block of its kind, a block runs as itself.
        """
        built = all(conv.built for conv in block.named_convs().values())
        if (tf.executing_eagerly() or kwargs.get("init") or not built or programs.inside_xla()
                or not self._shares_a_program(block, method)):
            return getattr(block, method)(*args, **kwargs)
        key = (method, block.downsample, tuple(sorted(kwargs.items())), programs.enabled_now())
        program = self._block_programs.value.get(key)
        if program is None:
            def run(weights, *args):
                with block.given_weights(weights):
                    return getattr(block, method)(*args, **kwargs)
            program = tf.function(run, autograph=False, experimental_attributes={"_noinline": True})
            self._block_programs.value[key] = program
        return program(block.weight_tensors(), *args)

    def _shares_a_program(self, block, method):
        """Whether this pass of `block` calls its kind's program, traced: only when another block's pass
        calls it too (a program's call, its gradient functions and their separate optimization pay for
        themselves only when shared), and never for the top block's up pass, whose output is dropped, so
        that its last conv gets no gradient (as in TF1), where a program's gradient would give it zeros."""
        callers = self.blocks if method == "down" else self.blocks[:-1]
        kind = [other for other in callers if other.downsample == block.downsample]
        return len(kind) > 1 and any(other is block for other in kind)

    def call(self, images, seed, k=1, init=False):
        """uint8 images [n, H, W, C] -> {"mean": decoder means [n*k, H, W, C], "log_pxz": [n*k],
        "kl_layers": per layer (bottom-up) the map log q(z|x) - log p(z) [n*k, h, w, z_size],
        "kl": [n*k] their sum (the KL cost), "posterior": per layer the (mean, log-scale) of q(z|x)'s
        Gaussian before its IAF step [n*k, h, w, z_size]}."""
        if self.bernoulli:
            images = dist.binarize(images, dist.fold_in(seed, noise_streams.BINARIZE))
        x = input_to_unit_range(images)
        # Without noise in it (down_* posteriors), the bottom-up pass is the same for an image's k samples:
        # it runs once per image and its statistics are repeated (it is about a third of a pass's FLOPs).
        shared_up = k > 1 and not any(block.bottom_up for block in self.blocks)
        if k > 1 and not shared_up:
            x = tf.repeat(x, k, axis=0)
        n = tf.shape(x)[0]

        h = self.x_enc(x, init=init)
        up_stats = []
        for index, block in enumerate(self.blocks):
            noise = self._noise(seed, index, self._z_shape(n, index)) if block.bottom_up else None
            h, stats = self._run_block(block, "up", h, noise, init=init)
            up_stats.append(stats)
        if shared_up:
            x, up_stats = tf.nest.map_structure(lambda t: tf.repeat(t, k, axis=0), (x, up_stats))
            n = tf.shape(x)[0]

        h = self._top(n)
        kl_layers, posterior = [None] * len(self.blocks), [None] * len(self.blocks)
        for index in reversed(range(len(self.blocks))):
            block, stats = self.blocks[index], up_stats[index]
            noise = None if block.bottom_up else self._noise(seed, index, tf.shape(stats[0]))
            h, kl_layers[index], posterior[index] = self._run_block(block, "down", h, stats, noise, init=init)

        mean, location = self._decode(h, init=init)
        return {
            "mean": mean,
            "log_pxz": self._log_likelihood(location, x),
            "kl_layers": kl_layers,
            "kl": tf.add_n([tf.reduce_sum(kl_map, axis=[1, 2, 3]) for kl_map in kl_layers]),
            "posterior": [tuple(p) for p in posterior],
        }

    def initialize(self, images, seed):
        """Data-dependent initialization on one batch (the original's `init` model)."""
        self(images, seed, init=True)

    def _z_shape(self, n, index):
        size = self.image_size // 2 ** (self.block_index[index][0] + 1)
        return [n, size, size, self.model_config.z_size]

    def sample(self, num_images, seed, temperature=1.0):
        """Decoder means for z drawn from the prior, in [-0.5, 0.5]."""
        h = self._top(num_images)
        for index in reversed(range(len(self.blocks))):
            block = self.blocks[index]
            noise = self._noise(seed, index, self._z_shape(num_images, index), temperature)
            h, _, _ = self._run_block(block, "down", h, None, noise, sample_prior=True)
        return self._decode(h)[0]

    def named_convs(self):
        """Every weight-normed conv under the original's variable-scope name."""
        convs = {"x_enc": self.x_enc, "x_dec": self.x_dec}
        for block in self.blocks:
            convs.update({f"{block.name}/{n}": c for n, c in block.named_convs().items()})
        return convs


def count_trainable_parameters(model):
    return int(sum(math.prod(v.shape) for v in model.trainable_variables))


def to_uint8_images(mean):
    """Decoder means in [-0.5, 0.5] -> uint8 pixels (the bin whose centre is nearest)."""
    return tf.cast(tf.clip_by_value(tf.round((mean + 0.5) * 256.0 - 0.5), 0, 255), tf.uint8)
