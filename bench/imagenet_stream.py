"""Downsampled ImageNet streamed from disk: two generated 64x64 training splits (random PNGs in
train_64x64.tar; the large one takes GBs in --workdir), each converted in a fresh process and trained on
with a tiny model in another. Target: the large split's peak memory within 2 GB of the small one's.

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

TINY = "dataset=imagenet64,depth=1,num_blocks=1,h_size=8,z_size=4,batch_size=32,num_gpus=1"


def write_split(folder, count, seed=0):
    """folder/train_64x64.tar of `count` random PNGs and valid_64x64.tar of 100, written as streams."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_64x64", count), ("valid_64x64", 100)):
        with tarfile.open(folder / f"{name}.tar", "w") as archive:
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
                member = tarfile.TarInfo(f"{name}/{i:08d}.png")
                member.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(member, buffer)


def child_convert(args):
    from iaf_tf import imagenet

    begin = time.perf_counter()
    images = imagenet.load("train", 64, args.data_dir)
    return {"s_per_10k": (time.perf_counter() - begin) / len(images) * 10_000, "peak_mib": harness.peak_mib()}


def child_train(args):
    from iaf_tf import config, train

    cfg = config.resolve(hpconfig=TINY, logdir=args.logdir, data_dir=args.data_dir, max_steps=args.steps,
                         checkpoint_every=10**9, summary_every=10**9, image_every=0)
    return {"steps": train.train(cfg, print_fn=harness.quiet).step, "peak_mib": harness.peak_mib()}


def main():
    parser = harness.arguments(__doc__, hpconfig=False)
    parser.add_argument("--images", type=int, default=200_000, help="the large split")
    parser.add_argument("--small", type=int, default=1_000, help="the small split")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run")
    parser.add_argument("--workdir", default=None, help="where the splits go (default: a temporary folder)")
    parser.add_argument("--logdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ["IAF_TF_CACHE"] = str(Path(args.data_dir) / "cache")
        return harness.run_as_child(args, {"convert": child_convert, "train": child_train})

    work = Path(args.workdir or tempfile.mkdtemp(prefix="iaf_imagenet_"))
    rows = []
    try:
        for count in (args.small, args.images):
            data, begin = work / f"split-{count}", time.perf_counter()
            write_split(data, count)
            print(f"wrote {count:,} PNGs in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
            converted = harness.run_child(__file__, ["--child", "convert", "--data_dir", data])
            trained = harness.run_child(__file__, ["--child", "train", "--data_dir", data, "--steps", args.steps,
                                                   "--logdir", work / f"run-{count}"])
            rows.append({"images": count, **{f"convert_{k}": v for k, v in converted.items()}, **trained})
            shutil.rmtree(data, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    harness.print_table(
        [Column("images", "images", ",d"), Column("convert s\nper 10k", "convert_s_per_10k", ".1f"),
         Column("convert\npeak MiB", "convert_peak_mib", ".0f"), Column("train\nsteps", "steps", "d"),
         Column("train\npeak MiB", "peak_mib", ".0f")], rows, title=f"64x64 training splits, tiny model ({TINY})")
    if all("error" not in r for r in rows):
        extra = rows[1]["peak_mib"] - rows[0]["peak_mib"]
        print(f"training on {args.images:,} images peaks {extra:+.0f} MiB against {args.small:,} "
              f"(target < 2048): {'OK' if extra < 2048 else 'MISSED'}")
    harness.save_json(args.json, rows)


if __name__ == "__main__":
    main()
