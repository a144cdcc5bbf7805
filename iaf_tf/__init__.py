"""iaf-tf: a TensorFlow 2 / Keras port of the IAF-VAE (Kingma et al., 2016), faithful to openai/iaf.

    import iaf_tf
    model = iaf_tf.load("runs/quick")          # a run folder, a native checkpoint or an original TF1 one
    bits = model.bits_per_dim(images, k=100)   # images: uint8 [N, 32, 32, 3]
"""

_API = ("load", "TrainedModel", "config_for")


def __getattr__(name):
    # Imported on first use, so that `import iaf_tf.cli` does not load TensorFlow before its log level is set.
    if name in _API:
        from iaf_tf import api
        return getattr(api, name)
    raise AttributeError(f"module 'iaf_tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
