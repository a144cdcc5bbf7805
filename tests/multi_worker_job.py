"""One worker of tests/test_reliability.py's two-worker run (reads TF_CONFIG); not a test module.

argv: logdir cifar10_dir hpconfig weights_out.npz
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from iaf_tf import hparams, train  # noqa: E402


def main(logdir, data_dir, hpconfig, weights_out):
    hps = hparams.get_default_hparams().parse(hpconfig)
    config = train.TrainConfig(logdir=logdir, max_steps=3, checkpoint_every=2, summary_every=1, data_dir=data_dir,
                               strategy="multi_worker")
    result = train.train(hps, config)
    trainer = result["trainer"]
    np.savez(weights_out, **{f"{i}_{v.path}": v.numpy() for i, v in enumerate(trainer.variables)})


if __name__ == "__main__":
    main(*sys.argv[1:])
