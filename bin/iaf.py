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
flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "multi_worker"],
                  "mirrored: replicas on this machine; multi_worker: across the machines in TF_CONFIG.")
flags.DEFINE_integer("cpu_replicas", 0, "Run --num_gpus replicas on that many logical CPU devices "
                     "(testing and debugging on hosts without GPUs).")
flags.DEFINE_integer("max_steps", 0, "Stop training at this step (0 = run until stopped, as the original).")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("summary_every", 20, "Steps between TensorBoard summaries and console lines.")
flags.DEFINE_integer("seed", 0, "Seed for initialization, data order and noise.")
flags.DEFINE_string("data_dir", None, "Dataset folder (default: $CIFAR10_PATH or $MNIST_PATH).")
flags.DEFINE_bool("download", os.environ.get("IAF_TF_NO_DOWNLOAD") != "1",
                  "Where CIFAR-10 is not found, download it with tensorflow-datasets.")
flags.DEFINE_integer("threads", 0, "Intra-op threads (0 = TensorFlow's default).")
# Evaluation and sampling (--mode eval_test|eval_train|sample); k comes from --hpconfig, as the original.
flags.DEFINE_string("checkpoint", None, "Evaluate/sample this checkpoint (a native or original TF1 one: a "
                    "prefix or a folder) instead of watching <logdir>/train.")
flags.DEFINE_bool("once", False, "Evaluate the latest checkpoint once and exit, instead of watching.")
flags.DEFINE_integer("num_images", 0, "Evaluate only the first N images of the split (0 = all).")
flags.DEFINE_float("poll_seconds", 60, "How often to look for a new checkpoint when watching.")
flags.DEFINE_float("wait_seconds", 0, "Stop watching after this long without a new checkpoint (0 = never).")
flags.DEFINE_integer("num_samples", 64, "--mode sample: how many samples.")
flags.DEFINE_float("temperature", 1.0, "--mode sample: scale of the prior noise.")

if __name__ == "__main__":
    app.run(lambda argv: cli.main(argv, flags.FLAGS))
