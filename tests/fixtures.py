"""What several test modules share (plain functions and constants; the pytest fixtures are in conftest.py):
tiny configurations, synthetic images, the model's per-image bound, the command-line runners, TensorBoard
event readers and the raster-order oracle of the autoregressive masks."""

import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from iaf_tf import config, datasets, train
from iaf_tf import distributions as dist
from iaf_tf.model import CVAE

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
REFERENCE_DIR = SHARED / "reference" / "tf1-small"  # a checkpoint of the original TF1 code, its numbers
REFERENCE_PREFIX = "model.ckpt-3000"

# ---------------------------------------------------------------- tiny configurations (hpconfig strings)

# One IAF block: the cheapest model that trains (reliability and command-line tests).
ONE_BLOCK = "depth=1,num_blocks=1,h_size=8,z_size=4,batch_size=4,num_gpus=1,learning_rate=0.002"
# Two levels of one block: a downsampling block and the prior at 8x8.
ONE_BLOCK_PER_LEVEL = "depth=2,num_blocks=1,h_size=8,z_size=4,batch_size=4,num_gpus=1,learning_rate=0.002"
# The original's layout (two levels of two blocks) at h_size=16: every kind of block and residual path.
TWO_BLOCKS_PER_LEVEL = "depth=2,num_blocks=2,h_size=16,z_size=4,num_gpus=1,batch_size=4"

POSTERIORS = ("up_diag", "up_iaf1_nl", "up_iaf2_nl", "down_diag", "down_iaf1_nl", "down_iaf2_nl")
IAF_POSTERIORS = ("up_iaf1_nl", "up_iaf2_nl", "down_iaf1_nl", "down_iaf2_nl")


def tiny_config(hpconfig=ONE_BLOCK_PER_LEVEL, extra="", **settings):
    """The defaults with `hpconfig` (and `extra`) parsed, then any other settings by key."""
    return config.Config().parse(hpconfig + ("," + extra if extra else "")).replace(**settings)


# ---------------------------------------------------------------- images

def random_images(n, rng_seed=0):
    """uint8 CIFAR-sized noise images [n, 32, 32, 3]."""
    return np.random.default_rng(rng_seed).integers(0, 256, size=[n, 32, 32, 3]).astype(np.uint8)


def grey_images(n, rng_seed=0):
    """uint8 MNIST-like images [n, 32, 32, 1]: random grey 28x28 digits in a zero border of 2."""
    images = np.zeros([n, 32, 32, 1], np.uint8)
    images[:, 2:30, 2:30] = np.random.default_rng(rng_seed).integers(0, 256, size=[n, 28, 28, 1])
    return images


# ---------------------------------------------------------------- the model's per-image terms

def make_model(cfg, **kwargs):
    """An unbuilt CVAE of cfg for its dataset."""
    return CVAE(cfg, datasets.get(cfg.data.dataset), **kwargs)


def built_model(cfg):
    """A CVAE of cfg for its dataset with its variables made (see CVAE.build)."""
    model = make_model(cfg)
    model.build()
    return model


def seed(a, b=0):
    """A noise seed for the model's stateless RNG ops."""
    return tf.constant([a, b], tf.int32)


def run_model(model, images, seed, k=1, kl_min=config.Config().objective.kl_min):
    """model(images, seed, k) with, per image, the free-bits KL objective summed over the layers ("kl_obj",
    as train.loss_fn makes it) and the k-sample bound on -log p(x) ("nll", one per input image)."""
    out = model(images, seed, k=k)
    kl_obj = tf.add_n([train.free_bits_kl(kl_map, kl_min) for kl_map in out["kl_layers"]])
    return dict(out, kl_obj=kl_obj, nll=dist.importance_sampled_nll(out["log_pxz"], out["kl"], k))


def assert_holds_tf1_checkpoint(state, ckpt):
    """state (a TrainState with an optimizer) holds everything of a TF1 checkpoint: its raw weights, their
    moving averages and the Adamax slots of every weight that has them."""
    from iaf_tf.checkpoints import named_variables

    for name, var in named_variables(state.model).items():
        np.testing.assert_array_equal(var.numpy(), ckpt.weights[name], err_msg=name)
        np.testing.assert_array_equal(state.averages.shadow_for(var).numpy(), ckpt.ema[name], err_msg=name)
        if name in ckpt.adamax_mean:
            first_moment, running_max = state.optimizer.slots_for(var)
            np.testing.assert_array_equal(first_moment.numpy(), ckpt.adamax_mean[name], err_msg=name)
            np.testing.assert_array_equal(running_max.numpy(), ckpt.adamax_max[name], err_msg=name)


def published_bits_per_dim(expected, weights, k, test_images):
    """The reference's number (expected.json) for one evaluation setting."""
    return next(r["bits_per_dim"] for r in expected["results"]
                if (r["weights"], r["k"], r["test_images"]) == (weights, k, test_images))


def read_expected():
    """expected.json of the reference checkpoint, or None where it is absent (the fixtures then skip)."""
    path = REFERENCE_DIR / "expected.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- the command line

def cli_env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)


def without_iaf_tf(script):
    """Run `script` in a fresh Python where importing iaf_tf fails (as for a user of an exported SavedModel);
    returns the JSON value its last line of output prints."""
    guarded = "import sys; sys.modules['iaf_tf'] = None  # any use of iaf_tf would fail\n" + script
    done = subprocess.run([sys.executable, "-c", guarded], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cli_command(args):
    return [sys.executable, str(ROOT / "bin" / "iaf.py"), *map(str, args)]


def run_cli(args, env=None, timeout=300):
    """bin/iaf.py with these arguments, to completion."""
    return subprocess.run(cli_command(args), capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def start_cli(args, env=None, output=subprocess.PIPE):
    """bin/iaf.py with these arguments, in the background."""
    return subprocess.Popen(cli_command(args), env=env or cli_env(), stdout=output, stderr=output, text=True)


def train_args(logdir, *extra):
    """One step of training on one replica, into logdir."""
    return ["--mode", "train", "--num_gpus", "1", "--logdir", str(logdir), "--max_steps", "1", *extra]


# TensorFlow's C++ runtime logs a few lines at start-up that no environment setting silences.
_TF_RUNTIME_LOG = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


def error_lines(stderr):
    """What a run printed on stderr, without TensorFlow's start-up log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not _TF_RUNTIME_LOG.match(line)]


class _DefineInto:
    """absl.flags with every DEFINE_* writing into one FlagValues (for cli.define_flags)."""

    def __init__(self, flag_values):
        self._flag_values = flag_values

    def __getattr__(self, name):
        return functools.partial(getattr(flags, name), flag_values=self._flag_values)


def cli_flags(*args):
    """bin/iaf.py's flags, parsed from these arguments in a FlagValues of their own (for cli.main)."""
    from iaf_tf import cli

    flag_values = flags.FlagValues()
    cli.define_flags(_DefineInto(flag_values))
    # bin/iaf.py also has absl.logging's --verbosity, which cli.main reads.
    flags.DEFINE_integer("verbosity", -1, "absl logging verbosity", flag_values=flag_values)
    flag_values(["iaf.py", *map(str, args)])
    return flag_values


def run_main(args, **environment):
    """bin/iaf.py's cli.main with these arguments in this process, with these environment variables set for
    the call: a CompletedProcess of its exit code and what it printed (Python's stdout and stderr), as
    run_cli returns for a child process, without a child importing TensorFlow and tracing from nothing.
    This process's CPU is configured already (conftest.py: two logical devices), so the command's own
    configure_cpu, which only works before the first op, is left out."""
    from iaf_tf import cli, devices

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(devices, "configure_cpu", lambda *_, **__: tf.config.list_logical_devices("CPU"))
        for name, value in environment.items():
            patch.setenv(name, str(value))
        code = cli.main(["iaf.py"], cli_flags(*args))
    return subprocess.CompletedProcess([str(a) for a in args], code, out.getvalue(), err.getvalue())


def latest_step(train_dir):
    """The step of the latest checkpoint in train_dir, -1 if there is none."""
    latest = tf.train.latest_checkpoint(str(train_dir))
    return -1 if latest is None else int(latest.rsplit("-", 1)[1])


# ---------------------------------------------------------------- TensorBoard events

def read_events(event_dir):
    """({(tag, step): float} scalars, {(tag, step): array} images) from TensorBoard event files."""
    scalars, images = {}, {}
    for path in sorted(Path(event_dir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "images":
                    images[(value.tag, event.step)] = array
                else:
                    scalars[(value.tag, event.step)] = float(array)
    return scalars, images


def scalar_series(event_dir, tag):
    """{step: value} of one scalar tag."""
    return {step: value for (t, step), value in read_events(event_dir)[0].items() if t == tag}


# ---------------------------------------------------------------- autoregressive order

def raster_allowed(height, width, channels):
    """allowed[(p, c), (q, d)]: output (p, c) of an autoregressive map may depend on input (q, d), p and q
    raster indices: on later positions, and on earlier channels at its own position (the ARMultiConv
    ordering, see layers.conv_ar_mask). Rows and columns are flattened (y, x, c)."""
    p = np.repeat(np.arange(height * width), channels)
    c = np.tile(np.arange(channels), height * width)
    return (p[None, :] > p[:, None]) | ((p[None, :] == p[:, None]) & (c[None, :] < c[:, None]))


# ---------------------------------------------------------------- the original's released format

def write_released_checkpoint(prefix, folder, state_file=None):
    """Rewrite the TF1 checkpoint at `prefix` as the original's released model was published: TensorFlow
    0.9's V1 format (one file, model.ckpt-<step>, no .index) and its names (the moving averages and Adamax
    slots directly under model/). state_file: None (no `checkpoint` file), "relative", or "foreign" (an
    absolute path of the machine that wrote it). Returns the file's path."""
    reader = tf.train.load_checkpoint(str(prefix))
    step = int(reader.get_tensor("model/global_step"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tf.Graph().as_default():
        saved = {}
        for name in reader.get_variable_to_shape_map():
            released = "model/" + name[name.rfind("model/") + len("model/"):]  # model/model/x/Adamax -> model/x/Adamax
            saved[released] = tf.compat.v1.Variable(reader.get_tensor(name), name=f"v{len(saved)}")
        saver = tf.compat.v1.train.Saver(saved, write_version=tf.compat.v1.train.SaverDef.V1)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            path = saver.save(session, str(folder / "model.ckpt"), global_step=step, write_meta_graph=False,
                              write_state=False)
    if state_file:
        named = os.path.basename(path) if state_file == "relative" else f"/home/openai/iaf/train/{os.path.basename(path)}"
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "{named}"\nall_model_checkpoint_paths: "{named}"\n')
    return path


def snapshot(folder):
    """{relative path: (bytes, mtime)} of every file below folder, to show nothing was changed."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def score_line(stdout):
    """The `Step: N Score: X` line an evaluation printed."""
    return next(line for line in stdout.splitlines() if line.startswith("Step: "))
