"""What a training step asks of the device, counted on a CPU: what decides GPU speed.

For each config, checkout (this one, and --baseline DIR side by side) and jit_compile off/on, one child
process (float32, one replica) reports:

  ops/step       TF ops the executor dispatches per call of trainer.train_step, from a profiler trace of
                 --steps steps after warm-up (bench/profile_step.py's rules: the runtime's annotations --
                 ThreadpoolListener::Record/StartRegion/StopRegion, ExecutorState::Process/Start/Done --
                 are not ops; a compiled XLA program is one op, its launch "CpuExecutable::
                 ExecuteAsyncOnStream"; its thunks "ThunkExecutor::Execute" are not). Without XLA each
                 of these ops is at least one GPU kernel launch.
  XLA launches   of those, compiled programs launched per step.
  XLA kernels    kernels in the compiled programs the step launches: the non-trivial top-level
                 instructions of the entry computation of each `*after_optimizations.txt` module XLA
                 dumps (fusion, convolution, custom-call, copy, ...; parameter, constant, tuple,
                 get-tuple-element and bitcast left out; a call's computation counted in place, a
                 conditional as itself plus its larger branch, a while loop as itself plus one iteration).
                 Counted on XLA's CPU backend: its fusion is close to, not the same as, the GPU's (which
                 also fuses independent small loops side by side, e.g. the per-variable updates).
                 With xla_programs on (--xla_programs, default on: a GPU's default) the current
                 checkout compiles the update (`Trainer._update`), so jit off has XLA kernels too.
                 Only the step's own functions (STEP_ROLES) are counted: without jit the small
                 programs of iaf_tf/programs.py (weight norm, noise) are in "XLA launches", not in
                 this column.
  host calls/step, reads/step
                 during a real `train.train` run (bench data, no summaries or checkpoints in between),
                 after its first 10 one-step host calls, for --loop_steps steps: the calls from Python
                 into the runtime that run a step (tf.function calls, and `next()` of a data iterator
                 from Python), and the blocking reads of a tensor's value (`_EagerTensorBase._numpy`,
                 behind .numpy(), bool(), int(), float(), index()); --sites says where they come from.
                 A read waits until the device has produced the tensor; a call returns once the runtime
                 has dispatched the function. "trips/call" is both per host call of the step function.
  s/step, img/s  median of those steps' StepRecord.seconds (a multi-step call's time shared out), and
                 "vs conv": model GFLOP/s (iaf_tf.flops, this checkout's count for both) over the GFLOP/s
                 of a plain 3x3 conv (harness.ConvProbe) timed in the same process between host calls.

Children run one after the other, interleaved between checkouts for each (config, jit).

Usage:
  python bench/step_kernels.py --configs cpu_quick --baseline /tmp/iaf-baseline        # quick (~3 min)
  python bench/step_kernels.py --configs readme_recipe --baseline /tmp/iaf-baseline    # slow (~15 min)
  python bench/step_kernels.py --configs table3 --jit off --types 15                   # + top op types
  python bench/step_kernels.py --configs cpu_quick --steps_per_loop 50 --loop_steps 100
"""

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column

FIRST_CALLS = 10  # train.train's first host calls run one step each (its first console lines)
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


def xla_modules(dump_dir):
    """[{file, function, role, kernels, by_opcode}] for every optimized module XLA dumped."""
    modules = []
    for path in sorted(Path(dump_dir).glob("*after_optimizations.txt")):
        computations, entry = hlo_computations(path.read_text())
        counts = kernel_counts(computations, entry)
        function = path.name.split(".")[1] if path.name.count(".") > 1 else path.name
        match = re.search(r"inference_(.+?)_\d+__", function)
        role = match.group(1) if match else function
        modules.append({"file": path.name, "function": function, "role": role,
                        "kernels": sum(counts.values()), "by_opcode": dict(counts.most_common())})
    return modules


def step_kernels(modules):
    """Kernels per step: one launch of each of the step's compiled functions (the largest module of each,
    should a function have been compiled more than once)."""
    per_role = {}
    for m in modules:
        if m["role"] in STEP_ROLES:
            per_role[m["role"]] = max(per_role.get(m["role"], 0), m["kernels"])
    return sum(per_role.values()) if per_role else None, per_role


# -------------------------------------------------------------------------------------- host trips

class HostTrips:
    """Counts, while active, the calls from Python into compiled functions and data iterators, and the
    blocking reads of eager tensors (class-level wrappers, undone by close). Only outermost eager calls
    count: what a call does inside (or a function traced inside another) is not a trip from Python."""

    def __init__(self):
        import tensorflow as tf
        from tensorflow.python.data.ops import iterator_ops
        from tensorflow.python.distribute import input_lib
        from tensorflow.python.eager.polymorphic_function import polymorphic_function
        from tensorflow.python.framework import ops

        self._tf = tf
        self.active = False
        self.counts = collections.Counter()
        self.sites = collections.Counter()
        self._depth = 0
        self._undo = []
        for cls, attribute, kind in ((ops._EagerTensorBase, "_numpy", "reads"),
                                     (polymorphic_function.Function, "__call__", "calls"),
                                     (iterator_ops.OwnedIterator, "__next__", "calls"),
                                     (input_lib.DistributedIteratorBase, "__next__", "calls")):
            self._wrap(cls, attribute, kind)

    def _wrap(self, cls, attribute, kind):
        original = cls.__dict__[attribute]
        counter = self

        def wrapped(*args, **kwargs):
            if counter.active and counter._depth == 0 and counter._tf.executing_eagerly():
                counter.counts[kind] += 1
                counter.sites[f"{kind} {counter._site()}"] += 1
            counter._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth -= 1

        setattr(cls, attribute, wrapped)
        self._undo.append((cls, attribute, original))

    @staticmethod
    def _site():
        """file:line of the nearest caller outside TensorFlow and this file."""
        frame = sys._getframe(2)
        while frame and ("/tensorflow/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        if frame is None:
            return "?"
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"

    def close(self):
        for cls, attribute, original in reversed(self._undo):
            setattr(cls, attribute, original)


# ------------------------------------------------------------------------------------------ children

def child_measure(lib, args):
    import tensorflow as tf
    from iaf_tf import data
    import profile_step

    cfg = lib.config(args.config, args.hpconfig, "float32", args.jit_compile, steps_per_loop=args.steps_per_loop,
                     xla_programs=args.xla_programs)
    batch_size = lib.sizes(cfg).batch_size
    logdir = tempfile.mkdtemp(prefix="iaf_kernels_")
    last = FIRST_CALLS + args.loop_steps
    loop_cfg = lib.loop_config(cfg, logdir, last, args.data_dir)
    trainer = lib.make_trainer(loop_cfg)
    probe = harness.ConvProbe(tf.float32, **harness.CONV_SHAPE)
    trips = HostTrips()
    window = {"calls": 0, "in_call": 0, "begin": None}
    # The window opens at the end of the last one-step host call (what follows it, the 10th console
    # line, reads no tensor).
    first = FIRST_CALLS

    def on_step(r):
        if r.step == first:
            probe.run(reps=2)
            window["begin"] = time.perf_counter()
            trips.active = True
        elif r.step > first:
            window["in_call"] += 1
            if window["in_call"] == r.steps_in_call:  # the call's last step
                window["calls"] += 1
                window["in_call"] = 0
                trips.active = False
                probe.run(reps=1)
                trips.active = r.step < last
        if r.step == last:
            trips.active = False
            window["seconds"] = time.perf_counter() - window["begin"]

    try:
        records = lib.run_loop(loop_cfg, on_step=on_step, trainer=trainer)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
        trips.close()
    timed = [r.seconds for r in records if r.step > first]
    window_steps = len(timed)

    # The step function alone, profiled (one untimed call first: this checkout traces train_step
    # afresh when called from Python rather than inside train_loop).
    images = data.load_cifar10("test", args.data_dir)[:batch_size]
    step = lib.step_function(trainer)
    batch = tf.constant(images)
    float(step(batch)[0]["objective"])
    profile_dir = tempfile.mkdtemp(prefix="iaf_kernels_profile_")
    try:
        tf.profiler.experimental.start(profile_dir)
        for _ in range(args.steps):
            float(step(batch)[0]["objective"])
        tf.profiler.experimental.stop()
        types = profile_step.by_type(profile_step.op_times(profile_dir))
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    op_types = {t: count / args.steps for t, (_, count) in sorted(types.items(), key=lambda kv: -kv[1][1])}

    modules = xla_modules(args.xla_dump) if args.xla_dump else []
    kernels, per_role = step_kernels(modules)
    return {
        "batch_size": batch_size,
        "ops_per_step": sum(op_types.values()), "op_types": op_types,
        "xla_launches_per_step": op_types.get(profile_step.XLA_LAUNCH, 0.0),
        "xla_kernels_per_step": kernels, "xla_kernels_by_role": per_role,
        "xla_modules": [{k: m[k] for k in ("function", "role", "kernels", "by_opcode")} for m in modules],
        "window_steps": window_steps, "window_calls": window["calls"], "host_calls": trips.counts["calls"],
        "host_reads": trips.counts["reads"], "host_sites": dict(trips.sites.most_common()),
        "step_s": statistics.median(timed) if timed else None, "step_s_all": [r.seconds for r in records],
        "steps_in_call": max((r.steps_in_call for r in records if r.step > first), default=None),
        "window_s": window.get("seconds"), **harness.probe_rates({"float32": probe}), "peak_mib": harness.peak_mib()}


def child_flops(lib, args):
    from iaf_tf import flops
    cfg = lib.config(args.config, args.hpconfig)
    return {"training_flops_per_image": flops.training_flops_per_image(lib.make_model(cfg))}


def run_as_child(args):
    if args.xla_dump:  # before TensorFlow is imported (load_library imports it)
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={args.xla_dump}",
                                            "--xla_dump_hlo_as_text"]).strip()
    lib = harness.load_library(args.root)
    harness.write_record(args.record, globals()[f"child_{args.child}"](lib, args))


# -------------------------------------------------------------------------------------------- parent

def run_child(kind, root, config, args, jit=False):
    dump = tempfile.mkdtemp(prefix="iaf_xla_dump_") if kind == "measure" else None
    argv = ["--child", kind, "--root", root, "--config", config, "--hpconfig", args.hpconfig,
            "--steps", args.steps, "--loop_steps", args.loop_steps, "--steps_per_loop", args.steps_per_loop,
            "--xla_programs", args.xla_programs, "--data_dir", args.data_dir] + (["--jit_compile"] if jit else []) + (
                ["--xla_dump", dump] if dump else [])
    try:
        return harness.run_child(Path(__file__).resolve(), argv)
    finally:
        if dump:
            shutil.rmtree(dump, ignore_errors=True)


def ratio(a, b):
    return a / b if a is not None and b else None


def add_figures(r, flops_image):
    steps = r["window_steps"]
    r["calls_per_step"] = ratio(r["host_calls"], steps)
    r["reads_per_step"] = ratio(r["host_reads"], steps)
    r["trips_per_step"] = ratio(r["host_calls"] + r["host_reads"], steps)
    r["trips_per_call"] = ratio(r["host_calls"] + r["host_reads"], r["window_calls"])
    r["steps_per_call"] = ratio(steps, r["window_calls"])
    r["images_per_s"] = ratio(r["batch_size"], r["step_s"])
    gflops = flops_image * r["batch_size"] / r["step_s"] / 1e9 if flops_image and r["step_s"] else None
    r["vs_conv"] = ratio(gflops, r["conv_gflops"].get("float32"))


COLUMNS = [Column("config", "config"), Column("checkout", "code"), Column("jit", "jit"),
           Column("ops/step", "ops_per_step", ".0f"), Column("XLA\nlaunches", "xla_launches_per_step", ".0f"),
           Column("XLA kernels\n/step", "xla_kernels_per_step", "d"),
           Column("host calls\n/step", "calls_per_step", ".2f"), Column("reads\n/step", "reads_per_step", ".2f"),
           Column("host trips\n/step", "trips_per_step", ".2f"), Column("trips\n/call", "trips_per_call", ".1f"),
           Column("steps\n/call", "steps_per_call", ".1f"), Column("s/step", "step_s", ".3f"),
           Column("img/s", "images_per_s", ".1f"), Column("vs conv", "vs_conv", ".3f")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="cpu_quick,readme_recipe,table3", help="presets, comma-separated")
    parser.add_argument("--baseline", default=None, help="another checkout to run side by side")
    parser.add_argument("--jit", default="off,on", help="jit_compile settings to run: off, on or off,on")
    parser.add_argument("--steps", type=int, default=2, help="profiled calls of train_step per child")
    parser.add_argument("--loop_steps", type=int, default=None,
                        help="steps of train.train counted and timed after its first 10 one-step calls "
                             "(default: steps_per_loop for cpu_quick, 4 for the other presets)")
    parser.add_argument("--steps_per_loop", type=int, default=20)
    parser.add_argument("--xla_programs", default="on", choices=("on", "off", "auto"),
                        help="on (the default): what a GPU runs without jit_compile; auto: this host's default")
    parser.add_argument("--hpconfig", default="", help="extra overrides for every config")
    parser.add_argument("--types", type=int, default=0, help="also list the N most frequent op types")
    parser.add_argument("--sites", action="store_true", help="also list where the host calls and reads come from")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    parser.add_argument("--json", default=None, help="also write all records here")
    # Child-process arguments.
    parser.add_argument("--child", default=None, choices=("measure", "flops"), help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(harness.ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jit_compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xla_dump", default=None, help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return run_as_child(args)

    codes = [("current", harness.ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    jits = [{"off": False, "on": True}[j] for j in args.jit.split(",") if j]
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        loop_steps = args.loop_steps or (args.steps_per_loop if config == "cpu_quick" else 4)
        child_args = argparse.Namespace(**{**vars(args), "loop_steps": loop_steps})
        flops = run_child("flops", harness.ROOT, config, child_args)
        if "error" in flops:
            print(f"  flops {config}: {flops['error']}", file=sys.stderr)
        for jit in jits:
            for code, root in codes:
                begin = time.time()
                r = run_child("measure", root, config, child_args, jit)
                r.update(config=config, code=code, jit="on" if jit else "off")
                if "error" not in r:
                    add_figures(r, flops.get("training_flops_per_image"))
                rows.append(r)
                # The row so far, should the run be cut short.
                print(f"  {config} {code} jit {r['jit']}: {time.time() - begin:.0f} s " + (r.get("error") or json.dumps(
                    {c.header.replace(chr(10), " "): c.cell(r) for c in COLUMNS[3:]})), file=sys.stderr)
    notes = [
        "ops/step: executor ops per train_step call (profiled), an XLA launch counted as one. XLA kernels: "
        "top-level kernels of the step's compiled functions, gradients and update (CPU backend's HLO).",
        "host calls: tf.function calls and iterator next() from Python; reads: blocking tensor reads; per step "
        f"of train.train after its first {FIRST_CALLS} one-step calls (steps/call: how many steps each call ran).",
        "vs conv: model GFLOP/s over the same process's plain 3x3 conv GFLOP/s (float32)."]
    harness.print_table(COLUMNS, rows, labels=3, notes=notes, title=(
        f"\nWhat a training step asks of the device (float32, 1 replica; --steps_per_loop {args.steps_per_loop}, "
        f"xla_programs={args.xla_programs})"))
    for r in rows:
        if "error" in r:
            continue
        label = f"{r['config']} {r['code']} jit {r['jit']}"
        if r["xla_kernels_by_role"]:
            print(f"{label}: XLA kernels by function " + ", ".join(
                f"{role} {n}" for role, n in r["xla_kernels_by_role"].items()) + "; by opcode " + "; ".join(
                f"{m['role']}: " + ", ".join(f"{op} {n}" for op, n in list(m["by_opcode"].items())[:6])
                for m in r["xla_modules"] if m["role"] in STEP_ROLES))
        if args.types:
            print(f"{label}: top op types per step: " + ", ".join(
                f"{t} {n:.0f}" for t, n in list(r["op_types"].items())[:args.types]))
        if args.sites:
            print(f"{label}: host calls and reads in {r['window_steps']} steps: " + "; ".join(
                f"{site} x{n}" for site, n in r["host_sites"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
