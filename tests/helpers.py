"""Shared test helpers (not a test module)."""

from pathlib import Path

import tensorflow as tf


def read_events(event_dir):
    """({(tag, step): float} scalars, {(tag, step): array} images) from TensorBoard event files."""
    scalars, images = {}, {}
    for path in sorted(Path(event_dir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "images":
                    images[(value.tag, event.step)] = array
                else:
                    scalars[(value.tag, event.step)] = float(array)
    return scalars, images


def scalar_series(event_dir, tag):
    """{step: value} of one scalar tag."""
    return {step: value for (t, step), value in read_events(event_dir)[0].items() if t == tag}
