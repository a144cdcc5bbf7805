"""Every noise stream of the project, in one table.

The model's noise is stateless: a draw is keyed by a [2] int64 tensor `[seed, stream]`, where `seed` is
the user's (`--seed`, `seed=`) and `stream` says what the draw is for. Whoever draws for the same purpose
uses the same key, so one seed gives the same samples, reconstructions and scores from the command line,
`iaf_tf.load` and the exported SavedModel. Inside one model call, each stochastic layer folds its index
(0, 1, ...) into the key, and the Bernoulli inputs' binarization folds in `BINARIZE`.
"""

import tensorflow as tf

# Likelihood evaluation: the draw for chunk c of the pass starting at image i (of `chunks` chunks per
# image) is stream i * chunks + c, so 0, 1, ...: the streams behind the reference numbers of the tests.
# Training steps use the same range (stream step * replicas + replica), keyed by the run's seed.
# Streams from 2**30 on are for the draws that are not scores, far above any image count.
RECONSTRUCTION = 1 << 30
SAMPLE = (1 << 30) + 1
ENCODE = (1 << 30) + 2
INITIALIZATION = -1     # the data-dependent init's one forward pass

# Folded into a model call's key (apart from the layers' indices 0, 1, ...): the binarization of inputs.
BINARIZE = 1 << 20


def key(seed, stream):
    """The [2] int64 key of draw `stream` for `seed` (Python ints or scalar tensors)."""
    return tf.stack([tf.cast(seed, tf.int64), tf.cast(stream, tf.int64)])


def likelihood_key(seed, first_image, chunks, chunk):
    """The key of one forward pass of importance-sampled evaluation (see the table above)."""
    return key(seed, first_image * chunks + chunk)


def training_key(seed, step, num_replicas, replica):
    """The key of one replica's forward pass in training step `step` (a tensor)."""
    return key(seed, step * num_replicas + tf.cast(replica, tf.int64))
