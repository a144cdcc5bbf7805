"""Samples and reconstructions of a model as uint8 images, and image grids, PNG files and TensorBoard
pictures of them."""

import math
import os

import numpy as np
import tensorflow as tf

from iaf_tf import files, noise
from iaf_tf.model import to_uint8_images


def tile(images, columns=None, border=1, border_value=0):
    """uint8 [N, H, W, C] -> one [rows*(H+border)-border, cols*(W+border)-border, C] grid (row-major)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full([rows * (h + border) - border, columns * (w + border) - border, c], border_value, images.dtype)
    for index, image in enumerate(images):
        y, x = divmod(index, columns)
        grid[y * (h + border):y * (h + border) + h, x * (w + border):x * (w + border) + w] = image
    return grid


def interleave(first, second):
    """[a0, b0, a1, b1, ...]: inputs beside their reconstructions."""
    out = np.empty((2 * len(first),) + first.shape[1:], first.dtype)
    out[0::2], out[1::2] = first, second
    return out


def write_png(path, image):
    """Write a uint8 [H, W, C] image (C = 1 or 3) atomically."""
    files.write_atomically(path, tf.io.encode_png(np.asarray(image, np.uint8)).numpy())


def upscale(image, factor):
    """Nearest-neighbour enlargement of a [H, W, C] image, so that 32x32 images are visible at a glance."""
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def write_pictures(writer, out_dir, step, named_grids, scale=1):
    """Each grid as a TensorBoard image and as <out_dir>/<name>-<step>.png."""
    with writer.as_default(step=step):
        for name, grid in named_grids.items():
            grid = upscale(grid, scale)
            tf.summary.image(name, grid[None], max_outputs=1)
            write_png(os.path.join(out_dir, f"{name}-{step}.png"), grid)


def samples(model, num_images, temperature=1.0, seed=0):
    """uint8 images decoded from z drawn from the prior of `model` (a CVAE)."""
    mean = model.sample(num_images, noise.key(seed, noise.SAMPLE), temperature)
    return to_uint8_images(mean).numpy()


def reconstructions(model, images, seed=0):
    """uint8 decoder means of `model` (a CVAE) for one posterior sample of each image."""
    out = model(tf.constant(images), noise.key(seed, noise.RECONSTRUCTION))
    return to_uint8_images(out["mean"]).numpy()
