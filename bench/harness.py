"""What the bench scripts share: set-up, calls into iaf_tf, options, child processes and their JSON record,
the table printer. No TensorFlow at import time: the parents stay light, and `setup` comes first."""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("CIFAR10_PATH", str(ROOT.parent / "shared" / "data"))  # else beside the checkout
REFERENCE_DIR = ROOT.parent / "shared" / "reference" / "tf1-small"
TF_LOG_LEVEL = "3"  # bin/iaf.py's default: TensorFlow's C++ log off (Python errors still show)
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


def child_config(args, **settings):
    """A child's --config with its --hpconfig, --precision (where the script has it) and --jit_compile."""
    return config(args.config, args.hpconfig, getattr(args, "precision", None), args.jit_compile, **settings)


def batch_images(cfg, count, data_dir):
    """`count` CIFAR-10 test images for a CIFAR-10 config, else random uint8 images of the config's shape."""
    import numpy as np
    from iaf_tf import data, datasets
    if cfg.data.dataset == "cifar10":
        return data.load_cifar10("test", data_dir)[:count]
    size, channels = cfg.data.image_size, datasets.get(cfg.data.dataset).channels
    return np.random.default_rng(0).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def run_loop(cfg, max_steps, data_dir, on_step=None):
    """train.train of `cfg` for max_steps in a temporary logdir, saving only at the start and the end;
    returns (its StepRecords, each also passed to on_step, its result, the Trainer)."""
    from iaf_tf import train
    records = []

    def record(r):
        records.append(r)
        if on_step:
            on_step(r)

    with tempfile.TemporaryDirectory(prefix="iaf_loop_", ignore_cleanup_errors=True) as logdir:
        cfg = cfg.replace(logdir=logdir, max_steps=max_steps, checkpoint_every=10**9, summary_every=10**9,
                          data_dir=data_dir)
        trainer = train.Trainer(cfg)
        result = train.train(cfg, trainer=trainer, on_step=record, print_fn=quiet)
    return records, result, trainer


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

def arguments(doc, configs=None, baseline=False, hpconfig=True, jit_help=argparse.SUPPRESS):
    """A parser with the options the scripts share, and the hidden ones of their child processes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if configs:
        parser.add_argument("--configs", default=configs, help="presets, comma-separated")
    if baseline:
        parser.add_argument("--baseline", default=None, help="another checkout to run side by side, e.g. "
                            "from `git worktree add --detach /tmp/iaf-baseline <commit>`")
    if hpconfig:
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


def save_json(path, results):
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def run_as_child(args, children):
    """In a child process: set up --root's iaf_tf, run children[--child](args), and write what it returns
    as the JSON record its parent named."""
    setup(args.root)
    Path(args.record).write_text(json.dumps(children[args.child](args)))


# -------------------------------------------------------------------------------------- tables

@dataclasses.dataclass(frozen=True)
class Column:
    """`value`: a key of the row or a function of it; `fmt`: for numbers, a format spec (".3f") or a
    template ("{:.2f}x"), "" for text. A header may span lines ("test bpd\\n(EMA)")."""
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
