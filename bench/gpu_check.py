"""For a host with GPUs: the training loop per precision (float32 with TF32 off, TF32, mixed: bfloat16 IAF
blocks), jit_compile off and on, on 1 GPU and on all: median step after the first 10 one-step calls,
images/s over all GPUs, TFLOP/s (iaf_tf.flops x images/s), the largest GPU's peak memory, skipped steps.
Without GPUs it prints one line saying so and exits 0.

Usage:
  python bench/gpu_check.py                                   # README recipe, everything (~20 min)
  python bench/gpu_check.py --precisions float32,mixed --jit on --gpus 1 --json gpu.json
"""

import argparse
import statistics
import sys
from pathlib import Path

import harness
from harness import Column

PRECISIONS = ("float32", "tf32", "mixed")


def child_devices(args):
    import tensorflow as tf
    details = [tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")]
    return {"gpus": len(details), "names": [d.get("device_name", "?") for d in details],
            "compute_capability": [list(d.get("compute_capability") or ()) for d in details]}


def child_train(args):
    import tensorflow as tf
    from iaf_tf import flops

    tf.config.experimental.enable_tensor_float_32_execution(args.precision == "tf32")
    devices = [f"GPU:{i}" for i in range(args.num_gpus)]
    for device in devices:
        tf.config.experimental.reset_memory_stats(device)
    cfg = harness.config(args.config, args.hpconfig, "bfloat16" if args.precision == "mixed" else "float32",
                         args.jit_compile, num_gpus=args.num_gpus, steps_per_loop=args.steps_per_loop)
    records, result, trainer = harness.run_loop(cfg, harness.FIRST_CALLS + args.steps, args.data_dir)
    timed = [r for r in records if r.step > harness.FIRST_CALLS]
    step_s = statistics.median(r.seconds for r in timed)
    flops_image = flops.training_flops_per_image(trainer.model)
    return {"step_s": step_s, "images_per_s": timed[0].images / step_s, "skipped": result.skipped,
            "tflops": flops_image * timed[0].images / step_s / 1e12, "replicas": trainer.num_replicas,
            "peak_gib": max(tf.config.experimental.get_memory_info(d)["peak"] for d in devices) / 2**30}


COLUMNS = [Column("precision", "precision"), Column("jit", "jit"), Column("GPUs", "num_gpus", "d"),
           Column("s/step", "step_s", ".4f"), Column("img/s", "images_per_s", ".1f"),
           Column("TFLOP/s", "tflops", ".2f"), Column("TFLOP/s\nper GPU", lambda r: r["tflops"] / r["num_gpus"], ".2f"),
           Column("peak GiB", "peak_gib", ".2f"), Column("skipped", "skipped", "d")]


def main():
    parser = harness.arguments(__doc__)
    parser.add_argument("--preset", default="readme_recipe")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="any of " + ",".join(PRECISIONS))
    parser.add_argument("--jit", default="off,on", help="jit_compile settings: off, on or off,on")
    parser.add_argument("--gpus", default="1,all", help="GPU counts: numbers and/or 'all' (every visible GPU)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps after the first 10 one-step calls")
    parser.add_argument("--steps_per_loop", type=int, default=20)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--num_gpus", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return harness.run_as_child(args, {"devices": child_devices, "train": child_train})

    def run(kind, precision="float32", jit=False, num_gpus=1):
        return harness.run_child(Path(__file__).resolve(), [
            "--child", kind, "--config", args.preset, "--hpconfig", args.hpconfig, "--steps", args.steps,
            "--steps_per_loop", args.steps_per_loop, "--data_dir", args.data_dir, "--precision", precision,
            "--num_gpus", num_gpus] + ["--jit_compile"] * jit)

    found = run("devices")
    if "error" in found:
        sys.exit(f"gpu_check: could not list the GPUs: {found['error']}")
    if not found["gpus"]:
        print("gpu_check: no GPU visible to TensorFlow on this machine; nothing to measure.")
        return
    counts = sorted({found["gpus"] if g == "all" else int(g) for g in harness.listed(args.gpus)})
    print(f"{found['gpus']} GPU(s): " + ", ".join(f"{name} (compute {'.'.join(map(str, cc))})"
                                                   for name, cc in zip(found["names"], found["compute_capability"])))
    rows = []
    for num_gpus in [n for n in counts if 1 <= n <= found["gpus"]]:
        for precision in harness.listed(args.precisions):
            for jit in [{"off": False, "on": True}[j] for j in harness.listed(args.jit)]:
                r = dict(run("train", precision, jit, num_gpus), precision=precision, jit="on" if jit else "off",
                         num_gpus=num_gpus)
                print(f"  {precision} jit {r['jit']} {num_gpus} GPU(s): {r.get('images_per_s', r.get('error'))}",
                      file=sys.stderr)
                rows.append(r)
    harness.print_table(COLUMNS, rows, labels=3, title=(
        f"\n{args.preset} {args.hpconfig}: training loop, median of {args.steps} steps after the first "
        f"{harness.FIRST_CALLS} calls, steps_per_loop {args.steps_per_loop}"),
        notes=["TFLOP/s: analytic conv FLOPs of a training step (iaf_tf.flops) x images/s; img/s over all GPUs.",
               "mixed = mixed_precision (bfloat16 compute in the IAF blocks); tf32 = float32 with TF32 math."])
    harness.save_json(args.json, rows)


if __name__ == "__main__":
    main()
