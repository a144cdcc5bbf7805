"""What Grappler's failed remapper pass cost: float32 training-step time of two checkouts, interleaved.

Each measurement is a fresh interpreter (TensorFlow's C++ log at level 1, so that Grappler's "remapper
failed" lines are counted) that builds a preset's trainer, runs its data-dependent init and two untimed
steps, then times `--steps` steps with a 3x3 conv probe (harness.ConvProbe) run between them: the
machine is shared, and `step x probe GFLOP/s` compares the two checkouts under the same load. The
children alternate (baseline, this checkout, baseline, ...) for `--rounds` rounds.

Usage:
  python bench/remapper_cost.py --root /tmp/iaf-baseline                        # readme_recipe and table3
  python bench/remapper_cost.py --root /tmp/iaf-baseline --presets cpu_quick --steps 5 --rounds 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column


def child(args):
    lib = harness.load_library(args.child_root)
    import tensorflow as tf
    from iaf_tf import data

    cfg = lib.config(args.preset)
    images = data.load_cifar10("test", args.data_dir)[:lib.sizes(cfg).batch_size]
    trainer = lib.make_trainer(cfg)
    trainer.initialize(images)
    step = lib.step_function(trainer)
    batch = tf.constant(images)
    begin = time.perf_counter()
    objective = float(step(batch)[0]["objective"])  # traced and optimized here
    first = time.perf_counter() - begin
    float(step(batch)[0]["objective"])
    probe = harness.ConvProbe(tf.float32, **harness.CONV_SHAPE)
    seconds = []
    for _ in range(args.steps):
        probe.run(reps=2)
        begin = time.perf_counter()
        float(step(batch)[0]["objective"])
        seconds.append(time.perf_counter() - begin)
    probe.run(reps=2)
    harness.write_record(args.record, {"seconds": seconds, "first_step": first, "objective": objective,
                                       "probe_gflops": probe.gflops()})


def measure(root, preset, steps, data_dir):
    """One child's record, with the number of "remapper failed" lines it logged."""
    with tempfile.TemporaryDirectory(prefix="iaf_bench_") as tmp:
        record = Path(tmp) / "record.json"
        cmd = [sys.executable, __file__, "--record", str(record), "--child_root", str(root), "--preset", preset,
               "--steps", str(steps), "--data_dir", data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1"))
        if proc.returncode != 0 or not record.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
            return {"error": f"exit {proc.returncode}: {tail}"}
        result = json.loads(record.read_text())
    result["remapper_failures"] = proc.stderr.count("remapper failed")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="the checkout to compare with (the baseline); required")
    parser.add_argument("--presets", default="readme_recipe,table3")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child")
    parser.add_argument("--rounds", type=int, default=2, help="children per checkout and preset")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    parser.add_argument("--child_root", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.record:
        return child(args)
    if not args.root:
        parser.error("--root is required")

    roots = {"baseline": Path(args.root).resolve(), "this": harness.ROOT}
    rows = []
    for preset in args.presets.split(","):
        runs = {name: [] for name in roots}
        for _ in range(args.rounds):
            for name, root in roots.items():
                result = measure(root, preset, args.steps, args.data_dir)
                print(f"{preset} {name}: {json.dumps(result)}", flush=True)
                runs[name].append(result)
        for name, results in runs.items():
            good = [r for r in results if "error" not in r]
            if not good:
                rows.append({"preset": preset, "checkout": name, "error": results[0]["error"]})
                continue
            step = statistics.median(s for r in good for s in r["seconds"])
            probe = statistics.median(r["probe_gflops"] for r in good)
            normalized = statistics.median(statistics.median(r["seconds"]) * r["probe_gflops"]
                                           for r in good)
            fastest = min(min(r["seconds"]) for r in good)
            rows.append({"preset": preset, "checkout": name, "step": step, "fastest": fastest,
                         "probe": probe, "normalized": normalized,
                         "first": statistics.median(r["first_step"] for r in good),
                         "objective": good[0]["objective"], "failures": good[0]["remapper_failures"]})
    base = {r["preset"]: r for r in rows if r["checkout"] == "baseline" and "error" not in r}
    harness.print_table(
        [Column("preset", "preset"), Column("checkout", "checkout"), Column("s/step", "step", ".2f"),
         Column("fastest\nstep s", "fastest", ".2f"),
         Column("probe\nGFLOP/s", "probe", ".0f"), Column("s/step x\nGFLOP/s", "normalized", ".0f"),
         Column("vs\nbaseline", lambda r: r["normalized"] / base[r["preset"]]["normalized"]
                if r["preset"] in base else None, ".3f"),
         Column("first\nstep s", "first", ".1f"), Column("remapper\nfailures", "failures", "d"),
         Column("objective\n(step 1)", "objective", ".9g")],
        rows, labels=2, notes=[f"median over {args.rounds} children x {args.steps} steps; normalized: each "
                               "child's median s/step x its conv probe's GFLOP/s, the median over children"])


if __name__ == "__main__":
    main()
