"""iaf_tf.images: grids of pictures and PNG files."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import images
from tests.fixtures import read_events


def _numbered(n, h=2, w=3, c=3):
    """n uint8 pictures, picture i filled with the value i + 1."""
    return np.broadcast_to((np.arange(n, dtype=np.uint8) + 1)[:, None, None, None], (n, h, w, c)).copy()


def test_tile_places_pictures_row_major_with_borders():
    grid = images.tile(_numbered(5), columns=3, border=1, border_value=200)
    assert grid.shape == (2 * (2 + 1) - 1, 3 * (3 + 1) - 1, 3) and grid.dtype == np.uint8
    for index in range(5):
        y, x = divmod(index, 3)
        np.testing.assert_array_equal(grid[y * 3:y * 3 + 2, x * 4:x * 4 + 3], index + 1)
    assert np.all(grid[2] == 200) and np.all(grid[:, 3] == 200) and np.all(grid[:, 7] == 200)  # borders
    assert np.all(grid[3:, 8:] == 200)  # the sixth place of the grid stays empty


def test_tile_defaults_to_a_square_grid_and_keeps_channels():
    assert images.tile(_numbered(36, 32, 32, 3)).shape == (6 * 33 - 1, 6 * 33 - 1, 3)
    assert images.tile(_numbered(10, 32, 32, 1)).shape == (3 * 33 - 1, 4 * 33 - 1, 1)
    assert images.tile(_numbered(4, 2, 2, 1), border=0).shape == (4, 4, 1)


def test_tile_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        images.tile(np.zeros([4, 32, 32], np.uint8))


def test_interleave_puts_each_input_before_its_reconstruction():
    first, second = _numbered(3), _numbered(3) + 100
    out = images.interleave(first, second)
    assert out.shape == (6, 2, 3, 3) and out.dtype == np.uint8
    assert [int(picture[0, 0, 0]) for picture in out] == [1, 101, 2, 102, 3, 103]


@pytest.mark.parametrize("channels", [1, 3])
def test_write_png_round_trips_and_leaves_no_temporary_file(tmp_path, channels):
    picture = np.random.default_rng(channels).integers(0, 256, size=[5, 7, channels]).astype(np.uint8)
    path = tmp_path / "new" / "folder" / "picture.png"
    images.write_png(str(path), picture)
    np.testing.assert_array_equal(tf.io.decode_png(path.read_bytes(), channels=channels).numpy(), picture)
    assert sorted(p.name for p in path.parent.iterdir()) == ["picture.png"]
    images.write_png(str(path), picture[::-1])  # overwrites
    np.testing.assert_array_equal(tf.io.decode_png(path.read_bytes(), channels=channels).numpy(), picture[::-1])


def test_upscale_repeats_each_pixel():
    picture = _numbered(1, 2, 3, 1)[0] * np.arange(1, 7, dtype=np.uint8).reshape(2, 3, 1)
    big = images.upscale(picture, 4)
    assert big.shape == (8, 12, 1)
    np.testing.assert_array_equal(big[::4, ::4], picture)
    np.testing.assert_array_equal(big[3::4, 3::4], picture)
    assert images.upscale(picture, 1) is picture


def test_write_pictures_writes_a_png_and_a_tensorboard_image_of_each_grid(tmp_path):
    grids = {"samples": _numbered(1, 4, 5, 3)[0], "reconstructions": _numbered(1, 4, 5, 3)[0] + 10}
    writer = tf.summary.create_file_writer(str(tmp_path))
    images.write_pictures(writer, str(tmp_path), 7, grids, scale=2)
    writer.flush()
    _, pictures = read_events(tmp_path)
    assert set(pictures) == {("samples", 7), ("reconstructions", 7)}
    for name, grid in grids.items():
        png = tf.io.decode_png((tmp_path / f"{name}-7.png").read_bytes()).numpy()
        np.testing.assert_array_equal(png, images.upscale(grid, 2))
