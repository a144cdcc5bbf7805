#!/usr/bin/env python
"""iaf-tf entry point, with the original's flags: --logdir, --hpconfig, --mode, --num_gpus."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

from iaf_tf import cli  # noqa: E402

flags.DEFINE_string("logdir", "/tmp/vae", "Logging directory.")
flags.DEFINE_string("hpconfig", "", "Overrides of the hyper-parameters: key=value,key=value.")
flags.DEFINE_string("preset", "", "Named preset from hparams/ (e.g. cpu_quick); --hpconfig overrides it.")
flags.DEFINE_enum("mode", "train", cli.MODES, "What to run.")
flags.DEFINE_integer("num_gpus", None, "Data-parallel replicas (GPUs); overrides the num_gpus hparam.")
flags.DEFINE_integer("cpu_replicas", 0, "Run --num_gpus replicas on that many logical CPU devices "
                     "(testing and debugging on hosts without GPUs).")
flags.DEFINE_integer("max_steps", 0, "Stop training at this step (0 = run until stopped, as the original).")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("summary_every", 20, "Steps between TensorBoard summaries and console lines.")
flags.DEFINE_integer("seed", 0, "Seed for initialization, data order and noise.")
flags.DEFINE_string("data_dir", None, "Dataset folder (default: $CIFAR10_PATH or $MNIST_PATH).")
flags.DEFINE_integer("threads", 0, "Intra-op threads (0 = TensorFlow's default).")

if __name__ == "__main__":
    app.run(lambda argv: cli.main(argv, flags.FLAGS))
