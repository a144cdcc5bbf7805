"""Downsampled ImageNet streamed from disk: training's peak memory does not grow with the split, and what the
one-time conversion costs; also a preset's training step at its own resolution.

`stream` (the default) writes two generated 64x64 training splits as published (train_64x64.tar, random
PNGs): a small one and a large one (200,000 images = 2.4 GB as uint8 by default). Each is converted in a
fresh process (seconds per 10,000 images, the converter's peak memory), then trained on for a few steps
in another fresh process with a tiny model, whose peak resident memory is compared: the target is the
large split's within 2 GB of the small one's. Writing the large split takes several GB of disk in
--workdir (the tar and the converted .npy) and minutes.

`step` times training steps of a preset (default imagenet64) on random images at its batch size, one
replica, in a fresh process, and reports the step's seconds, its analytic FLOPs (iaf_tf.flops) and the
process's peak memory.

Usage:
  python bench/imagenet_stream.py                                    # stream: 1,000 vs 200,000 images
  python bench/imagenet_stream.py --images 20000 --steps 20          # quicker
  python bench/imagenet_stream.py step --preset imagenet64 --steps 2 # one preset's step
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
    harness.setup()
    from iaf_tf import imagenet

    begin = time.perf_counter()
    images = imagenet.load("train", SIZE, args.data)
    seconds = time.perf_counter() - begin
    harness.write_record(args.record, {"images": len(images), "convert_s": seconds,
                                       "s_per_10k": seconds / len(images) * 10_000, "peak_mib": harness.peak_mib()})


def child_train(args):
    harness.setup()
    from iaf_tf import config, train

    cfg = config.resolve(hpconfig=f"dataset=imagenet64,{TINY}", logdir=args.logdir, data_dir=args.data,
                         max_steps=args.steps, checkpoint_every=10**9, summary_every=10**9, image_every=0)
    begin = time.perf_counter()
    result = train.train(cfg, print_fn=harness.quiet)
    harness.write_record(args.record, {"steps": result.step, "train_s": time.perf_counter() - begin,
                                       "peak_mib": harness.peak_mib()})


def child_step(args):
    harness.setup()
    import numpy as np
    import tensorflow as tf
    from iaf_tf import config, flops, train
    from iaf_tf.model import count_trainable_parameters

    cfg = config.resolve(preset=args.preset, hpconfig=args.hpconfig, num_gpus=1)
    size, batch = cfg.data.image_size, cfg.optimization.batch_size
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    trainer = train.Trainer(cfg)
    trainer.initialize(images)
    step = trainer.train_step
    tensor = tf.constant(images)
    float(step(tensor)[0]["objective"])  # trace and warm up
    seconds = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        float(step(tensor)[0]["objective"])
        seconds.append(time.perf_counter() - begin)
    harness.write_record(args.record, {
        "preset": args.preset, "batch": batch, "size": size, "params": count_trainable_parameters(trainer.model),
        "train_flops_per_image": flops.training_flops_per_image(trainer.model), "step_s": min(seconds),
        "peak_mib": harness.peak_mib()})


def run_stream(args):
    work = Path(args.workdir or tempfile.mkdtemp(prefix="iaf_imagenet_"))
    rows = []
    try:
        for count in (args.small, args.images):
            data = work / f"split-{count}"
            begin = time.perf_counter()
            write_split(data, count)
            print(f"wrote {count:,} PNGs in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
            common = ["--data", data, "--workdir", work]
            converted = harness.run_child(__file__, ["convert", *common])
            trained = harness.run_child(__file__, ["train", *common, "--steps", args.steps,
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


def run_step(args):
    row = harness.run_child(__file__, ["step", "--preset", args.preset, "--hpconfig", args.hpconfig,
                                       "--steps", args.steps])
    harness.print_table(
        [Column("preset", "preset"), Column("batch", "batch", "d"), Column("size", "size", "d"),
         Column("parameters", "params", ",d"), Column("training GFLOP\nper image", "gflop", ".1f"),
         Column("step s", "step_s", ".2f"), Column("peak MiB", "peak_mib", ".0f")],
        [dict(row, gflop=row.get("train_flops_per_image", 0) / 1e9)], title="one replica, float32, random images")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="stream", choices=["stream", "step", "convert", "train"])
    parser.add_argument("--images", type=int, default=200_000, help="stream: the large split")
    parser.add_argument("--small", type=int, default=1_000, help="stream: the small split")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run")
    parser.add_argument("--workdir", default=None, help="stream: where the splits go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="stream: keep the written splits")
    parser.add_argument("--preset", default="imagenet64", help="step: the preset")
    parser.add_argument("--hpconfig", default="", help="step: overrides")
    # Child-process arguments.
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logdir", default=None, help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.record:
        if args.data:
            os.environ["IAF_TF_CACHE"] = str(Path(args.data) / "cache")
        return {"convert": child_convert, "train": child_train, "step": child_step}[args.what](args)
    return run_step(args) if args.what == "step" else run_stream(args)


if __name__ == "__main__":
    main()
