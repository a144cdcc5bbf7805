"""Downsampled ImageNet streamed from disk: training's peak memory does not grow with the split, and what the
one-time conversion costs.

Writes two generated 64x64 training splits as published (train_64x64.tar of random PNGs; the large one,
200,000 images by default, is 2.4 GB as uint8 and takes several GB in --workdir and minutes to write),
converts each in a fresh process (seconds per 10,000 images, the converter's peak memory), then trains a
tiny model on it for a few steps in another (peak memory; target: the large split within 2 GB of the
small one). A preset's step on random images: `python bench/speed.py --configs imagenet64 --only train`.

Usage:
  python bench/imagenet_stream.py                                    # 1,000 vs 200,000 images
  python bench/imagenet_stream.py --images 20000 --steps 20          # quicker
"""

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import harness
from harness import Column

SIZE = 64
TINY = "depth=1,num_blocks=1,h_size=8,z_size=4,batch_size=32,num_gpus=1"


def write_split(folder, count, size=SIZE, seed=0):
    """folder/train_<size>x<size>.tar of `count` random PNGs and a valid split of 100, written as streams."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", count), ("valid", 100)):
        name = f"{split}_{size}x{size}"
        with tarfile.open(folder / f"{name}.tar", "w") as archive:
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
                member = tarfile.TarInfo(f"{name}/{i:08d}.png")
                member.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(member, buffer)


def child_convert(args):
    from iaf_tf import imagenet

    begin = time.perf_counter()
    images = imagenet.load("train", SIZE, args.data_dir)
    seconds = time.perf_counter() - begin
    return {"images": len(images), "convert_s": seconds, "s_per_10k": seconds / len(images) * 10_000,
            "peak_mib": harness.peak_mib()}


def child_train(args):
    from iaf_tf import config, train

    cfg = config.resolve(hpconfig=f"dataset=imagenet64,{TINY}", logdir=args.logdir, data_dir=args.data_dir,
                         max_steps=args.steps, checkpoint_every=10**9, summary_every=10**9, image_every=0)
    begin = time.perf_counter()
    result = train.train(cfg, print_fn=harness.quiet)
    return {"steps": result.step, "train_s": time.perf_counter() - begin, "peak_mib": harness.peak_mib()}


def run_stream(args):
    work = Path(args.workdir or tempfile.mkdtemp(prefix="iaf_imagenet_"))
    rows = []
    try:
        for count in (args.small, args.images):
            data = work / f"split-{count}"
            begin = time.perf_counter()
            write_split(data, count)
            print(f"wrote {count:,} PNGs in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
            converted = harness.run_child(__file__, ["--child", "convert", "--data_dir", data])
            trained = harness.run_child(__file__, ["--child", "train", "--data_dir", data, "--steps", args.steps,
                                                   "--logdir", work / f"run-{count}"])
            rows.append({"images": count, **{f"convert_{k}": v for k, v in converted.items()}, **trained})
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    harness.print_table(
        [Column("images", "images", ",d"), Column("convert s\nper 10k", "convert_s_per_10k", ".1f"),
         Column("convert\npeak MiB", "convert_peak_mib", ".0f"), Column("train\nsteps", "steps", "d"),
         Column("train\npeak MiB", "peak_mib", ".0f")],
        rows, title=f"{SIZE}x{SIZE} training splits as train_{SIZE}x{SIZE}.tar, tiny model ({TINY})")
    if all("error" not in r for r in rows):
        extra = rows[1]["peak_mib"] - rows[0]["peak_mib"]
        print(f"training on {args.images:,} images peaks {extra:+.0f} MiB against {args.small:,} "
              f"(target < 2048): {'OK' if extra < 2048 else 'MISSED'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000, help="the large split")
    parser.add_argument("--small", type=int, default=1_000, help="the small split")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run")
    parser.add_argument("--workdir", default=None, help="where the splits go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written splits")
    for name in ("--child", "--record", "--data_dir", "--logdir"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ["IAF_TF_CACHE"] = str(Path(args.data_dir) / "cache")
        args.root = harness.ROOT
        return harness.run_as_child(args, {"convert": child_convert, "train": child_train})
    run_stream(args)


if __name__ == "__main__":
    main()
