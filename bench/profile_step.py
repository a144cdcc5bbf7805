"""Where a training step's time goes: TF profiler trace of a few steps, summed by op type.

Op times are summed over the executor's threads (inter-op parallel ops overlap, so the total can exceed
the wall time). Convolutions appear under the names of the oneDNN kernels that run them. Only executor
ops are counted (not the runtime's annotations around them); a compiled XLA program is one op,
"(XLA launch)", whose time includes everything it runs (bench/step_kernels.py counts its kernels).

Usage:
  python bench/profile_step.py                          # full: README recipe, 2 profiled steps
  python bench/profile_step.py --config cpu_quick       # quick
  python bench/profile_step.py --config cpu_quick --jit_compile
  python bench/profile_step.py --hpconfig batch_size=8 --steps 3 --top 40 --by_name
  python bench/profile_step.py --root /tmp/iaf-baseline # another checkout (older APIs too)
"""

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from pathlib import Path

import harness
from harness import Column

# An executor op's event is "op name:OpType" (TensorFlow op names have no spaces and no colons). What
# else the host plane holds is not an op: the runtime's annotations ("ThreadpoolListener::Record",
# "::StartRegion", "::StopRegion", "ExecutorState::Process", "ExecutorState::ProcessAsync::Start" and
# "::Done", "KernelAndDeviceFunc::Run"), Python and eager scaffolding ("EagerLocalExecute: __inference_..",
# "train_step"), and XLA's thunks inside a compiled program ("ThunkExecutor::Execute", "end: fusion.3",
# "fusion.3"). A compiled program's launch is one event "CpuExecutable::ExecuteAsyncOnStream" (GPU:
# "GpuExecutable::..."), counted as one op of type XLA_LAUNCH: the executor dispatches it as one.
_EXECUTOR_OP = re.compile(r"^([A-Za-z0-9.][A-Za-z0-9_.\-/>]*):([A-Za-z0-9_]+)$")
_ANNOTATIONS = {"Process", "Run", "Record", "StartRegion", "StopRegion", "Start", "Done"}
XLA_LAUNCH = "(XLA launch)"


def classify(event_name):
    """(op type, op name) of an executor op or XLA launch event, else None."""
    if event_name.endswith("Executable::ExecuteAsyncOnStream"):
        return XLA_LAUNCH, event_name
    match = _EXECUTOR_OP.match(event_name)
    if not match:
        return None
    op_name, op_type = match.groups()
    if op_type in _ANNOTATIONS or op_type.startswith("__inference"):
        return None
    return op_type, op_name


def op_times(logdir):
    """{(op type, op name): (total µs, count)} of the executor's ops (and XLA launches, as one op each)
    on the host plane of the xplane files under logdir."""
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
                    kind = classify(metadata[event.metadata_id].name)
                    if kind is None:
                        continue
                    entry = totals[kind]
                    entry[0] += event.duration_ps / 1e6
                    entry[1] += 1
    return totals


def by_type(totals):
    """{op type: [total µs, count]} from op_times."""
    types = collections.defaultdict(lambda: [0.0, 0])
    for (op_type, _), (us, count) in totals.items():
        types[op_type][0] += us
        types[op_type][1] += count
    return types


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="readme_recipe", help="preset")
    parser.add_argument("--hpconfig", default="")
    parser.add_argument("--root", default=str(harness.ROOT), help="checkout to profile")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--by_name", action="store_true", help="also list the slowest individual ops")
    parser.add_argument("--jit_compile", action="store_true", help="the config's jit_compile on")
    parser.add_argument("--inter_op", type=int, default=0,
                        help="inter-op threads (1: ops run one at a time, so each op's time is its own)")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    args = parser.parse_args()

    lib = harness.load_library(args.root, args.inter_op)
    import tensorflow as tf
    from iaf_tf import data

    cfg = lib.config(args.config, args.hpconfig, jit_compile=args.jit_compile)
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
    types = by_type(totals)
    all_ms = sum(us for us, _ in types.values()) / 1e3 / args.steps
    print(f"{args.config} {args.hpconfig}: wall {wall_ms:.0f} ms/step, op time {all_ms:.0f} ms/step "
          f"(summed over threads), profile in {logdir}")
    per_step = [{"type": t, "ms": us / 1e3 / args.steps, "count": count / args.steps}
                for t, (us, count) in sorted(types.items(), key=lambda kv: -kv[1][0])[:args.top]]
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
