"""What pictures during training cost: the real training loop (train.train) of one config with the default
--image_every and with pictures off, in alternating fresh processes, steps/s from the loop's step records.

Usage:
  python bench/pictures.py                          # full: cpu_quick, 2 x 2 runs of 2,100 steps (2 pictures each)
  python bench/pictures.py --steps 30 --image_every 10 --rounds 1     # quick: checks that it runs
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column


def child(args):
    harness.setup()
    from iaf_tf import config, train

    seconds, ends = [], []  # each step's own time; when each step's record came (the pictures fall between)
    with tempfile.TemporaryDirectory(prefix="iaf_pictures_") as logdir:
        cfg = config.resolve(args.config, logdir=logdir, num_gpus=1, max_steps=args.steps, data_dir=args.data_dir,
                             download=False, checkpoint_every=10**9, image_every=args.image_every)
        begin = time.perf_counter()

        def on_step(record):
            seconds.append(record.seconds)
            ends.append(time.perf_counter())

        train.train(cfg, on_step=on_step, print_fn=harness.quiet)
        total = time.perf_counter() - begin
        pngs = len(list(Path(logdir, "train").glob("*.png")))
    # From step 10 on (past tracing and warm-up): the loop's whole time per step, pictures included.
    harness.write_record(args.record, {"steps_per_s": (len(ends) - 10) / (ends[-1] - ends[9]),
                                       "median_step_s": statistics.median(seconds[10:]), "wall_s": total,
                                       "pngs": pngs})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_quick")
    parser.add_argument("--steps", type=int, default=2100)
    parser.add_argument("--image_every", type=int, default=None, help="default: the library's default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return child(args)

    if args.image_every is None:
        harness.setup()
        from iaf_tf import config
        args.image_every = config.Config().training.image_every
    rows = []
    for round_ in range(args.rounds):
        for every in (args.image_every, 0):
            record = harness.run_child(__file__, ["--child", "--config", args.config, "--steps", args.steps,
                                                  "--image_every", every, "--data_dir", args.data_dir])
            rows.append(dict(record, round=round_ + 1, image_every=every))
    good = [r for r in rows if "error" not in r]
    rate = {every: statistics.median(r["steps_per_s"] for r in good if r["image_every"] == every)
            for every in (args.image_every, 0) if any(r["image_every"] == every for r in good)}
    notes = []
    if len(rate) == 2:
        ratio = rate[args.image_every] / rate[0]
        notes.append(f"steps/s with pictures every {args.image_every} steps = {ratio:.3f} x without "
                     f"(target >= 0.97): {'OK' if ratio >= 0.97 else 'MISSED'}")
    harness.print_table([Column("round", "round"), Column("image_every", "image_every"),
                         Column("steps/s", "steps_per_s", ".2f"), Column("median step s", "median_step_s", ".4f"),
                         Column("wall s", "wall_s", ".0f"), Column("PNGs written", "pngs", "d")], rows, labels=2,
                        title=f"{args.config}, {args.steps} steps per run", notes=notes)


if __name__ == "__main__":
    sys.exit(main())
