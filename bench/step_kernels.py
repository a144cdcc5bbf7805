"""What a training step asks of the device, counted on a CPU (float32, one replica), and where its time goes.

  ops/step       executor ops per call of trainer.train_step (TF profiler, --steps calls after one), an XLA
                 program counted as one (XLA launches: how many of them); else each op is a GPU launch.
  XLA kernels    of the step's compiled functions (STEP_ROLES): the top-level instructions of the entry
                 computation in XLA's CPU dump, calls inlined, a conditional's larger branch and a while
                 loop's body once. The GPU backend fuses about, not exactly, the same.
  --types N      the N op types taking most of a step's time, summed over the executor's threads.

Usage:
  python bench/step_kernels.py --configs cpu_quick --jit off,on --steps 3     # quick
  python bench/step_kernels.py --configs readme_recipe --jit off --steps 2 --types 30
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column

STEP_ROLES = ("_gradients", "_update", "train_step")  # the compiled functions a training step launches


# --------------------------------------------------------------------------------------- XLA modules

_TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}


def hlo_computations(text):
    """({computation name: [(opcode, instruction line)]}, entry name) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and "(" in line:
            name = (line.split()[1] if line.startswith("ENTRY") else line.split()[0]).lstrip("%")
            current = computations.setdefault(name, [])
            entry = name if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:  # "%name = shape opcode(operands), attributes"
            opcode = re.search(r"\s([a-z][\w\-]*)\(", " " + line.split(" = ", 1)[1])
            if opcode:
                current.append((opcode.group(1), line))
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


def child_measure(args):
    import tensorflow as tf
    from iaf_tf import train

    cfg = harness.child_config(args, xla_programs=args.xla_programs)
    images = harness.batch_images(cfg, cfg.optimization.batch_size, args.data_dir)
    trainer = train.Trainer(cfg)
    trainer.initialize(images)
    step, batch = trainer.train_step, tf.constant(images)
    float(step(batch)[0]["objective"])
    with tempfile.TemporaryDirectory(prefix="iaf_kernels_profile_") as profile_dir:
        tf.profiler.experimental.start(profile_dir)
        begin = time.perf_counter()
        for _ in range(args.steps):
            float(step(batch)[0]["objective"])
        wall_ms = (time.perf_counter() - begin) * 1e3 / args.steps
        tf.profiler.experimental.stop()
        types = {t: [ms / args.steps, n / args.steps] for t, (ms, n) in op_types(profile_dir).items()}
    modules = step_modules(args.xla_dump)
    return {"ops_per_step": sum(n for _, n in types.values()), "profiled_ms": wall_ms,
            "op_types": dict(sorted(types.items(), key=lambda kv: -kv[1][0])),
            "xla_launches_per_step": types.get(XLA_LAUNCH, [0, 0])[1],
            "xla_kernels_per_step": sum(k for k, _ in modules.values()) if modules else None,
            "xla_modules": modules, "peak_mib": harness.peak_mib()}


COLUMNS = [Column("config", "config"), Column("checkout", "code"), Column("jit", "jit"),
           Column("ops/step", "ops_per_step", ".0f"), Column("XLA launches", "xla_launches_per_step", ".0f"),
           Column("XLA kernels/step", "xla_kernels_per_step", "d"), Column("ms/step (profiled)", "profiled_ms", ".0f"),
           Column("peak MiB", "peak_mib", ".0f")]


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
            title=f"\n{label}: op time {op_ms:.0f} ms/step (summed over threads)")


def main():
    parser = harness.arguments(__doc__, configs="cpu_quick,readme_recipe,table3", baseline=True)
    parser.add_argument("--jit", default="off,on", help="jit_compile settings to run: off, on or off,on")
    parser.add_argument("--steps", type=int, default=2, help="profiled calls of train_step per child")
    parser.add_argument("--xla_programs", default="on", choices=("on", "off", "auto"),
                        help="on (the default): what a GPU runs without jit_compile; auto: this host's default")
    parser.add_argument("--types", type=int, default=0, help="also list the N op types that take most time")
    parser.add_argument("--xla_dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # XLA's flags before TensorFlow is imported
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={args.xla_dump}",
                                            "--xla_dump_hlo_as_text"]).strip()
        return harness.run_as_child(args, {"measure": child_measure})

    rows = []
    for config in harness.listed(args.configs):
        for jit in [{"off": False, "on": True}[j] for j in harness.listed(args.jit)]:
            for code, root in harness.checkouts(args):
                begin = time.time()
                with tempfile.TemporaryDirectory(prefix="iaf_xla_dump_") as dump:
                    r = harness.run_child(Path(__file__).resolve(), [
                        "--child", "measure", "--root", root, "--config", config, "--hpconfig", args.hpconfig,
                        "--steps", args.steps, "--xla_programs", args.xla_programs, "--data_dir", args.data_dir,
                        "--xla_dump", dump] + ["--jit_compile"] * jit)
                rows.append(dict(r, config=config, code=code, jit="on" if jit else "off"))
                print(f"  {config} {code} jit {rows[-1]['jit']}: {time.time() - begin:.0f} s {r.get('error', '')}",
                      file=sys.stderr)
    harness.print_table(COLUMNS, rows, labels=3, notes=["The columns: python bench/step_kernels.py --help"], title=(
        f"\nWhat a training step asks of the device (float32, 1 replica, xla_programs={args.xla_programs})"))
    for r in rows:
        if "error" not in r:
            print_details(r, args)
    harness.save_json(args.json, rows)


if __name__ == "__main__":
    main()
