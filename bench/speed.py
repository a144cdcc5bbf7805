"""Speed and memory of training, evaluation and importance sampling, against the hardware's own conv speed.

Every measurement runs in a fresh subprocess (peak resident memory is per process, and one config's
allocations must not inflate another's). Training steps are timed one by one after warm-up and
interleaved with a plain 3x3 conv of the model's main shape (batch 32, 16x16, 160 -> 160, forward and
both backward passes) in float32 and bfloat16, so that "ratio" compares the model with the machine under
the same load: the machine is shared and absolute seconds drift.

FLOPs are analytic (iaf_tf.flops): forward 2*kh*kw*cin*cout per output position of every weight-normed
conv (a transposed conv per input position), dense even where a mask zeroes taps; a training step counts
3x forward. Everything else is treated as free. They are counted on this checkout's model of each config,
for every checkout measured: the architecture is the same.

--baseline DIR runs the same children against another checkout, e.g. one made with
`git worktree add --detach /tmp/iaf-baseline <commit>`, so that before/after figures come from one run.

Usage:
  python bench/speed.py                                   # full: README recipe + cpu_quick, float32 and bfloat16
  python bench/speed.py --configs readme_recipe --precisions float32 --steps 3 --baseline /tmp/iaf-baseline
  python bench/speed.py --configs cpu_quick --precisions float32 --steps 3   # a quick check
  python bench/speed.py --only trace                      # tf.function tracing time, 20 and 40 blocks
  python bench/speed.py --only trace --trace_blocks 2     # the same, quick
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column

CHILD_KINDS = ("train", "eval", "loop", "trace", "flops")


# ----------------------------------------------------------------------------------------- children

def conv_dtypes(concrete):
    """{dtype: number of conv ops} in a traced function and every function it calls: tells whether a
    bfloat16 run really computes in bfloat16."""
    import tensorflow as tf
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node) + [node for f in graph_def.library.function for node in f.node_def]
    counts = {}
    for node in nodes:
        if "Conv2D" in node.op and "T" in node.attr:
            name = tf.dtypes.as_dtype(node.attr["T"].type).name
            counts[name] = counts.get(name, 0) + 1
    return counts


def child_train(lib, cfg, args):
    import numpy as np
    import tensorflow as tf
    from iaf_tf import data

    sizes = lib.sizes(cfg)
    images = data.load_cifar10("test", args.data_dir)[:sizes.batch_size]
    trainer = lib.make_trainer(cfg)
    trainer.initialize(images)
    step = lib.step_function(trainer)
    batch = tf.constant(images)

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
    return {"trace_s": trace_s, "first_call_s": first_s, "step_s": statistics.median(seconds),
            "step_s_all": seconds, "cpu_step_s": statistics.median(cpu_seconds), "peak_mib": harness.peak_mib(),
            "losses": losses, "finite": bool(np.all(np.isfinite(losses))), "batch_size": sizes.batch_size,
            "conv_dtypes": conv_dtypes(concrete), **harness.probe_rates(probes)}


def child_eval(lib, cfg, args):
    import numpy as np
    import tensorflow as tf
    from iaf_tf import data
    from iaf_tf.likelihood import Evaluator

    sizes = lib.sizes(cfg)
    n = sizes.eval_batch_size
    images = data.load_cifar10("test", args.data_dir)[:n * args.eval_batches]
    model = lib.make_model(cfg)
    model.initialize(tf.constant(images[:sizes.batch_size]), tf.constant([0, -1], tf.int64))
    evaluator = Evaluator(model, jit_compile=bool(args.jit_compile))
    evaluator.nll(images[:n], k=1, max_batch=n)  # trace
    probes = harness.conv_probes() if args.probe else {}
    begin = time.perf_counter()
    nll = evaluator.nll(images, k=1, max_batch=n)
    eval_s = time.perf_counter() - begin
    for probe in probes.values():
        probe.run()
    # Importance sampling: one image, k = 2 passes of eval_batch_size samples.
    k = 2 * n
    evaluator.nll(images[:1], k=k, max_batch=n)  # trace
    begin = time.perf_counter()
    evaluator.nll(images[1:2], k=k, max_batch=n)
    is_s = time.perf_counter() - begin
    for probe in probes.values():
        probe.run()
    return {"images": len(images), "eval_s": eval_s, "is_samples": k, "is_s": is_s, "eval_batch": n,
            "peak_mib": harness.peak_mib(), "finite": bool(np.all(np.isfinite(nll))), **harness.probe_rates(probes)}


def child_loop(lib, cfg, args):
    """The real training loop (train.train: data pipeline, summaries, checkpoints at the start and end)."""
    logdir = tempfile.mkdtemp(prefix="iaf_speed_")
    try:
        seconds = lib.loop_step_seconds(cfg, logdir, args.warmup + 1 + args.steps, args.data_dir)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    timed = seconds[args.warmup + 1:]  # the first step traces
    return {"step_s": statistics.median(timed) if timed else None, "step_s_all": seconds,
            "batch_size": lib.sizes(cfg).batch_size, "peak_mib": harness.peak_mib()}


def child_trace(lib, cfg, args):
    import tensorflow as tf

    sizes = lib.sizes(cfg)
    begin = time.perf_counter()
    trainer = lib.make_trainer(cfg)
    build_s = time.perf_counter() - begin
    spec = tf.TensorSpec([sizes.batch_size, sizes.image_size, sizes.image_size, trainer.model.channels], tf.uint8)
    begin = time.perf_counter()
    lib.step_function(trainer).get_concrete_function(spec)
    trace_s = time.perf_counter() - begin
    return {"blocks": sizes.blocks, "build_s": build_s, "trace_s": trace_s, "peak_mib": harness.peak_mib()}


def child_flops(lib, cfg, args):
    from iaf_tf import flops
    return {"forward_flops_per_image": flops.forward_flops_per_image(lib.make_model(cfg))}


def run_as_child(args):
    lib = harness.load_library(args.root, args.inter_op)
    cfg = lib.config(args.config, args.hpconfig, args.precision, args.jit_compile)
    record = globals()[f"child_{args.child}"](lib, cfg, args)
    harness.write_record(args.record, record)


# ------------------------------------------------------------------------------------------- parent

def run_child(kind, root, config, precision, args, hpconfig="", probe=True, jit=False):
    argv = ["--child", kind, "--root", root, "--config", config, "--precision", precision, "--hpconfig", hpconfig,
            "--steps", args.steps, "--warmup", args.warmup, "--inter_op", args.inter_op,
            "--data_dir", args.data_dir, "--eval_batches", args.eval_batches]
    argv += (["--probe"] if probe else []) + (["--jit_compile"] if jit else [])
    return harness.run_child(Path(__file__).resolve(), argv)


def ratio(a, b):
    return a / b if a is not None and b else None


def add_train_figures(r, flops_image):
    """Images/s, GFLOP/s and the ratios to the same-run conv of the same precision."""
    work = 3 * flops_image * r["batch_size"] if flops_image else None
    r["images_per_s"] = r["batch_size"] / r["step_s"]
    r["gflop_per_image"] = 3 * flops_image / 1e9 if flops_image else None
    r["gflops"] = work / r["step_s"] / 1e9 if work else None
    r["ratio"] = ratio(r["gflops"], r["conv_gflops"].get(r["precision"]))
    r["cpu_ratio"] = ratio(work / r["cpu_step_s"] / 1e9 if work else None, r["conv_cpu_gflops"].get(r["precision"]))
    notes = [] if r["finite"] else ["NON-FINITE LOSS"]
    if r["precision"] == "bfloat16" and "bfloat16" not in r["conv_dtypes"]:
        notes.append("(computes in float32: this checkout ignores mixed_precision)")
    r["note"] = "  ".join(notes)


def add_eval_figures(r, flops_image):
    r["eval_images_per_s"] = r["images"] / r["eval_s"]
    r["is_samples_per_s"] = r["is_samples"] / r["is_s"]
    r["eval_gflops"] = flops_image * r["images"] / r["eval_s"] / 1e9 if flops_image else None
    r["is_gflops"] = flops_image * r["is_samples"] / r["is_s"] / 1e9 if flops_image else None
    r["note"] = "" if r["finite"] else "NON-FINITE"


def add_loop_figures(r, _flops_image):
    r["images_per_s"] = ratio(r["batch_size"], r["step_s"])
    r["peak_gb"] = r["peak_mib"] * 2**20 / 1e9


LABELS = [Column("code", "code"), Column("config", "config"), Column("prec", "variant")]
CONV = [Column("conv f32", lambda r: r["conv_gflops"].get("float32"), ".1f"),
        Column("conv bf16", lambda r: r["conv_gflops"].get("bfloat16"), ".1f")]
PEAK = Column("peak MiB", "peak_mib", ".0f")

TRAIN_COLUMNS = LABELS + [
    Column("step s", "step_s", ".3f"), Column("img/s", "images_per_s", ".2f"),
    Column("GFLOP/img", "gflop_per_image", ".2f"), Column("GFLOP/s", "gflops", ".1f"), *CONV,
    Column("ratio", "ratio", ".3f"), PEAK, Column("cpu ratio", "cpu_ratio", ".3f"),
    Column("1st call s", "first_call_s", ".2f"), Column("trace s", "trace_s", ".2f"), Column("", "note")]
LOOP_COLUMNS = LABELS + [Column("step s", "step_s", ".3f"), Column("img/s", "images_per_s", ".2f"), PEAK,
                         Column("peak GB", "peak_gb", ".2f")]
EVAL_COLUMNS = LABELS + [
    Column("eval img/s", "eval_images_per_s", ".2f"), Column("GFLOP/s", "eval_gflops", ".1f"),
    Column("IS smp/s", "is_samples_per_s", ".2f"), Column("GFLOP/s", "is_gflops", ".1f"), *CONV, PEAK,
    Column("", "note")]
TRACE_COLUMNS = [Column("code", "code"), Column("blocks", "blocks", "d"), Column("build s", "build_s", ".2f"),
                 Column("trace s", "trace_s", ".2f"), PEAK]


def comparisons(rows):
    """bfloat16 against float32 of the same checkout, and the current checkout against the baseline."""
    found = {(r["code"], r["config"], r["variant"]): r for r in rows if "error" not in r}
    lines = []
    for (code, config, variant), r in sorted(found.items()):
        f32 = found.get((code, config, "float32"))
        if variant != "float32" and f32:
            lines.append(f"{code} {config}: {variant} images/s = "
                         f"{r['images_per_s'] / f32['images_per_s']:.2f}x float32")
        base = found.get(("baseline", config, variant))
        if code == "current" and base:
            lines.append(f"{config} {variant}: current images/s = {r['images_per_s'] / base['images_per_s']:.2f}x "
                         f"baseline, peak memory {r['peak_mib']:.0f} vs {base['peak_mib']:.0f} MiB")
    return lines


def precision_case(rows):
    """Which kind of CPU this is, from the same-run conv probes: whether bfloat16 (mixed_precision=true)
    computes faster than float32 here. AMX units make it several times faster; AVX512-BF16 alone, half."""
    probes = [r["conv_gflops"] for r in rows if "error" not in r and r.get("conv_gflops", {}).get("bfloat16")]
    if not probes:
        return []
    ratio = statistics.median(p["bfloat16"] / p["float32"] for p in probes)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    amx = "amx_bf16" in flags
    verdict = ("turn mixed_precision=true on for CPU training here" if ratio > 1.1 else
               "keep the float32 default for CPU training here")
    return [f"this CPU: bfloat16 conv at {ratio:.2f}x float32 ({'AMX' if amx else 'no AMX'}): {verdict}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="readme_recipe,cpu_quick", help="presets, comma-separated")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--only", default="train,loop,eval,trace", help="any of train,loop,eval,trace")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per config")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    parser.add_argument("--eval_batches", type=int, default=1)
    parser.add_argument("--trace_blocks", default="20,40",
                        help="README-recipe sizes (num_blocks) for --only trace, comma-separated")
    parser.add_argument("--hpconfig", default="", help="extra overrides for every config")
    parser.add_argument("--jit_compile", action="store_true", help="also run float32 with jit_compile=true")
    parser.add_argument("--baseline", default=None, help="another checkout to run side by side")
    parser.add_argument("--inter_op", type=int, default=0, help="inter-op threads (0: TensorFlow's default)")
    parser.add_argument("--current", default=str(harness.ROOT), help="the checkout to measure (default: this one)")
    parser.add_argument("--no_current", action="store_true", help="run only the --baseline checkout")
    parser.add_argument("--baseline_all", action="store_true",
                        help="also run the baseline in bfloat16 / with XLA (by default only float32)")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    parser.add_argument("--json", default=None, help="also write all results here")
    # Child-process arguments.
    parser.add_argument("--child", default=None, choices=CHILD_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(harness.ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return run_as_child(args)

    codes = [] if args.no_current else [("current", Path(args.current).resolve())]
    codes += [("baseline", Path(args.baseline).resolve())] if args.baseline else []
    configs = [c for c in args.configs.split(",") if c]
    precisions = [p for p in args.precisions.split(",") if p]
    only = set(args.only.split(","))
    results = {"train": [], "loop": [], "eval": [], "trace": []}
    flops = {}

    def forward_flops(config):
        """This checkout's count for the config, for every checkout (see the module's docstring)."""
        if config not in flops:
            r = run_child("flops", harness.ROOT, config, "float32", args, args.hpconfig, probe=False)
            flops[config] = r.get("forward_flops_per_image")
            if "error" in r:
                print(f"  flops {config}: {r['error']}", file=sys.stderr)
        return flops[config]

    def sweep(kind, variants, figures, probe=True):
        """Runs `kind` for every config, (precision, jit) variant and checkout; the baseline only in plain
        float32 unless --baseline_all."""
        for config in configs:
            for precision, jit in variants:
                for code, root in codes:
                    if code == "baseline" and (precision != "float32" or jit) and not args.baseline_all:
                        continue
                    name = precision + ("+xla" if jit else "")
                    r = run_child(kind, root, config, precision, args, args.hpconfig, probe=probe, jit=jit)
                    r.update(code=code, config=config, precision=precision, variant=name)
                    if "error" not in r:
                        figures(r, forward_flops(config))
                    results[kind].append(r)
                    print(f"  {kind} {code} {config} {name}: {r.get('step_s', r.get('error', 'done'))}",
                          file=sys.stderr)

    plain = [(p, False) for p in precisions]
    if "train" in only:
        sweep("train", plain + ([("float32", True)] if args.jit_compile else []), add_train_figures)
        harness.print_table(TRAIN_COLUMNS, results["train"], labels=3, title=(
            "\nTraining (median step after warm-up; conv = plain 3x3 conv fwd+bwd measured in the same process)"),
            notes=["ratio = model GFLOP/s / conv GFLOP/s of the same precision, same process (wall clock).",
                   "cpu ratio = the same per CPU-second of the process: other processes on the machine "
                   "affect it less."] + comparisons(results["train"]) + precision_case(results["train"]))
    if "loop" in only:
        sweep("loop", plain, add_loop_figures, probe=False)
        harness.print_table(LOOP_COLUMNS, results["loop"], labels=3, title=(
            "\nThe training loop of bin/iaf.py (train.train on CIFAR-10 train, with its checkpoints): peak memory"))
    if "eval" in only:
        sweep("eval", plain, add_eval_figures)
        harness.print_table(EVAL_COLUMNS, results["eval"], labels=3, title=(
            "\nEvaluation (k=1, eval_batch_size per pass) and importance sampling (1 image, k=2*eval_batch_size)"))
    if "trace" in only:
        for blocks in [b for b in args.trace_blocks.split(",") if b]:
            for code, root in codes:
                r = run_child("trace", root, "readme_recipe", "float32", args,
                              f"num_blocks={blocks}" + ("," + args.hpconfig if args.hpconfig else ""), probe=False)
                results["trace"].append(dict(r, code=code))
        harness.print_table(TRACE_COLUMNS, results["trace"],
                            title="\ntf.function tracing of the training step (README recipe, batch 32)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
