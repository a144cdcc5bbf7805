"""Speed and memory of training, evaluation and importance sampling, against the hardware's own conv speed.

Every measurement runs in a fresh subprocess (peak resident memory is per process, and one config's
allocations must not inflate another's). Training steps are timed one by one after warm-up and
interleaved with a plain 3x3 conv of the model's main shape (batch 32, 16x16, 160 -> 160, forward and
both backward passes) in float32 and bfloat16, so that "ratio" compares the model with the machine under
the same load: the machine is shared and absolute seconds drift.

FLOPs are analytic, counted on the model's own convolutions: forward 2*kh*kw*cin*cout*Hout*Wout per
image (a transposed conv on its input grid), dense even where a mask zeroes taps; a training step counts
3x forward (forward, input gradient, filter gradient). Everything else is treated as free.

--baseline DIR runs the same children against another checkout, e.g. one made with
`git worktree add --detach /tmp/iaf-baseline <commit>`, so that before/after figures come from one run.

Usage:
  python bench/speed.py                                   # README recipe + cpu_quick, float32 and bfloat16
  python bench/speed.py --configs readme_recipe --precisions float32 --steps 3 --baseline /tmp/iaf-baseline
  python bench/speed.py --only trace                      # tf.function tracing time, 20 and 40 blocks
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("CIFAR10_PATH", str(ROOT.parent / "shared" / "data"))

# The main conv shape of the README recipe (h_size 160 at 16x16) at its batch size.
CONV_SHAPE = dict(batch=32, size=16, channels=160)


# ----------------------------------------------------------------------------------------- children

def _import_library(root, inter_op=0):
    """Import the checkout at `root` and set up the CPU as bin/iaf.py does."""
    sys.path.insert(0, str(root))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from iaf_tf.devices import configure_cpu

    configure_cpu(1, inter_op_threads=inter_op)


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conv_flops(batch, size, channels):
    """Forward + input gradient + filter gradient of one 3x3 'SAME' conv."""
    return 3 * 2 * 9 * channels * channels * size * size * batch


class ConvProbe:
    """Times the plain conv (forward and both backward passes) in one dtype."""

    def __init__(self, dtype, batch, size, channels):
        import tensorflow as tf
        self.flops = conv_flops(batch, size, channels)
        self.x = tf.cast(tf.random.normal([batch, size, size, channels]), dtype)
        self.w = tf.cast(tf.random.normal([3, 3, channels, channels]) * 0.05, dtype)
        self.dy = tf.cast(tf.random.normal([batch, size, size, channels]), dtype)

        @tf.function
        def step(x, w, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = tf.nn.conv2d(x, w, 1, "SAME")
            # y is returned so that the forward conv runs: the gradients alone do not need it.
            return [y, *tape.gradient(y, [x, w], output_gradients=dy)]

        self._step = step
        self.seconds, self.cpu_seconds = [], []
        self.run(reps=2, record=False)

    def run(self, reps=3, record=True):
        for _ in range(reps):
            begin, cpu = time.perf_counter(), time.process_time()
            outputs = self._step(self.x, self.w, self.dy)
            outputs[2].numpy()
            if record:
                self.seconds.append(time.perf_counter() - begin)
                self.cpu_seconds.append(time.process_time() - cpu)

    def gflops(self):
        return self.flops / statistics.median(self.seconds) / 1e9

    def cpu_gflops(self):
        """Per CPU-second of this process: less sensitive to other processes on a shared machine."""
        return self.flops / statistics.median(self.cpu_seconds) / 1e9


def _make_probes():
    import tensorflow as tf
    return {name: ConvProbe(dtype, **CONV_SHAPE) for name, dtype in (("float32", tf.float32),
                                                                   ("bfloat16", tf.bfloat16))}


def _hps(args):
    from iaf_tf import hparams
    hps = hparams.resolve_hparams(args.config, args.hpconfig)
    return hps.replace(num_gpus=1, mixed_precision=args.precision == "bfloat16",
                       jit_compile=bool(args.jit_compile))


def model_forward_flops(model):
    """Analytic forward FLOPs per image of every weight-normed conv, from the shapes seen in one call."""
    import tensorflow as tf
    from iaf_tf.layers import WNConv2D

    convs = [layer for layer in _all_layers(model) if isinstance(layer, WNConv2D)]
    seen = {}
    for conv in convs:
        def recording(x, *a, _conv=conv, _call=conv.call, **kw):
            out = _call(x, *a, **kw)
            seen[id(_conv)] = (tuple(x.shape), tuple(out.shape))
            return out
        conv.call = recording
    try:
        images = tf.zeros([1, model.hps.image_size, model.hps.image_size, model.channels], tf.uint8)
        model(images, tf.constant([0, 0], tf.int32))
    finally:
        for conv in convs:
            del conv.call
    total = 0
    for conv in convs:
        x_shape, y_shape = seen[id(conv)]
        kh, kw = conv.kernel_size
        grid = x_shape[1] * x_shape[2] if conv.transpose else y_shape[1] * y_shape[2]
        total += 2 * kh * kw * x_shape[3] * y_shape[3] * grid
    return total


def graph_conv_dtypes(graph):
    """{dtype: number of conv ops} in a traced graph and the functions it calls: tells whether a
    bfloat16 run really computes in bfloat16 (an older checkout ignores the hparam)."""
    counts = {}
    graphs = [graph] + [f.graph for f in getattr(graph, "_functions", {}).values() if hasattr(f, "graph")]
    for g in graphs:
        for op in g.get_operations():
            if op.type.startswith("Conv2D") or "Conv2D" in op.type:
                name = op.get_attr("T").name
                counts[name] = counts.get(name, 0) + 1
    return counts


def _all_layers(layer):
    found = [layer]
    for sub in getattr(layer, "_layers", []) or []:
        found += _all_layers(sub)
    return found


def child_train(args):
    _import_library(args.root, args.inter_op)
    import numpy as np
    import tensorflow as tf
    from iaf_tf import data, train

    hps = _hps(args)
    images = data.load_cifar10("test", args.data_dir)[:hps.batch_size]
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    flops_image = model_forward_flops(trainer.model)
    trainer.initialize(images)
    batch = tf.constant(images)

    begin = time.perf_counter()
    concrete = trainer._train_step.get_concrete_function(batch)
    trace_s = time.perf_counter() - begin
    conv_dtypes = graph_conv_dtypes(concrete.graph)
    begin = time.perf_counter()
    metrics, _ = trainer.train_step(batch)
    float(metrics["objective"])
    first_s = time.perf_counter() - begin
    for _ in range(args.warmup):
        float(trainer.train_step(batch)[0]["objective"])

    probes = _make_probes() if args.probe else {}
    losses, seconds, cpu_seconds = [], [], []
    for _ in range(args.steps):
        begin, cpu = time.perf_counter(), time.process_time()
        metrics, applied = trainer.train_step(batch)
        losses.append(float(metrics["objective"]))
        seconds.append(time.perf_counter() - begin)
        cpu_seconds.append(time.process_time() - cpu)
        for probe in probes.values():
            probe.run()
    step_s = statistics.median(seconds)
    peak = _peak_mib()
    result = {
        "kind": "train", "trace_s": trace_s, "first_call_s": first_s, "step_s": step_s,
        "step_s_all": seconds, "images_per_s": hps.batch_size / step_s,
        "gflop_per_image": 3 * flops_image / 1e9,
        "gflops": 3 * flops_image * hps.batch_size / step_s / 1e9,
        "peak_mib": peak, "losses": losses, "finite": bool(np.all(np.isfinite(losses))),
        "conv_gflops": {name: p.gflops() for name, p in probes.items()},
        "cpu_gflops": 3 * flops_image * hps.batch_size / statistics.median(cpu_seconds) / 1e9,
        "conv_cpu_gflops": {name: p.cpu_gflops() for name, p in probes.items()},
        "batch_size": hps.batch_size, "conv_dtypes": conv_dtypes,
    }
    print("RESULT " + json.dumps(result))


def child_eval(args):
    _import_library(args.root, args.inter_op)
    import numpy as np
    import tensorflow as tf
    from iaf_tf import data
    from iaf_tf.likelihood import Evaluator
    from iaf_tf.model import CVAE

    hps = _hps(args)
    n = hps.eval_batch_size
    images = data.load_cifar10("test", args.data_dir)[:n * args.eval_batches]
    model = CVAE(hps).build_for(1)
    flops_image = model_forward_flops(model)
    model.initialize(tf.constant(images[:hps.batch_size]), tf.constant([0, -1], tf.int64))
    evaluator = Evaluator(model, jit_compile=hps.jit_compile)
    evaluator.nll(images[:n], k=1, max_batch=n)  # trace
    probes = _make_probes() if args.probe else {}
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
    result = {
        "kind": "eval", "eval_images_per_s": len(images) / eval_s, "is_samples_per_s": k / is_s,
        "eval_gflops": flops_image * len(images) / eval_s / 1e9, "is_gflops": flops_image * k / is_s / 1e9,
        "peak_mib": _peak_mib(), "finite": bool(np.all(np.isfinite(nll))), "eval_batch": n,
        # Forward only: the probe's forward+backward rate stands in for the conv's forward rate.
        "conv_gflops": {name: p.gflops() for name, p in probes.items()},
    }
    print("RESULT " + json.dumps(result))


def child_loop(args):
    """The real training loop (train.train: data pipeline, summaries, checkpoints at the start and end)."""
    _import_library(args.root, args.inter_op)
    import re
    import shutil
    import tempfile

    from iaf_tf import train

    hps = _hps(args)
    logdir = tempfile.mkdtemp(prefix="iaf_speed_")
    lines = []
    config = train.TrainConfig(logdir=logdir, max_steps=args.warmup + 1 + args.steps, checkpoint_every=10**9,
                               summary_every=10**9, data_dir=args.data_dir, print_fn=lines.append)
    try:
        train.train(hps, config)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    # "Iteration n, time = t s" is printed for each of the first 10 steps, t since the previous print.
    seconds = [float(m.group(1)) for m in (re.search(r"time = ([0-9.]+)s", line) for line in lines) if m]
    step_s = statistics.median(seconds[args.warmup + 1:]) if len(seconds) > args.warmup + 1 else None
    print("RESULT " + json.dumps({"kind": "loop", "step_s": step_s, "peak_mib": _peak_mib(),
                                  "images_per_s": hps.batch_size / step_s if step_s else None}))


def child_trace(args):
    _import_library(args.root, args.inter_op)
    import tensorflow as tf
    from iaf_tf import train

    hps = _hps(args)
    begin = time.perf_counter()
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    build_s = time.perf_counter() - begin
    spec = tf.TensorSpec([hps.batch_size, hps.image_size, hps.image_size, trainer.model.channels], tf.uint8)
    begin = time.perf_counter()
    trainer._train_step.get_concrete_function(spec)
    trace_s = time.perf_counter() - begin
    print("RESULT " + json.dumps({"kind": "trace", "blocks": sum(hps.level_depths), "build_s": build_s,
                                  "trace_s": trace_s, "peak_mib": _peak_mib()}))


# ------------------------------------------------------------------------------------------- parent

def run_child(kind, root, config, precision, args, hpconfig="", probe=True, jit=False):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--root", str(root),
           "--config", config, "--precision", precision, "--hpconfig", hpconfig, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--inter_op", str(args.inter_op), "--data_dir", args.data_dir,
           "--eval_batches", str(args.eval_batches)]
    if probe:
        cmd.append("--probe")
    if jit:
        cmd.append("--jit_compile")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    return {"kind": kind, "error": f"exit {proc.returncode}: {tail}"}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _table(title, head, rows, label):
    """Prints the title and header; yields (label, row) for the rows without an error, and prints those."""
    print(title)
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{label(r)} ERROR {r['error']}")
            continue
        yield label(r), r


def print_train(rows):
    head = (f"{'code':10s} {'config':14s} {'prec':12s} {'step s':>7s} {'img/s':>6s} {'GFLOP/img':>9s} "
            f"{'GFLOP/s':>7s} {'conv f32':>8s} {'conv bf16':>9s} {'ratio':>6s} {'peak MiB':>8s} "
            f"{'cpu ratio':>9s} {'1st call s':>10s} {'trace s':>7s}")
    for label, r in _table("\nTraining (median step after warm-up; conv = plain 3x3 conv fwd+bwd measured in the same "
                           "process)", head, rows,
                           lambda r: f"{r['code']:10s} {r['config']:14s} {r.get('variant', r['precision']):12s}"):
        conv = r["conv_gflops"]
        ratio = r["gflops"] / conv[r["precision"]] if r["precision"] in conv else None
        cpu_conv = r.get("conv_cpu_gflops", {})
        cpu_ratio = r["cpu_gflops"] / cpu_conv[r["precision"]] if r["precision"] in cpu_conv else None
        print(f"{label} {r['step_s']:7.3f} {r['images_per_s']:6.2f} {r['gflop_per_image']:9.2f} "
              f"{r['gflops']:7.1f} {_fmt(conv.get('float32'), '8.1f')} {_fmt(conv.get('bfloat16'), '9.1f')} "
              f"{_fmt(ratio, '6.3f')} {r['peak_mib']:8.0f} {_fmt(cpu_ratio, '9.3f')} "
              f"{r['first_call_s']:10.2f} {r['trace_s']:7.2f}"
              + ("" if r["finite"] else "  NON-FINITE LOSS")
              + ("  (computes in float32: this checkout ignores mixed_precision)"
                 if r["precision"] == "bfloat16" and "bfloat16" not in r.get("conv_dtypes", {}) else ""))
    print("ratio = model GFLOP/s / conv GFLOP/s of the same precision, same process (wall clock).\n"
          "cpu ratio = the same per CPU-second of the process: other processes on the machine affect it less.")
    found = {(r["code"], r["config"], r.get("variant", r["precision"])): r for r in rows if "error" not in r}
    for (code, config, variant), r in sorted(found.items()):
        f32 = found.get((code, config, "float32"))
        if variant != "float32" and f32:
            print(f"{code} {config}: {variant} images/s = {r['images_per_s'] / f32['images_per_s']:.2f}x float32")
        base = found.get(("baseline", config, variant))
        if code == "current" and base:
            print(f"{config} {variant}: current images/s = {r['images_per_s'] / base['images_per_s']:.2f}x baseline, "
                  f"peak memory {r['peak_mib']:.0f} vs {base['peak_mib']:.0f} MiB")


def print_loop(rows):
    head = f"{'code':10s} {'config':14s} {'prec':12s} {'step s':>7s} {'img/s':>6s} {'peak MiB':>8s} {'peak GB':>7s}"
    for label, r in _table("\nThe training loop of bin/iaf.py (train.train on CIFAR-10 train, with its checkpoints): "
                           "peak memory", head, rows,
                           lambda r: f"{r['code']:10s} {r['config']:14s} {r['precision']:12s}"):
        print(f"{label} {_fmt(r['step_s'], '7.3f')} {_fmt(r['images_per_s'], '6.2f')} {r['peak_mib']:8.0f} "
              f"{r['peak_mib'] * 2**20 / 1e9:7.2f}")


def print_eval(rows):
    head = (f"{'code':10s} {'config':14s} {'prec':8s} {'eval img/s':>10s} {'GFLOP/s':>7s} {'IS smp/s':>8s} "
            f"{'GFLOP/s':>7s} {'conv f32':>8s} {'conv bf16':>9s} {'peak MiB':>8s}")
    for label, r in _table("\nEvaluation (k=1, eval_batch_size per pass) and importance sampling (1 image, "
                           "k=2*eval_batch_size)", head, rows,
                           lambda r: f"{r['code']:10s} {r['config']:14s} {r['precision']:8s}"):
        conv = r["conv_gflops"]
        print(f"{label} {r['eval_images_per_s']:10.2f} {r['eval_gflops']:7.1f} {r['is_samples_per_s']:8.2f} "
              f"{r['is_gflops']:7.1f} {_fmt(conv.get('float32'), '8.1f')} {_fmt(conv.get('bfloat16'), '9.1f')} "
              f"{r['peak_mib']:8.0f}" + ("" if r["finite"] else "  NON-FINITE"))


def print_trace(rows):
    head = f"{'code':10s} {'blocks':>6s} {'build s':>7s} {'trace s':>7s} {'peak MiB':>8s}"
    for label, r in _table("\ntf.function tracing of the training step (README recipe, batch 32)", head, rows,
                           lambda r: f"{r['code']:10s}"):
        print(f"{label} {r['blocks']:6d} {r['build_s']:7.2f} {r['trace_s']:7.2f} {r['peak_mib']:8.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="readme_recipe,cpu_quick", help="presets, comma-separated")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--only", default="train,loop,eval,trace", help="any of train,loop,eval,trace")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per config")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    parser.add_argument("--eval_batches", type=int, default=1)
    parser.add_argument("--hpconfig", default="", help="extra overrides for every config")
    parser.add_argument("--jit_compile", action="store_true", help="also run float32 with jit_compile=true")
    parser.add_argument("--baseline", default=None, help="another checkout to run side by side")
    parser.add_argument("--inter_op", type=int, default=0, help="inter-op threads (0: TensorFlow's default)")
    parser.add_argument("--current", default=str(ROOT), help="the checkout to measure (default: this one)")
    parser.add_argument("--no_current", action="store_true", help="run only the --baseline checkout")
    parser.add_argument("--baseline_all", action="store_true",
                        help="also run the baseline in bfloat16 / with XLA (by default only float32)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--json", default=None, help="also write all results here")
    # Child-process arguments.
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return {"train": child_train, "eval": child_eval, "trace": child_trace, "loop": child_loop}[args.child](args)

    codes = [] if args.no_current else [("current", Path(args.current).resolve())]
    codes += [("baseline", Path(args.baseline).resolve())] if args.baseline else []
    configs = [c for c in args.configs.split(",") if c]
    precisions = [p for p in args.precisions.split(",") if p]
    only = set(args.only.split(","))
    results = {"train": [], "loop": [], "eval": [], "trace": []}

    def tagged(result, **tags):
        result.update(tags)
        return result

    def sweep(kind, variants, probe=True):
        """Runs `kind` for every config, (precision, jit) variant and checkout; the baseline only in plain
        float32 unless --baseline_all."""
        for config in configs:
            for precision, jit in variants:
                for code, root in codes:
                    if code == "baseline" and (precision != "float32" or jit) and not args.baseline_all:
                        continue
                    name = precision + ("+xla" if jit else "")
                    r = run_child(kind, root, config, precision, args, args.hpconfig, probe=probe, jit=jit)
                    results[kind].append(tagged(r, code=code, config=config, precision=precision, variant=name))
                    print(f"  {kind} {code} {config} {name}: {r.get('step_s', r.get('error', 'done'))}",
                          file=sys.stderr)

    plain = [(p, False) for p in precisions]
    if "train" in only:
        sweep("train", plain + ([("float32", True)] if args.jit_compile else []))
        print_train(results["train"])
    if "loop" in only:
        sweep("loop", plain, probe=False)
        print_loop(results["loop"])
    if "eval" in only:
        sweep("eval", plain)
        print_eval(results["eval"])
    if "trace" in only:
        for blocks in (20, 40):
            for code, root in codes:
                r = run_child("trace", root, "readme_recipe", "float32", args,
                              f"num_blocks={blocks}" + ("," + args.hpconfig if args.hpconfig else ""), probe=False)
                results["trace"].append(tagged(r, code=code))
        print_trace(results["trace"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
