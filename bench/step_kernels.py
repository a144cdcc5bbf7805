"""What a training step asks of the device, counted on a CPU (float32, one replica), and where its time goes.

  ops/step       executor ops per call of trainer.train_step (TF profiler, --steps calls after warm-up),
                 a compiled XLA program counted as one op; without XLA each is at least one GPU launch.
  XLA launches   of those, compiled programs launched.
  XLA kernels    the kernels of the step's own compiled functions (STEP_ROLES: with jit, its gradients and
                 update; without, the update when xla_programs is on): the top-level instructions of the
                 entry computation XLA's CPU backend dumps, calls inlined, a conditional's larger branch
                 and a while loop's body counted once. The GPU backend's fusion is close to, not the same.
  host trips     calls from Python into the runtime (tf.function calls, iterator next()) and blocking
                 tensor reads, per step of a real train.train run after its first 10 one-step calls
                 (--loop_steps steps); --sites says where they come from.
  s/step, vs conv  those steps' median seconds; model GFLOP/s over a same-process 3x3 conv's (float32).
  --types N      the N op types that take most of a step's time (summed over the executor's threads, so
                 the total can exceed the wall time; convolutions under oneDNN's kernel names).

Usage:
  python bench/step_kernels.py --configs cpu_quick --jit off,on --steps 3 --loop_steps 60   # quick
  python bench/step_kernels.py --configs readme_recipe --baseline /tmp/iaf-baseline
  python bench/step_kernels.py --configs readme_recipe --jit off --steps 2 --loop_steps 4 --types 30
"""

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column, ratio

STEP_ROLES = ("_gradients", "_update", "train_step")  # the compiled functions a training step launches


# --------------------------------------------------------------------------------------- XLA modules

_TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}


def hlo_computations(text):
    """({computation name: [(opcode, rest of line)]}, entry name) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and "(" in line:
            name = (line.split()[1] if line.startswith("ENTRY") else line.split()[0]).lstrip("%")
            current = computations.setdefault(name, [])
            entry = name if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            rest = line.split(" = ", 1)[1]
            if rest.startswith("("):  # a tuple shape, with spaces in it
                depth = 0
                for i, char in enumerate(rest):
                    depth += (char == "(") - (char == ")")
                    if depth == 0:
                        break
                rest = rest[i + 1:].lstrip()
            else:
                rest = rest.split(" ", 1)[1] if " " in rest else ""
            current.append((rest.split("(", 1)[0], rest))
    return computations, entry


def _called(rest, *keys):
    names = []
    for key in keys:
        for match in re.finditer(rf"{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", rest):
            names += [n.strip().lstrip("%") for n in match.group(1).strip("{}").split(",") if n.strip()]
    return names


def kernel_counts(computations, name, seen=()):
    """{opcode: count} of the kernels a run of computation `name` launches (see the module docstring)."""
    counts = collections.Counter()
    for opcode, rest in computations.get(name, []):
        if opcode in _TRIVIAL:
            continue
        if opcode == "call":
            for callee in _called(rest, "to_apply"):
                if callee not in seen:
                    counts += kernel_counts(computations, callee, seen + (name,))
            continue
        counts[opcode] += 1
        if opcode == "conditional":
            branches = [kernel_counts(computations, b, seen + (name,)) for b in
                        _called(rest, "branch_computations", "true_computation", "false_computation")]
            counts += max(branches, key=lambda c: sum(c.values()), default=collections.Counter())
        elif opcode == "while":
            for callee in _called(rest, "body", "condition"):
                counts += kernel_counts(computations, callee, seen + (name,))
    return counts


def step_modules(dump_dir):
    """{role: (kernels, {opcode: count})} of the step's compiled functions in an XLA dump (the largest
    module of each, should a function have been compiled more than once)."""
    found = {}
    for path in sorted(Path(dump_dir).glob("*after_optimizations.txt")):
        match = re.search(r"inference_(.+?)_\d+__", path.name)
        if match and match.group(1) in STEP_ROLES:
            counts = kernel_counts(*hlo_computations(path.read_text()))
            if sum(counts.values()) > found.get(match.group(1), (0,))[0]:
                found[match.group(1)] = (sum(counts.values()), dict(counts.most_common()))
    return found


# ----------------------------------------------------------------------------------- profiler events

# An executor op's event is "op name:OpType" (op names have no spaces or colons). The rest of the host
# plane is not ops: the runtime's annotations (ThreadpoolListener::Record, ExecutorState::Process, ...),
# eager scaffolding ("EagerLocalExecute: __inference_..") and XLA's thunks ("ThunkExecutor::Execute",
# "fusion.3"). A compiled program's launch, "CpuExecutable::ExecuteAsyncOnStream", is one op.
_EXECUTOR_OP = re.compile(r"^([A-Za-z0-9.][A-Za-z0-9_.\-/>]*):([A-Za-z0-9_]+)$")
_ANNOTATIONS = {"Process", "Run", "Record", "StartRegion", "StopRegion", "Start", "Done"}
XLA_LAUNCH = "(XLA launch)"


def classify(event_name):
    """(op type, op name) of an executor op or XLA launch event, else None."""
    if event_name.endswith("Executable::ExecuteAsyncOnStream"):
        return XLA_LAUNCH, event_name
    match = _EXECUTOR_OP.match(event_name)
    if not match or match.group(2) in _ANNOTATIONS or match.group(2).startswith("__inference"):
        return None
    return match.group(2), match.group(1)


def op_types(profile_dir):
    """{op type: [total ms, count]} of the executor's ops on the host plane of a profile."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    totals = collections.defaultdict(lambda: [0.0, 0])
    for path in glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace.FromString(Path(path).read_bytes())
        for plane in (p for p in space.planes if p.name.startswith("/host:CPU")):
            for event in (e for line in plane.lines for e in line.events):
                kind = classify(plane.event_metadata[event.metadata_id].name)
                if kind:
                    totals[kind[0]][0] += event.duration_ps / 1e9
                    totals[kind[0]][1] += 1
    return totals


# -------------------------------------------------------------------------------------- host trips

class HostTrips:
    """Counts, while active, the outermost eager calls into tf.functions and data iterators, and the
    blocking reads of eager tensors (class-level wrappers, undone by close)."""

    def __init__(self):
        import tensorflow as tf
        from tensorflow.python.data.ops import iterator_ops
        from tensorflow.python.distribute import input_lib
        from tensorflow.python.eager.polymorphic_function import polymorphic_function
        from tensorflow.python.framework import ops

        self.active, self.depth, self.undo = False, 0, []
        self.counts, self.sites = collections.Counter(), collections.Counter()
        for cls, attribute, kind in ((ops._EagerTensorBase, "_numpy", "reads"),
                                     (polymorphic_function.Function, "__call__", "calls"),
                                     (iterator_ops.OwnedIterator, "__next__", "calls"),
                                     (input_lib.DistributedIteratorBase, "__next__", "calls")):
            original = cls.__dict__[attribute]

            def wrapped(*args, _original=original, _kind=kind, **kwargs):
                if self.active and self.depth == 0 and tf.executing_eagerly():
                    self.counts[_kind] += 1
                    self.sites[f"{_kind} {self._site()}"] += 1
                self.depth += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.depth -= 1

            setattr(cls, attribute, wrapped)
            self.undo.append((cls, attribute, original))

    @staticmethod
    def _site():
        """file:line of the nearest caller outside TensorFlow and this file."""
        frame = sys._getframe(2)
        while frame and ("/tensorflow/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}" if frame else "?"

    def close(self):
        for cls, attribute, original in reversed(self.undo):
            setattr(cls, attribute, original)


# ------------------------------------------------------------------------------------------ children

def child_measure(args):
    import tensorflow as tf
    from iaf_tf import train

    cfg = harness.config(args.config, args.hpconfig, "float32", args.jit_compile,
                         steps_per_loop=args.steps_per_loop, xla_programs=args.xla_programs)
    first, last = harness.FIRST_CALLS, harness.FIRST_CALLS + args.loop_steps
    logdir = tempfile.mkdtemp(prefix="iaf_kernels_")
    loop_cfg = harness.loop_config(cfg, logdir, last, args.data_dir)
    trainer = train.Trainer(loop_cfg)
    probe = harness.ConvProbe(tf.float32, **harness.CONV_SHAPE)
    trips = HostTrips()
    window = {"calls": 0, "in_call": 0}

    def on_step(r):
        # The window opens at the end of the last one-step call; the probe runs between calls, uncounted.
        if r.step == first:
            probe.run(reps=2)
            window["begin"], trips.active = time.perf_counter(), True
        elif r.step > first:
            window["in_call"] += 1
            if window["in_call"] == r.steps_in_call:  # the call's last step
                window["calls"] += 1
                window["in_call"], trips.active = 0, False
                probe.run(reps=1)
                trips.active = r.step < last

    try:
        records, _ = harness.run_loop(loop_cfg, on_step=on_step, trainer=trainer)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
        trips.close()
    timed = [r.seconds for r in records if r.step > first]

    # The step function alone, profiled after one untimed call.
    step, batch = trainer.train_step, tf.constant(harness.batch_images(cfg, cfg.optimization.batch_size,
                                                                         args.data_dir))
    float(step(batch)[0]["objective"])
    profile_dir = tempfile.mkdtemp(prefix="iaf_kernels_profile_")
    try:
        tf.profiler.experimental.start(profile_dir)
        begin = time.perf_counter()
        for _ in range(args.steps):
            float(step(batch)[0]["objective"])
        wall_ms = (time.perf_counter() - begin) * 1e3 / args.steps
        tf.profiler.experimental.stop()
        types = {t: [ms / args.steps, n / args.steps] for t, (ms, n) in op_types(profile_dir).items()}
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    modules = step_modules(args.xla_dump) if args.xla_dump else {}
    return {
        "batch_size": cfg.optimization.batch_size, "ops_per_step": sum(n for _, n in types.values()),
        "op_types": dict(sorted(types.items(), key=lambda kv: -kv[1][0])), "profiled_wall_ms": wall_ms,
        "xla_launches_per_step": types.get(XLA_LAUNCH, [0, 0])[1],
        "xla_kernels_per_step": sum(k for k, _ in modules.values()) if modules else None,
        "xla_modules": modules, "window_steps": len(timed), "window_calls": window["calls"],
        "host_calls": trips.counts["calls"], "host_reads": trips.counts["reads"],
        "host_sites": dict(trips.sites.most_common()), "step_s": statistics.median(timed) if timed else None,
        "step_s_all": [r.seconds for r in records], **harness.probe_rates({"float32": probe}),
        "peak_mib": harness.peak_mib()}


# -------------------------------------------------------------------------------------------- parent

def add_figures(r, flops):
    trips = r["host_calls"] + r["host_reads"]
    r["trips_per_step"] = ratio(trips, r["window_steps"])
    r["trips_per_call"] = ratio(trips, r["window_calls"])
    r["steps_per_call"] = ratio(r["window_steps"], r["window_calls"])
    r["images_per_s"] = ratio(r["batch_size"], r["step_s"])
    gflops = ratio(flops.get("training", 0) * r["batch_size"] / 1e9, r["step_s"])
    r["vs_conv"] = ratio(gflops, r["conv_gflops"].get("float32"))


COLUMNS = [Column("config", "config"), Column("checkout", "code"), Column("jit", "jit"),
           Column("ops/step", "ops_per_step", ".0f"), Column("XLA\nlaunches", "xla_launches_per_step", ".0f"),
           Column("XLA kernels\n/step", "xla_kernels_per_step", "d"),
           Column("host trips\n/step", "trips_per_step", ".2f"), Column("trips\n/call", "trips_per_call", ".1f"),
           Column("steps\n/call", "steps_per_call", ".1f"), Column("s/step", "step_s", ".3f"),
           Column("img/s", "images_per_s", ".1f"), Column("vs conv", "vs_conv", ".3f")]


def print_details(r, args):
    label = f"{r['config']} {r['code']} jit {r['jit']}"
    if r["xla_modules"]:
        print(f"{label}: XLA kernels by function: " + "; ".join(
            f"{role} {n} (" + ", ".join(f"{op} {c}" for op, c in list(by_opcode.items())[:6]) + ")"
            for role, (n, by_opcode) in r["xla_modules"].items()))
    if args.types:
        op_ms = sum(ms for ms, _ in r["op_types"].values())
        harness.print_table(
            [Column("op type", "type"), Column("ms/step", "ms", ".1f"), Column("share", "share", ".1%"),
             Column("ops/step", "count", ".0f")],
            [{"type": t, "ms": ms, "share": ms / op_ms, "count": n}
             for t, (ms, n) in list(r["op_types"].items())[:args.types]],
            title=f"\n{label}: wall {r['profiled_wall_ms']:.0f} ms/step, op time {op_ms:.0f} ms/step "
                  "(summed over threads)")
    if args.sites:
        print(f"{label}: host calls and reads in {r['window_steps']} steps: " + "; ".join(
            f"{site} x{n}" for site, n in r["host_sites"].items()))


def main():
    parser = harness.arguments(__doc__, configs="cpu_quick,readme_recipe,table3", baseline=True)
    parser.add_argument("--jit", default="off,on", help="jit_compile settings to run: off, on or off,on")
    parser.add_argument("--steps", type=int, default=2, help="profiled calls of train_step per child")
    parser.add_argument("--loop_steps", type=int, default=None,
                        help="train.train steps counted after its first 10 one-step calls "
                             "(default: steps_per_loop for cpu_quick, 4 for the other presets)")
    parser.add_argument("--steps_per_loop", type=int, default=20)
    parser.add_argument("--xla_programs", default="on", choices=("on", "off", "auto"),
                        help="on (the default): what a GPU runs without jit_compile; auto: this host's default")
    parser.add_argument("--types", type=int, default=0, help="also list the N op types that take most time")
    parser.add_argument("--sites", action="store_true", help="also list where the host calls and reads come from")
    parser.add_argument("--xla_dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.xla_dump:  # before TensorFlow is imported
            os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={args.xla_dump}",
                                                "--xla_dump_hlo_as_text"]).strip()
        return harness.run_as_child(args, {"measure": child_measure})

    rows = []
    for config in harness.listed(args.configs):
        loop_steps = args.loop_steps or (args.steps_per_loop if config == "cpu_quick" else 4)
        flops = harness.flops_per_image(__file__, config, args.hpconfig)
        for jit in harness.jit_settings(args.jit):
            for code, root in harness.checkouts(args):
                begin, dump = time.time(), tempfile.mkdtemp(prefix="iaf_xla_dump_")
                try:
                    r = harness.run_child(Path(__file__).resolve(), [
                        "--child", "measure", "--root", root, "--config", config, "--hpconfig", args.hpconfig,
                        "--steps", args.steps, "--loop_steps", loop_steps, "--steps_per_loop", args.steps_per_loop,
                        "--xla_programs", args.xla_programs, "--data_dir", args.data_dir, "--xla_dump", dump]
                        + ["--jit_compile"] * jit)
                finally:
                    shutil.rmtree(dump, ignore_errors=True)
                r.update(config=config, code=code, jit="on" if jit else "off")
                if "error" not in r:
                    add_figures(r, flops)
                rows.append(r)
                print(f"  {config} {code} jit {r['jit']}: {time.time() - begin:.0f} s {r.get('error', '')}",
                      file=sys.stderr)
    harness.print_table(COLUMNS, rows, labels=3, notes=[
        "ops/step: executor ops per train_step call (profiled), an XLA launch counted as one. XLA kernels: "
        "top-level kernels of the step's compiled functions (CPU backend's HLO).",
        f"host trips: tf.function calls, iterator next() and blocking reads from Python, per step of train.train "
        f"after its first {harness.FIRST_CALLS} one-step calls. vs conv: model GFLOP/s over a same-process "
        "3x3 conv's (float32)."], title=(
        f"\nWhat a training step asks of the device (float32, 1 replica; --steps_per_loop {args.steps_per_loop}, "
        f"xla_programs={args.xla_programs})"))
    for r in rows:
        if "error" not in r:
            print_details(r, args)
    harness.save_json(args.json, rows)


if __name__ == "__main__":
    main()
