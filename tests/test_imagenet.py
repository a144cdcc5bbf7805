"""Downsampled ImageNet (iaf_tf.imagenet, datasets imagenet32 / imagenet64): small files written in each
published layout (tars of PNGs, the same extracted, a tensorflow-datasets-prepared folder), converted once
into a memory-mapped file, trained on, resumed, evaluated and sampled through cli.main; the one line each
bad file gives; the imagenet64 preset's architecture with bfloat16 and with two replicas."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import cli, config, data, datasets, distribute, imagenet, run_record
from iaf_tf.errors import DataError
from tests.fixtures import ONE_BLOCK, cli_flags, error_lines

N_TRAIN, N_VALID = 12, 6  # 3 steps an epoch at batch 4: four steps cross an epoch


def _png(image):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _images(size, n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=[n, size, size, 3], dtype=np.uint8)


def write_published(folder, size, layout, counts=(("train", N_TRAIN), ("valid", N_VALID))):
    """Write each split in `layout` ("tar", "png" or "tfds") under folder; {split: uint8 images in the order
    the dataset returns them}."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {split: _images(size, n, seed) for seed, (split, n) in enumerate(counts)}
    if layout == "tfds":
        return _write_tfds(folder, size, splits)
    for split, images in splits.items():
        name = f"{split}_{size}x{size}"
        pngs = {f"{i:08d}.png": _png(image) for i, image in enumerate(images)}
        if layout == "png":
            (folder / name).mkdir()
            for file, content in pngs.items():
                (folder / name / file).write_bytes(content)
            continue
        with tarfile.open(folder / f"{name}.tar", "w") as archive:
            for file in reversed(list(pngs)):  # not in name order: the dataset sorts by name
                member = tarfile.TarInfo(f"{name}/{file}")
                member.size = len(pngs[file])
                archive.addfile(member, io.BytesIO(pngs[file]))
    return splits


def _write_tfds(folder, size, splits):
    """tensorflow-datasets' own writer, offline: the downsampled_imagenet builder with its download replaced
    by our PNG files (stored as given, as the builder stores the published ones). Returns the images in the
    order TFDS reads them back (unshuffled)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(f"downsampled_imagenet/{size}x{size}", data_dir=str(folder))
    tfds_names = {"train": "train", "valid": "validation"}

    def split_generators(self, dl_manager):
        return {tfds_names[split]: ((f"{split}{i:05d}", {"image": io.BytesIO(_png(image))}) for i, image in enumerate(images))
                for split, images in splits.items()}

    original = type(builder)._split_generators
    type(builder)._split_generators = split_generators
    try:
        builder.download_and_prepare()
    finally:
        type(builder)._split_generators = original
    return {split: np.stack([example["image"] for example in tfds.as_numpy(
        builder.as_dataset(split=tfds_names[split], shuffle_files=False))]) for split in splits}


@pytest.fixture(autouse=True)
def _in_process(in_process_cli, monkeypatch):
    monkeypatch.delenv("IAF_TF_CACHE", raising=False)


def _cli(*args):
    return cli.main(["iaf.py"], cli_flags(*args))


def _one_error_line(capsys):
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------- reading each layout

@pytest.mark.parametrize("layout, size", [("tar", 32), ("tar", 64), ("png", 32), ("png", 64), ("tfds", 32)])
def test_each_layout_is_converted_once_into_a_memory_map(tmp_path, layout, size, capsys, monkeypatch):
    expected = write_published(tmp_path / "data", size, layout)
    spec = datasets.get(f"imagenet{size}")
    assert (spec.image_size, spec.splits, spec.folder_variable) == (size, ("train", "valid"), "IMAGENET_PATH")
    for split, images in expected.items():
        loaded = spec.load(split, size, tmp_path / "data")
        assert isinstance(loaded, np.memmap) and loaded.shape == images.shape and loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded, images)
    assert capsys.readouterr().out.count("Converting") == 2
    cache = sorted((tmp_path / "data" / ".iaf_tf_cache").iterdir())
    assert [p.name.split("-")[:3] for p in cache] == [[f"imagenet{size}", s, layout] for s in ("train", "valid")]
    stamps = [p.stat().st_mtime_ns for p in cache]
    np.testing.assert_array_equal(spec.load("valid", size, tmp_path / "data", evaluation=True), expected["valid"])
    assert "Converting" not in capsys.readouterr().out  # reused
    assert [p.stat().st_mtime_ns for p in cache] == stamps


def test_cache_goes_to_iaf_tf_cache_or_home_when_the_data_folder_cannot_hold_it(tmp_path, monkeypatch):
    expected = write_published(tmp_path / "data", 32, "tar")
    monkeypatch.setenv("IAF_TF_CACHE", str(tmp_path / "cache"))
    np.testing.assert_array_equal(imagenet.load("valid", 32, tmp_path / "data"), expected["valid"])
    assert [p.name.split("-")[1] for p in (tmp_path / "cache").iterdir()] == ["valid"]
    assert not (tmp_path / "data" / ".iaf_tf_cache").exists()
    # A data folder where the cache folder cannot be made (as on a read-only file system): the home cache.
    monkeypatch.delenv("IAF_TF_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data" / ".iaf_tf_cache").write_text("not a folder")
    np.testing.assert_array_equal(imagenet.load("valid", 32, tmp_path / "data"), expected["valid"])
    assert len(list((tmp_path / "home" / ".cache" / "iaf_tf").glob("imagenet32-valid-tar-*.npy"))) == 1


def test_replaced_files_are_converted_again(tmp_path, monkeypatch):
    write_published(tmp_path, 32, "tar")
    imagenet.load("valid", 32, tmp_path)
    os.remove(tmp_path / "valid_32x32.tar")
    other = write_published(tmp_path, 32, "tar", counts=(("valid", 3),))
    np.testing.assert_array_equal(imagenet.load("valid", 32, tmp_path), other["valid"])


# ---------------------------------------------------------------- the data order from a memory map

def test_memory_mapped_batches_equal_in_memory_batches_and_resume_at_any_step(tmp_path, monkeypatch):
    images = write_published(tmp_path, 32, "png", counts=(("train", 20),))["train"]
    mapped = imagenet.load("train", 32, tmp_path)
    assert data._row_reader(mapped) is not None and data._row_reader(mapped[1:]) is None
    in_memory = [b.numpy() for b in data.train_dataset(images, 8, seed=5).take(7)]
    streamed = [b.numpy() for b in data.train_dataset(mapped, 8, seed=5).take(7)]
    resumed = [b.numpy() for b in data.train_dataset(mapped, 8, seed=5, start_step=4).take(3)]
    for a, b in zip(in_memory, streamed):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(in_memory[4:], resumed):
        np.testing.assert_array_equal(a, b)
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    batches = distribute.replica_batches(strategy, mapped, batch_size=4, seed=5, start_step=4)
    for expected in in_memory[4:]:
        per_replica = strategy.experimental_local_results(next(batches))
        np.testing.assert_array_equal(np.concatenate([b.numpy() for b in per_replica]), expected)


# ---------------------------------------------------------------- train, resume, eval_valid, sample

def _recording_batches(monkeypatch):
    """{run: {step: a digest of the global batch}} of every training stream made from here on."""
    seen = []
    make = data.train_dataset

    def recording(images, batch_size, seed=None, start_step=0):
        record = {}
        seen.append(record)

        def note(step, batch):
            record[int(step)] = hash(batch.tobytes())
            return batch
        stream = make(images, batch_size, seed, start_step)
        return stream.enumerate(start_step).map(
            lambda step, batch: tf.ensure_shape(tf.numpy_function(note, [step, batch], tf.uint8), batch.shape))
    monkeypatch.setattr(data, "train_dataset", recording)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("layout, size", [("tar", 32), ("tar", 64), ("png", 32), ("png", 64), ("tfds", 32)])
def test_train_resume_eval_valid_and_sample(tmp_path, layout, size, capsys, monkeypatch):
    write_published(tmp_path / "data", size, layout)
    monkeypatch.setenv("IMAGENET_PATH", str(tmp_path / "data"))  # the dataset's own folder variable
    # dataset=imagenetN alone picks the resolution.
    run = ["--hpconfig", f"dataset=imagenet{size},{ONE_BLOCK}", "--logdir", tmp_path / "run"]
    assert _cli("--mode", "train", *run, "--max_steps", 2) == 0
    assert _cli("--mode", "train", *run, "--max_steps", 3) == 0
    assert "Resumed from" in capsys.readouterr().out

    assert _cli("--mode", "eval_valid", "--once", "--logdir", tmp_path / "run") == 0
    assert "Step: 3 Score:" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "eval_valid" / "result-3.json").read_text())
    assert (result["split"], result["images"], result["step"]) == ("valid", N_VALID, 3)
    assert np.isfinite(result["bits_per_dim"])
    written = os.listdir(tmp_path / "run" / "eval_valid")
    assert any(f.startswith("events.") for f in written) and {"reconstructions-3.png", "samples-3.png"} <= set(written)

    assert _cli("--mode", "sample", "--num_samples", 4, "--logdir", tmp_path / "run") == 0
    samples = np.load(tmp_path / "run" / "sample" / "samples-3-t1.npy")
    assert samples.shape == (4, size, size, 3) and samples.dtype == np.uint8

    # ImageNet has no test split.
    assert _cli("--mode", "eval_test", "--once", "--logdir", tmp_path / "run") == 2
    assert "has no 'test' split; it has train, valid (--mode eval_train or eval_valid)" in _one_error_line(capsys)


@pytest.mark.slow
def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    write_published(tmp_path / "data", 64, "tar")
    seen = _recording_batches(monkeypatch)
    for logdir, stops in (("resumed", (2, 4)), ("straight", (4,))):
        for max_steps in stops:
            assert _cli("--mode", "train", "--hpconfig", f"dataset=imagenet64,{ONE_BLOCK}", "--logdir",
                        tmp_path / logdir, "--data_dir", tmp_path / "data", "--max_steps", max_steps) == 0
    # The streams made: the first run's init and loop, the resumed loop, the uninterrupted run's init and loop.
    assert len(seen) == 5
    first, resumed, straight = seen[1], seen[2], seen[4]
    assert min(resumed) == 2 and min(straight) == 0
    for step in range(4):  # four steps cross an epoch (three steps each)
        assert (first if step < 2 else resumed)[step] == straight[step]
    assert len({straight[step] for step in range(4)}) == 4


# ---------------------------------------------------------------- bad files: one line each

def _truncate(path, keep=0.5):
    content = path.read_bytes()
    path.write_bytes(content[:int(len(content) * keep)])


def _first(folder, pattern):
    return sorted(folder.glob(pattern))[0]


def _bad_folder(tmp_path, layout, spoil):
    folder = tmp_path / "data"
    write_published(folder, 32, layout)
    spoil(folder)
    return folder


def _cut_at_member(path, index):
    with tarfile.open(path) as archive:
        offset = archive.getmembers()[index].offset
    path.write_bytes(path.read_bytes()[:offset])


_TFDS_TRAIN = "downsampled_imagenet/32x32/*/*train.tfrecord*"
BAD_FILES = {
    "empty folder": (None, lambda f: None, "no ImageNet 32x32 train split in"),
    "truncated tar": ("tar", lambda f: _truncate(f / "train_32x32.tar"), "truncated or corrupt, download it again"),
    "tar cut at a header": ("tar", lambda f: _cut_at_member(f / "train_32x32.tar", 3),
                            "without the end-of-archive blocks: it is truncated, download it again"),
    "truncated png": ("png", lambda f: _truncate(_first(f / "train_32x32", "*.png")),
                      "the file is corrupt, get it again"),
    "not a png": ("png", lambda f: _first(f / "train_32x32", "*.png").write_bytes(b"garbage"),
                  "the file is corrupt, get it again"),
    "64x64 files for imagenet32": ("png", lambda f: _first(f / "train_32x32", "*.png").write_bytes(
        _png(_images(64, 1, 0)[0])), "is a 64x64 RGB image, expected 32x32 RGB"),
    "truncated tfds record": ("tfds", lambda f: _truncate(_first(f, _TFDS_TRAIN), keep=0.45),
                              "DataLossError: truncated record at"),
    "tfds file cut at a record": ("tfds", lambda f: _truncate(_first(f, _TFDS_TRAIN), keep=0.5),
                                  "hold 6 records where its dataset_info.json says 12"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_gives_one_line_and_writes_nothing(tmp_path, case, capsys, monkeypatch):
    layout, spoil, fragment = BAD_FILES[case]
    folder = tmp_path / "data"
    folder.mkdir()
    if layout:
        _bad_folder(tmp_path, layout, spoil)
    capsys.readouterr()  # what writing the files printed
    code = _cli("--mode", "train", "--hpconfig", f"dataset=imagenet32,{ONE_BLOCK}", "--logdir", tmp_path / "run",
                "--data_dir", folder, "--max_steps", 1)
    line = _one_error_line(capsys)
    assert code == 2 and fragment in line, line
    assert not (tmp_path / "run").exists()
    cache = folder / ".iaf_tf_cache"
    assert not cache.exists() or not any(p.name.startswith("imagenet32-train") for p in cache.iterdir())


def test_no_folder_and_a_damaged_conversion_say_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAGENET_PATH", raising=False)
    run = ["--mode", "eval_valid", "--once", "--hpconfig", f"dataset=imagenet64,{ONE_BLOCK}", "--logdir",
           tmp_path / "run"]
    assert _cli(*run) == 2
    assert "no ImageNet 64x64 location given: set IMAGENET_PATH to the folder holding train_64x64.tar and " \
           "valid_64x64.tar" in _one_error_line(capsys)
    write_published(tmp_path / "data", 64, "tar")
    imagenet.load("valid", 64, tmp_path / "data")
    converted = next((tmp_path / "data" / ".iaf_tf_cache").iterdir())
    _truncate(converted)
    assert _cli(*run, "--data_dir", tmp_path / "data") == 2
    assert f"the converted ImageNet file {converted} is unreadable" in _one_error_line(capsys)
    with pytest.raises(DataError, match="delete it to convert again"):
        imagenet.load("valid", 64, tmp_path / "data")


# ---------------------------------------------------------------- the imagenet64 preset's architecture

# The preset's two levels and batch, narrowed for test speed.
NARROW = "depths=1-1,h_size=8,z_size=4,batch_size=2"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--num_gpus", 1, "--hpconfig", NARROW + ",mixed_precision=true"],
                                   ["--num_gpus", 2, "--cpu_replicas", 2, "--hpconfig", NARROW]])
def test_imagenet64_preset_trains(tmp_path, extra, capsys, monkeypatch):
    write_published(tmp_path / "data", 64, "tar")
    preset = config.load_preset("imagenet64")
    assert (preset.data.dataset, preset.data.image_size, preset.model.level_depths) == ("imagenet64", 64, [10, 10])
    assert _cli("--mode", "train", "--preset", "imagenet64", *extra, "--logdir", tmp_path / "run",
                "--data_dir", tmp_path / "data", "--max_steps", 3) == 0
    out = capsys.readouterr().out
    assert "Stopped at step 3 (max_steps)" in out
    recorded = run_record.read(tmp_path / "run" / "train")
    assert (recorded.data.dataset, recorded.data.image_size, recorded.model.level_depths) == ("imagenet64", 64, [1, 1])
