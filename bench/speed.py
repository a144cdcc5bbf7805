"""Speed and memory of training, the bin/iaf.py loop, evaluation and importance sampling, per precision,
against a plain 3x3 conv of the model's main shape (batch 32, 16x16, 160 -> 160, forward and both backward
passes) timed in the same process: "ratio" compares the model with the machine under the same load.

Each measurement runs in a fresh process. FLOPs are iaf_tf.flops' count on this checkout's model, used
for every checkout measured. "first step s" is what a run waits for before its first step is done:
making the Trainer, the data-dependent init, tracing and the first call.

Usage:
  python bench/speed.py                                        # full: README recipe + cpu_quick
  python bench/speed.py --configs cpu_quick --precisions float32 --steps 3     # quick
  python bench/speed.py --configs readme_recipe --precisions float32 --steps 3 --baseline /tmp/iaf-baseline
  python bench/speed.py --configs imagenet64 --precisions float32 --only train --steps 2   # random images
  python bench/speed.py --only trace --trace_blocks 2          # tracing time only, quick
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column, ratio


# ----------------------------------------------------------------------------------------- children

def conv_dtypes(concrete):
    """{dtype: number of conv ops} in a traced function and every function it calls: tells whether a
    bfloat16 run really computes in bfloat16."""
    import tensorflow as tf
    graph_def = concrete.graph.as_graph_def()
    counts = {}
    for node in list(graph_def.node) + [node for f in graph_def.library.function for node in f.node_def]:
        if "Conv2D" in node.op and "T" in node.attr:
            name = tf.dtypes.as_dtype(node.attr["T"].type).name
            counts[name] = counts.get(name, 0) + 1
    return counts


def child_config(args):
    return harness.config(args.config, args.hpconfig, args.precision, args.jit_compile)


def child_train(args):
    import numpy as np
    import tensorflow as tf
    from iaf_tf import train

    cfg = child_config(args)
    images = harness.batch_images(cfg, cfg.optimization.batch_size, args.data_dir)
    begin = time.perf_counter()
    trainer = train.Trainer(cfg)
    trainer.initialize(images)
    build_s = time.perf_counter() - begin
    step, batch = trainer.train_step, tf.constant(images)
    begin = time.perf_counter()
    concrete = step.get_concrete_function(batch)
    trace_s = time.perf_counter() - begin
    begin = time.perf_counter()
    float(step(batch)[0]["objective"])
    first_s = time.perf_counter() - begin
    for _ in range(args.warmup):
        float(step(batch)[0]["objective"])

    probes = harness.conv_probes() if args.probe else {}
    losses, seconds, cpu_seconds = [], [], []
    for _ in range(args.steps):
        begin, cpu = time.perf_counter(), time.process_time()
        losses.append(float(step(batch)[0]["objective"]))
        seconds.append(time.perf_counter() - begin)
        cpu_seconds.append(time.process_time() - cpu)
        for probe in probes.values():
            probe.run()
    return {"build_s": build_s, "trace_s": trace_s, "first_call_s": first_s,
            "first_step_s": build_s + trace_s + first_s, "step_s": statistics.median(seconds),
            "step_s_all": seconds, "cpu_step_s": statistics.median(cpu_seconds), "peak_mib": harness.peak_mib(),
            "losses": losses, "finite": bool(np.all(np.isfinite(losses))), "batch_size": len(images),
            "conv_dtypes": conv_dtypes(concrete), **harness.probe_rates(probes)}


def child_eval(args):
    import numpy as np
    import tensorflow as tf
    from iaf_tf import datasets
    from iaf_tf.likelihood import Evaluator
    from iaf_tf.model import CVAE

    cfg = child_config(args)
    n = cfg.evaluation.eval_batch_size
    images = harness.batch_images(cfg, n * args.eval_batches, args.data_dir)
    model = CVAE(cfg, datasets.get(cfg.data.dataset)).build_for(1)
    model.initialize(tf.constant(images[:cfg.optimization.batch_size]), tf.constant([0, -1], tf.int64))
    evaluator = Evaluator(model, jit_compile=bool(args.jit_compile))
    evaluator.nll(images[:n], k=1, max_batch=n)  # trace
    probes = harness.conv_probes() if args.probe else {}
    begin = time.perf_counter()
    nll = evaluator.nll(images, k=1, max_batch=n)
    eval_s = time.perf_counter() - begin
    for probe in probes.values():
        probe.run()
    k = 2 * n  # importance sampling: one image, two passes of eval_batch_size samples
    evaluator.nll(images[:1], k=k, max_batch=n)  # trace
    begin = time.perf_counter()
    evaluator.nll(images[1:2], k=k, max_batch=n)
    is_s = time.perf_counter() - begin
    for probe in probes.values():
        probe.run()
    return {"images": len(images), "eval_s": eval_s, "is_samples": k, "is_s": is_s, "eval_batch": n,
            "peak_mib": harness.peak_mib(), "finite": bool(np.all(np.isfinite(nll))), **harness.probe_rates(probes)}


def child_loop(args):
    """The real training loop (train.train: data pipeline, summaries, checkpoints at the start and end)."""
    cfg = child_config(args)
    logdir = tempfile.mkdtemp(prefix="iaf_speed_")
    try:
        records, _ = harness.run_loop(harness.loop_config(cfg, logdir, args.warmup + 1 + args.steps, args.data_dir))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    timed = [r.seconds for r in records[args.warmup + 1:]]  # the first step traces
    return {"step_s": statistics.median(timed) if timed else None, "step_s_all": [r.seconds for r in records],
            "batch_size": cfg.optimization.batch_size, "peak_mib": harness.peak_mib()}


def child_trace(args):
    import tensorflow as tf
    from iaf_tf import train

    cfg = child_config(args)
    begin = time.perf_counter()
    trainer = train.Trainer(cfg)
    build_s = time.perf_counter() - begin
    size = cfg.data.image_size
    spec = tf.TensorSpec([cfg.optimization.batch_size, size, size, trainer.model.channels], tf.uint8)
    begin = time.perf_counter()
    trainer.train_step.get_concrete_function(spec)
    return {"blocks": sum(cfg.model.level_depths), "build_s": build_s, "trace_s": time.perf_counter() - begin,
            "peak_mib": harness.peak_mib()}


# ------------------------------------------------------------------------------------------- parent

def add_train_figures(r, flops):
    """Images/s, GFLOP/s and the ratios to the same-process conv of the same precision."""
    work = flops.get("training", 0) * r["batch_size"]
    r["images_per_s"] = r["batch_size"] / r["step_s"]
    r["gflop_per_image"] = flops.get("training", 0) / 1e9 or None
    r["gflops"] = work / r["step_s"] / 1e9 or None
    r["ratio"] = ratio(r["gflops"], r["conv_gflops"].get(r["precision"]))
    r["cpu_ratio"] = ratio(work / r["cpu_step_s"] / 1e9 or None, r["conv_cpu_gflops"].get(r["precision"]))
    notes = [] if r["finite"] else ["NON-FINITE LOSS"]
    if r["precision"] == "bfloat16" and "bfloat16" not in r["conv_dtypes"]:
        notes.append("(computes in float32: this checkout ignores mixed_precision)")
    r["note"] = "  ".join(notes)


def add_eval_figures(r, flops):
    forward = flops.get("forward", 0)
    r["eval_images_per_s"] = r["images"] / r["eval_s"]
    r["is_samples_per_s"] = r["is_samples"] / r["is_s"]
    r["eval_gflops"] = forward * r["images"] / r["eval_s"] / 1e9 or None
    r["is_gflops"] = forward * r["is_samples"] / r["is_s"] / 1e9 or None
    r["note"] = "" if r["finite"] else "NON-FINITE"


def add_loop_figures(r, _flops):
    r["images_per_s"] = ratio(r["batch_size"], r["step_s"])


LABELS = [Column("code", "code"), Column("config", "config"), Column("prec", "variant")]
CONV = [Column("conv f32", lambda r: r["conv_gflops"].get("float32"), ".1f"),
        Column("conv bf16", lambda r: r["conv_gflops"].get("bfloat16"), ".1f")]
PEAK = Column("peak MiB", "peak_mib", ".0f")
TRAIN_COLUMNS = LABELS + [
    Column("step s", "step_s", ".3f"), Column("img/s", "images_per_s", ".2f"),
    Column("GFLOP/img", "gflop_per_image", ".2f"), Column("GFLOP/s", "gflops", ".1f"), *CONV,
    Column("ratio", "ratio", ".3f"), PEAK, Column("cpu ratio", "cpu_ratio", ".3f"),
    Column("trace s", "trace_s", ".2f"), Column("first step s", "first_step_s", ".2f"), Column("", "note")]
LOOP_COLUMNS = LABELS + [Column("step s", "step_s", ".3f"), Column("img/s", "images_per_s", ".2f"), PEAK]
EVAL_COLUMNS = LABELS + [
    Column("eval img/s", "eval_images_per_s", ".2f"), Column("GFLOP/s", "eval_gflops", ".1f"),
    Column("IS smp/s", "is_samples_per_s", ".2f"), Column("GFLOP/s", "is_gflops", ".1f"), *CONV, PEAK,
    Column("", "note")]
TRACE_COLUMNS = [Column("code", "code"), Column("blocks", "blocks", "d"), Column("build s", "build_s", ".2f"),
                 Column("trace s", "trace_s", ".2f"), PEAK]


def comparisons(rows):
    """Each precision against float32 of the same checkout, and the current checkout against the baseline."""
    found = {(r["code"], r["config"], r["variant"]): r for r in rows if "error" not in r}
    lines = []
    for (code, config, variant), r in sorted(found.items()):
        f32 = found.get((code, config, "float32"))
        if variant != "float32" and f32:
            lines.append(f"{code} {config}: {variant} images/s = {r['images_per_s'] / f32['images_per_s']:.2f}x "
                         "float32")
        base = found.get(("baseline", config, variant))
        if code == "current" and base:
            lines.append(f"{config} {variant}: current images/s = {r['images_per_s'] / base['images_per_s']:.2f}x "
                         f"baseline, peak memory {r['peak_mib']:.0f} vs {base['peak_mib']:.0f} MiB")
    return lines


def precision_case(rows):
    """Whether bfloat16 (mixed_precision=true) computes faster than float32 on this CPU, from the
    same-process conv probes: several times faster with AMX units, slower on some CPUs without."""
    probes = [r["conv_gflops"] for r in rows if "error" not in r and r.get("conv_gflops", {}).get("bfloat16")]
    if not probes:
        return []
    speedup = statistics.median(p["bfloat16"] / p["float32"] for p in probes)
    amx = Path("/proc/cpuinfo").exists() and "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    verdict = ("turn mixed_precision=true on for CPU training here" if speedup > 1.1 else
               "keep the float32 default for CPU training here")
    return [f"this CPU: bfloat16 conv at {speedup:.2f}x float32 ({'AMX' if amx else 'no AMX'}): {verdict}"]


def main():
    parser = harness.arguments(__doc__, configs="readme_recipe,cpu_quick", baseline=True,
                               jit_help="also run float32 with jit_compile=true")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--only", default="train,loop,eval,trace", help="any of train,loop,eval,trace")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per config")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    parser.add_argument("--eval_batches", type=int, default=1)
    parser.add_argument("--trace_blocks", default="20,40", help="--only trace: README-recipe num_blocks")
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return harness.run_as_child(args, {"train": child_train, "eval": child_eval, "loop": child_loop,
                                           "trace": child_trace})

    codes, configs, only = harness.checkouts(args), harness.listed(args.configs), set(args.only.split(","))
    results = {"train": [], "loop": [], "eval": [], "trace": []}
    flops = {}

    def run(kind, root, config, precision="float32", hpconfig=args.hpconfig, probe=True, jit=False):
        argv = ["--child", kind, "--root", root, "--config", config, "--precision", precision,
                "--hpconfig", hpconfig, "--steps", args.steps, "--warmup", args.warmup,
                "--data_dir", args.data_dir, "--eval_batches", args.eval_batches]
        return harness.run_child(Path(__file__).resolve(), argv + ["--probe"] * probe + ["--jit_compile"] * jit)

    def sweep(kind, variants, figures, probe=True):
        """`kind` for every config, (precision, jit) variant and checkout; the baseline in float32 only."""
        for config in configs:
            for precision, jit in variants:
                for code, root in codes:
                    if code == "baseline" and (precision != "float32" or jit):
                        continue
                    name = precision + ("+xla" if jit else "")
                    r = run(kind, root, config, precision, probe=probe, jit=jit)
                    r.update(code=code, config=config, precision=precision, variant=name)
                    if "error" not in r:
                        if config not in flops:
                            flops[config] = harness.flops_per_image(__file__, config, args.hpconfig)
                        figures(r, flops[config])
                    results[kind].append(r)
                    print(f"  {kind} {code} {config} {name}: {r.get('step_s', r.get('error', 'done'))}",
                          file=sys.stderr)

    plain = [(p, False) for p in harness.listed(args.precisions)]
    if "train" in only:
        sweep("train", plain + [("float32", True)] * args.jit_compile, add_train_figures)
        harness.print_table(TRAIN_COLUMNS, results["train"], labels=3, title=(
            "\nTraining (median step after warm-up; conv = plain 3x3 conv fwd+bwd measured in the same process)"),
            notes=["ratio = model GFLOP/s / conv GFLOP/s of the same precision, same process (wall clock).",
                   "cpu ratio = the same per CPU-second of the process: other processes on the machine "
                   "affect it less.",
                   "first step s = making the Trainer and its data-dependent init, tracing, and the first call."]
            + comparisons(results["train"]) + precision_case(results["train"]))
    if "loop" in only:
        sweep("loop", plain, add_loop_figures, probe=False)
        harness.print_table(LOOP_COLUMNS, results["loop"], labels=3, title=(
            "\nThe training loop of bin/iaf.py (train.train on CIFAR-10 train, with its checkpoints): peak memory"))
    if "eval" in only:
        sweep("eval", plain, add_eval_figures)
        harness.print_table(EVAL_COLUMNS, results["eval"], labels=3, title=(
            "\nEvaluation (k=1, eval_batch_size per pass) and importance sampling (1 image, k=2*eval_batch_size)"))
    if "trace" in only:
        for blocks in harness.listed(args.trace_blocks):
            for code, root in codes:
                hpconfig = ",".join(harness.listed(f"num_blocks={blocks},{args.hpconfig}"))
                results["trace"].append(dict(run("trace", root, "readme_recipe", hpconfig=hpconfig, probe=False),
                                             code=code))
        harness.print_table(TRACE_COLUMNS, results["trace"],
                            title="\ntf.function tracing of the training step (README recipe, batch 32)")
    harness.save_json(args.json, results)


if __name__ == "__main__":
    main()
