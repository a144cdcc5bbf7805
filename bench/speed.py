"""Training per precision, each in a fresh process: s/step, GFLOP/s (iaf_tf.flops), "ratio" to a plain 3x3
conv of the model's main shape (batch 32, 16x16, 160 channels, forward and both backward passes) timed in
the same process, the seconds the step's own convolutions take alone and their share of the step, peak
memory, time to the first step; the bin/iaf.py loop's step, peak and host trips.

Usage:
  python bench/speed.py                                        # full: README recipe + cpu_quick
  python bench/speed.py --configs cpu_quick --precisions float32 --steps 3     # quick
  python bench/speed.py --configs readme_recipe --precisions float32 --steps 3 --baseline /tmp/iaf-baseline
  python bench/speed.py --configs imagenet64 --precisions float32 --only train --steps 2   # random images
  python bench/speed.py --configs cpu_quick --precisions float32 --only loop --steps_per_loop 20 --steps 60
  python bench/speed.py --only trace --trace_blocks 2          # tracing time only, quick
  python bench/speed.py --configs readme_recipe --only train --steps 3 --rounds 3 --baseline /tmp/iaf-baseline
                                                               # a noisy machine: 3 alternating rounds
"""

import argparse
import collections
import math
import statistics
import sys
import time
from pathlib import Path

import harness
from harness import Column, ratio


class ConvProbe:
    """A conv (forward and both backward passes) timed between the model's steps, so that a ratio compares
    the model with the machine under the same load: on a shared machine absolute seconds drift. The
    default is the model's main shape, a 3x3 conv of 160 channels on 16x16 at batch 32."""

    def __init__(self, dtype, batch=32, size=16, channels=160, out_channels=160, kernel=3, stride=1,
                 transpose=False):
        import tensorflow as tf
        # As iaf_tf.flops counts: kh*kw*in*out multiply-adds per output position, per input position when
        # transposed; three convs a step.
        grid = size * stride if transpose else math.ceil(size / stride)  # of the output
        positions = size * size if transpose else grid * grid
        self.flops = 3 * 2 * kernel * kernel * channels * out_channels * positions * batch
        shapes = ([batch, size, size, channels], [kernel, kernel, *((out_channels, channels) if transpose else
                                                                     (channels, out_channels))],
                  [batch, grid, grid, out_channels])
        self.inputs = [tf.cast(tf.random.normal(s) * c, dtype) for s, c in zip(shapes, (1, 0.05, 1))]

        @tf.function
        def step(x, w, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                if transpose:
                    y = tf.nn.conv2d_transpose(x, w, dy.shape, stride, "SAME")
                else:
                    y = tf.nn.conv2d(x, w, stride, "SAME")
            # y is returned so that the forward conv runs: the gradients alone do not need it.
            return [y, *tape.gradient(y, [x, w], output_gradients=dy)]

        self.step, self.seconds = step, []
        self.step(*self.inputs)[2].numpy()  # trace

    def run(self, reps=3):
        for _ in range(reps):
            begin = time.perf_counter()
            self.step(*self.inputs)[2].numpy()
            self.seconds.append(time.perf_counter() - begin)


def model_convs(model, batch):
    """{ConvProbe arguments: how many of the model's convs have them}: each conv's shape, grid, stride and
    dtype, so that the probes together do a training step's convolutions."""
    counts = collections.Counter()
    for conv in model.named_convs().values():
        kernel, _, *channels = conv.V.shape
        channels = channels[::-1] if conv.transpose else channels
        counts[(conv.conv_dtype.name, batch, conv.input_grid[0], *channels, kernel, conv.strides[0],
                conv.transpose)] += 1
    return counts


def child_train(args):
    import numpy as np
    import tensorflow as tf
    from iaf_tf import flops, train

    cfg = harness.child_config(args)
    images = harness.batch_images(cfg, cfg.optimization.batch_size, args.data_dir)
    begin = time.perf_counter()
    trainer = train.Trainer(cfg)
    trainer.initialize(images)
    build_s = time.perf_counter() - begin
    step, batch = trainer.train_step, tf.constant(images)
    begin = time.perf_counter()
    step.get_concrete_function(batch)
    trace_s = time.perf_counter() - begin
    if args.child == "trace":
        return {"blocks": sum(cfg.model.level_depths), "build_s": build_s, "trace_s": trace_s,
                "peak_mib": harness.peak_mib()}
    begin = time.perf_counter()
    float(step(batch)[0]["objective"])
    first_s = time.perf_counter() - begin
    for _ in range(args.warmup):
        float(step(batch)[0]["objective"])

    probes = {name: ConvProbe(tf.as_dtype(name)) for name in ("float32", "bfloat16")}
    convs = [(ConvProbe(*shape), count) for shape, count in model_convs(trainer.model, len(images)).items()]
    losses, seconds = [], []
    for _ in range(args.steps):
        begin = time.perf_counter()
        losses.append(float(step(batch)[0]["objective"]))
        seconds.append(time.perf_counter() - begin)
        for probe in probes.values():
            probe.run()
        for probe, _ in convs:
            probe.run(reps=1)
    return {"build_s": build_s, "trace_s": trace_s, "first_call_s": first_s,
            "first_step_s": build_s + trace_s + first_s, "step_s": statistics.median(seconds),
            "convs_s": sum(count * statistics.median(probe.seconds) for probe, count in convs),
            "step_s_all": seconds, "peak_mib": harness.peak_mib(), "losses": losses,
            "finite": bool(np.all(np.isfinite(losses))), "batch_size": len(images),
            "training_flops_per_image": flops.training_flops_per_image(trainer.model),
            "conv_gflops": {name: p.flops / statistics.median(p.seconds) / 1e9 for name, p in probes.items()}}


class HostTrips:
    """Counts, while active, the host's trips to the device: the outermost eager calls of tf.functions and
    data iterators, and blocking reads of eager tensors (their classes' methods wrapped until close())."""

    def __init__(self):
        import tensorflow as tf
        from tensorflow.python.data.ops import iterator_ops
        from tensorflow.python.distribute import input_lib
        from tensorflow.python.eager.polymorphic_function import polymorphic_function
        from tensorflow.python.framework import ops

        self.active, self.depth, self.count, self.undo = False, 0, 0, []
        for cls, attribute in ((ops._EagerTensorBase, "_numpy"), (polymorphic_function.Function, "__call__"),
                               (iterator_ops.OwnedIterator, "__next__"),
                               (input_lib.DistributedIteratorBase, "__next__")):
            original = cls.__dict__[attribute]

            def wrapped(*args, _original=original, **kwargs):
                self.count += self.active and self.depth == 0 and tf.executing_eagerly()
                self.depth += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.depth -= 1

            setattr(cls, attribute, wrapped)
            self.undo.append((cls, attribute, original))

    def close(self):
        for cls, attribute, original in self.undo:
            setattr(cls, attribute, original)


def child_loop(args):
    """The real training loop (train.train: data pipeline, checkpoints at the start and end), timed and
    its host trips counted after its first one-step calls (all are one step with steps_per_loop 1)."""
    cfg = harness.child_config(args, steps_per_loop=args.steps_per_loop)
    first = harness.FIRST_CALLS if args.steps_per_loop > 1 else args.warmup + 1  # the first step traces
    trips = HostTrips()

    def count_after_first(r):
        trips.active = first <= r.step < first + args.steps

    try:
        records, _, _ = harness.run_loop(cfg, first + args.steps, args.data_dir, count_after_first)
    finally:
        trips.close()
    timed = [r.seconds for r in records[first:]]
    return {"step_s": statistics.median(timed), "step_s_all": [r.seconds for r in records],
            "trips_per_step": trips.count / len(timed), "batch_size": cfg.optimization.batch_size,
            "peak_mib": harness.peak_mib()}


def add_train_figures(r):
    """Images/s, GFLOP/s (iaf_tf.flops) and the ratio to the same-process conv of the same precision."""
    r["images_per_s"] = r["batch_size"] / r["step_s"]
    r["gflop_per_image"] = r["training_flops_per_image"] / 1e9
    r["gflops"] = r["gflop_per_image"] * r["images_per_s"]
    r["ratio"] = ratio(r["gflops"], r["conv_gflops"].get(r["precision"]))
    r["conv_share"] = ratio(r["convs_s"], r["step_s"])
    r["note"] = "" if r["finite"] else "NON-FINITE LOSS"


LABELS = [Column("code", "code"), Column("config", "config"), Column("prec", "variant")]
CONV = [Column("conv f32", lambda r: r["conv_gflops"].get("float32"), ".1f"),
        Column("conv bf16", lambda r: r["conv_gflops"].get("bfloat16"), ".1f")]
PEAK = Column("peak MiB", "peak_mib", ".0f")
TRAIN_COLUMNS = LABELS + [
    Column("step s", "step_s", ".3f"), Column("img/s", "images_per_s", ".2f"),
    Column("GFLOP/img", "gflop_per_image", ".2f"), Column("GFLOP/s", "gflops", ".1f"), *CONV,
    Column("ratio", "ratio", ".3f"), Column("convs s", "convs_s", ".3f"), Column("conv share", "conv_share", ".3f"),
    PEAK,
    Column("trace s", "trace_s", ".2f"), Column("first step s", "first_step_s", ".2f"), Column("", "note")]
LOOP_COLUMNS = LABELS + [Column("step s", "step_s", ".3f"), Column("img/s", "images_per_s", ".2f"), PEAK,
                         Column("host trips/step", "trips_per_step", ".2f")]
TRACE_COLUMNS = [Column("code", "code"), Column("blocks", "blocks", "d"), Column("build+init s", "build_s", ".2f"),
                 Column("trace s", "trace_s", ".2f"), PEAK]


def median_record(records):
    """One record for the rounds of a case: the round with the median step (the lower one of an even
    count), so that a row's figures stay one round's, with "rounds" (how many ran), each round's step
    seconds and ratio in "step_s_rounds" and "ratio_rounds", "finite" only if every round's loss was, and
    the first note given; the first error if no round ran."""
    ran = [r for r in records if "error" not in r]
    if not ran:
        return records[0]
    median = sorted(ran, key=lambda r: r["step_s"])[(len(ran) - 1) // 2]
    return dict(median, rounds=len(ran), step_s_rounds=[r["step_s"] for r in ran],
                ratio_rounds=[r.get("ratio") for r in ran], finite=all(r.get("finite", True) for r in ran),
                note=next((r["note"] for r in ran if r.get("note")), ""))


def per_round(rows):
    """Each case's step seconds and ratio in every round, when there was more than one."""
    def figures(values):
        return ", ".join("-" if v is None else f"{v:.3f}" for v in values)

    return [f"{r['code']} {r['config']} {r['variant']} by round: step s {figures(r['step_s_rounds'])}; "
            f"ratio {figures(r['ratio_rounds'])}" for r in rows if r.get("rounds", 1) > 1]


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
    parser.add_argument("--only", default="train,loop,trace", help="any of train,loop,trace")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per config")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    parser.add_argument("--steps_per_loop", type=int, default=1, help="--only loop: steps per call from the host")
    parser.add_argument("--trace_blocks", default="20,40", help="--only trace: README-recipe num_blocks")
    parser.add_argument("--rounds", type=int, default=1, help="--only train,loop: run each case this many times, "
                        "the checkouts alternating, and show the round with the median step")
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return harness.run_as_child(args, {"train": child_train, "loop": child_loop, "trace": child_train})

    codes, configs, only = harness.checkouts(args), harness.listed(args.configs), set(args.only.split(","))
    results = {"train": [], "loop": [], "trace": []}

    def run(kind, root, config, precision="float32", hpconfig=args.hpconfig, jit=False):
        return harness.run_child(Path(__file__).resolve(), [
            "--child", kind, "--root", root, "--config", config, "--precision", precision, "--hpconfig", hpconfig,
            "--steps", args.steps, "--warmup", args.warmup, "--steps_per_loop", args.steps_per_loop,
            "--data_dir", args.data_dir] + ["--jit_compile"] * jit)

    def sweep(kind, variants, figures):
        """`kind` for every config, (precision, jit) variant and checkout, --rounds times (the checkouts
        alternating within a round); one row per case (median_record)."""
        rounds = collections.defaultdict(list)
        for round_index in range(args.rounds):
            for config in configs:
                for precision, jit in variants:
                    for code, root in codes[::-1] if round_index % 2 else codes:
                        name = precision + ("+xla" if jit else "")
                        r = run(kind, root, config, precision, jit=jit)
                        r.update(code=code, config=config, precision=precision, variant=name)
                        if "error" not in r:
                            figures(r)
                        rounds[code, config, name].append(r)
                        print(f"  {kind} {code} {config} {name}: {r.get('step_s', r.get('error', 'done'))}",
                              file=sys.stderr)
        results[kind] += [median_record(records) for records in rounds.values()]

    plain = [(p, False) for p in harness.listed(args.precisions)]
    if "train" in only:
        sweep("train", plain + [("float32", True)] * args.jit_compile, add_train_figures)
        harness.print_table(TRAIN_COLUMNS, results["train"], labels=3, title=(
            "\nTraining (median step after warm-up; conv = plain 3x3 conv fwd+bwd measured in the same process)"
            + (f"; of {args.rounds} rounds, the one with the median step" if args.rounds > 1 else "")),
            notes=["ratio = model GFLOP/s / conv GFLOP/s of the same precision, same process.",
                   "convs s = the step's convolutions alone (each of the model's shapes, forward and both "
                   "backward passes); conv share = convs s / step s.",
                   "first step s = making the Trainer and its data-dependent init, tracing, and the first call."]
            + comparisons(results["train"]) + per_round(results["train"]) + precision_case(results["train"]))
    if "loop" in only:
        sweep("loop", plain, lambda r: r.update(images_per_s=ratio(r["batch_size"], r["step_s"])))
        harness.print_table(LOOP_COLUMNS, results["loop"], labels=3, title=(
            f"\nThe training loop of bin/iaf.py (train.train, steps_per_loop {args.steps_per_loop}): host trips are "
            "tf.function calls, iterator next() and blocking reads from Python"))
    if "trace" in only:
        for blocks in harness.listed(args.trace_blocks):
            for code, root in codes:
                hpconfig = ",".join(harness.listed(f"num_blocks={blocks},{args.hpconfig}"))
                results["trace"].append(dict(run("trace", root, "readme_recipe", hpconfig=hpconfig), code=code))
        harness.print_table(TRACE_COLUMNS, results["trace"],
                            title="\ntf.function tracing of the training step (README recipe, batch 32)")
    harness.save_json(args.json, results)


if __name__ == "__main__":
    main()
