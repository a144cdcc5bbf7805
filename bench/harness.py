"""What the bench scripts share: set-up, the calls into iaf_tf, child processes and their JSON record, the
common options, the table printer and the same-process conv probe.

It imports no TensorFlow at import time: the parents of the child processes stay light, and `setup` must
run before TensorFlow's first op.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Shared inputs live beside the checkout (../shared) unless the environment says otherwise.
DATA_DIR = os.environ.get("CIFAR10_PATH", str(ROOT.parent / "shared" / "data"))
REFERENCE_DIR = ROOT.parent / "shared" / "reference" / "tf1-small"
TF_LOG_LEVEL = "3"  # bin/iaf.py's default: TensorFlow's C++ log off (Python errors still show)
CONV_SHAPE = dict(batch=32, size=16, channels=160)  # the README recipe's main conv at its batch size
FIRST_CALLS = 10  # train.train's first host calls run one step each (its first console lines)


# ------------------------------------------------------------------------ set-up and calls into iaf_tf

def setup(root=ROOT):
    """Put `root`'s iaf_tf first on the path and configure the CPU as bin/iaf.py does (before any op)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    sys.path.insert(0, str(Path(root).resolve()))
    import iaf_tf
    from iaf_tf.devices import configure_cpu

    # A stale import (an installed copy, or another checkout imported first) would measure the wrong code.
    found = Path(iaf_tf.__file__).resolve().parents[1]
    if found != Path(root).resolve():
        raise RuntimeError(f"iaf_tf was imported from {found}, not from the checkout {root}")
    configure_cpu(1)


def config(preset, hpconfig="", precision=None, jit_compile=None, **settings):
    """config.resolve on one device; `precision` ("float32" or "bfloat16") and `jit_compile` where given."""
    from iaf_tf import config as config_module
    if precision is not None:
        settings["mixed_precision"] = precision == "bfloat16"
    if jit_compile is not None:
        settings["jit_compile"] = bool(jit_compile)
    return config_module.resolve(preset=preset, hpconfig=hpconfig, **{"num_gpus": 1, **settings})


def batch_images(cfg, count, data_dir):
    """`count` CIFAR-10 test images for a CIFAR-10 config, else random uint8 images of the config's shape."""
    import numpy as np
    from iaf_tf import data, datasets
    if cfg.data.dataset == "cifar10":
        return data.load_cifar10("test", data_dir)[:count]
    size, channels = cfg.data.image_size, datasets.get(cfg.data.dataset).channels
    return np.random.default_rng(0).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def loop_config(cfg, logdir, max_steps, data_dir):
    """`cfg` for a benchmark run of train.train: no summaries or checkpoints between its first and last."""
    return cfg.replace(logdir=logdir, max_steps=max_steps, checkpoint_every=10**9, summary_every=10**9,
                       data_dir=data_dir)


def run_loop(loop_cfg, on_step=None, trainer=None):
    """train.train on a loop_config (a `trainer` must be made from it); returns (its StepRecords, its result)."""
    from iaf_tf import train
    records = []

    def record(r):
        records.append(r)
        if on_step:
            on_step(r)

    return records, train.train(loop_cfg, trainer=trainer, on_step=record, print_fn=quiet)


def train_and_score(cfg, test_images, trainer=None, weights=("ema",)):
    """train.train(cfg), then the test score (k = 1, the run's seed) of the checkpoint it saved, with each
    of `weights` ("ema": the moving averages, what the original reports; "raw": the last weights)."""
    import iaf_tf
    from iaf_tf import train
    begin = time.perf_counter()
    result = train.train(cfg, trainer=trainer, print_fn=quiet)
    scores = {"result": result, "train_s": time.perf_counter() - begin}
    trained = scores["trained"] = iaf_tf.load(cfg.runtime.logdir, weights=weights[0])
    for name in weights:
        trained.load_weights(trained.checkpoint, weights=name)
        scores[name] = trained.score(trained.nll(test_images, k=1, seed=cfg.runtime.seed))
    return scores


def peak_mib():
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet(*_):
    """A print_fn for train.train when its console lines are not wanted."""


def ratio(a, b):
    return a / b if a is not None and b else None


def listed(text):
    """The items of a comma-separated option."""
    return [item for item in text.split(",") if item]


# ------------------------------------------------------------------------------ options and children

def arguments(doc, configs=None, baseline=False, jit_help=argparse.SUPPRESS):
    """A parser with the options the scripts share, and the hidden ones of their child processes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if configs:
        parser.add_argument("--configs", default=configs, help="presets, comma-separated")
    if baseline:
        parser.add_argument("--baseline", default=None, help="another checkout to run side by side, e.g. "
                            "from `git worktree add --detach /tmp/iaf-baseline <commit>`")
    parser.add_argument("--hpconfig", default="", help="extra overrides for every config")
    parser.add_argument("--data_dir", default=DATA_DIR)
    parser.add_argument("--json", default=None, help="also write all records here")
    for name in ("--record", "--child", "--config"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--jit_compile", action="store_true", help=jit_help)
    return parser


def checkouts(args):
    """[(name, root)]: this checkout, and --baseline's."""
    return [("current", ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])


def jit_settings(text):
    return [{"off": False, "on": True}[j] for j in listed(text)]


def run_child(script, argv):
    """Run `script --record FILE argv...` in a fresh interpreter (peak memory is per process, and one
    measurement's allocations must not inflate another's); returns its record, or {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix="iaf_bench_") as tmp:
        record = Path(tmp) / "record.json"
        cmd = [sys.executable, str(script), "--record", str(record), *map(str, argv)]
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode == 0 and record.exists():
            return json.loads(record.read_text())
    tail = " | ".join(proc.stderr.strip().splitlines()[-6:])
    return {"error": f"exit {proc.returncode}: {tail or 'no record written'}"}


def write_record(path, record):
    """The child's result for its parent: one JSON object in the file the parent named."""
    Path(path).write_text(json.dumps(record))


def save_json(path, results):
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def child_flops(args):
    """The analytic FLOPs per image (iaf_tf.flops) of --config, forward and a training step."""
    from iaf_tf import datasets, flops
    from iaf_tf.model import CVAE
    cfg = config(args.config, args.hpconfig)
    model = CVAE(cfg, datasets.get(cfg.data.dataset)).build_for(1)
    return {"forward": flops.forward_flops_per_image(model), "training": flops.training_flops_per_image(model)}


def flops_per_image(script, config_name, hpconfig):
    """child_flops of this checkout, run through `script` (whose --child flops calls it)."""
    record = run_child(script, ["--child", "flops", "--config", config_name, "--hpconfig", hpconfig])
    if "error" in record:
        print(f"  flops {config_name}: {record['error']}", file=sys.stderr)
    return record


def run_as_child(args, children):
    """In a child process: set up --root's iaf_tf, run children[--child](args), write its record."""
    setup(args.root)
    write_record(args.record, {"flops": child_flops, **children}[args.child](args))


# -------------------------------------------------------------------------------------- tables

@dataclasses.dataclass(frozen=True)
class Column:
    """`value`: a key of the row or a function of it; `fmt`: for numbers, a format spec (".3f") or a
    template ("{:.2f}x"), "" for text. A header may span lines ("train bpd\\n(last 100)")."""
    header: str
    value: object
    fmt: str = ""

    def cell(self, row):
        value = self.value(row) if callable(self.value) else row.get(self.value)
        if value is None:
            return "-"
        if not self.fmt:
            return str(value)
        return self.fmt.format(value) if "{" in self.fmt else format(value, self.fmt)


def print_table(columns, rows, title=None, notes=(), labels=1, out=print):
    """Text columns left-aligned, numbers right-aligned, each as wide as its widest cell. A row with an
    "error" key shows its first `labels` cells and the error instead of the figures."""
    headers = [c.header.split("\n") for c in columns]
    height = max(len(h) for h in headers)
    headers = [[""] * (height - len(h)) + h for h in headers]
    cells = [None if "error" in row else [c.cell(row) for c in columns] for row in rows]
    widths = [max([len(line) for line in h] + [len(r[i]) for r in cells if r]) for i, h in enumerate(headers)]
    for i, row in enumerate(rows):  # an error row's labels count too
        if cells[i] is None:
            widths[:labels] = [max(w, len(c.cell(row))) for w, c in zip(widths, columns[:labels])]

    def line(texts):
        return " ".join(t.ljust(w) if not c.fmt else t.rjust(w)
                        for t, w, c in zip(texts, widths, columns)).rstrip()

    if title:
        out(title)
    for level in range(height):
        out(line([h[level] for h in headers]))
    out("-" * len(line([h[-1] for h in headers])))
    for row, texts in zip(rows, cells):
        out(line(texts) if texts else line([c.cell(row) for c in columns[:labels]]) + f" ERROR {row['error']}")
    for note in notes:
        out(note)


# ------------------------------------------------------------------------------------ conv probe

class ConvProbe:
    """A plain 3x3 conv (forward and both backward passes) in one dtype, timed between the model's steps
    so that a ratio compares the model with the machine under the same load: the machine is shared and
    absolute seconds drift."""

    def __init__(self, dtype, batch, size, channels):
        import tensorflow as tf
        self.flops = 3 * 2 * 9 * channels * channels * size * size * batch
        self.inputs = [tf.cast(tf.random.normal(shape) * scale, dtype) for shape, scale in (
            ([batch, size, size, channels], 1.0), ([3, 3, channels, channels], 0.05),
            ([batch, size, size, channels], 1.0))]

        @tf.function
        def step(x, w, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = tf.nn.conv2d(x, w, 1, "SAME")
            # y is returned so that the forward conv runs: the gradients alone do not need it.
            return [y, *tape.gradient(y, [x, w], output_gradients=dy)]

        self.step = step
        self.seconds, self.cpu_seconds = [], []
        self.run(reps=2, record=False)

    def run(self, reps=3, record=True):
        for _ in range(reps):
            begin, cpu = time.perf_counter(), time.process_time()
            self.step(*self.inputs)[2].numpy()
            if record:
                self.seconds.append(time.perf_counter() - begin)
                self.cpu_seconds.append(time.process_time() - cpu)


def conv_probes(precisions=("float32", "bfloat16")):
    """{precision name: ConvProbe} at CONV_SHAPE."""
    import tensorflow as tf
    return {name: ConvProbe(tf.as_dtype(name), **CONV_SHAPE) for name in precisions}


def probe_rates(probes):
    """The probes' GFLOP/s per wall second, and per CPU second of this process (which other processes on
    a shared machine affect less), for a JSON record."""
    return {f"conv_{kind}gflops": {name: p.flops / statistics.median(times(p)) / 1e9 for name, p in probes.items()}
            for kind, times in (("", lambda p: p.seconds), ("cpu_", lambda p: p.cpu_seconds))}
