"""Where a training step's time goes: TF profiler trace of a few steps, summed by op type.

Op times are summed over the executor's threads (inter-op parallel ops overlap, so the total can exceed
the wall time). Convolutions appear under the names of the oneDNN kernels that run them.

Usage:
  python bench/profile_step.py                          # full: README recipe, 2 profiled steps
  python bench/profile_step.py --config cpu_quick       # quick
  python bench/profile_step.py --hpconfig batch_size=8 --steps 3 --top 40 --by_name
  python bench/profile_step.py --root /tmp/iaf-baseline # another checkout (older APIs too)
"""

import argparse
import collections
import glob
import os
import tempfile
import time
from pathlib import Path

import harness
from harness import Column

# Events that enclose ops rather than being ops.
_SCAFFOLDING = {"Process", "Run"}


def op_times(logdir):
    """{(op type, op name): (total µs, count)} from the host plane of the xplane files under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    totals = collections.defaultdict(lambda: [0.0, 0])
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(path).read_bytes())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            metadata = plane.event_metadata
            for line in plane.lines:
                for event in line.events:
                    name = metadata[event.metadata_id].name
                    if ":" not in name:  # executor ops are "name:Type"; the rest is Python/runtime scaffolding
                        continue
                    op_name, op_type = (part.strip() for part in name.rsplit(":", 1))
                    if op_type in _SCAFFOLDING or op_type.startswith("__inference"):
                        continue
                    entry = totals[(op_type, op_name)]
                    entry[0] += event.duration_ps / 1e6
                    entry[1] += 1
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="readme_recipe", help="preset")
    parser.add_argument("--hpconfig", default="")
    parser.add_argument("--root", default=str(harness.ROOT), help="checkout to profile")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--by_name", action="store_true", help="also list the slowest individual ops")
    parser.add_argument("--inter_op", type=int, default=0,
                        help="inter-op threads (1: ops run one at a time, so each op's time is its own)")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    args = parser.parse_args()

    lib = harness.load_library(args.root, args.inter_op)
    import tensorflow as tf
    from iaf_tf import data

    cfg = lib.config(args.config, args.hpconfig)
    images = data.load_cifar10("test", args.data_dir)[:lib.sizes(cfg).batch_size]
    trainer = lib.make_trainer(cfg)
    trainer.initialize(images)
    step = lib.step_function(trainer)
    batch = tf.constant(images)
    for _ in range(2):
        float(step(batch)[0]["objective"])
    logdir = tempfile.mkdtemp(prefix="iaf_profile_")
    tf.profiler.experimental.start(logdir)
    begin = time.perf_counter()
    for _ in range(args.steps):
        float(step(batch)[0]["objective"])
    wall_ms = (time.perf_counter() - begin) * 1e3 / args.steps
    tf.profiler.experimental.stop()

    totals = op_times(logdir)
    by_type = collections.defaultdict(lambda: [0.0, 0])
    for (op_type, _), (us, count) in totals.items():
        by_type[op_type][0] += us
        by_type[op_type][1] += count
    all_ms = sum(us for us, _ in by_type.values()) / 1e3 / args.steps
    print(f"{args.config} {args.hpconfig}: wall {wall_ms:.0f} ms/step, op time {all_ms:.0f} ms/step "
          f"(summed over threads), profile in {logdir}")
    per_step = [{"type": t, "ms": us / 1e3 / args.steps, "count": count / args.steps}
                for t, (us, count) in sorted(by_type.items(), key=lambda kv: -kv[1][0])[:args.top]]
    harness.print_table([Column("op type", "type"), Column("ms/step", "ms", ".1f"),
                         Column("share", lambda r: r["ms"] / all_ms, ".1%"), Column("ops/step", "count", ".0f")],
                        per_step)
    if args.by_name:
        slowest = [{"name": name[-70:], "type": t, "ms": us / 1e3 / args.steps}
                   for (t, name), (us, _) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.top]]
        print()
        harness.print_table([Column("op name", "name"), Column("type", "type"), Column("ms/step", "ms", ".1f")],
                            slowest)


if __name__ == "__main__":
    main()
