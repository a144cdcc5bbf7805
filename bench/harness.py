"""What the bench scripts share: set-up, data defaults, child processes, the table printer, the conv probe.

- `setup(root)` / `load_library(root)`: import the iaf_tf of a checkout the way bin/iaf.py runs it.
- `Library`: the calls the benchmarks make into iaf_tf, the one place to change when its API moves
  (`--baseline` runs another checkout through the same calls).
- `run_child` / `write_record`: a benchmark child writes one JSON record to a file named on its command
  line, so nothing is ever parsed out of log text.
- `print_table`: every table, its columns sized from the data.
- `ConvProbe`: the machine's own conv speed, measured in the same process as the model.

This module imports no TensorFlow at import time: the parent of the child processes stays light, and
`setup` must run before TensorFlow's first op.
"""

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

# bin/iaf.py's default: TensorFlow's C++ INFO, WARNING and ERROR lines off (Python errors still show).
TF_LOG_LEVEL = "3"

# The main conv shape of the README recipe (h_size 160 at 16x16) at its batch size.
CONV_SHAPE = dict(batch=32, size=16, channels=160)


# ------------------------------------------------------------------------------------ set-up

def setup(root=ROOT, inter_op_threads=0):
    """Put `root`'s iaf_tf first on the path and configure the CPU as bin/iaf.py does (before any op)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    sys.path.insert(0, str(Path(root).resolve()))
    import iaf_tf
    from iaf_tf.devices import configure_cpu

    # A stale import (an installed copy, or another checkout imported first) would measure the wrong code.
    found = Path(iaf_tf.__file__).resolve().parents[1]
    if found != Path(root).resolve():
        raise RuntimeError(f"iaf_tf was imported from {found}, not from the checkout {root}")
    configure_cpu(1, inter_op_threads=inter_op_threads)


def load_library(root=ROOT, inter_op_threads=0):
    """`setup(root)`, then the calls into that checkout's iaf_tf."""
    setup(root, inter_op_threads)
    return Library()


def peak_mib():
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet(*_):
    """A print_fn for train.train when its console lines are not wanted."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The few numbers of a config that the benchmarks need, whatever the API."""
    batch_size: int
    eval_batch_size: int
    image_size: int
    blocks: int


class Library:
    """The calls the benchmarks make into iaf_tf (the current API)."""

    def config(self, preset, hpconfig="", precision="float32", jit_compile=False, **settings):
        from iaf_tf import config
        return config.resolve(preset=preset, hpconfig=hpconfig, mixed_precision=precision == "bfloat16",
                              jit_compile=bool(jit_compile), **{"num_gpus": 1, **settings})

    def sizes(self, cfg):
        return Sizes(cfg.optimization.batch_size, cfg.evaluation.eval_batch_size, cfg.data.image_size,
                     sum(cfg.model.level_depths))

    def make_trainer(self, cfg):
        from iaf_tf import train
        return train.Trainer(cfg)

    def step_function(self, trainer):
        """The compiled training step, a tf.function (get_concrete_function traces it)."""
        return trainer.train_step

    def make_model(self, cfg):
        from iaf_tf import datasets
        from iaf_tf.model import CVAE
        return CVAE(cfg, datasets.get(cfg.data.dataset)).build_for(1)

    def loop_step_seconds(self, cfg, logdir, max_steps, data_dir):
        """Wall seconds of each step of the real training loop (train.train: data, summaries, checkpoints)."""
        return [r.seconds for r in self.run_loop(self.loop_config(cfg, logdir, max_steps, data_dir))]

    def loop_config(self, cfg, logdir, max_steps, data_dir):
        """`cfg` for a benchmark run of train.train: max_steps in logdir, no summaries or checkpoints in
        between (train.train saves at the start and the end)."""
        return cfg.replace(logdir=logdir, max_steps=max_steps, checkpoint_every=10**9, summary_every=10**9,
                           data_dir=data_dir)

    def run_loop(self, loop_cfg, on_step=None, trainer=None):
        """train.train with a loop_config; returns its StepRecords (after passing each to on_step). A
        `trainer` must be made from loop_cfg itself: train.train runs with the trainer's config."""
        from iaf_tf import train
        records = []

        def record(r):
            records.append(r)
            if on_step:
                on_step(r)

        self.result = train.train(loop_cfg, trainer=trainer, on_step=record, print_fn=quiet)
        return records


def watch_steps(trainer, on_call):
    """Wrap this trainer's public train_step (on the instance only): on_call(wall seconds, metrics) after
    each call. For what a step callback does not report, e.g. the metrics of every step."""
    step = trainer.train_step

    def watched(batch):
        begin = time.perf_counter()
        metrics, applied = step(batch)
        on_call(time.perf_counter() - begin, metrics)
        return metrics, applied

    trainer.train_step = watched


# ------------------------------------------------------------------------------ child processes

def add_child_arguments(parser):
    """The option through which a parent asks for the record (hidden from --help)."""
    import argparse
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)


def write_record(path, record):
    """The child's result for its parent: one JSON object in the file the parent named."""
    Path(path).write_text(json.dumps(record))


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
        if texts is None:
            out(line([c.cell(row) for c in columns[:labels]]) + f" ERROR {row['error']}")
        else:
            out(line(texts))
    for note in notes:
        out(note)


# ------------------------------------------------------------------------------------ conv probe

def conv_flops(batch, size, channels):
    """Forward + input gradient + filter gradient of one 3x3 'SAME' conv."""
    return 3 * 2 * 9 * channels * channels * size * size * batch


class ConvProbe:
    """A plain 3x3 conv (forward and both backward passes) in one dtype, timed between the model's steps
    so that a ratio compares the model with the machine under the same load: the machine is shared and
    absolute seconds drift."""

    def __init__(self, dtype, batch, size, channels):
        import tensorflow as tf
        self.flops = conv_flops(batch, size, channels)
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

    def gflops(self):
        return self.flops / statistics.median(self.seconds) / 1e9

    def cpu_gflops(self):
        """Per CPU-second of this process: less sensitive to other processes on a shared machine."""
        return self.flops / statistics.median(self.cpu_seconds) / 1e9


def conv_probes():
    """{precision name: ConvProbe} for float32 and bfloat16 at CONV_SHAPE."""
    import tensorflow as tf
    return {name: ConvProbe(dtype, **CONV_SHAPE) for name, dtype in (("float32", tf.float32),
                                                                   ("bfloat16", tf.bfloat16))}


def probe_rates(probes):
    """The probes' wall and per-CPU-second GFLOP/s, for a JSON record."""
    return {"conv_gflops": {name: p.gflops() for name, p in probes.items()},
            "conv_cpu_gflops": {name: p.cpu_gflops() for name, p in probes.items()}}
