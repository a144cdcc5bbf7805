"""Downsampled ImageNet (van den Oord et al., 2016) at 32x32 or 64x64, streamed from disk.

Any of three layouts of a split is read: the published archive (`train_64x64.tar`, a tar of PNGs), that
archive extracted (`train_64x64/*.png`), or a tensorflow-datasets data folder with
`downsampled_imagenet/64x64/<version>/` prepared. The first use converts the split, PNG by PNG, into one
uint8 .npy file (images in file-name order, or record order for TFDS), written atomically and reused by
every later run and replica (training reads each batch's rows from it, evaluation maps it). It lives in `.iaf_tf_cache/` beside the data, or under $IAF_TF_CACHE (else
~/.cache/iaf_tf) when the data folder is read-only; its name holds a fingerprint of the source files, so
replaced files are converted again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from iaf_tf.errors import DataError

FOLDER_VARIABLE = "IMAGENET_PATH"
SPLITS = ("train", "valid")
DOWNLOAD_PAGE = "https://image-net.org/download-images.php (Downsampled ImageNet)"
_TFDS_SPLITS = {"train": "train", "valid": "validation"}
_CACHE_FOLDER = ".iaf_tf_cache"


def howto(size):
    return (f"set {FOLDER_VARIABLE} to the folder holding train_{size}x{size}.tar and valid_{size}x{size}.tar "
            f"(from {DOWNLOAD_PAGE}), those archives extracted, or a tensorflow-datasets data folder with "
            f"downsampled_imagenet/{size}x{size} prepared")


def load(split: str, size: int, folder=None) -> np.memmap:
    """uint8 [N, size, size, 3], memory-mapped from the converted split (converted first if need be)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not folder:
        raise DataError(f"no ImageNet {size}x{size} location given: {howto(size)}")
    root = Path(folder).expanduser().resolve()
    kind, source = _find_source(root, split, size)
    cache = _cache_file(root, kind, source, split, size)
    if not cache.is_file():
        _convert(kind, source, cache, size)
    return _open(cache, size)


# ---------------------------------------------------------------- where a split is

def _find_source(root: Path, split: str, size: int):
    name = f"{split}_{size}x{size}"
    if (root / f"{name}.tar").is_file():
        return "tar", root / f"{name}.tar"
    if (root / name).is_dir():
        return "png", root / name
    for tfds_root in (root / "downsampled_imagenet" / f"{size}x{size}", root / f"{size}x{size}", root):
        versions = [p for p in tfds_root.glob(f"*/downsampled_imagenet-{_TFDS_SPLITS[split]}.tfrecord*")
                    if not p.parent.name.startswith("incomplete")]  # TFDS's folder while it prepares
        if versions:
            newest = max({p.parent for p in versions}, key=lambda p: tuple(map(_int_or_zero, p.name.split("."))))
            return "tfds", sorted(newest.glob(f"downsampled_imagenet-{_TFDS_SPLITS[split]}.tfrecord*"))
    if not root.is_dir():
        raise DataError(f"ImageNet folder {root} does not exist; {howto(size)}")
    raise DataError(f"no ImageNet {size}x{size} {split} split in {root} (looked for {name}.tar, {name}/ and "
                    f"downsampled_imagenet/{size}x{size}/<version>/); {howto(size)}")


def _int_or_zero(text):
    return int(text) if text.isdigit() else 0


def _png_names(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(".png"))


def _fingerprint(kind, source) -> str:
    if kind == "png":
        names = _png_names(source)
        parts = [str(source), str(len(names))] + [f"{n}:{(source / n).stat().st_size}" for n in names[:: 997]]
    else:
        files = [source] if kind == "tar" else source
        parts = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_file(root: Path, kind, source, split, size) -> Path:
    """Where the converted split is: $IAF_TF_CACHE if set; else beside the data if it is there or can be
    written there; else ~/.cache/iaf_tf."""
    name = f"imagenet{size}-{split}-{kind}-{_fingerprint(kind, source)}.npy"
    if os.environ.get("IAF_TF_CACHE"):
        return Path(os.environ["IAF_TF_CACHE"]).expanduser().resolve() / name
    beside = root / _CACHE_FOLDER
    if (beside / name).is_file():
        return beside / name
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK | os.X_OK):
            return beside / name
    except OSError:  # a read-only file system or folder
        pass
    return Path.home() / ".cache" / "iaf_tf" / name


# ---------------------------------------------------------------- conversion

def _decode(png: bytes, size: int, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            mode, shape = image.mode, image.size
            pixels = np.asarray(image.convert("RGB") if mode in ("RGB", "RGBA", "P", "L") else image)
    except Exception as e:  # PIL reports damage as OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot decode {where}: {type(e).__name__}: {e}; the file is corrupt, get it again") from e
    if shape != (size, size) or pixels.shape != (size, size, 3):
        raise DataError(f"{where} is a {shape[0]}x{shape[1]} {mode} image, expected {size}x{size} RGB: "
                        f"is it the {size}x{size} dataset?")
    return pixels


def _tar_images(path: Path, size: int):
    """(count, iterator of (row, png bytes, where)): rows in member-name order."""
    try:
        archive = tarfile.open(path, "r:")
        members = [m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(".png")]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read ImageNet archive {path}: {type(e).__name__}: {e}; it is truncated or "
                        "corrupt, download it again") from e
    # tarfile takes an archive cut at a member's header for a shorter one: insist on its end-of-archive blocks.
    with open(path, "rb") as f:
        f.seek(archive.offset)
        end = f.read(1024)
    if len(end) < 1024 or any(end):
        raise DataError(f"ImageNet archive {path} ends after {len(members)} images without the end-of-archive "
                        "blocks: it is truncated, download it again")
    rank = {m.name: row for row, m in enumerate(sorted(members, key=lambda m: m.name))}

    def read():
        with archive:
            for member in members:
                where = f"{member.name} in {path}"
                try:
                    png = archive.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise DataError(f"cannot read {where}: {type(e).__name__}: {e}; the archive is truncated or "
                                    "corrupt, download it again") from e
                if len(png) != member.size:
                    raise DataError(f"cannot read {where}: the archive ends inside it; it is truncated, "
                                    "download it again")
                yield rank[member.name], png, where
    return len(members), read()


def _png_images(folder: Path, size: int):
    names = _png_names(folder)

    def read():
        for row, name in enumerate(names):
            yield row, (folder / name).read_bytes(), str(folder / name)
    return len(names), read()


def _tfds_images(files, size: int):
    import tensorflow as tf

    def records():
        try:
            for row, record in enumerate(tf.data.TFRecordDataset([str(f) for f in files])):
                yield row, record.numpy()
        except tf.errors.OpError as e:
            raise DataError(f"cannot read the TFDS files {files[0].parent}/{files[0].name}...: "
                            f"{type(e).__name__}: {_op_message(e)}; they are truncated or corrupt, "
                            "prepare them again") from e

    count = sum(1 for _ in records())
    # A file cut at a record boundary reads as a shorter one: compare with what TFDS recorded.
    info_file = files[0].parent / "dataset_info.json"
    if info_file.is_file():
        tfds_split = files[0].name.split("-")[1].split(".")[0]
        try:
            splits = json.loads(info_file.read_text())["splits"]
            expected = sum(int(n) for s in splits if s["name"] == tfds_split for n in s["shardLengths"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{info_file} is corrupt ({type(e).__name__}: {e}); prepare the dataset again") from e
        if count != expected:
            raise DataError(f"the TFDS {tfds_split} files in {files[0].parent} hold {count} records where its "
                            f"dataset_info.json says {expected}: they are truncated or corrupt, prepare them again")

    def read():
        for row, record in records():
            where = f"record {row} of {files[0].parent}"
            try:
                example = tf.train.Example.FromString(record)
                png = example.features.feature["image"].bytes_list.value[0]
            except Exception as e:
                raise DataError(f"cannot read {where}: {type(e).__name__}: {e}; no 'image' feature: is it "
                                "downsampled_imagenet?") from e
            yield row, png, where
    return count, read()


def _op_message(error):
    """A TensorFlow op error's own words, without the function and op names around them."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message.splitlines()[0])
    return re.sub(r"\s*\[Op:.*$", "", text)


def _convert(kind, source, cache: Path, size: int):
    count, items = {"tar": _tar_images, "png": _png_images, "tfds": _tfds_images}[kind](source, size)
    if count == 0:
        raise DataError(f"no PNG images in {source}; {howto(size)}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the ImageNet cache folder {cache.parent}: {e}; set IAF_TF_CACHE to a "
                        "writable folder") from e
    print(f"Converting {count} ImageNet images from {source if kind != 'tfds' else source[0].parent} into "
          f"{cache} (once)")
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    row_bytes = size * size * 3
    try:
        # Plain writes, not a memory map: written pages of a map would count towards this process's memory.
        with open(tmp, "wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": "|u1", "fortran_order": False, "shape": (count, size, size, 3)})
            start = out.tell()
            for row, png, where in items:
                out.seek(start + row * row_bytes)
                out.write(_decode(png, size, where).tobytes())
            out.truncate(start + count * row_bytes)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, cache)  # concurrent converters write the same bytes; the last rename wins
    finally:
        if tmp.exists():
            tmp.unlink()


def _open(cache: Path, size: int) -> np.memmap:
    try:
        images = np.load(cache, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"the converted ImageNet file {cache} is unreadable ({e}); delete it to convert "
                        "again") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise DataError(f"the converted ImageNet file {cache} holds {images.dtype} {images.shape}, expected "
                        f"uint8 [N, {size}, {size}, 3]; delete it to convert again")
    return images
