"""One worker of tests/test_train.py's two-worker run (reads TF_CONFIG); not a test module.

argv: logdir cifar10_dir hpconfig weights_out.npz [jit_compile: "true"/"false"] [steps_per_loop]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from iaf_tf import config, train  # noqa: E402


def main(logdir, data_dir, hpconfig, weights_out, jit_compile="false", steps_per_loop="1"):
    cfg = config.Config().parse(hpconfig).replace(logdir=logdir, max_steps=3, checkpoint_every=2, summary_every=1,
                                                  data_dir=data_dir, strategy="multi_worker",
                                                  jit_compile=jit_compile == "true", steps_per_loop=int(steps_per_loop))
    trainer = train.Trainer(cfg)
    train.train(cfg, trainer=trainer)
    np.savez(weights_out, **{f"{i}_{v.path}": v.numpy() for i, v in enumerate(trainer.state.variables)})


if __name__ == "__main__":
    main(*sys.argv[1:])
