"""For someone with GPUs: training speed and memory per precision, jit_compile and number of GPUs.

For float32 (TF32 off), TF32 (float32 variables and math, TF32 tensor-core matmuls and convs) and mixed
precision (the config's mixed_precision: in this port the IAF blocks compute in bfloat16, which needs
an Ampere or newer GPU to be fast), each with jit_compile off and on, on 1 GPU and on all visible GPUs
(MirroredStrategy), one child process each runs the real training loop (train.train, one host call per
--steps_per_loop steps after its first 10 one-step calls) and reports:

  s/step, img/s   median over the --steps steps after the first 10 calls (images: all GPUs)
  TFLOP/s         iaf_tf.flops.training_flops_per_image (the convolutions' forward + both backward
                  passes, per image of one replica's model) x images/s; and that per GPU
  peak GiB        tf.config.experimental.get_memory_info(GPU:i)["peak"], the largest over the GPUs
                  used, counted from the start of the child (stats reset before the model is built)
  skipped         steps whose update was skipped (a non-finite loss or gradient)

TensorFlow turns TF32 on by default on Ampere GPUs: the float32 rows turn it off explicitly.
On a machine without GPUs it prints one line saying so and exits 0.

Usage:
  python bench/gpu_check.py                                   # README recipe, everything (~20 min)
  python bench/gpu_check.py --precisions float32,mixed --jit on --gpus 1
  python bench/gpu_check.py --preset table3 --steps 40 --steps_per_loop 20 --json gpu.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import harness
from harness import Column

FIRST_CALLS = 10  # train.train's first host calls run one step each
PRECISIONS = ("float32", "tf32", "mixed")


def child_devices(args):
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(g) for g in gpus]
    return {"gpus": len(gpus), "names": [d.get("device_name", "?") for d in details],
            "compute_capability": [list(d.get("compute_capability") or ()) for d in details]}


def child_train(args):
    import shutil
    import tempfile

    lib = harness.load_library(args.root)
    import tensorflow as tf
    from iaf_tf import flops

    tf.config.experimental.enable_tensor_float_32_execution(args.precision == "tf32")
    devices = [f"GPU:{i}" for i in range(args.num_gpus)]
    for device in devices:
        tf.config.experimental.reset_memory_stats(device)
    cfg = lib.config(args.preset, args.hpconfig, "bfloat16" if args.precision == "mixed" else "float32",
                     args.jit_compile, num_gpus=args.num_gpus, steps_per_loop=args.steps_per_loop)
    logdir = tempfile.mkdtemp(prefix="iaf_gpu_check_")
    try:
        loop_cfg = lib.loop_config(cfg, logdir, FIRST_CALLS + args.steps, args.data_dir)
        trainer = lib.make_trainer(loop_cfg)
        records = lib.run_loop(loop_cfg, trainer=trainer)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    timed = [r for r in records if r.step > FIRST_CALLS]
    step_s = statistics.median(r.seconds for r in timed)
    images = timed[0].images
    flops_image = flops.training_flops_per_image(trainer.model)
    return {"step_s": step_s, "images_per_s": images / step_s, "replicas": trainer.num_replicas,
            "tflops": flops_image * images / step_s / 1e12, "gflop_per_image": flops_image / 1e9,
            "peak_gib": max(tf.config.experimental.get_memory_info(d)["peak"] for d in devices) / 2**30,
            "skipped": lib.result.skipped, "steps_in_call": max(r.steps_in_call for r in timed)}


def run_as_child(args):
    harness.write_record(args.record, globals()[f"child_{args.child}"](args))


def run_child(kind, args, precision="float32", jit=False, num_gpus=1):
    argv = ["--child", kind, "--root", args.root, "--preset", args.preset, "--hpconfig", args.hpconfig,
            "--steps", args.steps, "--steps_per_loop", args.steps_per_loop, "--data_dir", args.data_dir,
            "--precision", precision, "--num_gpus", num_gpus] + (["--jit_compile"] if jit else [])
    return harness.run_child(Path(__file__).resolve(), argv)


COLUMNS = [Column("precision", "precision"), Column("jit", "jit"), Column("GPUs", "num_gpus", "d"),
           Column("s/step", "step_s", ".4f"), Column("img/s", "images_per_s", ".1f"),
           Column("TFLOP/s", "tflops", ".2f"), Column("TFLOP/s\nper GPU", lambda r: r["tflops"] / r["num_gpus"], ".2f"),
           Column("peak GiB", "peak_gib", ".2f"), Column("skipped", "skipped", "d")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="readme_recipe")
    parser.add_argument("--hpconfig", default="", help="extra overrides")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="any of " + ",".join(PRECISIONS))
    parser.add_argument("--jit", default="off,on", help="jit_compile settings: off, on or off,on")
    parser.add_argument("--gpus", default="1,all", help="GPU counts: numbers and/or 'all' (every visible GPU)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps after the first 10 one-step calls")
    parser.add_argument("--steps_per_loop", type=int, default=20)
    parser.add_argument("--root", default=str(harness.ROOT), help="the checkout to measure")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    parser.add_argument("--json", default=None, help="also write all records here")
    # Child-process arguments.
    parser.add_argument("--child", default=None, choices=("devices", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--num_gpus", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--jit_compile", action="store_true", help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return run_as_child(args)

    found = run_child("devices", args)
    if "error" in found:
        sys.exit(f"gpu_check: could not list the GPUs: {found['error']}")
    if not found["gpus"]:
        print("gpu_check: no GPU visible to TensorFlow on this machine; nothing to measure.")
        return
    counts = sorted({found["gpus"] if g == "all" else int(g) for g in args.gpus.split(",") if g})
    counts = [n for n in counts if 1 <= n <= found["gpus"]]
    print(f"{found['gpus']} GPU(s): " + ", ".join(f"{name} (compute {'.'.join(map(str, cc))})"
                                                   for name, cc in zip(found["names"], found["compute_capability"])))
    rows = []
    for num_gpus in counts:
        for precision in [p for p in args.precisions.split(",") if p]:
            for jit in [{"off": False, "on": True}[j] for j in args.jit.split(",") if j]:
                r = run_child("train", args, precision, jit, num_gpus)
                r.update(precision=precision, jit="on" if jit else "off", num_gpus=num_gpus)
                rows.append(r)
                print(f"  {precision} jit {r['jit']} {num_gpus} GPU(s): {r.get('images_per_s', r.get('error'))}",
                      file=sys.stderr)
    harness.print_table(COLUMNS, rows, labels=3, title=(
        f"\n{args.preset} {args.hpconfig}: training loop, median of {args.steps} steps after the first "
        f"{FIRST_CALLS} calls, steps_per_loop {args.steps_per_loop}"),
        notes=["TFLOP/s: analytic conv FLOPs of a training step (iaf_tf.flops) x images/s; img/s over all GPUs.",
               "mixed = mixed_precision (bfloat16 compute in the IAF blocks); tf32 = float32 with TF32 math."])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
